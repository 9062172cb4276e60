"""Group-wise asymmetric integer quantization of K/V tensors, as pure functions.

A group of numbers x_1..x_G is stored as small integer codes plus two float16 numbers, a `scale` and a `zero`
(the group minimum):

    code  = clamp(round((x - zero) / scale), 0, 2**bits - 1)
    x_hat = code * scale + zero                      (computed in float32)

Two ways to form the groups of a (B, H_kv, T, D) tensor (B batch, H_kv KV heads, T tokens, D head_dim):

    per token   (`quantize_per_token`):   G consecutive channels of one token     -> scale, zero (B, H_kv, T, D // G)
    per channel (`quantize_per_channel`): G consecutive tokens of one channel     -> scale, zero (B, H_kv, T // G, D)

Per-channel grouping is KIVI's choice for keys (a few channels carry outliers, so a group should not mix
channels); values are quantized per token. See docs/03_quantization.md.

Codes are packed along D into uint8 (`pack` / `unpack`); this byte layout is read directly by the Triton decode
kernels, so it is a contract:

    bits=8: (..., D)      one code per byte
    bits=4: (..., D // 2) element 2i in the low nibble, 2i+1 in the high nibble
    bits=2: (..., D // 4) element 4i+j in bits 2j..2j+1

Caution: scale and zero are float16, so inputs must lie within float16 range (|x| <= 65504); beyond it the
zero becomes -inf. We do not check this at runtime (it would cost a device sync per call).
"""

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

VALID_BITS = (2, 4, 8)
Axis = Literal["token", "channel"]


@dataclass(frozen=True)
class QuantTensor:
    """A quantized (B, H_kv, T, D) tensor.

    codes: (B, H_kv, T, D * bits // 8) uint8, packed along D (see `pack`)
    scale: float16, (B, H_kv, T, D // G) for axis="token", (B, H_kv, T // G, D) for axis="channel"
    zero:  float16, same shape as scale (the group minimum, rounded toward -inf)
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    axis: Axis

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The (B, H_kv, T, D) shape of the tensor this stands for."""
        B, H_kv, T, packed_D = self.codes.shape
        return B, H_kv, T, packed_D * 8 // self.bits


# ---------------------------------------------------------------------------------------------------- checks


def check_bits(bits: int) -> None:
    """Raise a ValueError unless bits is one of VALID_BITS."""
    if bits not in VALID_BITS:
        raise ValueError(f"bits={bits} is not supported; use one of {VALID_BITS}")


