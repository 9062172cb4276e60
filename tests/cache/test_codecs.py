"""Tests for cache/quant.py and cache/codecs.py: quantization error, the packed byte layout, byte accounting,
and the operations the cache needs (cat, select, the residual rule). References are written out here, simply."""

import numpy as np
import pytest
import torch

from cache import quant
from cache.codecs import CODECS, FullPrecision, GroupQuant, int_quant, kivi, make_codec, tokens_to_flush
from cache.quant import QuantTensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rand(
    shape: tuple[int, ...], dtype: torch.dtype = torch.float32, offset: float = 0.0, amp: float = 2.0, seed: int = 0
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * amp + offset).to(dtype)


# (amp, offset) of test data: plain; far from 0, so fp16 rounding of the zero matters; tiny, so the fp16 scale
# is subnormal and rounding it to nearest would lose up to half of it.
RANGES = [(2.0, 0.0), (2.0, 100.0), (1e-6, 0.0)]


# ---------------------------------------------------------------------------------------------------- references


def ref_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Element j of each run of 8 // bits codes goes to bits j*bits .. j*bits + bits - 1 of one byte."""
    k = 8 // bits
    out = np.zeros(codes.shape[:-1] + (codes.shape[-1] // k,), dtype=np.int64)
    for j in range(codes.shape[-1]):
        out[..., j // k] |= codes[..., j].astype(np.int64) << (bits * (j % k))
    return out.astype(np.uint8)


def expand_groups(t: torch.Tensor, qt: QuantTensor) -> torch.Tensor:
    """Repeat each scale/zero over the G elements of its group -> (B, H_kv, T, D) float32."""
    dim = -1 if qt.axis == "token" else -2
    return t.float().repeat_interleave(qt.group_size, dim=dim)


def ref_group_min_max(x: torch.Tensor, G: int, axis: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each group, by an explicit loop over groups."""
    x = x.float()
    n = x.shape[-1] if axis == "token" else x.shape[-2]
    mins, maxs = [], []
    for g in range(n // G):
        part = x[..., g * G : (g + 1) * G] if axis == "token" else x[..., g * G : (g + 1) * G, :]
        d = -1 if axis == "token" else -2
        mins.append(part.amin(dim=d, keepdim=True))
        maxs.append(part.amax(dim=d, keepdim=True))
    d = -1 if axis == "token" else -2
    return torch.cat(mins, dim=d), torch.cat(maxs, dim=d)


def check_quantized(x: torch.Tensor, qt: QuantTensor) -> None:
    """The invariants every QuantTensor of x must satisfy."""
    bits, G = qt.bits, qt.group_size
    xf = x.float()
    scale, zero = expand_groups(qt.scale, qt), expand_groups(qt.zero, qt)
    assert qt.scale.dtype == qt.zero.dtype == torch.float16 and qt.codes.dtype == torch.uint8
    # Codes are consistent with the stored fp16 scale/zero (the formula, re-evaluated independently).
    codes = quant.unpack(qt.codes, bits)
    ref_codes = torch.clamp(torch.round((xf - zero) / scale), 0, 2**bits - 1)
    assert torch.equal(codes.float(), ref_codes)
    # Half a step per element, up to float32 rounding.
    x_hat = quant.dequantize(qt, torch.float32)
    assert torch.equal(x_hat, codes.float() * scale + zero)
    tol = 0.5 * scale * (1 + 1e-5) + 1e-6 * (xf.abs() + zero.abs())
    assert ((xf - x_hat).abs() <= tol).all(), f"max excess {((xf - x_hat).abs() - tol).max()}"
    # zero is the group minimum rounded down, and the scale is tight (not inflated to pass the bound above).
    mn, mx = ref_group_min_max(x, G, qt.axis)
    z, s = qt.zero.float(), qt.scale.float()
    assert (z <= mn).all()
    assert (z >= mn - mn.abs() * 2**-10 - 2**-24).all()
    levels = 2**bits - 1
    nonconstant = mx > mn
    assert (s[nonconstant] <= ((mx - z) / levels * (1 + 2**-10) + 2**-24)[nonconstant]).all()  # one fp16 ulp


# ---------------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_matches_reference_and_round_trips(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (2, 3, 5, 16), generator=g, dtype=torch.uint8)
    packed = quant.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, 16 * bits // 8)
    np.testing.assert_array_equal(packed.numpy(), ref_pack(codes.numpy(), bits))
    assert torch.equal(quant.unpack(packed, bits), codes)


def test_pack_layout_low_bits_first() -> None:
    # bits=4: element 2i in the low nibble; bits=2: element 4i+j in bits 2j..2j+1.
    assert quant.pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [1 + (2 << 4)]
    assert quant.pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [1 + (2 << 2) + (3 << 4)]


def test_pack_rejects_unpackable_length() -> None:
    with pytest.raises(ValueError, match="D=6 .* bits=2"):
        quant.pack(torch.zeros(6, dtype=torch.uint8), 2)


# ---------------------------------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape,G", [((2, 3, 7, 16), 8), ((1, 1, 5, 12), 4), ((3, 2, 1, 8), 8), ((1, 2, 3, 24), 24)])
def test_per_token_within_half_step(dtype: torch.dtype, bits: int, shape: tuple, G: int) -> None:
    if shape[-1] * bits % 8:
        pytest.skip("D not packable at this width")
    for amp, offset in RANGES:
        x = rand(shape, dtype, offset, amp, seed=bits)
        qt = quant.quantize_per_token(x, bits, G)
        B, H_kv, T, D = shape
        assert qt.codes.shape == (B, H_kv, T, D * bits // 8) and qt.scale.shape == (B, H_kv, T, D // G)
        assert qt.shape == shape
        check_quantized(x, qt)
        assert quant.dequantize(qt, dtype).dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_groups_tokens(dtype: torch.dtype, bits: int) -> None:
    for amp, offset in RANGES:
        x = rand((2, 3, 12, 8), dtype, -offset, amp, seed=bits)
        qt = quant.quantize_per_channel(x, bits, 4)
        assert qt.codes.shape == (2, 3, 12, 8 * bits // 8) and qt.scale.shape == (2, 3, 3, 8)
        check_quantized(x, qt)


def test_per_channel_beats_per_token_on_outlier_channels() -> None:
    # KIVI's observation: keys have a few channels with large magnitude. Grouping along tokens keeps each
    # outlier channel in its own groups, so the other channels keep a fine step.
    x = rand((1, 2, 32, 32), seed=1)
    x[..., 5] = x[..., 5] * 30 + 60  # (B, H_kv, T) outlier channel
    err_token = (quant.dequantize(quant.quantize_per_token(x, 4, 32)) - x).abs().mean()
    err_channel = (quant.dequantize(quant.quantize_per_channel(x, 4, 32)) - x).abs().mean()
    assert err_channel < err_token / 2


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("value", [0.0, 0.5, 0.1, -3.7, 1000.3])
def test_constant_groups_are_finite_and_close(bits: int, value: float) -> None:
    x = torch.full((1, 2, 4, 8), value)
    x[0, 0, 0, :4] = torch.arange(4.0)  # one non-constant group next to constant ones
    for qt in (quant.quantize_per_token(x, bits, 4), quant.quantize_per_channel(x, bits, 4)):
        assert torch.isfinite(qt.scale).all() and (qt.scale > 0).all()
        check_quantized(x, qt)


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_empty_tensor_quantizes_and_concatenates(axis: str) -> None:
    # A cache starts empty, so zero tokens must be a valid QuantTensor.
    q = quant.quantize_per_token if axis == "token" else quant.quantize_per_channel
    empty, x = q(torch.zeros(1, 2, 0, 8), 4, 4), rand((1, 2, 4, 8))
    assert quant.dequantize(empty).shape == (1, 2, 0, 8)
    assert torch.equal(quant.dequantize(quant.cat([empty, q(x, 4, 4)])), quant.dequantize(q(x, 4, 4)))


def test_quantize_errors_name_the_bad_value() -> None:
    x = torch.randn(1, 2, 10, 12)
    with pytest.raises(ValueError, match=r"group_size=5 .*D \(head_dim\)=12"):
        quant.quantize_per_token(x, 4, 5)
    with pytest.raises(ValueError, match=r"group_size=4 .*T \(tokens\)=10"):
        quant.quantize_per_channel(x, 4, 4)
    with pytest.raises(ValueError, match=r"bits=3 .*\(2, 4, 8\)"):
        quant.quantize_per_token(x, 3, 4)
    with pytest.raises(ValueError, match="floating"):
        quant.quantize_per_token(x.to(torch.int32), 4, 4)


# ---------------------------------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_storage_bytes_equal_formula_and_tensor_bytes(bits: int, axis: str) -> None:
    shape, G = (2, 3, 16, 32), 8
    x = rand(shape)
    qt = quant.quantize_per_token(x, bits, G) if axis == "token" else quant.quantize_per_channel(x, bits, G)
    held = sum(t.untyped_storage().nbytes() for t in (qt.codes, qt.scale, qt.zero))
    numel = x.numel()
    assert quant.storage_bytes(qt) == held == quant.expected_bytes(shape, bits, G)
    assert held == numel * quant.bits_per_element(bits, G) / 8
    assert quant.bits_per_element(bits, G) == bits + 32 / G


def test_int4_codes_take_half_the_bytes_of_int8() -> None:
    x = rand((2, 4, 16, 64))
    c8 = quant.quantize_per_token(x, 8, 32).codes.untyped_storage().nbytes()
    c4 = quant.quantize_per_token(x, 4, 32).codes.untyped_storage().nbytes()
    c2 = quant.quantize_per_token(x, 2, 32).codes.untyped_storage().nbytes()
    assert c8 == x.numel() and c4 * 2 == c8 and c2 * 4 == c8


# ---------------------------------------------------------------------------------------------------- along T


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_cat_equals_quantizing_the_concatenation(axis: str) -> None:
    q = quant.quantize_per_token if axis == "token" else quant.quantize_per_channel
    a, b = rand((2, 2, 8, 16), seed=1), rand((2, 2, 4, 16), seed=2)
    joined, ref = quant.cat([q(a, 4, 4), q(b, 4, 4)]), q(torch.cat([a, b], dim=2), 4, 4)
    for got, want in zip((joined.codes, joined.scale, joined.zero), (ref.codes, ref.scale, ref.zero)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="cannot cat"):
        quant.cat([q(a, 4, 4), q(a, 8, 4)])


def test_select_tokens_equals_quantize_after_gather() -> None:
    x = rand((2, 3, 10, 16), torch.float16)
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(10, generator=g)[:6].sort().values for _ in range(6)]).view(2, 3, 6)
    gathered = torch.stack([torch.stack([x[b, h, idx[b, h]] for h in range(3)]) for b in range(2)])  # (2, 3, 6, 16)
    for bits in (2, 4, 8):
        got = quant.select_tokens(quant.quantize_per_token(x, bits, 8), idx)
        want = quant.quantize_per_token(gathered, bits, 8)
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale)
        assert torch.equal(got.zero, want.zero)
    with pytest.raises(ValueError, match="axis='token'"):
        quant.select_tokens(quant.quantize_per_channel(x, 4, 5), idx)


# ---------------------------------------------------------------------------------------------------- codecs


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_preset_round_trips_and_counts_its_bytes(name: str, dtype: torch.dtype) -> None:
    codec = make_codec(name, group_size=8, residual=16, head_dim=32)
    x = rand((2, 2, 16, 32), dtype)
    for tc in (codec.key, codec.value):
        p = tc.encode(x)
        x_hat = tc.decode(p, dtype)
        assert x_hat.dtype == dtype and x_hat.shape == x.shape
        if isinstance(tc, GroupQuant):
            check_quantized(x, p)
        elif isinstance(tc, FullPrecision):  # stored in its dtype (or the model's), read back in the model's
            store_dtype = dtype if tc.dtype is None else tc.dtype
            assert torch.equal(x_hat, x.to(store_dtype).to(dtype))  # GEAR's error: tests/cache/test_gear.py
        assert tc.nbytes(p) == x.numel() * tc.bits_per_element(dtype) / 8
        assert tc.nbytes(tc.cat([p, p])) == 2 * tc.nbytes(p)
    k_bits, v_bits = codec.key.bits_per_element(dtype), codec.value.bits_per_element(dtype)
    assert codec.bits_per_element(dtype) == (k_bits + v_bits) / 2


def test_fp_preset_is_bit_exact_and_selects_tokens() -> None:
    codec, x = make_codec("fp"), rand((1, 2, 5, 4))
    p = codec.key.encode(x)
    assert torch.equal(codec.key.decode(p, torch.float32), x)
    idx = torch.tensor([[[0, 3], [1, 4]]])  # (1, 2, 2): a different choice per KV head
    assert torch.equal(codec.key.select(p, idx), torch.stack([x[0, 0, [0, 3]], x[0, 1, [1, 4]]])[None])


def test_bits_per_element_of_presets() -> None:
    bpe = {n: make_codec(n, group_size=32, residual=128, head_dim=32).bits_per_element(torch.float32) for n in CODECS}
    # GEAR, chunks of 128 x 32: + rank 2 factors 16 * 2 * (128 + 32) / 4096 = 1.25, + 40 outliers per side at
    # 16 + 16 bits, 80 * 32 / 4096 = 0.625
    assert bpe == {"fp": 32.0, "fp16": 16.0, "int2": 3.0, "int4": 5.0, "int8": 9.0, "kivi2": 3.0, "kivi4": 5.0,
                   "kivi8": 9.0, "gear2": 4.875, "gear4": 6.875, "gear8": 10.875}


def test_codec_constructors_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown codec 'int3'.*fp16, int2, int4, int8, kivi2, kivi4, kivi8"):
        make_codec("int3")
    with pytest.raises(ValueError, match=r"residual=20 .*group_size=8"):
        kivi(4, 8, 20)
    with pytest.raises(ValueError, match="bits=3"):
        int_quant(3, 32)
    with pytest.raises(ValueError, match="group_size=0"):
        int_quant(4, 0)
    with pytest.raises(ValueError, match="group_size=0"):
        kivi(2, 0, 128)


def test_residual_flushes_whole_blocks_of_r() -> None:
    R, G = 8, 4
    codec = kivi(2, G, R)
    stored, residual = 0, 0
    for t in range(1, 40):  # decode one token at a time
        residual += 1
        n = tokens_to_flush(residual, codec.residual)
        stored, residual = stored + n, residual - n
        assert residual == t % R and stored == t - t % R and stored % G == 0
    assert tokens_to_flush(21, R) == 16  # a 21-token prefill: two whole blocks, 5 wait
    assert tokens_to_flush(7, 0) == 7  # no residual: encode at once


@pytest.mark.parametrize("name", ["int4", "kivi2", "fp16"])
def test_codec_store_tail_changes_no_byte_and_no_output(name: str) -> None:
    """A store whose tail joins the body every 3 tokens holds, returns and hands out exactly what a store that
    never merges does: the tail is a copying shortcut, not a different cache."""
    from cache.storage import CodecStore

    codec = make_codec(name, group_size=4, residual=8)
    short, never = CodecStore(codec, torch.float32, tail_tokens=3), CodecStore(codec, torch.float32, tail_tokens=10**6)
    g = torch.Generator().manual_seed(0)
    for T in [5, 1, 1, 9, 1, 1, 1, 16, 1]:  # prefill chunks and single decode tokens
        k, v = torch.randn(2, 2, T, 8, generator=g), torch.randn(2, 2, T, 8, generator=g)
        (K1, V1), (K2, V2) = short.append(k, v), never.append(k, v)
        assert torch.equal(K1, K2) and torch.equal(V1, V2)
        assert len(short) == len(never) and short.encoded_tokens() == never.encoded_tokens()
        assert sum(t.nbytes for t in short.tensors()) == sum(t.nbytes for t in never.tensors())
    assert short.k_body is not None and never.k_body is None  # the short tail really merged
