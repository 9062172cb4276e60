"""Export to HuggingFace: transformers' LlamaForCausalLM, loaded from our exported folder, is our model.

The reference here is independent code (transformers' Llama), so agreement checks the name mapping, the tied
lm_head, the config translation and our claim that our RoPE needs no q/k permutation.
"""

import sys

import pytest
import torch

from toymodel.checkpoint import save_checkpoint
from toymodel.config import ModelConfig
from toymodel.export_hf import export_checkpoint, hf_name, main, to_hf_model
from toymodel.model import Transformer

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, n_layer=2, n_head=4, d_model=32, block_size=64)


def make(n_kv_head: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**TINY, n_kv_head=n_kv_head)).eval()
    with torch.no_grad():  # norms start at 1; randomize them so a swapped or missing norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def greedy(model: Transformer, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation without any cache: the whole sequence is re-run each step (slow, obviously right)."""
    for _ in range(n):
        idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_exported_folder_gives_our_logits_and_greedy_tokens(tmp_path, n_kv_head):
    model = make(n_kv_head)
    export_checkpoint(save_checkpoint(tmp_path / "run", 7, model, model.config), tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.num_key_value_heads == n_kv_head
    assert hf.dtype == torch.float32

    idx = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=0, atol=1e-5)
        ours = greedy(model, idx[:, :5], 12)
        theirs = hf.generate(idx[:, :5], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(theirs, ours)


def test_in_memory_model_shares_no_storage_and_ties_lm_head():
    model = make(2)
    hf = to_hf_model(model)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ours = {p.data_ptr() for p in model.parameters()}
    assert not ours & {p.data_ptr() for p in hf.parameters()}  # a copy: editing one never changes the other
    idx = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=0, atol=1e-5)


def test_unknown_parameter_name_is_reported():
    assert hf_name("lm_head.weight") is None
    with pytest.raises(ValueError, match="layers.0.attn.rope_scale"):
        hf_name("layers.0.attn.rope_scale")


def test_cli_reports_a_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at"):
        main([str(tmp_path / "nowhere"), str(tmp_path / "out")])


def test_missing_transformers_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(SystemExit, match="pip install transformers"):
        main([str(save_checkpoint(tmp_path / "run", 1, make(2), make(2).config)), str(tmp_path / "out")])
