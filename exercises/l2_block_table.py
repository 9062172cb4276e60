"""Lesson 2, exercise: find where a token lies in the block pool (about 15 minutes).

A paged cache keeps each (sequence, KV head)'s tokens in fixed-size blocks scattered over one pool; a block table
per head lists its blocks in order. The decode kernels and every gather of the cache first turn a head's slot into
a row of the pool. Write that lookup. Read "The block pool" in docs/02_kv_cache.md first, then fill in `pool_rows`
and run `pytest exercises/test_l2_block_table.py`.
"""

import torch


def pool_rows(tables: torch.Tensor, slots: torch.Tensor, block_tokens: int) -> torch.Tensor:
    """Where each slot of each head lies in the pool.

    Args:
        tables: (B, H_kv, max_blocks) int block ids: tables[b, h, i] is the i-th block of head (b, h).
        slots: (B, H_kv, n) int slots of each head (slot 0 is the head's oldest token).
        block_tokens: tokens per block.

    Returns:
        (B, H_kv, n) int64 rows of the pool seen as (n_blocks * block_tokens) token rows: block b's tokens are
        rows b * block_tokens .. b * block_tokens + block_tokens - 1.
    """
    raise NotImplementedError("write pool_rows(): which block of the table holds the slot, and where inside it")
