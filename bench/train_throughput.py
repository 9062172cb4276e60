"""Training throughput of the default model for MHA, GQA and MQA, side by side in one run.

    python -m bench.train_throughput [--steps 10] [--warmup 3] [--out bench/results/train_throughput.json]

Each variant trains on the same random batches (batch size and context of conf/train/default.yaml and
conf/model/tiny.yaml). Reported: tokens/s, and achieved GFLOP/s counted as 6 * params * tokens (forward 2,
backward 4 FLOPs per parameter per token; attention's own T^2 term is left out, as is customary), with ratios
to MHA. Variants are interleaved step by step, so a machine that slows down mid-run slows all of them alike.
"""

import argparse
import time

import torch

from bench.common import machine, seeded_model, write_json
from toymodel.config import ModelConfig
from training.config import ModelSchema, OptimConfig
from training.loop import lm_loss, make_optimizer

VARIANTS = {"mha": 8, "gqa": 2, "mqa": 1}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--out", default="bench/results/train_throughput.json")
    args = parser.parse_args()

    sizes = {k: v for k, v in vars(ModelSchema()).items() if k != "name"}
    opt_cfg = OptimConfig()
    B, T = opt_cfg.batch_size, sizes["block_size"]
    runs = {}
    for name, n_kv_head in VARIANTS.items():
        model = seeded_model(ModelConfig(**sizes, n_kv_head=n_kv_head))
        runs[name] = {"model": model, "opt": make_optimizer(model, opt_cfg), "seconds": 0.0}
    batches = torch.randint(0, sizes["vocab_size"], (args.warmup + args.steps, B, T + 1),
                            generator=torch.Generator().manual_seed(0))

    for step, batch in enumerate(batches):
        x, y = batch[:, :-1], batch[:, 1:]
        for run in runs.values():  # interleaved: every variant sees the same machine state
            t0 = time.perf_counter()
            lm_loss(run["model"](x), y).backward()
            run["opt"].step()
            run["opt"].zero_grad(set_to_none=True)
            if step >= args.warmup:
                run["seconds"] += time.perf_counter() - t0

    results = []
    for name, run in runs.items():
        params = run["model"].num_params()
        tok_s = args.steps * B * T / run["seconds"]
        results.append({"attn": name, "n_kv_head": VARIANTS[name], "params": params,
                        "kv_bytes_per_token_fp16": run["model"].config.kv_bytes_per_token(),
                        "tokens_per_s": tok_s, "gflop_per_s": 6 * params * tok_s / 1e9})
    base = results[0]["tokens_per_s"]
    print(f"{'attn':<5} {'n_kv_head':>9} {'params':>10} {'KV B/token':>10} {'tokens/s':>9} {'GFLOP/s':>8} {'vs mha':>7}")
    for r in results:
        print(f"{r['attn']:<5} {r['n_kv_head']:>9} {r['params']:>10,} {r['kv_bytes_per_token_fp16']:>10} "
              f"{r['tokens_per_s']:>9,.0f} {r['gflop_per_s']:>8.1f} {r['tokens_per_s'] / base:>6.2f}x")
    write_json(args.out, {"batch_size": B, "block_size": T, "steps": args.steps, "machine": machine(),
                          "results": results})


if __name__ == "__main__":
    main()
