"""Lesson 4, exercise: the online-softmax update at the heart of FlashAttention (about 25 minutes).

FlashAttention never holds a query's whole row of scores: it reads keys a block at a time and keeps, per query, a
running maximum m, a running sum l of exp(score - m), and a running weighted sum acc of values. Read the online
softmax section of docs/04_flash_attention.md, then fill in `update` and run
`pytest exercises/test_l4_online_softmax.py`.
"""

import torch


def update(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, scores: torch.Tensor,
           v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one block of keys into the running state of M queries.

    Args:
        m: (M,) the largest score seen so far per query (-inf before the first block).
        l: (M,) sum of exp(score - m) over the keys seen so far.
        acc: (M, D) sum of exp(score - m) * v over the keys seen so far.
        scores: (M, N) this block's scores (already scaled), N keys.
        v: (N, D) this block's values.

    Returns:
        The new (m, l, acc). After the last block, acc / l[:, None] is softmax(all scores) @ all values.
    """
    raise NotImplementedError("write update(): a new max, rescale the old sums by exp(m_old - m_new), add the block")
