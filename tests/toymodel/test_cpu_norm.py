"""The RMSNorm kernel (toymodel/kernels/cpu_norm.py + cpu_norm.c) against the norm in float64 on fresh random inputs
of ragged widths and row counts; then when it is used (inference only), its errors, and the packed model."""

import os
import shutil

import pytest
import torch

import toymodel.kernels.cpu_norm as cpu_norm_module
from toymodel.decode_layout import pack_for_decode
from toymodel.kernels.cpu_norm import cpu_norm_available, cpu_rms_norm, fast_rms_norm, norm_for
from toymodel.model import RMSNorm, Transformer, rms_norm
from kernel_checks import packed_pair  # tests/kernel_checks.py

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return (x / (x.square().mean(dim=-1, keepdim=True) + eps).sqrt() * weight.double()).float()


def test_the_kernel_builds_here():
    assert cpu_norm_available() is None


@pytest.mark.parametrize("shape", [(1, 1, 384), (8, 1, 384), (64, 384), (3, 17, 37), (2, 1), (5, 130), (0, 16)])
def test_matches_the_norm_in_float64(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x, weight = 3 * torch.randn(shape, generator=g), torch.randn(shape[-1], generator=g)
    y = cpu_rms_norm(x, weight, 1e-5)
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, reference(x, weight, 1e-5), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(y, rms_norm(x, weight, 1e-5), rtol=2e-6, atol=1e-6)


def test_eps_counts_and_a_non_contiguous_x():
    g = torch.Generator().manual_seed(1)
    x = 1e-3 * torch.randn(4, 3, 48, generator=g).transpose(0, 1)  # (3, 4, 48), not contiguous; eps matters here
    weight = torch.randn(48, generator=g)
    torch.testing.assert_close(cpu_rms_norm(x, weight, 1e-4), reference(x, weight, 1e-4), rtol=2e-6, atol=1e-6)


def test_the_kernel_runs_only_where_no_gradient_is_tracked(monkeypatch):
    calls = []
    kernel = cpu_norm_module.cpu_rms_norm
    monkeypatch.setattr(cpu_norm_module, "cpu_rms_norm", lambda *a: calls.append(1) or kernel(*a))
    norm = RMSNorm(16)
    norm.normalize = fast_rms_norm
    x = torch.randn(2, 16, requires_grad=True)
    norm(x).sum().backward()  # training: PyTorch's operations, which autograd differentiates
    assert not calls and x.grad is not None and norm.weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(norm(x), rms_norm(x, norm.weight, norm.eps), rtol=2e-6, atol=1e-6)
    assert calls == [1]


def test_bad_inputs_name_the_problem():
    x, weight = torch.randn(2, 8), torch.randn(8)
    cases = {
        "float32 CPU tensors": (x.double(), weight),
        r"weight of shape \(8,\)": (x, torch.randn(9)),
        "not contiguous": (x, torch.randn(8, 2).t()[0]),
    }
    for message, (x_, w_) in cases.items():
        with pytest.raises(ValueError, match=message):
            cpu_rms_norm(x_, w_, 1e-5)


def test_norm_for_picks_the_kernel_on_a_cpu_in_float32_only():
    assert norm_for(torch.device("cpu"), torch.float32) is fast_rms_norm
    assert norm_for(torch.device("cpu"), torch.bfloat16) is rms_norm


def test_a_packed_model_normalizes_through_the_kernel():
    """Every RMSNorm of a packed model (two per layer and the last) calls the kernel; logits stay those of the
    unpacked model."""
    model, packed = packed_pair()
    norms = [m for m in packed.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * model.config.n_layer + 1 and all(n.normalize is fast_rms_norm for n in norms)
    assert pack_for_decode(Transformer(model.config), cpu_norm=False).norm.normalize is rms_norm
    idx = torch.randint(0, 97, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(packed(idx), model(idx), rtol=0, atol=1e-5)
