"""The block pool's claims (cache/blocks.py), measured in one process on the bench model with random weights.

    python -m bench.paged                        # every section
    python -m bench.paged --sections bits        # one of them

Sections (each checked against its target and printed with PASS / MISS):

    bits    full and quant4 through a pool sized to the need, after a prefill of n tokens for n from 1 to 8,192:
            bits per cached element against the codec's formula (32 for float32, 5 for int4 with a float16 scale
            and zero per 32 channels). Blocks of 16 tokens hold at most 15 empty slots per (layer, KV head), so
            the excess is at most the formula x 15 / n; the block tables add a few bytes per block.
            Target: full holds at most 34 bits per element from 256 tokens on (32 x (1 + 15 / 256) = 33.9); below
            that the one partial block dominates (n = 1 token: 16 slots, 512 bits), which is the slack allowed.
    ragged  8 prompts of 64 to 1,024 tokens (evenly spaced) decoded in ONE ragged batch through the block pool,
            against a batch of 8 prompts of their mean length through the contiguous buffer the pool replaced
            (cache.storage.BufferStore under the same decode kernel), and the same equal-length batch through the
            pool. Every side runs each block op by op (pack_for_decode(one_call=False)): the contiguous buffer has
            no one-call path (cache/kernels/cpu_block.py), and the claim is about the storage. Decode tokens/s
            (B x new tokens / decode seconds, prefill excluded), medians of alternating rounds.
            Target: the ragged batch decodes at least 0.9x as fast as the contiguous equal-length batch.
    eviction
            every evicting preset against `full`, batch 1, decode steps timed after filling 320 and 8,192 tokens of
            context (the presets' budget: 128 tokens per head). Targets: at least 0.9x full's tokens/s at 320
            tokens and at least 2x at 8,192. The ceiling row times `full` over a fresh cache of 128 tokens (as
            many as an evicting head keeps) in the same rounds: the most eviction can buy at batch 1, where every
            step also reads all the weights (44 MB in fp32, about as much as full's K and V at 8,192 tokens).
            window, sink, h2o, snapkv and l2norm live in the block pool and decode with the kernel over their
            blocks (which hands H2O and SnapKV the weights they read; sink's moved keys are re-rotated to their
            slot once per compaction), and so does kvcompress, a length per head.
    kivi    KIVI in the pool (cache/residual.py) against KIVI's contiguous store (cache.storage.CodecStore under the
            segments kernel): decode tokens/s of kivi2 and kivi4 at batch 1 and 8 after 1,024 and 4,096 tokens,
            and bits per element at every length of `bits` against the formula: quantized tokens at the codec's
            bits, the residual's capacity of R = 128 tokens at 32 (no partial block: flushes fill blocks whole).
            Target: the pool decodes at least 0.9x as fast as the contiguous store.
            python -m bench.paged --sections kivi --out bench/results/paged_kivi.json
"""

import argparse
import copy
from statistics import median

import torch

from bench.common import alternate, machine, seeded_model, verdict, write_json
from bench.decode import BENCH_MODEL, GREEDY, fill, step_seconds
from cache.base import LayerCache
from cache.kernels.choose import decode_kernel
from cache.model_cache import ModelCache
from cache.policies import Full
from cache.presets import PRESETS, build_cache
from cache.storage import BufferStore, CodecStore
from serving.generate import generate
from toymodel.decode_layout import pack_for_decode
from toymodel.model import Transformer

LENGTHS = (1, 16, 100, 256, 1000, 4096, 8192)


def contiguous_cache(model: Transformer, B: int, preset: str = "full") -> ModelCache:
    """A keep-everything cache as it was before the block pool: full precision in one doubling buffer per layer,
    a codec's payloads in a CodecStore; the same decode kernel over them."""
    c, codec = model.config, PRESETS[preset].build_codec(model.config.head_dim)
    kernel = decode_kernel("sdpa", "cpu", torch.float32)
    store = (lambda: BufferStore(None, torch.float32)) if codec.full_precision else (
        lambda: CodecStore(codec, torch.float32))
    layers = [LayerCache(Full(), store(), kernel) for _ in range(c.n_layer)]
    return ModelCache(layers, B, c.n_kv_head, c.head_dim, torch.device("cpu"))


