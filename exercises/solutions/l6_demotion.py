"""Lesson 6, exercise: choose the block a full tier demotes. The reference solution."""

import math
from typing import Hashable


def victim(lru_order: list[Hashable], ranks: dict[Hashable, float], exclude: set[Hashable],
           demotion: str) -> Hashable | None:
    """The block a full tier demotes next (see exercises/l6_demotion.py)."""
    candidates = [key for key in lru_order if key not in exclude]  # least recently used first
    if demotion == "lru":
        return candidates[0] if candidates else None
    return min(candidates, key=lambda key: ranks.get(key, math.inf), default=None)  # min keeps the first of ties
