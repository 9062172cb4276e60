"""Our Triton attention kernels against PyTorch: prefill TFLOP/s (forward, backward) and decode latency.

    python -m bench.attention [--quick] [--out bench/results/attention.json]        # needs a CUDA GPU
    python -m bench.attention --interpret                                          # tiny CPU smoke run

Prefill: toymodel.kernels.triton_attn (FlashAttention-2) vs PyTorch SDPA restricted to its flash backend vs the reference
(`reference_attend`, only where its Tq x Tk matrix fits), fp16, T = 1k .. 16k, head_dim 64 and 128, causal and
not, with B * T = 16k tokens and H * D = 2048. FLOPs counted as 4 * B * H * T^2 * D for the forward (two matmuls),
halved when causal, and 2.5x that for the backward (five matmuls, one of them the recomputed Q K^T).
Target: forward >= 0.8x SDPA flash at T >= 4k.

Decode: one new token (B = 1, H = 32, H_kv = 8, D = 128) against Tk = 4k .. 128k cached tokens: flash-decoding
over an fp16 cache and over an int4 cache (per token, G = 32) dequantized in registers, vs SDPA over the fp16
cache and vs dequantize-then-SDPA over the int4 cache. Reported: latency and the cache bytes read per second.
Target: int4 decode faster than fp16 decode at long context.

Every kernel is checked against PyTorch on the same inputs before it is timed (the `err` columns).
--interpret runs a few tiny shapes under TRITON_INTERPRET=1 on the CPU: it proves the script works end to end;
its timings measure numpy, not a kernel.
"""

import argparse
import os
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from bench.common import machine, rel_err, write_json
from cache.quant import dequantize, quantize_per_token
from toymodel.attention import reference_attend, sdpa_attend


