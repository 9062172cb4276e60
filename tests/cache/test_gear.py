"""GEAR (cache/gear.py): X ~ D + L + S. Each correction lowers the error of the quantized part alone, on random data
with outliers and on K/V a model produced; with r = 0 and s = 0 it is plain quantization bit for bit; outliers come
back exactly; the bytes are the formula's; bad knobs are named at build time."""

import re
from dataclasses import replace

import pytest
import torch

from cache import quant
from cache.codecs import make_codec
from cache.gear import GearQuant, index_dtype
from cache.presets import PRESETS, build_cache
from toymodel.config import ModelConfig

CPU = torch.device("cpu")
B, H, T, D, C, G = 2, 2, 64, 16, 32, 8  # two chunks of C = 32 tokens, head_dim 16, groups of 8
CONFIG = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, block_size=64)  # head_dim 8


def with_outliers(seed: int = 0) -> torch.Tensor:
    """(B, H, T, D) normal data with a few large entries, as trained K/V have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, T, D, generator=g)
    spots = torch.rand(B, H, T, D, generator=g) < 0.01
    return torch.where(spots, 20 * torch.randn(B, H, T, D, generator=g), x)


def error(tc: GearQuant, x: torch.Tensor) -> float:
    return (tc.decode(tc.encode(x), torch.float32) - x).norm().item()


@pytest.mark.parametrize("axis", ["channel", "token"])
def test_each_correction_lowers_the_error_of_plain_quantization(axis):
    x = with_outliers()
    k = int(0.02 / 2 * C * D)
    plain, sparse, low, both = (GearQuant(4, G, axis, C, r, n, D) for r, n in ((0, 0), (0, k), (3, 0), (3, k)))
    assert error(both, x) < error(sparse, x) < error(plain, x)
    assert error(both, x) < error(low, x) < error(plain, x)


def test_gear_beats_its_quantization_alone_on_cached_keys_and_values(make_model):
    """K/V as a model's layer cache holds them (a random model: the shapes and scales of real activations)."""
    model = make_model(2)
    cache = build_cache(PRESETS["full"], model.config, 2, CPU, torch.float32)
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 64)), cache)
    D_model = model.config.head_dim
    for x in cache.layers[1].store.read():  # K, V: (2, 2, 64, 8) each
        for axis in ("channel", "token"):
            plain = GearQuant(2, 8, axis, 32, 0, 0, D_model)
            gear = GearQuant(2, 8, axis, 32, 2, int(0.05 / 2 * 32 * D_model), D_model)
            assert error(gear, x) < error(plain, x)


def test_without_rank_and_outliers_it_is_plain_quantization_bit_for_bit():
    x = with_outliers(1)
    codec = make_codec("gear4", group_size=G, residual=C, rank=0, outliers=0.0, head_dim=D)
    for tc, reference in ((codec.key, quant.quantize_per_channel(x, 4, G)),
                          (codec.value, quant.quantize_per_token(x, 4, G))):
        p = tc.encode(x)
        for got, want in ((p.quant.codes, reference.codes), (p.quant.scale, reference.scale),
                          (p.quant.zero, reference.zero)):
            assert torch.equal(got, want)
        assert torch.equal(tc.decode(p, torch.float32), quant.dequantize(reference))
        assert p.a.numel() == p.b.numel() == p.values.numel() == 0


def test_without_rank_and_outliers_a_cache_equals_kivi_bit_for_bit(make_model, run_chunks):
    model = make_model(2, backend="reference")  # both decode, then attend: no kernel reads KIVI's codes
    idx = torch.randint(0, 97, (2, 40))
    logits = []
    for codec in ("gear4", "kivi4"):
        spec = replace(PRESETS["full"], codec=codec, group_size=8, residual=16, rank=0, outliers=0.0)
        logits.append(run_chunks(model, idx, build_cache(spec, model.config, 2, CPU, torch.float32,
                                                         backend="reference"), [19]))
    assert torch.equal(logits[0], logits[1])


