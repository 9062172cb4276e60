"""Invariant 3: memory_bytes() is the storage of the tensors a cache actually holds, and for the quantized
presets it equals the analytic bits-per-element formula; the report figures follow from it."""

from dataclasses import replace

import pytest
import torch

from cache.codecs import payload_tensors
from cache.model_cache import ModelCache
from cache.presets import PRESETS, build_cache
from cache.quant import expected_bytes
from toymodel.attention import get_backend
from toymodel.config import ModelConfig

CPU = torch.device("cpu")
B, H_KV, D, G, R = 2, 2, 8, 4, 8
CONFIG = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=H_KV, d_model=32, block_size=64)
REFERENCE = get_backend("reference")


def held_tensors(obj: object, seen: set[int]) -> list[torch.Tensor]:
    """Every tensor reachable from obj through attributes, dicts, lists and tuples, opening every object of the cache
    package on the way (stores, payloads, MiniCache's shared pair), each object once: found independently of the
    cache's own tensors() lists, so a tensor it forgot to count, or counted twice, would show up here."""
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif type(obj).__module__.startswith("cache."):  # a LayerCache, a store, a payload, a policy, a codec
        children = list(vars(obj).values())
    else:
        return []
    return [t for child in children for t in held_tensors(child, seen)]


def fill(cache: ModelCache, T: int, chunks: list[int]) -> None:
    """Push T random tokens through every layer (prefill chunks, then one at a time), as the model would."""
    sizes = chunks + [1] * (T - sum(chunks))
    for n in sizes:
        cache.positions(n)
        for lc in cache.layers:
            q, k, v = torch.randn(B, 4, n, D), torch.randn(B, H_KV, n, D), torch.randn(B, H_KV, n, D)
            lc.attend(q, k, v, REFERENCE)
        cache.advance()


COMBINATIONS = [(name, PRESETS[name].codec) for name in PRESETS] + [("kvcompress", "int4"), ("h2o", "int8"),
                                                                    ("snapkv", "fp16"), ("window", "int2"),
                                                                    ("minicache", "kivi2"), ("minicache", "gear2")]


@pytest.mark.parametrize("name,codec", COMBINATIONS)
def test_memory_bytes_is_the_storage_of_the_tensors_held(name, codec):
    spec = replace(PRESETS[name], codec=codec, group_size=G, residual=R, window=3, sink=2, block_tokens=R)
    spec = replace(spec, budget=min(spec.budget, 12))
    cache = build_cache(spec, CONFIG, B, CPU, torch.float32, max_tokens=29)  # a block pool sized to the need
    fill(cache, 29, [11])
    pools = {id(layer.store.pool): layer.store.pool for layer in cache.layers if layer.store.paged}
    held = held_tensors(cache.layers, {id(cache.rows), *pools})  # not the (B,) row counters, nor a whole pool:
    for layer in cache.layers:  # a paged layer holds the blocks its tables name
        if layer.store.paged:
            store = layer.store
            ids = [int(i) for row, n in zip(store._tables.reshape(-1, store._tables.shape[2]), store._held.ravel())
                   for i in row[:n]]
            held += [t[i] for t in payload_tensors(store.pool.k) + payload_tensors(store.pool.v) for i in ids]
    assert cache.memory_bytes() == {"device": sum(t.numel() * t.element_size() for t in held)}


@pytest.mark.parametrize("codec,bits", [("int8", 8), ("int4", 4), ("int2", 2)])
@pytest.mark.parametrize("block_tokens", [7, 16])
def test_int_presets_match_the_analytic_formula_plus_one_partial_block(codec, bits, block_tokens):
    spec = replace(PRESETS["full"], codec=codec, group_size=G, block_tokens=block_tokens)
    cache = build_cache(spec, CONFIG, B, CPU, torch.float32)
    fill(cache, 21, [5])
    slots = -(-21 // block_tokens) * block_tokens  # tokens rounded up to whole blocks: 21 with blocks of 7
    per_tensor = B * H_KV * slots * D * (bits + 32 / G) / 8  # codes + a float16 scale and zero per G elements
    assert per_tensor == expected_bytes((B, H_KV, slots, D), bits, G)
    tables = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.store.tensors()[-3:])
    assert cache.total_bytes() == 2 * 2 * per_tensor + tables  # 2 layers, K and V, and the block tables
    assert cache.figures()["bits_per_element"] == pytest.approx((bits + 32 / G) * slots / 21 + 8 * tables / (
        2 * 2 * B * H_KV * 21 * D))


