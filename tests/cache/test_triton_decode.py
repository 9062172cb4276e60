"""The flash-decoding kernels (cache/kernels/triton_decode.py) against dequantize-then-reference: full-precision,
int8/int4/int2 per-token and KIVI caches, MHA/GQA/MQA, one or a few queries, ragged lengths, several splits.

On a GPU the kernels are compiled; without one they run under Triton's CPU interpreter (see conftest.py). Every
buffer the kernels allocate (the per-split partial results included) is filled with NaN first.
"""

import dataclasses

import pytest
import torch

from cache.presets import PRESETS
from cache.quant import dequantize, quantize_per_channel, quantize_per_token
from toymodel.attention import reference_attend
from toymodel.config import ModelConfig

from kernel_checks import (DEVICE, ON_GPU, TOL, gathered_reference, make_qkv, paged_inputs, rel_err,  # tests/
                           run_backends)  # kernel_checks.py

# (B, H, H_kv, Tq, Tk, D): a long-ish ragged cache against one or a few new tokens
CASES = {
    "mha-1tok": (1, 2, 2, 1, 77, 32),
    "gqa-3tok": (2, 4, 2, 3, 150, 32),  # several queries: the causal mask crosses the last split
    "mqa-1tok": (1, 4, 1, 1, 96, 64),
}


@pytest.mark.parametrize("split_size", [None, 32], ids=["default-split", "split32"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(CASES))
def test_decode_matches_reference(decode_kernels, case, causal, split_size, poisoned):
    q, k, v = make_qkv(*CASES[case])
    out = decode_kernels.triton_decode(q, k, v, causal=causal, split_size=split_size)
    assert rel_err(out, reference_attend(q, k, v, causal=causal)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not ON_GPU, reason="interpreter bf16 dot: triton#11584"))], ids=str)
def test_decode_half_precision(decode_kernels, dtype, poisoned):
    q, k, v = make_qkv(*CASES["gqa-3tok"], dtype=dtype)
    out = decode_kernels.triton_decode(q, k, v, split_size=64)
    assert out.dtype == dtype
    assert rel_err(out, reference_attend(q.float(), k.float(), v.float())) < TOL[dtype]


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("case", ["gqa-3tok", "mqa-1tok"])
def test_int_decode_matches_dequantized_reference(decode_kernels, case, bits, poisoned):
    q, k, v = make_qkv(*CASES[case], seed=bits)
    k_q, v_q = quantize_per_token(k, bits, 16), quantize_per_token(v, bits, 16)
    out = decode_kernels.triton_decode_int(q, k_q, v_q, split_size=32)
    ref = reference_attend(q, dequantize(k_q), dequantize(v_q))
    assert rel_err(out, ref) < TOL[torch.float32]


def test_int4_decode_with_fp16_queries(decode_kernels, poisoned):
    """The usual serving setup: fp16 model, int4 cache; the dequantized tile meets q on the fp16 tensor cores."""
    q, k, v = make_qkv(*CASES["gqa-3tok"], seed=5)
    k_q, v_q = quantize_per_token(k, 4, 32), quantize_per_token(v, 4, 32)
    out = decode_kernels.triton_decode_int(q.half(), k_q, v_q, split_size=64)
    assert out.dtype == torch.float16
    assert rel_err(out, reference_attend(q, dequantize(k_q), dequantize(v_q))) < TOL[torch.float16]


@pytest.mark.parametrize("bits,residual", [(4, 7), (2, 16), (4, 0)])
def test_kivi_decode_matches_dequantized_reference(decode_kernels, bits, residual, poisoned):
    """Keys per channel (groups of 16 tokens), values per token, plus a full-precision residual that the causal
    mask of the 3 new queries reaches into. residual=0: a freshly flushed cache."""
    B, H, H_kv, Tq, T_quant, D = 1, 4, 2, 3, 96, 32
    q, k, v = make_qkv(B, H, H_kv, Tq, T_quant + residual, D, seed=bits + residual)
    k_q = quantize_per_channel(k[:, :, :T_quant], bits, 16)
    v_q = quantize_per_token(v[:, :, :T_quant], bits, 16)
    k_res, v_res = k[:, :, T_quant:], v[:, :, T_quant:]  # (B, H_kv, R, D)
    out = decode_kernels.triton_decode_kivi(q, k_q, v_q, k_res, v_res, split_size=32)
    k_ref = torch.cat([dequantize(k_q), k_res], dim=2)  # (B, H_kv, T_quant + R, D)
    v_ref = torch.cat([dequantize(v_q), v_res], dim=2)
    assert rel_err(out, reference_attend(q, k_ref, v_ref)) < TOL[torch.float32]


@pytest.mark.parametrize("bits", [0, 4])  # 0: full precision
@pytest.mark.parametrize("H_kv,Tq", [(2, 1), (1, 3)], ids=["gqa-1tok", "mqa-3tok"])
def test_paged_decode_reads_each_heads_own_blocks(decode_kernels, H_kv, Tq, bits, poisoned):
    """Blocks of 8 tokens at shuffled places in the pool, every (b, h) its own length."""
    lengths = [[30, 9][:H_kv], [17, 44][:H_kv]]
    q, pk, pv, tables, lens, heads = paged_inputs(2, 4, H_kv, Tq, lengths, block_tokens=8, seed=bits + Tq)
    if bits:  # the reference reads the dequantized blocks, gathered by the same tables
        pk, pv = quantize_per_token(pk, bits, 16), quantize_per_token(pv, bits, 16)
        rows = [(block.long()[:, None] * 8 + torch.arange(8)).flatten()[:n]  # each head's rows of the pool
                for block, n in zip(tables.flatten(0, 1), lens.flatten().tolist())]
        heads = [(dequantize(pk).view(-1, 32)[r], dequantize(pv).view(-1, 32)[r]) for r in rows]
    move = lambda x: x.to(DEVICE) if isinstance(x, torch.Tensor) else dataclasses.replace(
        x, codes=x.codes.to(DEVICE), scale=x.scale.to(DEVICE), zero=x.zero.to(DEVICE))
    out = decode_kernels.triton_decode_paged(q.to(DEVICE), move(pk), move(pv), tables.to(DEVICE), lens.to(DEVICE),
                                             split_size=16)
    assert rel_err(out.cpu(), gathered_reference(q, heads, H_kv)) < TOL[torch.float32]


