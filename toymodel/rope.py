"""Rotary position embeddings (RoPE, Su et al. 2021): a position is encoded by rotating q and k, not added to x.

Each channel pair of a head is rotated by an angle proportional to the token's position, so the dot product q·k
depends only on how far apart the two tokens are. The cache needs these functions too: StreamingLLM re-rotates
kept keys to their slot in the cache (cache/policies.py).
"""

import torch


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding tables for the given positions (any shape, e.g. (T,) or (B, T) for a batch whose rows
    stand at different positions): cos, sin of that shape plus a last axis of head_dim / 2, one angle per pair.

    Channel pair (j, j + D/2) is rotated by the angle position * theta^(-2j/D): low channels spin fast, high ones
    slowly. (This "rotate half" pairing is the one HuggingFace's Llama uses, so exported weights need no shuffle.)
    """
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float().unsqueeze(-1) * inv_freq  # (..., T, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: (B, H, T, D) by the per-position angles cos, sin: (T, D/2), or (B, 1, T, D/2) with a row of
    positions per sequence. q·k then depends only on the distance of positions. Differentiable in x: the gradient
    of a rotation is the rotation back (by -angle). With no gradient to track (decoding), the rotation runs bare:
    an autograd function's bookkeeping costs more than rotating a decode step's q."""
    if x.requires_grad and torch.is_grad_enabled():
        return _Rotation.apply(x, cos, sin)
    return _rotate(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Each pair (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), in float32, back to x's dtype. Each half of the
    output is written once by a product and a fused multiply-add, with no temporaries: a prefill's q is megabytes,
    and every fresh tensor that size costs page faults (written the plain way, with a cat and four temporaries,
    this took 20x as long on a 512-token batch of 8 on the 2-core development machine)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D/2) each: the two channels of every rotated pair
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # (B, H, T, D)
    out1, out2 = out.chunk(2, dim=-1)  # views of its two halves
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin)
    return out.to(x.dtype)


class _Rotation(torch.autograd.Function):
    """_rotate as an autograd function (out= products have no derivative of their own); the angles are not
    learned, so only x gets a gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None