@pytest.mark.parametrize("name,bits", [("kivi4", 4), ("kivi2", 2)])
def test_kivi_is_whole_quantized_blocks_plus_a_full_precision_residual(name, bits):
    cache = build_cache(replace(PRESETS[name], group_size=G, residual=R, block_tokens=G), CONFIG, B, CPU,
                        torch.float32)
    fill(cache, 21, [3])
    store = cache.layers[0].store
    n_body = 16  # whole flushes of R = 8 tokens: four full blocks of G = 4 per head, no partial block
    assert store.blocks_held() == B * H_KV * n_body // G and store.res_lengths.tolist() == [[21 % R] * H_KV] * B
    quantized = 2 * B * H_KV * n_body * D * (bits + 32 / G) / 8  # K and V
    residual = 2 * B * H_KV * R * D * 4  # float32: KIVI's capacity of R full-precision tokens per head
    tables = sum(t.numel() * t.element_size() for t in (store.tables, store.lengths, store.held, store.res_lengths))
    assert cache.layers[0].memory_bytes() == {"device": quantized + residual + tables}
    assert len(cache.layers[0]) == 21


def test_full_cache_counts_its_blocks_and_the_figures_follow():
    cache = build_cache(replace(PRESETS["full"], block_tokens=4), CONFIG, B, CPU, torch.float32)
    fill(cache, 13, [10])  # 13 tokens per head: 4 blocks of 4, the last holding one token
    store = cache.layers[0].store
    meta = sum(t.numel() * t.element_size() for t in (store.tables, store.lengths, store.held))
    per_layer = 2 * B * H_KV * 4 * 4 * D * 4 + meta  # (K, V) * heads * blocks * block_tokens * D * fp32 + tables
    assert store.blocks_held() == B * H_KV * 4 and cache.total_bytes() == 2 * per_layer
    figures = cache.figures()
    full_fp16 = B * 13 * 2 * 2 * H_KV * D * 2  # tokens seen * (K, V) * layers * heads * D * 2 bytes
    assert figures["kv_bytes_full_fp16"] == cache.full_cache_bytes() == full_fp16
    assert figures["compression_ratio"] == pytest.approx(full_fp16 / (2 * per_layer))
    assert figures["bits_per_element"] == pytest.approx(8 * 2 * per_layer / (2 * B * H_KV * 13 * 2 * D))
    assert figures["tokens_seen"] == 13 and figures["tokens_cached"] == 13


def test_eviction_and_quantization_compose_in_the_byte_count():
    spec = replace(PRESETS["sink_int4"], budget=12, sink=2, group_size=G, block_tokens=1)  # exactly the budget
    cache = build_cache(spec, CONFIG, B, CPU, torch.float32)
    fill(cache, 29, [11])
    codes = 2 * B * H_KV * 12 * D * (4 + 32 / G) / 8  # K and V: the kept tokens only, at int4 + scale and zero
    rotated_at = B * H_KV * 12 * 4  # StreamingLLM's int32 slot per kept token of every head
    tables = sum(t.numel() * t.element_size() for t in cache.layers[0].store.tensors()[-3:])
    assert cache.layers[0].memory_bytes() == {"device": codes + rotated_at + tables}
    window = build_cache(replace(PRESETS["window"], budget=12, codec="int4", group_size=G, block_tokens=4), CONFIG, B,
                         CPU, torch.float32)  # the block pool: the blocks held, up to a block's worth past the budget
    fill(window, 29, [11])
    n = len(window.layers[0])
    tables = sum(t.numel() * t.element_size() for t in window.layers[0].store.tensors()[-3:])
    blocks = 2 * B * H_KV * -(-n // 4) * 4 * D * (4 + 32 / G) / 8
    assert 12 <= n < 16 and window.layers[0].memory_bytes() == {"device": blocks + tables}
