"""Lesson 3, exercise: pack 4-bit codes two per byte, and unpack them. The reference solution."""

import torch


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """See exercises/l3_pack_int4.py."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)  # (..., D // 2): even channels low, odd channels high


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """See exercises/l3_pack_int4.py."""
    low, high = packed & 0x0F, packed >> 4  # (..., D // 2) each
    return torch.stack([low, high], dim=-1).flatten(-2)  # (..., D // 2, 2) -> (..., D), interleaved back
