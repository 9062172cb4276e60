"""The block pool: fixed-size blocks of encoded tokens, a free list and reference counts (cache/blocks.py keeps
the block tables that say which blocks hold whose tokens).

    ┌────┬────┬────┬────┬────┬────┬─ ─      block id b: row b of every payload tensor, (N, 1, block_tokens, width)
    │ 0  │ 1  │ 2  │ 3  │ 4  │ 5  │ ...     token s of a head: offset s % bt of its table's block s // bt
    └────┴────┴────┴────┴────┴────┴─ ─

A block holds `block_tokens` tokens of one (layer, KV head) in the codec's encoded form (fp: K and V; int8/int4
and KIVI: codes, scales, zeros; GEAR: its chunk's payload), so a block id indexes the first axis of the payloads
like a batch index and the decode kernels read blocks where they lie. One pool serves every layer of a cache, or
every cache of the serving engine; memhier/frames.py keeps a pool's blocks in device, host and disk tiers.

Shapes: bt block_tokens, N blocks in the pool, D head_dim, B batch, H_kv KV heads, L the longest head.
"""

from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch

from cache.codecs import Codec, Payload, payload_tensors, take_blocks

if TYPE_CHECKING:  # annotations only: cache/blocks.py imports this module
    from cache.blocks import PagedStore


