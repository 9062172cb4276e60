"""The serving engine against the same requests one at a time and against transformers' static batches, in one
process, side by side.

    python -m bench.serving [--requests 32] [--hf-batch 8] [--out bench/results/serving.json]
    python -m bench.serving --requests 64 --prompts 512 1024 --new 128 256   # the serving issue's workload
    python -m bench.serving --http [--out bench/results/serving_http.json]   # over HTTP: bench/serving_http.py

Workload: --requests requests arriving at once, prompts of --prompts (default 128 to 512) random tokens, --new
(default 64 to 128) new tokens each (greedy, no stop: the bench model has random weights; its reference shape, 6
layers, 6 query heads sharing 2 KV heads), all with cache=full. Sides:

    engine       serving.engine.Engine: continuous batching over one block pool (kv_bytes roomy enough for all)
    one at a time  serving.generate for each request alone, one after the other (what a loop over infer.py does)
    transformers   the same weights exported to transformers' Llama (toymodel.export_hf), `generate` over static
                 batches of --hf-batch requests in arrival order, left-padded with an attention mask; a batch runs
                 until its longest request is done, and only the tokens each request asked for count

Reported per side: wall seconds for the whole workload, output tokens/s end to end (every new token over the wall
time, prefill included), and the engine's mean running batch and decode tokens/s. Both sides produce the same
tokens (checked; transformers' greedy tokens are compared too and reported). Rounds alternate the sides; medians.
Target (the serving issue): the engine at least 3x transformers' output tokens/s. The run leaves malloc's settings
as a plain process has them, for every side: infer.py asks malloc to keep freed memory (toymodel/allocator.py), which
made the engine a few percent faster, but transformers' side slower here (41.8-42.2 s against 36.5-38.1 s for
its 64 requests, in separate processes, alternating), and every side of this process shares the settings.
--keep-freed-memory runs every side with infer.py's settings instead.
"""

import time
from statistics import median

import torch

from bench.common import alternate, machine, seeded_model, serving_parser, verdict, write_json
from bench.decode import BENCH_MODEL, GREEDY
from cache.presets import PRESETS, build_cache
from serving.engine import Engine
from serving.generate import generate
from serving.sequence import Request
from serving.serve import random_workload as workload
from toymodel.allocator import keep_freed_memory
from toymodel.decode_layout import pack_for_decode
from toymodel.export_hf import to_hf_model


def hf_static_batches(hf, requests: list[Request], batch: int) -> list[list[int]]:
    """transformers' generate over static batches of `batch` requests, left-padded; each request's own tokens."""
    out = []
    for i in range(0, len(requests), batch):
        group = requests[i : i + batch]
        T, new = max(len(r.prompt) for r in group), max(r.max_tokens for r in group)
        ids = torch.tensor([[0] * (T - len(r.prompt)) + r.prompt for r in group])  # (B, T), padded on the left
        mask = torch.tensor([[0] * (T - len(r.prompt)) + [1] * len(r.prompt) for r in group])
        with torch.inference_mode():
            tokens = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=0)[:, T:]  # (B, new)
        out += [row[: r.max_tokens].tolist() for row, r in zip(tokens, group)]
    return out