def check_packable(D: int, bits: int) -> None:
    """Raise a ValueError unless bits is valid and D codes fill whole bytes."""
    check_bits(bits)
    if D % (8 // bits) != 0:
        raise ValueError(f"cannot pack D={D} codes at bits={bits}: D must be a multiple of {8 // bits}")


def check_input(x: torch.Tensor, bits: int, group_size: int, axis: Axis) -> None:
    """Raise a ValueError naming the problem unless x is a floating (B, H_kv, T, D) tensor whose D (axis="token")
    or T (axis="channel") the group_size divides."""
    check_bits(bits)
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected a floating (B, H_kv, T, D) tensor, got {x.dtype} of shape {tuple(x.shape)}")
    name, n = ("D (head_dim)", x.shape[-1]) if axis == "token" else ("T (tokens)", x.shape[-2])
    if group_size <= 0 or n % group_size != 0:
        raise ValueError(
            f"group_size={group_size} must be a positive divisor of {name}={n}; pick a group_size that divides it"
        )


# ---------------------------------------------------------------------------------------------------- packing


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last axis into uint8.

    codes: (..., D) any integer dtype  ->  (..., D * bits // 8) uint8. D must be a multiple of 8 // bits.
    """
    check_packable(codes.shape[-1], bits)
    per_byte = 8 // bits
    D = codes.shape[-1]
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], D // per_byte, per_byte)  # (..., D // k, k)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # (k,) = 0, bits, 2*bits, ...
    # The bit fields do not overlap, so summing the shifted codes is the same as OR-ing them.
    return (c << shifts).sum(dim=-1, dtype=torch.int32).to(torch.uint8)  # (..., D // k)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: (..., D * bits // 8) uint8  ->  (..., D) uint8 codes in [0, 2**bits)."""
    check_bits(bits)
    mask = (1 << bits) - 1
    # One scalar shift per field: about 4x faster on CPU than shifting by a broadcast tensor of shifts.
    c = torch.stack([(packed >> shift) & mask for shift in range(0, 8, bits)], dim=-1)  # (..., D // k, k)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))  # (..., D)


# ---------------------------------------------------------------------------------------------------- the math


def fp16_scale_zero(mn: torch.Tensor, mx: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float16 (scale, zero) for groups with float32 minimum `mn` and maximum `mx` (any equal shapes).

    Rounding to float16 must not shrink the representable range [zero, zero + (2**bits - 1) * scale], or the
    group's extremes would be clipped by more than half a step. So zero is rounded toward -inf (zero <= mn) and
    the scale, computed from that rounded zero, is rounded up. A constant group whose zero is exact would get
    scale 0; it gets scale 1 instead (every code is then 0 and x_hat = zero = x).
    """
    levels = 2**bits - 1
    zero = mn.to(torch.float16)
    zero = torch.where(zero.float() > mn, torch.nextafter(zero, torch.full_like(zero, -torch.inf)), zero)
    scale32 = (mx - zero.float()) / levels
    scale = scale32.to(torch.float16)
    scale = torch.where(scale.float() < scale32, torch.nextafter(scale, torch.full_like(scale, torch.inf)), scale)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, zero


def _encode(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of x (float32) for broadcastable float16 scale/zero; the code formula of the module doc."""
    codes = torch.round((x - zero.float()) / scale.float())
    return codes.clamp_(0, 2**bits - 1).to(torch.uint8)


def quantize_per_token(x: torch.Tensor, bits: int, group_size: int) -> QuantTensor:
    """Quantize x: (B, H_kv, T, D) in groups of `group_size` consecutive channels of one token.

    Returns a QuantTensor with codes (B, H_kv, T, D * bits // 8) and scale/zero (B, H_kv, T, D // G).
    Raises ValueError if bits is not 2/4/8 or group_size does not divide D.
    """
    check_input(x, bits, group_size, "token")
    B, H_kv, T, D = x.shape
    G = group_size
    xg = x.float().reshape(B, H_kv, T, D // G, G)  # (B, H_kv, T, D // G, G)
    scale, zero = fp16_scale_zero(xg.amin(dim=-1), xg.amax(dim=-1), bits)  # each (B, H_kv, T, D // G)
    codes = _encode(xg, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)  # (B, H_kv, T, D // G, G)
    packed = pack(codes.reshape(B, H_kv, T, D), bits)  # (B, H_kv, T, D * bits // 8)
    return QuantTensor(packed, scale, zero, bits, G, "token")


def quantize_per_channel(x: torch.Tensor, bits: int, group_size: int) -> QuantTensor:
    """Quantize x: (B, H_kv, T, D) in groups of `group_size` consecutive tokens of one channel (KIVI keys).

    Returns a QuantTensor with codes (B, H_kv, T, D * bits // 8) and scale/zero (B, H_kv, T // G, D).
    Raises ValueError if bits is not 2/4/8 or group_size does not divide T.
    """
    check_input(x, bits, group_size, "channel")
    B, H_kv, T, D = x.shape
    G = group_size
    xg = x.float().reshape(B, H_kv, T // G, G, D)  # (B, H_kv, T // G, G, D)
    scale, zero = fp16_scale_zero(xg.amin(dim=-2), xg.amax(dim=-2), bits)  # each (B, H_kv, T // G, D)
    codes = _encode(xg, scale.unsqueeze(-2), zero.unsqueeze(-2), bits)  # (B, H_kv, T // G, G, D)
    packed = pack(codes.reshape(B, H_kv, T, D), bits)  # (B, H_kv, T, D * bits // 8)
    return QuantTensor(packed, scale, zero, bits, G, "channel")


def dequantize(qt: QuantTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_hat = code * scale + zero, computed in float32 and returned as (B, H_kv, T, D) in `dtype`."""
    out = qt.codes.new_empty(qt.shape, dtype=torch.float32)  # (B, H_kv, T, D)
    return dequantize_into(qt, out).to(dtype)


def dequantize_into(qt: QuantTensor, out: torch.Tensor) -> torch.Tensor:
    """Write x_hat = code * scale + zero into `out`, a float32 (B, H_kv, T, D) tensor or view, and return it.

    Three in-place passes over `out` (codes, times scale, plus zero) and no temporaries of its size: a decode step
    of a quantized cache spends most of its time here, so writing straight into the caller's buffer matters.
    """
    B, H_kv, T, D = qt.shape
    G = qt.group_size
    if out.shape != (B, H_kv, T, D) or out.dtype != torch.float32:
        raise ValueError(f"out must be float32 of shape {(B, H_kv, T, D)}, got {out.dtype} {tuple(out.shape)}")
    if qt.axis == "token":
        x = out.unflatten(-1, (D // G, G))  # (B, H_kv, T, D // G, G), a view of out
        scale, zero = qt.scale.unsqueeze(-1), qt.zero.unsqueeze(-1)  # (B, H_kv, T, D // G, 1)
    else:
        x = out.unflatten(2, (T // G, G))  # (B, H_kv, T // G, G, D), a view of out
        scale, zero = qt.scale.unsqueeze(-2), qt.zero.unsqueeze(-2)  # (B, H_kv, T // G, 1, D)
    x.copy_(unpack(qt.codes, qt.bits).view(x.shape))  # uint8 codes -> float32, exactly
    x.mul_(scale).add_(zero)  # float16 scale/zero are promoted to float32 (what the kernels repeat, bit for bit)
    return out


# ---------------------------------------------------------------------------------------------------- bytes


def storage_bytes(qt: QuantTensor) -> int:
    """Real bytes held: codes + scale + zero (numel * element_size of each)."""
    return sum(t.numel() * t.element_size() for t in (qt.codes, qt.scale, qt.zero))


def bits_per_element(bits: int, group_size: int) -> float:
    """Analytic storage cost per element: the code plus a float16 scale and zero shared by G elements."""
    check_bits(bits)
    return bits + 2 * 16 / group_size


def expected_bytes(shape: Sequence[int], bits: int, group_size: int) -> int:
    """Bytes a QuantTensor of logical `shape` (B, H_kv, T, D) must occupy, for either grouping axis.

    codes: numel * bits / 8; scale and zero: numel / G float16 numbers each (2 bytes).
    """
    numel = 1
    for n in shape:
        numel *= n
    return numel * bits // 8 + 2 * 2 * numel // group_size


# ---------------------------------------------------------------------------------------------------- along T


def cat(qts: Sequence[QuantTensor]) -> QuantTensor:
    """Concatenate QuantTensors along T (the cache appends tokens). All must share bits, group_size and axis.

    Works for both axes: a per-channel QuantTensor always holds whole groups of G tokens, so its scale/zero
    rows (one per group) concatenate just like its codes (one per token).
    """
    first = qts[0]
    for q in qts[1:]:
        if (q.bits, q.group_size, q.axis) != (first.bits, first.group_size, first.axis):
            raise ValueError(
                f"cannot cat QuantTensors with (bits, group_size, axis) = "
                f"{(first.bits, first.group_size, first.axis)} and {(q.bits, q.group_size, q.axis)}"
            )
    return QuantTensor(
        torch.cat([q.codes for q in qts], dim=2),  # (B, H_kv, sum T, D * bits // 8)
        torch.cat([q.scale for q in qts], dim=2),  # (B, H_kv, sum T or sum T // G, ...)
        torch.cat([q.zero for q in qts], dim=2),
        first.bits,
        first.group_size,
        first.axis,
    )


def select_tokens(qt: QuantTensor, idx: torch.Tensor) -> QuantTensor:
    """Keep the tokens `idx`: (B, H_kv, T_keep) int64 of a per-token QuantTensor, per KV head, without decoding.

    Equals quantizing the gathered tensor, because each token's groups are self-contained. Per-channel tensors
    share a scale across G tokens, so dropping single tokens from them is refused.
    """
    if qt.axis != "token":
        raise ValueError(
            f"select_tokens needs axis='token', got axis={qt.axis!r}: per-channel groups share scales across "
            f"{qt.group_size} tokens; keep evictable tokens in a per-token or full-precision store"
        )
    B, H_kv, T_keep = idx.shape
    i = idx.unsqueeze(-1)  # (B, H_kv, T_keep, 1)
    codes = qt.codes.gather(2, i.expand(B, H_kv, T_keep, qt.codes.shape[-1]))  # (B, H_kv, T_keep, D*bits//8)
    scale = qt.scale.gather(2, i.expand(B, H_kv, T_keep, qt.scale.shape[-1]))  # (B, H_kv, T_keep, D // G)
    zero = qt.zero.gather(2, i.expand(B, H_kv, T_keep, qt.zero.shape[-1]))  # (B, H_kv, T_keep, D // G)
    return QuantTensor(codes, scale, zero, qt.bits, qt.group_size, "token")
