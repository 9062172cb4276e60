"""Checks exercises/l2_select.py against the library's own choice (cache.base.Policy.select) on random scores."""

import pytest
import torch

from cache.base import Policy, Step
from conftest import load

select = load("l2_select").select


class Given(Policy):
    """A policy whose scores are given: the library's select() then decides as it does for every policy."""

    def __init__(self, scores: torch.Tensor, budget: int, sink: int, window: int):
        self.scores, self.budget, self.sink, self.window = scores, budget, sink, window

    def score(self, step: Step) -> torch.Tensor:
        return self.scores


def library_choice(scores: torch.Tensor, budget: int, sink: int, window: int) -> torch.Tensor | None:
    B, H_kv, n = scores.shape
    return Given(scores, budget, sink, window).select(Step((B, H_kv, n), scores.device, None, {}, None))


@pytest.mark.parametrize("B, H_kv, n, budget, sink, window", [(1, 1, 10, 4, 0, 0), (2, 3, 33, 12, 2, 4),
                                                             (1, 2, 100, 16, 4, 12), (3, 1, 7, 6, 1, 1)])
def test_you_keep_what_the_library_keeps(B, H_kv, n, budget, sink, window):
    for seed in range(5):
        scores = torch.randn(B, H_kv, n, generator=torch.Generator().manual_seed(seed))
        want, got = library_choice(scores, budget, sink, window), select(scores, budget, sink, window)
        assert got is not None, f"n={n} > budget={budget}: some tokens must go, but select returned None"
        assert got.shape == (B, H_kv, budget), f"expected indices of shape {(B, H_kv, budget)}, got {tuple(got.shape)}"
        assert torch.equal(got, got.sort(dim=-1).values), "the kept indices must be in increasing token order"
        missing = set(want.flatten().tolist()) - set(got.flatten().tolist())
        assert torch.equal(got, want), (f"you keep other tokens than the library (e.g. it keeps {sorted(missing)[:5]});"
                                        f" are the first {sink} and last {window} always kept, then the best scores?")


def test_nothing_is_evicted_while_everything_fits():
    scores = torch.randn(2, 2, 8)
    assert select(scores, budget=8, sink=1, window=1) is None, "n == budget: nothing to evict, return None"
    assert select(scores, budget=20, sink=1, window=1) is None, "n < budget: nothing to evict, return None"


def test_the_sink_and_the_window_survive_even_with_the_lowest_scores():
    scores = torch.arange(20.0).flip(0).view(1, 1, 20)  # the first tokens score highest...
    scores[..., :2] = -100.0  # ...but the sink scores lowest
    scores[..., -3:] = -100.0  # and so does the window
    kept = select(scores, budget=8, sink=2, window=3)[0, 0].tolist()
    assert kept[:2] == [0, 1], f"the sink (tokens 0, 1) must be kept whatever their scores; you kept {kept}"
    assert kept[-3:] == [17, 18, 19], f"the window (tokens 17-19) must be kept whatever their scores; you kept {kept}"
