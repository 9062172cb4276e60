"""What prefix caching buys: the serving engine with and without it, on requests that share a long beginning, in one
process, side by side.

    python -m bench.serving_prefix [--requests 32] [--prefix 768] [--repeats 3]
                                   [--out bench/results/serving_prefix.json]

Workload: --requests requests arriving at once, each a shared beginning of --prefix random tokens (a long system
prompt, a shared document) followed by 32 to 128 tokens of its own, asking for 64 new tokens (greedy, no stop; the
bench model, random weights, its 1,024-token context). Sides: Engine(prefix_caching=True), the default, and
Engine(prefix_caching=False). Reported per side (medians of alternating rounds): wall seconds, output tokens/s end
to end, time to first token (p50, p90), prompt tokens prefilled, and whether both sides produced the same tokens.
"""

import time
from statistics import median

import torch

from bench.common import alternate, machine, medians, seeded_model, serving_parser, write_json
from bench.decode import BENCH_MODEL
from serving.engine import Engine
from serving.sequence import Request
from serving.serve import percentiles
from toymodel.decode_layout import pack_for_decode


def shared_workload(n: int, prefix: int, vocab: int, seed: int = 0) -> list[Request]:
    """n greedy requests of 64 new tokens: one random beginning of `prefix` tokens, then 32-128 tokens each."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randint(0, vocab, (prefix,), generator=g).tolist()
    own = torch.randint(32, 129, (n,), generator=g).tolist()
    return [Request(common + torch.randint(0, vocab, (k,), generator=g).tolist(), max_tokens=64) for k in own]


def main() -> None:
    parser = serving_parser("python -m bench.serving_prefix", __doc__)
    parser.add_argument("--prefix", type=int, default=768, help="tokens every prompt begins with")
    parser.add_argument("--out", default="bench/results/serving_prefix.json")
    args = parser.parse_args()
    model = pack_for_decode(seeded_model(BENCH_MODEL).eval())
    requests = shared_workload(args.requests, args.prefix, model.config.vocab_size)
    out_tokens = sum(r.max_tokens for r in requests)
    stats: dict[str, list] = {"cached": [], "uncached": []}

    def side(name: str, caching: bool):
        def run() -> tuple[float, list[list[int]]]:
            engine = Engine(model, "full", kv_bytes=512 * 2**20, prefix_caching=caching)
            start = time.perf_counter()
            done = engine.generate(requests)
            seconds = time.perf_counter() - start
            stats[name].append({"prefill_tokens": engine.stats.prefill_tokens,
                                "prefix_hit_tokens": engine.stats.prefix_hit_tokens,
                                **percentiles([c.time_to_first_token for c in done], "ttft_s")})
            return seconds, [c.tokens for c in done]
        return run

    Engine(model, "full", kv_bytes=64 * 2**20).generate(requests[:2])  # warm-up: kernels, allocator
    runs = alternate(args.repeats, {"cached": side("cached", True), "uncached": side("uncached", False)})
    same = all(c[1] == u[1] for c, u in zip(runs["cached"], runs["uncached"]))
    results = {}
    for name, rounds in runs.items():
        seconds = median(r[0] for r in rounds)
        results[name] = {"seconds": seconds, "output_tokens_per_s": out_tokens / seconds, **medians(stats[name])}
    c, u = results["cached"], results["uncached"]
    print(f"[prefix] {args.requests} requests sharing {args.prefix} tokens, {out_tokens} output tokens (same tokens: "
          f"{same})")
    for name, r in results.items():
        print(f"  {name:<9} {r['seconds']:6.2f} s  {r['output_tokens_per_s']:6.0f} out tok/s  time to first token "
              f"p50 {r['ttft_s_p50']:.2f} s, p90 {r['ttft_s_p90']:.2f} s  prefilled {r['prefill_tokens']:.0f} "
              f"tokens ({r['prefix_hit_tokens']:.0f} skipped)")
    print(f"[prefix] with the cache: {c['output_tokens_per_s'] / u['output_tokens_per_s']:.2f}x output tokens/s, "
          f"time to first token p50 {u['ttft_s_p50'] / c['ttft_s_p50']:.2f}x shorter")
    write_json(args.out, {"machine": machine(), "model": model.config.to_dict(), "args": vars(args),
                          "output_tokens": out_tokens, "results": results, "same_tokens": same})


if __name__ == "__main__":
    main()
