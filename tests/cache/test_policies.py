"""Eviction policies: with room for everything each equals the full cache (one test over the registry); on
hand-made keys and attention each keeps exactly the tokens its definition names; eviction frees memory."""

from dataclasses import replace

import pytest
import torch

from cache.base import LayerCache, Policy, Step
from cache.policies import POLICIES
from cache.presets import PRESETS, CacheSpec, build_cache
from cache.quant import dequantize, quantize_per_token
from toymodel.attention import attention_weights, mix_values
from toymodel.config import ModelConfig
from toymodel.rope import apply_rope, rope_cos_sin

CPU = torch.device("cpu")
D = 8  # head_dim of the tiny config: d_model 32 / 4 heads


def config(n_kv_head: int = 2) -> ModelConfig:
    return ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=32, block_size=64)


def layer(policy: str, n_kv_head: int = 2, **fields: int | str) -> LayerCache:
    """A layer cache deciding at every step: blocks of one token evict as soon as a head holds budget + 1."""
    spec = replace(CacheSpec(policy=policy, sink=0, window=0, group_size=8, block_tokens=1), **fields)
    return build_cache(spec, config(n_kv_head), 1, CPU, torch.float32).layers[0]


def labelled(T: int, start: int = 0, H_kv: int = 2) -> torch.Tensor:
    """(1, H_kv, T, D) keys whose every entry is the token's index: stored keys name the tokens kept."""
    return torch.arange(start, start + T, dtype=torch.float32).view(1, 1, T, 1).expand(1, H_kv, T, D).clone()


def step(lc: LayerCache, k: torch.Tensor, v: torch.Tensor, seen: torch.Tensor | None = None) -> tuple:
    """One step of lc with hand-made attention: store k, v, then evict reading `seen` (H2O: the mass (B, H, n);
    SnapKV, KV-Compress: the weights (B, H, T, n); None for policies that read keys only) -> (K, V) attended."""
    if lc.store.paged:  # what ModelCache.positions does: every row adds its T tokens
        lc.store.rows.new = torch.full_like(lc.store.rows.new, k.shape[2])
    K, V = lc.store_tokens(None, k, v)
    lc.evict(K, seen)
    return K, V


def kept(layer_cache: LayerCache) -> list[list[int]]:
    """Token indices stored per KV head (read back from labelled keys)."""
    K, _ = layer_cache.store.read()  # (1, H_kv, n, D)
    return K[0, :, :, 0].long().tolist()


# ---------------------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_policy_with_room_for_everything_equals_full(make_model, run_chunks, policy, n_kv_head):
    model = make_model(n_kv_head, backend="reference")  # the same attention math as the observe() path
    idx = torch.randint(0, 97, (2, 30))
    spec = CacheSpec(policy=policy, budget=30, sink=2, window=4, kernel=3)
    backend = model.backend.name  # the caches attend as the model does, never with a decode kernel of their own
    full = run_chunks(model, idx, build_cache(PRESETS["full"], model.config, 2, CPU, torch.float32, backend), [9, 4])
    cache = build_cache(spec, model.config, 2, CPU, torch.float32, backend)
    logits = run_chunks(model, idx, cache, [9, 4])
    # the evicting policies attend over a gathered view where full reads its blocks as they lie: the same numbers,
    # which einsum may sum in another order
    torch.testing.assert_close(logits, full, rtol=0, atol=1e-6)
    assert all(len(layer) == 30 for layer in cache.layers)


