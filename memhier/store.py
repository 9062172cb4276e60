"""TieredStore: where blobs of cache blocks live, device -> host -> disk, each tier within a byte budget.

    store.put(key, blob)        a new blob goes to the fastest tier it fits in
    store.get(key) -> blob      a hit in a lower tier promotes the block to the device tier (on access), when
                                room can be made there; otherwise the block is served from where it is
    store.drop(key)             forget a block nobody holds any more (the pool's group whose last block was released)
    store.prefetch(keys)        get() those keys on a background thread; wait(keys) joins it later
    store.stats()               bytes per tier, hits/misses per tier, blocks moved each way, bytes read/written,
                                seconds spent moving data, seconds the prefetch thread worked and seconds the
                                caller waited for it: overlap = 1 - wait / prefetch (the hidden fraction)

Placement is exclusive: a block lives in exactly one tier. To make room for n bytes in a tier, its least
recently used blocks (demotion="lru"), or its blocks the current queries care least about (demotion="attention":
the lowest `rank`, set each decode step from the blocks' representative keys; unranked blocks are kept, and ties
go by recency) are demoted one tier down (recursively making room there) *before* the new block arrives,
so no tier ever holds more than its budget. A demotion writes the lower copy first and drops the upper one only
after that succeeded, so an error midway (a full disk) leaves every block readable in exactly one tier.

The disk is the last tier, and nothing below it: when it is full the store raises TierFullError. In exact mode
the cache needs every block at every step, so evicting one would be silent data loss; refusing is the only
honest choice. (The persistent prefix store, memhier/persist.py, does evict: its entries can be recomputed.)

One lock guards the tiers: the prefetch thread and the model's thread never move blocks at the same time; the
overlap comes from the model computing (torch releases the GIL) while the thread reads, checks and copies.
"""

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from threading import RLock
from typing import Collection

import torch

from memhier.tiers import DiskTier, Key, Tier


class TierFullError(RuntimeError):
    """A block fits in no tier: every budget is spent on blocks the cache still needs."""


