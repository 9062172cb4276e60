"""Draw docs/figures/flash_tiling.png for docs/04_flash_attention.md, from the I/O formulas of the lesson (no GPU).

    python docs/figures/make_flash_figures.py

Left: HBM bytes moved by one head's attention forward, standard (S and P written to and read back from HBM)
vs tiled (FlashAttention: Q, K, V read, O written; K and V once per block of BLOCK_M queries).
Right: bytes a decode step reads from the KV cache (one layer, H_kv = 8, D = 128) for fp16 and quantized caches.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BYTES = 2  # fp16
D, BLOCK_M = 128, 128  # the decode panel's head_dim; the query block of our forward kernel


def standard_bytes(T: int, D: int) -> int:
    """S = QK^T written; softmax reads S, writes P; O = PV reads P: 4 T D + 4 T^2 elements."""
    return BYTES * (4 * T * D + 4 * T * T)


def tiled_bytes(T: int, D: int) -> int:
    """Q read once, O written once, K and V read once per query block: T D (2 + 2 T / BLOCK_M) elements."""
    return BYTES * (2 * T * D + 2 * T * D * T // BLOCK_M)


def cache_bytes(T: int, bits: int, group: int = 32, H_kv: int = 8) -> float:
    """K and V of T tokens: codes at `bits` per element plus a float16 scale and zero per group (none for fp16)."""
    per_element = 16 if bits == 16 else bits + 32 / group
    return 2 * H_kv * T * D * per_element / 8


def main() -> None:
    Ts = [2**i for i in range(9, 18)]  # 512 .. 128k
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))

    ax1.loglog(Ts, [standard_bytes(T, 64) for T in Ts], "o-", label="standard: S, P round-trip HBM  (4TD + 4T²)")
    for d, style in [(64, "s-"), (128, "^-")]:
        ax1.loglog(Ts, [tiled_bytes(T, d) for T in Ts], style, label=f"tiled, D = {d}:  TD (2 + 2T / BLOCK_M)")
    ax1.set_xlabel("sequence length T")
    ax1.set_ylabel("HBM bytes, one head, forward (fp16)")
    ax1.set_title(f"Prefill: standard / tiled -> 2 BLOCK_M / D  (BLOCK_M = {BLOCK_M})")
    ax1.legend(fontsize=8)
    ax1.grid(True, which="both", alpha=0.3)

    for bits, style in [(16, "o-"), (8, "s-"), (4, "^-"), (2, "v-")]:
        label = "fp16" if bits == 16 else f"int{bits} (G = 32)"
        ax2.loglog(Ts, [cache_bytes(T, bits) for T in Ts], style, label=label)
    ax2.set_xlabel("tokens in the cache T")
    ax2.set_ylabel("bytes read per decode step, one layer")
    ax2.set_title("Decode reads the whole cache: fewer bits, less time")
    ax2.legend(fontsize=8)
    ax2.grid(True, which="both", alpha=0.3)

    fig.tight_layout()
    out = Path(__file__).with_name("flash_tiling.png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