def bench_ms(fn: Callable[[], object], interpret: bool) -> float:
    """Median milliseconds per call: triton's do_bench on a GPU (warm-up, cache flush), a plain loop on the CPU."""
    if not interpret:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100)
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def sdpa_flash(interpret: bool) -> Callable:
    """SDPA restricted to the flash backend on a GPU (the CPU has no flash backend: plain SDPA there)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v, causal):
        if interpret:
            return sdpa_attend(q, k, v, causal=causal)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # Tq == Tk here, so is_causal is the right alignment
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    return run


def bench_prefill(Ts, Ds, interpret: bool, device: str, dtype: torch.dtype) -> list[dict]:
    from toymodel.kernels.triton_attn import triton_attend

    sdpa = sdpa_flash(interpret)
    rows = []
    for D in Ds:
        for causal in (True, False):
            for T in Ts:
                B, H = max(1, 16384 // T), 2048 // D
                if interpret:
                    B, H = 1, 2
                g = torch.Generator(device=device).manual_seed(0)
                q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g).requires_grad_()
                           for _ in range(3))
                do = torch.randn_like(q)
                flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
                providers = {"triton": lambda q, k, v, c: triton_attend(q, k, v, causal=c), "sdpa_flash": sdpa}
                if B * H * T * T * 6 <= 8 * 2**30:  # the reference's (B, H, T, T) fp16 scores + fp32 softmax
                    providers["reference"] = lambda q, k, v, c: reference_attend(q, k, v, causal=c)
                with torch.no_grad():
                    expected = sdpa(q, k, v, causal)
                for name, fn in providers.items():
                    out = fn(q, k, v, causal)
                    err = rel_err(out, expected)
                    fwd_ms = bench_ms(lambda: fn(q, k, v, causal), interpret)
                    bwd_ms = bench_ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True), interpret)
                    rows.append({"D": D, "causal": causal, "T": T, "B": B, "H": H, "provider": name,
                                 "err_vs_sdpa": err, "fwd_ms": fwd_ms, "bwd_ms": bwd_ms,
                                 "fwd_tflops": flops / fwd_ms / 1e9, "bwd_tflops": 2.5 * flops / bwd_ms / 1e9})
                    del out
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def bench_decode(Tks, interpret: bool, device: str, dtype: torch.dtype) -> list[dict]:
    from cache.kernels.triton_decode import triton_decode, triton_decode_int

    B, H, H_kv, D, G = (1, 4, 2, 32, 16) if interpret else (1, 32, 8, 128, 32)
    rows = []
    for Tk in Tks:
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(B, H, 1, D, device=device, dtype=dtype, generator=gen)
        k, v = (torch.randn(B, H_kv, Tk, D, device=device, dtype=dtype, generator=gen) for _ in range(2))
        k_q, v_q = quantize_per_token(k, 4, G), quantize_per_token(v, 4, G)
        fp_bytes = 2 * k.numel() * k.element_size()
        int4_bytes = sum(t.numel() * t.element_size() for qt in (k_q, v_q) for t in (qt.codes, qt.scale, qt.zero))
        expected = reference_attend(q.float(), dequantize(k_q), dequantize(v_q)).to(dtype)  # int4 truth
        fp = str(dtype).removeprefix("torch.float").join(("fp", ""))  # "fp16" on a GPU, "fp32" interpreted
        providers = {
            f"triton_{fp}": (lambda: triton_decode(q, k, v), fp_bytes, sdpa_attend(q, k, v)),
            f"sdpa_{fp}": (lambda: sdpa_attend(q, k, v), fp_bytes, sdpa_attend(q, k, v)),
            "triton_int4": (lambda: triton_decode_int(q, k_q, v_q), int4_bytes, expected),
            "dequant_sdpa_int4": (lambda: sdpa_attend(q, dequantize(k_q, dtype), dequantize(v_q, dtype)),
                                  int4_bytes, expected),
        }
        for name, (fn, nbytes, ref) in providers.items():
            err = rel_err(fn(), ref)
            ms = bench_ms(fn, interpret)
            rows.append({"Tk": Tk, "provider": name, "err": err, "us": ms * 1e3, "cache_bytes": nbytes,
                         "GB_per_s": nbytes / ms / 1e6})
    return rows


def print_tables(prefill: list[dict], decode: list[dict]) -> None:
    sdpa = {(r["D"], r["causal"], r["T"]): r for r in prefill if r["provider"] == "sdpa_flash"}
    print(f"{'D':>4} {'causal':>6} {'T':>6} {'provider':>10} {'err':>8} {'fwd TFLOP/s':>11} {'bwd TFLOP/s':>11} "
          f"{'fwd vs sdpa':>11}")
    for r in prefill:
        ratio = r["fwd_tflops"] / sdpa[(r["D"], r["causal"], r["T"])]["fwd_tflops"]
        print(f"{r['D']:>4} {str(r['causal']):>6} {r['T']:>6} {r['provider']:>10} {r['err_vs_sdpa']:>8.1e} "
              f"{r['fwd_tflops']:>11.3f} {r['bwd_tflops']:>11.3f} {ratio:>10.2f}x")
    print()
    print(f"{'Tk':>7} {'provider':>18} {'err':>8} {'latency us':>11} {'cache MB':>9} {'GB/s':>8}")
    for r in decode:
        print(f"{r['Tk']:>7} {r['provider']:>18} {r['err']:>8.1e} {r['us']:>11.1f} {r['cache_bytes'] / 1e6:>9.2f} "
              f"{r['GB_per_s']:>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interpret", action="store_true", help="tiny shapes under TRITON_INTERPRET=1 on the CPU")
    parser.add_argument("--quick", action="store_true", help="GPU: fewer shapes (T 1k and 4k, Tk 4k and 64k)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/attention[_interpret].json)")
    args = parser.parse_args()

    if args.interpret:
        # Must be set before triton (and our kernels) are imported: @triton.jit reads it at decoration time.
        os.environ["TRITON_INTERPRET"] = "1"
        device, dtype = "cpu", torch.float32  # the interpreter's bf16 dot is broken (triton#11584); fp32 is exact
        Ts, Ds, Tks = [64], [32], [256]
    elif not torch.cuda.is_available():
        sys.exit("bench.attention measures GPU kernels and found no CUDA device. Run it on a GPU machine, or "
                 "use --interpret for a tiny end-to-end smoke run on the CPU (its timings measure numpy).")
    else:
        device, dtype = "cuda", torch.float16
        Ts = [1024, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
        Ds = [64, 128]
        Tks = [4096, 65536] if args.quick else [4096, 16384, 65536, 131072]

    prefill = bench_prefill(Ts, Ds, args.interpret, device, dtype)
    decode = bench_decode(Tks, args.interpret, device, dtype)
    print_tables(prefill, decode)

    out = args.out or f"bench/results/attention{'_interpret' if args.interpret else ''}.json"
    where = machine() | {"device": device, "interpret": args.interpret, "dtype": str(dtype)}
    write_json(out, {"machine": where, "prefill": prefill, "decode": decode})


if __name__ == "__main__":
    main()
