"""The FlashAttention kernels (toymodel/kernels/triton_attn.py) against the reference `attend`: forward, gradients and
attention mass, for MHA/GQA/MQA, ragged lengths, Tq < Tk, causal and not.

On a GPU the kernels are compiled; without one they run under Triton's CPU interpreter (TRITON_INTERPRET=1) at
small shapes. Every buffer the kernels allocate is filled with NaN first, so an element a kernel forgets to write
fails the comparison.
"""

import dataclasses

import pytest
import torch

from cache.presets import PRESETS
from toymodel.attention import attention_weights, get_backend, reference_attend
from toymodel.config import ModelConfig

from kernel_checks import DEVICE, ON_GPU, TOL, make_qkv, rel_err, run_backends  # tests/kernel_checks.py

DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not ON_GPU, reason="interpreter bf16 dot: triton#11584")),
]

# (B, H, H_kv, Tq, Tk, D): lengths deliberately not multiples of the blocks
CASES = {
    "mha-ragged": (1, 2, 2, 37, 37, 32),
    "gqa-chunk": (2, 4, 2, 19, 45, 32),  # Tq < Tk: a chunk of queries over a cache
    "mqa": (1, 4, 1, 33, 33, 64),
    "d128-decode": (1, 2, 1, 3, 40, 128),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(attn_kernels, case, causal, poisoned):
    q, k, v = make_qkv(*CASES[case])
    out, lse = attn_kernels.flash_forward(q, k, v, causal=causal, block_m=16, block_n=16)  # small blocks: many tiles
    assert rel_err(out, reference_attend(q, k, v, causal=causal)) < TOL[torch.float32]
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_half_precision(attn_kernels, dtype, poisoned):
    q, k, v = make_qkv(*CASES["gqa-chunk"], dtype=dtype)
    ref = reference_attend(q.float(), k.float(), v.float())
    out = attn_kernels.triton_attend(q, k, v)
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", ["mha-ragged", "gqa-chunk", "mqa"])
def test_backward_matches_reference_gradients(attn_kernels, case, causal, poisoned):
    q, k, v = make_qkv(*CASES[case], seed=1)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(reference_attend(*ref_inputs, causal=causal), ref_inputs, do)
    out, lse = attn_kernels.flash_forward(q, k, v, causal=causal, block_m=16, block_n=16)
    grads = attn_kernels.flash_backward(do, q, k, v, out, lse, causal=causal, block_m=16, block_n=16)
    for name, g, ref in zip("qkv", grads, ref_grads):
        assert g.shape == ref.shape, name
        assert rel_err(g, ref) < TOL[torch.float32], f"d{name}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_function_trains(attn_kernels, dtype, poisoned):
    """triton_attend is a drop-in for the reference inside autograd (default blocks, custom scale)."""
    q, k, v = (t.requires_grad_() for t in make_qkv(*CASES["gqa-chunk"], dtype=dtype, seed=3))
    ref_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    reference_attend(*ref_inputs, scale=0.3).square().sum().backward()
    attn_kernels.triton_attend(q, k, v, scale=0.3).float().square().sum().backward()
    for name, t, ref in zip("qkv", (q, k, v), ref_inputs):
        assert rel_err(t.grad, ref.grad) < TOL[dtype], f"d{name}"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", ["gqa-chunk", "d128-decode"])
def test_attention_mass_matches_weights(attn_kernels, case, causal, poisoned):
    q, k, v = make_qkv(*CASES[case], seed=4)
    out, mass = attn_kernels.triton_attend_with_mass(q, k, v, causal=causal)
    assert mass.shape == (q.shape[0], q.shape[1], k.shape[2])
    assert rel_err(mass, attention_weights(q, k, causal=causal).sum(dim=2)) < TOL[torch.float32]
    assert rel_err(out, reference_attend(q, k, v, causal=causal)) < TOL[torch.float32]
    # each query spreads exactly one unit of attention over the keys
    torch.testing.assert_close(mass.sum(-1), torch.full_like(mass[..., 0], q.shape[2]), rtol=1e-4, atol=0)


def test_non_contiguous_inputs(attn_kernels, poisoned):
    """The model hands over (B, T, H, D) projections transposed to (B, H, T, D): strided views must work."""
    B, H, T, D = 1, 2, 24, 32
    q, k, v = (torch.randn(B, T, H, D, device=DEVICE).transpose(1, 2) for _ in range(3))  # (B, H, T, D) views
    assert rel_err(attn_kernels.triton_attend(q, k, v), reference_attend(q, k, v)) < TOL[torch.float32]


def test_rejects_unsupported_head_dim(attn_kernels):
    q, k, v = make_qkv(1, 1, 1, 4, 4, 48)
    with pytest.raises(ValueError, match="head_dim"):
        attn_kernels.triton_attend(q, k, v)


def test_unavailable_message_points_to_sdpa_and_interpreter(attn_kernels):
    assert attn_kernels.triton_unavailable_reason(has_cuda=True, interpreting=False) is None
    assert attn_kernels.triton_unavailable_reason(has_cuda=False, interpreting=True) is None
    reason = attn_kernels.triton_unavailable_reason(has_cuda=False, interpreting=False)
    assert "attn.backend=sdpa" in reason and "infer.py backend=sdpa" in reason and "TRITON_INTERPRET=1" in reason


@pytest.mark.skipif(ON_GPU, reason="checks the refusal on a machine without a GPU")
def test_backend_refuses_to_start_without_gpu(attn_kernels, monkeypatch):
    # attn_kernels: import the module under the interpreter first, as the other tests here expect
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="attn.backend=sdpa"):
        get_backend("triton")


def test_h2o_reads_the_kernels_mass_inside_the_model(attn_kernels):
    """attn.backend=triton hands H2O the kernel's mass (no weights matrix): same logits, same kept tokens."""
    config = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=128, block_size=64)  # D = 32
    torch.manual_seed(0)
    idx = torch.randint(0, 97, (1, 18), device=DEVICE)
    spec = dataclasses.replace(PRESETS["h2o"], budget=8, sink=1, window=2, block_tokens=1)  # evict every step
    runs = run_backends(config, spec, idx, 10, ("reference", "triton"))
    (ref_logits, ref_cache), (logits, cache) = runs["reference"], runs["triton"]
    assert rel_err(logits, ref_logits) < TOL[torch.float32]
    for m, ref in zip((lc.state["mass"] for lc in cache.layers), (lc.state["mass"] for lc in ref_cache.layers)):
        assert m.shape == ref.shape == (1, 2, 8)  # evicted down to the budget, per KV head
        assert rel_err(m, ref) < TOL[torch.float32]

