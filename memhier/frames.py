"""memhier's block pool: the cache's own blocks (one (layer, sequence, KV head) each, laid out by cache/blocks.py),
kept in device frames, host memory or disk files, and found in frames whenever a layer's step reads them.

    block id (in the block tables)  ──frame map──▶  frame: a row of the payload arrays the decode kernel reads
                                             └──▶  -1: the block's bytes lie one tier down (host, then disk)

A block table names blocks by id, as it does in the in-memory pool; where a block's bytes lie is memhier's
business. The device tier is the set of frames that hold blocks between steps, within memhier.device_bytes
(`FrameTier`); a block that does not fit there lives in the host or disk tier as an opaque blob, its bytes exactly
as a frame holds them (memhier/blob.py), moved by the TieredStore (memhier/store.py) and never decoded.

A layer's step opens its store first (`open`): every block the store holds is brought into a frame, promoted
into the device tier where room can be made (least recently used blocks of other layers go down), or else copied
into a scratch frame for this step only, and pinned, so that nothing the kernel reads moves under it. Blocks a step
allocates take frames too. When the next layer opens, the scratch frames are handed back (a block written
meanwhile is put back into the tiers first) and a background thread fetches the following layer's blocks.

Every block is read as stored, every step (exact mode), so the output equals the in-memory pool's bit for bit.
"""

from collections import OrderedDict
from typing import Collection

import numpy as np
import torch

from cache.blocks import PagedStore
from cache.pool import BlockPool
from cache.codecs import Codec, payload_tensors, take_blocks
from memhier.blob import BlockLayout
from memhier.store import TieredStore
from memhier.tiers import Key


class FrameTier:
    """The device tier: blocks held in frames [0, n_frames) of the pool's payload arrays, within `budget` bytes."""

    def __init__(self, pool: "TieredPool", budget: int, n_frames: int):
        self.name, self.pool, self.budget, self.device = "device", pool, budget, pool.device
        self.blocks: OrderedDict[Key, int] = OrderedDict()  # key (block id,) -> frame, least recently used first
        self.free = list(range(n_frames - 1, -1, -1))
        self.used = 0

    def __contains__(self, key: Key) -> bool:
        return key in self.blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def lru(self, exclude: Collection[Key] = ()) -> Key | None:
        return next((k for k in self.blocks if k not in exclude), None)

    def insert(self, key: Key, blob: torch.Tensor) -> None:
        """Hold blob (nbytes,) uint8 in a frame of its own (the TieredStore made room within the budget)."""
        self.adopt(key, self.free.pop())
        self.pool.unpack(self.blocks[key], blob)

    def adopt(self, key: Key, frame: int) -> None:
        """Count the block `key`, already in `frame`, as held here."""
        self.blocks[key] = frame
        self.pool.frame[key[0]] = frame
        self.used += self.pool.layout.nbytes

    def read(self, key: Key) -> torch.Tensor:
        return self.pool.pack(self.blocks[key])  # (nbytes,) uint8, a copy

    def touch(self, key: Key) -> None:
        self.blocks.move_to_end(key)

    def remove(self, key: Key) -> None:
        frame = self.blocks.pop(key)
        self.free.append(frame)
        self.pool.frame[key[0]] = -1
        self.used -= self.pool.layout.nbytes

    def close(self) -> None:
        for key in list(self.blocks):
            self.remove(key)


