"""The block pool and the paged store: accounting, slack, the paged decode kernel against a gathered reference, and
ragged batches (rows of different lengths in one forward) against each row alone."""

import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from cache.base import LayerCache
from cache.codecs import full_precision
from cache.kernels.cpu_decode import cpu_decode_paged, cpu_decode_segments
from cache.model_cache import ModelCache
from cache.pool import BlockPool
from cache.presets import PRESETS, build_cache, build_pool, make_policy
from cache.storage import CodecStore
from serving.kvcompress import compact
import toymodel.attention as attention_module
from toymodel.attention import attention_weights
from toymodel.config import ModelConfig
from toymodel.model import Transformer

from kernel_checks import gathered_reference, on_threads, paged_inputs, rel_err  # tests/kernel_checks.py

CPU = torch.device("cpu")
HAS_CC = shutil.which(os.environ.get("CC", "cc")) is not None


def config(n_kv_head: int) -> ModelConfig:
    return ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=32, block_size=64)


# ---------------------------------------------------------------------------------------------------- the pool


def test_rows_join_a_batch_and_leave_it_with_their_blocks():
    """Two caches in one shared pool: the second's rows join the first's without a copy, decode with them as each
    row would alone, and dropped rows hand their blocks back."""
    torch.manual_seed(0)
    model = Transformer(config(2)).eval()
    pool = build_pool(PRESETS["full"], model.config, 64, CPU, torch.float32)
    ids = torch.randint(0, 97, (3, 20))
    a, b = (build_cache(PRESETS["full"], model.config, n, CPU, torch.float32, pool=pool) for n in (1, 2))
    alone = build_cache(PRESETS["full"], model.config, 3, CPU, torch.float32)
    with torch.no_grad():
        model(ids[:1, :12], a), model(ids[1:, :20], b), model(ids[:, :20], alone, lengths=torch.tensor([12, 20, 20]))
        a.extend(b)
        held = pool.blocks_in_use()
        step = torch.stack([ids[0, 12], ids[1, 19], ids[2, 19]]).view(3, 1)
        torch.testing.assert_close(model(step, a), model(step, alone), rtol=0, atol=1e-5)
    assert a.batch_size == 3 and a.pos.tolist() == [13, 21, 21] and pool.blocks_in_use() == held  # no block moved
    a.drop_rows([True, False, True])
    assert a.batch_size == 2 and a.pos.tolist() == [13, 21]
    assert pool.blocks_in_use() == sum(layer.store.blocks_held() for layer in a.layers)  # row 1's blocks are back
    a.drop_rows([False, False])
    assert pool.n_free == pool.n_blocks
    with pytest.raises(ValueError, match="same block pool"):
        a.extend(build_cache(PRESETS["full"], model.config, 1, CPU, torch.float32))
    with pytest.raises(ValueError, match="only under its policy"):
        a.extend(build_cache(replace(PRESETS["h2o"], block_tokens=16), model.config, 1, CPU, torch.float32, pool=pool))



def test_blocks_are_allocated_released_and_reused():
    pool = BlockPool(full_precision(), 8, 4, 3, CPU, torch.float32)
    a = pool.allocate(2)
    assert a.tolist() == [0, 1] and pool.blocks_in_use() == 2
    b = pool.allocate(3)  # more than are free: the pool doubles
    assert pool.n_blocks == 6 and pool.blocks_in_use() == 5 and sorted(a.tolist() + b.tolist()) == [0, 1, 2, 3, 4]
    pool.release(a)
    assert pool.blocks_in_use() == 3 and pool.allocate(1)[0] in (0, 1)
    with pytest.raises(ValueError, match="released but not held"):
        pool.release([5])
    fixed = BlockPool(full_precision(), 8, 4, 1, CPU, torch.float32, grow=False)
    with pytest.raises(MemoryError, match="1 free blocks of 1, 2 needed"):
        fixed.allocate(2)


