"""The CPU decode kernel (cache/kernels/cpu_decode.py + cpu_decode.c) against dequantize-then-reference_attend:
int8/int4/int2 per token at every tile size the kernel distinguishes, KIVI with a float32 residual, float32 segments,
MHA/GQA/MQA, ragged lengths, several queries under the causal mask, cache views read in place, and the errors.

The kernel is compiled at the first test (a few seconds, then cached in the user cache dir); the tests skip only
where there is no C compiler at all.
"""

import dataclasses
import os
import shutil

import pytest
import torch

from cache.presets import PRESETS, build_cache
from cache.storage import CodecStore
from cache.quant import QuantTensor, dequantize, quantize_per_channel, quantize_per_token
import cache.kernels.cpu_decode as cpu_decode  # importing does not compile: the first call does
from cache.kernels.choose import decode_kernel
from toymodel.attention import reference_attend
from toymodel.config import ModelConfig
from cache.kernels.cpu_decode import cpu_decode_available, cpu_decode_segments
from toymodel.model import Transformer

from kernel_checks import make_qkv, on_threads, rel_err  # tests/kernel_checks.py

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")

# float32 all the way, only the order of the sums differs from the reference: errors are ~1e-6
TOL = 2e-5


def qkv(B, H, H_kv, Tq, Tk, D, seed=0):
    """make_qkv's seeded q, k, v, on the CPU whatever DEVICE the kernel tests default to."""
    return (t.cpu() for t in make_qkv(B, H, H_kv, Tq, Tk, D, seed=seed))


def decoded(x: "torch.Tensor | QuantTensor") -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else dequantize(x)


def reference(q, segments, causal=True, scale=None):
    """The contract: reference_attend over the dequantized segments laid end to end along T."""
    k = torch.cat([decoded(k) for k, _ in segments], dim=2)  # (B, H_kv, Tk, D)
    v = torch.cat([decoded(v) for _, v in segments], dim=2)
    return reference_attend(q, k, v, causal=causal, scale=scale)


def check(q, segments, causal=True, scale=None):
    out = cpu_decode_segments(q, segments, causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert rel_err(out, reference(q, segments, causal, scale)) < TOL


def test_the_kernel_builds_here():
    assert cpu_decode_available() is None


# ---------------------------------------------------------------------------------------------------- formats

# (bits, G): every tile size C = gcd(16, G * bits / 8) bytes the kernel specializes (16, 8, 4) and the runtime
# fallback (2, 1), for each bit width
PER_TOKEN = [(8, 64), (8, 16), (8, 8), (8, 4), (8, 2), (4, 32), (4, 16), (4, 8), (4, 4), (4, 2),
             (2, 64), (2, 32), (2, 16), (2, 8), (2, 4)]


@pytest.mark.parametrize("bits,G", PER_TOKEN, ids=[f"int{b}-G{g}" for b, g in PER_TOKEN])
def test_per_token_codes_match_the_dequantized_reference(bits, G):
    q, k, v = qkv(2, 6, 2, 1, 77, 64, seed=bits * G)  # GQA, one new token, an odd number of keys
    check(q, [(quantize_per_token(k, bits, G), quantize_per_token(v, bits, G))])


@pytest.mark.parametrize("D", [16, 24, 32, 128])
def test_other_head_dims_one_to_eight_vectors_and_a_padded_one(D):
    """D=24 pads rows to 32 lanes; D=16 takes the runtime vector count; int2 rows of 4 bytes the runtime tile."""
    q, k, v = qkv(1, 4, 2, 2, 45, D, seed=D)
    check(q, [(quantize_per_token(k, 4, 8), quantize_per_token(v, 2, 8)), (k[:, :, :3], v[:, :, :3])])


@pytest.mark.parametrize("bits,residual", [(4, 7), (2, 16), (4, 0), (8, 1)])
def test_kivi_keys_per_channel_values_per_token_and_a_float_residual(bits, residual):
    """3 new queries: the causal mask reaches into the residual (residual=0: a freshly flushed cache)."""
    T_quant = 96  # a multiple of the 16-token key groups
    q, k, v = qkv(2, 4, 2, 3, T_quant + residual, 32, seed=bits + residual)
    body = (quantize_per_channel(k[:, :, :T_quant], bits, 16), quantize_per_token(v[:, :, :T_quant], bits, 16))
    check(q, [body, (k[:, :, T_quant:], v[:, :, T_quant:])])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", [(1, 2, 2, 1, 77, 32), (2, 4, 2, 3, 150, 64), (1, 4, 1, 5, 96, 64)],
                         ids=["mha-1tok", "gqa-3tok", "mqa-5tok"])
def test_float32_segments_mha_gqa_mqa(shape, causal):
    q, k, v = qkv(*shape)
    check(q, [(k, v)], causal=causal)
    check(q, [(k[:, :, :50], v[:, :, :50]), (k[:, :, 50:], v[:, :, 50:])], causal=causal)  # split anywhere


