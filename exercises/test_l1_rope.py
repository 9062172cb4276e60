"""Checks exercises/l1_rope.py against the library's RoPE (toymodel.rope), and the property RoPE exists for."""

import pytest
import torch

from conftest import load
from toymodel.rope import apply_rope, rope_cos_sin

rope = load("l1_rope").rope


@pytest.mark.parametrize("B, H, T, D", [(1, 1, 1, 2), (2, 3, 7, 8), (1, 4, 16, 64)])
def test_you_rotate_as_the_library_does(B, H, T, D):
    g = torch.Generator().manual_seed(T + D)
    x = torch.randn(B, H, T, D, generator=g)
    positions = torch.randint(0, 1000, (T,), generator=g)
    want = apply_rope(x, *rope_cos_sin(positions, D, 10000.0))
    got = rope(x, positions)
    assert got.shape == x.shape, f"the rotated tensor must keep x's shape {tuple(x.shape)}, got {tuple(got.shape)}"
    err = (got - want).abs().max().item()
    assert err < 1e-4, (f"off by {err:.2e}: is channel j paired with j + D/2 (not j + 1), and pair j turned by "
                        f"position * theta ** (-2j / D)?")


def test_a_rotation_keeps_every_vector_length():
    x = torch.randn(1, 2, 5, 16)
    got = rope(x, torch.arange(5))
    assert torch.allclose(got.norm(dim=-1), x.norm(dim=-1), atol=1e-5), "a rotation must not change a vector's norm"


def test_scores_depend_only_on_the_distance_between_positions():
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)
    score = lambda pq, pk: (rope(q, torch.tensor([pq])) * rope(k, torch.tensor([pk]))).sum().item()  # noqa: E731
    assert score(10, 3) == pytest.approx(score(107, 100), abs=1e-4), "q.k must depend only on position differences"
