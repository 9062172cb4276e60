"""KIVI and GEAR in the block pool: whole blocks of encoded tokens, and each head's full-precision residual beside them.

KIVI (cache/codecs.py) quantizes keys per channel over groups of G tokens, values per token, and keeps the most
recent tokens in full precision until R of them have gathered; then all R are quantized at once (the residual
rule). GEAR (cache/gear.py) does the same with chunks of n_b = R tokens, each with its own low-rank factors and
outliers. In the pool R is a whole number of blocks and a block a whole number of encoding units (KIVI's key
groups, GEAR's one chunk), so a flush fills blocks exactly and no block is ever partly filled:

    (b, h):   [ block | block | block | block ] [ residual: seen % R tokens, full precision ]
              R tokens flushed at once = R / bt whole blocks (KIVI: bt / G key groups each; GEAR: bt = R)

A row holds `seen - seen % R` encoded tokens and `seen % R` residual ones, the same split as the codec's
contiguous store, so both encode the same groups to the same codes. The residual is a (B, H_kv, R, D) buffer in
the model's dtype, the codec's capacity of full-precision tokens per head; the decode kernels read KIVI's blocks
and then the residual as each head's tail (the `tail` of cpu_decode_paged and triton_decode_paged); GEAR's blocks
are decoded, then attended.
Neither evicts (cache/presets.py refuses them with a policy), so every head of a row holds as many tokens.

Shapes: B batch, H_kv KV heads, T new tokens (right-padded, `Rows.new` real per row), D head_dim, R residual,
bt block_tokens.
"""

import numpy as np
import torch

from cache.base import State
from cache.blocks import PagedStore
from cache.codecs import take_blocks
from cache.model_cache import Rows
from cache.pool import BlockPool


