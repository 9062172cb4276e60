"""Retrieval mode, InfLLM-style (Xiao et al. 2024): a decode step reads only the blocks that matter for its query.

Each sealed block keeps `rep_keys` representative keys: the keys of largest L2 norm in the block, per KV head.
Why norm: a key's logit is bounded by |q| |k|, so the keys that can dominate a block's attention are among its
longest ones, and choosing them needs no attention statistics (InfLLM picks the keys that received the most
attention inside the block; norm is the cheap stand-in). With rep_keys == block_tokens every key represents.

A decode step scores every sealed block per KV head, aggregating the G query heads that share it:

    score(block) = max over its representatives r of  (sum_g q_g) . r       (the summed logit of the group)

and attends to the union of: the first `sink_blocks` blocks (attention sinks), the last `local_blocks` sealed
blocks plus the open block (the local window), and the `topk_blocks` best-scoring others. Only those blocks are
fetched from the tiers (the union over batch rows and KV heads); each KV head then gathers its own choice.
Multi-token steps (prefill) read every block, as exact mode does. When every block is chosen, retrieval *is*
exact mode (same blocks, same order, same bits), which the tests defend.

The query arrives through the cache seam: the model calls `layer_cache.attend(q, k, v, backend)`, the layer
cache stores through `store.append(k, v, q)` (memhier/layer.py), and the store hands q to `choose`.
"""

import torch


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
    """One layer's representative keys, and its choice of blocks for a decode step."""

    def __init__(self, topk_blocks: int, sink_blocks: int, local_blocks: int, rep_keys: int):
        self.topk, self.sink, self.local, self.r = topk_blocks, sink_blocks, local_blocks, rep_keys
        self.reps: torch.Tensor | None = None  # (B, H_kv, n_blocks, r, D), model dtype, on the device

    def add(self, keys: torch.Tensor) -> None:
        """keys (B, H_kv, bt, D): a newly stored block's keys, decoded."""
        new = representatives(keys, self.r).unsqueeze(2)  # (B, H_kv, 1, r, D)
        self.reps = new if self.reps is None else torch.cat([self.reps, new], dim=2)

    def choose(self, n_blocks: int, q: torch.Tensor) -> torch.Tensor | None:
        """q (B, H, T, D): this step's rotated queries -> (B, H_kv, m) sorted block indices each KV head reads this
        step, or None: every block (prefill, or too few blocks to leave any out)."""
        m = self.sink + self.local + self.topk
        if q.shape[2] > 1 or n_blocks <= m:
            return None
        scores = block_scores(self.reps[:, :, :n_blocks], q)  # (B, H_kv, n): not this step's new blocks
        block = torch.arange(n_blocks, device=scores.device)
        always = (block < self.sink) | (block >= n_blocks - self.local)  # (n,): sinks and the local window
        scores = scores.masked_fill(always, torch.inf)
        return scores.topk(m, dim=-1).indices.sort(dim=-1).values  # (B, H_kv, m), in token order

    def ranks(self, n_blocks: int, q: torch.Tensor) -> torch.Tensor:
        """(n,) how much this step's queries q (B, H, 1, D) want each of the first n blocks: the best
        representative logit of the most interested batch row and KV head (memhier.demotion=attention demotes the
        lowest first)."""
        return block_scores(self.reps[:, :, :n_blocks], q).amax(dim=(0, 1))

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.reps is None else [self.reps]
