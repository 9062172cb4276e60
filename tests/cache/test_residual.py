"""KIVI and GEAR in the block pool (cache/residual.py): whole blocks of encoded tokens, a full-precision residual
(KIVI's read as each head's tail by the paged kernel); the same bits as the codecs' contiguous store, ragged batches
as each row alone, and the blocks a step takes known before it runs (the serving engine's scheduler counts them)."""

import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from cache.base import LayerCache
from cache.kernels.choose import decode_kernel
from cache.kernels.cpu_decode import cpu_decode_paged
from cache.model_cache import ModelCache
from cache.presets import PRESETS, build_cache, build_pool, make_policy
from cache.quant import dequantize, quantize_per_channel, quantize_per_token
from cache.residual import ResidualPagedStore
from cache.storage import CodecStore
from toymodel.config import ModelConfig
from toymodel.model import Transformer

from kernel_checks import gathered_reference, paged_inputs, rel_err  # tests/kernel_checks.py

CPU = torch.device("cpu")
HAS_CC = shutil.which(os.environ.get("CC", "cc")) is not None
SPEC = replace(PRESETS["kivi2"], group_size=8, residual=16, block_tokens=8)  # flushes every 16 tokens
GEAR = replace(PRESETS["gear4"], group_size=8, residual=16, block_tokens=16)  # a chunk of 16 tokens per block


def config(n_kv_head: int) -> ModelConfig:
    return ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=64, block_size=128)


