"""Invariant 5: the tiered cache in exact mode equals the in-memory cache with the same preset, bit for bit
(greedy tokens and every logit), while its blocks really move through device, host and disk."""

import dataclasses

import pytest
import torch

from cache.presets import PRESETS
from memhier.cache import MemhierSpec, build_tiered_cache, make_cache
from toymodel.config import ModelConfig
from serving.generate import Sampling, generate
from toymodel.model import Transformer

CONFIG = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, block_size=64)  # head_dim 8
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (tests/conftest.py)


def preset(name: str):
    return dataclasses.replace(PRESETS[name], group_size=8, residual=16, block_tokens=8)  # fits head_dim 8


# Bytes of one pool block (one KV head, 8 tokens, D=8, K and V): fp32 values, or codes + fp16 scales and zeros.
BLOCK_BYTES = {"full": 512, "quant8": 192, "quant4": 128, "kivi4": 128}


def tight(tmp_path, name: str = "quant4", prefetch: bool = True) -> MemhierSpec:
    """Budgets of two and a half blocks per memory tier, so that every run demotes, spills to disk and promotes."""
    budget = 5 * BLOCK_BYTES[name] // 2
    return MemhierSpec(enabled=True, group_bytes=2 * BLOCK_BYTES[name], device_bytes=budget,
                       host_bytes=budget, spill_dir=str(tmp_path), prefetch=prefetch)  # groups of 2 blocks


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
    assert cache.layers[0].store.pool.layout.nbytes == BLOCK_BYTES[name]
    assert all(t.used <= t.budget for t in cache.store.tiers)
    cache.close()
    assert list(tmp_path.iterdir()) == []  # the spill directory is gone


def test_gear_moves_whole_chunks_bit_for_bit(tmp_path):
    """GEAR's blocks are whole chunks (block_tokens = residual), factors and outliers included: the tiers move their
    tensors as bytes and the output stays memhier=off's."""
    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    idx = torch.randint(0, CONFIG.vocab_size, (2, 48))
    gear = dataclasses.replace(preset("gear4"), block_tokens=16)  # a chunk: residual=16 tokens
    reference = logits_through(model, idx, make_cache(gear, MemhierSpec(), CONFIG, 2, CPU, torch.float32))
    probe = make_cache(gear, MemhierSpec(enabled=True, spill_dir=str(tmp_path)), CONFIG, 2, CPU, torch.float32)
    block = probe.layers[0].store.pool.layout.nbytes
    probe.close()
    spec = MemhierSpec(enabled=True, group_bytes=2 * block, device_bytes=5 * block // 2, host_bytes=5 * block // 2,
                       spill_dir=str(tmp_path))
    cache = make_cache(gear, spec, CONFIG, 2, CPU, torch.float32)
    assert torch.equal(logits_through(model, idx, cache), reference)
    assert cache.store.stats()["per_tier"]["disk"]["hits"] > 0
    cache.close()


@pytest.mark.parametrize("name", ["quant4", "kivi4"])
def test_decode_steps_hand_the_kernel_every_block_as_stored(tmp_path, name):
    """On the CPU (sdpa backend) a decode step reads the blocks' codes with cache/kernels/cpu_decode.py and never
    decodes them; the kernel's sums do not depend on where blocks cut the keys, so memhier=off gives the same bits."""
    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    idx = torch.randint(0, CONFIG.vocab_size, (2, 48))
    cache = build_tiered_cache(preset(name), tight(tmp_path, name), CONFIG, 2, CPU, torch.float32)
    off = make_cache(preset(name), MemhierSpec(), CONFIG, 2, CPU, torch.float32)
    with torch.no_grad():
        prefill = [model(idx[:, :7], c) for c in (cache, off)]
        for layer in cache.layers + off.layers:
            layer.store.append = None  # a decode step that decoded the cache would call it
        steps = [[model(idx[:, t : t + 1], c) for t in range(7, 48)] for c in (cache, off)]
    assert torch.equal(torch.cat([prefill[0], *steps[0]], 1), torch.cat([prefill[1], *steps[1]], 1))
    assert cache.store.stats()["blocks"]["disk"] > 0
    cache.close()


