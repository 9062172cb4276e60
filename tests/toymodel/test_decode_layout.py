"""The decode layout (toymodel/decode_layout.py): packed, transposed weights change no logit, no parameter name
and no value, and share the parameters' storage (no copy)."""

import pytest
import torch

from cache.presets import PRESETS, build_cache
from toymodel.config import ModelConfig
from toymodel.decode_layout import pack_for_decode
from toymodel.model import Transformer

TINY = dict(vocab_size=97, n_layer=2, n_head=4, d_model=32, block_size=64)


def make(n_kv_head: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**TINY, n_kv_head=n_kv_head)).eval()


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_packing_weights_for_decode_changes_no_logit_and_no_state(n_kv_head):
    model, packed = make(n_kv_head), pack_for_decode(make(n_kv_head))
    state = model.state_dict()
    assert packed.state_dict().keys() == state.keys()
    assert all(torch.equal(packed.state_dict()[k], v) for k, v in state.items())
    assert packed.lm_head.weight is packed.embed_tokens.weight  # still tied
    attn = packed.layers[0].attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.project_qkv.w_t.untyped_storage().data_ptr()
    idx = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(packed(idx), model(idx), rtol=0, atol=1e-5)
        ours, theirs = (build_cache(PRESETS["full"], model.config, 2, torch.device("cpu"), torch.float32) for _ in "ab")
        model(idx[:, :11], ours), packed(idx[:, :11], theirs)  # chunked prefill, then one token at a time
        for t in range(11, 19):
            step = idx[:, t : t + 1]  # (B, 1)
            torch.testing.assert_close(packed(step, theirs), model(step, ours), rtol=0, atol=1e-5)
