"""The paged KV cache: block tables that say where each head's tokens lie in a pool of fixed-size blocks
(cache/pool.py).

    BlockPool (one per cache, its layers share it)       PagedStore (one per layer): a block table per (b, h)
    ┌────┬────┬────┬────┬────┬────┬─ ─                    (b=0, h=0) -> [ 7, 2, 9 ]   lengths[0, 0] = 40
    │ 0  │ 1  │ 2  │ 3  │ 4  │ 5  │ ...                   tokens 0..15 in block 7, 16..31 in block 2, 32..39 in 9
    └────┴────┴────┴────┴────┴────┴─ ─                    (b=0, h=1) -> [ 4 ]         lengths[0, 1] = 3

A block holds `block_tokens` tokens of one (layer, KV head) in the codec's encoded form, and the decode kernel
(cache/kernels/cpu_decode.c) reads blocks where they lie. A block is allocated when a head's last block is full,
so at most one partly filled block per (sequence, layer, KV head) is slack; an evicting policy compacts a head's
kept tokens and hands the emptied blocks back, and `free()` returns a store's blocks at once (reference counts let
prefix caching share a block).

Per-sequence lengths come for free: each (b, h) has its own length, so rows of a batch hold different numbers of
tokens (a ragged batch), and later different heads (per-head budgets).

A store may read fewer blocks than it holds: a `chooser` (memhier's retrieval, memhier/retrieval.py) picks, for a
decode step's queries, the full blocks each head reads; the step then sees a `view`, block tables and lengths of the
chosen blocks followed by the head's open one, and the pool brings in only those (memhier's tiers).

Shapes: B batch, H query heads, H_kv KV heads, T new tokens (right-padded, `Rows.new` real per row), D head_dim,
L the longest (b, h) length, bt block_tokens, N blocks in the pool.
"""

from typing import Callable, Protocol

import numpy as np
import torch

from cache.base import State, append_entries
from cache.model_cache import Rows
from cache.pool import BlockPool, compaction, host_rows
from cache.storage import gather_state
from toymodel.attention import Backend, masked_attend

Turn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # keys (n, D), by (n,) slots -> keys rotated by that