def test_freeing_a_cache_returns_every_block():
    cache = build_cache(replace(PRESETS["full"], block_tokens=4), config(2), 3, CPU, torch.float32)
    model = Transformer(config(2)).eval()
    with torch.no_grad():
        model(torch.randint(0, 97, (3, 9)), cache, lengths=torch.tensor([9, 2, 5]))
        model(torch.randint(0, 97, (3, 1)), cache)
    pool = cache.layers[0].store.pool
    assert pool.blocks_in_use() == 2 * 2 * (3 + 1 + 2)  # layers * heads * blocks of 4 for 10, 3 and 6 tokens
    for layer in cache.layers:
        layer.store.free()
    assert pool.blocks_in_use() == 0 and all(r == 0 for r in pool.refs)


def test_compacting_a_few_rows_of_every_layer_equals_each_layers_keep_that_keeps_the_others_whole():
    """serving.kvcompress.compact compacts a few rows of every layer at once (one move in the pool the layers share):
    the same tables, lengths, tokens and free blocks as PagedStore.keep over each whole layer with every other row
    keeping all it holds. keep refuses a mask that misses slots a head holds, and slots past a head's end."""
    torch.manual_seed(0)
    model = Transformer(config(2)).eval()
    ids, lengths = torch.randint(0, 97, (3, 30)), torch.tensor([30, 25, 17])
    caches = [build_cache(replace(PRESETS["full"], block_tokens=4), config(2), 3, CPU, torch.float32) for _ in "ab"]
    with torch.no_grad():
        for cache in caches:
            model(ids, cache, lengths=lengths)
    few, whole = caches
    rows = np.array([2, 0])  # rows 2 and 0 compact, in that order; row 1 keeps its 25 tokens
    keep = (torch.rand(2, 2 * 2, 30) < 0.5) & (torch.arange(30) < lengths[rows, None, None])  # (2, layers * H_kv, L)
    compact(few, keep.numpy(), rows)
    for l, layer in enumerate(whole.layers):
        mask = torch.arange(30) < layer.store.lengths.long().unsqueeze(-1)  # (3, H_kv, 30): every token kept
        mask[torch.from_numpy(rows)] = keep[:, 2 * l : 2 * l + 2]  # layer l's heads
        layer.store.keep(mask, {})
    for a, b in zip(few.layers, whole.layers):
        assert torch.equal(a.store.lengths, b.store.lengths) and torch.equal(a.store.tables, b.store.tables)
        torch.testing.assert_close(a.store.read(), b.store.read(), rtol=0, atol=0)
    assert few.layers[1].store.lengths[1].tolist() == [25, 25]
    assert few.layers[1].store.lengths[0].tolist() == keep[1, 2:].sum(dim=-1).tolist()
    pool = few.layers[0].store.pool
    assert pool.blocks_in_use() == whole.layers[0].store.pool.blocks_in_use() < 2 * 2 * (8 + 7 + 5)
    store = whole.layers[0].store
    with pytest.raises(ValueError, match="covers 10 slots"):
        store.keep(torch.ones(3, 2, 10, dtype=torch.bool), {})  # row 1 holds 25
    with pytest.raises(ValueError, match="last kept slot must be below"):
        store.keep(torch.tensor([[[3, 30], [3, 29]]]).expand(3, 2, 2), {})  # slot 30 is past every head's end


