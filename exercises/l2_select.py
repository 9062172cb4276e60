"""Lesson 2, exercise: choose which tokens an eviction policy keeps (about 20 minutes).

Every eviction policy of cache/policies.py only scores tokens; the base class picks the survivors. Write that pick.
Read docs/02_kv_cache.md first, then fill in `select` and run `pytest exercises/test_l2_select.py`.
"""

import torch


def select(scores: torch.Tensor, budget: int, sink: int, window: int) -> torch.Tensor | None:
    """The tokens to keep, per (sequence, KV head).

    Args:
        scores: (B, H_kv, n) how much each stored token is worth; higher is kept first.
        budget: tokens to keep per KV head; sink + window <= budget.
        sink: the first `sink` tokens are always kept (attention sinks).
        window: the last `window` tokens are always kept (the recent context).

    Returns:
        (B, H_kv, budget) int64 indices of the kept tokens in increasing token order, or None when n <= budget
        (nothing needs evicting).
    """
    raise NotImplementedError("write select(): protect the sink and the window, keep the top scores, sort")
