"""Lesson 6, exercise: choose the block a full tier demotes (about 15 minutes).

When a tier of memhier's store is full and a block must come in, one of its blocks moves one tier down. Which one
is the demotion rule: the least recently used block (demotion="lru"), or the block the current queries care least
about (demotion="attention": the lowest rank; a block never ranked counts as wanted; ties go to the least recently
used). Write that choice. Read docs/06_memhier.md first, then fill in `victim` and run
`pytest exercises/test_l6_demotion.py`.
"""

from typing import Hashable


def victim(lru_order: list[Hashable], ranks: dict[Hashable, float], exclude: set[Hashable],
           demotion: str) -> Hashable | None:
    """The block a full tier demotes next.

    Args:
        lru_order: the tier's blocks, least recently used first.
        ranks: demotion="attention": how much the latest queries want each block (higher: kept longer); blocks
            without a rank are wanted most.
        exclude: blocks that must stay (the one being read right now).
        demotion: "lru" or "attention".

    Returns:
        The block to demote, or None when every block is excluded.
    """
    raise NotImplementedError("write victim(): skip the excluded blocks, then pick by recency or by rank")