@torch.inference_mode()
def section_bits(model: Transformer, args) -> dict:
    rows = {}
    ids = torch.randint(0, model.config.vocab_size, (1, max(LENGTHS)), generator=torch.Generator().manual_seed(0))
    for name in ("full", "quant4"):
        formula = PRESETS[name].build_codec(model.config.head_dim).bits_per_element(torch.float32)
        for n in LENGTHS:
            cache = build_cache(PRESETS[name], model.config, 1, ids.device, torch.float32, max_tokens=n)
            for s in range(0, n, args.chunk):
                model(ids[:, s : min(n, s + args.chunk)], cache, last_only=True)
            bits = cache.figures()["bits_per_element"]
            rows[f"{name} n={n}"] = {"preset": name, "tokens": n, "bits_per_element": bits, "formula": formula,
                                     "slack_bound": formula * (1 + 15 / n)}
            print(f"[bits] {name:6} {n:5} tokens: {bits:7.2f} bits per element (formula {formula:g}, with one "
                  f"partial block at most {formula * (1 + 15 / n):.2f} + tables)")
    worst = max(r["bits_per_element"] for r in rows.values() if r["preset"] == "full" and r["tokens"] >= 256)
    ok, words = verdict(worst, 34, at_most=True)
    print(f"[bits] full from 256 tokens on: at most {worst:.2f} bits per element ({words})")
    return {"rows": rows, "full_worst_from_256": worst, "target": 34, "pass": ok}


def section_ragged(model: Transformer, args) -> dict:
    B, V = 8, model.config.vocab_size
    lengths = torch.linspace(64, 1024, B).round().long()  # (B,)
    mean = int(lengths.float().mean().round())
    g = torch.Generator().manual_seed(1)
    ragged_ids = torch.randint(0, V, (B, int(lengths.max())), generator=g)  # right-padded: row b uses lengths[b]
    equal_ids = torch.randint(0, V, (B, mean), generator=g)
    need = int(lengths.max()) + args.new_tokens
    op_by_op = pack_for_decode(copy.deepcopy(model), one_call=False)  # one storage against another, one code path

    def run(ids, cache, prompt_lengths=None) -> float:
        return generate(op_by_op, ids, cache, args.new_tokens, GREEDY,
                        prompt_lengths=prompt_lengths).decode_tokens_per_s

    sides = {
        "ragged_pool": lambda: run(ragged_ids, build_cache(PRESETS["full"], model.config, B, "cpu", torch.float32,
                                                           max_tokens=need), lengths),
        "equal_contiguous": lambda: run(equal_ids, contiguous_cache(model, B)),
        "equal_pool": lambda: run(equal_ids, build_cache(PRESETS["full"], model.config, B, "cpu", torch.float32,
                                                         max_tokens=need)),
    }
    tok_s = {name: median(t) for name, t in alternate(args.repeats, sides).items()}
    ratio = tok_s["ragged_pool"] / tok_s["equal_contiguous"]
    ok, words = verdict(ratio, 0.9)
    print(f"[ragged] B={B}, prompts {lengths.tolist()} (mean {mean}), {args.new_tokens} new tokens: decode tok/s "
          f"ragged pool {tok_s['ragged_pool']:.0f}, equal-length contiguous {tok_s['equal_contiguous']:.0f}, "
          f"equal-length pool {tok_s['equal_pool']:.0f}; ragged / contiguous = {ratio:.2f}x ({words})")
    return {"lengths": lengths.tolist(), "mean_length": mean, "decode_tok_s": tok_s, "ratio": ratio, "target": 0.9,
            "pass": ok}


