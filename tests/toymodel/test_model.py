"""The model's defining properties: causality, GQA as a special case of MHA, RoPE's relative positions,
the cache seam, and MHA -> GQA conversion."""

import pytest
import torch

from toymodel.config import ModelConfig
from toymodel.convert import mha_to_gqa, pool_kv_heads
from toymodel.model import Transformer
from toymodel.rope import apply_rope, rope_cos_sin

TINY = dict(vocab_size=97, n_layer=2, n_head=4, d_model=32, block_size=64)


def make(n_kv_head=4, backend="sdpa", seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**TINY, n_kv_head=n_kv_head), backend=backend).eval()


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_future_tokens_never_change_earlier_logits(n_kv_head):
    model = make(n_kv_head)
    idx = torch.randint(0, 97, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_reference_and_sdpa_models_agree():
    idx = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(make(2, "reference")(idx), make(2, "sdpa")(idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_gqa_with_duplicated_heads_equals_mha(n_kv_head):
    """A GQA model is an MHA model whose heads in a group happen to share K/V weights."""
    gqa = make(n_kv_head)
    mha = make(4)
    G = 4 // n_kv_head
    state = gqa.state_dict()
    for name, w in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            heads = w.view(n_kv_head, 1, 8, 32).expand(n_kv_head, G, 8, 32)  # (H_kv, G, D, d_model)
            state[name] = heads.reshape(4 * 8, 32)
    mha.load_state_dict(state)
    idx = torch.randint(0, 97, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(mha(idx), gqa(idx), rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(m, n):
        cq, sq = rope_cos_sin(torch.tensor([m]), 16, 10000.0)
        ck, sk = rope_cos_sin(torch.tensor([n]), 16, 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    assert score(5, 2) == pytest.approx(score(105, 102), rel=1e-4, abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)
    cos, sin = rope_cos_sin(torch.tensor([37]), 16, 10000.0)
    assert apply_rope(q, cos, sin).norm().item() == pytest.approx(q.norm().item(), rel=1e-5)  # a rotation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_the_rotation_written_out_and_its_gradient_is_the_rotation_back(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 16, generator=g).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)  # strided
    cos, sin = rope_cos_sin(torch.randint(0, 500, (2, 1, 5), generator=g), 16, 10000.0)  # (B, 1, T, D/2)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    x1, x2 = b.float().chunk(2, dim=-1)
    plain = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(dtype)
    fused = apply_rope(a, cos, sin)
    tol = {"rtol": 0, "atol": 1e-6 if dtype == torch.float32 else 1e-2}
    torch.testing.assert_close(fused, plain, **tol)
    assert fused.dtype == dtype
    w = torch.randn(fused.shape, generator=g).to(dtype)
    (fused * w).sum().backward()
    (plain * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, **tol)


class ConcatCache:
    """The smallest cache that fits the seam: keep every key/value, count positions from tokens seen."""

    def __init__(self, n_layer):
        self.pos = 0
        self.layers = [self.Layer() for _ in range(n_layer)]

    class Layer:
        k = v = None

        def attend(self, q, k, v, backend):
            self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
            self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
            return backend.attend(q, self.k, self.v, causal=True)

    def positions(self, T, lengths=None):
        self.new = T
        return torch.arange(self.pos, self.pos + T).expand(2, T)  # (B, T): the test's batch of 2

    def advance(self):
        self.pos += self.new


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_cache_seam_reproduces_uncached_logits(n_kv_head):
    model = make(n_kv_head)
    idx = torch.randint(0, 97, (2, 12))
    cache = ConcatCache(2)
    with torch.no_grad():
        full = model(idx)
        chunks = [model(idx[:, :5], cache), model(idx[:, 5:9], cache)]
        chunks += [model(idx[:, t : t + 1], cache) for t in range(9, 12)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.pos == 12


def test_last_only_gives_the_last_row_of_the_logits():
    model = make(2)
    idx = torch.randint(0, 97, (3, 9))
    with torch.no_grad():
        last = model(idx, last_only=True)
        assert last.shape == (3, 1, 97)
        torch.testing.assert_close(last, model(idx)[:, -1:], rtol=0, atol=1e-6)  # one row vs many: BLAS rounding


def test_pool_kv_heads_averages_each_group():
    w = torch.arange(4 * 2 * 3, dtype=torch.float32).view(4 * 2, 3)  # 4 heads of D=2, d_model=3
    pooled = pool_kv_heads(w, n_head=4, n_kv_head=2)
    torch.testing.assert_close(pooled[:2], (w[0:2] + w[2:4]) / 2)  # KV head 0 <- query heads 0, 1
    torch.testing.assert_close(pooled[2:], (w[4:6] + w[6:8]) / 2)  # KV head 1 <- query heads 2, 3


def test_converted_checkpoint_loads_into_gqa_model():
    mha = make(4)
    state, config = mha_to_gqa(mha.state_dict(), mha.config, 2)
    gqa = Transformer(config)
    gqa.load_state_dict(state)
    assert gqa.config.n_kv_head == 2
    with pytest.raises(ValueError, match="not divisible by n_kv_head=3"):
        mha_to_gqa(mha.state_dict(), mha.config, 3)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="n_head=8 is not divisible by n_kv_head=3"):
        ModelConfig(n_head=8, n_kv_head=3)


def test_last_only_with_lengths_gives_each_rows_last_real_token():
    model = make(2)
    idx = torch.randint(0, 97, (3, 9))
    lengths = torch.tensor([9, 4, 1])
    with torch.no_grad():
        full = model(idx)
        last = model(idx, last_only=True, lengths=lengths)  # right padding: no real token sees it
    assert last.shape == (3, 1, 97)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(last[b, 0], full[b, n - 1])


def test_rope_takes_a_row_of_positions_per_sequence():
    x = torch.randn(2, 3, 5, 16)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])  # (B, T)
    cos, sin = rope_cos_sin(positions, 16, 10000.0)  # (B, T, D/2)
    rotated = apply_rope(x, cos.unsqueeze(1), sin.unsqueeze(1))
    for b in range(2):
        torch.testing.assert_close(rotated[b : b + 1], apply_rope(x[b : b + 1], *rope_cos_sin(positions[b], 16, 1e4)))
