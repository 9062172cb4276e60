"""Checks exercises/l6_demotion.py against memhier's store itself: fill its device tier, use and rank the blocks in a
random order, put one more block, and see which block the store moved down to the host tier."""

import random

import pytest
import torch

from conftest import load
from memhier.store import TieredStore
from memhier.tiers import MemoryTier

victim = load("l6_demotion").victim
CPU = torch.device("cpu")


def demoted_by_the_store(demotion: str, seed: int) -> tuple[list, dict, object]:
    """A device tier of 5 blocks of 8 bytes, read and ranked at random, then a 6th block: (the device tier's blocks
    least recently used first and the ranks, both as they were before the 6th came, and the block that left)."""
    rng = random.Random(seed)
    store = TieredStore([MemoryTier("device", 40, CPU), MemoryTier("host", 10**6, CPU)], demotion)
    for key in range(5):
        store.put(key, torch.zeros(8, dtype=torch.uint8))
    for key in rng.sample(range(5), rng.randint(0, 5)):
        store.get(key)  # a use: the key becomes the most recently used
    ranks = {key: float(rng.randint(0, 2)) for key in rng.sample(range(5), rng.randint(0, 5))}  # ties on purpose
    store.rank(ranks)
    before = list(store.tiers[0].blocks)
    store.put(5, torch.zeros(8, dtype=torch.uint8))
    (left,) = set(before) - set(store.tiers[0].blocks)
    return before, ranks, left


@pytest.mark.parametrize("demotion", ["lru", "attention"])
def test_you_demote_the_block_the_store_demotes(demotion):
    for seed in range(30):
        lru_order, ranks, want = demoted_by_the_store(demotion, seed)
        got = victim(lru_order, dict(ranks), {5}, demotion)
        assert got == want, (f"demotion={demotion}, blocks least recently used first {lru_order}, ranks {ranks}: the "
                             f"store demoted block {want}, you chose {got}"
                             + ("; an unranked block counts as wanted most, ties go to the least recently used"
                                if demotion == "attention" else "; the least recently used block goes first"))


def test_excluded_blocks_stay():
    assert victim([1, 2, 3], {}, {1}, "lru") == 2, "block 1 is excluded (being read): demote the next one, 2"
    assert victim([1, 2], {1: 0.0, 2: 5.0}, {1}, "attention") == 2, "block 1 is excluded: only 2 can go"
    assert victim([1, 2], {}, {1, 2}, "lru") is None, "every block is excluded: return None"
