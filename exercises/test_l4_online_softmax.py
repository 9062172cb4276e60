"""Checks exercises/l4_online_softmax.py: attention computed a block of keys at a time with your update equals the
library's reference attention (toymodel.attention.reference_attend) over all the keys at once."""

import math

import pytest
import torch

from conftest import load
from toymodel.attention import reference_attend

update = load("l4_online_softmax").update


def blockwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int) -> torch.Tensor:
    """q (M, D), k and v (N, D) -> (M, D), folding `block` keys at a time into the running state."""
    M, D = q.shape
    m, l, acc = torch.full((M,), -math.inf), torch.zeros(M), torch.zeros(M, D)
    for start in range(0, k.shape[0], block):
        scores = q @ k[start : start + block].T / math.sqrt(D)  # (M, block)
        m, l, acc = update(m, l, acc, scores, v[start : start + block])
    return acc / l[:, None]


@pytest.mark.parametrize("M, N, D, block", [(1, 8, 4, 8), (4, 100, 16, 16), (3, 37, 8, 5), (2, 64, 32, 1)])
def test_block_by_block_equals_all_at_once(M, N, D, block):
    g = torch.Generator().manual_seed(M * N + block)
    q, k, v = torch.randn(M, D, generator=g), torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    want = reference_attend(q[None, None], k[None, None], v[None, None], causal=False)[0, 0]  # (M, D)
    got = blockwise(q, k, v, block)
    assert got.shape == want.shape, f"expected ({M}, {D}) outputs, got {tuple(got.shape)}"
    err = (got - want).abs().max().item()
    assert err < 1e-5, (f"off by {err:.2e} with blocks of {block} keys: do you rescale the old l and acc by "
                        f"exp(m_old - m_new) before adding the block's exp(scores - m_new)?")


def test_huge_scores_do_not_overflow():
    """Scores near 1,000 overflow exp() unless the running maximum is subtracted first."""
    q, k, v = torch.full((1, 4), 30.0), torch.full((12, 4), 30.0), torch.randn(12, 4)
    k[5] = 31.0  # one key scores a bit higher than the others
    got = blockwise(q, k, v, 4)
    assert torch.isfinite(got).all(), "exp(score) overflowed: subtract the running maximum before exponentiating"
    want = reference_attend(q[None, None], k[None, None], v[None, None], causal=False)[0, 0]
    assert (got - want).abs().max().item() < 1e-4, "the result differs from the reference with large scores"
