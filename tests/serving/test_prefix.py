"""Prefix caching (serving/prefix.py) in the engine: a prompt that shares full blocks with an earlier one skips their
prefill and gets the cold output; presets never share; kept blocks go back when memory is needed; nothing leaks.
On the shipped model and held-out text, whose greedy continuations depend on their context."""

import numpy as np
import pytest
import torch

from corpus.splits import validation_tokens
from cache.presets import build_cache
from serving.engine import Engine
from serving.generate import Sampling
from serving.prefix import PrefixCache
from serving.sequence import Request
from engine_checks import all_free  # tests/engine_checks.py
from toymodel.checkpoint import PRETRAINED
from toymodel.decode_layout import pack_for_decode
from toymodel.export_hf import load_kvlab_model


GREEDY = Sampling(temperature=0.0)


@pytest.fixture(scope="module")
def shipped():
    return pack_for_decode(load_kvlab_model(PRETRAINED).eval())


@pytest.fixture(scope="module")
def text() -> list[int]:
    return validation_tokens(None)[:4000].tolist()


def stored_keys(engine: Engine, row: int) -> torch.Tensor:
    """Layer 1's keys of a running row (they depend on attention over the prefix): (H_kv, n, D)."""
    return engine.cache.layers[1].store.read(values=False)[0][row]


def test_a_prefix_hit_skips_its_prefill_and_gives_the_cold_output(shipped, text):
    """B shares A's first 40 tokens: 2 full blocks of 16 are reused, 32 tokens of B's prefill skipped; B's output
    and stored keys are those of an engine without the cache."""
    a = Request(text[:60], max_tokens=24, sampling=GREEDY)
    b = Request(text[:40] + text[500:530], max_tokens=24, sampling=GREEDY)
    warm = Engine(shipped, n_blocks=400)
    warm.generate([a])
    cold = Engine(shipped, n_blocks=400, prefix_caching=False)
    for engine in (warm, cold):
        engine.add(b)
        engine.step()  # B's prefill
    assert warm.stats.prefix_hit_tokens == 32 and cold.stats.prefix_hit_tokens == 0
    assert warm.stats.prefill_tokens == 60 + 70 - 32
    torch.testing.assert_close(stored_keys(warm, 0), stored_keys(cold, 0), rtol=1e-5, atol=1e-5)
    for engine in (warm, cold):
        while engine.has_work():
            done = engine.step()
    assert done[0].tokens == cold_tokens(shipped, b)
    assert all_free(warm) and all_free(cold)


def cold_tokens(model, request: Request) -> list[int]:
    return Engine(model, n_blocks=400, prefix_caching=False).generate([request])[0].tokens


def test_the_whole_prompt_cached_still_prefills_its_last_token(shipped, text):
    """A prompt of exactly 3 blocks asked twice: the second reuses 2 (one token must go through for the logits)."""
    request = Request(text[1000:1048], max_tokens=8, sampling=GREEDY)
    engine = Engine(shipped, n_blocks=400)
    first = engine.generate([request])[0].tokens
    again = engine.generate([request])[0].tokens
    assert again == first and engine.stats.prefix_hit_tokens == 32


def test_requests_together_share_a_prefix_and_each_gets_its_output_alone(shipped, text):
    """Eight requests with one 48-token beginning, all at once: the first prefill leaves the blocks, the seven
    after it find them; every output is its cold one."""
    common = text[2000:2048]
    requests = [Request(common + text[2100 + 37 * i : 2110 + 37 * i], max_tokens=12, sampling=GREEDY)
                for i in range(8)]
    engine = Engine(shipped, n_blocks=800)
    outs = [c.tokens for c in engine.generate(requests)]
    assert engine.stats.prefix_hit_tokens == 7 * 48
    assert outs == [cold_tokens(shipped, r) for r in requests]
    assert all_free(engine)


def test_a_finished_sequence_leaves_its_output_blocks_for_a_follow_up(shipped, text):
    """A 40-token prompt and 30 tokens out store 69 tokens: 4 full blocks. A follow-up that repeats the exchange
    and asks more finds all 4 (64 tokens, past the 2 blocks of the prompt alone), with the cold output."""
    first = Request(text[3100:3140], max_tokens=30, sampling=GREEDY)
    engine = Engine(shipped, n_blocks=400)
    out = engine.generate([first])[0].tokens
    follow_up = Request(first.prompt + out + text[3500:3510], max_tokens=8, sampling=GREEDY)
    assert engine.generate([follow_up])[0].tokens == cold_tokens(shipped, follow_up)
    assert engine.stats.prefix_hit_tokens == 64 and all_free(engine)


def test_presets_and_budgets_never_share_blocks(shipped, text):
    prompt = text[3000:3064]
    engine = Engine(shipped, n_blocks=400)
    engine.generate([Request(prompt, max_tokens=4, sampling=GREEDY)])
    engine.generate([Request(prompt, max_tokens=4, sampling=GREEDY, max_cache_tokens=16)])  # compaction moves
    assert engine.stats.prefix_hit_tokens == 0
    cache = PrefixCache(engine.pool)
    assert cache.hashes(prompt, "full", 2) != cache.hashes(prompt, "quant4", 2)
    assert cache.hashes(prompt, "full", 2)[1] != cache.hashes(text[3016:3032] + prompt[16:], "full", 2)[1]


def test_kept_blocks_go_back_when_memory_is_needed(shipped, text):
    """A pool that holds about two requests: twenty different prompts one after another all finish, the cache
    giving back its oldest blocks as new prompts need them; reclaiming everything leaves every block free."""
    engine = Engine(shipped, n_blocks=4 * 8 * 10)  # 4 layers x 8 KV heads x 10 blocks: 160 tokens
    for i in range(20):
        engine.generate([Request(text[100 * i : 100 * i + 64], max_tokens=8, sampling=GREEDY)])
    assert engine.prefix.entries and engine.pool.n_free < engine.pool.n_blocks  # the last prompts' blocks kept
    assert all_free(engine)


def test_adopting_blocks_refuses_a_store_that_holds_tokens(shipped):
    engine = Engine(shipped, n_blocks=64)
    cache = build_cache(engine.spec, shipped.config, 1, torch.device("cpu"), torch.float32, pool=engine.pool)
    with torch.no_grad():
        shipped(torch.tensor([[1, 2, 3]]), cache)
    with pytest.raises(ValueError, match="only an empty store"):
        cache.layers[0].store.adopt(np.zeros((1, 8, 1), dtype=np.int32))
