"""Lesson 2, exercise: find where a token lies in the block pool. The reference solution."""

import torch


def pool_rows(tables: torch.Tensor, slots: torch.Tensor, block_tokens: int) -> torch.Tensor:
    """Where each slot of each head lies in the pool: (B, H_kv, n) int64 rows (see exercises/l2_block_table.py)."""
    block = tables.gather(2, (slots // block_tokens).long())  # (B, H_kv, n): the block holding each slot
    return block.long() * block_tokens + slots % block_tokens  # its first row, plus the offset inside it