def test_segments_of_different_formats_in_one_call():
    """Each segment has its own lane order: int8, int4 and int2 bodies, then float32, oldest first; empty
    segments anywhere are skipped."""
    q, k, v = qkv(2, 8, 2, 2, 131, 64, seed=3)
    cuts = [0, 40, 81, 121, 131]
    parts = [(k[:, :, a:b], v[:, :, a:b]) for a, b in zip(cuts, cuts[1:])]
    segments = [(quantize_per_token(pk, bits, 32), quantize_per_token(pv, bits, 32))
                for (pk, pv), bits in zip(parts[:3], (8, 4, 2))] + [parts[3]]
    check(q, [segments[0], (k[:, :, :0], v[:, :, :0])] + segments[1:], scale=0.3)


@pytest.mark.parametrize("cuts", [[256], [100, 333, 650], [1, 2, 3, 699]], ids=["one-cut", "ragged", "tiny"])
def test_where_the_keys_are_cut_into_segments_changes_no_bit(cuts):
    """A store hands over its tokens as separate segments (a CodecStore's body, tail and residual), or as one body:
    both must give the same bits. The value sum is one chain over all keys, whatever the segments."""
    q, k, v = qkv(2, 6, 2, 1, 700, 64, seed=5)
    kq, vq = quantize_per_token(k, 4, 32), quantize_per_token(v, 4, 32)
    edges = [0, *cuts, 700]
    parts = [(quantize_per_token(k[:, :, a:b], 4, 32), quantize_per_token(v[:, :, a:b], 4, 32))
             for a, b in zip(edges, edges[1:])]  # per token: the same codes as kq, vq cut there
    assert torch.equal(cpu_decode_segments(q, parts), cpu_decode_segments(q, [(kq, vq)]))


def test_same_result_on_one_thread_and_on_several():
    """Threads split the (batch, KV head) pairs, never one softmax: the output is bit-identical."""
    q, k, v = qkv(3, 6, 3, 1, 200, 64, seed=7)
    segments = [(quantize_per_token(k, 4, 32), quantize_per_token(v, 4, 32))]
    one = on_threads(1, lambda: cpu_decode_segments(q, segments))
    for threads in (2, 3):
        assert torch.equal(on_threads(threads, lambda: cpu_decode_segments(q, segments)), one)


@pytest.mark.parametrize("preset", ["kivi4", "kivi2"])
def test_the_segments_a_quantized_cache_hands_over(preset):
    """What CodecStore.encoded returns after a prefill chunk and decode steps (KIVI: its residual flushes twice)."""
    store = CodecStore(dataclasses.replace(PRESETS[preset], group_size=8, residual=8).build_codec(), torch.float32)
    for step, T in enumerate([10] + [1] * 12):
        q, k, v = qkv(2, 4, 2, T, T, 32, seed=step)
        store.add(k, v, q)
        check(q, store.encoded())


@pytest.mark.parametrize("preset", ["quant4", "kivi2"])  # both in the block pool, kivi2 with its residual as a tail
def test_the_model_decodes_a_quantized_cache_without_decoding_it(preset):
    """backend=sdpa on the CPU: each decode step hands this kernel the cache's codes, never a decoded copy; the
    logits equal the reference backend's, which decodes the same stored bytes first."""
    config = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=128, block_size=64)  # D = 32
    spec = dataclasses.replace(PRESETS[preset], group_size=8, residual=8, block_tokens=8)  # KIVI: flushes twice
    torch.manual_seed(0)
    idx = torch.randint(0, 97, (2, 26))
    runs = {}
    for backend in ("reference", "sdpa"):
        torch.manual_seed(1)
        model = Transformer(config, backend=backend).eval()
        cache = build_cache(spec, config, 2, torch.device("cpu"), torch.float32, backend=model.backend.name)
        with torch.no_grad():
            logits = [model(idx[:, :10], cache)]  # prefill: attention over decoded K/V
            if backend == "sdpa":
                for layer in cache.layers:  # a decode step that decoded the cache would call one of them
                    layer.store.append = layer.store.read = None
            logits += [model(idx[:, t : t + 1], cache) for t in range(10, 26)]
        runs[backend] = torch.cat(logits, dim=1)
    assert rel_err(runs["sdpa"], runs["reference"]) < TOL


def test_without_the_kernel_sdpa_warns_and_decodes_first(monkeypatch):
    monkeypatch.setattr(cpu_decode, "cpu_decode_available", lambda: "no C compiler found")
    with pytest.warns(UserWarning, match="no C compiler found"):
        assert decode_kernel("sdpa", "cpu", torch.float32) is None
    assert decode_kernel("reference", "cpu", torch.float32) is None


# ---------------------------------------------------------------------------------------------------- views


