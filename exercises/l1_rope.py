"""Lesson 1, exercise: rotary position embeddings (about 20 minutes).

RoPE encodes a token's position by rotating its query and key, so that q.k depends only on how far apart the two
tokens are. toymodel/rope.py pairs channel j with channel j + D/2 ("rotate half", as HuggingFace's Llama does) and
turns pair j by the angle position * theta^(-2j/D). Read "Why RoPE makes caching easy" in docs/01_model.md, then
fill in `rope` and run `pytest exercises/test_l1_rope.py`.
"""

import torch


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate x (B, H, T, D), D even, token t by positions[t] (T,): channel pair (j, j + D/2) by the angle
    positions[t] * theta ** (-2j / D). Returns a tensor of x's shape and dtype."""
    raise NotImplementedError("write rope(): the angles per (position, pair), then rotate each pair by its angle")