@pytest.mark.skipif(not HAS_CC, reason="no C compiler")
@pytest.mark.parametrize("H_kv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("bits", [4, 2])
def test_the_paged_kernel_reads_kivi_blocks_then_each_heads_tail(H_kv, bits):
    """Per-channel keys in blocks of whole groups, per-token values, then a float32 tail of a length per head (0
    included: a head whose residual was just flushed; a head with no blocks: a short prompt)."""
    B, bt, R, D = 2, 8, 16, 32
    lengths = [[n for n in (16, 32, 0, 48)[:H_kv]], [n for n in (48, 0, 16, 32)[:H_kv]]]
    q, pk, pv, tables, lens, _ = paged_inputs(B, 4, H_kv, 1, lengths, block_tokens=bt, seed=bits + H_kv)
    k_pool, v_pool = quantize_per_channel(pk, bits, 8), quantize_per_token(pv, bits, 8)  # (N, 1, bt, D) each
    tail_lengths = torch.tensor([[5, 0, 15, 1][:H_kv], [3, 7, 0, 15][:H_kv]], dtype=torch.int32)
    k_tail, v_tail = torch.randn(B, H_kv, R, D), torch.randn(B, H_kv, R, D)
    decoded = []
    for u in range(B * H_kv):  # each head: its blocks as stored (dequantized), then its tail
        b, h = divmod(u, H_kv)
        n, t = int(lens[b, h]), int(tail_lengths[b, h])
        ids = tables[b, h, : n // bt].long()
        k = dequantize(k_pool)[ids, 0].reshape(-1, D)
        v = dequantize(v_pool)[ids, 0].reshape(-1, D)
        decoded.append((torch.cat([k, k_tail[b, h, :t]]), torch.cat([v, v_tail[b, h, :t]])))
    out = cpu_decode_paged(q, k_pool, v_pool, tables, lens, (k_tail, v_tail, tail_lengths))
    assert rel_err(out, gathered_reference(q, decoded, H_kv)) < 2e-5


def contiguous(spec, model: Transformer, batch: int) -> ModelCache:
    """The codec's contiguous store (cache/storage.py), the reference the pool must equal bit for bit."""
    cfg, codec = model.config, spec.build_codec(model.config.head_dim)
    kernel = decode_kernel(model.backend.name, CPU, torch.float32) if codec.kernel_readable else None
    layers = [LayerCache(make_policy(spec, cfg), CodecStore(codec, torch.float32), kernel) for _ in range(cfg.n_layer)]
    return ModelCache(layers, batch, cfg.n_kv_head, cfg.head_dim, CPU)


@pytest.mark.parametrize("spec", [SPEC, GEAR], ids=["kivi2", "gear4"])
@pytest.mark.parametrize("backend", ["sdpa", "reference"], ids=["kernel", "gathered"])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_the_pool_gives_the_bits_of_the_contiguous_store(n_kv_head, backend, spec):
    """The same split into encoded units and residual, the same codes: every logit equal, through a prefill of 37
    tokens (two flushes and a residual of 5) and 40 decode steps (three more flushes). GEAR's blocks are decoded,
    then attended, in both."""
    torch.manual_seed(0)
    model = Transformer(config(n_kv_head), backend=backend).eval()
    ids = torch.randint(0, 97, (2, 37))
    runs = []
    for cache in (build_cache(spec, model.config, 2, CPU, torch.float32, backend), contiguous(spec, model, 2)):
        with torch.no_grad():
            logits = [model(ids, cache)]
            for _ in range(40):
                logits.append(model(logits[-1][:, -1:].argmax(-1), cache))
        runs.append(torch.cat(logits, 1))
    assert isinstance(build_cache(spec, model.config, 1, CPU, torch.float32).layers[0].store, ResidualPagedStore)
    assert torch.equal(runs[0], runs[1])


def test_blocks_fill_whole_and_the_next_steps_blocks_are_known():
    """A ragged batch: each row's quantized tokens are whole flushes of R (so whole blocks, no slack), its residual
    the rest; row_blocks() says which rows' next step flushes, and the pool agrees after the step."""
    torch.manual_seed(0)
    model = Transformer(config(2)).eval()
    lengths = torch.tensor([37, 15, 16])
    cache = build_cache(SPEC, model.config, 3, CPU, torch.float32)
    with torch.no_grad():
        model(torch.randint(0, 97, (3, 37)), cache, lengths=lengths)
        for step in range(20):
            held, nxt = cache.row_blocks()
            model(torch.randint(0, 97, (3, 1)), cache)
            after, _ = cache.row_blocks()
            assert (np.array(after) - np.array(held)).tolist() == nxt
    store = cache.layers[0].store
    seen = (lengths + 20).numpy()[:, None]  # (B, 1)
    assert (store._lengths == seen // 16 * 16).all() and (store._res == seen % 16).all()
    assert store.blocks_held() == int((seen // 16 * 16 // 8).sum()) * 2  # whole blocks of 8 tokens, 2 KV heads


def test_rows_of_a_shared_pool_join_and_leave_with_their_residual():
    """The serving engine's moves: sequences prefilled apart join a running batch and decode as they would alone;
    the rows that leave hand back every block. A prefix's blocks are refused (the residual depends on the end)."""
    torch.manual_seed(0)
    model = Transformer(config(2)).eval()
    pool = build_pool(SPEC, model.config, 64, CPU, torch.float32)
    ids = torch.randint(0, 97, (2, 40))
    a, b = (build_cache(SPEC, model.config, 1, CPU, torch.float32, pool=pool) for _ in range(2))
    alone = [build_cache(SPEC, model.config, 1, CPU, torch.float32) for _ in range(2)]
    with torch.no_grad():
        for row, (cache, n) in enumerate(((a, 21), (b, 35))):  # prompts of 21 and 35 tokens, prefilled apart
            model(ids[row : row + 1, :n], cache), model(ids[row : row + 1, :n], alone[row])
        a.extend(b)
        for t in range(12):
            step = ids[:, 21 + t : 22 + t]
            got = model(step, a)
            for row in range(2):
                torch.testing.assert_close(got[row], model(step[row : row + 1], alone[row])[0], rtol=0, atol=1e-5)
    a.drop_rows([False, True])
    assert pool.blocks_in_use() == sum(layer.store.blocks_held() for layer in a.layers)
    a.drop_rows([False])
    assert pool.n_free == pool.n_blocks
    with pytest.raises(ValueError, match="adopts whole flushes of its residual"):  # 1 block of 8: half a flush
        build_cache(SPEC, model.config, 1, CPU, torch.float32, pool=pool).layers[0].store.adopt(np.zeros((1, 2, 1)))
