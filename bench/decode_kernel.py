"""One decode step's attention on the CPU: the C kernel over a quantized cache's bytes against SDPA over float32.

    python -m bench.decode_kernel                                   # contexts 512 2048 8192, 2 threads
    python -m bench.decode_kernel --contexts 2048 --rounds 9

Claim: cache/kernels/cpu_decode.py, attending straight over the stored codes (never decoding them into memory), makes a
decode step over a 4-bit cache as fast as -- in fact faster than -- PyTorch SDPA over a float32 cache, where the
decode-then-SDPA path of a quantized cache is the slowest of all. Target at 2048 tokens of context, int4 G=32:
the kernel faster than SDPA over float32 (what lets `quant4` decode keep up with `full`, python -m bench.decode).

Shapes: the bench model's attention (B=8, H=6, H_kv=2, D=64), one new token (Tq=1), random K/V. Sides, timed in
milliseconds per call (mean of --calls calls per round; median of --rounds rounds that alternate the sides and
flip their order every round, bench/common.py):

    sdpa_fp32      F.scaled_dot_product_attention(q, K, V, enable_gqa=True) over float32 K/V
    deq_sdpa_int4  cache.quant.dequantize of an int4 (per token, G=32) cache, then the same SDPA
    c_int8 / c_int4 / c_int2   the C kernel over per-token int8 / int4 / int2 codes, G=32
    c_kivi4        the C kernel over KIVI: 4-bit keys per channel and values per token (G=32), plus a float32
                   residual of the last --residual tokens as a second segment

Every kernel is checked against dequantize-then-reference_attend on the same inputs before it is timed (err).
"""

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from bench.common import alternate, machine, rel_err, verdict, write_json
from cache.quant import dequantize, quantize_per_channel, quantize_per_token
from toymodel.attention import reference_attend
from cache.kernels.cpu_decode import cpu_decode_available, cpu_decode_segments

SIDES = ("sdpa_fp32", "deq_sdpa_int4", "c_int8", "c_int4", "c_int2", "c_kivi4")


def ms_per_call(fn: Callable[[], object], calls: int) -> Callable[[], float]:
    """A side for `alternate`: run fn `calls` times, return the mean milliseconds per call."""
    def run() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) * 1e3 / calls
    return run


def sides_at(T: int, args) -> tuple[dict, dict]:
    """The timed functions at T tokens of context, and each C kernel's error against the reference."""
    B, H, H_kv, D, G = args.batch, args.n_head, args.n_kv_head, args.head_dim, args.group_size
    g = torch.Generator().manual_seed(T)
    q = torch.randn(B, H, 1, D, generator=g)  # (B, H, 1, D): one new token
    k, v = torch.randn(B, H_kv, T, D, generator=g), torch.randn(B, H_kv, T, D, generator=g)  # (B, H_kv, T, D)
    n_quant = T - args.residual  # KIVI: the last `residual` tokens stay float32
    segments = {
        "c_int8": [(quantize_per_token(k, 8, G), quantize_per_token(v, 8, G))],
        "c_int4": [(quantize_per_token(k, 4, G), quantize_per_token(v, 4, G))],
        "c_int2": [(quantize_per_token(k, 2, G), quantize_per_token(v, 2, G))],
        "c_kivi4": [(quantize_per_channel(k[:, :, :n_quant], 4, G), quantize_per_token(v[:, :, :n_quant], 4, G)),
                    (k[:, :, n_quant:].clone(), v[:, :, n_quant:].clone())],
    }
    err = {}
    for name, segs in segments.items():
        k_ref = torch.cat([s if isinstance(s, torch.Tensor) else dequantize(s) for s, _ in segs], dim=2)
        v_ref = torch.cat([s if isinstance(s, torch.Tensor) else dequantize(s) for _, s in segs], dim=2)
        err[name] = rel_err(cpu_decode_segments(q, segs), reference_attend(q, k_ref, v_ref))
    k4, v4 = segments["c_int4"][0]
    fns = {
        "sdpa_fp32": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "deq_sdpa_int4": lambda: F.scaled_dot_product_attention(q, dequantize(k4), dequantize(v4), enable_gqa=True),
    } | {name: (lambda s=segs: cpu_decode_segments(q, s)) for name, segs in segments.items()}
    return {name: ms_per_call(fns[name], args.calls) for name in SIDES}, err


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_kernel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per context (median)")
    parser.add_argument("--calls", type=int, default=20, help="calls per side per round (mean)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-head", type=int, default=6)
    parser.add_argument("--n-kv-head", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--residual", type=int, default=128, help="KIVI's float32 recent tokens")
    parser.add_argument("--out", default="bench/results/decode_kernel.json")
    args = parser.parse_args()
    why_not = cpu_decode_available()
    if why_not is not None:
        raise SystemExit(f"the C kernel cannot run here: {why_not}")
    torch.set_num_threads(args.threads)

    rows = []
    print(f"B={args.batch} H={args.n_head} H_kv={args.n_kv_head} D={args.head_dim} Tq=1, {args.threads} threads; "
          f"ms per call, median of {args.rounds} rounds x {args.calls} calls")
    print(f"{'context':>8} " + " ".join(f"{s:>13}" for s in SIDES) + f" {'sdpa/c_int4':>12} {'deq/c_int4':>11}")
    with torch.inference_mode():
        for T in args.contexts:
            sides, err = sides_at(T, args)
            for fn in sides.values():  # warm-up: allocator, first-call setup
                fn()
            times = alternate(args.rounds, sides)
            ms = {name: statistics.median(t) for name, t in times.items()}
            row = {"context": T, "ms": ms, "ms_all": times, "err": err,
                   "sdpa_over_c_int4": ms["sdpa_fp32"] / ms["c_int4"],
                   "deq_sdpa_over_c_int4": ms["deq_sdpa_int4"] / ms["c_int4"]}
            rows.append(row)
            print(f"{T:>8} " + " ".join(f"{ms[s]:>13.3f}" for s in SIDES)
                  + f" {row['sdpa_over_c_int4']:>11.2f}x {row['deq_sdpa_over_c_int4']:>10.2f}x")
    worst = max(e for r in rows for e in r["err"].values())
    print(f"max relative error of the C kernel against dequantize + reference_attend: {worst:.1e}")
    at = next((r for r in rows if r["context"] == 2048), None)
    if at is not None:  # the claim: the int4 kernel at least as fast as SDPA over float32
        _, words = verdict(at["sdpa_over_c_int4"], 1.0)
        print(f"at 2048 tokens, int4: {at['ms']['c_int4']:.3f} ms vs SDPA fp32 {at['ms']['sdpa_fp32']:.3f} ms = "
              f"{at['sdpa_over_c_int4']:.2f}x as fast ({words})")

    write_json(args.out, {"machine": machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
