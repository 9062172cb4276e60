"""The decode matmul kernel (toymodel/kernels/cpu_matmul.py + cpu_matmul.c) against x @ w in float64 on fresh random
inputs: ragged K and N (not multiples of the kernel's runs of 128 rows, its tiles or its vector width), row counts
that fill its tiles of 4 rows and not, up to the 64 the one-call decode block hands it,
leading batch dims, 1 to 3 threads giving identical bytes; then how it is dispatched, its errors, and the packed
model that uses it."""

import os
import shutil

import pytest
import torch

import toymodel.kernels.cpu_matmul as cpu_matmul_module
from toymodel.kernels.cpu_matmul import (MAX_ROWS, cpu_matmul, cpu_matmul_available, decode_matmul, matmul_for,
                                         onednn_matmul)
from kernel_checks import on_threads, packed_pair  # tests/kernel_checks.py

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")


def reference(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    return (x.double() @ w_t.double()).float()


def test_the_kernel_builds_here():
    assert cpu_matmul_available() is None


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("M, K, N", [(1, 384, 640), (1, 1024, 384), (8, 384, 4096), (3, 37, 101), (16, 5, 17),
                                     (2, 3, 1), (1, 1, 1), (7, 130, 33), (20, 130, 101), (64, 384, 640),
                                     (1, 130, 33), (2, 37, 101), (2, 200, 1152)])  # 1-2 rows: W swept by rows
def test_matches_the_product_in_float64(M, K, N, threads):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x, w_t = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
    y = on_threads(threads, lambda: cpu_matmul(x, w_t))
    scale = (x.abs().double() @ w_t.abs().double()).max().item()  # the size of the sums, for a relative bound
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert (y - reference(x, w_t)).abs().max().item() <= 1e-6 * scale


def test_leading_dims_and_a_non_contiguous_x():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 48, generator=g).transpose(0, 1)  # (3, 2, 48), not contiguous
    w_t = torch.randn(48, 20, generator=g)
    y = cpu_matmul(x, w_t)
    assert y.shape == (3, 2, 20)
    torch.testing.assert_close(y, reference(x, w_t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M, K, N", [(1, 384, 640), (8, 1024, 384), (16, 37, 101), (3, 9, 17), (1, 7, 33),
                                     (5, 130, 4097), (20, 130, 101), (64, 384, 640)])
def test_one_thread_and_several_give_identical_bytes(M, K, N):
    """Threads split the output columns, never a sum: the thread policy (toymodel/threads.py) may switch the count
    mid-generation without changing a bit. Ragged N puts a band cut inside a tile and the scalar tail, K a run of
    W's rows shorter than 128, M a tile of fewer than 4 rows."""
    g = torch.Generator().manual_seed(M + K + N)
    x, w_t = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
    one = on_threads(1, lambda: cpu_matmul(x, w_t))
    for threads in (2, 3, 4):
        assert torch.equal(on_threads(threads, lambda: cpu_matmul(x, w_t)), one), f"{threads} threads"


def test_the_same_inputs_give_the_same_bits_every_call():
    g = torch.Generator().manual_seed(2)
    x, w_t = torch.randn(4, 999, generator=g), torch.randn(999, 257, generator=g)
    assert torch.equal(cpu_matmul(x, w_t), cpu_matmul(x, w_t))