class TieredStore:
    """Sealed blocks (opaque uint8 blobs) in tiers ordered fastest first, e.g. [device, host, disk]."""

    def __init__(self, tiers: list[Tier], demotion: str = "lru"):
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier (e.g. device, host, disk)")
        self.tiers, self.demotion = tiers, demotion
        self.ranks: dict[Key, float] = {}  # demotion="attention": how much the latest queries want each block
        self.lock = RLock()
        self.pinned: set[Key] = set()  # blocks the current step reads where they lie: never demoted (memhier/frames.py)
        self.counts = {t.name: {"hits": 0, "misses": 0, "blocks_in": 0, "blocks_out": 0} for t in tiers}
        self.promoted = self.demoted = 0  # blocks moved up / down one or more tiers
        self.dropped = 0  # blocks forgotten (drop): nobody held them any more
        self.move_seconds = 0.0  # inside put/get: copies, disk reads and writes, checksums
        self.wait_seconds = 0.0  # the caller blocked in wait() on an unfinished prefetch
        self.prefetched = 0  # blocks fetched by the background thread
        self.prefetch_seconds = 0.0  # wall time the background thread spent fetching
        self._executor: ThreadPoolExecutor | None = None
        self._pending: dict[tuple[Key, ...], Future] = {}

    # ------------------------------------------------------------------------------------------------ placement

    def put(self, key: Key, blob: torch.Tensor) -> None:
        """Place a new block (nbytes,) uint8 in the fastest tier whose budget can hold it."""
        with self.lock:
            start = time.perf_counter()
            if any(key in t for t in self.tiers):
                raise ValueError(f"block {key} is already stored; each blob is put once")
            try:
                self._place(key, blob, 0, exclude=())
            finally:
                self.move_seconds += time.perf_counter() - start

    def rank(self, ranks: dict[Key, float]) -> None:
        """Record how much the current queries want these blocks (higher: demoted later; demotion="attention")."""
        with self.lock:
            self.ranks.update(ranks)

    def get(self, key: Key) -> torch.Tensor:
        """The blob of `key`, promoted to the device tier when it fits there (its budget allowing)."""
        with self.lock:
            blob = self.locate(key)
            return self.tiers[0].read(key) if blob is None else blob

    def locate(self, key: Key) -> torch.Tensor | None:
        """Bring `key` to the device tier when room can be made there (None: it is there now), else its blob served
        from below (a transient copy on the device)."""
        with self.lock:
            start = time.perf_counter()
            try:
                return self._locate(key)
            finally:
                self.move_seconds += time.perf_counter() - start

    def room_on_top(self, n: int, key: Key) -> bool:
        """Make room for n bytes of `key` in the device tier (demoting others); False when none can be made."""
        with self.lock:
            return self._room_on_top(n, key)

    def replace(self, key: Key, blob: torch.Tensor) -> None:
        """Put a new version of the block `key` (written since it was stored) in place of the old one."""
        with self.lock:
            for tier in self.tiers:
                if key in tier:
                    tier.remove(key)
            self._place(key, blob, 0, exclude=(key,))

    def drop(self, key: Key) -> None:
        """Free the block `key` from whichever tier holds it (an evicting cache kept none of its tokens)."""
        with self.lock:
            tier = next((t for t in self.tiers if key in t), None)
            if tier is None:
                raise KeyError(f"block {key} is in no tier, so it cannot be dropped")
            tier.remove(key)
            self.ranks.pop(key, None)
            self.dropped += 1

    def _locate(self, key: Key) -> torch.Tensor | None:
        for level, tier in enumerate(self.tiers):
            if key not in tier:
                self.counts[tier.name]["misses"] += 1
                continue
            self.counts[tier.name]["hits"] += 1
            tier.touch(key)
            if level == 0:
                return None
            blob = tier.read(key)  # disk: length and checksum verified, or an error
            top = self.tiers[0]
            if self._room_on_top(blob.numel(), key):
                top.insert(key, blob)
                tier.remove(key)  # the upper copy exists: only now drop the lower one
                self._moved(tier, top, up=True)
                return None
            return blob.to(top.device)  # served from below: a transient copy
        raise KeyError(f"block {key} is in no tier; blobs are put() once and read until dropped")

    def _room_on_top(self, n: int, key: Key) -> bool:
        """Make room for n bytes in the device tier by LRU, never demoting `key`; False when none can be made."""
        if n > self.tiers[0].budget:
            return False
        try:
            self._make_room(0, n, exclude=(key,))  # may demote others into the tier holding `key`
        except TierFullError:  # the tiers below are full of blocks still needed: leave `key` where it is
            return False
        return True

    def _place(self, key: Key, blob: torch.Tensor, level: int, exclude: Collection[Key]) -> Tier:
        """Insert into the first tier from `level` down whose budget can hold blob, making room by LRU."""
        n = blob.numel()
        for tier_level in range(level, len(self.tiers)):
            if n <= self.tiers[tier_level].budget:
                self._make_room(tier_level, n, exclude)
                self.tiers[tier_level].insert(key, blob)
                return self.tiers[tier_level]
        raise TierFullError(f"memhier: a block of {n} bytes fits in no tier at or below {self.tiers[level].name} "
                            f"(budgets: {self.budgets()}); raise memhier.disk_bytes (or another budget)")

    def _make_room(self, level: int, n: int, exclude: Collection[Key]) -> None:
        """Demote LRU blocks of tier `level` until n more bytes fit in its budget (never a pinned one)."""
        tier = self.tiers[level]
        exclude = set(exclude) | self.pinned
        while tier.used + n > tier.budget:
            victim = self._victim(tier, exclude)
            if victim is None or level == len(self.tiers) - 1:
                raise TierFullError(
                    f"memhier: the {tier.name} tier is full ({tier.used} of {tier.budget} bytes in {len(tier)} "
                    f"blocks) and a block of {n} bytes must go there; every block is still needed (exact mode "
                    f"evicts nothing), so raise memhier.{tier.name}_bytes or the budgets above it")
            lower = self._place(victim, tier.read(victim), level + 1, exclude)  # write below first...
            tier.remove(victim)  # ...then drop the upper copy: an error above leaves the victim where it was
            self._moved(tier, lower, up=False)

    def _victim(self, tier: Tier, exclude: Collection[Key]) -> Key | None:
        """The block of `tier` to demote next: the LRU one, or the lowest-ranked one (the first, i.e. least recently
        used, among equals; a block never ranked counts as wanted)."""
        if self.demotion == "lru":
            return tier.lru(exclude)
        candidates = (key for key in tier.blocks if key not in exclude)  # least recently used first
        return min(candidates, key=lambda key: self.ranks.get(key, math.inf), default=None)

    def _moved(self, src: Tier, dst: Tier, up: bool) -> None:
        self.counts[src.name]["blocks_out"] += 1
        self.counts[dst.name]["blocks_in"] += 1
        if up:
            self.promoted += 1
        else:
            self.demoted += 1

    # ------------------------------------------------------------------------------------------------ prefetch

    def prefetch(self, keys: tuple[Key, ...]) -> None:
        """Start get() of `keys` on the background thread (promoting them while the caller computes)."""
        if not keys or keys in self._pending:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memhier-prefetch")
        self._pending[keys] = self._executor.submit(self._fetch_all, keys)

    def _fetch_all(self, keys: tuple[Key, ...]) -> None:
        start = time.perf_counter()
        for key in keys:
            self.locate(key)
        with self.lock:
            self.prefetched += len(keys)
            self.prefetch_seconds += time.perf_counter() - start

    def settle(self) -> None:
        """Join every prefetch still running, so that the figures below describe blocks at rest."""
        for keys in list(self._pending):
            self.wait(keys)

    def wait(self, keys: tuple[Key, ...]) -> None:
        """Join the prefetch of exactly `keys`, if one was started; re-raises its error (e.g. a corrupt block)."""
        future = self._pending.pop(keys, None)
        if future is None:
            return
        start = time.perf_counter()
        future.result()
        self.wait_seconds += time.perf_counter() - start

    # ------------------------------------------------------------------------------------------------ figures

    def budgets(self) -> dict[str, int]:
        return {t.name: t.budget for t in self.tiers}

    def tier_bytes(self) -> dict[str, int]:
        """Bytes of blocks held per tier (disk: payload bytes, headers excluded), once every prefetch has ended
        (a block moving up is counted in one tier, never in both or neither)."""
        self.settle()
        with self.lock:
            return {t.name: t.used for t in self.tiers}

    def stats(self) -> dict:
        """Everything measured so far, as plain numbers (JSON-ready), once every prefetch has ended."""
        disk = next((t for t in self.tiers if isinstance(t, DiskTier)), None)
        tier_bytes = self.tier_bytes()  # settles
        with self.lock:
            return {
                "bytes": tier_bytes,
                "blocks": {t.name: len(t) for t in self.tiers},
                "per_tier": {name: dict(c) for name, c in self.counts.items()},
                "blocks_promoted": self.promoted,
                "blocks_demoted": self.demoted,
                "blocks_dropped": self.dropped,
                "disk_bytes_written": 0 if disk is None else disk.bytes_written,
                "disk_bytes_read": 0 if disk is None else disk.bytes_read,
                "move_seconds": self.move_seconds,
                "prefetched_blocks": self.prefetched,
                "prefetch_seconds": self.prefetch_seconds,
                "prefetch_wait_seconds": self.wait_seconds,
            }

    def close(self) -> None:
        """Finish background work, then drop every block and delete the spill directory."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._pending.clear()
        for tier in self.tiers:
            tier.close()