@pytest.mark.parametrize("bits", [4, 2])
def test_paged_kivi_decode_reads_blocks_then_each_heads_tail(decode_kernels, bits, poisoned):
    """KIVI in the pool: keys per channel in blocks of whole groups of 16, values per token, then each head's
    float32 tail of its own length (0: just flushed; a head without blocks: a short prompt), splits across both."""
    B, H_kv, bt, R, D = 2, 2, 16, 32, 32
    q, pk, pv, tables, lens, _ = paged_inputs(B, 4, H_kv, 1, [[32, 0], [16, 48]], block_tokens=bt, seed=bits)
    k_pool, v_pool = quantize_per_channel(pk, bits, 16), quantize_per_token(pv, bits, 16)
    tail_lengths = torch.tensor([[5, 9], [0, 31]], dtype=torch.int32)
    k_tail, v_tail = torch.randn(B, H_kv, R, D), torch.randn(B, H_kv, R, D)
    heads = []  # each head: its blocks as stored (dequantized), then its tail
    for u in range(B * H_kv):
        b, h = divmod(u, H_kv)
        ids, t = tables[b, h, : int(lens[b, h]) // bt].long(), int(tail_lengths[b, h])
        heads.append((torch.cat([dequantize(k_pool)[ids, 0].reshape(-1, D), k_tail[b, h, :t]]),
                      torch.cat([dequantize(v_pool)[ids, 0].reshape(-1, D), v_tail[b, h, :t]])))
    move = lambda x: dataclasses.replace(x, codes=x.codes.to(DEVICE), scale=x.scale.to(DEVICE),  # noqa: E731
                                         zero=x.zero.to(DEVICE))
    out = decode_kernels.triton_decode_paged(q.to(DEVICE), move(k_pool), move(v_pool), tables.to(DEVICE),
                                             lens.to(DEVICE), (k_tail.to(DEVICE), v_tail.to(DEVICE), tail_lengths),
                                             split_size=16)
    assert rel_err(out.cpu(), gathered_reference(q, heads, H_kv)) < TOL[torch.float32]


def test_combine_splits_is_exact(decode_kernels):
    """Merging per-split softmax results by log-sum-exp equals one softmax over all keys (pure PyTorch)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1, 1, 3, 40, generator=g)  # (B, H_kv, M, Tk) scores in log2 units
    v = torch.randn(1, 1, 40, 8, generator=g)  # (B, H_kv, Tk, D)
    parts = [(s[..., i:i + 16], v[:, :, i:i + 16]) for i in range(0, 40, 16)]  # splits of 16, 16, 8 keys
    o_part = torch.stack([torch.softmax(si * torch.log(torch.tensor(2.0)), -1) @ vi for si, vi in parts], dim=2)
    lse_part = torch.stack([torch.logsumexp(si * torch.log(torch.tensor(2.0)), -1) / torch.log(torch.tensor(2.0))
                            for si, _ in parts], dim=2)  # (B, H_kv, S, M) base 2
    expected = torch.softmax(s * torch.log(torch.tensor(2.0)), -1) @ v  # (B, H_kv, M, D)
    torch.testing.assert_close(decode_kernels.combine_splits(o_part, lse_part), expected, rtol=1e-5, atol=1e-6)


def test_decode_rejects_too_many_query_rows(decode_kernels):
    q, k, v = make_qkv(1, 4, 1, 40, 64, 32)  # G * Tq = 160 rows per KV head: a prefill, not a decode
    with pytest.raises(ValueError, match="G \\* Tq"):
        decode_kernels.triton_decode(q, k, v)


@pytest.mark.parametrize("preset", ["quant4", "kivi2"])
def test_the_model_decodes_a_quantized_cache_without_decoding_it(decode_kernels, preset):
    """backend=triton: each decode step hands the kernel the pool's blocks of codes (and KIVI's residual as each
    head's tail), never a decoded copy; the logits equal the reference backend's, which decodes the same stored
    bytes first."""
    config = ModelConfig(vocab_size=97, n_layer=1, n_head=4, n_kv_head=2, d_model=128, block_size=64)  # D = 32
    spec = dataclasses.replace(PRESETS[preset], group_size=8, residual=8, block_tokens=8)  # KIVI: flushes twice
    torch.manual_seed(0)
    idx = torch.randint(0, 97, (1, 26), device=DEVICE)

    def never_decoded(k, v, q=None):
        raise AssertionError("a decode step decoded the cache instead of handing the kernel its codes")

    def after_prefill(backend, cache):  # the prefill attends over decoded K/V (FlashAttention)
        if backend == "triton":
            assert cache.layers[0].kernel is decode_kernels.triton_decode_paged
            cache.layers[0].store.append = cache.layers[0].store.read = never_decoded

    runs = run_backends(config, spec, idx, 10, ("reference", "triton"), after_prefill)
    (ref, _), (logits, cache) = runs["reference"], runs["triton"]
    assert len(cache.layers[0]) == 26
    assert rel_err(logits, ref) < TOL[torch.float32]