def capacity_view(x: torch.Tensor, n: int, extra_heads: int = 0) -> torch.Tensor:
    """x (B, H_kv, n, w) copied into a larger (B, H_kv + extra, capacity, w) buffer and viewed back as
    buf[:, :H_kv, :n]: what a preallocated cache hands over (strides on batch and head differ from x's)."""
    B, H_kv, _, w = x.shape
    buf = torch.full((B, H_kv + extra_heads, n + 37, w), 7, dtype=x.dtype)  # garbage beyond the view
    buf[:, :H_kv, :n] = x
    return buf[:, :H_kv, :n]


def as_cache_views(qt: QuantTensor) -> QuantTensor:
    """Codes, scale and zero each a capacity_view (one spare KV head, spare tokens) of a larger buffer."""
    def view(t: torch.Tensor) -> torch.Tensor:
        return capacity_view(t, t.shape[2], extra_heads=1)

    return QuantTensor(view(qt.codes), view(qt.scale), view(qt.zero), qt.bits, qt.group_size, qt.axis)


def test_views_of_capacity_buffers_are_read_in_place(monkeypatch):
    """Non-contiguous payloads buf[:, :H_kv, :n] give the reference's output, and none of them is copied:
    contiguous() on a non-contiguous tensor would copy the whole cache at every decode step."""
    q, k, v = qkv(2, 4, 2, 3, 112, 32, seed=11)
    body = (as_cache_views(quantize_per_channel(k[:, :, :96], 4, 16)),
            as_cache_views(quantize_per_token(v[:, :, :96], 4, 16)))
    residual = (capacity_view(k[:, :, 96:], 16), capacity_view(v[:, :, 96:], 16))
    assert not body[0].codes.is_contiguous() and not body[1].scale.is_contiguous()
    assert not residual[0].is_contiguous()

    real_contiguous = torch.Tensor.contiguous

    def no_copy(self, *args, **kwargs):
        assert self.is_contiguous(), f"a payload of shape {tuple(self.shape)} was copied"
        return real_contiguous(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "contiguous", no_copy)
        out = cpu_decode_segments(q, [body, residual])
    assert rel_err(out, reference(q, [body, residual])) < TOL


def test_payloads_with_strided_rows_are_copied_and_still_right():
    q, k, v = qkv(1, 2, 2, 1, 33, 32, seed=5)
    k_wide = torch.randn(1, 2, 33, 64)
    k_wide[..., ::2] = k  # rows with stride 2 along D: not readable in place
    k_q = quantize_per_token(k, 4, 16)
    codes_t = k_q.codes.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H_kv, T, w) with token-major storage
    check(q, [(QuantTensor(codes_t, k_q.scale, k_q.zero, 4, 16, "token"), quantize_per_token(v, 4, 16))])
    check(q, [(k_wide[..., ::2], v)])


# ---------------------------------------------------------------------------------------------------- errors


def test_wrong_dtype_device_or_shape_is_a_value_error():
    q, k, v = qkv(1, 4, 2, 1, 32, 32)
    k_q, v_q = quantize_per_token(k, 4, 16), quantize_per_token(v, 4, 16)
    cases = {
        "q must be a 4-D float32": (q.half(), [(k, v)]),
        "q must be a 4-D float32 CPU": (q.to("meta"), [(k, v)]),
        "segment 0 k must be a 4-D torch.float32": (q, [(k.half(), v)]),
        "segment 0 v must be a 4-D torch.float32 CPU": (q, [(k, v.to("meta"))]),
        "segment 0 k.codes must be a 4-D torch.uint8": (
            q, [(QuantTensor(k_q.codes.to(torch.int8), k_q.scale, k_q.zero, 4, 16, "token"), v_q)]),
        "segment 0 v.scale must be a 4-D torch.float16": (
            q, [(k_q, QuantTensor(v_q.codes, v_q.scale.float(), v_q.zero, 4, 16, "token"))]),
        "should be": (q, [(QuantTensor(k_q.codes, k_q.scale[:, :, :-1], k_q.zero[:, :, :-1], 4, 16, "token"),
                           v_q)]),
        "multiple of 4": (q, [(quantize_per_token(k, 2, 4), QuantTensor(v_q.codes[..., :8], v_q.scale,
                                                                         v_q.zero, 2, 2, "token"))]),
        "do not match": (q, [(k, v[:, :, :31])]),
        "n_kv_head=2 of segment 0": (q, [(k, v), (k[:, :1], v[:, :1])]),
        "not a multiple of n_kv_head": (q[:, :3], [(k, v)]),
        "more queries than keys": (q.expand(1, 4, 33, 32), [(k, v)]),
        "at least one non-empty": (q, [(k[:, :, :0], v[:, :, :0])]),
    }
    for message, (q_, segments) in cases.items():
        with pytest.raises(ValueError, match=message):
            cpu_decode_segments(q_, segments)


def test_unavailable_without_a_compiler_and_the_reason_names_it(monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-kvlab")
    cpu_decode.library.cache_clear()
    try:
        assert "no C compiler" in cpu_decode_available()
    finally:
        cpu_decode.library.cache_clear()
