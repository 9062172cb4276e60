"""Shared pieces of the cache tests: a tiny random model (vocab 97, 2 layers, d_model 32, 4 query heads,
head_dim 8) and a way to run it through a cache in chunks."""

from typing import Callable

import pytest
import torch

from cache.model_cache import ModelCache
from toymodel.config import ModelConfig
from toymodel.model import Transformer


def tiny_config(n_kv_head: int) -> ModelConfig:
    return ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=32, block_size=64)


@pytest.fixture(autouse=True)
def _one_thread(one_thread) -> None:
    """Every cache test runs on one thread (tests/conftest.py)."""


@pytest.fixture
def make_model() -> Callable[..., Transformer]:
    def make(n_kv_head: int = 4, backend: str = "sdpa", seed: int = 0) -> Transformer:
        torch.manual_seed(seed)
        return Transformer(tiny_config(n_kv_head), backend=backend).eval()

    return make


@pytest.fixture
def run_chunks() -> Callable[[Transformer, torch.Tensor, ModelCache, list[int]], torch.Tensor]:
    """Feed idx (B, T) through the cache in chunks of the given sizes (the rest one token at a time) -> logits."""

    def run(model: Transformer, idx: torch.Tensor, cache: ModelCache, chunks: list[int]) -> torch.Tensor:
        sizes = chunks + [1] * (idx.shape[1] - sum(chunks))
        out, start = [], 0
        with torch.no_grad():
            for n in sizes:
                out.append(model(idx[:, start : start + n], cache))  # (B, n, vocab)
                start += n
        return torch.cat(out, dim=1)  # (B, T, vocab)

    return run
