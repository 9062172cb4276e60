"""A minimal Llama-style decoder, written from scratch to be read top to bottom.

    ids ─▶ embed ─▶ [ x + Attn(RMSNorm(x)) ; x + MLP(RMSNorm(x)) ] × n_layer ─▶ RMSNorm ─▶ lm_head ─▶ logits

One Attention class covers the three ways of sharing keys and values between heads:

    MHA (n_kv_head == n_head)     GQA (n_kv_head divides n_head)     MQA (n_kv_head == 1)
    q: ■ ■ ■ ■ ■ ■ ■ ■            q: ■ ■ ■ ■ ■ ■ ■ ■                 q: ■ ■ ■ ■ ■ ■ ■ ■
       │ │ │ │ │ │ │ │               └─┬─┘ └─┬─┘ └─┬─┘ └─┬─┘             └───────┬───────┘
    kv:■ ■ ■ ■ ■ ■ ■ ■            kv:  ■     ■     ■     ■               kv:      ■

Fewer KV heads means a proportionally smaller KV cache; that is the whole point of GQA and MQA.

The KV-cache seam. `Transformer.forward(idx, cache, lengths=...)` takes an optional cache with three parts (and an
optional fourth):
  - `cache.positions(T, lengths)`: the (B, T) RoPE positions of the new tokens, one row per sequence (pos[b] ..
    pos[b]+T-1 for a full cache, where pos[b] counts the tokens row b has *seen*, never tokens stored); `lengths`
    (B,) says how many of the T are real in each row of a ragged batch (the rest is padding, never stored),
  - `cache.layers[i].attend(q, k, v, backend) -> y`: the layer cache stores this step's rotated keys and values,
    attends the queries over everything it keeps with the model's attention backend, and evicts by its policy
    (cache/base.py); how it attends is its own business, decided when it was built,
  - `cache.advance()`: called once, at the end of the forward, to count the new tokens as seen,
  - `cache.decode_blocks(blocks, x, cos, sin)`, asked first in a decode step: every block in one call where the
    model is packed for it (`Block.one_call`), or None (then the blocks run as written here).
Without a cache the model attends within `idx` only, positions 0 .. T-1 (right padding is never seen by the real
tokens before it). The model's math never changes.

The matrix products go through `project_*` callables that hold nn.Linear layers: plain products while training;
toymodel/decode_layout.py swaps in packed, transposed weights for fast decoding, without touching the parameters.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from toymodel.attention import Backend, get_backend
from toymodel.config import ModelConfig
from toymodel.rope import apply_rope, rope_cos_sin


class Linears:
    """x -> the outputs of the linears that read x, one product each (one output for one linear). The training
    layout; a plain object rather than a module, so the linears' parameters keep their names in the state dict."""

    def __init__(self, *linears: nn.Linear):
        self.linears = linears

    def __call__(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outs = tuple(linear(x) for linear in self.linears)
        return outs if len(outs) > 1 else outs[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last axis in float32 (PyTorch's F.rms_norm), back to x's dtype, times the
    gain `weight`."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x) * weight


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain (no mean subtraction, no bias).
    `normalize` computes it: rms_norm while training; toymodel/decode_layout.py swaps in a one-call C kernel for
    inference on the CPU, as it does for the matrix products."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.normalize = rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x, self.weight, self.eps)


class Attention(nn.Module):
    """Causal self-attention with n_head query heads and n_kv_head shared key/value heads."""

    def __init__(self, config: ModelConfig, backend: Backend):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_head * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_head * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.d_model, bias=False)
        self.project_qkv = Linears(self.q_proj, self.k_proj, self.v_proj)  # x -> q, k, v
        self.project_out = Linears(self.o_proj)
        self.backend = backend  # chosen once, by the Transformer, never per call

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer_cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)  # (B, T, H*D), (B, T, H_kv*D), (B, T, H_kv*D)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if layer_cache is None:
            y = self.backend.attend(q, k, v, causal=True)
        else:
            y = layer_cache.attend(q, k, v, self.backend)  # over every token the cache keeps, these T last
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.project_out(y)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.project_gate_up = Linears(self.gate_proj, self.up_proj)  # x -> gate, up
        self.project_down = Linears(self.down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.project_gate_up(x)  # (B, T, d_ff) each
        return self.project_down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, backend: Backend):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config, backend)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)
        # Set by toymodel/decode_layout.py: a decode step may ask the cache to run the block in one call with the
        # others (ModelCache.decode_blocks, cache/kernels/cpu_block.py); the cache answers None where it cannot.
        self.one_call = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer_cache=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, layer_cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """The decoder. `backend` names the attention implementation (see toymodel.attention.BACKENDS)."""

    def __init__(self, config: ModelConfig, backend: str = "sdpa"):
        super().__init__()
        self.config = config
        self.backend = get_backend(backend)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, self.backend) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied: one matrix reads and writes tokens
        self.project_logits = Linears(self.lm_head)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                # Residual branches add up over 2 * n_layer paths; shrink them so the stream's variance stays ~1.
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields the tied matrix once

    def forward(self, idx: torch.Tensor, cache=None, last_only: bool = False,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) token ids -> logits (B, T, vocab_size), or (B, 1, vocab_size) of each row's last token only
        with `last_only` (a prefill needs no more: the lm_head over every prompt token is a sixth of a prefill's
        work in the bench model). `lengths` (B,): the real tokens of each row of a right-padded ragged batch (None:
        all T). See the module docstring for `cache`."""
        B, T = idx.shape
        if cache is None:
            positions = torch.arange(T, device=idx.device)  # (T,)
            cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)  # (T, D/2) each
        else:
            positions = cache.positions(T, lengths)  # (B, T): each row from its own position
            cos, sin = (t.unsqueeze(1) for t in rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta))
        x = self.embed_tokens(idx)  # (B, T, d_model)
        stepped = cache.decode_blocks(self.layers, x, cos, sin) if T == 1 and hasattr(cache, "decode_blocks") else None
        if stepped is not None:
            x = stepped
        else:
            for i, block in enumerate(self.layers):  # cos, sin: (T, D/2) or (B, 1, T, D/2), broadcast over the heads
                x = block(x, cos, sin, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.advance()
        if last_only:
            last = torch.full((B,), T - 1, device=idx.device) if lengths is None else lengths.to(idx.device) - 1
            x = x[torch.arange(B, device=idx.device), last].unsqueeze(1)  # (B, 1, d_model): each row's last token
        return self.project_logits(self.norm(x))  # (B, T or 1, vocab_size)
