"""When compression buys throughput: the serving engine with a KV memory that holds about 8 full-cache sequences,
full against per-request KV-Compress budgets and against 4-bit blocks, on the same workload, in one process.

    python -m bench.serving_budget [--requests 64] [--ratios 2 4 8 16 32 64] [--out bench/results/serving_budget.json]
    python -m bench.serving_budget --reserve --out bench/results/serving_budget_reserve.json   # no preemption

Workload (the serving issue's): --requests requests arriving at once, prompts of 512 to 1,024 random tokens, 128
to 256 new tokens each (greedy, no stop; the bench model, random weights). The engine's pool holds
--full-sequences sequences of the workload's mean length in the full cache (fp32). Settings:

    full         every token kept: about 8 sequences run at once, the rest wait
    kvcompress Nx  each request's max_cache_tokens = its prompt length / N (compressed once, after prefill;
                 protected window 32): evicted blocks serve more sequences
    quant4       4-bit blocks (int4 codes, a float16 scale and zero per 32 channels): 6.4x the tokens per byte

Reported per setting: wall seconds, requests/s, output tokens/s end to end (prefill included), decode tokens/s
(decode steps only, the MLSys 2025 study's definition), mean running batch, peak blocks, preemptions, and the
share of the time spent in prefill. Targets (the serving issue): KV-Compress at 8x at least 3x full's decode
tokens/s and at least 2x its end-to-end output tokens/s. Not here yet: a quality column (perplexity or task scores
through each setting: the weights are random) and the masking counterfactual.
"""

import argparse
import time
from dataclasses import replace

import torch

from bench.common import machine, seeded_model, verdict, write_json
from bench.decode import BENCH_MODEL
from bench.serving import workload
from serving.engine import Engine
from serving.sequence import Request
from toymodel.decode_layout import pack_for_decode


def run(model, preset: str, requests: list[Request], kv_bytes: int, reserve: bool) -> dict:
    engine = Engine(model, preset, kv_bytes=kv_bytes, max_batch=len(requests), reserve=reserve)
    start = time.perf_counter()
    done = engine.generate(requests)
    seconds = time.perf_counter() - start
    s, out = engine.stats, sum(len(c.tokens) for c in done)
    return {"seconds": seconds, "requests_per_s": len(done) / seconds, "output_tokens_per_s": out / seconds,
            "decode_tokens_per_s": s.decode_tokens_per_s, "mean_running_batch": s.mean_running_batch,
            "peak_blocks": s.peak_blocks, "pool_blocks": engine.pool.n_blocks, "preemptions": s.preemptions,
            "blocks_evicted": s.blocks_evicted, "prefill_share": s.prefill_seconds / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serving_budget", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--ratios", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--full-sequences", type=int, default=8, help="full-cache sequences the KV memory holds")
    parser.add_argument("--reserve", action="store_true", help="admission reserves each sequence's growth")
    parser.add_argument("--out", default="bench/results/serving_budget.json")
    args = parser.parse_args()
    model = pack_for_decode(seeded_model(BENCH_MODEL).eval())
    requests = workload(args.requests, model.config.vocab_size, prompts=(512, 1024), new=(128, 256))
    c = model.config
    mean_tokens = sum(len(r.prompt) + r.max_tokens for r in requests) / len(requests)
    kv_bytes = int(args.full_sequences * mean_tokens * 2 * c.n_layer * c.n_kv_head * c.head_dim * 4)  # fp32 K, V
    Engine(model, "full", kv_bytes=kv_bytes).generate(requests[:2])  # warm-up: kernels, allocator
    settings = {"full": ("full", requests), "quant4": ("quant4", requests)}
    for n in args.ratios:
        settings[f"kvcompress {n}x"] = ("full", [replace(r, max_cache_tokens=max(1, len(r.prompt) // n))
                                                for r in requests])
    results = {}
    print(f"[budget] {args.requests} requests, KV memory {kv_bytes / 2**20:.1f} MiB (~{args.full_sequences} full "
          f"sequences of {mean_tokens:.0f} tokens), admission {'reserving growth' if args.reserve else 'optimistic'}")
    print(f"{'setting':<16} {'seconds':>8} {'req/s':>6} {'out tok/s':>9} {'decode tok/s':>12} {'batch':>6} "
          f"{'peak blocks':>11} {'preempt':>7} {'prefill':>7}")
    for name, (preset, reqs) in settings.items():
        r = results[name] = run(model, preset, reqs, kv_bytes, args.reserve)
        print(f"{name:<16} {r['seconds']:8.1f} {r['requests_per_s']:6.2f} {r['output_tokens_per_s']:9.0f} "
              f"{r['decode_tokens_per_s']:12.0f} {r['mean_running_batch']:6.1f} "
              f"{r['peak_blocks']:5d}/{r['pool_blocks']:<5d} {r['preemptions']:7d} {r['prefill_share']:7.0%}",
              flush=True)
    verdicts = {}
    if "kvcompress 8x" in results:
        full, kvc = results["full"], results["kvcompress 8x"]
        for key, target in (("decode_tokens_per_s", 3.0), ("output_tokens_per_s", 2.0)):
            ratio = kvc[key] / full[key]
            ok, words = verdict(ratio, target)
            verdicts[key] = {"ratio": ratio, "target": target, "pass": ok}
            print(f"[budget] kvcompress 8x / full, {key}: {ratio:.2f}x ({words})")
    write_json(args.out, {"machine": machine(), "model": c.to_dict(), "args": vars(args), "kv_bytes": kv_bytes,
                          "results": results, "targets": verdicts})


if __name__ == "__main__":
    main()
