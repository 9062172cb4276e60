"""Retrieval mode, InfLLM-style (Xiao et al. 2024): a decode step reads only the blocks that matter for its query.

Each full block of the cache's pool (cache/blocks.py: one KV head's) keeps `rep_keys` representative keys, its
keys of largest L2 norm.
Why norm: a key's logit is bounded by |q| |k|, so the keys that can dominate a block's attention are among its
longest ones, and choosing them needs no attention statistics (InfLLM picks the keys that received the most
attention inside the block; norm is the cheap stand-in). With rep_keys == block_tokens every key represents.

A decode step scores every full block per KV head, aggregating the G query heads that share it:

    score(block) = max over its representatives r of  (sum_g q_g) . r       (the summed logit of the group)

and attends to the union of: the first `sink_blocks` blocks (attention sinks), the last `local_blocks` full
blocks plus the open block (the local window), and the `topk_blocks` best-scoring others. The step reads each
head's choice through a block table of its own (the store's `view`: the decode kernel reads it as any table), and
memhier's tiers bring in only the groups holding a chosen block (memhier/frames.py). Multi-token steps (prefill)
read every block, as exact mode does. When every block is chosen, retrieval *is* exact mode (same blocks, same
order, same bits), which the tests defend.

The same scores rank the groups for memhier.demotion=attention: a full tier demotes the group whose best block
this step's queries score lowest (memhier/store.py).

The query arrives through the cache seam: the model calls `layer_cache.attend(q, k, v, backend)`, the layer
cache stores through `store.add(k, v, q)` (cache/blocks.py), and the store hands q to `choose` before any block
is brought in; `stored` takes the representatives of the blocks that filled, while they are in frames.
"""

import numpy as np
import torch

from cache.blocks import PagedStore


def representatives(keys: torch.Tensor, r: int) -> torch.Tensor:
    """keys (B, H_kv, bt, D) of one block -> its r keys of largest L2 norm, per KV head: (B, H_kv, r, D)."""
    top = keys.float().norm(dim=-1).topk(r, dim=-1).indices  # (B, H_kv, r)
    return keys.gather(2, top.unsqueeze(-1).expand(*top.shape, keys.shape[-1]))  # (B, H_kv, r, D)


def block_scores(reps: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """reps (B, H_kv, n, r, D), q (B, H, 1, D) -> (B, H_kv, n): each block's best summed logit for the group."""
    B, H_kv = reps.shape[:2]
    q_group = q.view(B, H_kv, -1, q.shape[-1]).float().sum(dim=2)  # (B, H_kv, D): the G query heads, summed
    return torch.einsum("bhnrd,bhd->bhnr", reps.float(), q_group).amax(dim=-1)  # (B, H_kv, n)


class Retriever:
    """One layer's representative keys per full block, and each decode step's choice (a Chooser of cache/blocks.py):
    with `retrieve`, the blocks the step reads; with `rank`, the rank of each group of blocks for demotion."""

    def __init__(self, topk_blocks: int, sink_blocks: int, local_blocks: int, rep_keys: int, retrieve: bool = True,
                 rank: bool = False):
        self.topk, self.sink, self.local, self.r = topk_blocks, sink_blocks, local_blocks, rep_keys
        self.retrieve, self.rank = retrieve, rank
        self.reps: torch.Tensor | None = None  # (B, H_kv, capacity, r, D): each full block's, by table column
        self.done: np.ndarray | None = None  # (B, H_kv): the full blocks whose representatives are in reps

    def stored(self, store: PagedStore) -> None:
        """Take the representatives of the blocks that filled in this step (in frames: they were just written)."""
        full = store.lengths.numpy() // store.pool.block_tokens  # (B, H_kv)
        done = np.zeros_like(full) if self.done is None else self.done
        if done.shape != full.shape:
            raise ValueError("retrieval keeps representatives for one batch: rows cannot join or leave a cache "
                             "with memhier.mode=retrieval or demotion=attention")
        new = full - done
        if new.any():
            b, h, c = np.nonzero(np.arange(int(new.max())) < new[:, :, None])  # (n,) each: every new full block
            col = done[b, h] + c
            keys = store.pool.read_keys(torch.from_numpy(store.tables.numpy()[b, h, col]), store.out_dtype)
            reps = representatives(keys, self.r)[:, 0]  # (n, r, D)
            self._fit(*full.shape, int(full.max()), reps)
            self.reps[b, h, col] = reps
        self.done = full

    def _fit(self, B: int, H_kv: int, n: int, like: torch.Tensor) -> None:
        """Room for n blocks' representatives per head (doubling)."""
        if self.reps is not None and self.reps.shape[2] >= n:
            return
        grown = like.new_zeros(B, H_kv, max(n, 2 * (0 if self.reps is None else self.reps.shape[2])), *like.shape[1:])
        if self.reps is not None:
            grown[:, :, : self.reps.shape[2]] = self.reps
        self.reps = grown

    def choose(self, store: PagedStore, q: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
        """q (B, H, 1, D): a decode step's rotated queries, before its token is stored -> (B, H_kv, m) the full
        blocks' columns each KV head reads, sorted, and (B, H_kv) how many count (a head with fewer than m full
        blocks reads them all); None: every block (retrieval off, or too few blocks to leave any out)."""
        full = torch.from_numpy(store.lengths.numpy() // store.pool.block_tokens).long()  # (B, H_kv)
        W, m = int(full.max()), self.sink + self.local + self.topk
        choosing = self.retrieve and W > m  # else every block is read
        if W == 0 or not (choosing or self.rank):
            return None
        scores = block_scores(self.reps[:, :, :W], q).cpu()  # (B, H_kv, W)
        col = torch.arange(W)
        real = col < full.unsqueeze(-1)  # (B, H_kv, W): a full block of the head
        if self.rank:
            self._rank(store, scores, real)
        if not choosing:
            return None
        always = (col < self.sink) | (col >= full.unsqueeze(-1) - self.local)  # sinks and the local window
        scores = scores.masked_fill(always, torch.inf).masked_fill(~real, -torch.inf)
        n = full.clamp(max=m)  # (B, H_kv)
        top = scores.topk(m, dim=-1).indices  # (B, H_kv, m): the always-read first, then the best, then no block
        top = top.masked_fill(torch.arange(m) >= n.unsqueeze(-1), W).sort(dim=-1).values  # in token order
        return top.numpy(), n.numpy()

    def _rank(self, store: PagedStore, scores: torch.Tensor, real: torch.Tensor) -> None:
        """Rank each group holding a full block of this layer by its best block's score (memhier/store.py demotes
        the lowest first), before any group is brought in."""
        ids = torch.from_numpy(store.tables.numpy()[:, :, : scores.shape[-1]]).long()[real]  # (n,)
        groups = torch.from_numpy(store.pool.group)[ids]  # (n,)
        best = torch.full((int(groups.max()) + 1,), -torch.inf).scatter_reduce(0, groups, scores[real], "amax")
        store.pool.store.rank({(g,): float(best[g]) for g in groups.unique().tolist()})

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.reps is None else [self.reps]
