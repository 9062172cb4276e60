"""Rotary position embeddings (RoPE, Su et al. 2021): a position is encoded by rotating q and k, not added to x.

Each channel pair of a head is rotated by an angle proportional to the token's position, so the dot product q·k
depends only on how far apart the two tokens are. The cache needs these functions too: StreamingLLM re-rotates
kept keys to their slot in the cache (cache/policies.py).
"""

import torch


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding tables for the given positions (any shape, e.g. (T,) or (B, T) for a batch whose rows
    stand at different positions): cos, sin of that shape plus a last axis of head_dim.

    Channel pair (j, j + D/2) is rotated by the angle position * theta^(-2j/D): low channels spin fast, high ones
    slowly. (This "rotate half" pairing is the one HuggingFace's Llama uses, so exported weights need no shuffle.)
    """
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float().unsqueeze(-1) * inv_freq  # (..., T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., T, D): each angle serves both channels of its pair
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: (B, H, T, D) by the per-position angles cos, sin: (T, D), or (B, 1, T, D) with a row of positions
    per sequence. q·k then depends only on the distance of positions."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D/2) each: the two channels of every rotated pair
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, H, T, D)
    return (x.float() * cos + rotated.float() * sin).type_as(x)
