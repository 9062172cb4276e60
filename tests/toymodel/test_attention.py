"""The attend contract: every implementation agrees with the written-out reference, causality is bottom-right."""

import pytest
import torch

from toymodel.attention import (
    CPU_CHUNKED_PREFILL,
    attention_weights,
    causal_mask,
    get_backend,
    reference_attend,
    sdpa_attend,
)

SHAPES = [  # (H, H_kv, Tq, Tk)
    (4, 4, 7, 7),  # MHA, prefill
    (4, 2, 5, 13),  # GQA, chunked prefill over a cache (Tq < Tk)
    (6, 1, 1, 9),  # MQA, one decode step
    (6, 3, 16, 16),
    (8, 2, 3, 3),
]


@pytest.mark.parametrize("H,H_kv,Tq,Tk", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_matches_reference(H, H_kv, Tq, Tk, causal):
    g = torch.Generator().manual_seed(H * 100 + Tq * 10 + Tk)
    q = torch.randn(2, H, Tq, 16, generator=g)
    k, v = torch.randn(2, 2, H_kv, Tk, 16, generator=g)
    ref = reference_attend(q, k, v, causal=causal)
    torch.testing.assert_close(sdpa_attend(q, k, v, causal=causal), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [CPU_CHUNKED_PREFILL[0] + 1, 200, CPU_CHUNKED_PREFILL[1]])
@pytest.mark.parametrize("H,H_kv", [(4, 4), (6, 2), (3, 1)])
def test_a_prompt_attended_in_chunks_matches_reference(T, H, H_kv):
    """Causal prompts in CPU_CHUNKED_PREFILL go 64 queries at a time, the last chunk ragged (T = 129, 200)."""
    g = torch.Generator().manual_seed(T + H)
    q = torch.randn(1, H, T, 16, generator=g)
    k, v = torch.randn(2, 1, H_kv, T, 16, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(sdpa_attend(q, k, v), reference_attend(q, k, v), rtol=1e-5, atol=1e-5)


def loop_attention(q, k, v, causal):
    """An independent, obviously-correct version: one query head, one query at a time, K/V repeated."""
    B, H, Tq, D = q.shape
    G = H // k.shape[1]
    out = torch.empty_like(q)
    for h in range(H):
        kh, vh = k[:, h // G], v[:, h // G]  # (B, Tk, D)
        for i in range(Tq):
            last = k.shape[2] - Tq + i if causal else k.shape[2] - 1
            s = (q[:, h, i : i + 1] @ kh[:, : last + 1].transpose(1, 2)) / D**0.5  # (B, 1, last+1)
            out[:, h, i] = (s.softmax(-1) @ vh[:, : last + 1]).squeeze(1)
    return out


@pytest.mark.parametrize("H,H_kv,Tq,Tk", SHAPES)
def test_reference_matches_loop(H, H_kv, Tq, Tk):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, H, Tq, 8, generator=g)
    k, v = torch.randn(2, 1, H_kv, Tk, 8, generator=g)
    torch.testing.assert_close(reference_attend(q, k, v), loop_attention(q, k, v, True), rtol=1e-5, atol=1e-6)


def test_causal_mask_is_bottom_right():
    m = causal_mask(2, 4)
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_chunked_prefill_equals_full_prefill():
    """Attending the last 3 queries over all keys equals the last 3 rows of full causal attention."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 10, 8, generator=g)
    k, v = torch.randn(2, 1, 2, 10, 8, generator=g)
    full = sdpa_attend(q, k, v)
    torch.testing.assert_close(sdpa_attend(q[:, :, -3:], k, v), full[:, :, -3:], rtol=1e-5, atol=1e-6)


def test_weights_rows_sum_to_one_and_respect_causality():
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 9, 8)
    w = attention_weights(q, k)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 4, 5))
    assert (w[..., ~causal_mask(5, 9)] == 0).all()


@pytest.mark.parametrize("H,H_kv,Tq,Tk", [(4, 2, 3, 7), (6, 2, 150, 150), (4, 1, 130, 201), (3, 3, 64, 64)])
@pytest.mark.parametrize("causal", [True, False])
def test_attend_with_mass_returns_the_output_and_each_keys_summed_weight(H, H_kv, Tq, Tk, causal):
    """SDPA has no weights: its backend writes them out 64 queries at a time (one chunk, several, a ragged last one,
    over a cache), and agrees with the whole matrix summed."""
    g = torch.Generator().manual_seed(Tq + Tk)
    q = torch.randn(2, H, Tq, 16, generator=g)
    k, v = torch.randn(2, 2, H_kv, Tk, 16, generator=g)
    out, mass = get_backend("sdpa").attend_with_mass(q, k, v, causal=causal)
    torch.testing.assert_close(out, loop_attention(q, k, v, causal), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass, attention_weights(q, k, causal=causal).sum(dim=2), rtol=1e-5, atol=1e-5)
    assert mass.shape == (2, H, Tk) and mass.dtype == torch.float32


def test_bad_shapes_and_backend_are_named():
    q = torch.randn(1, 3, 4, 8)
    k = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        reference_attend(q, k, k)
    with pytest.raises(ValueError, match="more queries than keys"):
        sdpa_attend(torch.randn(1, 2, 5, 8), k, k)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        get_backend("flash")
