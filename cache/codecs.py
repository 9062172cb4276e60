"""Codecs: how a kept K/V token is stored. A codec is a pair of pure encode/decode functions plus a byte formula.

A layer cache composes a policy (which tokens to keep) with a codec (how to store them); the codec never decides
what to keep. One `Codec` holds a `TensorCodec` for keys and one for values, and a residual length:

    preset   keys                     values                   residual (full-precision recent tokens)
    fp       as-is (model dtype)      as-is (model dtype)      0
    fp16     float16                  float16                  0
    int8/4   per token, G channels    per token, G channels    0
    kivi4/2  per channel, G tokens    per token, G channels    R, a multiple of G  (KIVI, Liu et al. 2024)
    gear4/2  KIVI's keys + outliers   KIVI's values + outliers n_b, a multiple of G (GEAR, Kang et al. 2024:
             + a low-rank error term  + a low-rank error term  cache/gear.py)

Every TensorCodec offers the same few operations on its payload (a tensor, a `QuantTensor` or a `GearTensor`), so the
cache
appends, evicts and counts bytes without ever asking which codec it holds:

    encode(x) -> payload      decode(payload, dtype) -> x_hat      decode_into(payload, out) -> out (float32)
    cat(payloads) -> payload  select(payload, idx)                  nbytes(payload) -> int
    bits_per_element(model_dtype) -> float                          stored_dtype(model_dtype) -> dtype
    per_token: each token encoded alone, so a block pool (cache/blocks.py) writes, moves and drops tokens one by one
    take_rows(payload, rows) -> payload: tokens gathered by index from a pool's (n_blocks * block_tokens) rows

Residual rule (KIVI): new tokens wait in full precision; whenever R of them have gathered, all R are encoded at
once (`tokens_to_flush`). Per-channel key groups then always hold whole groups of G tokens; GEAR's residual is its
streaming buffer of n_b tokens, compressed one chunk at a time.
"""

from dataclasses import dataclass, fields, replace
from typing import Callable, Protocol, Sequence

import torch

from cache import quant
from cache.gear import GearQuant, GearTensor, outliers_per_side, resolve_rank
from cache.kernels import quant_cpu
from cache.quant import QuantTensor

Payload = torch.Tensor | QuantTensor | GearTensor


