"""GEAR (Kang et al. 2024): a quantized K/V tensor made nearly exact by two small corrections, X ~ D + L + S.

    S  sparse outliers  the k largest and k smallest entries of each chunk matrix (n_b tokens x D channels, per
                        sequence and KV head), k = floor(s/2 * n_b * D), kept as float16 values with their positions
    D  dense quantized  the rest, group-wise asymmetric integers as in KIVI: keys per channel (groups of G tokens),
                        values per token (groups of G channels). An outlier's slot is first filled with the mean of
                        its group's other entries, so it does not stretch the group's range
    L  low rank         the error left, X - D - S, per chunk and head as a rank-r product A B (A: n_b x r with
                        orthonormal columns, B: r x D), by power iteration from a fixed start (3 steps, QR in the last)

Streaming: a GEAR codec has a residual of n_b tokens (cache/codecs.py, `tokens_to_flush`): new tokens wait in full
precision until n_b have gathered, then that chunk is compressed. Every chunk has its own outliers and factors, so a
payload grows by appending chunks, like a KIVI payload grows by appending groups.

    GearTensor of a (B, H_kv, T, D) tensor, T = n * n_b (n chunks):
        quant   QuantTensor (B, H_kv, T, D)        D, the dense part (cache/quant.py)
        a       (B, H_kv, T, r) float16            each token's row of A
        b       (B, H_kv, n, r, D) float16         each chunk's B
        values  (B, H_kv, n, 2k) float16           S's entries
        index   (B, H_kv, n, 2k) int16             their slots in the chunk, t * D + d (int32 when n_b * D > 32767)

    bits per element = bits + 32 / G  +  16 r (n_b + D) / (n_b D)  +  2k (16 + index bits) / (n_b D)

Decoding writes D, adds A B chunk by chunk (one batched matmul) and writes S back over its slots. With r = 0 and
s = 0 the payload is D alone and decodes to plain group quantization, bit for bit.
"""

import math
from dataclasses import dataclass

import torch

from cache import quant
from cache.kernels import quant_cpu
from cache.quant import QuantTensor

POWER_ITERATIONS = 3  # GEAR's choice: enough for the few leading directions of a small error matrix


@dataclass(frozen=True)
class GearTensor:
    """A GEAR-compressed (B, H_kv, T, D) tensor (see the module docstring for the fields' shapes)."""

    quant: QuantTensor
    a: torch.Tensor
    b: torch.Tensor
    values: torch.Tensor
    index: torch.Tensor
    chunk: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.quant.shape

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held: the dense part's codes, scale and zero, the factors, the outliers and their slots."""
        return [self.quant.codes, self.quant.scale, self.quant.zero, self.a, self.b, self.values, self.index]


# ---------------------------------------------------------------------------------------------------- the parts


def resolve_rank(rank: float, head_dim: int) -> int:
    """The knob `rank` as a number of factors: 0 none, in (0, 1) a fraction of head_dim (rounded up), else whole."""
    return math.ceil(rank * head_dim) if 0 < rank < 1 else int(rank)


def outliers_per_side(outliers: float, chunk: int, head_dim: int) -> int:
    """k: the largest (and, as many, smallest) entries kept exactly per chunk matrix of chunk x head_dim entries."""
    return int(outliers / 2 * chunk * head_dim)


def index_dtype(chunk: int, head_dim: int) -> torch.dtype:
    """The smallest integer type that holds a slot t * D + d of a chunk."""
    return torch.int16 if chunk * head_dim <= torch.iinfo(torch.int16).max else torch.int32


def extreme_slots(rows: torch.Tensor, k: int) -> torch.Tensor:
    """rows (..., m) -> (..., 2k) int64: the slots of each row's k largest entries, then of its k smallest."""
    return torch.cat([rows.topk(k, dim=-1).indices, rows.topk(k, dim=-1, largest=False).indices], dim=-1)