class TieredPool(BlockPool):
    """A BlockPool whose blocks live in the tiers of `store` (its first tier: this pool's FrameTier). Blocks are
    allocated, shared and released by id as in BlockPool; frames are where the ids' bytes are this step."""

    def __init__(self, codec: Codec, head_dim: int, block_tokens: int, device: torch.device, dtype: torch.dtype,
                 device_bytes: int, lower: list, demotion: str):
        super().__init__(codec, head_dim, block_tokens, 0, device, dtype)  # ids come as blocks are allocated
        self.frame = np.zeros(0, dtype=np.int64)  # (n_ids,): each id's frame, -1 while it lies below
        self.layout = BlockLayout.of(*self._empty(1))  # one block's K and V payload as bytes
        n_tier = device_bytes // self.layout.nbytes  # frames the device tier may fill
        self.k, self.v = self._empty(n_tier + 1)  # (frames, 1, bt, D) payloads: the tier's, then scratch frames
        self.frames = FrameTier(self, device_bytes, n_tier)
        self.store = TieredStore([self.frames, *lower], demotion)
        self.scratch: dict[int, bool] = {}  # block id -> written this step (its copy below is stale or missing)
        self.scratch_free = [n_tier]
        self.stores: list[PagedStore] = []  # every layer's store, in the order the model steps through them
        self.current: PagedStore | None = None  # the store whose step runs now: its blocks are pinned
        self.prefetching: tuple[PagedStore, tuple[Key, ...]] | None = None
        self.prefetch = False

    # ----------------------------------------------------------------------------------------- ids and frames

    def _resize(self, n_blocks: int) -> None:
        """More ids (no bytes: ids get frames as they are allocated)."""
        self.free = list(range(n_blocks - 1, self.n_blocks - 1, -1)) + self.free
        self.n_free += n_blocks - self.n_blocks
        self.refs += [0] * (n_blocks - self.n_blocks)
        self.frame = np.concatenate([self.frame, np.full(n_blocks - len(self.frame), -1)])

    def allocate(self, n: int, preferred: np.ndarray | None = None) -> np.ndarray:
        """n new block ids, each in a frame: the device tier's where room can be made, else a scratch frame (the
        block goes into the tiers when the step ends)."""
        ids = super().allocate(n, None)
        with self.store.lock:
            for i in ids.tolist():
                self.store.pinned.add((i,))
                if self.store.room_on_top(self.layout.nbytes, (i,)):
                    self.frames.adopt((i,), self.frames.free.pop())
                else:
                    self._scratch(i, dirty=True)
        return ids

    def release(self, ids) -> None:
        """Drop one hold of each block; a block nobody holds leaves its frame and its tier."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        super().release(ids)
        with self.store.lock:
            for i in ids.tolist():
                if self.refs[i]:
                    continue
                if i in self.scratch:
                    self._free_scratch(i)
                if any((i,) in tier for tier in self.store.tiers):
                    self.store.drop((i,))
                self.store.pinned.discard((i,))

    def _scratch(self, i: int, dirty: bool) -> int:
        """A scratch frame for block i this step; more frames when none is free (on the model's thread only)."""
        if not self.scratch_free:
            n = self.k_frames()
            old = self.tensors()
            self.k, self.v = self._empty(2 * n)
            for new, kept in zip(self.tensors(), old):
                new[:n] = kept
            self.scratch_free = list(range(2 * n - 1, n - 1, -1))
        self.frame[i] = self.scratch_free.pop()
        self.scratch[i] = dirty
        return int(self.frame[i])

    def _free_scratch(self, i: int) -> None:
        self.scratch_free.append(int(self.frame[i]))
        self.frame[i] = -1
        del self.scratch[i]

    def k_frames(self) -> int:
        return payload_tensors(self.k)[0].shape[0]

    @torch.inference_mode()  # the frames may be inference tensors; the prefetch thread is not in inference mode
    def pack(self, frame: int) -> torch.Tensor:
        """The bytes of the block in `frame` as one blob (nbytes,) uint8 (a copy)."""
        index = torch.tensor([frame], device=self.device)
        return self.layout.pack(take_blocks(self.k, index), take_blocks(self.v, index))

    @torch.inference_mode()
    def unpack(self, frame: int, blob: torch.Tensor) -> None:
        """Write a blob's bytes into `frame`."""
        k, v = self.layout.unpack(blob.to(self.device))
        for dst, src in zip(self.tensors(), payload_tensors(k) + payload_tensors(v)):
            dst[frame] = src[0]  # (1, bt, width) of one block

    # ----------------------------------------------------------------------------------------- a layer's step

    def open(self, store: PagedStore) -> None:
        """Start `store`'s step: end the last store's (scratch frames back), bring every block `store` holds into a
        frame and pin them, and fetch the next store's blocks in the background."""
        if store is self.current:
            return
        with self.store.lock:
            self._end_step()
        self.current = store
        keys = tuple((i,) for i in store.block_ids().tolist())
        if self.prefetching is not None and self.prefetching[0] is store:
            self.store.wait(self.prefetching[1])
        self.prefetching = None
        with self.store.lock:
            self.store.pinned = set(keys)
            for key in keys:
                if self.frame[key[0]] < 0:
                    blob = self.store.locate(key)  # None: promoted into the device tier
                    if blob is not None:
                        self.unpack(self._scratch(key[0], dirty=False), blob)
        if self.prefetch and len(self.stores) > 1:
            following = self.stores[(self.stores.index(store) + 1) % len(self.stores)]
            ahead = tuple((i,) for i in following.block_ids().tolist() if self.frame[i] < 0)
            self.store.prefetch(ahead)
            self.prefetching = following, ahead

    def _end_step(self) -> None:
        """Hand the scratch frames back; a block written in one is put back into the tiers first (the store's lock
        held)."""
        self.store.pinned = set()
        for i, dirty in list(self.scratch.items()):
            blob = self.pack(int(self.frame[i])) if dirty else None
            self._free_scratch(i)
            if blob is not None:
                self.store.replace((i,), blob)

    def _written(self, ids: torch.Tensor) -> None:
        """Blocks `ids` were written this step: a scratch copy becomes the one that counts."""
        if self.scratch:
            for i in set(ids.tolist()) & self.scratch.keys():
                self.scratch[i] = True

    def frame_tables(self, tables: torch.Tensor) -> torch.Tensor:
        """Block tables (B, H_kv, n) of ids -> of frames (entries past a head's blocks: frame 0, never read)."""
        return torch.from_numpy(np.maximum(self.frame[tables.numpy()], 0).astype(np.int32))

    def _rows(self, places: torch.Tensor) -> torch.Tensor:
        """Pool rows (block id * bt + slot) -> frame rows."""
        bt = self.block_tokens
        blocks = places // bt
        self._written(blocks.cpu())
        return torch.from_numpy(self.frame).to(places.device)[blocks] * bt + places % bt

    def write(self, places: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
        super().write(self._rows(places), k, v)

    def write_blocks(self, ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self._written(ids.cpu())
        super().write_blocks(torch.from_numpy(self.frame).to(ids.device)[ids], k, v)

    def move(self, rows: torch.Tensor, to: torch.Tensor) -> None:
        super().move(self._rows(rows), self._rows(to))

    def read(self, tables: torch.Tensor, lengths: torch.Tensor, out_dtype: torch.dtype,
             values: bool = True) -> tuple[torch.Tensor, ...]:
        return super().read(self.frame_tables(tables.cpu()).to(tables.device), lengths, out_dtype, values)

    def block_views(self, ids: np.ndarray) -> list[torch.Tensor]:
        """The scratch frames among ids that hold a block's only copy (the device tier counts its own frames, the
        tiers below theirs; a copy of a block that lies below is transient, as a read buffer is)."""
        only = [self.frame[i] for i in ids.tolist()
                if i in self.scratch and not any((i,) in tier for tier in self.store.tiers)]
        return super().block_views(np.array(only, dtype=np.int64))

    def capacity_bytes(self) -> int:
        return self.k_frames() * self.block_bytes()

    def close(self) -> None:
        self.store.close()
