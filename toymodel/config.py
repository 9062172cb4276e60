"""ModelConfig: the handful of numbers that define a toy Llama-style decoder.

This is the only thing a checkpoint needs (besides the weights) to rebuild the model, so it is a plain
dataclass with no dependency on Hydra. Invalid combinations fail here, when the config is built.
"""

from dataclasses import asdict, dataclass, field

from toymodel.ranges import NON_NEGATIVE, POSITIVE, check_ranges


@dataclass
class ModelConfig:
    vocab_size: int = field(default=4096, metadata=POSITIVE)
    n_layer: int = field(default=4, metadata=POSITIVE)
    n_head: int = field(default=8, metadata=POSITIVE)
    n_kv_head: int = field(default=8, metadata=POSITIVE)  # == n_head: MHA; divides n_head: GQA; 1: MQA
    d_model: int = field(default=256, metadata=POSITIVE)
    # SwiGLU hidden size; 0 picks the Llama rule, about 8/3 * d_model rounded up to a multiple of 64
    d_ff: int = field(default=0, metadata=NON_NEGATIVE)
    block_size: int = field(default=256, metadata=POSITIVE)  # the context length the model is trained on
    rope_theta: float = field(default=10000.0, metadata={"range": "(0, inf)"})
    norm_eps: float = field(default=1e-5, metadata={"range": "(0, inf)"})

    def __post_init__(self) -> None:
        check_ranges(self, "model")  # the declared ranges above; what relates two fields follows
        if self.d_model % self.n_head != 0:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}: each KV head must serve "
                f"a whole group of query heads (choose n_kv_head among {divisors(self.n_head)})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE (pairs of channels are rotated)")
        if self.d_ff == 0:
            self.d_ff = 64 * -(-(8 * self.d_model // 3) // 64)  # ceil to a multiple of 64

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Bytes a full KV cache holds per token: K and V, every layer, every KV head (fp16 by default)."""
        return 2 * self.n_layer * self.n_kv_head * self.head_dim * bytes_per_element

    def to_dict(self) -> dict:
        return asdict(self)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