@pytest.mark.parametrize("policy", ["window", "sink", "snapkv", "l2norm", "kvcompress"])  # in the block pool
def test_the_pool_evicts_a_blocks_worth_at_a_time_and_frees_whole_blocks(make_model, policy):
    """Blocks of 4: a head holds budget .. budget + 3 tokens (KV-Compress: on average over its layer's heads);
    each eviction cuts it back to the budget and hands the emptied blocks back to the pool."""
    model = make_model(2)
    spec = CacheSpec(policy=policy, budget=10, sink=2, window=3, kernel=3, block_tokens=4)
    cache = build_cache(spec, model.config, 1, CPU, torch.float32, max_tokens=40)
    pool, lengths = cache.layers[0].store.pool, []
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 12)), cache)
        for _ in range(20):
            model(torch.randint(0, 97, (1, 1)), cache)
            lengths.append(len(cache.layers[0]))
            assert pool.blocks_in_use() == sum(layer.store.blocks_held() for layer in cache.layers)
    assert min(lengths) == 10 and max(lengths) == 13  # 13 + 1 would fill a block past the budget: evict to 10
    for layer in cache.layers:  # each head holds its tokens' blocks, no more (KV-Compress: lengths per head)
        assert layer.store.blocks_held() == int((-(-layer.store.lengths.long() // 4)).sum())


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "full"])
def test_eviction_frees_memory_and_keeps_counting_positions(make_model, run_chunks, policy):
    model = make_model(2)
    spec = CacheSpec(policy=policy, budget=10, sink=2, window=3, kernel=3, block_tokens=1)  # evict every step
    cache = build_cache(spec, model.config, 2, CPU, torch.float32)
    run_chunks(model, torch.randint(0, 97, (2, 25)), cache, [12])
    assert all(layer.tokens_stored() == 2 * 2 * 10 for layer in cache.layers)  # B * H_kv * budget
    stored = 2 * 2 * 10 * D * 4 * 2  # B * H_kv * budget * D * fp32 * (K, V)
    assert stored <= cache.memory_bytes()["device"] / 2 < stored * 1.2  # only small per-token state on top
    expected = 10 if policy == "sink" else 25  # StreamingLLM counts slots, every other policy tokens seen
    assert cache.positions(1).tolist() == [[expected]] * 2  # (B, T)


def test_gqa_saving_survives_eviction(make_model, run_chunks):
    bytes_by_kv_heads = {}
    for n_kv_head in (4, 2, 1):
        cache = build_cache(replace(PRESETS["h2o"], budget=8, window=2), config(n_kv_head), 1, CPU, torch.float32)
        run_chunks(make_model(n_kv_head), torch.randint(0, 97, (1, 20)), cache, [10])
        bytes_by_kv_heads[n_kv_head] = cache.total_bytes()
    assert bytes_by_kv_heads[4] == 2 * bytes_by_kv_heads[2] == 4 * bytes_by_kv_heads[1]


# ---------------------------------------------------------------------------------------------------- hand-made


def test_window_keeps_the_last_tokens():
    lc = layer("window", budget=4)
    step(lc, labelled(6), labelled(6))
    assert kept(lc) == [[2, 3, 4, 5]] * 2
    K, _ = step(lc, labelled(1, 6), labelled(1, 6))
    assert K[0, 0, :, 0].tolist() == [2, 3, 4, 5, 6]  # attention sees the kept tokens and the new one
    assert kept(lc) == [[3, 4, 5, 6]] * 2


@pytest.mark.parametrize("sink, window", [(0, 0), (4, 0), (2, 3), (5, 9)])  # (5, 9): protected past the budget
def test_window_and_sink_pick_what_the_sorted_scores_pick(sink, window):
    """Window.select's closed form (first `sink` slots, then the most recent) against Policy.select's sort."""
    policy = POLICIES["sink" if sink else "window"](budget=12, sink=sink, window=window)
    for n in (5, 12, 13, 40):
        step = Step((2, 3, n), torch.device("cpu"), None, {}, None)
        want = Policy.select(policy, step)
        got = policy.select(step)
        assert (got is None and want is None) or torch.equal(got, want), n


def test_sink_keeps_sinks_and_recent_and_rerotates_keys_to_their_slot():
    """Keys arrive rotated at the slot the cache reported; after eviction each must be rotated by its new slot."""
    spec = CacheSpec(policy="sink", budget=6, sink=2, window=0, block_tokens=1)  # evict every step
    cache = build_cache(spec, config(2), 1, CPU, torch.float32)
    lc = cache.layers[0]
    raw = torch.randn(1, 2, 20, D)  # un-rotated keys of 20 tokens
    chunks = [8] + [1] * 12
    start = 0
    for T in chunks:
        pos = cache.positions(T)
        assert pos.tolist() == [list(range(len(lc), len(lc) + T))]  # slots, not tokens seen
        cos, sin = rope_cos_sin(pos[0], D, 10000.0)
        k = apply_rope(raw[:, :, start : start + T], cos, sin)
        K, _ = step(lc, k, k)
        cache.advance()
        start += T
    tokens = [0, 1, 15, 16, 17, 18, 19]  # 2 sinks + the 4 most recent kept before this step + the new token
    cos, sin = rope_cos_sin(torch.arange(7), D, 10000.0)
    torch.testing.assert_close(K, apply_rope(raw[:, :, tokens], cos, sin), rtol=0, atol=1e-5)
    assert len(lc) == 6 and cache.pos.tolist() == [20]


def test_h2o_keeps_heavy_hitters_summed_over_the_query_heads_of_a_group():
    lc = layer("h2o", budget=3, window=1)
    w = torch.zeros(1, 4, 6, 6)  # (B, H, T, Tk): query heads 0, 1 share KV head 0; 2, 3 share KV head 1
    w[0, 0, 5, 2], w[0, 1, 5, 0], w[0, 0, 4, 4] = 0.9, 0.8, 0.1
    w[0, 2, 5, 1], w[0, 3, 5, 1], w[0, 3, 4, 3], w[0, 2, 3, 0] = 0.4, 0.4, 0.7, 0.5  # sum: token 1 beats 0
    step(lc, labelled(6), labelled(6), w.sum(dim=2))  # (B, H, Tk): what H2O reads, summed over the queries
    assert kept(lc) == [[0, 2, 5], [1, 3, 5]]
    w = torch.zeros(1, 4, 1, 4)
    w[0, :2, 0, 2] = 1.0  # KV head 0: token 5 now has 2.0, more than token 0's accumulated 0.8
    step(lc, labelled(1, 6), labelled(1, 6), w.sum(dim=2))
    assert kept(lc) == [[2, 5, 6], [1, 3, 6]]  # KV head 1: token 5 received nothing, the heavy hitters stay


def test_snapkv_reads_only_the_observation_window_and_pools_neighbours():
    lc = layer("snapkv", budget=5, window=2, kernel=3)
    w = torch.zeros(1, 4, 10, 10)
    w[0, :, :8, 0] = 1.0  # queries before the observation window point at token 0: ignored
    w[0, :2, 8:, 3] = 1.0  # observation queries of KV head 0 point at token 3; pooling keeps 2 and 4 too
    w[0, 2:, 9, 6] = 1.0  # KV head 1: token 6, and its neighbours 5 and 7
    step(lc, labelled(10), labelled(10), w)
    assert kept(lc) == [[2, 3, 4, 8, 9], [5, 6, 7, 8, 9]]
    w = torch.zeros(1, 4, 1, 6)
    w[0, :, 0, 0] = 1.0  # decoding: the new query is the observation window; slots 2 and 3 tie at 0: the older
    step(lc, labelled(1, 10), labelled(1, 10), w)
    assert kept(lc) == [[2, 3, 4, 9, 10], [5, 6, 7, 9, 10]]


def test_snapkv_does_not_score_the_windows_attention_to_itself():
    """The observation window is kept anyway; its attention to its own keys must not leak through pooling into
    the token just before it (token 7 here), as in the SnapKV reference code and kvpress."""
    lc = layer("snapkv", budget=3, window=2, kernel=3)
    w = torch.zeros(1, 4, 10, 10)
    w[0, :, 8:, 8] = 1.0  # the observation queries look mostly at their own window
    w[0, :, 8:, 1] = 0.5  # and at token 1 before it
    step(lc, labelled(10), labelled(10), w)
    assert kept(lc) == [[0, 8, 9]] * 2  # 0, 1 and 2 tie after max pooling (the older wins); with the leak, token 7
    # (pooled next to 8, whose score is the window's attention to itself) would have won


@pytest.mark.parametrize("pooling,expected", [("max", [2, 3, 4, 8, 9]), ("avg", [4, 5, 6, 8, 9])])
def test_snapkv_pools_by_max_or_by_average(pooling, expected):
    lc = layer("snapkv", budget=5, window=2, kernel=3, pooling=pooling)
    w = torch.zeros(1, 4, 10, 10)
    w[0, :, 9, 3] = 0.9  # one sharp hit ...
    w[0, :, 9, 5] = w[0, :, 9, 6] = 0.6  # ... and a broader one: max pooling keeps the first, avg the second
    step(lc, labelled(10), labelled(10), w)
    assert kept(lc) == [expected] * 2


@pytest.mark.parametrize("policy", ["h2o", "l2norm"])
def test_policies_that_evict_by_score_alone_refuse_an_empty_recent_window(policy):
    """Without a protected window, H2O and L2-norm evict the token just generated at most decoding steps."""
    with pytest.raises(ValueError, match=f"policy={policy} needs cache.window >= 1"):
        layer(policy, budget=8, window=0)


def test_l2norm_keeps_the_lowest_norm_keys_per_head():
    lc = layer("l2norm", budget=3, window=1)
    norms = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0, 6.0], [1.0, 5.0, 2.0, 6.0, 4.0, 3.0]])  # (H_kv, T)
    k = torch.ones(1, 2, 6, D) * (norms / D**0.5).view(1, 2, 6, 1)  # (1, H_kv, T, D) with those norms
    step(lc, k, labelled(6))
    assert lc.store.read()[1][0, :, :3, 0].long().tolist() == [[1, 3, 5], [0, 2, 5]]


