"""Invariant 5: the tiered cache in exact mode equals the in-memory cache with the same preset, bit for bit
(greedy tokens and every logit), while its blocks really move through device, host and disk."""

import dataclasses

import pytest
import torch

from cache.presets import PRESETS
from memhier.cache import MemhierSpec, build_tiered_cache, make_cache
from toymodel.config import ModelConfig
from toymodel.generate import Sampling, generate
from toymodel.model import Transformer

CONFIG = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, block_size=64)  # head_dim 8
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (tests/conftest.py)


def preset(name: str):
    return dataclasses.replace(PRESETS[name], group_size=8, residual=16)  # fits head_dim 8


# Bytes of one block (B=2, H_kv=2, 8 tokens, D=8, K and V): fp32 values, or codes + fp16 scales and zeros.
BLOCK_BYTES = {"full": 2048, "quant8": 768, "quant4": 512, "kivi4": 512}


def tight(tmp_path, name: str = "quant4", prefetch: bool = True) -> MemhierSpec:
    """Budgets of two and a half blocks per memory tier, so that every run demotes, spills to disk and promotes."""
    budget = 5 * BLOCK_BYTES[name] // 2
    return MemhierSpec(enabled=True, block_tokens=8, device_bytes=budget, host_bytes=budget, spill_dir=str(tmp_path),
                       prefetch=prefetch)


def logits_through(model, idx: torch.Tensor, cache) -> torch.Tensor:
    """A 7-token prefill, then one token at a time -> logits (B, T, vocab)."""
    with torch.no_grad():
        out = [model(idx[:, :7], cache)] + [model(idx[:, t : t + 1], cache) for t in range(7, idx.shape[1])]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", ["full", "quant4", "quant8", "kivi4"])
@pytest.mark.parametrize("prefetch", [True, False])
def test_exact_mode_equals_the_in_memory_cache(tmp_path, name, prefetch):
    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    idx = torch.randint(0, CONFIG.vocab_size, (2, 48))
    reference = logits_through(model, idx, make_cache(preset(name), MemhierSpec(), CONFIG, 2, CPU, torch.float32))
    cache = build_tiered_cache(preset(name), tight(tmp_path, name, prefetch), CONFIG, 2, CPU, torch.float32)
    logits = logits_through(model, idx, cache)
    assert torch.equal(logits, reference)
    stats = cache.store.stats()
    assert stats["blocks"]["disk"] > 0 and stats["blocks_demoted"] > 0 and stats["per_tier"]["disk"]["hits"] > 0
    assert (stats["prefetched_blocks"] > 0) == prefetch
    assert len(cache.layers[0]) == idx.shape[1]
    assert cache.layers[0].store.layout.nbytes == BLOCK_BYTES[name]
    assert all(t.used <= t.budget for t in cache.store.tiers)
    cache.close()
    assert list(tmp_path.iterdir()) == []  # the spill directory is gone


def test_attention_demotion_changes_where_blocks_live_not_the_output(tmp_path):
    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    idx = torch.randint(0, CONFIG.vocab_size, (2, 48))
    reference = logits_through(model, idx, make_cache(preset("quant4"), MemhierSpec(), CONFIG, 2, CPU, torch.float32))
    spec = dataclasses.replace(tight(tmp_path), demotion="attention", rep_keys=2)
    cache = build_tiered_cache(preset("quant4"), spec, CONFIG, 2, CPU, torch.float32)
    assert torch.equal(logits_through(model, idx, cache), reference)
    assert len(cache.store.ranks) == 2 * 5  # every sealed block before the last step, of both layers, was ranked
    assert cache.store.stats()["blocks_demoted"] > 0
    cache.close()


@pytest.mark.parametrize("name", ["full", "quant4"])
def test_greedy_generation_is_identical(tmp_path, name):
    torch.manual_seed(1)
    model = Transformer(CONFIG).eval()
    prompt = torch.randint(0, CONFIG.vocab_size, (1, 12))
    greedy = Sampling(temperature=0)
    plain = generate(model, prompt, make_cache(preset(name), MemhierSpec(), CONFIG, 1, CPU, torch.float32), 30,
                     greedy)
    cache = make_cache(preset(name), tight(tmp_path, name), CONFIG, 1, CPU, torch.float32)
    tiered = generate(model, prompt, cache, 30, greedy)
    assert torch.equal(tiered.tokens, plain.tokens)
    cache.close()


def test_memory_bytes_counts_every_tier(tmp_path):
    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    cache = build_tiered_cache(preset("quant4"), tight(tmp_path), CONFIG, 2, CPU, torch.float32)
    logits_through(model, torch.randint(0, CONFIG.vocab_size, (2, 40)), cache)
    tiers = cache.store.tier_bytes()
    open_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.store.tensors())
    assert cache.memory_bytes() == {"device": open_bytes + tiers["device"], "host": tiers["host"],
                                    "disk": tiers["disk"]}
    plain = make_cache(preset("quant4"), MemhierSpec(), CONFIG, 2, CPU, torch.float32)
    logits_through(model, torch.randint(0, CONFIG.vocab_size, (2, 40)), plain)
    assert cache.total_bytes() == plain.total_bytes()  # the same 4-bit bytes, only placed elsewhere
    figures = cache.figures()
    assert figures["kv_bytes"] == plain.figures()["kv_bytes"]
    assert figures["memhier_disk_bytes"] == tiers["disk"] and figures["memhier_disk_hits"] > 0
    cache.close()


def test_eviction_presets_are_refused_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="policy=sink"):
        make_cache(preset("sink_int4"), tight(tmp_path), CONFIG, 1, CPU, torch.float32)


def test_kivi_blocks_must_hold_whole_key_groups(tmp_path):
    spec = dataclasses.replace(tight(tmp_path), block_tokens=12)
    with pytest.raises(ValueError, match="multiple of cache.group_size"):
        make_cache(preset("kivi4"), spec, CONFIG, 1, CPU, torch.float32)
