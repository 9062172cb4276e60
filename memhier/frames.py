"""memhier's block pool: the cache's own blocks (one (layer, sequence, KV head) each, laid out by cache/blocks.py),
kept in device frames, host memory or disk files, and found in frames whenever a layer's step reads them.

    block id (in the block tables)  ──frame map──▶  frame: a row of the payload arrays the decode kernel reads
                                             └──▶  -1: the block's bytes lie one tier down (host, then disk)

A block table names blocks by id, as it does in the in-memory pool; where a block's bytes lie is memhier's
business. The tiers move blocks in *groups*: the blocks a layer allocates at once (a prefill's, or one decode
step's new blocks of every head), cut into groups of at most `group_bytes`. A block of one head is small (64 tokens
of a 4-bit head of 32 channels: 2.5 KB), and a disk read costs tens of microseconds before its first byte, so one
blob per group (memhier/blob.py: the group's blocks' bytes, exactly as frames hold them) keeps reads large.

The device tier is the set of frames that hold groups between steps, within memhier.device_bytes (`FrameTier`); a
group that does not fit there lives in the host or disk tier as an opaque blob, moved by the TieredStore
(memhier/store.py) and never decoded. A layer's step opens its store first (`open`): every group holding a block
of the store (in retrieval mode: a block the step chose or writes) is brought into frames, promoted into the device
tier where room can be made (least recently used groups of other layers go down), or else copied into scratch
frames for this step only, and pinned, so that nothing the kernel reads moves under it. When the next layer opens, the scratch frames are handed back (a group
written meanwhile is put back into the tiers first) and a background thread fetches the following layer's groups.

A released block keeps its place in its group until every block of the group is released (as a page holds its
evicted tokens): then the group leaves its tier and its ids go back to the free list.

In exact mode every block is read as stored, every step, so the output equals the in-memory pool's bit for bit.
"""

import threading

import numpy as np
import torch

from cache.blocks import PagedStore
from cache.codecs import Codec, payload_tensors
from cache.pool import BlockPool
from memhier.blob import BlockLayout
from memhier.store import TieredStore
from memhier.tiers import Key, Tier


class FrameTier(Tier):
    """The device tier: groups of blocks held in frames of the pool's payload arrays, within `budget` bytes.
    `blocks`: (group,) -> the frames of the group's blocks, in the group's order."""

    def __init__(self, pool: "TieredPool", budget: int):
        super().__init__("device", budget)
        self.pool, self.device = pool, pool.device

    def insert(self, key: Key, blob: torch.Tensor) -> None:
        """Hold the group's blob in frames of its own (the TieredStore made room within the budget)."""
        self.adopt(key, self.pool.take_frames(self.pool.members[key[0]].size))
        self.pool.unpack(self.blocks[key], [blob])

    def adopt(self, key: Key, frames: list[int]) -> None:
        """Count the group `key`, already in `frames`, as held here (its blob's bytes, as every tier counts it)."""
        self.blocks[key] = frames
        self.pool.frame[self.pool.members[key[0]]] = frames
        self.used += self.pool.blob_bytes(len(frames))

    def read(self, key: Key) -> torch.Tensor:
        return self.pool.pack(self.blocks[key])  # (nbytes,) uint8, a copy

    def remove(self, key: Key) -> None:
        frames = self.blocks.pop(key)
        self.pool.spare += frames
        self.pool.frame[self.pool.members[key[0]]] = -1
        self.used -= self.pool.blob_bytes(len(frames))

    def close(self) -> None:
        for key in list(self.blocks):
            self.remove(key)


