"""The one-call decode block (cache/kernels/cpu_block.py) against the same model run op by op: a ragged batch of
every full-precision preset and quant8/quant4's per-token codes, MHA/GQA/MQA, evicting while it decodes; the same
logits and tokens, the same blocks and policy state left behind; and the cases where it must step aside."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from cache.kernels.cpu_block import MAX_ROWS, BlockKernel
from cache.presets import PRESETS, build_cache
from cache.quant import quantize_per_channel
from memhier.cache import MemhierSpec, build_tiered_cache
from kernel_checks import on_threads  # tests/kernel_checks.py
from toymodel.config import ModelConfig
from toymodel.decode_layout import pack_for_decode
from toymodel.model import Transformer

PRESETS_ONE_CALL = ["full", "window", "sink", "h2o", "snapkv", "l2norm", "kvcompress", "quant8", "quant4"]


@pytest.fixture
def packed_model(make_model):
    """The cache tests' tiny model (tests/cache/conftest.py), packed for decoding with the C kernels."""
    return lambda n_kv_head: pack_for_decode(make_model(n_kv_head))


def small(preset: str):
    """The preset with a budget the tiny model's prompts overflow (12 tokens per head, blocks of 4), codes in groups
    of the tiny model's head_dim (8)."""
    return replace(PRESETS[preset], budget=12, window=4, sink=2 if preset == "sink" else 0, block_tokens=4,
                   group_size=8)


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """The batch size of every one-call block that ran (so a test fails if the fast path silently stepped aside)."""
    seen = []
    prepare = BlockKernel.prepare

    def spy(self, B, *args, **kwargs):
        seen.append(B)
        return prepare(self, B, *args, **kwargs)

    monkeypatch.setattr(BlockKernel, "prepare", spy)
    return seen


def decode(model, spec, ids, lengths, steps):
    """Prefill the right-padded ids (B, T) with `lengths`, then decode `steps` greedy tokens -> (decode logits
    (B, steps, V), tokens (B, steps), the cache)."""
    cache = build_cache(spec, model.config, ids.shape[0], "cpu", torch.float32)
    with torch.inference_mode():
        token = model(ids, cache, last_only=True, lengths=lengths)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        logits = []
        for _ in range(steps):
            logits.append(model(token, cache)[:, -1])  # (B, V)
            token = logits[-1].argmax(-1, keepdim=True)
    logits = torch.stack(logits, 1)
    return logits, logits.argmax(-1), cache


def held(cache):
    """Every layer's kept tokens as attention reads them (K, V per layer) and the policy's per-token state."""
    with torch.inference_mode():
        return [(layer.store.read(), {name: t.clone() for name, t in layer.state.items()}) for layer in cache.layers]


@pytest.mark.parametrize("preset", PRESETS_ONE_CALL)
@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_one_call_blocks_decode_as_the_operations_do(packed_model, calls, n_kv_head, preset):
    """Rows of 30, 5 and 17 prompt tokens: the evicting presets evict in row 0 at prefill and in every row while
    decoding (kvcompress: heads of different lengths)."""
    model = packed_model(n_kv_head)
    ids = torch.randint(0, 97, (3, 30), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([30, 5, 17])
    fast_logits, fast_tokens, fast_cache = decode(model, small(preset), ids, lengths, steps=24)
    assert calls == [3] * 24 * model.config.n_layer  # every decode step of every layer took the one call
    assert all(layer.block_kernel.serves(block) for layer, block in zip(fast_cache.layers, model.layers))
    for block in model.layers:
        block.one_call = False
    logits, tokens, cache = decode(model, small(preset), ids, lengths, steps=24)
    assert len(calls) == 24 * model.config.n_layer  # none more
    assert torch.equal(fast_tokens, tokens)
    torch.testing.assert_close(fast_logits, logits, rtol=0, atol=1e-5)
    for (fast_kv, fast_state), (kv, state) in zip(held(fast_cache), held(cache)):
        for a, b in zip(fast_kv, kv):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert fast_state.keys() == state.keys()
        for name in state:
            torch.testing.assert_close(fast_state[name], state[name], rtol=0, atol=1e-5)
    for a, b in zip(fast_cache.layers, cache.layers):
        assert np.array_equal(a.store.token_counts(), b.store.token_counts())
    if PRESETS[preset].policy != "full":
        assert all(layer.store.token_counts().sum(axis=1).max() < 16 * n_kv_head for layer in cache.layers)  # evicted


def test_a_batch_past_the_op_by_op_c_products_still_takes_one_call(packed_model, calls):
    """20 rows: op by op, the BLAS multiplies them (cpu_matmul.MAX_ROWS = 16); the one call keeps its C products."""
    model = packed_model(2)
    ids = torch.randint(0, 97, (20, 9), generator=torch.Generator().manual_seed(3))
    fast_logits, fast_tokens, _ = decode(model, PRESETS["full"], ids, None, steps=4)
    assert calls == [20] * 4 * model.config.n_layer
    for block in model.layers:
        block.one_call = False
    logits, tokens, _ = decode(model, PRESETS["full"], ids, None, steps=4)
    assert torch.equal(fast_tokens, tokens)
    torch.testing.assert_close(fast_logits, logits, rtol=0, atol=1e-5)


def test_the_one_call_block_gives_the_same_bytes_on_one_thread_and_two(packed_model, calls):
    model = packed_model(2)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(2))
    runs = [on_threads(n, lambda: decode(model, PRESETS["full"], ids, None, steps=8)[0]) for n in (1, 2)]
    assert calls and torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("case", ["kivi4", "unpacked", "too many rows", "memhier", "observer"])
