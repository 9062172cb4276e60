"""Lesson 1, exercise: rotary position embeddings. The reference solution."""

import torch


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """See exercises/l1_rope.py."""
    D = x.shape[-1]
    inv_freq = theta ** -(torch.arange(0, D, 2, dtype=torch.float32) / D)  # (D/2,)
    angle = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2): one angle per (position, pair)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, H, T, D/2) each: the two channels of every pair
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)  # a 2-D rotation per pair
