"""TieredStore placement: blocks round-trip bit for bit through every tier, no budget is ever exceeded, LRU
demotes the least recently used block, an access promotes, and the stats count what moved."""

import random
import time

import pytest
import torch

from memhier.store import TierFullError, TieredStore
from memhier.tiers import DiskTier, MemoryTier


def make_store(tmp_path, device: int, host: int, disk: int, demotion: str = "lru") -> TieredStore:
    cpu = torch.device("cpu")
    tiers = [MemoryTier("device", device, cpu), MemoryTier("host", host, cpu), DiskTier(disk, tmp_path)]
    return TieredStore(tiers, demotion)


def blob(seed: int, n: int = 100) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)  # (n,) random bytes


def where(store: TieredStore, key) -> str:
    return next(t.name for t in store.tiers if key in t)


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_round_trip_is_bit_exact_in_every_tier(tmp_path, tier):
    budgets = {"device": (1000, 0, 0), "host": (0, 1000, 0), "disk": (0, 0, 1000)}[tier]
    store = make_store(tmp_path, *budgets)
    blocks = {(0, i): blob(i) for i in range(5)}
    for key, b in blocks.items():
        store.put(key, b)
    assert store.stats()["blocks"][tier] == 5  # budgets of 0 keep the other tiers empty
    for key, b in blocks.items():
        assert torch.equal(store.get(key), b)
    store.close()


def test_budgets_are_never_exceeded(tmp_path):
    store = make_store(tmp_path, 250, 450, 10_000)
    rng = random.Random(0)
    blocks = {}
    for i in range(40):
        key = (i % 3, i)
        blocks[key] = blob(i, rng.choice([50, 100, 120]))
        store.put(key, blocks[key])
        for _ in range(3):
            k = rng.choice(list(blocks))
            assert torch.equal(store.get(k), blocks[k])
            for t in store.tiers:
                assert t.used <= t.budget, (t.name, t.used, t.budget)
                assert t.used == sum(blocks[k].numel() for k in blocks if k in t)
    assert sum(len(t) for t in store.tiers) == len(blocks)  # exclusive: each block in exactly one tier
    store.close()


def test_lru_demotes_the_least_recently_used_and_access_promotes(tmp_path):
    store = make_store(tmp_path, 200, 200, 10_000)
    for i in range(2):
        store.put((0, i), blob(i))
    store.get((0, 0))  # (0, 1) is now the least recently used
    store.put((0, 2), blob(2))
    assert [where(store, (0, i)) for i in range(3)] == ["device", "host", "device"]
    store.put((0, 3), blob(3))  # device holds (0, 2), (0, 3); host fills up with (0, 1), (0, 0)
    store.put((0, 4), blob(4))  # host's LRU (0, 1) goes to disk
    assert where(store, (0, 1)) == "disk"
    assert torch.equal(store.get((0, 1)), blob(1))  # a disk hit comes back to the device tier
    assert where(store, (0, 1)) == "device"
    stats = store.stats()
    assert stats["per_tier"]["disk"]["hits"] == 1 and stats["per_tier"]["device"]["misses"] == 1
    assert stats["blocks_promoted"] == 1 and stats["blocks_demoted"] >= 4
    assert stats["disk_bytes_read"] > 100 and stats["disk_bytes_written"] > 100
    assert stats["bytes"] == {t.name: t.used for t in store.tiers}
    store.close()


def test_block_larger_than_the_device_tier_is_served_from_below(tmp_path):
    store = make_store(tmp_path, 50, 0, 10_000)
    store.put((0, 0), blob(0))
    assert where(store, (0, 0)) == "disk"
    assert torch.equal(store.get((0, 0)), blob(0))
    assert where(store, (0, 0)) == "disk"  # not promoted: it can never fit the device tier
    store.close()


def test_full_last_tier_refuses_and_keeps_every_block(tmp_path):
    store = make_store(tmp_path, 100, 0, 200)
    for i in range(3):
        store.put((0, i), blob(i))
    with pytest.raises(TierFullError, match="disk tier is full"):
        store.put((0, 3), blob(3))
    for i in range(3):  # nothing was evicted to make room
        assert torch.equal(store.get((0, i)), blob(i))
    store.close()


def test_putting_a_key_twice_is_refused(tmp_path):
    store = make_store(tmp_path, 1000, 0, 0)
    store.put((0, 0), blob(0))
    with pytest.raises(ValueError, match="already stored"):
        store.put((0, 0), blob(1))
    store.close()


@pytest.mark.parametrize("demotion, demoted", [("lru", (0, 1)), ("attention", (0, 0))])
def test_attention_demotion_demotes_the_least_wanted_block_not_the_oldest(tmp_path, demotion, demoted):
    store = make_store(tmp_path, 200, 1000, 0, demotion)  # the device tier holds two 100-byte blocks
    store.put((0, 0), blob(0))
    store.put((0, 1), blob(1))
    store.get((0, 0))  # block 0 is now the most recently used: LRU would demote block 1
    store.rank({(0, 0): -3.0, (0, 1): 5.0})  # but this step's queries want block 1 far more
    store.put((0, 2), blob(2))  # a full device tier must demote one of them
    assert where(store, demoted) == "host" and where(store, (0, 2)) == "device"
    store.close()



class SlowDevice(MemoryTier):
    """A device tier whose copies take a while: a block moving up is held here before it leaves the tier below."""

    def insert(self, key, blob):
        super().insert(key, blob)
        time.sleep(0.2)


def test_figures_wait_for_the_prefetch_so_a_moving_block_counts_once(tmp_path):
    cpu = torch.device("cpu")
    store = TieredStore([SlowDevice("device", 100, cpu), MemoryTier("host", 1000, cpu), DiskTier(0, tmp_path)])
    for i in range(2):
        store.put((0, i), blob(i))  # (0, 0) goes down to the host
    store.prefetch(((0, 0),))  # promotes it on the background thread, slowly
    assert sum(store.tier_bytes().values()) == 200
    assert store.stats()["bytes"] == {"device": 100, "host": 100, "disk": 0}
    assert where(store, (0, 0)) == "device"
    store.close()
