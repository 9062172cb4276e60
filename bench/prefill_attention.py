"""Causal prefill attention on the CPU: PyTorch's SDPA over the whole prompt against toymodel.attention's chunks of
64 queries, over prompt lengths, at batch 1 and 8 (the bench model's 6 query heads sharing 2 KV heads, D = 64, fp32).

    python -m bench.prefill_attention [--lengths 100 200 320 512 768 1024 2048] [--out ...]

It is the sweep behind `CPU_CHUNKED_PREFILL` in toymodel/attention.py: `sdpa_attend` chunks a causal prompt only
where the chunks were faster here. Both sides are checked against each other before they are timed; timings are
medians of --repeats calls, the two sides alternating.
"""

import argparse
from statistics import median

import torch
import torch.nn.functional as F

from bench.common import alternate, machine, rel_err, write_json
from bench.decode import prefill_seconds
from toymodel.attention import CPU_CHUNKED_PREFILL, chunked_causal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 200, 320, 512, 768, 1024, 2048])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="bench/results/prefill_attention.json")
    args = parser.parse_args()
    print(f"chunked where {CPU_CHUNKED_PREFILL[0]} < T <= {CPU_CHUNKED_PREFILL[1]}; time of the chunks / whole:")
    rows = []
    for B in args.batches:
        for T in args.lengths:
            g = torch.Generator().manual_seed(T)
            q = torch.randn(B, 6, T, 64, generator=g)
            k, v = (torch.randn(B, 2, T, 64, generator=g) for _ in range(2))
            whole = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
            chunks = lambda: chunked_causal(q, k, v, gqa=True)  # noqa: E731
            err = rel_err(chunks(), whole())
            times = alternate(args.repeats, {"whole": lambda: prefill_seconds(whole),
                                             "chunks": lambda: prefill_seconds(chunks)})
            ms = {side: 1e3 * median(t) for side, t in times.items()}
            rows.append({"B": B, "T": T, "whole_ms": ms["whole"], "chunks_ms": ms["chunks"],
                         "ratio": ms["chunks"] / ms["whole"], "rel_err": err})
            print(f"B={B} T={T:>5}: whole {ms['whole']:7.2f} ms, chunks {ms['chunks']:7.2f} ms = "
                  f"{ms['chunks'] / ms['whole']:.2f}x (rel. err {err:.1e})", flush=True)
    write_json(args.out, {"machine": machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
