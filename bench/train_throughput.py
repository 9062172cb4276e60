"""Training throughput of the default model: MHA, GQA and MQA, in float32 and under bf16 autocast (train.dtype),
optionally compiled (train.compile), side by side in one run.

    python -m bench.train_throughput [--steps 10] [--warmup 3] [--compile] [--out bench/results/train_throughput.json]

Each variant trains on the same random batches (batch size and context of conf/train/default.yaml and
conf/model/tiny.yaml). Reported: tokens/s, and achieved GFLOP/s counted as 6 * params * tokens (forward 2,
backward 4 FLOPs per parameter per token; attention's own T^2 term is left out, as is customary), with ratios
to MHA in float32. Variants are interleaved step by step, so a machine that slows down mid-run slows all of them
alike. Compiled variants compile during their warm-up steps (tens of seconds); --warmup must cover that.
"""

import argparse
import time

import torch

from bench.common import machine, seeded_model, write_json
from toymodel.config import ModelConfig
from training.config import ModelSchema, OptimConfig
from training.loop import lm_loss, make_optimizer
from training.precision import autocast

ATTN = {"mha": 8, "gqa": 2, "mqa": 1}
DTYPES = ("float32", "bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd MHA in both dtypes")
    parser.add_argument("--out", default="bench/results/train_throughput.json")
    args = parser.parse_args()

    sizes = {k: v for k, v in vars(ModelSchema()).items() if k != "name"}
    opt_cfg = OptimConfig()
    B, T = opt_cfg.batch_size, sizes["block_size"]
    variants = [(attn, dtype, False) for attn in ATTN for dtype in DTYPES]
    variants += [("mha", dtype, True) for dtype in DTYPES] if args.compile else []
    runs = {}
    for attn, dtype, compiled in variants:
        model = seeded_model(ModelConfig(**sizes, n_kv_head=ATTN[attn]))
        runs[(attn, dtype, compiled)] = {"model": model, "step": torch.compile(model) if compiled else model,
                                         "opt": make_optimizer(model, opt_cfg), "seconds": 0.0}
    batches = torch.randint(0, sizes["vocab_size"], (args.warmup + args.steps, B, T + 1),
                            generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")

    for step, batch in enumerate(batches):
        x, y = batch[:, :-1], batch[:, 1:]
        for (attn, dtype, compiled), run in runs.items():  # interleaved: every variant sees the same machine state
            t0 = time.perf_counter()
            with autocast(dtype, cpu):
                loss = lm_loss(run["step"](x), y)
            loss.backward()
            run["opt"].step()
            run["opt"].zero_grad(set_to_none=True)
            if step >= args.warmup:
                run["seconds"] += time.perf_counter() - t0

    results = []
    for (attn, dtype, compiled), run in runs.items():
        params = run["model"].num_params()
        tok_s = args.steps * B * T / run["seconds"]
        results.append({"attn": attn, "n_kv_head": ATTN[attn], "dtype": dtype, "compile": compiled, "params": params,
                        "kv_bytes_per_token_fp16": run["model"].config.kv_bytes_per_token(),
                        "tokens_per_s": tok_s, "gflop_per_s": 6 * params * tok_s / 1e9})
    base = results[0]["tokens_per_s"]
    print(f"{'attn':<5} {'n_kv_head':>9} {'dtype':>9} {'compile':>7} {'params':>10} {'KV B/token':>10} "
          f"{'tokens/s':>9} {'GFLOP/s':>8} {'vs mha fp32':>11}")
    for r in results:
        print(f"{r['attn']:<5} {r['n_kv_head']:>9} {r['dtype']:>9} {str(r['compile']):>7} {r['params']:>10,} "
              f"{r['kv_bytes_per_token_fp16']:>10} {r['tokens_per_s']:>9,.0f} {r['gflop_per_s']:>8.1f} "
              f"{r['tokens_per_s'] / base:>10.2f}x")
    write_json(args.out, {"batch_size": B, "block_size": T, "steps": args.steps, "machine": machine(),
                          "results": results})


if __name__ == "__main__":
    main()