@pytest.mark.parametrize("block_tokens", [1, 4, 16])
def test_slack_is_at_most_one_partial_block_per_head(block_tokens):
    """bits per element == 32 (fp32) * slots held / tokens stored, slots = tokens rounded up to whole blocks."""
    cfg = config(2)
    cache = build_cache(replace(PRESETS["full"], block_tokens=block_tokens), cfg, 1, CPU, torch.float32)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 5)), cache)
        for n in range(6, 40):
            model(torch.randint(0, 97, (1, 1)), cache)
            store = cache.layers[0].store
            assert store.blocks_held() == cfg.n_kv_head * -(-n // block_tokens)
            blocks = store.blocks_held() * store.pool.block_bytes()
            assert blocks == cfg.n_kv_head * -(-n // block_tokens) * block_tokens * 2 * cfg.head_dim * 4


def test_preferred_blocks_are_taken_only_when_free_and_never_twice():
    pool = BlockPool(full_precision(), 8, 4, 8, CPU, torch.float32, grow=False)
    a = pool.allocate(3, np.array([5, 6, 5]))  # the second 5 is taken by then: the stack gives another
    assert a.tolist()[:2] == [5, 6] and a[2] not in (5, 6)
    b = pool.allocate(5)  # the stack still lists 5 and 6: skipped, never handed out twice
    held = a.tolist() + b.tolist()
    assert sorted(held) == list(range(8)) and pool.n_free == 0 and all(r == 1 for r in pool.refs)
    pool.release(a)
    assert sorted(pool.allocate(3, np.array([-1, 7, 0])).tolist()) == sorted(a.tolist())


def test_a_pool_sized_to_the_need_lays_each_head_out_in_one_run():
    """Prefill, then decode steps that need new blocks: every head's blocks follow each other in the pool, so the
    kernel reads each head as one piece."""
    cache = build_cache(replace(PRESETS["full"], block_tokens=4), config(2), 2, CPU, torch.float32, max_tokens=30)
    model = Transformer(config(2)).eval()
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 9)), cache, lengths=torch.tensor([9, 6]))
        for _ in range(12):
            model(torch.randint(0, 97, (2, 1)), cache)
    for layer in cache.layers:
        store = layer.store
        for b, h in np.ndindex(*store._held.shape):
            blocks = store._tables[b, h, : store._held[b, h]]
            assert (np.diff(blocks) == 1).all(), f"head ({b}, {h}) of a layer holds scattered blocks {blocks}"


def test_a_pool_sized_to_the_need_never_grows():
    cache = build_cache(PRESETS["full"], config(2), 2, CPU, torch.float32, max_tokens=40)
    model = Transformer(config(2)).eval()
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 40)), cache)
    pool = cache.layers[0].store.pool
    assert pool.n_blocks == pool.blocks_in_use() == 2 * 2 * 2 * 3  # B * layers * heads * ceil(40 / 16)


# ---------------------------------------------------------------------------------------------------- the kernel


