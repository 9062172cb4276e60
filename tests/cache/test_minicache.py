"""MiniCache (cache/minicache.py): t = 0 or 1 restores one layer of a pair exactly, retained tokens come back
exactly, identical adjacent layers lose nothing, the bytes are the formula's and less than a full cache's, the first
layer's newest tokens are exact until the pair completes, the pairs follow the start layer, and bad knobs are named."""

import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from cache.minicache import MergedLayerStore, PairStore
from cache.model_cache import ModelCache
from cache.presets import PRESETS, build_cache
from cache.storage import BufferStore
from toymodel.attention import get_backend
from toymodel.config import ModelConfig

CPU = torch.device("cpu")
B, H_KV, D = 2, 2, 8
CONFIG = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=H_KV, d_model=32, block_size=64)  # head_dim 8
REFERENCE = get_backend("reference")


def pair_cache(**change) -> tuple[ModelCache, PairStore]:
    cache = build_cache(replace(PRESETS["minicache"], **change), CONFIG, B, CPU, torch.float32)
    return cache, cache.layers[0].store.pair


def feed(cache: ModelCache, xa: tuple, xb: tuple, chunks: list[int]) -> None:
    """Push the two layers' (k, v), (B, H_kv, T, D) each, through the pair's stores chunk by chunk, layer 0 first."""
    start = 0
    for n in chunks:
        for store, (k, v) in zip((cache.layers[0].store, cache.layers[1].store), (xa, xb)):
            store.append(k[:, :, start : start + n], v[:, :, start : start + n])
        start += n


def kv(T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H_KV, T, D, generator=g), torch.randn(B, H_KV, T, D, generator=g)


def near(x: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    """x plus a little noise: the next layer's K or V, nearly parallel."""
    return x + scale * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("t,side", [(0.0, 0), (1.0, 1)])
def test_t_zero_or_one_restores_that_layer(t, side):
    xa, xb = kv(20, 0), kv(20, 1)
    cache, pair = pair_cache(merge_t=t, merge_gamma=1.0)  # gamma 1: nothing retained, every token merged
    feed(cache, xa, xb, [12, 1, 7])
    assert pair.keys.kept.shape[0] == pair.values.kept.shape[0] == 0
    K, V = pair.read(side)
    for got, want in ((K, (xa, xb)[side][0]), (V, (xa, xb)[side][1])):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_retained_tokens_are_the_far_apart_ones_and_come_back_exactly():
    xa, xb = kv(24, 2), kv(24, 3)
    gamma = 0.3
    cache, pair = pair_cache(merge_gamma=gamma)
    feed(cache, xa, xb, [24])  # one prefill: the angle range is this prompt's
    for half, i in ((pair.keys, 0), (pair.values, 1)):
        d = torch.arccos(F.cosine_similarity(xa[i], xb[i], dim=-1).clamp(-1, 1)) / torch.pi  # (B, H_kv, T)
        lo, hi = d.amin(-1, keepdim=True), d.amax(-1, keepdim=True)
        want = d > lo + (hi - lo) * gamma
        got = torch.zeros_like(want).view(-1, 24)
        got[half.kept_at[:, 0].long(), half.kept_at[:, 1].long()] = True
        assert torch.equal(got.view_as(want), want) and 0 < int(want.sum()) < want.numel()
        for side, x in ((0, xa[i]), (1, xb[i])):
            restored = pair.read(side)[i]
            assert torch.equal(restored[want], x[want])  # bit for bit


def test_identical_adjacent_layers_lose_nothing():
    """Both layers attend as through a full cache when their K/V are the same (any t, any gamma)."""
    minicache = build_cache(replace(PRESETS["minicache"], merge_t=0.6, merge_gamma=0.05), CONFIG, B, CPU,
                            torch.float32)
    full = build_cache(PRESETS["full"], CONFIG, B, CPU, torch.float32)
    k, v = kv(30, 4)
    q = torch.randn(B, 4, 30, D, generator=torch.Generator().manual_seed(5))
    for a, b in ((0, 11), (11, 12), (12, 13), (13, 30)):  # prefill, two decode steps, a chunk
        full.positions(b - a)  # the block pool stores each row's new tokens as the step declares them
        for layer in range(2):
            got = minicache.layers[layer].attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], REFERENCE)
            want = full.layers[layer].attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], REFERENCE)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        full.advance()