class TieredPool(BlockPool):
    """A BlockPool whose blocks live in the tiers of `store` (its first tier: this pool's FrameTier), in groups of at
    most `group_bytes`. Blocks are allocated, shared and released by id as in BlockPool; frames are where the ids'
    bytes are this step."""

    in_place = False  # ids map to frames, which open() fills
    by_column = True  # the blocks of one table column, every head's, make a group: compaction frees them together

    def __init__(self, codec: Codec, head_dim: int, block_tokens: int, device: torch.device, dtype: torch.dtype,
                 device_bytes: int, group_bytes: int, lower: list, demotion: str):
        super().__init__(codec, head_dim, block_tokens, 0, device, dtype)  # ids come as blocks are allocated
        self.layout = BlockLayout.of(*self._empty(1))  # one block's K and V payload as bytes
        self.group_blocks = max(1, group_bytes // self.layout.nbytes)
        self.layouts = {1: self.layout}  # blocks in a group -> the group's blob layout
        self.frame = np.zeros(0, dtype=np.int64)  # (n_ids,): each id's frame, -1 while it lies below
        self.group = np.zeros(0, dtype=np.int64)  # (n_ids,): each id's group
        self.members: dict[int, np.ndarray] = {}  # group -> its block ids
        self.live: dict[int, int] = {}  # group -> its blocks still held
        self.n_groups = 0
        self.k, self.v = self._empty(self.group_blocks)  # (frames, 1, bt, D) payloads, doubling as more are needed
        self.spare = list(range(self.group_blocks - 1, -1, -1))  # frames holding no block
        self.frames = FrameTier(self, device_bytes)
        self.store = TieredStore([self.frames, *lower], demotion)
        self.scratch: dict[int, list[int]] = {}  # group -> its scratch frames this step
        self.dirty: set[int] = set()  # scratch groups written this step (their copy below is stale or missing)
        self.stores: list[PagedStore] = []  # every layer's store, in the order the model steps through them
        self.prefetching: tuple[PagedStore, tuple[Key, ...]] | None = None
        self.prefetch = False
        self.model_thread = threading.get_ident()  # the thread that runs the layers' steps (open() notes it)

    # ----------------------------------------------------------------------------------------- ids and groups

    def _resize(self, n_blocks: int) -> None:
        """More ids (no bytes: ids get frames as they are allocated)."""
        grown = n_blocks - self.n_blocks
        self._add_ids(n_blocks)
        self.frame = np.concatenate([self.frame, np.full(grown, -1)])
        self.group = np.concatenate([self.group, np.full(grown, -1)])

    def allocate(self, n: int, preferred: np.ndarray | None = None) -> np.ndarray:
        """n new block ids in new groups, in frames: the device tier's where room can be made, else scratch frames
        (the group goes into the tiers when the step ends)."""
        with self.store.lock:  # new ids replace the frame map, which the prefetch thread writes under the lock
            ids = super().allocate(n, None)
            for a in range(0, n, self.group_blocks):
                members = ids[a : a + self.group_blocks].astype(np.int64)
                g = self.n_groups
                self.n_groups += 1
                self.members[g], self.live[g] = members, members.size
                self.group[members] = g
                self.store.pinned.add((g,))
                if self.store.room_on_top(self.blob_bytes(members.size), (g,)):
                    self.frames.adopt((g,), self.take_frames(members.size))
                else:
                    self._scratch(g, dirty=True)
            self._reserve()
        return ids

    def _unhold(self, ids: list[int]) -> None:
        """Blocks nobody holds: once a group has none left, it leaves its frames and tier and its ids are free."""
        with self.store.lock:
            for g, dead in zip(*np.unique(self.group[ids], return_counts=True)):
                g = int(g)
                self.live[g] -= int(dead)
                if self.live[g]:
                    continue
                if g in self.scratch:
                    self._free_scratch(g)
                if any((g,) in tier for tier in self.store.tiers):
                    self.store.drop((g,))
                self.store.pinned.discard((g,))
                members = self.members.pop(g)
                del self.live[g]
                self.group[members] = -1
                super()._unhold(members.tolist())

    def take_frames(self, n: int) -> list[int]:
        """n spare frames; the payload arrays grow only on the model's thread (`_reserve` keeps enough spare for
        the device tier to fill its budget, so the prefetch thread never needs more)."""
        if len(self.spare) < n:
            if threading.get_ident() != self.model_thread:
                raise RuntimeError("memhier: the prefetch thread ran out of spare frames (the frames are sized on the "
                                   "model's thread); this is a bug in memhier/frames.py")
            self._grow(n - len(self.spare))
        return [self.spare.pop() for _ in range(n)]

    def _reserve(self) -> None:
        """Enough spare frames for the device tier to fill its budget (or hold every block) without growing: a block
        takes at least its parts' bytes in a group's blob (each part is aligned once per blob, not per block)."""
        block = sum(part.nbytes for part in self.layout.key_parts + self.layout.value_parts)
        held = sum(len(frames) for frames in self.frames.blocks.values())
        short = min(self.frames.budget // block, self.n_blocks) - held - len(self.spare)
        if short > 0:
            self._grow(short)

    def _grow(self, n: int) -> None:
        """At least n more frames: the payload arrays double, on the model's thread with the store's lock held (a
        kernel already reading the old arrays reads the same bytes there; the prefetch thread writes frames only
        under the lock, the model's thread after this)."""
        size = self.k_frames()
        self._resize_payloads(max(2 * size, size + n))
        self.spare += range(self.k_frames() - 1, size - 1, -1)

    def _scratch(self, g: int, dirty: bool) -> list[int]:
        """Scratch frames for group g this step."""
        frames = self.take_frames(self.members[g].size)
        self.frame[self.members[g]] = frames
        self.scratch[g] = frames
        if dirty:
            self.dirty.add(g)
        return frames

    def _free_scratch(self, g: int) -> None:
        """Hand back group g's scratch frames; its blocks lie where the tiers hold the group now."""
        self.spare += self.scratch.pop(g)
        self.dirty.discard(g)
        if (g,) not in self.frames:
            self.frame[self.members[g]] = -1

    def k_frames(self) -> int:
        return payload_tensors(self.k)[0].shape[0]

    def blob_bytes(self, n: int) -> int:
        """The bytes of a group of n blocks in its blob (in every tier)."""
        return self.layout_of(n).nbytes

    def layout_of(self, n: int) -> BlockLayout:
        """The byte layout of n blocks in one blob (a group's, or a persisted prefix block's)."""
        if n not in self.layouts:
            self.layouts[n] = BlockLayout.of(*self._empty(n))
        return self.layouts[n]

    @torch.inference_mode()  # the frames may be inference tensors; the prefetch thread is not in inference mode
    def pack(self, frames: list[int]) -> torch.Tensor:
        """The bytes of the blocks in `frames` as one blob (n * nbytes,) uint8 (a copy)."""
        index = torch.tensor(frames, device=self.device)
        return self.layout_of(len(frames)).pack_tensors([t.index_select(0, index) for t in self.tensors()])

    @torch.inference_mode()
    def unpack(self, frames: list[int], blobs: list[torch.Tensor]) -> None:
        """Write m blobs of n blocks each (a group's, or a prefix entry's per layer) into `frames` (m * n,), in that
        order: one copy per payload tensor."""
        layout = self.layout_of(len(frames) // len(blobs))
        parts = [layout.unpack_tensors(blob.to(self.device)) for blob in blobs]  # each: (n, 1, bt, width) tensors
        index = torch.tensor(frames, device=self.device)
        for i, dst in enumerate(self.tensors()):
            dst.index_copy_(0, index, torch.cat([p[i] for p in parts]))  # (N, 1, bt, width) <- (m * n, 1, bt, width)

    # ----------------------------------------------------------------------------------------- a layer's step

    def groups_of(self, ids: np.ndarray) -> tuple[Key, ...]:
        """The groups holding blocks `ids`, as tier keys."""
        return tuple((int(g),) for g in np.unique(self.group[ids]))

    def open(self, store: PagedStore, ids: np.ndarray | None = None) -> None:
        """Start `store`'s step: end the last store's (scratch frames back), bring every group holding one of
        `store`'s blocks (or of `ids`: retrieval's choice) into frames and pin them, and fetch the next store's
        groups in the background."""
        self.model_thread = threading.get_ident()
        with self.store.lock:
            self._end_step()
        keys = self.groups_of(store.block_ids() if ids is None else ids)
        if self.prefetching is not None and self.prefetching[0] is store:
            self.store.wait(self.prefetching[1])
        self.prefetching = None
        with self.store.lock:
            self.store.pinned = set(keys)
            for key in keys:
                blob = self.store.locate(key)  # None: on the device tier (now most recently used), or promoted there
                if blob is not None:
                    self.unpack(self._scratch(key[0], dirty=False), [blob])
            self._reserve()
        if self.prefetch and len(self.stores) > 1:
            following = self.stores[(self.stores.index(store) + 1) % len(self.stores)]
            ahead = tuple(key for key in self.groups_of(following.block_ids()) if key not in self.frames)
            self.store.prefetch(ahead)
            self.prefetching = following, ahead

    def _end_step(self) -> None:
        """Hand the scratch frames back; a group written in them is put back into the tiers first (the store's lock
        held)."""
        self.store.pinned = set()
        for g, frames in list(self.scratch.items()):
            if g in self.dirty:  # the new version goes down first: should that fail, the scratch frames hold it
                self.store.replace((g,), self.pack(frames))
            self._free_scratch(g)

    def _written(self, ids: torch.Tensor) -> None:
        """Blocks `ids` were written this step: a scratch copy of their group becomes the one that counts."""
        if self.scratch:
            self.dirty.update(g for g in np.unique(self.group[ids.numpy()]).tolist() if g in self.scratch)

    def read_blob(self, ids: np.ndarray) -> torch.Tensor:
        """The bytes of blocks `ids` (n,), in frames this step, as one blob (a copy)."""
        return self.pack(self.frame[ids].tolist())

    def write_blobs(self, ids: np.ndarray, blobs: list[torch.Tensor]) -> None:
        """Write blocks `ids` (m * n,), in frames this step, from m blobs of n blocks each, in that order."""
        self.unpack(self.frame[ids].tolist(), blobs)
        self._written(torch.from_numpy(ids.astype(np.int64)))

    def frame_tables(self, tables: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Block tables (B, H_kv, n) of ids -> of frames (entries past a head's blocks: frame 0, never read).
        Raises RuntimeError when a block holding one of the first `lengths` (B, H_kv) tokens of its head is not in
        frames: the step did not bring it in, and the kernel would read another block's bytes."""
        frames = self.frame[tables.numpy()]  # (B, H_kv, n); -1: the block lies one tier down
        if lengths is not None:
            read = np.arange(frames.shape[-1]) < -(-lengths.numpy()[..., None] // self.block_tokens)  # (B, H_kv, n)
            if (frames[read] < 0).any():
                raise RuntimeError("memhier: a block this step reads is not in frames (open() did not bring it "
                                   "in); this is a bug in memhier/frames.py")
        return torch.from_numpy(np.maximum(frames, 0).astype(np.int32))

    def _frames_of(self, ids: torch.Tensor, written: bool = True) -> torch.Tensor:
        """Block ids (any shape, int64) -> their frames; `written`: the groups of those blocks are written."""
        if written:
            self._written(ids.cpu())
        return torch.from_numpy(self.frame).to(ids.device)[ids]

    def _rows(self, places: torch.Tensor, written: bool = True) -> torch.Tensor:
        """Pool rows (block id * bt + slot) -> frame rows."""
        bt = self.block_tokens
        return self._frames_of(places // bt, written) * bt + places % bt

    def write(self, places: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
        super().write(self._rows(places), k, v)

    def write_blocks(self, ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        super().write_blocks(self._frames_of(ids), k, v)

    def read_rows(self, places: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return super().read_rows(self._rows(places, written=False), out_dtype)

    def move(self, rows: torch.Tensor, to: torch.Tensor) -> None:
        super().move(self._rows(rows, written=False), self._rows(to))

    def read(self, tables: torch.Tensor, lengths: torch.Tensor, out_dtype: torch.dtype,
             values: bool = True) -> tuple[torch.Tensor, ...]:
        frames = self.frame_tables(tables.cpu(), lengths.cpu()).to(tables.device)
        return super().read(frames, lengths, out_dtype, values)

    def block_views(self, ids: np.ndarray) -> list[torch.Tensor]:
        """The scratch frames among ids that hold a block's only copy (the device tier counts its own frames, the
        tiers below theirs; a copy of a group that lies below is transient, as a read buffer is)."""
        only = [self.frame[i] for i, g in zip(ids.tolist(), self.group[ids].tolist())
                if g in self.scratch and not any((g,) in tier for tier in self.store.tiers)]
        return super().block_views(np.array(only, dtype=np.int64))

    def capacity_bytes(self) -> int:
        return self.k_frames() * self.block_bytes()

    def close(self) -> None:
        self.store.close()