class Chooser(Protocol):
    """Which full blocks a decode step reads (memhier/retrieval.py)."""

    def choose(self, store: "PagedStore", q: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
        """Before the step's tokens are stored: (B, H_kv, m) each head's chosen full columns, sorted, and (B, H_kv)
        how many of them count; None reads every block."""

    def stored(self, store: "PagedStore") -> None:
        """After a step's tokens are stored (blocks that filled are in the pool's frames now)."""

    def tensors(self) -> list[torch.Tensor]:
        """The chooser's own tensors, for memory accounting."""


class PagedStore:
    """One layer's tokens in a BlockPool: a block table and a length per (sequence, KV head).

    The bookkeeping (tables, lengths, blocks held) is small and lives on the host in numpy int32 arrays, so a decode
    step costs a few microseconds of it; `tables` and `lengths` are torch views of the same memory, which the C
    kernel reads as they are.
    """

    hands_codes = False  # attention reads the pool through the paged kernel (LayerCache._attend_paged)
    paged = True
    ragged_rows = True  # rows of different lengths: each (b, h) has its own
    prefix_unit = 1  # a prefix adopted by this store ends at a multiple of this many blocks

    def __init__(self, pool: BlockPool, rows: Rows, n_kv_head: int, out_dtype: torch.dtype,
                 region: np.ndarray | None = None):
        self.pool, self.rows, self.out_dtype = pool, rows, out_dtype
        self.region = region  # (B, H_kv): the first block of each head's stretch of a pool sized to the need
        self.chooser: Chooser | None = None  # None: every step reads every block
        self.view: tuple[np.ndarray, np.ndarray] | None = None  # this step's chosen (tables, lengths), if any
        B = rows.seen.shape[0]
        self._set_rows(np.zeros((B, n_kv_head), dtype=np.int32),  # (B, H_kv) tokens
                       np.zeros((B, n_kv_head), dtype=np.int32),  # (B, H_kv) blocks in each table
                       np.zeros((B, n_kv_head, 0), dtype=np.int32),  # (B, H_kv, max_blocks) block ids
                       np.zeros((B, n_kv_head), dtype=np.int64))  # (B, H_kv): pool row of each head's next token

    def _set_rows(self, lengths: np.ndarray, held: np.ndarray, tables: np.ndarray, next_: np.ndarray) -> None:
        """The bookkeeping arrays, and the torch views of them that the kernels read (no step's view past this)."""
        self._lengths, self._held, self._next = lengths, held, next_
        self.view = None
        self.lengths, self.held = torch.from_numpy(lengths), torch.from_numpy(held)
        self._set_tables(tables)

    def _set_tables(self, tables: np.ndarray) -> None:
        self._tables, self.tables = tables, torch.from_numpy(tables)

    def __len__(self) -> int:
        """Tokens per KV head, averaged over batch and heads (rounded down; 0 without rows)."""
        return self.tokens_stored() // max(self._lengths.size, 1)

    def extend(self, other: "PagedStore", state: State, other_state: State) -> State:
        """Take `other`'s rows after this store's own: sequences prefilled on their own, in the same pool, join a
        running batch (the serving engine). Their blocks change hands; nothing is copied. Returns the policy's
        per-token state of every row: `state` and `other_state`, laid out like read()'s view, one after the other."""
        if other.pool is not self.pool:
            raise ValueError("only rows in the same block pool can join: build both caches with the engine's pool")
        width = max(self._tables.shape[2], other._tables.shape[2])
        tables = [np.pad(t, ((0, 0), (0, 0), (0, width - t.shape[2]))) for t in (self._tables, other._tables)]
        self._set_rows(*(np.concatenate(pair) for pair in ((self._lengths, other._lengths),
                                                           (self._held, other._held), tables,
                                                           (self._next, other._next))))
        self.region = None  # stretches belong to private pools sized to one batch
        return {name: torch.cat([self._fit(state[name]), self._fit(other_state[name])]) for name in state}

    def adopt(self, blocks: np.ndarray, hold: bool = True) -> None:
        """Start every head of this empty store with full blocks: blocks (B, H_kv, n) ids, each held once more
        (another sequence stored them: prefix caching, serving/prefix.py), or without `hold` handed over (just
        allocated and written: memhier's persistent prefixes). The next token opens a block of its own, so adopted
        blocks are never written."""
        B, H_kv, n = blocks.shape
        if self._lengths.shape != (B, H_kv) or self._lengths.any():
            raise ValueError(f"only an empty store of {B} rows and {H_kv} KV heads adopts blocks ({B}, {H_kv}, n)")
        if hold:
            self.pool.hold(blocks.ravel())
        self._set_rows(np.full((B, H_kv), n * self.pool.block_tokens, dtype=np.int32),
                       np.full((B, H_kv), n, dtype=np.int32), np.ascontiguousarray(blocks, dtype=np.int32),
                       np.zeros((B, H_kv), dtype=np.int64))
        self._point_next()

    def row_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """Per row (B,): the blocks it holds, and the blocks its next decode step takes (heads whose blocks are
        full)."""
        full = self._lengths == self._held * self.pool.block_tokens  # (B, H_kv)
        return self._held.sum(axis=1), full.sum(axis=1)

    def drop_rows(self, keep: np.ndarray, state: State) -> State:
        """Hand back the blocks of every row where `keep` (B,) is False; the kept rows close ranks, in order, and so
        do their entries of the policy's per-token `state` (returned)."""
        gone = ~keep
        self.pool.release(self._tables[gone][self._held_mask()[gone]])
        self._set_rows(self._lengths[keep], self._held[keep], self._tables[keep], self._next[keep])
        self.region = None if self.region is None else self.region[keep]
        index = torch.from_numpy(keep)
        return {name: self._fit(t[index.to(t.device)]) for name, t in state.items()}

    def _fit(self, entries: torch.Tensor) -> torch.Tensor:
        """Per-token entries (b, H_kv, n) cut or zero-padded to the longest head of this store, as read() sees it."""
        width = int(self.token_counts().max(initial=0))
        return torch.nn.functional.pad(entries[..., :width], (0, max(0, width - entries.shape[-1])))

    def add(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None) -> None:
        """Store each row's real new tokens of k, v (B, H_kv, T, D) after its old ones (`rows.new` per row),
        allocating blocks as heads fill them. With a chooser, a decode step's queries q (B, H, 1, D) choose the
        blocks it reads (`view`): only those and the ones it writes are brought in."""
        chosen = self._choose(k.shape[2], q)
        self.pool.open(self, None if chosen is None else self._opening(*chosen))
        self._add(k, v)
        if self.chooser is not None:
            self.chooser.stored(self)
        self.view = None if chosen is None else self._view(*chosen)

    def _choose(self, T: int, q: torch.Tensor | None) -> tuple[np.ndarray, ...] | None:
        """The chooser's pick for a decode step (a prefill reads every block): the chosen columns (B, H_kv, m), how
        many count (B, H_kv), and each head's first block not full before this step (B, H_kv); None: every block."""
        if self.chooser is None or T > 1:
            return None
        if q is None:
            raise ValueError("memhier.mode=retrieval and memhier.demotion=attention need each decode step's queries "
                             "to choose and rank blocks: attend through layer_cache.attend(q, k, v, backend), as "
                             "Transformer.forward does")
        chosen = self.chooser.choose(self, q)
        return None if chosen is None else (*chosen, self._lengths // self.pool.block_tokens)

    def _opening(self, cols: np.ndarray, n: np.ndarray, first_open: np.ndarray) -> np.ndarray:
        """The blocks a chosen step reads or writes: the chosen columns (B, H_kv, m) (the first n (B, H_kv) of each
        head), and the open block of each head that has one."""
        cols = np.minimum(cols, self._tables.shape[2] - 1)  # a head with fewer than m: past its n, never read
        picked = np.take_along_axis(self._tables, cols, axis=-1)[np.arange(cols.shape[-1]) < n[:, :, None]]  # (k,)
        has_open = first_open < self._held  # (B, H_kv)
        return np.concatenate([picked, self._tables[has_open, first_open[has_open]]])

    def _view(self, cols: np.ndarray, n: np.ndarray, first_open: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Block tables (B, H_kv, w) and lengths (B, H_kv) of a chosen step: the n chosen full blocks of each head,
        then every block from its first open one on (the block a decode step writes, or a flush's new ones)."""
        m, bt = cols.shape[-1], self.pool.block_tokens
        w = m + int((self._held - first_open).max())
        j = np.arange(w)  # (w,)
        n3 = n[:, :, None]
        at = np.where(j < n3, np.pad(cols, ((0, 0), (0, 0), (0, w - m))), first_open[:, :, None] + j - n3)
        at = np.minimum(at, self._tables.shape[2] - 1)  # (B, H_kv, w): entries past a head's length, never read
        lengths = (n * bt + self._lengths - first_open * bt).astype(np.int32)
        return np.ascontiguousarray(np.take_along_axis(self._tables, at, axis=-1)), lengths

    def read_view(self) -> tuple[np.ndarray, np.ndarray]:
        """The block tables (B, H_kv, w) and lengths (B, H_kv) this step reads: every block, or the chosen ones."""
        return (self._tables, self._lengths) if self.view is None else self.view

    def read_counts(self) -> np.ndarray:
        """(B, H_kv) tokens this step reads per head (cache/residual.py adds a residual)."""
        return self.read_view()[1]

    def _add(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """add()'s storing, once the pool has the blocks in."""
        B, H_kv, T, D = k.shape
        bt = self.pool.block_tokens
        if T == 1:  # a decode step: every row adds its one token, at the place kept ready for it
            self.pool.write(torch.from_numpy(self.decode_rows()).to(k.device), k.reshape(-1, D), v.reshape(-1, D))
            return
        new = self.new_tokens(T)  # (B,)
        slot = self._lengths[:, :, None] + np.arange(T)  # (B, H_kv, T): each new token's place in its head
        np.add(self._lengths, new[:, None], out=self._lengths, casting="unsafe")
        self._allocate(-(-self._lengths // bt))
        places = self._places(np.minimum(slot, self._tables.shape[2] * bt - 1))  # (B, H_kv, T) (padding: clamped)
        if (new == T).all():  # every token real
            where, k, v = places.ravel(), k.reshape(-1, D), v.reshape(-1, D)  # (n,), (n, D) each
        else:
            real = (np.arange(T) < new[:, None])[:, None].repeat(H_kv, axis=1)  # (B, H_kv, T): not padding
            mask = torch.from_numpy(real).to(k.device)
            where, k, v = places[real], k[mask], v[mask]  # (n,), (n, D) each, (b, h, t) order
        self.pool.write(torch.from_numpy(where).to(k.device), k, v)
        self._point_next()

    def token_rows(self) -> bool:
        """Whether each token lies in its block as its own rows of K and V, float32 or per-token codes with their
        scales and zeros, read and written in place (what the one-call decode block writes into,
        cache/kernels/cpu_block.py): no residual, tiers or chooser, a CPU pool of a float32 model."""
        codec, pool = self.pool.codec, self.pool
        return (codec.per_token and codec.kernel_readable and codec.float32_or_codes(pool.dtype)
                and pool.dtype == torch.float32 and pool.device.type == "cpu" and pool.in_place
                and self.chooser is None)

    def decode_rows(self) -> np.ndarray:
        """(B * H_kv,) int64: the pool row of a decode step's token in each head (a block allocated where the last is
        full), counted from here on; the caller writes it (add(), or the one-call block: cache/kernels/cpu_block.py)."""
        full = self._lengths == self._held * (bt := self.pool.block_tokens)  # (B, H_kv): last block full
        if full.any():  # once per bt steps for a level batch; rows of different lengths take turns
            self._allocate(self._held + full)
            self._next[full] = self._tables[full, self._held[full] - 1].astype(np.int64) * bt  # its first slot
        rows = self._next.ravel().copy()  # (B * H_kv,)
        self._lengths += 1
        self._next += 1  # the next slot of the same block, or past it (then the next step points it)
        return rows

    def new_slots(self) -> torch.Tensor:
        """(B, H_kv) the slot of each head's first token of this step, once add() has stored the step."""
        return torch.from_numpy(self.token_counts() - self.rows.new.cpu().numpy()[:, None])

    def new_tokens(self, T: int) -> np.ndarray:
        """(B,) the real tokens each row adds among the T of this step. Raises ValueError outside [1, T]."""
        new = self.rows.new.cpu().numpy()
        if not ((new >= 1) & (new <= T)).all():
            raise ValueError(f"rows.new={new.tolist()} must count each row's real tokens among the T={T} given, "
                             f"in [1, T]: ModelCache.positions(T, lengths) sets it before the layers run")
        return new

    def _point_next(self, rows: np.ndarray | slice = slice(None)) -> None:
        """Each head's next token (of `rows`, indices; every row by default) goes to slot length % bt of its table's
        block length // bt (past the table's last block when that is full: the next add allocates and points it
        again)."""
        end = self._tables.shape[2] * self.pool.block_tokens - 1  # the table's last slot
        self._next[rows] = self._places(np.minimum(self._lengths[rows], end)[:, :, None], rows)[:, :, 0]

    def _allocate(self, need: np.ndarray) -> None:
        """Give every (b, h) `need` (B, H_kv) blocks, taking the missing ones from the pool."""
        missing = (need - self._held).ravel()  # (B * H_kv,)
        n = int(missing.sum())
        if n == 0:
            return
        width = self._tables.shape[2]
        if int(need.max()) > width:  # widen the tables (doubling: rare)
            wider = np.zeros((*self._tables.shape[:2], max(int(need.max()), 2 * width)), dtype=np.int32)
            wider[:, :, :width] = self._tables
            self._set_tables(wider)
        owner = np.repeat(np.arange(missing.size), missing)  # (n,): the (b, h) each new block goes to
        first = (np.cumsum(missing) - missing)[owner]  # (n,): where the owner's new blocks start among the n
        col = self._held.ravel()[owner] + np.arange(n) - first  # (n,): its table column
        if self.pool.by_column:  # memhier groups blocks allocated side by side, and a column's blocks of every head
            order = np.lexsort((owner, col))  # are the ones compaction frees together
            owner, col = owner[order], col[order]
        table = self._tables.reshape(missing.size, -1)  # (B * H_kv, max_blocks)
        if self.region is not None:  # the head's own stretch of the pool, block after block
            preferred = self.region.ravel()[owner] + col
        else:  # the block after the head's last one, if it is free
            preferred = np.where(col > 0, table[owner, np.maximum(col - 1, 0)] + 1, -1)
        table[owner, col] = self.pool.allocate(n, preferred)
        self._held[:] = need

    def append(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """add(k, v, q), then every kept token decoded: K, V (B, H_kv, n, D) (the Store interface of cache/base.py)."""
        self.add(k, v, q)
        return self.read()

    def keep(self, sel: torch.Tensor, state: State, turn: Turn | None = None) -> State:
        """Compact every head to the tokens `sel` names: (B, H_kv, n_keep) sorted slots, as many per head, or a
        (B, H_kv, L) boolean mask over read()'s view, a number per head (KV-Compress). Each head's kept tokens move
        to its first slots in order, the blocks past its last one go back to the pool, and the policy's per-token
        state is gathered the same way. Codes are moved as stored, never decoded; with `turn` (StreamingLLM's
        keys, stored rotated at their slot), each key that moves is decoded, turned by the slots it moved
        (`turn(keys (n, D), by (n,))`, by < 0) and stored again. (The serving engine compacts a few rows of every
        layer at once: serving/kvcompress.py, `compact`.)"""
        if sel.dtype == torch.bool:
            mask = sel.cpu().numpy()  # (B, H_kv, L)
            if mask.shape[-1] < self._lengths.max():  # the slots past the mask would be dropped unasked
                raise ValueError(f"keep: the mask covers {mask.shape[-1]} slots, but a head holds "
                                 f"{self._lengths.max()} tokens; give every slot a head holds a True or False")
            src, dst, by = compaction(self._tables, mask, self.pool.block_tokens)  # (n,) each
            n_keep = mask.sum(axis=-1)  # (B, H_kv)
        else:  # the i-th slot named goes to slot i
            slots = sel.cpu().numpy()  # (B, H_kv, n_keep)
            if slots.shape[-1] and (slots[..., -1] >= self._lengths).any():  # would read slots past a head's end
                raise ValueError(f"keep: a head's last kept slot must be below the {self._lengths.min()} tokens "
                                 f"it holds; select sorted slots among each head's own tokens")
            to = np.arange(slots.shape[-1])  # (n_keep,): the same slots for every head
            src, dst, by = self._places(slots), self._places(to), to - slots  # (B, H_kv, n_keep) each
            n_keep = np.full(slots.shape[:2], slots.shape[-1])  # (B, H_kv)
        moved = src != dst  # tokens that stay put (untouched rows, heads) are not copied
        src, dst = (torch.from_numpy(a[moved]).to(self.pool.device) for a in (src, dst))  # (n,) each
        keys = None if turn is None else self.pool.read_rows(src, self.out_dtype)  # (n, D), read before the move
        self.pool.move(src, dst)
        if turn is not None:
            self.pool.write(dst, turn(keys, torch.from_numpy(by[moved]).to(keys.device)), None)
        self.truncate(n_keep)
        return gather_state(state, sel)

    def truncate(self, n_keep: np.ndarray, rows: np.ndarray | slice = slice(None)) -> None:
        """Each head of `rows` (indices; every row by default) holds its first n_keep (len(rows), H_kv) tokens now
        (a compaction moved them there): the blocks past them go back to the pool."""
        need, held, tables = -(-n_keep // self.pool.block_tokens), self._held[rows], self._tables[rows]
        column = np.arange(tables.shape[2])  # (max_blocks,)
        self.pool.release(tables[(column >= need[:, :, None]) & (column < held[:, :, None])])  # held, not needed
        self._held[rows] = need
        self._lengths[rows] = n_keep
        self._point_next(rows)

    def _places(self, slots: np.ndarray, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Pool rows (b, H_kv, n) int64 of the given slots of every head of `rows` (indices; every row by default),
        slots (b, H_kv, n) or (n,) the same for all."""
        return host_rows(self._tables[rows], slots, self.pool.block_tokens)

    def due(self, budget: int, added: int | None = None) -> np.ndarray:
        """(B,) the rows whose step fills a block past `budget`, an evicting policy's turn to select: tokens per head
        before the step (ragged heads: their mean) plus the row's new ones (`added`, if all add as many), as alone."""
        counts, bt = self.token_counts(), self.pool.block_tokens
        if added is None:
            return counts.sum(axis=1) // counts.shape[1] + self.rows.new.cpu().numpy() >= budget + bt
        return counts.sum(axis=1) >= (budget + bt - added) * counts.shape[1]  # the same in integers, no division

    def place_state(self, state: State, new: State) -> State:
        """A policy's per-token state after this step's add(), laid out like read()'s view: each head's old entries,
        then the new tokens' (`new`: (B, H_kv, T) each, at least one), zero past its length."""
        counts, added = self.token_counts(), self.rows.new.cpu().numpy()  # (B, H_kv) after the step, (B,)
        T = max(t.shape[-1] for t in new.values())
        if (counts == counts.flat[0]).all() and (added == T).all():  # level, no padding: the new entries go last
            return append_entries(state, new)
        B, H_kv = counts.shape
        b, h, i = np.nonzero(np.arange(T) < added[:, None, None].repeat(H_kv, axis=1))  # every real new token
        at = torch.from_numpy(counts[b, h] - added[b] + i)  # (n,): its slot
        placed = {}
        for name, t in new.items():
            placed[name] = t.new_zeros(B, H_kv, int(counts.max()))  # (B, H_kv, L)
            if name in state:
                placed[name][..., : state[name].shape[-1]] = state[name]
            placed[name][b, h, at] = t[b, h, i]
        return placed

    def token_counts(self) -> np.ndarray:
        """(B, H_kv) tokens each head holds: its length in blocks (cache/residual.py adds a residual)."""
        return self._lengths

    def padding(self) -> torch.Tensor | None:
        """(B, H_kv, L) True past each head's length in read()'s view, None when every head holds as many."""
        counts = self.token_counts()
        if (counts == counts.flat[0]).all():
            return None
        lengths = torch.from_numpy(counts).to(self.pool.device, torch.long)
        return torch.arange(int(counts.max()), device=self.pool.device) >= lengths.unsqueeze(-1)

    def visible(self, T: int) -> torch.Tensor | None:
        """(B, H_kv, T, L): whether this step's query i of each row and head may see slot j of read()'s view
        (j <= the tokens the head held before this step + i: causal per head, never past its length), or None
        when every row adds all T and every head held as many before (the causal mask says the same)."""
        new = self.rows.new.cpu().numpy()[:, None]  # (B, 1)
        counts = self.read_counts()
        old = counts - new  # (B, H_kv): tokens before this step's
        if (new == T).all() and (old == old.flat[0]).all():
            return None
        device = self.pool.device
        i = torch.arange(T, device=device).view(T, 1)  # (T, 1): query i
        j = torch.arange(int(counts.max()), device=device)  # (L,): key slot j
        return j <= torch.from_numpy(old).to(device).view(*old.shape, 1, 1) + i  # (B, H_kv, T, L)

    def read(self, values: bool = True) -> tuple[torch.Tensor, ...]:
        """Every (b, h)'s tokens this step reads, decoded, K, V (B, H_kv, L, D), zero past each length; K alone
        without `values`."""
        tables, lengths = (torch.from_numpy(a).to(self.pool.device) for a in self.read_view())
        return self.pool.read(tables, lengths, self.out_dtype, values)

    def attend_gathered(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Backend) -> torch.Tensor:
        """Attend q (B, H, T, D) over each head's old tokens and the step's new ones (k, v), each row only its own
        keys: straight over k, v when nothing was stored before (a first prefill) in a codec that changes no bit,
        else over a gathered, decoded copy. A rectangular step (every head the same length) attends with the
        model's backend; a ragged one with SDPA and a mask (toymodel.attention.masked_attend)."""
        first = self.tokens_stored() == int(self.rows.new.sum()) * self._lengths.shape[1]  # nothing stored before
        K, V = (k, v) if first and self.pool.codec.exact else self.read()  # attention sees the tokens as stored
        visible = self.visible(q.shape[2])  # None: rectangular, plain causal
        if visible is None:
            return backend.attend(q, K, V, causal=True)
        return masked_attend(q, K, V, visible)  # a real query never sees padding (a padding query's output is unused)

    def free(self) -> None:
        """Hand every block back to the pool; the store is empty after."""
        self.pool.release(self._tables[self._held_mask()])
        self._lengths[:] = 0
        self._held[:] = 0
        self._next[:] = 0
        self.view = None

    def tokens_stored(self) -> int:
        """Tokens summed over batch and KV heads."""
        return int(self._lengths.sum())

    def blocks_held(self) -> int:
        return int(self._held.sum())

    def tensors(self) -> list[torch.Tensor]:
        """A view of every block this layer holds (slack included), then its tables and lengths (and the chooser's
        tensors)."""
        chooser = [] if self.chooser is None else self.chooser.tensors()
        return self.pool.block_views(self.block_ids()) + [self.tables, self.lengths, self.held] + chooser

    def block_ids(self) -> np.ndarray:
        """(n,) every block this layer holds."""
        return self._tables[self._held_mask()]

    def kernel_args(self) -> tuple:
        """What a paged decode kernel reads: the pool's K and V payloads, the block tables and the lengths (this
        step's view, when a chooser picked the blocks)."""
        tables, lengths = (torch.from_numpy(a) for a in self.read_view())
        return self.pool.k, self.pool.v, self.pool.frame_tables(tables, lengths), lengths

    def _held_mask(self) -> np.ndarray:
        """(B, H_kv, max_blocks) True at the table entries that name a held block."""
        return np.arange(self._tables.shape[2]) < self._held[:, :, None]
