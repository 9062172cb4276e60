"""Lesson 5, exercise: how many bytes a decode step must read. The reference solution."""

from toymodel.config import ModelConfig


def step_bytes(config: ModelConfig, batch: int, tokens: int, bits_per_element: float) -> int:
    """Bytes one decode step reads: every weight once, then the K and V cached (see exercises/l5_step_bytes.py)."""
    c = config
    attention = c.d_model * c.head_dim * (2 * c.n_head + 2 * c.n_kv_head)  # q and o; k and v (fewer heads)
    mlp = 3 * c.d_model * c.d_ff  # gate, up, down
    per_layer = attention + mlp + 2 * c.d_model  # and the two RMSNorm gains
    weights = c.vocab_size * c.d_model + c.n_layer * per_layer + c.d_model  # tied embedding, layers, final norm
    kv = batch * tokens * c.n_layer * 2 * c.n_kv_head * c.head_dim * bits_per_element / 8  # K and V
    return 4 * weights + int(kv)
