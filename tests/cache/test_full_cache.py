"""Invariant 1: cached decoding with the full cache equals uncached decoding (MHA, GQA, MQA; one token at a
time and chunked prefill), and the full cache is a preallocated buffer that grows by doubling."""

from dataclasses import replace

import pytest
import torch

from cache.presets import PRESETS, build_cache
from cache.storage import BufferStore
from toymodel.config import ModelConfig

CPU = torch.device("cpu")


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("chunks", [[], [7], [5, 9, 3]], ids=["one-by-one", "prefill", "chunked"])
def test_cached_logits_equal_uncached(make_model, run_chunks, backend, n_kv_head, chunks):
    model = make_model(n_kv_head, backend)
    idx = torch.randint(0, 97, (3, 23))
    with torch.no_grad():
        reference = model(idx)  # (B, T, vocab): no cache, every token attends within idx
    cache = build_cache(PRESETS["full"], model.config, 3, CPU, torch.float32)
    cached = run_chunks(model, idx, cache, chunks)
    torch.testing.assert_close(cached, reference, rtol=0, atol=1e-5)
    assert bool((cache.pos == 23).all()) and all(len(layer) == 23 for layer in cache.layers)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_greedy_tokens_equal_uncached(make_model, n_kv_head):
    model = make_model(n_kv_head)
    prompt = torch.randint(0, 97, (2, 6))
    cache = build_cache(PRESETS["full"], model.config, 2, CPU, torch.float32)
    with torch.no_grad():
        cached = [model(prompt, cache)[:, -1].argmax(-1)]  # (B,)
        for _ in range(15):
            cached.append(model(cached[-1][:, None], cache)[:, -1].argmax(-1))
        seq = prompt
        for _ in range(16):  # the uncached reference re-reads the whole sequence every step
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(torch.stack(cached, dim=1), seq[:, 6:])


def test_buffer_appends_in_place_and_grows_by_doubling():
    store = BufferStore(None, torch.float32)
    k = torch.randn(2, 3, 5, 4)
    K, _ = store.append(k, k)
    assert store.k.shape[2] == 5 and K.data_ptr() == store.k.data_ptr()  # a view of the buffer, no copy
    steps = [torch.randn(2, 3, 1, 4) for _ in range(6)]
    capacities = []
    for s in steps:
        K, V = store.append(s, s)
        capacities.append(store.k.shape[2])
    assert capacities == [10, 10, 10, 10, 10, 20]  # doubled when full, not per step
    torch.testing.assert_close(K, torch.cat([k] + steps, dim=2), rtol=0, atol=0)
    # memory counts the allocated capacity: that is what the buffer costs
    assert sum(t.numel() * t.element_size() for t in store.tensors()) == 2 * 2 * 3 * 20 * 4 * 4


def test_earlier_views_survive_later_appends_and_eviction():
    store = BufferStore(None, torch.float32)
    a = torch.randn(1, 2, 4, 8)
    K, _ = store.append(a, a)
    snapshot = K.clone()
    store.append(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    store.keep(torch.tensor([[[0, 2], [1, 4]]]), {})
    assert torch.equal(K, snapshot)  # attention may still hold K after append() returned
    assert store.k.shape == (1, 2, 2, 8)  # eviction leaves an exactly sized buffer: the memory is freed


def test_fp16_storage_returns_model_dtype():
    config = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32)
    cache = build_cache(replace(PRESETS["full"], codec="fp16"), config, 1, CPU, torch.float32)
    k = torch.randn(1, 2, 3, 8)
    cache.positions(3)
    cache.layers[0].store.add(k, k)
    K, V = cache.layers[0].store.read()
    assert K.dtype == torch.float32 and cache.layers[0].store.pool.k.dtype == torch.float16
    torch.testing.assert_close(K, k.half().float(), rtol=0, atol=0)