@torch.inference_mode()
def section_eviction(model: Transformer, args) -> dict:
    names = ["full"] + [name for name, spec in PRESETS.items() if spec.policy != "full" and spec.codec == "fp"]
    budget = max(PRESETS[name].budget for name in names[1:])
    ids = torch.randint(0, model.config.vocab_size, (1, 8192), generator=torch.Generator().manual_seed(2))

    def cache_of(name: str, T: int) -> ModelCache:
        cache = build_cache(PRESETS[name], model.config, 1, "cpu", torch.float32,
                            max_tokens=T + args.repeats * (args.steps + 1))
        fill(model, cache, ids[:, :T], 256)
        return cache

    def ceiling() -> float:  # full over a fresh cache of `budget` tokens: the policies' work and slack left out
        return step_seconds(model, cache_of("full", budget), args.steps)

    results = {}
    for T, target in ((320, 0.9), (8192, 2.0)):
        caches = {name: cache_of(name, T) for name in names}
        steps = {n: (lambda c=c: step_seconds(model, c, args.steps)) for n, c in caches.items()}
        times = alternate(args.repeats, {**steps, "ceiling": ceiling})
        tok_s = {n: 1 / median(t) for n, t in times.items()}
        most = tok_s["ceiling"] / tok_s["full"]
        results[f"ceiling T={T}"] = {"tok_s": tok_s["ceiling"], "full_tok_s": tok_s["full"], "ratio": most}
        print(f"[eviction] {T:5} tokens: ceiling: full over {budget} tokens decodes {tok_s['ceiling']:.0f} tok/s = "
              f"{most:.2f}x full over {T}, the most any eviction to {budget} tokens per head reaches here")
        for name in names[1:]:
            ratio = tok_s[name] / tok_s["full"]
            ok, words = verdict(ratio, target)
            results[f"{name} T={T}"] = {"tok_s": tok_s[name], "full_tok_s": tok_s["full"], "ratio": ratio,
                                        "target": target, "pass": ok, "blocks": caches[name].layers[0].store.paged}
            print(f"[eviction] {T:5} tokens: {name:10} {tok_s[name]:6.0f} tok/s vs full {tok_s['full']:6.0f} = "
                  f"{ratio:.2f}x ({words}){'' if caches[name].layers[0].store.paged else '  (contiguous store)'}")
    return results


@torch.inference_mode()
def section_kivi(model: Transformer, args) -> dict:
    results = {}
    ids = torch.randint(0, model.config.vocab_size, (8, max(LENGTHS)), generator=torch.Generator().manual_seed(3))
    for name in ("kivi2", "kivi4"):
        codec = PRESETS[name].build_codec(model.config.head_dim)
        bits_q, R = codec.bits_per_element(torch.float32), codec.residual
        for n in LENGTHS:
            cache = build_cache(PRESETS[name], model.config, 1, "cpu", torch.float32, max_tokens=n)
            fill(model, cache, ids[:1, :n], args.chunk)
            bits, formula = cache.figures()["bits_per_element"], (bits_q * (n - n % R) + 32 * R) / n  # + tables
            results[f"{name} bits n={n}"] = {"bits_per_element": bits, "formula": formula}
            print(f"[kivi] {name} {n:5} tokens: {bits:7.2f} bits per element (quantized at {bits_q:g} + a residual of "
                  f"{R} float32 tokens: {formula:.2f}, + tables)")
        for B, T in ((1, 1024), (1, 4096), (8, 1024), (8, 4096)):
            caches = {"pool": build_cache(PRESETS[name], model.config, B, "cpu", torch.float32,
                                          max_tokens=T + args.repeats * (args.steps + 1)),
                      "contiguous": contiguous_cache(model, B, name)}
            for cache in caches.values():
                fill(model, cache, ids[:B, :T], 256)
            times = alternate(args.repeats, {k: (lambda c=c: step_seconds(model, c, args.steps))
                                             for k, c in caches.items()})
            tok_s = {k: B / median(t) for k, t in times.items()}
            ratio = tok_s["pool"] / tok_s["contiguous"]
            ok, words = verdict(ratio, 0.9)
            results[f"{name} B={B} T={T}"] = {"tok_s": tok_s, "ratio": ratio, "target": 0.9, "pass": ok}
            print(f"[kivi] {name} B={B} {T:5} tokens: pool {tok_s['pool']:6.0f} tok/s, contiguous "
                  f"{tok_s['contiguous']:6.0f} = {ratio:.2f}x ({words})")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.paged", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["bits", "ragged", "eviction"],
                        choices=["bits", "ragged", "eviction", "kivi"])
    parser.add_argument("--steps", type=int, default=32, help="decode steps per timed burst (eviction)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds per comparison (median)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per prefill forward (bits)")
    parser.add_argument("--out", default="bench/results/paged.json")
    args = parser.parse_args()
    model = pack_for_decode(seeded_model(BENCH_MODEL).eval())
    report = {"machine": machine(), "model": model.config.to_dict(), "args": vars(args)}
    if "bits" in args.sections:
        report["bits"] = section_bits(model, args)
    if "ragged" in args.sections:
        report["ragged"] = section_ragged(model, args)
    if "eviction" in args.sections:
        report["eviction"] = section_eviction(model, args)
    if "kivi" in args.sections:
        report["kivi"] = section_kivi(model, args)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
