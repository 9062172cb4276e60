"""The C quantizer (cache/kernels/quant_cpu.py + quant_cpu.c) against the reference quantize_per_token of
cache/quant.py: identical codes, scales and zeros on fresh random inputs of many magnitudes, every bit width, ragged group sizes,
constant groups and values on the float16 grid (where the rounding rules of zero and scale decide), and the same
errors."""

import os
import shutil

import pytest
import torch

from cache import quant
from cache.kernels import quant_cpu
from toymodel.kernels.native import unavailable_reason
from kernel_checks import on_threads  # tests/kernel_checks.py

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")


def assert_same(x: torch.Tensor, bits: int, group_size: int) -> None:
    ref, fast = quant.quantize_per_token(x, bits, group_size), quant_cpu.quantize_per_token(x, bits, group_size)
    assert torch.equal(fast.codes, ref.codes)
    # equal as numbers: a group whose minimum is 0 may hold +0 or -0 on either side (torch's amin does not say
    # which of two zeros is the smaller), and x_hat = code * scale + zero is the same for both
    assert torch.equal(fast.scale, ref.scale) and torch.equal(fast.zero, ref.zero)
    assert (fast.bits, fast.group_size, fast.axis) == (ref.bits, ref.group_size, ref.axis)


def test_the_kernel_builds_here():
    assert unavailable_reason(quant_cpu.library) is None


def test_one_thread_and_several_give_identical_bytes():
    """Each row is quantized on its own, in one loop (no threads at all): the count the policy sets changes nothing."""
    x = torch.randn(3, 2, 33, 64, generator=torch.Generator().manual_seed(3))
    one = on_threads(1, lambda: quant_cpu.quantize_per_token(x, 4, 32))
    several = on_threads(2, lambda: quant_cpu.quantize_per_token(x, 4, 32))
    assert all(torch.equal(a, b) for a, b in zip((one.codes, one.scale, one.zero), (several.codes, several.scale,
                                                                                    several.zero)))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("D, group_size", [(64, 32), (64, 64), (128, 16), (24, 8), (12, 4), (8, 8)])
def test_identical_to_the_reference_on_random_inputs(bits, D, group_size):
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        magnitude = 10.0 ** (seed % 10 - 6)  # 1e-6 .. 1e3: subnormal float16 scales up to large ones
        x = torch.randn(2, 3, 7, D, generator=g) * magnitude + torch.randn(1, generator=g) * magnitude
        assert_same(x, bits, group_size)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_identical_where_the_float16_roundings_decide(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 2, 9, 32, generator=g)
    x[0] = x[0].half().float()  # on the float16 grid: zero is exact, never stepped down
    x[1, :, :, :16] = 0.3  # constant groups: scale 0 becomes 1
    x[1, :, :, 16:] = x[1, :, :, 16:].round()  # integers, with +0 and -0 among them
    x[2] = (x[2] * 4).round() / 4 * 15  # codes exactly halfway between two levels: rounding half to even
    assert_same(x, bits, 16)


def test_non_contiguous_and_non_float32_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 32, generator=g).transpose(1, 2)  # (2, 3, 5, 32), not contiguous
    assert_same(x, 4, 32)
    y = x.double()  # not float32: the reference does the work
    torch.testing.assert_close(quant.dequantize(quant_cpu.quantize_per_token(y, 4, 32)),
                               quant.dequantize(quant.quantize_per_token(y, 4, 32)), rtol=0, atol=0)


def test_bad_inputs_raise_the_reference_errors():
    x = torch.randn(1, 2, 3, 12)
    with pytest.raises(ValueError, match="bits=3 is not supported"):
        quant_cpu.quantize_per_token(x, 3, 4)
    with pytest.raises(ValueError, match="group_size=5 must be a positive divisor of D"):
        quant_cpu.quantize_per_token(x, 4, 5)
    with pytest.raises(ValueError, match="cannot pack D=6 codes at bits=2"):
        quant_cpu.quantize_per_token(torch.randn(1, 2, 3, 6), 2, 3)


def test_without_a_compiler_the_reference_does_the_work(monkeypatch):
    def no_compiler():
        raise RuntimeError("no C compiler found")

    monkeypatch.setattr(quant_cpu, "library", no_compiler)
    x = torch.randn(2, 2, 3, 32)
    assert_same(x, 4, 16)
