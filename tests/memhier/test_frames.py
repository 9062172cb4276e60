"""The pool memhier keeps in tiers (memhier/frames.py): blocks allocated together move as one group, a group
leaves its tier only when its last block is released, and a spilled group is one disk file."""

import numpy as np
import pytest
import torch

from cache.codecs import full_precision
from cache.presets import PRESETS
from memhier.frames import TieredPool
from memhier.tiers import DiskTier, MemoryTier

CPU = torch.device("cpu")
BLOCK = 2 * 4 * 8 * 4  # bytes of a block: K and V, 4 tokens x 8 channels of float32


class NoBlocks:
    """A layer store holding no blocks: opening it ends the last step."""

    def block_ids(self) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)


def tiered_pool(tmp_path, device_blocks: int, group_blocks: int) -> TieredPool:
    lower = [MemoryTier("host", 0, CPU), DiskTier(10**6, tmp_path)]  # no host tier: below the device is the disk
    return TieredPool(full_precision(), 8, 4, CPU, torch.float32, device_blocks * BLOCK, group_blocks * BLOCK, lower,
                      "lru")


def test_blocks_allocated_together_move_as_groups(tmp_path):
    pool = tiered_pool(tmp_path, device_blocks=2, group_blocks=2)
    ids = pool.allocate(5)  # groups of 2, 2 and 1 blocks; the device tier holds one group of 2
    assert [pool.members[g].size for g in range(3)] == [2, 2, 1]
    assert pool.group[ids].tolist() == [0, 0, 1, 1, 2]
    pool.open(NoBlocks())  # a new step: the scratch groups go into the tiers, demoting the older ones by LRU
    disk = pool.store.tiers[-1]
    assert len(disk) == len(list(disk.directory.iterdir())) == 2 and disk.used == 4 * BLOCK  # a file per group
    assert list(pool.frames.blocks) == [(2,)] and pool.frames.used == BLOCK
    pool.close()


def test_a_group_leaves_its_tier_with_its_last_block(tmp_path):
    pool = tiered_pool(tmp_path, device_blocks=4, group_blocks=2)
    ids = pool.allocate(4)
    free = pool.n_free
    pool.release(ids[:1])  # group 0 keeps one live block: it stays, and so do both its ids
    assert (0,) in pool.frames and pool.n_free == free
    pool.release(ids[1:2])
    assert (0,) not in pool.frames and pool.n_free == free + 2 and pool.store.stats()["blocks_dropped"] == 1
    assert (pool.frame[ids[:2]] == -1).all() and np.isin(ids[2:], pool.members[1]).all()
    pool.close()


def test_every_tier_counts_a_group_by_its_blob_and_the_device_tier_keeps_its_budget(tmp_path):
    """int4 blocks of one token: a block's parts (16, 2 and 2 bytes per K or V) align once per group's blob, so a
    group of 4 takes fewer bytes than 4 lone blocks. The device tier counts the blob as the tiers below do, never
    exceeds its budget, and had frames to spare for every group it took."""
    codec = PRESETS["quant4"].build_codec(32)
    lower = [MemoryTier("host", 0, CPU), DiskTier(10**6, tmp_path)]
    pool = TieredPool(codec, 32, 1, CPU, torch.float32, 300, 10**6, lower, "lru")
    assert pool.blob_bytes(4) < 4 * pool.layout.nbytes
    for _ in range(6):
        pool.allocate(4)
        pool.open(NoBlocks())
        assert pool.frames.used == sum(pool.blob_bytes(len(f)) for f in pool.frames.blocks.values()) <= 300
    disk = pool.store.tiers[-1]
    assert disk.used == sum(pool.blob_bytes(pool.members[g].size) for (g,) in disk.blocks)
    pool.close()


def test_reading_a_block_that_is_not_in_frames_is_refused(tmp_path):
    """Blocks of the first 6 tokens of a head (2 blocks of 4) must be in frames; the entry past them is never read."""
    pool = tiered_pool(tmp_path, device_blocks=2, group_blocks=2)
    ids = pool.allocate(5)
    pool.open(NoBlocks())  # groups 0 and 1 go down to the disk; group 2 (block 4) stays in frames
    tables = torch.tensor([[[ids[4], ids[0]]]], dtype=torch.int32)  # (1, 1, 2): block 0 lies on the disk
    assert pool.frame_tables(tables, torch.tensor([[4]])).shape == (1, 1, 2)  # reads block 4 only: fine
    with pytest.raises(RuntimeError, match="not in frames"):
        pool.frame_tables(tables, torch.tensor([[6]]))
    pool.close()