def test_outliers_are_the_extremes_of_each_chunk_and_come_back_exactly():
    x = with_outliers(2)
    k = 5
    tc = GearQuant(4, G, "token", C, 2, k, D)
    p = tc.encode(x)
    rows = x.view(B, H, T // C, C * D)  # (B, H, n, C * D): one row per chunk matrix
    order = rows.argsort(dim=-1)
    want = torch.cat([order[..., -k:], order[..., :k]], dim=-1).sort(dim=-1).values  # k largest and k smallest
    assert torch.equal(p.index.long().sort(dim=-1).values, want)
    decoded = tc.decode(p, torch.float32).view(B, H, T // C, C * D)
    slots = p.index.long()
    assert torch.equal(decoded.gather(-1, slots), rows.gather(-1, slots).half().float())  # as stored: float16


@pytest.mark.parametrize("chunk,head_dim,group", [(32, 16, 16), (512, 128, 32)], ids=["int16 slots", "int32 slots"])
def test_bytes_are_the_formula(chunk, head_dim, group):
    x = torch.randn(1, 2, 2 * chunk, head_dim)
    k = int(0.02 / 2 * chunk * head_dim)
    for bits, axis, rank in ((4, "channel", 2), (2, "token", 3), (4, "token", 0)):
        tc = GearQuant(bits, group, axis, chunk, rank, k, head_dim)
        p = tc.encode(x)
        n = 2 * (2 * chunk) * head_dim  # elements
        index_bytes = index_dtype(chunk, head_dim).itemsize
        by_hand = (quant.expected_bytes(x.shape, bits, group)  # D: codes, scales, zeros
                   + 2 * (2 * 2 * chunk * rank + 2 * 2 * rank * head_dim)  # A rows and B per chunk, float16
                   + 2 * 2 * 2 * k * (2 + index_bytes))  # 2 rows x 2 chunks x 2k outliers: value and slot
        assert tc.nbytes(p) == by_hand == n * tc.bits_per_element(torch.float32) / 8
        assert p.index.dtype == index_dtype(chunk, head_dim)


def test_a_cache_counts_the_chunks_and_the_buffer():
    """In the block pool a block holds one chunk; the buffer of n_b = 16 full-precision tokens is held beside it."""
    spec = replace(PRESETS["gear4"], group_size=8, residual=16, block_tokens=16)
    cache = build_cache(spec, CONFIG, 2, CPU, torch.float32)
    for n in [21, 1, 1, 1]:  # 24 tokens: one chunk of 16 compressed, 8 waiting in full precision
        cache.positions(n)
        for lc in cache.layers:
            lc.store.append(torch.randn(2, 2, n, 8), torch.randn(2, 2, n, 8))
        cache.advance()
    store, tc = cache.layers[0].store, spec.build_codec(8).key
    assert store.blocks_held() == 2 * 2 and store.res_lengths.tolist() == [[8, 8], [8, 8]]
    chunks = 2 * (2 * 2 * 16 * 8 * tc.bits_per_element(torch.float32) / 8)  # K and V, a chunk per (b, h)
    buffer = 2 * (2 * 2 * 16 * 8 * 4)  # K and V, the buffer's capacity of 16 float32 tokens per (b, h)
    tables = sum(t.numel() * t.element_size() for t in (store.tables, store.lengths, store.held, store.res_lengths))
    assert cache.layers[0].memory_bytes() == {"device": chunks + buffer + tables}
    assert len(cache.layers[0]) == 24


@pytest.mark.parametrize("change,message", [
    (dict(rank=9), "cache.rank=9 is above head_dim=8"),
    (dict(rank=2.5), "cache.rank=2.5 must be 0, a fraction of head_dim in (0, 1), or a whole number"),
    (dict(rank=-1), "cache.rank=-1 must be in [0, inf)"),
    (dict(outliers=0.5), "cache.outliers=0.5 must be in [0, 0.5)"),
    (dict(outliers=-0.1), "cache.outliers=-0.1 must be in [0, 0.5)"),
    (dict(residual=0), "cache.residual=0 is GEAR's streaming buffer n_b and must be in [1, inf)"),
    (dict(residual=12), "GEAR buffer n_b=12 (cache.residual) must be a positive multiple of group_size=8"),
    (dict(rank=8, residual=4, group_size=4), "a chunk of 4 x 8 holds at most 4"),
])
def test_bad_gear_knobs_are_named(change, message):
    spec = replace(PRESETS["gear4"], **{"group_size": 8, "residual": 16, **change})
    with pytest.raises(ValueError, match=re.escape(message)):
        build_cache(spec, CONFIG, 1, CPU, torch.float32)
