"""Checks exercises/l5_step_bytes.py against the benchmark's own count (bench.decode.step_bytes) and against what a
real model and cache hold: its parameters' storage, and the bytes of the blocks its cache holds."""

from dataclasses import replace

import pytest
import torch

from bench.decode import BENCH_MODEL, step_bytes as library_bytes
from cache.presets import PRESETS, build_cache
from conftest import load
from toymodel.config import ModelConfig
from toymodel.model import Transformer

step_bytes = load("l5_step_bytes").step_bytes
SHAPES = [BENCH_MODEL, ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=1, d_model=32, block_size=64)]


@pytest.mark.parametrize("config", SHAPES, ids=["bench-model", "tiny-mqa"])
@pytest.mark.parametrize("preset, bits", [("full", 32), ("quant4", 5)])
def test_you_count_what_the_benchmark_counts(config, preset, bits):
    torch.manual_seed(0)
    model = Transformer(config)
    for batch, tokens in ((1, 0), (1, 512), (8, 2048)):
        want = library_bytes(model, preset, batch, tokens)
        got = step_bytes(config, batch, tokens, bits)
        if tokens == 0:
            assert got == want, (f"with nothing cached a step reads only the weights: {want:,} bytes (the tied "
                                 f"embedding once, every matrix and gain of every layer, the final norm), you say "
                                 f"{got:,}")
        assert got == want, f"batch {batch}, {tokens} tokens at {bits} bits: expected {want:,} bytes, you say {got:,}"


def test_your_count_is_what_a_real_model_and_cache_hold():
    config = SHAPES[1]
    model = Transformer(config).eval()
    cache = build_cache(replace(PRESETS["quant4"], group_size=8, block_tokens=8), config, 2, torch.device("cpu"),
                        torch.float32)
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 24)), cache)  # 24 tokens: three full blocks of 8 per head, no slack
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    tables = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.store.tensors()[-3:])
    held = weights + cache.total_bytes() - tables
    bits = 4 + 32 / 8  # int4 codes, and a float16 scale and zero per 8 channels
    assert step_bytes(config, 2, 24, bits) == held, "your count differs from the model's and the cache's storage"