class ResidualPagedStore(PagedStore):
    """A PagedStore whose newest tokens wait in a full-precision residual until R of them are flushed as blocks."""

    def __init__(self, pool: BlockPool, rows: Rows, n_kv_head: int, out_dtype: torch.dtype,
                 region: np.ndarray | None = None):
        super().__init__(pool, rows, n_kv_head, out_dtype, region)
        self.R = pool.codec.residual
        B = rows.seen.shape[0]
        self.k_res, self.v_res = (torch.zeros(B, n_kv_head, self.R, pool.head_dim, device=pool.device,
                                              dtype=out_dtype) for _ in range(2))  # (B, H_kv, R, D) each
        self._set_residual(np.zeros((B, n_kv_head), dtype=np.int32))  # (B, H_kv) residual tokens of each head

    def _set_residual(self, counts: np.ndarray) -> None:
        self._res, self.res_lengths = counts, torch.from_numpy(counts)

    def token_counts(self) -> np.ndarray:
        return self._lengths + self._res

    def tokens_stored(self) -> int:
        return int(self.token_counts().sum())

    def _add(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Each row's real new tokens of k, v (B, H_kv, T, D) join its residual; the rows whose residual reaches R
        flush whole multiples of R tokens, oldest first, into new blocks."""
        B, H_kv, T, D = k.shape
        if T == 1:  # a decode step: one token per row into the residual, in place
            row = torch.arange(B, device=k.device)
            slot = torch.from_numpy(self._res[:, 0]).to(k.device, torch.long)  # (B,): a row's heads hold as many
            self.k_res[row, :, slot], self.v_res[row, :, slot] = k[:, :, 0], v[:, :, 0]  # (B, H_kv, D) each
            self._res += 1
            full = np.flatnonzero(self._res[:, 0] == self.R)
            if full.size:  # once per R steps for a level batch
                index = torch.from_numpy(full).to(k.device)
                self._flush(full, self.k_res[index], self.v_res[index])
                self._res[full] = 0
            return
        new = self.new_tokens(T).tolist()  # (B,) real tokens per row
        pending = [(torch.cat([self.k_res[b, :, : self._res[b, 0]], k[b, :, :n]], dim=1),  # (H_kv, res + n, D)
                    torch.cat([self.v_res[b, :, : self._res[b, 0]], v[b, :, :n]], dim=1)) for b, n in enumerate(new)]
        count = np.array([pk.shape[1] for pk, _ in pending])  # (B,)
        flushed = count // self.R * self.R
        rows = np.flatnonzero(flushed)
        if rows.size:
            width = int(flushed.max())  # rows flushing fewer tokens are padded; their padding is never written
            k_out, v_out = (torch.zeros(rows.size, H_kv, width, D, device=k.device, dtype=k.dtype) for _ in range(2))
            for i, b in enumerate(rows):
                k_out[i, :, : flushed[b]], v_out[i, :, : flushed[b]] = (p[:, : flushed[b]] for p in pending[b])
            self._flush(rows, k_out, v_out, flushed[rows])
        for b, (pk, pv) in enumerate(pending):
            rest = int(count[b] - flushed[b])
            self.k_res[b, :, :rest], self.v_res[b, :, :rest] = pk[:, flushed[b]:], pv[:, flushed[b]:]
            self._res[b] = rest

    def _flush(self, rows: np.ndarray, k: torch.Tensor, v: torch.Tensor, counts: np.ndarray | None = None) -> None:
        """Encode k, v (n, H_kv, W, D), the oldest `counts` (n,) tokens of each given row (None: all W; a multiple
        of R), into new blocks of those rows (the callers take them out of the residual)."""
        n, H_kv, W, D = k.shape
        bt = self.pool.block_tokens
        counts = np.full(n, W) if counts is None else counts
        old = self._held[rows].copy()  # (n, H_kv) blocks before
        need = self._held.copy()
        need[rows] += (counts // bt)[:, None]
        self._allocate(need)
        taken = np.arange(W // bt) < (counts // bt)[:, None]  # (n, W / bt): the blocks each row fills
        cols = np.minimum(old[:, :, None] + np.arange(W // bt), self._tables.shape[2] - 1)  # (n, H_kv, W / bt)
        ids = self._tables[rows[:, None, None], np.arange(H_kv)[None, :, None], cols]  # (n, H_kv, W / bt)
        ids = ids.transpose(0, 2, 1)[taken].reshape(-1)  # (blocks,) in (row, block, head) order
        mask = torch.from_numpy(taken).to(k.device)
        blocks = [x.view(n, H_kv, W // bt, bt, D).transpose(1, 2)[mask].reshape(-1, 1, bt, D)
                  for x in (k, v)]  # (blocks, 1, bt, D) each, in the same order
        self.pool.write_blocks(torch.from_numpy(ids.astype(np.int64)).to(k.device), *blocks)
        self._lengths[rows] += counts[:, None].astype(np.int32)

    def read_counts(self) -> np.ndarray:
        """(B, H_kv) tokens this step reads per head: its blocks (or the chosen ones), then its residual."""
        return self.read_view()[1] + self._res

    def read(self, values: bool = True) -> tuple[torch.Tensor, ...]:
        """Every (b, h)'s tokens this step reads, decoded, blocks then residual: K, V (B, H_kv, L, D), zero past each
        head's tokens; K alone without `values`. Blocks are decoded whole (an encoding unit spans tokens)."""
        tables, lengths = self.read_view()
        counts = self.read_counts()
        B, H_kv = counts.shape
        bt, D = self.pool.block_tokens, self.pool.head_dim
        n = -(-int(lengths.max()) // bt)  # blocks of the longest head
        ids = self.pool.frame_tables(torch.from_numpy(tables[:, :, :n]), torch.from_numpy(lengths))
        ids = ids.to(self.pool.device, torch.long)
        stale = torch.arange(n * bt, device=self.pool.device) >= torch.from_numpy(lengths).to(
            self.pool.device).unsqueeze(-1)  # (B, H_kv, n * bt): table entries past a head's blocks
        b, h, i = np.nonzero(np.arange(self.R) < self._res[:, :, None])  # (m,) each: every residual token
        at = lengths[b, h] + i  # (m,): its slot after the head's blocks
        out = []
        parts = ((self.pool.k, self.pool.codec.key, self.k_res), (self.pool.v, self.pool.codec.value, self.v_res))
        for pool, tc, res in parts[: 2 if values else 1]:
            full = res.new_zeros(B, H_kv, int(counts.max()), D)  # (B, H_kv, L, D)
            if n:
                blocks = tc.decode(take_blocks(pool, ids.view(-1)), self.out_dtype)  # (B * H_kv * n, 1, bt, D)
                blocks = blocks.view(B, H_kv, n * bt, D).masked_fill(stale.unsqueeze(-1), 0.0)
                full[:, :, : n * bt] = blocks
            full[b, h, at] = res[b, h, i]
            out.append(full)
        return tuple(out)

    def kernel_args(self) -> tuple:
        """The pool's payloads, the tables and lengths of the blocks, and the residual as each head's tail."""
        return (*super().kernel_args(), (self.k_res, self.v_res, self.res_lengths))

    def row_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """Per row (B,): the blocks it holds, and the blocks its next decode step takes (R / bt per head when the
        step fills the residual)."""
        flushes = self._res == self.R - 1  # (B, H_kv)
        return self._held.sum(axis=1), (flushes * (self.R // self.pool.block_tokens)).sum(axis=1)

    def extend(self, other: "ResidualPagedStore", state: State, other_state: State) -> State:
        state = super().extend(other, state, other_state)
        self.k_res, self.v_res = torch.cat([self.k_res, other.k_res]), torch.cat([self.v_res, other.v_res])
        self._set_residual(np.concatenate([self._res, other._res]))
        return state

    def drop_rows(self, keep: np.ndarray, state: State) -> State:
        state = super().drop_rows(keep, state)
        index = torch.from_numpy(keep).to(self.k_res.device)
        self.k_res, self.v_res = self.k_res[index], self.v_res[index]
        self._set_residual(self._res[keep])
        return state

    @property
    def prefix_unit(self) -> int:
        """Blocks of one flush: a prefix that ends elsewhere would leave other tokens in the residual."""
        return self.R // self.pool.block_tokens

    def adopt(self, blocks: np.ndarray, hold: bool = True) -> None:
        """PagedStore.adopt, of whole flushes only (blocks (B, H_kv, n), n a multiple of prefix_unit)."""
        if blocks.shape[-1] % self.prefix_unit:
            raise ValueError(f"a KIVI or GEAR cache adopts whole flushes of its residual ({self.prefix_unit} blocks "
                             f"each), not {blocks.shape[-1]} blocks: which tokens wait in full precision depends on "
                             f"where a prompt ends, so another prefix would change the output")
        super().adopt(blocks, hold)

    def keep(self, sel: torch.Tensor, state: State) -> State:
        raise ValueError("a KIVI or GEAR cache cannot evict: its encoded groups and chunks span tokens")

    def free(self) -> None:
        super().free()
        self._res[:] = 0

    def tensors(self) -> list[torch.Tensor]:
        """The blocks held and their tables, then the residual buffers and their counts."""
        return super().tensors() + [self.k_res, self.v_res, self.res_lengths]
