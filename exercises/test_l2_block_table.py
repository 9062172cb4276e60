"""Checks exercises/l2_block_table.py against the library's lookup (cache.pool.pool_rows), on random block tables
and on a real cache: the rows you find hold the tokens the cache reads back."""

import pytest
import torch

from cache.pool import pool_rows as library_rows
from cache.presets import PRESETS, build_cache
from conftest import load
from dataclasses import replace
from toymodel.config import ModelConfig
from toymodel.model import Transformer

pool_rows = load("l2_block_table").pool_rows


@pytest.mark.parametrize("B, H_kv, max_blocks, n, block_tokens", [(1, 1, 3, 5, 4), (2, 3, 6, 20, 4),
                                                                   (3, 2, 4, 16, 16), (1, 2, 10, 9, 1)])
def test_you_find_the_rows_the_library_finds(B, H_kv, max_blocks, n, block_tokens):
    g = torch.Generator().manual_seed(B + n)
    tables = torch.randperm(B * H_kv * max_blocks, generator=g).view(B, H_kv, max_blocks).int()
    slots = torch.randint(0, max_blocks * block_tokens, (B, H_kv, n), generator=g)
    got, want = pool_rows(tables, slots, block_tokens), library_rows(tables, slots, block_tokens)
    assert got.shape == want.shape, f"expected rows of shape {tuple(want.shape)}, got {tuple(got.shape)}"
    bad = (got != want).nonzero()
    if len(bad):
        b, h, i = bad[0].tolist()
        s = slots[b, h, i].item()
        raise AssertionError(f"head ({b}, {h}), slot {s}: you gave row {got[b, h, i].item()}, but the slot is offset "
                             f"{s % block_tokens} of its table's block {s // block_tokens} = block "
                             f"{tables[b, h, s // block_tokens].item()}, i.e. row {want[b, h, i].item()}")


def test_your_rows_hold_the_tokens_the_cache_reads_back():
    config = ModelConfig(vocab_size=97, n_layer=1, n_head=4, n_kv_head=2, d_model=32, block_size=64)
    cache = build_cache(replace(PRESETS["full"], block_tokens=4), config, 2, torch.device("cpu"), torch.float32)
    with torch.no_grad():  # rows of 11 and 6 tokens, in blocks of 4
        Transformer(config).eval()(torch.randint(0, 97, (2, 11)), cache, lengths=torch.tensor([11, 6]))
    store = cache.layers[0].store
    slots = torch.arange(6).expand(2, 2, 6)  # the first 6 tokens of every head
    rows = pool_rows(store.tables, slots, 4)
    keys = store.pool.k.view(-1, store.pool.k.shape[-1])[rows]  # (B, H_kv, 6, D)
    assert torch.equal(keys, store.read()[0][:, :, :6]), "the rows you found do not hold the cache's keys"