def fill_from_group(x: torch.Tensor, mask: torch.Tensor, group_size: int, axis: quant.Axis) -> torch.Tensor:
    """x (B, H_kv, T, D) float32 with each masked entry replaced by the mean of the unmasked entries of its
    quantization group, so that the group's min and max are those of its ordinary entries."""
    B, H_kv, T, D = x.shape
    G = group_size
    shape, dim = ((B, H_kv, T, D // G, G), -1) if axis == "token" else ((B, H_kv, T // G, G, D), -2)
    xg, masked = x.reshape(shape), mask.reshape(shape)  # groups along the last axis (token) or the one before
    ordinary = (~masked).float()
    mean = (xg * ordinary).sum(dim, keepdim=True) / ordinary.sum(dim, keepdim=True).clamp_min(1)
    return torch.where(masked, mean, xg).reshape(B, H_kv, T, D)


def low_rank(err: torch.Tensor, rank: int, iterations: int = POWER_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """err (..., n, D) float32 -> A (..., n, rank), B (..., rank, D) with A B ~ err, by power iteration (GEAR's form).

    The start is a fixed random (D, rank) matrix (seed 0), so encoding is deterministic. Only the last step
    orthonormalizes (QR of P, then of A); then B = Aᵀ err and A B = A Aᵀ err, err projected on A's columns.
    """
    D = err.shape[-1]
    start = torch.randn(D, rank, generator=torch.Generator().manual_seed(0)).to(err.device)  # (D, rank)
    p = start.expand(*err.shape[:-2], D, rank)  # (..., D, rank)
    for i in range(iterations):
        last = i == iterations - 1
        if last:
            p = torch.linalg.qr(p).Q
        a = err @ p  # (..., n, rank)
        if last:
            a = torch.linalg.qr(a).Q
        p = err.transpose(-1, -2) @ a  # (..., D, rank)
    return a, p.transpose(-1, -2)


# ---------------------------------------------------------------------------------------------------- encode, decode


def gear_encode(x: torch.Tensor, bits: int, group_size: int, axis: quant.Axis, chunk: int, rank: int,
                k: int) -> GearTensor:
    """Compress x (B, H_kv, T, D), T a multiple of `chunk`: k outliers per side, D by `bits` along `axis`, rank-r L.

    Raises ValueError when T is not a whole number of chunks (and as cache/quant.py does for bits and group_size).
    """
    B, H_kv, T, D = x.shape
    if T % chunk:
        raise ValueError(f"GEAR compresses whole chunks of {chunk} tokens, got {T} tokens")
    n = T // chunk
    xf = x.float()
    rows = xf.reshape(B, H_kv, n, chunk * D)  # (B, H_kv, n, n_b * D): one row per chunk matrix
    slots = extreme_slots(rows, k) if k else rows.new_zeros((B, H_kv, n, 0), dtype=torch.long)  # (B, H_kv, n, 2k)
    values = rows.gather(-1, slots).half()  # (B, H_kv, n, 2k)
    mask = None
    dense = xf
    if k:
        mask = torch.zeros_like(rows, dtype=torch.bool).scatter_(-1, slots, True).view(B, H_kv, T, D)
        dense = fill_from_group(xf, mask, group_size, axis)
    if axis == "token":
        q = quant_cpu.quantize_per_token(dense, bits, group_size)  # the C loop on a CPU, same bytes as the reference
    else:
        q = quant.quantize_per_channel(dense, bits, group_size)
    a = xf.new_zeros((B, H_kv, T, rank), dtype=torch.float16)
    b = xf.new_zeros((B, H_kv, n, rank, D), dtype=torch.float16)
    if rank:
        err = xf - quant.dequantize(q)  # (B, H_kv, T, D): what D missed
        if mask is not None:
            err = err.masked_fill(mask, 0.0)  # S restores those slots exactly: L need not spend rank on them
        a_c, b_c = low_rank(err.view(B, H_kv, n, chunk, D), rank)  # (B, H_kv, n, n_b, r), (B, H_kv, n, r, D)
        a, b = a_c.reshape(B, H_kv, T, rank).half(), b_c.half()
    return GearTensor(q, a, b, values, slots.to(index_dtype(chunk, D)), chunk)


def gear_decode_into(p: GearTensor, out: torch.Tensor) -> torch.Tensor:
    """Write D + L, then S over its slots, into `out`, a float32 (B, H_kv, T, D) tensor or view; return it."""
    quant.dequantize_into(p.quant, out)  # D, in place
    B, H_kv, T, D = p.shape
    n = T // p.chunk
    chunks = out.unflatten(2, (n, p.chunk))  # (B, H_kv, n, n_b, D), a view of out
    if p.a.shape[-1]:
        chunks.add_(p.a.float().unflatten(2, (n, p.chunk)) @ p.b.float())  # (B, H_kv, n, n_b, r) @ (.., r, D)
    if p.index.shape[-1]:
        chunks.flatten(-2).scatter_(-1, p.index.long(), p.values.float())  # the outliers, as stored
    return out


def gear_cat(ps: list[GearTensor]) -> GearTensor:
    """Concatenate GearTensors along T (whole chunks each, so every part concatenates on its axis 2)."""
    return GearTensor(quant.cat([p.quant for p in ps]), *(torch.cat([getattr(p, f) for p in ps], dim=2)
                                                          for f in ("a", "b", "values", "index")), ps[0].chunk)


@dataclass(frozen=True)
class GearQuant:
    """A TensorCodec (cache/codecs.py) for K or V: GEAR over chunks of `chunk` tokens of `head_dim` channels."""

    bits: int
    group_size: int
    axis: quant.Axis
    chunk: int
    rank: int  # factors per chunk and head
    k: int  # outliers per side per chunk matrix
    head_dim: int

    def encode(self, x: torch.Tensor) -> GearTensor:
        return gear_encode(x, self.bits, self.group_size, self.axis, self.chunk, self.rank, self.k)

    def decode(self, p: GearTensor, dtype: torch.dtype) -> torch.Tensor:
        out = p.quant.codes.new_empty(p.shape, dtype=torch.float32)  # (B, H_kv, T, D)
        return gear_decode_into(p, out).to(dtype)

    def decode_into(self, p: GearTensor, out: torch.Tensor) -> torch.Tensor:
        return gear_decode_into(p, out)

    def cat(self, ps: list[GearTensor]) -> GearTensor:
        return gear_cat(list(ps))

    def select(self, p: GearTensor, idx: torch.Tensor) -> GearTensor:
        raise ValueError("a GEAR payload cannot drop single tokens: its chunks share factors and outliers; "
                         "use GEAR with policy=full")

    def nbytes(self, p: GearTensor) -> int:
        return sum(t.numel() * t.element_size() for t in p.tensors())

    per_token = False  # chunks share factors and outliers: not for a block pool of single tokens
    exact = False

    def stored_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return torch.uint8

    def take_rows(self, p: GearTensor, rows: torch.Tensor) -> GearTensor:
        raise ValueError("a GEAR payload is stored in chunks, not token rows; it stays in its contiguous store")

    def bits_per_element(self, model_dtype: torch.dtype) -> float:
        """The formula of the module docstring: dense codes, scales and zeros, factors, outliers and their slots."""
        per_chunk = self.chunk * self.head_dim  # elements of one chunk matrix
        index_bits = 8 * index_dtype(self.chunk, self.head_dim).itemsize
        return (quant.bits_per_element(self.bits, self.group_size)
                + 16 * self.rank * (self.chunk + self.head_dim) / per_chunk
                + 2 * self.k * (16 + index_bits) / per_chunk)