def pool_rows(tables: torch.Tensor, slots: torch.Tensor, block_tokens: int) -> torch.Tensor:
    """Where tokens lie: slots (B, H_kv, n) of each head -> rows (B, H_kv, n) int64 of the pool's (n_blocks *
    block_tokens) token rows. Slot s of head (b, h) is offset s % block_tokens of block tables[b, h, s //
    block_tokens]: block ids index the first axis of a (n_blocks, 1, block_tokens, D) payload."""
    block = tables.gather(2, (slots // block_tokens).long())  # (B, H_kv, n): the block holding each slot
    return block.long() * block_tokens + slots % block_tokens


def host_rows(tables: np.ndarray, slots: np.ndarray, block_tokens: int) -> np.ndarray:
    """pool_rows in numpy on host tables (B, H_kv, w): slots (B, H_kv, n), or (n,) the same for every head -> rows
    (B, H_kv, n) int64. The tables are read flat (one take, not a grid of indices)."""
    B, H_kv, width = tables.shape
    first = np.arange(0, B * H_kv * width, width).reshape(B, H_kv, 1)  # (B, H_kv, 1): each head's table
    return tables.take(first + slots // block_tokens).astype(np.int64) * block_tokens + slots % block_tokens


def compaction(tables: np.ndarray, keep: np.ndarray, block_tokens: int) -> tuple[np.ndarray, ...]:
    """A compaction's copies: each head of tables (B, H_kv, w) keeps the slots `keep` (B, H_kv, L) marks, in order,
    at its first slots. -> src, dst (n,) int64, the pool rows each kept token lies at and goes to, and by (n,), the
    slots it moves by (<= 0; src == dst where it stays put)."""
    slots = np.arange(keep.shape[-1])  # (L,): every head's slots
    to = np.maximum(np.cumsum(keep, axis=-1) - 1, 0)  # (B, H_kv, L): a kept token's slot after compaction
    src, dst = host_rows(tables, slots, block_tokens), host_rows(tables, to, block_tokens)
    return src[keep], dst[keep], (to - slots)[keep]


class BlockPool:
    """`n_blocks` blocks of `block_tokens` tokens, a free list and reference counts. With `grow`, running out
    doubles the pool (one copy); without, it raises MemoryError (a shared pool: the engine preempts instead)."""

    in_place = True  # a block's id is where the kernels read and write it (memhier's tiers map ids to frames)
    by_column = False  # True: a store allocates its heads' new blocks column by column (memhier's groups), else head
    # by head, so that a head's blocks follow each other

    def __init__(self, codec: Codec, head_dim: int, block_tokens: int, n_blocks: int, device: torch.device,
                 dtype: torch.dtype, grow: bool = True):
        self.codec, self.head_dim, self.block_tokens, self.grow = codec, head_dim, block_tokens, grow
        self.device, self.dtype = torch.device(device), dtype
        self.k, self.v = self._empty(n_blocks)  # (N, 1, bt, D) payloads each
        self.refs = [0] * n_blocks  # holders of each block; 0: free
        self.free = list(range(n_blocks - 1, -1, -1))  # a stack: block 0 is handed out first (may hold taken ids)
        self.n_free = n_blocks

    def _empty(self, n_blocks: int) -> tuple[Payload, Payload]:
        """K and V payloads of n_blocks empty blocks: one block of zeros encoded, copied n_blocks times (a block's
        encoding depends on its tokens only)."""
        zeros = (torch.zeros(1, 1, self.block_tokens, self.head_dim, device=self.device, dtype=self.dtype)
                 for _ in range(2))
        first = torch.zeros(n_blocks, dtype=torch.long, device=self.device)  # (n_blocks,): block 0, again and again
        return tuple(take_blocks(tc.encode(z), first) for tc, z in zip((self.codec.key, self.codec.value), zeros))

    @property
    def n_blocks(self) -> int:
        return len(self.refs)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the K and V payloads, (N, 1, bt, width) each: values, or codes, scales and zeros."""
        return payload_tensors(self.k) + payload_tensors(self.v)

    def block_views(self, ids: np.ndarray) -> list[torch.Tensor]:
        """A view of each payload tensor of each block `ids` (the bytes a store holds)."""
        return [t[i] for t in self.tensors() for i in ids.tolist()]

    def frame_tables(self, tables: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Block tables as the kernels index the payloads: here a block's id is its place (memhier maps them, and
        checks that the blocks holding each head's first `lengths` tokens are in frames)."""
        return tables

    def open(self, store: "PagedStore", ids: np.ndarray | None = None) -> None:
        """A layer's step begins: memhier brings the store's blocks (or only `ids`, those the step reads and writes)
        to the device here."""

    def read_keys(self, ids: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """The keys of blocks `ids` (n,) int32, each decoded whole (an encoding unit may span tokens): (n, 1, bt, D)."""
        tables = ids.view(1, 1, -1)  # (1, 1, n): one table of every block
        frames = self.frame_tables(tables, torch.full((1, 1), ids.numel() * self.block_tokens))
        frames = frames.view(-1).to(self.device, torch.long)
        return self.codec.key.decode(take_blocks(self.k, frames), out_dtype)

    def capacity_bytes(self) -> int:
        """Bytes of every block the pool has room for, free ones included."""
        return self.n_blocks * self.block_bytes()

    def block_bytes(self) -> int:
        """Bytes of one block's K and V payload (codes, scales and zeros included)."""
        return sum(t[0].numel() * t.element_size() for t in self.tensors())

    def blocks_in_use(self) -> int:
        return self.n_blocks - self.n_free

    def allocate(self, n: int, preferred: np.ndarray | None = None) -> np.ndarray:
        """n free block ids (n,) int32, each now held once: preferred[i] when that block is free (so that a head's
        blocks follow each other and the kernel reads them as one run), else the top of the free stack. Raises
        MemoryError when the pool cannot grow."""
        if n > self.n_free:
            if not self.grow:
                raise MemoryError(f"the block pool has {self.n_free} free blocks of {self.n_blocks}, {n} needed")
            self._resize(max(2 * self.n_blocks, self.n_blocks + n))
        ids = []
        for want in ([-1] * n if preferred is None else preferred.tolist()):
            if not 0 <= want < self.n_blocks or self.refs[want]:
                want = self.free.pop()
                while self.refs[want]:  # taken earlier as someone's preferred block: drop the stale entry
                    want = self.free.pop()
            self.refs[want] = 1
            ids.append(want)
        self.n_free -= n
        return np.array(ids, dtype=np.int32)

    def hold(self, ids: Iterable[int]) -> None:
        """One more hold of each block, each held already (a prefix shared with another sequence)."""
        for i in map(int, ids):
            if self.refs[i] <= 0:
                raise ValueError(f"block {i} is shared but not held")
            self.refs[i] += 1

    def release(self, ids: Iterable[int]) -> None:
        """Drop one hold of each block; a block nobody holds goes back to the free list."""
        unheld = []
        for i in map(int, ids):
            if self.refs[i] <= 0:
                raise ValueError(f"block {i} is released but not held")
            self.refs[i] -= 1
            if self.refs[i] == 0:
                unheld.append(i)
        self._unhold(unheld)

    def _unhold(self, ids: list[int]) -> None:
        """Blocks nobody holds any more go back to the free list."""
        self.free += ids
        self.n_free += len(ids)
        if len(self.free) > 2 * self.n_free + 64:  # stale entries (taken as preferred blocks) pile up: drop them
            self.free = [i for i in self.free if self.refs[i] == 0]

    def _resize(self, n_blocks: int) -> None:
        """Room for n_blocks blocks in all: their bytes, then their ids."""
        self._resize_payloads(n_blocks)
        self._add_ids(n_blocks)

    def _resize_payloads(self, n: int) -> None:
        """The K and V payloads grown to n blocks (one copy of the old ones)."""
        old = self.tensors()
        self.k, self.v = self._empty(n)
        for new, kept in zip(self.tensors(), old):
            new[: kept.shape[0]] = kept

    def _add_ids(self, n_blocks: int) -> None:
        """Ids up to n_blocks, the new ones free."""
        self.free = list(range(n_blocks - 1, self.n_blocks - 1, -1)) + self.free  # the old free blocks go first
        self.n_free += n_blocks - self.n_blocks
        self.refs += [0] * (n_blocks - self.n_blocks)

    def write(self, places: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
        """Encode the rows k, v (n, D) and store row i at places[i] = block * block_tokens + slot (int64); the keys
        alone when v is None."""
        n, D = k.shape
        for pool, tc, x in ((self.k, self.codec.key, k), (self.v, self.codec.value, v))[: 1 if v is None else 2]:
            encoded = payload_tensors(tc.encode(x.view(n, 1, 1, D)))  # per-token codecs: (n, 1, 1, width) each
            for dst, src in zip(payload_tensors(pool), encoded):
                dst.view(-1, dst.shape[-1]).index_copy_(0, places, src.view(n, -1))  # (N * bt, width) <- (n, width)

    def write_blocks(self, ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Encode k, v (n, 1, bt, D), whole blocks at once (a codec whose scales span tokens: KIVI's keys), and
        store block i at block id ids[i] (int64)."""
        for pool, tc, x in ((self.k, self.codec.key, k), (self.v, self.codec.value, v)):
            for dst, src in zip(payload_tensors(pool), payload_tensors(tc.encode(x))):
                dst.index_copy_(0, ids, src)  # (N, 1, rows, width) <- (n, 1, rows, width)

    def read_rows(self, places: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """The keys stored at pool rows `places` (n,) int64, decoded: (n, D) (a per-token codec's)."""
        return self.codec.key.decode(self.codec.key.take_rows(self.k, places), out_dtype)

    def move(self, rows: torch.Tensor, to: torch.Tensor) -> None:
        """Copy the stored tokens at pool rows `rows` (n,) to rows `to` (n,) (int64), as stored: all are read
        before any is written, so the two may overlap."""
        for t in self.tensors():
            flat = t.view(-1, t.shape[-1])  # (N * bt, width)
            flat.index_copy_(0, to, flat.index_select(0, rows))  # not flat[rows]: the same copy, 2x the time

    def read(self, tables: torch.Tensor, lengths: torch.Tensor, out_dtype: torch.dtype,
             values: bool = True) -> tuple[torch.Tensor, ...]:
        """Every (b, h)'s tokens gathered from its blocks, decoded: K, V (B, H_kv, L, D) in out_dtype, zero past
        each length (a transient copy, for prefill and the policies that read keys); K alone without `values`."""
        B, H_kv, _ = tables.shape
        L = int(lengths.max())
        slot = torch.arange(L, device=tables.device)  # (L,)
        pad = slot >= lengths.unsqueeze(-1)  # (B, H_kv, L)
        flat = pool_rows(tables, slot.expand(B, H_kv, L), self.block_tokens).masked_fill(pad, 0)  # (B, H_kv, L)
        out = []
        for pool, tc in ((self.k, self.codec.key), (self.v, self.codec.value))[: 2 if values else 1]:
            rows = tc.decode(tc.take_rows(pool, flat), out_dtype)  # (B, H_kv, L, D): only the rows held
            out.append(rows.masked_fill(pad.unsqueeze(-1), 0.0))
        return tuple(out)