def test_kvcompress_gives_heads_different_budgets_and_attends_over_ragged_heads_exactly():
    lc = layer("kvcompress", budget=3, window=1, kernel=1)  # one layer budget: 3 * 2 KV heads = 6 tokens
    w = torch.zeros(1, 4, 8, 8)
    w[0, :, :7, 0] = 1.0
    w[0, :2, 7, 2] = 1.0  # KV head 0: the observation query attends to token 2 only
    w[0, 2:, 7] = torch.arange(1.0, 9.0) / 36  # KV head 1: spread, growing toward recent tokens
    step(lc, labelled(8), labelled(8), w)
    assert lc.store.lengths.tolist() == [[2, 4]]  # ragged: 2 + 4 = 6 = budget * H_kv
    assert kept(lc) == [[2, 7, 0, 0], [4, 5, 6, 7]]  # each head's tokens from its first slot, zero past its length
    assert lc.store.blocks_held() == 6  # blocks of one token: the evicted ones went back to the pool
    # Decode one token: attention over the gathered view must equal attention over each head's real keys.
    lc.store.rows.new = torch.ones_like(lc.store.rows.new)
    K, V = lc.store_tokens(None, labelled(1, 8) + 0.1 * torch.randn(1, 2, 1, D),
                           labelled(1, 8) + torch.randn(1, 2, 1, D))
    assert K.shape == (1, 2, 5, D) and torch.all(K[0, 0, 3:] == 0)  # head 0: [2, 7, 8, pad, pad]
    q = torch.randn(1, 4, 1, D)
    weights = attention_weights(q, K, visible=lc.store.visible(1))  # (1, 4, 1, 5), zero past each head's length
    lc.evict(K, weights)
    out = mix_values(weights, V)  # (1, 4, 1, D)
    for h, n in enumerate([3, 5]):
        qh = q[:, 2 * h : 2 * h + 2]  # the two query heads of KV head h
        ref = torch.softmax(qh @ K[:, h, :n].transpose(-1, -2) / D**0.5, dim=-1) @ V[:, h, :n]
        torch.testing.assert_close(out[:, 2 * h : 2 * h + 2], ref, rtol=1e-6, atol=1e-6)
    assert int(lc.store.lengths.sum()) == 6 and lc.store.blocks_held() == 6


def test_eviction_with_quantization_selects_codes_without_requantizing():
    spec = replace(PRESETS["sink_int4"], budget=5, sink=2, group_size=4, block_tokens=1)  # evicts at every step
    cache = build_cache(spec, config(2), 1, CPU, torch.float32)
    lc = cache.layers[0]
    k = torch.randn(1, 2, 9, D)
    step(lc, k, k)
    expected = quantize_per_token(k[:, :, [0, 1, 6, 7, 8]], 4, 4)  # sinks 0, 1 + the last 3, as they arrived
    rows = torch.from_numpy(lc.store._places(torch.arange(5).expand(1, 2, 5).numpy()))  # (1, 2, 5) pool rows
    kept = lc.store.pool.codec.key.take_rows(lc.store.pool.k, rows)
    assert torch.equal(kept.codes, expected.codes)
    assert torch.equal(kept.scale, expected.scale) and torch.equal(kept.zero, expected.zero)
    window = layer("window", budget=3, codec="int4", group_size=4)  # the block pool moves codes as stored too
    step(window, k, k)
    assert torch.equal(window.store.read()[1], dequantize(quantize_per_token(k[:, :, 6:], 4, 4)))