@pytest.mark.skipif(not HAS_CC, reason="no C compiler")
@pytest.mark.parametrize("H_kv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("Tq", [1, 3])
def test_paged_kernel_reads_each_heads_own_blocks(H_kv, Tq):
    B = 3
    lengths = [[n + 7 * b for n in ([5, 17, 40, 3][:H_kv])] for b in range(B)]  # ragged over rows and heads
    q, pk, pv, tables, lens, heads = paged_inputs(B, 4, H_kv, Tq, lengths, block_tokens=8, seed=H_kv + Tq)
    out = cpu_decode_paged(q, pk, pv, tables, lens)
    assert rel_err(out, gathered_reference(q, heads, H_kv)) < 2e-5


@pytest.mark.skipif(not HAS_CC, reason="no C compiler")
def test_blocks_give_the_bits_of_one_contiguous_segment_on_any_thread_count():
    """A full cache moved from one buffer to blocks attends to the same bits: the value sum is one chain over all
    keys wherever they lie, and threads split (batch, head) units, never one softmax."""
    q, pk, pv, tables, lens, heads = paged_inputs(2, 4, 2, 1, [[50, 50], [50, 50]], block_tokens=16, seed=3)
    K = torch.stack([k for k, _ in heads]).view(2, 2, 50, -1)  # (B, H_kv, n, D)
    V = torch.stack([v for _, v in heads]).view(2, 2, 50, -1)
    want = cpu_decode_segments(q, [(K, V)])
    for threads in (1, 2, 3):
        assert torch.equal(on_threads(threads, lambda: cpu_decode_paged(q, pk, pv, tables, lens)), want)


# ---------------------------------------------------------------------------------------------------- ragged batches


@pytest.mark.parametrize("preset", ["window", "sink", "h2o", "snapkv", "l2norm", "kvcompress"])
def test_evicting_rows_join_and_leave_a_batch_with_their_state(preset):
    """Rows prefilled apart (one of them evicting already) join an evicting batch with their policy's per-token
    state, evict when their own turn comes, and decode as each would alone; a row leaving takes its state along."""
    torch.manual_seed(0)
    model = Transformer(config(2)).eval()
    spec = replace(PRESETS[preset], budget=12, window=4, sink=2 if preset == "sink" else 0, block_tokens=4)
    pool = build_pool(replace(spec, policy="full"), model.config, 256, CPU, torch.float32)
    ids = torch.randint(0, 97, (3, 60))
    lengths = [7, 19, 11]
    rows = [build_cache(spec, model.config, 1, CPU, torch.float32, pool=pool) for _ in lengths]
    alone = [build_cache(spec, model.config, 1, CPU, torch.float32) for _ in lengths]
    with torch.no_grad():
        for b, n in enumerate(lengths):
            model(ids[b : b + 1, :n], rows[b]), model(ids[b : b + 1, :n], alone[b])
        batch = rows[0]
        batch.extend(rows[1]), batch.extend(rows[2])
        for t in range(30):
            if t == 12:  # the middle row leaves
                batch.drop_rows([True, False, True])
            live = [0, 2] if t >= 12 else [0, 1, 2]
            step = torch.stack([ids[b, lengths[b] + t] for b in live]).view(-1, 1)  # (B, 1)
            got = model(step, batch)
            for row, b in enumerate(live):
                want = model(step[row : row + 1], alone[b])
                torch.testing.assert_close(got[row], want[0], rtol=0, atol=1e-5, msg=f"row {b}, step {t}")
    assert all(len(layer) < 16 for layer in batch.layers)  # they evicted
    batch.drop_rows([False, False])
    assert pool.n_free == pool.n_blocks


def run_greedy(model, ids, lengths, cache, steps):
    """Prefill the right-padded ids (B, T) with their lengths, then greedy-decode `steps` tokens -> (logits of the
    prefill's last tokens (B, 1, V), tokens (B, steps + 1), logits of every decode step (B, steps, V))."""
    with torch.no_grad():
        first = model(ids, cache, last_only=True, lengths=lengths)  # (B, 1, V)
        tokens, logits = [first[:, -1].argmax(-1)], []
        for _ in range(steps):
            logits.append(model(tokens[-1].unsqueeze(1), cache))  # (B, 1, V)
            tokens.append(logits[-1][:, -1].argmax(-1))
    return first, torch.stack(tokens, 1), torch.cat(logits, 1)


RAGGED = ["full", "quant4", "kivi2", "gear2", "window", "sink", "sink_int4", "h2o", "snapkv", "l2norm", "kvcompress"]


@pytest.mark.parametrize("preset", RAGGED)  # a codec each, and every policy that takes ragged batches
@pytest.mark.parametrize("backend", ["sdpa", "reference"], ids=["kernel", "gathered"])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_a_ragged_batch_equals_each_row_alone(n_kv_head, backend, preset):
    """KIVI and GEAR flush in rows 0 and 3; an evicting policy (12 tokens per head, blocks of 4) evicts in each row
    when its own turn comes: row 0 at prefill, the others while decoding (row 1 from its 9th step); StreamingLLM
    (2 sinks) gives each row's new tokens positions by its own slots."""
    torch.manual_seed(0)
    model = Transformer(config(n_kv_head), backend=backend).eval()
    lengths = torch.tensor([33, 7, 1, 20])
    ids = torch.randint(0, 97, (4, 33))
    block_tokens = 16 if PRESETS[preset].codec.startswith(("kivi", "gear")) else 4
    spec = replace(PRESETS[preset], block_tokens=block_tokens, group_size=8, residual=16, budget=12, window=4,
                   sink=2 if preset.startswith("sink") else 0)
    cache = build_cache(spec, model.config, 4, CPU, torch.float32, backend)
    first, tokens, logits = run_greedy(model, ids, lengths, cache, steps=12)
    assert cache.pos.tolist() == (lengths + 12).tolist()
    for b, n in enumerate(lengths.tolist()):
        alone = build_cache(spec, model.config, 1, CPU, torch.float32, backend)
        first_b, tokens_b, logits_b = run_greedy(model, ids[b : b + 1, :n], None, alone, steps=12)
        assert torch.equal(tokens[b], tokens_b[0]), f"row {b} ({n} prompt tokens) decoded other tokens in the batch"
        torch.testing.assert_close(first[b], first_b[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(logits[b], logits_b[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", ["h2o", "snapkv", "kvcompress"])
def test_a_ragged_prefill_reads_its_rows_real_queries_a_chunk_or_a_window_at_a_time(preset, monkeypatch):
    """Rows of 150, 70 and 3 prompt tokens (chunks of 64 queries; a row shorter than the 8-query window): each row
    keeps the tokens it keeps alone, and neither the policy's weights nor SDPA's float mask are written out for more
    than 64 queries at once (the (B, H, T, n) matrix of every query: 4.6 GB per layer for 8 rows of 8k tokens in
    the bench model)."""
    torch.manual_seed(2)
    model = Transformer(replace(config(2), block_size=256)).eval()
    lengths, ids = torch.tensor([150, 70, 3]), torch.randint(0, 97, (3, 150))
    spec = replace(PRESETS[preset], block_tokens=4, budget=24, window=8)
    written, masked, sdpa = [], [], attention_module.F.scaled_dot_product_attention
    spy = lambda q, k, **kwargs: (written.append(q.shape[2]), attention_weights(q, k, **kwargs))[1]
    monkeypatch.setattr(attention_module, "attention_weights", spy)
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", lambda q, k, v, attn_mask=None, **kwargs: (
        masked.append(q.shape[2] if attn_mask is not None else 0), sdpa(q, k, v, attn_mask=attn_mask, **kwargs))[1])
    batch = build_cache(spec, model.config, 3, CPU, torch.float32)
    with torch.no_grad():
        model(ids, batch, lengths=lengths)
        assert written and max(written) <= 64 and masked and max(masked) <= 64
        for b, n in enumerate(lengths.tolist()):
            alone = build_cache(spec, model.config, 1, CPU, torch.float32)
            model(ids[b : b + 1, :n], alone)
            for layer, layer_alone in zip(batch.layers, alone.layers):
                counts = layer_alone.store.token_counts()[0]  # (H_kv,)
                assert np.array_equal(layer.store.token_counts()[b], counts), f"row {b} kept other tokens"
                assert counts.max() < n or n <= 24  # it evicted (the 3-token row holds all it has)
                assert layer.state.keys() == layer_alone.state.keys()
                for h, c in enumerate(counts.tolist()):
                    torch.testing.assert_close(layer.store.read()[0][b, h, :c], layer_alone.store.read()[0][0, h, :c],
                                               rtol=0, atol=1e-5)
                    for name, state in layer.state.items():  # H2O's totals: its real queries' attention only
                        torch.testing.assert_close(state[b, h, :c], layer_alone.state[name][0, h, :c], rtol=0,
                                                   atol=1e-5)


def test_a_chunk_after_a_ragged_prefill_attends_each_rows_own_keys():
    """Rows standing at different positions take a second multi-token step (chunked prefill over the cache)."""
    torch.manual_seed(1)
    model = Transformer(config(2)).eval()
    ids = torch.randint(0, 97, (2, 30))
    cache = build_cache(PRESETS["full"], model.config, 2, CPU, torch.float32)
    with torch.no_grad():
        model(ids[:, :12], cache, lengths=torch.tensor([12, 5]))
        rest = torch.stack([ids[0, 12:20], ids[1, 5:13]])  # (2, 8): the next 8 tokens of each row
        got = model(rest, cache)
        want = [model(ids[:1, :20])[:, 12:], model(ids[1:, :13])[:, 5:]]
    for b in range(2):
        torch.testing.assert_close(got[b], want[b][0], rtol=0, atol=1e-5)


@pytest.mark.skipif(not HAS_CC, reason="no C compiler")
@pytest.mark.parametrize("Tq", [1, 3])
def test_the_kernel_hands_out_each_heads_softmax_weights(Tq):
    """What H2O and SnapKV read at a decode step: weights (B, H, Tq, max length), zero past each head's keys."""
    q, pk, pv, tables, lens, heads = paged_inputs(2, 4, 2, Tq, [[20, 7], [13, 30]], block_tokens=8, seed=Tq)
    out, weights = cpu_decode_paged(q, pk, pv, tables, lens, weights=True)
    assert torch.equal(out, cpu_decode_paged(q, pk, pv, tables, lens)) and weights.shape == (2, 4, Tq, 30)
    for u, (k, _) in enumerate(heads):
        b, h = divmod(u, 2)
        n = k.shape[0]
        want = attention_weights(q[b : b + 1, 2 * h : 2 * h + 2], k[None, None])[0]  # (G, Tq, n)
        torch.testing.assert_close(weights[b, 2 * h : 2 * h + 2, :, :n], want, rtol=0, atol=1e-6)
        assert not weights[b, 2 * h : 2 * h + 2, :, n:].any()


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_policies_reading_attention_decode_with_the_kernels_weights(policy):
    """In the pool, H2O and SnapKV decode with the kernel, which hands them the weights: the same tokens kept and
    logits as the reference backend, which writes the weights out."""
    idx = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(3))
    spec = replace(PRESETS[policy], budget=12, window=4, block_tokens=4)
    runs = {}
    for backend in ("sdpa", "reference"):
        torch.manual_seed(0)
        model = Transformer(config(2), backend=backend).eval()
        cache = build_cache(spec, model.config, 2, CPU, torch.float32, backend)
        with torch.no_grad():
            logits = [model(idx[:, :10], cache)] + [model(idx[:, t : t + 1], cache) for t in range(10, 30)]
        assert cache.layers[0].store.paged and (cache.layers[0].kernel is not None) == (backend == "sdpa")
        runs[backend] = torch.cat(logits, dim=1), [layer.store.read()[0] for layer in cache.layers]
    torch.testing.assert_close(runs["sdpa"][0], runs["reference"][0], rtol=0, atol=1e-5)
    for kept, ref in zip(runs["sdpa"][1], runs["reference"][1]):
        torch.testing.assert_close(kept, ref, rtol=0, atol=1e-6)  # the same tokens, in the same slots


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_sink_over_int_codes_in_the_pool_is_the_contiguous_store_bit_for_bit(backend):
    """sink_int4 keeps its keys in the pool as they arrived and rotates them at every read (an int code is never
    re-rotated): evicting at every step, the same logits as its contiguous store, 100 tokens past the context."""
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=64, block_size=64)
    torch.manual_seed(0)
    model = Transformer(cfg, backend=backend).eval()
    spec = replace(PRESETS["sink_int4"], budget=12, sink=2, group_size=8, block_tokens=1)
    codec = spec.build_codec()
    contiguous = ModelCache([LayerCache(make_policy(spec, cfg), CodecStore(codec, torch.float32)) for _ in range(2)],
                            2, cfg.n_kv_head, cfg.head_dim, CPU)
    ids = torch.randint(0, 97, (2, 20))
    runs = []
    for cache in (build_cache(spec, cfg, 2, CPU, torch.float32, backend), contiguous):
        with torch.no_grad():
            logits = [model(ids, cache)]
            for _ in range(100):
                logits.append(model(logits[-1][:, -1:].argmax(-1), cache))
        runs.append(torch.cat(logits, 1))
    assert torch.equal(runs[0], runs[1])

