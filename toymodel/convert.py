"""MHA -> GQA/MQA conversion by mean-pooling key/value heads (Ainslie et al., "GQA", 2023, section 2.1).

A multi-head checkpoint has n_head K heads and n_head V heads. To serve G = n_head // n_kv_head query heads from
one shared KV head, the paper averages the G original heads of each group, then "up-trains" briefly. Mean
pooling beat keeping one head or random init, because every original head contributes.
"""

from dataclasses import replace

import torch

from toymodel.config import ModelConfig


def pool_kv_heads(weight: torch.Tensor, n_head: int, n_kv_head: int) -> torch.Tensor:
    """Average groups of consecutive heads of a k_proj / v_proj weight.

    weight: (n_head * D, d_model) -> (n_kv_head * D, d_model). Query head h reads KV head h // G, so the heads
    pooled into KV head j are exactly the query heads j*G .. j*G + G-1 that will read it.
    """
    d_model = weight.shape[1]
    G = n_head // n_kv_head
    heads = weight.view(n_kv_head, G, -1, d_model)  # (H_kv, G, D, d_model)
    return heads.mean(dim=1).reshape(-1, d_model)  # (H_kv * D, d_model)


def mha_to_gqa(
    state_dict: dict[str, torch.Tensor], config: ModelConfig, n_kv_head: int
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Turn an MHA (or any GQA) checkpoint into one with `n_kv_head` KV heads. Returns (state_dict, config)."""
    new_config = replace(config, n_kv_head=n_kv_head)  # validates divisibility
    if config.n_kv_head != config.n_head:
        raise ValueError(
            f"expected a multi-head checkpoint (n_kv_head == n_head == {config.n_head}), got "
            f"n_kv_head={config.n_kv_head}; convert from the original MHA checkpoint instead"
        )
    pooled = {}
    for name, tensor in state_dict.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            tensor = pool_kv_heads(tensor, config.n_head, n_kv_head)
        pooled[name] = tensor
    return pooled, new_config
