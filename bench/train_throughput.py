"""Training throughput of the default model: MHA, GQA and MQA, in float32 and under bf16 autocast (train.dtype),
optionally compiled (train.compile), side by side in one run; and how a training step holds up on a busy machine.

    python -m bench.train_throughput [--steps 10] [--warmup 3] [--compile] [--out bench/results/train_throughput.json]
    python -m bench.train_throughput --contention [--rounds 3] [--block 12]
    python -m bench.train_throughput --allocator [--rounds 2] [--allocator-steps 30]

Default: each variant trains on the same random batches (batch size and context of conf/train/default.yaml and
conf/model/tiny.yaml). Reported: tokens/s, and achieved GFLOP/s counted as 6 * params * tokens (forward 2,
backward 4 FLOPs per parameter per token; attention's own T^2 term is left out, as is customary), with ratios
to MHA in float32. Variants are interleaved step by step, so a machine that slows down mid-run slows all of them
alike. Compiled variants compile during their warm-up steps (tens of seconds); --warmup must cover that.

--contention: the default recipe's step (MHA, train.dtype=auto) beside 0, 1 and 2 competing busy processes,
started and stopped here, the loads interleaved round by round; in each load's turn, a block of --block steps with
the thread governor of train.py (toymodel/threads.py: one governor for the whole run, as in a long training that
sees loads come and go, so its reactions are in the figures) and a block with --threads fixed. Target: with the
governor, >= 0.45x its idle tokens/s beside one busy process.

--allocator: `python train.py` for --allocator-steps steps with keep_freed_memory=true and =false, alternating, in
subprocesses: wall time, training tokens/s (its summary.json), minor page faults and peak memory (os.wait4).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

from bench.common import LOADS, load_rounds, machine, seeded_model, write_json
from toymodel.config import ModelConfig
from toymodel.threads import ThreadGovernor
from toymodel.allocator import keep_freed_memory
from training.config import ModelSchema, OptimConfig
from training.loop import lm_loss, make_optimizer
from training.precision import autocast, resolve_dtype

ATTN = {"mha": 8, "gqa": 2, "mqa": 1}
DTYPES = ("float32", "bfloat16")
CPU = torch.device("cpu")


def default_sizes() -> tuple[dict, int, int]:
    """The default model's sizes, and the default recipe's batch size and context."""
    sizes = {k: v for k, v in vars(ModelSchema()).items() if k != "name"}
    return sizes, OptimConfig().batch_size, sizes["block_size"]


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor, dtype: str) -> None:
    """One optimizer step on batch (B, T + 1), as training/loop.py takes it."""
    x, y = batch[:, :-1], batch[:, 1:]
    with autocast(dtype, CPU):
        loss = lm_loss(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def variants_table(args) -> None:
    sizes, B, T = default_sizes()
    opt_cfg = OptimConfig()
    variants = [(attn, dtype, False) for attn in ATTN for dtype in DTYPES]
    variants += [("mha", dtype, True) for dtype in DTYPES] if args.compile else []
    runs = {}
    for attn, dtype, compiled in variants:
        model = seeded_model(ModelConfig(**sizes, n_kv_head=ATTN[attn]))
        runs[(attn, dtype, compiled)] = {"model": model, "step": torch.compile(model) if compiled else model,
                                         "opt": make_optimizer(model, opt_cfg), "seconds": 0.0}
    batches = torch.randint(0, sizes["vocab_size"], (args.warmup + args.steps, B, T + 1),
                            generator=torch.Generator().manual_seed(0))

    for step, batch in enumerate(batches):
        for (attn, dtype, compiled), run in runs.items():  # interleaved: every variant sees the same machine state
            t0 = time.perf_counter()
            train_step(run["step"], run["opt"], batch, dtype)
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


def contention(args) -> None:
    sizes, B, T = default_sizes()
    dtype = resolve_dtype("auto", CPU)
    model = seeded_model(ModelConfig(**sizes, n_kv_head=ATTN["mha"]))
    opt = make_optimizer(model, OptimConfig())
    g = torch.Generator().manual_seed(0)
    next_batch = lambda: torch.randint(0, sizes["vocab_size"], (B, T + 1), generator=g)  # noqa: E731
    keep_freed_memory()  # as train.py does
    governor = ThreadGovernor(max_threads=args.threads)
    for _ in range(args.warmup + 2 * (governor.probe_steps + 1)):  # its first probe, the allocator's first steps
        with governor.step():
            train_step(model, opt, next_batch(), dtype)

    def block(policy: str) -> float:
        start = time.perf_counter()
        for _ in range(args.block):
            if policy == "governor":
                with governor.step():
                    train_step(model, opt, next_batch(), dtype)
            else:
                torch.set_num_threads(args.threads)
                train_step(model, opt, next_batch(), dtype)
        return args.block * B * T / (time.perf_counter() - start)

    def measure(load: int) -> dict:
        order = ("governor", "fixed") if load % 2 == 0 else ("fixed", "governor")
        row = {policy: block(policy) for policy in order}
        print(f"[contention] {load} busy: governor {row['governor']:,.0f} tok/s ({torch.get_num_threads()} threads "
              f"now), fixed {row['fixed']:,.0f}", flush=True)
        return row

    rounds = load_rounds(args.rounds, measure)
    tok_s = {p: {load: median(r[p] for r in rounds[load]) for load in LOADS} for p in ("governor", "fixed")}
    print(f"[contention] training tokens/s, default recipe step ({dtype}, batch {B} x {T}), blocks of {args.block} "
          f"steps, medians of {args.rounds} rounds; 'fixed' = {args.threads} threads")
    print(f"{'threads':>8} {'idle':>9} {'1 busy':>17} {'2 busy':>17}")
    for p, t in tok_s.items():
        print(f"{p:>8} {t[0]:>9,.0f} {t[1]:>9,.0f} ({t[1] / t[0]:.2f}x) {t[2]:>9,.0f} ({t[2] / t[0]:.2f}x)")
    ratio = tok_s["governor"][1] / tok_s["governor"][0]
    print(f"[contention] governor beside one busy process: {ratio:.2f}x idle (target 0.45x: "
          f"{'PASS' if ratio >= 0.45 else 'MISS'}); idle {tok_s['governor'][0] / tok_s['fixed'][0]:.2f}x fixed")
    write_json(args.out, {"section": "contention", "dtype": dtype, "batch_size": B, "block_size": T,
                          "block_steps": args.block, "rounds": args.rounds, "machine": machine(), "tokens_per_s": tok_s,
                          "ratio_1_busy": ratio, "target": 0.45, "pass": ratio >= 0.45, "probes": governor.probes})


def allocator(args) -> None:
    runs: dict[str, list[dict]] = {"true": [], "false": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for keep in ("true", "false") if r % 2 == 0 else ("false", "true"):
                run_name = f"alloc-{keep}-{r}"
                cmd = [sys.executable, "train.py", "logger=none", f"train.max_steps={args.allocator_steps}",
                       "train.warmup_steps=5", f"train.eval_interval={args.allocator_steps}",
                       f"train.ckpt_interval={args.allocator_steps}", f"out_dir={tmp}", f"run_name={run_name}",
                       f"threads={args.threads}", f"keep_freed_memory={keep}"]
                start = time.perf_counter()
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                _, status, usage = os.wait4(proc.pid, 0)
                wall = time.perf_counter() - start
                if status != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed with status {status}")
                summary = json.loads((Path(tmp) / run_name / "summary.json").read_text())
                runs[keep].append({"wall_s": wall, "tokens_per_s": summary["mean_tokens_per_s"],
                                   "minor_faults": usage.ru_minflt, "peak_rss_bytes": usage.ru_maxrss * 1024,
                                   "val_loss": summary["val_loss"]})
                print(f"[allocator] keep_freed_memory={keep}: {wall:.1f} s, {runs[keep][-1]['tokens_per_s']:,.0f} "
                      f"tok/s, {usage.ru_minflt:,} minor faults, peak {usage.ru_maxrss / 2**20:.2f} GiB", flush=True)
    med = {k: {m: median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    kept, default = med["true"], med["false"]
    print(f"[allocator] {args.allocator_steps}-step train.py, medians of {args.rounds}: keep_freed_memory=true "
          f"{kept['tokens_per_s'] / default['tokens_per_s']:.2f}x the tokens/s, "
          f"{default['minor_faults'] / kept['minor_faults']:.1f}x fewer page faults, "
          f"{kept['peak_rss_bytes'] / default['peak_rss_bytes']:.2f}x the peak memory; val loss "
          f"{kept['val_loss']:.4f} vs {default['val_loss']:.4f}")
    write_json(args.out, {"section": "allocator", "steps": args.allocator_steps, "threads": args.threads,
                          "machine": machine(), "runs": runs, "medians": med})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (contention: in all) first")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd MHA in both dtypes")
    parser.add_argument("--contention", action="store_true", help="the default step beside busy processes")
    parser.add_argument("--rounds", type=int, default=3, help="contention, allocator: rounds (medians)")
    parser.add_argument("--block", type=int, default=12, help="contention: steps per block")
    parser.add_argument("--allocator", action="store_true", help="train.py with and without keep_freed_memory")
    parser.add_argument("--allocator-steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="all the threads; contention: the fixed count compared with the governor")
    parser.add_argument("--out", default=None, help="default: bench/results/train_throughput[_contention|_allocator]"
                                                    ".json")
    args = parser.parse_args()
    section = "contention" if args.contention else "allocator" if args.allocator else None
    args.out = args.out or f"bench/results/train_throughput{'_' + section if section else ''}.json"
    {"contention": contention, "allocator": allocator, None: variants_table}[section](args)


if __name__ == "__main__":
    main()