def test_attention_demotion_changes_where_blocks_live_not_the_output(tmp_path):
    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    idx = torch.randint(0, CONFIG.vocab_size, (2, 48))
    reference = logits_through(model, idx, make_cache(preset("quant4"), MemhierSpec(), CONFIG, 2, CPU, torch.float32))
    spec = dataclasses.replace(tight(tmp_path), demotion="attention", rep_keys=2)
    cache = build_tiered_cache(preset("quant4"), spec, CONFIG, 2, CPU, torch.float32)
    assert torch.equal(logits_through(model, idx, cache), reference)
    pool = cache.layers[0].store.pool
    columns = [layer.store.tables[..., :5].numpy().ravel() for layer in cache.layers]  # full before the last step
    full_before_last_step = {(int(g),) for ids in columns for g in pool.group[ids]}
    assert set(cache.store.ranks) == full_before_last_step  # every group of a full block was ranked, and only they
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
    plain = make_cache(preset("quant4"), MemhierSpec(), CONFIG, 2, CPU, torch.float32)  # blocks of 8 too
    logits_through(model, torch.randint(0, CONFIG.vocab_size, (2, 40)), plain)
    assert cache.total_bytes() == plain.total_bytes()  # the same 4-bit blocks and tables, only placed elsewhere
    assert cache.figures()["kv_bytes"] == plain.figures()["kv_bytes"]
    figures = cache.figures()
    assert figures["memhier_disk_bytes"] == tiers["disk"] and figures["memhier_disk_hits"] > 0
    cache.close()


EVICTING = ["window", "sink", "h2o", "snapkv", "l2norm", "kvcompress", "sink_int4"]


def evicting(name: str):
    """A small budget (12 tokens per head; KV-Compress: 12 per head on average) so that a row evicts every time it
    fills a block past it."""
    window = {"window": 12, "sink": 10}.get(name, 4)  # window and sink keep exactly their window (plus sinks)
    return dataclasses.replace(preset(name), budget=12, sink=2 if name.startswith("sink") else 0, window=window)


@pytest.mark.parametrize("name", EVICTING)
def test_eviction_presets_compose_bit_for_bit_and_free_dead_blocks(tmp_path, name):
    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    idx = torch.randint(0, CONFIG.vocab_size, (2, 48))
    plain = make_cache(evicting(name), MemhierSpec(), CONFIG, 2, CPU, torch.float32)
    reference = logits_through(model, idx, plain)
    block = BLOCK_BYTES["quant4" if name == "sink_int4" else "full"]
    spec = dataclasses.replace(tight(tmp_path), device_bytes=block, host_bytes=block)  # 1 block each: spills
    cache = build_tiered_cache(evicting(name), spec, CONFIG, 2, CPU, torch.float32)
    assert torch.equal(logits_through(model, idx, cache), reference)  # the same pool code, its blocks elsewhere
    assert cache.figures()["tokens_cached"] == plain.figures()["tokens_cached"]
    assert [len(layer) for layer in cache.layers] == [len(layer) for layer in plain.layers]
    stats = cache.store.stats()
    if name in ("window", "sink", "sink_int4"):  # scores may leave a survivor in every block; a window cannot
        assert stats["blocks_dropped"] > 0  # blocks whose every token was evicted left their tier
    assert stats["blocks"]["disk"] + stats["per_tier"]["disk"]["hits"] > 0  # the blocks still kept moved
    assert all(t.used <= t.budget for t in cache.store.tiers)
    cache.close()