def main() -> None:
    parser = serving_parser("python -m bench.serving", __doc__)
    parser.add_argument("--hf-batch", type=int, default=8, help="requests per static transformers batch")
    parser.add_argument("--prompts", type=int, nargs=2, default=[128, 512], metavar=("LO", "HI"),
                        help="prompt lengths, drawn uniformly (inclusive)")
    parser.add_argument("--new", type=int, nargs=2, default=[64, 128], metavar=("LO", "HI"),
                        help="new tokens per request, drawn uniformly (inclusive)")
    parser.add_argument("--http", action="store_true", help="the engine over HTTP instead (bench/serving_http.py)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="malloc keeps freed memory for every side, as infer.py asks (toymodel/allocator.py)")
    parser.add_argument("--out", default=None, help="default bench/results/serving.json (--http: serving_http.json)")
    args = parser.parse_args()
    for name, (lo, hi) in (("--prompts", args.prompts), ("--new", args.new)):
        if not 1 <= lo <= hi:
            parser.error(f"{name} {lo} {hi}: give LO HI with 1 <= LO <= HI")
    if args.http:
        from bench.serving_http import main as http_main  # here: it needs a server process and httpx

        return http_main(args.requests, args.out or "bench/results/serving_http.json")
    args.out = args.out or "bench/results/serving.json"
    if args.keep_freed_memory:
        keep_freed_memory()
    model = pack_for_decode(seeded_model(BENCH_MODEL).eval())
    requests = workload(args.requests, model.config.vocab_size, tuple(args.prompts), tuple(args.new))
    out_tokens = sum(r.max_tokens for r in requests)
    engines = []

    def engine_side() -> tuple[float, list[list[int]]]:
        engine = Engine(model, "full", kv_bytes=512 * 2**20)
        start = time.perf_counter()
        done = engine.generate(requests)
        engines.append(engine.stats)
        return time.perf_counter() - start, [c.tokens for c in done]

    def alone_side() -> tuple[float, list[list[int]]]:
        start, tokens = time.perf_counter(), []
        for r in requests:
            cache = build_cache(PRESETS["full"], model.config, 1, "cpu", torch.float32,
                                max_tokens=len(r.prompt) + r.max_tokens)
            tokens.append(generate(model, torch.tensor([r.prompt]), cache, r.max_tokens, GREEDY).tokens[0].tolist())
        return time.perf_counter() - start, tokens

    hf = to_hf_model(model)
    hf.generation_config.eos_token_id = None  # never stop early: every request gets its max_tokens

    def hf_side() -> tuple[float, list[list[int]]]:
        start = time.perf_counter()
        tokens = hf_static_batches(hf, requests, args.hf_batch)
        return time.perf_counter() - start, tokens

    engine_side(), alone_side(), hf_static_batches(hf, requests[:2], 2)  # warm-up: kernels, allocator
    engines.clear()
    runs = alternate(args.repeats, {"engine": engine_side, "one_at_a_time": alone_side, "transformers": hf_side})
    same = all(e[1] == a[1] for e, a in zip(runs["engine"], runs["one_at_a_time"]))
    hf_agree = sum(e == h for e, h in zip(runs["engine"][0][1], runs["transformers"][0][1])) / len(requests)
    seconds = {side: median(r[0] for r in rounds) for side, rounds in runs.items()}
    tok_s = {side: out_tokens / s for side, s in seconds.items()}
    ratio = tok_s["engine"] / tok_s["one_at_a_time"]
    hf_ratio = tok_s["engine"] / tok_s["transformers"]
    ok, words = verdict(hf_ratio, 3.0)
    batch = median(s.mean_running_batch for s in engines)
    decode = median(s.decode_tokens_per_s for s in engines)
    print(f"[serving] {args.requests} requests, {out_tokens} output tokens: engine {seconds['engine']:.2f} s = "
          f"{tok_s['engine']:.0f} tok/s (mean running batch {batch:.1f}, decode steps {decode:.0f} tok/s); one at a "
          f"time {seconds['one_at_a_time']:.2f} s = {tok_s['one_at_a_time']:.0f} tok/s: {ratio:.2f}x (same tokens: "
          f"{same}); transformers, static batches of {args.hf_batch}: {seconds['transformers']:.2f} s = "
          f"{tok_s['transformers']:.0f} tok/s: {hf_ratio:.2f}x ({words}; requests with identical greedy tokens: "
          f"{hf_agree:.0%})")
    write_json(args.out, {"machine": machine(), "model": model.config.to_dict(), "args": vars(args),
                          "output_tokens": out_tokens, "seconds": seconds, "output_tokens_per_s": tok_s,
                          "ratio_to_one_at_a_time": ratio, "ratio_to_transformers": hf_ratio, "target": 3.0,
                          "pass": ok, "engine_mean_running_batch": batch, "engine_decode_tokens_per_s": decode,
                          "same_tokens": same, "transformers_same_tokens": hf_agree})


if __name__ == "__main__":
    main()