def test_the_operations_run_where_the_one_call_block_does_not_serve(make_model, packed_model, calls, case):
    """KIVI's residual beside its blocks, a model without the C products, more rows than the one call serves,
    memhier's tiers and an observer of the attention beside a policy that evicts decode op by op."""
    model = packed_model(2) if case != "unpacked" else make_model(2)
    B = MAX_ROWS + 1 if case == "too many rows" else 2
    preset = {"kivi4": "kivi4", "observer": "h2o"}.get(case, "full")
    spec = replace(PRESETS[preset], group_size=8, block_tokens=8)  # head_dim 8
    if case == "memhier":
        cache = build_tiered_cache(spec, MemhierSpec(enabled=True), model.config, B, "cpu", torch.float32)
    else:
        cache = build_cache(spec, model.config, B, "cpu", torch.float32)
    if case == "observer":
        for layer in cache.layers:
            layer.observe = lambda q, store, weights: None
    with torch.inference_mode():
        model(torch.randint(0, 97, (B, 9)), cache)
        model(torch.randint(0, 97, (B, 1)), cache)
    assert calls == []


def test_an_observer_sees_in_one_call_the_weights_it_sees_op_by_op(packed_model, calls):
    """The serving engine's KV-Compress scores read every decode step's softmax weights: in one call they are
    those op by op hands out (the same kernel), ragged rows and heads included, and the queries are None."""
    model = packed_model(2)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(8))
    seen = {}
    for one_call in (True, False):
        for block in model.layers:
            block.one_call = one_call
        cache = build_cache(replace(PRESETS["full"], block_tokens=4), model.config, 3, "cpu", torch.float32)
        got = seen[one_call] = []
        with torch.inference_mode():
            model(ids, cache, lengths=torch.tensor([11, 5, 8]))
            for layer in cache.layers:
                layer.observe = lambda q, store, weights: got.append((q is None, weights.clone()))
            model(torch.tensor([[1], [2], [3]]), cache)
    assert calls == [3] * model.config.n_layer
    assert [q for q, _ in seen[True]] == [True] * model.config.n_layer and not any(q for q, _ in seen[False])
    for (_, fast), (_, slow) in zip(seen[True], seen[False], strict=True):
        assert fast.shape == (3, model.config.n_head, 1, 12) and torch.equal(fast, slow)
        assert fast[1, :, :, 6:].abs().sum() == 0  # the 6-token row sees no slot past its own


def test_an_observer_with_running_scores_gets_the_squared_weights_added_in_place(packed_model, calls):
    """An observer offering `squares_into` (the serving engine's KV-Compress scores) is not handed the weights in
    one call: its tensor, wider than the keys, gets the step's squared weights summed over each KV head's queries
    added in place, as it would add them from the weights op by op hands out. Rows of 300, 5 and 270 tokens: the
    kernel sums 256 keys at a time."""
    model = long_model()
    ids = torch.randint(0, 97, (3, 300), generator=torch.Generator().manual_seed(8))
    old = torch.rand(3, 2, 320, generator=torch.Generator().manual_seed(9))

    class Running:
        def __init__(self):
            self.scores, self.weights, self.widths = old.clone(), None, []

        def __call__(self, q, store, weights):
            self.weights = weights

        def squares_into(self, L):
            self.widths.append(L)
            return self.scores

    observers = {}
    for one_call in (True, False):
        for block in model.layers:
            block.one_call = one_call
        cache = build_cache(replace(PRESETS["full"], block_tokens=4), model.config, 3, "cpu", torch.float32)
        with torch.inference_mode():
            model(ids, cache, lengths=torch.tensor([300, 5, 270]))
            observers[one_call] = [Running() for _ in cache.layers]
            for layer, observer in zip(cache.layers, observers[one_call]):
                layer.observe = observer
            model(torch.tensor([[1], [2], [3]]), cache)
    assert calls == [3] * model.config.n_layer
    for fast, slow in zip(observers[True], observers[False], strict=True):
        assert fast.weights is None and fast.widths == [301] and slow.widths == []
        want = old.clone()
        want[:, :, :301] += slow.weights.square().view(3, 2, -1, 301).sum(dim=2)  # (B, H_kv, L): over each group
        torch.testing.assert_close(fast.scores, want, rtol=0, atol=1e-7)