class TensorCodec(Protocol):
    """How one tensor (K or V) is stored. Payloads are (B, H_kv, T, D) tensors or QuantTensors of that shape;
    `idx` is (B, H_kv, T_keep), the tokens to keep per KV head; `model_dtype` is the dtype K/V arrive in."""

    def encode(self, x: torch.Tensor) -> Payload: ...
    def decode(self, p: Payload, dtype: torch.dtype) -> torch.Tensor: ...
    def decode_into(self, p: Payload, out: torch.Tensor) -> torch.Tensor: ...
    def cat(self, ps: Sequence[Payload]) -> Payload: ...
    def select(self, p: Payload, idx: torch.Tensor) -> Payload: ...
    def nbytes(self, p: Payload) -> int: ...
    def bits_per_element(self, model_dtype: torch.dtype) -> float: ...
    def stored_dtype(self, model_dtype: torch.dtype) -> torch.dtype: ...
    def take_rows(self, p: Payload, rows: torch.Tensor) -> Payload: ...
    per_token: bool
    exact: bool  # decode(encode(x)) == x, bit for bit


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Keep tokens idx: (B, H_kv, T_keep) of x: (B, H_kv, T, D), per KV head -> (B, H_kv, T_keep, D)."""
    i = idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1])  # (B, H_kv, T_keep, D)
    return x.gather(2, i)


def take(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """rows (any shape) of t (..., width) seen as rows of `width` -> rows.shape + (width,). index_select on the flat
    rows: the same copy as t.view(-1, width)[rows], which torch's advanced indexing made 2.5-5x slower on the CPU
    (a (1, 2, 144) and an (8, 2, 1024) gather of 64 floats, 2-core Xeon)."""
    width = t.shape[-1]
    return t.view(-1, width).index_select(0, rows.reshape(-1)).view(*rows.shape, width)


def payload_tensors(p: Payload | None) -> list[torch.Tensor]:
    """The tensors a payload really holds: itself, a QuantTensor's codes, scale and zero, or every part of a
    GearTensor, its dense codes first (None: none)."""
    if p is None:
        return []
    if isinstance(p, GearTensor):
        return p.tensors()
    return [p] if isinstance(p, torch.Tensor) else [p.codes, p.scale, p.zero]


def payload_tokens(p: Payload | None) -> int:
    """Tokens T of a (B, H_kv, T, D) payload (None: 0)."""
    return 0 if p is None else payload_tensors(p)[0].shape[2]


def take_blocks(p: Payload, ids: torch.Tensor) -> Payload:
    """Blocks `ids` (n,) of a block pool's payload (N, 1, bt, D) -> a payload of (n, 1, bt, D): every tensor it holds
    indexed on its first axis, the block axis (codes, scales, zeros, GEAR's factors and outliers alike)."""
    if isinstance(p, torch.Tensor):
        return p[ids]
    parts = {f.name: getattr(p, f.name) for f in fields(p)}
    return replace(p, **{name: take_blocks(x, ids) for name, x in parts.items()
                         if isinstance(x, (torch.Tensor, QuantTensor))})


@dataclass(frozen=True)
class FullPrecision:
    """Store the tensor unquantized: in `dtype`, or as it comes (the model's dtype) when dtype is None."""

    dtype: torch.dtype | None = None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.dtype is None else x.to(self.dtype)

    def decode(self, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return p.to(dtype)

    def decode_into(self, p: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(p)

    def cat(self, ps: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(ps), dim=2)  # (B, H_kv, sum T, D)

    def select(self, p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return gather_tokens(p, idx)

    def nbytes(self, p: torch.Tensor) -> int:
        return p.numel() * p.element_size()

    def bits_per_element(self, model_dtype: torch.dtype) -> float:
        return 8.0 * self.stored_dtype(model_dtype).itemsize

    per_token = True

    @property
    def exact(self) -> bool:
        return self.dtype is None

    def stored_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.dtype is None else self.dtype

    def take_rows(self, p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """rows (B, H_kv, L) of p (N, 1, bt, D) seen as (N * bt) rows -> (B, H_kv, L, D)."""
        return take(p, rows)


@dataclass(frozen=True)
class GroupQuant:
    """Group-wise asymmetric integer quantization (cache/quant.py) along `axis`: "token" or "channel"."""

    bits: int
    group_size: int
    axis: quant.Axis = "token"

    def __post_init__(self) -> None:
        quant.check_bits(self.bits)
        if self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size} must be positive (e.g. 32, a divisor of head_dim)")
        if self.axis not in ("token", "channel"):
            raise ValueError(f"axis={self.axis!r} must be 'token' or 'channel'")

    def encode(self, x: torch.Tensor) -> QuantTensor:
        if self.axis == "token":
            return quant_cpu.quantize_per_token(x, self.bits, self.group_size)  # the C loop on a CPU, same bytes
        return quant.quantize_per_channel(x, self.bits, self.group_size)

    def decode(self, p: QuantTensor, dtype: torch.dtype) -> torch.Tensor:
        return quant.dequantize(p, dtype)

    def decode_into(self, p: QuantTensor, out: torch.Tensor) -> torch.Tensor:
        return quant.dequantize_into(p, out)

    def cat(self, ps: Sequence[QuantTensor]) -> QuantTensor:
        return quant.cat(ps)

    def select(self, p: QuantTensor, idx: torch.Tensor) -> QuantTensor:
        return quant.select_tokens(p, idx)

    def nbytes(self, p: QuantTensor) -> int:
        return quant.storage_bytes(p)

    def bits_per_element(self, model_dtype: torch.dtype) -> float:
        return quant.bits_per_element(self.bits, self.group_size)

    @property
    def per_token(self) -> bool:
        return self.axis == "token"

    exact = False

    def stored_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return torch.uint8  # packed codes (scales and zeros in float16 beside them)

    def take_rows(self, p: QuantTensor, rows: torch.Tensor) -> QuantTensor:
        """rows (B, H_kv, L) of a per-token p (N, 1, bt, D) seen as (N * bt) rows -> (B, H_kv, L, D)."""
        codes, scale, zero = (take(t, rows) for t in (p.codes, p.scale, p.zero))
        return QuantTensor(codes, scale, zero, p.bits, p.group_size, p.axis)


@dataclass(frozen=True)
class Codec:
    """How a layer cache stores K and V: one TensorCodec each, plus `residual` recent tokens kept unencoded."""

    key: TensorCodec
    value: TensorCodec
    residual: int = 0

    @property
    def full_precision(self) -> bool:
        """True when neither keys nor values are quantized (a cast at most)."""
        return isinstance(self.key, FullPrecision) and isinstance(self.value, FullPrecision)

    @property
    def kernel_readable(self) -> bool:
        """True when the decode kernels over stored codes (cache/kernels/) read both payloads as stored: plain
        tensors and QuantTensors. A GEAR payload is decoded, then attended."""
        return all(isinstance(tc, (FullPrecision, GroupQuant)) for tc in (self.key, self.value))

    @property
    def per_token(self) -> bool:
        """True when every token is encoded alone (no scale shared across tokens, no residual): what a block pool
        stores, writing, moving and dropping tokens one by one."""
        return self.residual == 0 and all(tc.per_token for tc in (self.key, self.value))

    def block_problem(self, block_tokens: int) -> str | None:
        """Why blocks of `block_tokens` tokens of one KV head cannot hold this codec's payload, or None when they
        can: a per-token codec fits any block; a codec with a residual flushes R tokens at a time into whole blocks
        (cache/residual.py keeps the residual beside them), so a block must divide R and hold whole encoding units:
        KIVI's key groups of G tokens, GEAR's chunks of n_b = R tokens (their factors and outliers span the chunk)."""
        if self.per_token:
            return None
        unit, what = ((self.key.group_size, "KIVI's key groups of group_size") if self.kernel_readable else
                      (self.residual, "GEAR's chunks of n_b = residual"))
        if block_tokens % unit or self.residual % block_tokens:
            return (f"a block holds whole encoding units ({what}={unit} tokens) and divides the "
                    f"residual={self.residual} tokens flushed at once: set cache.block_tokens={unit}")
        return None

    @property
    def exact(self) -> bool:
        """True when both payloads give back what was stored, bit for bit (the model's own dtype)."""
        return self.key.exact and self.value.exact

    def float32_or_codes(self, model_dtype: torch.dtype) -> bool:
        """True when both payloads are stored as float32 rows or packed codes: what the CPU kernel reads in place
        (a float16 cast is not)."""
        return all(tc.stored_dtype(model_dtype) in (torch.float32, torch.uint8) for tc in (self.key, self.value))

    def bits_per_element(self, model_dtype: torch.dtype) -> float:
        """Average stored bits per K/V element, excluding the residual (which costs the model dtype)."""
        return (self.key.bits_per_element(model_dtype) + self.value.bits_per_element(model_dtype)) / 2


def tokens_to_flush(n_residual: int, residual: int) -> int:
    """The residual rule: with R = residual > 0, encode whole multiples of R tokens, oldest first, keeping the
    remaining n_residual % R (< R) in full precision. Decoding one token at a time, this flushes all R tokens each
    time the residual reaches R; a long prefill flushes as many whole R-blocks as it holds. R = 0: encode at once.
    """
    if residual == 0:
        return n_residual
    return n_residual // residual * residual


def full_precision(dtype: torch.dtype | None = None) -> Codec:
    """No quantization: keys and values stored in `dtype` (None: the model's own dtype, bit-exact)."""
    return Codec(FullPrecision(dtype), FullPrecision(dtype))


def int_quant(bits: int, group_size: int) -> Codec:
    """Keys and values both quantized per token, in groups of `group_size` channels."""
    return Codec(GroupQuant(bits, group_size, "token"), GroupQuant(bits, group_size, "token"))


def kivi(bits: int, group_size: int, residual: int) -> Codec:
    """KIVI: keys per channel (groups of `group_size` tokens), values per token, `residual` recent tokens in fp.

    Raises ValueError unless residual is a positive multiple of group_size (flushed key blocks must hold whole
    per-channel groups).
    """
    key, value = GroupQuant(bits, group_size, "channel"), GroupQuant(bits, group_size, "token")  # checks bits, G
    if residual <= 0 or residual % group_size != 0:
        raise ValueError(
            f"kivi residual={residual} must be a positive multiple of group_size={group_size} "
            f"(e.g. residual={4 * group_size})"
        )
    return Codec(key, value, residual)


def gear(bits: int, group_size: int, buffer: int, rank: float, outliers: float, head_dim: int | None) -> Codec:
    """GEAR (cache/gear.py): KIVI's axes (keys per channel, values per token), plus per chunk of `buffer` tokens a
    low-rank error term of `rank` factors (a fraction of head_dim when below 1) and the `outliers` fraction of
    entries kept exactly; `buffer` recent tokens wait in full precision until a chunk is full.

    Raises ValueError unless head_dim is given, buffer is a positive multiple of group_size and the rank fits in a
    chunk (at most min(buffer, head_dim)); cache.presets.check_spec names the knobs' ranges first.
    """
    if head_dim is None:
        raise ValueError("a GEAR codec needs head_dim: its factors and outliers are counted per chunk of n_b tokens "
                         "x head_dim channels")
    GroupQuant(bits, group_size)  # checks bits and G
    if buffer <= 0 or buffer % group_size != 0:
        raise ValueError(f"GEAR buffer n_b={buffer} (cache.residual) must be a positive multiple of group_size="
                         f"{group_size}: a chunk must hold whole per-channel key groups (e.g. {2 * group_size})")
    r = resolve_rank(rank, head_dim)
    if not 0 <= r <= min(buffer, head_dim):
        raise ValueError(f"GEAR rank={rank} gives {r} factors; a chunk of {buffer} x {head_dim} holds at most "
                         f"{min(buffer, head_dim)}")
    k = outliers_per_side(outliers, buffer, head_dim)
    key, value = (GearQuant(bits, group_size, axis, buffer, r, k, head_dim) for axis in ("channel", "token"))
    return Codec(key, value, buffer)


@dataclass(frozen=True)
class Knobs:
    """What a codec is built from (cache.presets.CacheSpec holds them); each codec reads the ones it uses:
    group_size (int, KIVI, GEAR), residual (KIVI's recent tokens, GEAR's buffer n_b), rank and outliers (GEAR),
    head_dim (GEAR's per-chunk counts)."""

    group_size: int = 32
    residual: int = 128
    rank: float = 2
    outliers: float = 0.02
    head_dim: int | None = None


# Codecs by name: fp, fp16, int<bits>, kivi<bits> and gear<bits> for every supported bit width.
CODECS: dict[str, Callable[[Knobs], Codec]] = {
    "fp": lambda kn: full_precision(None),
    "fp16": lambda kn: full_precision(torch.float16),
    **{f"int{bits}": lambda kn, bits=bits: int_quant(bits, kn.group_size) for bits in quant.VALID_BITS},
    **{f"kivi{bits}": lambda kn, bits=bits: kivi(bits, kn.group_size, kn.residual) for bits in quant.VALID_BITS},
    **{f"gear{bits}": lambda kn, bits=bits: gear(bits, kn.group_size, kn.residual, kn.rank, kn.outliers, kn.head_dim)
       for bits in quant.VALID_BITS},
}


def make_codec(name: str, group_size: int = 32, residual: int = 128, rank: float = 2, outliers: float = 0.02,
               head_dim: int | None = None) -> Codec:
    """Build the codec `name` (defaults G=32, R=128 are KIVI's; rank 2 and 2% outliers GEAR's; GEAR also needs
    head_dim). Raises ValueError for an unknown name."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; valid codecs: {', '.join(CODECS)}")
    return CODECS[name](Knobs(group_size, residual, rank, outliers, head_dim))
