"""Lesson 2, exercise: choose which tokens an eviction policy keeps. The reference solution."""

import torch


def select(scores: torch.Tensor, budget: int, sink: int, window: int) -> torch.Tensor | None:
    """See exercises/l2_select.py."""
    n = scores.shape[-1]
    if n <= budget:
        return None
    slot = torch.arange(n, device=scores.device)  # (n,)
    protected = (slot < sink) | (slot >= n - window)  # (n,): never evicted
    scores = scores.float().masked_fill(protected, torch.inf)
    return scores.topk(budget, dim=-1).indices.sort(dim=-1).values  # (B, H_kv, budget), in token order