def test_a_window_keeps_only_the_blocks_its_tokens_live_in(tmp_path):
    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    idx = torch.randint(0, CONFIG.vocab_size, (2, 48))
    cache = build_tiered_cache(evicting("window"), tight(tmp_path, "full"), CONFIG, 2, CPU, torch.float32)
    plain = make_cache(evicting("window"), MemhierSpec(), CONFIG, 2, CPU, torch.float32)
    for c in (cache, plain):
        logits_through(model, idx, c)
    for layer, alone in zip(cache.layers, plain.layers):  # compacted alike, 2 blocks per head
        assert torch.equal(layer.store.lengths, alone.store.lengths)
        assert layer.store.blocks_held() == alone.store.blocks_held() == 2 * 2 * 2
    assert cache.store.stats()["blocks_dropped"] > 0
    held = sum(layer.store.blocks_held() for layer in cache.layers)
    # exactly the live blocks: a group holds blocks of one table column, which compaction frees together
    assert sum(t.used for t in cache.store.tiers) == held * BLOCK_BYTES["full"]
    assert cache.total_bytes() == plain.total_bytes()


@pytest.mark.parametrize("field,value", [("mode", "retrieval"), ("demotion", "attention"), ("persist", True)])
def test_eviction_refuses_what_it_cannot_compose_with(tmp_path, field, value):
    spec = dataclasses.replace(tight(tmp_path), **{field: value})
    with pytest.raises(ValueError, match=f"memhier.{field}=.*policy=sink"):
        make_cache(preset("sink_int4"), spec, CONFIG, 1, CPU, torch.float32, model_id="m")


def test_kivi_blocks_must_hold_whole_key_groups(tmp_path):
    with pytest.raises(ValueError, match="cache.block_tokens=12 does not fit cache.codec=kivi4"):  # the pool's blocks
        make_cache(dataclasses.replace(preset("kivi4"), block_tokens=12), tight(tmp_path), CONFIG, 1, CPU,
                   torch.float32)


@pytest.mark.parametrize("name", ["quant4", "kivi4", "h2o"])
def test_a_ragged_batch_through_the_tiers_equals_the_pool(tmp_path, name):
    """Rows of different lengths in one batch: the tiers move each head's blocks, so each row keeps its own length
    (memhier=off's pool, bit for bit), while blocks spill to disk and come back."""
    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    prompt = torch.randint(0, CONFIG.vocab_size, (3, 20))
    lengths = torch.tensor([20, 9, 14])
    spec = evicting(name) if name == "h2o" else preset(name)
    plain = make_cache(spec, MemhierSpec(), CONFIG, 3, CPU, torch.float32)
    cache = make_cache(spec, tight(tmp_path, "full" if name == "h2o" else name), CONFIG, 3, CPU, torch.float32)
    greedy = Sampling(temperature=0)
    runs = [generate(model, prompt, c, 24, greedy, prompt_lengths=lengths).tokens for c in (plain, cache)]
    assert torch.equal(runs[0], runs[1])
    assert [layer.store.lengths.tolist() for layer in cache.layers] == [layer.store.lengths.tolist()
                                                                         for layer in plain.layers]
    assert cache.store.stats()["per_tier"]["disk"]["hits"] > 0
    cache.close()


def test_a_one_layer_model_ends_every_step(tmp_path):
    """Each layer's step begins when its store adds tokens, so with one layer every forward ends the last step:
    its scratch frames go back and the tiers keep within their budgets."""
    torch.manual_seed(0)
    config = dataclasses.replace(CONFIG, n_layer=1)
    model = Transformer(config).eval()
    idx = torch.randint(0, config.vocab_size, (2, 48))
    reference = logits_through(model, idx, make_cache(preset("quant4"), MemhierSpec(), config, 2, CPU, torch.float32))
    cache = make_cache(preset("quant4"), tight(tmp_path), config, 2, CPU, torch.float32)
    assert torch.equal(logits_through(model, idx, cache), reference)
    stats = cache.store.stats()
    assert stats["blocks"]["disk"] > 0 and all(t.used <= t.budget for t in cache.store.tiers)
    assert len(cache.layers[0].store.pool.store.pinned) <= len(cache.layers[0].store.pool.members)
    cache.close()