def test_h2o_totals_add_up_in_one_call_as_op_by_op_past_a_chunk_of_keys(calls):
    """H2O's totals over 300 keys, which the kernel sums 256 at a time (the last chunk partly new keys)."""
    model = long_model()
    ids = torch.randint(0, 97, (2, 300), generator=torch.Generator().manual_seed(4))
    spec = replace(PRESETS["h2o"], budget=400, block_tokens=4)
    fast_logits, _, fast_cache = decode(model, spec, ids, torch.tensor([300, 260]), steps=3)
    assert calls == [2] * 3 * model.config.n_layer
    for block in model.layers:
        block.one_call = False
    logits, _, cache = decode(model, spec, ids, torch.tensor([300, 260]), steps=3)
    torch.testing.assert_close(fast_logits, logits, rtol=0, atol=1e-5)
    for fast, slow in zip(fast_cache.layers, cache.layers):
        assert fast.state["mass"].shape[2] == 303
        torch.testing.assert_close(fast.state["mass"], slow.state["mass"], rtol=0, atol=1e-5)


def long_model():
    """A tiny model packed for decoding with room for 512 positions."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, block_size=512)
    return pack_for_decode(Transformer(config).eval())


def test_only_a_model_packed_with_the_c_kernels_has_a_block_kernel(make_model):
    model = make_model(2)
    assert BlockKernel.of(model.layers[0]) is None and not model.layers[0].one_call
    assert BlockKernel.of(pack_for_decode(model, cpu_norm=False).layers[0]) is None  # PyTorch's norm
    assert BlockKernel.of(pack_for_decode(model).layers[0]) is not None and model.layers[0].one_call
    assert not pack_for_decode(model, one_call=False).layers[0].one_call


def test_a_model_packed_again_gets_a_kernel_of_its_new_weights(packed_model):
    """A layer keeps its block's kernel from step to step; packing the model again (new packed weights) makes the
    next step build one over the new weights, whose logits are the op-by-op path's."""
    prompt, steps = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(3)), [[5], [6], [7]]
    model, reference = packed_model(2), packed_model(2)
    for block in reference.layers:
        block.one_call = False
    caches = [build_cache(PRESETS["full"], m.config, 1, "cpu", torch.float32) for m in (model, reference)]
    with torch.inference_mode():
        for m, cache in zip((model, reference), caches):
            m(prompt, cache)
        kernels = []
        for token in steps:
            if token == [7]:
                pack_for_decode(model)
            got, want = (m(torch.tensor([token]), cache) for m, cache in zip((model, reference), caches))
            kernels.append(caches[0].layers[0].block_kernel)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert kernels[0] is kernels[1] and kernels[2] is not kernels[1] and kernels[2].serves(model.layers[0])


def test_the_kernel_refuses_tables_it_cannot_read_as_raw_memory(packed_model):
    model = packed_model(2)
    kernel = BlockKernel.of(model.layers[0])
    cache = build_cache(PRESETS["full"], model.config, 1, "cpu", torch.float32)
    with torch.inference_mode():
        model(torch.randint(0, 97, (1, 9)), cache)
    store, x, angles = cache.layers[0].store, torch.zeros(1, 1, 32), torch.zeros(1, 4)
    tables, lengths = store.read_view()
    with pytest.raises(ValueError, match="tables must be a contiguous int32 array"):
        kernel(x, angles, angles, store.pool.k, store.pool.v, store.decode_rows(), tables.astype(np.int64), lengths)
    with pytest.raises(ValueError, match=r"at \(B \* H_kv,\) int64"):
        kernel(x, angles, angles, store.pool.k, store.pool.v, store.decode_rows().astype(np.int32), tables, lengths)
    with pytest.raises(ValueError, match="lengths"):
        kernel(x, angles, angles, store.pool.k, store.pool.v, store.decode_rows(), tables, lengths[:, :1].copy())
    strided = torch.zeros(*store.pool.k.shape[:3], 16)[..., :8]  # reads fine (copied), but C writes in place
    with pytest.raises(ValueError, match="k_pool must be contiguous float32 blocks"):
        kernel(x, angles, angles, strided, store.pool.v, store.decode_rows(), tables, lengths)
    codes = quantize_per_channel(store.pool.k[:2].reshape(1, 1, -1, 8), bits=4, group_size=8)  # keys' KIVI codes
    with pytest.raises(ValueError, match="v_pool must be contiguous per-token codes"):
        kernel(x, angles, angles, store.pool.k, codes, store.decode_rows(), tables, lengths)
