"""A decode step's matrix products on the CPU: the C kernel (toymodel/kernels/cpu_matmul.c) and oneDNN's product
against torch's BLAS.

    python -m bench.matmul                          # 1 to 64 rows, the machine's threads
    python -m bench.matmul --rows 16 64 768         # up to a prefill's rows: where oneDNN takes over

What is timed: the bench model's 25 products of one decode step (per layer q/k/v, output, gate/up and down; the
tied output head once), back to back, for M rows of x (one per sequence in the batch): milliseconds per step,
medians of rounds that alternate the two sides and flip their order every round (bench/common.py). The weights are
the seeded bench model's, packed as pack_for_decode packs them (toymodel/decode_layout.py): (d_in, d_out)
row-major, the same for both sides.

    torch   x @ w_t (the BLAS: MKL on x86)
    onednn  onednn_matmul(x, w_t): oneDNN's linear, what decode_matmul sends past MAX_ROWS rows
    c       cpu_matmul(x, w_t): threads split the columns, so its bytes do not depend on the thread count

Before timing, every product of every side is checked against float64. The ratios printed are each side's time
over torch's (below 1: faster). No target: the figures say where decode_matmul's MAX_ROWS belongs, and whether
oneDNN beats the BLAS on this machine (MKL takes its AVX2 code on AMD processors).
"""

import argparse
from statistics import median

import torch

from bench.common import alternate, machine, seeded_model, write_json
from bench.decode import BENCH_MODEL
from bench.decode_kernel import ms_per_call
from toymodel.decode_layout import pack_for_decode
from toymodel.kernels.cpu_matmul import cpu_matmul, cpu_matmul_available, onednn_matmul


def products() -> list[torch.Tensor]:
    """The bench model's transposed weights (K, N), packed for decoding, in the order a decode step multiplies by
    them."""
    model = pack_for_decode(seeded_model(BENCH_MODEL).eval())
    packed = [p for block in model.layers for p in (block.attn.project_qkv, block.attn.project_out,
                                                       block.mlp.project_gate_up, block.mlp.project_down)]
    return [p.w_t for p in packed + [model.project_logits]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=5, help="steps per round and side (their mean)")
    parser.add_argument("--out", default="bench/results/matmul.json")
    args = parser.parse_args()
    if (reason := cpu_matmul_available()) is not None:
        raise SystemExit(f"the C kernel cannot be built here: {reason}")
    weights = products()
    print(f"{len(weights)} products of the bench model, {torch.get_num_threads()} threads")
    rows = {}
    for M in args.rows:
        g = torch.Generator().manual_seed(M)
        xs = {K: torch.randn(M, K, generator=g) for K in {w.shape[0] for w in weights}}  # (M, K) per input width
        sides = {"torch": lambda x, w: x @ w, "onednn": onednn_matmul, "c": cpu_matmul}
        for name, fn in sides.items():
            for w in weights:
                x = xs[w.shape[0]]
                exact = (x.double() @ w.double()).float()
                err = ((fn(x, w) - exact).abs().max() / exact.abs().max()).item()
                if err > 1e-5:
                    raise SystemExit(f"{name} at M={M}, w {tuple(w.shape)}: relative error {err:.1e}")
        times = alternate(args.rounds, {name: ms_per_call(lambda fn=fn: [fn(xs[w.shape[0]], w) for w in weights],
                                                          args.calls) for name, fn in sides.items()})
        ms = {name: median(t) for name, t in times.items()}
        rows[M] = {"ms": ms, "ms_all": times, "c_over_torch": ms["c"] / ms["torch"],
                   "onednn_over_torch": ms["onednn"] / ms["torch"]}
        flops = 2 * M * sum(w.numel() for w in weights)
        print(f"M={M:3}: torch {ms['torch']:7.2f} ms ({flops / ms['torch'] / 1e6:5.1f} GFLOP/s), oneDNN "
              f"{ms['onednn']:7.2f} ms = {ms['onednn'] / ms['torch']:.2f}x torch's time, C kernel {ms['c']:7.2f} ms = "
              f"{ms['c'] / ms['torch']:.2f}x")
    write_json(args.out, {"machine": machine(), "args": vars(args), "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