@pytest.mark.parametrize("M, K, N", [(5, 130, 200), (64, 384, 640), (23, 1024, 384)])
def test_a_row_gets_the_same_bits_whatever_rows_share_its_call(M, K, N):
    """More than 4 rows make the kernel copy W in panels before the rows pass over them, and a row alone sweeps W
    by rows instead; a row's sums must not change with either (a sequence's tokens in the serving engine must not
    depend on its batch)."""
    g = torch.Generator().manual_seed(M + K + N)
    x, w_t = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
    together = cpu_matmul(x, w_t)
    for i in (0, M // 2, M - 1):
        assert torch.equal(cpu_matmul(x[i : i + 1], w_t), together[i : i + 1]), f"row {i} of {M}"


def test_decode_matmul_sends_prefill_to_onednn_and_autograd_to_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_matmul_module, "cpu_matmul", lambda x, w_t: calls.append(("c", *x.shape)) or x @ w_t)
    monkeypatch.setattr(cpu_matmul_module, "onednn_matmul", lambda x, w_t: calls.append(("dnn", *x.shape)) or x @ w_t)
    w_t = torch.randn(8, 5)
    decode_matmul(torch.randn(MAX_ROWS, 1, 8), w_t)  # a decode step of MAX_ROWS sequences: the kernel
    decode_matmul(torch.randn(1, MAX_ROWS + 1, 8), w_t)  # a prefill: oneDNN
    decode_matmul(torch.randn(MAX_ROWS + 1, 8, requires_grad=True), w_t)  # gradients need torch's op
    assert calls == [("c", MAX_ROWS, 1, 8), ("dnn", 1, MAX_ROWS + 1, 8)]


@pytest.mark.parametrize("shape, K, N", [((17, 384), 384, 1024), ((2, 300, 37), 37, 101), ((3, 65, 1024), 1024, 384),
                                         ((1, 0, 8), 8, 5)])
def test_onednn_matmul_against_float64_and_each_row_alone(shape, K, N):
    """A prefill's products: within float32's rounding of the exact product, with leading batch dims and a view of
    x that is not contiguous; and each sequence's rows give the same bytes alone as in the batch (a request's
    prefill must not depend on the prompts beside it)."""
    g = torch.Generator().manual_seed(K + N)
    x = torch.randn(*shape[:-1], 2 * K, generator=g)[..., ::2]  # (..., K), every other column: not contiguous
    w_t = torch.randn(K, N, generator=g)
    y = onednn_matmul(x, w_t)
    exact = reference(x, w_t)
    assert y.shape == exact.shape
    scale = exact.abs().max().item() if exact.numel() else 1.0
    assert torch.allclose(y, exact, rtol=0, atol=1e-5 * scale)
    if x.dim() == 3 and x.shape[1]:
        for b in range(x.shape[0]):
            assert torch.equal(onednn_matmul(x[b : b + 1], w_t), y[b : b + 1]), f"sequence {b}"


def test_matmul_for_picks_the_kernel_only_for_float32_on_a_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert matmul_for(cpu, torch.float32) is decode_matmul
    assert matmul_for(cpu, torch.bfloat16) is torch.matmul
    assert matmul_for(torch.device("cuda"), torch.float32) is torch.matmul
    monkeypatch.setattr(cpu_matmul_module, "cpu_matmul_available", lambda: "no C compiler found")
    with pytest.warns(UserWarning, match="torch.matmul .*no C compiler found"):
        assert matmul_for(cpu, torch.float32) is torch.matmul


def test_bad_inputs_are_named():
    x, w_t = torch.randn(2, 8), torch.randn(8, 4)
    cases = {
        "float32 CPU tensors": (x.double(), w_t),
        "K = x.shape\\[-1\\]": (torch.randn(2, 9), w_t),
        "not contiguous": (x, torch.randn(4, 8).t()),
    }
    for message, (x_, w_) in cases.items():
        with pytest.raises(ValueError, match=message):
            cpu_matmul(x_, w_)


def test_a_packed_model_decodes_through_the_kernel(monkeypatch):
    """Every product of a decode step (qkv, o, gate/up, down per layer, then lm_head) goes to the kernel, and the
    logits are those of the unpacked model."""
    model, packed = packed_pair()
    calls = []
    kernel = cpu_matmul_module.cpu_matmul
    monkeypatch.setattr(cpu_matmul_module, "cpu_matmul", lambda x, w_t: calls.append(w_t.shape) or kernel(x, w_t))
    idx = torch.randint(0, 97, (3, 1))
    with torch.no_grad():
        torch.testing.assert_close(packed(idx), model(idx), rtol=0, atol=1e-5)
    assert len(calls) == 4 * model.config.n_layer + 1 and calls[-1] == (32, 97)
