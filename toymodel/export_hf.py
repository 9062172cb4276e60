"""Export a kvlab checkpoint as a HuggingFace `LlamaForCausalLM` folder (config.json + model.safetensors).

Our decoder is a Llama: RMSNorm, rotary embeddings, SwiGLU, GQA, tied embeddings. Only the names differ:

    kvlab                               HuggingFace Llama
    embed_tokens.weight                 model.embed_tokens.weight      (lm_head.weight is the same matrix)
    layers.i.attn_norm.weight           model.layers.i.input_layernorm.weight
    layers.i.attn.{q,k,v,o}_proj.weight model.layers.i.self_attn.{q,k,v,o}_proj.weight
    layers.i.mlp_norm.weight            model.layers.i.post_attention_layernorm.weight
    layers.i.mlp.{gate,up,down}_proj    model.layers.i.mlp.{gate,up,down}_proj.weight
    norm.weight                         model.norm.weight

No weight is permuted. Checkpoints converted *from* Meta's original Llama need their q/k rows shuffled because
Meta rotates interleaved channel pairs (0,1), (2,3), ... while HF rotates (j, j + D/2) ("rotate half"); our
RoPE already uses HF's pairing (toymodel.rope.rope_cos_sin), and tests/toymodel/test_export_hf.py checks that
the logits agree. That test is also the spec of this file: exported weights must give our logits.

    python -m toymodel.export_hf runs/tiny-mha exports/tiny-mha-hf

transformers is optional (pip install transformers); it is imported only when an export is asked for.
"""

import argparse
import re
import sys
from pathlib import Path

import torch

from toymodel.checkpoint import load_model_config, load_weights, read_meta, resolve_checkpoint
from toymodel.config import ModelConfig
from toymodel.model import Transformer

# (our name pattern, HF name template). Everything not listed (lm_head.weight) is tied and not exported.
RENAMES = [
    (r"embed_tokens\.weight", "model.embed_tokens.weight"),
    (r"layers\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.attn\.([qkvo]_proj)\.weight", r"model.layers.\1.self_attn.\2.weight"),
    (r"layers\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.mlp\.((gate|up|down)_proj)\.weight", r"model.layers.\1.mlp.\2.weight"),
    (r"norm\.weight", "model.norm.weight"),
]


def _transformers():
    """Import transformers, or fail with the command that installs it."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "exporting to HuggingFace needs the `transformers` package: pip install transformers "
            "(or pip install -e '.[dev]')"
        ) from e
    return transformers


def hf_name(name: str) -> str | None:
    """Our parameter name -> HF Llama's, or None for the tied lm_head.weight. Unknown names raise ValueError."""
    if name == "lm_head.weight":
        return None
    for pattern, template in RENAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, template, name)
    raise ValueError(f"no HuggingFace Llama name for parameter {name!r}; add it to RENAMES in {__name__}")


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a kvlab state dict to HF Llama names (tensors unchanged: no transpose, no RoPE permutation)."""
    return {new: w for name, w in state.items() if (new := hf_name(name)) is not None}


def to_hf_config(config: ModelConfig, eos_token_id: int | None = None):
    """The `transformers.LlamaConfig` describing the same network as our ModelConfig."""
    transformers = _transformers()
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim,
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
        bos_token_id=None,  # our data has no beginning-of-sequence token
        eos_token_id=eos_token_id,
        pad_token_id=None,
    )


def to_hf_model(model: Transformer, eos_token_id: int | None = None):
    """An in-memory `LlamaForCausalLM` holding a copy of `model`'s weights, in eval mode, same dtype and device."""
    transformers = _transformers()
    weight = model.embed_tokens.weight
    hf = transformers.LlamaForCausalLM(to_hf_config(model.config, eos_token_id))
    hf = hf.to(device=weight.device, dtype=weight.dtype)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to model.embed_tokens.weight
    if missing or unexpected:
        raise ValueError(f"weight names do not match HF Llama: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr():
        raise ValueError("HF model did not tie lm_head to embed_tokens; its logits would not be ours")
    return hf.eval()


def load_kvlab_model(path: str | Path) -> Transformer:
    """Our model from a run folder, checkpoint folder or model.safetensors, in eval mode on the CPU."""
    ckpt = resolve_checkpoint(path)
    model = Transformer(load_model_config(ckpt))
    load_weights(model, ckpt)
    return model.eval()


def export_checkpoint(path: str | Path, out_dir: str | Path) -> Path:
    """Write a HF Llama folder for the checkpoint at `path` (see resolve_checkpoint). Returns out_dir.

    The checkpoint's `eos_token_id` (train.py records its tokenizer's `<|endoftext|>`) becomes the model's, so that
    HF's generate stops there. The tokenizer itself is not exported (it is a tiktoken BPE; encode with
    corpus.tokenizer).
    """
    model = load_kvlab_model(path)
    eos = read_meta(resolve_checkpoint(path)).get("eos_token_id")
    out_dir = Path(out_dir)
    to_hf_model(model, eos).save_pretrained(out_dir)  # config.json + model.safetensors (tied matrix once)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m toymodel.export_hf", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="run folder (follows `latest`), checkpoint folder, or model.safetensors")
    parser.add_argument("out_dir", help="folder to write config.json and model.safetensors into")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir)
    except (ImportError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}/ (load it with transformers.LlamaForCausalLM.from_pretrained({str(out)!r}))")


if __name__ == "__main__":
    main()