def test_memory_is_the_formula_and_less_than_a_full_cache():
    xa = kv(21, 6)
    xb = (near(xa[0], 0.05, 7), near(xa[1], 0.05, 8))
    cache, pair = pair_cache(merge_gamma=0.9)  # few far-apart tokens: most are merged
    feed(cache, xa, xb, [13, 1, 1, 1, 5])
    n, capacity = 21, pair.directions.k.shape[2]  # the directions' buffer doubles, as a full cache's does
    retained = pair.keys.kept.shape[0] + pair.values.kept.shape[0]
    directions = 2 * B * H_KV * capacity * D * 4  # K and V, float32
    norms = 2 * B * H_KV * n * 2 * 4  # two layers' norms, K and V
    kept = retained * (2 * D * 4 + 2 * 4)  # both layers' vectors + (row, slot) int32
    angles = 2 * 2 * B * H_KV * 4  # d_min, d_max for K and V
    assert cache.layers[0].memory_bytes() == {"device": directions + norms + kept + angles}
    assert cache.layers[1].memory_bytes() == {"device": 0}  # the pair is counted once, by its first layer
    full = 2 * 2 * B * H_KV * n * D * 4  # layers * (K, V) * ... * float32: a full cache without any slack
    assert 0 < retained < 2 * B * H_KV * n and cache.total_bytes() < full


def test_the_first_layer_sees_its_newest_tokens_exactly_until_the_pair_completes():
    xa, xb = kv(9, 9), kv(9, 10)
    cache, pair = pair_cache(merge_gamma=1.0)
    feed(cache, xa, xb, [8])
    first, second = cache.layers[0].store, cache.layers[1].store
    K, V = first.append(xa[0][:, :, 8:], xa[1][:, :, 8:])  # layer l - 1's decode step
    assert K.shape[2] == len(first) == 9 and len(second) == 8
    assert torch.equal(K[:, :, 8:], xa[0][:, :, 8:]) and torch.equal(V[:, :, 8:], xa[1][:, :, 8:])
    assert not torch.equal(K[:, :, :8], xa[0][:, :, :8])  # the merged ones are restored, not exact
    second.append(xb[0][:, :, 8:], xb[1][:, :, 8:])  # layer l completes the pair: the token is merged
    assert len(pair) == len(first) == len(second) == 9 and pair.pending is None


def test_pairs_start_at_merge_start():
    config = replace(CONFIG, n_layer=6)
    for start, pairs in ((None, [(2, 3), (4, 5)]), (1, [(0, 1), (2, 3), (4, 5)]), (4, [(3, 4)]), (5, [(4, 5)])):
        cache = build_cache(replace(PRESETS["minicache"], merge_start=start), config, 1, CPU, torch.float32)
        stores = [lc.store for lc in cache.layers]
        merged = [(i, i + 1) for i in range(5) if isinstance(stores[i], MergedLayerStore)
                  and isinstance(stores[i + 1], MergedLayerStore) and stores[i].pair is stores[i + 1].pair]
        assert merged == pairs
        assert all(isinstance(s, (MergedLayerStore, BufferStore)) for s in stores)


def test_minicache_int4_stores_the_directions_in_int4():
    cache = build_cache(PRESETS["minicache_int4"], replace(CONFIG, n_layer=4, n_head=2, d_model=64), 1, CPU,
                        torch.float32)
    pair = cache.layers[1].store.pair
    assert pair.directions.codec.key.bits == 4 and cache.layers[0].store.codec.key.bits == 4


@pytest.mark.parametrize("change,message", [
    (dict(merge_start=2), "cache.merge_start=2 must be in [1, n_layer=2)"),
    (dict(merge_start=0), "cache.merge_start=0 must be in [1, inf)"),  # each number's range, then n_layer's
    (dict(merge_t=1.5), "cache.merge_t=1.5 must be in [0, 1]"),
    (dict(merge_gamma=-0.1), "cache.merge_gamma=-0.1 must be in [0, 1]"),
    (dict(policy="sink", budget=16, window=0), "cannot be combined with eviction (policy=sink)"),
    (dict(merge="layers"), "cache.merge='layers' is not a merge"),
])
def test_bad_minicache_knobs_are_named(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_cache(replace(PRESETS["minicache"], **change), CONFIG, 1, CPU, torch.float32)
