"""A minimal Llama-style decoder, written from scratch to be read top to bottom.

    ids ─▶ embed ─▶ [ x + Attn(RMSNorm(x)) ; x + MLP(RMSNorm(x)) ] × n_layer ─▶ RMSNorm ─▶ lm_head ─▶ logits

One Attention class covers the three ways of sharing keys and values between heads:

    MHA (n_kv_head == n_head)     GQA (n_kv_head divides n_head)     MQA (n_kv_head == 1)
    q: ■ ■ ■ ■ ■ ■ ■ ■            q: ■ ■ ■ ■ ■ ■ ■ ■                 q: ■ ■ ■ ■ ■ ■ ■ ■
       │ │ │ │ │ │ │ │               └─┬─┘ └─┬─┘ └─┬─┘ └─┬─┘             └───────┬───────┘
    kv:■ ■ ■ ■ ■ ■ ■ ■            kv:  ■     ■     ■     ■               kv:      ■

Fewer KV heads means a proportionally smaller KV cache; that is the whole point of GQA and MQA.

The KV-cache seam. `Transformer.forward(idx, cache)` takes an optional cache object that provides three things:
  - `cache.positions(T)`: the RoPE positions of the T new tokens (a full cache: pos .. pos+T-1, where pos counts
    tokens *seen*, never tokens stored),
  - `cache.layers[i].update(k, v, q) -> (K, V)`: stores this layer's new keys/values and returns everything the new
    queries attend over (q, the rotated queries, lets a cache read only what they need: memhier's retrieval mode).
    A layer cache whose `reads_mass` is True is then handed each key's attention summed over the queries
    (B, H, Tk) through `observe_mass(mass)` (H2O; a fused kernel computes it without writing the weights out); one
    whose `needs_attention` is True is shown the weights themselves (B, H, T, Tk) through
    `weights = observe(weights)`, computed by the reference path so that they exist,
  - `cache.advance(T)`: called once, at the end of the forward, to count the T tokens as seen.
Without a cache the model attends within `idx` only, positions 0 .. T-1. The model's math never changes.

Decoding one token is a chain of matrix-vector products, and their cost is reading the weights from memory. Two
layouts make that read faster on the CPU (bench/decode.py --compare-layouts measures them): every weight stored
transposed, (d_in, d_out) row-major, so x @ W^T is a plain row-major product that the BLAS streams through, and
the matrices that read the same input (q, k, v; gate, up) packed side by side, so one product replaces two or
three. `pack_for_decode()` does both, once, before inference; the parameters keep their names, shapes and values,
so checkpoints and training are unaffected. It also picks the product itself: on a CPU in float32, the few-row
products of a decode step go to a small C kernel that reads each weight matrix front to back with every core,
about twice as fast as the BLAS there (toymodel/kernels/cpu_matmul.py); elsewhere, torch.matmul.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from toymodel.attention import attention_weights, get_attend, get_attend_encoded, get_attend_with_mass, mix_values
from toymodel.config import ModelConfig
from toymodel.rope import apply_rope, rope_cos_sin
from toymodel.kernels.cpu_matmul import Matmul, matmul_for


@torch.no_grad()
def pack_linears(*linears: nn.Linear) -> torch.Tensor:
    """One (d_in, sum of d_out) row-major matrix holding the transposed weights of linears that share an input.

    Each linear's weight becomes a (d_out, d_in) view of its columns: values and shape unchanged, one storage, so
    nn.Linear and x @ packed always agree (nothing can go stale) and no memory is added.
    """
    packed = torch.cat([lin.weight for lin in linears]).t().contiguous()  # (d_in, sum d_out)
    start = 0
    for lin in linears:
        n = lin.out_features
        lin.weight = nn.Parameter(packed[:, start : start + n].t(), lin.weight.requires_grad)  # (d_out, d_in) view
        start += n
    return packed


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x / sqrt(mean(x^2) + eps) over the last axis in float32 (PyTorch's fused F.rms_norm: one call instead of
        four, which matters when decoding a token at a time), back to x's dtype, times the gain."""
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class Attention(nn.Module):
    """Causal self-attention with n_head query heads and n_kv_head shared key/value heads."""

    def __init__(self, config: ModelConfig, backend: str):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_head * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_head * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.d_model, bias=False)
        self.attend = get_attend(backend)  # chosen once here, never per call
        self.attend_with_mass = get_attend_with_mass(backend)
        self.attend_encoded = get_attend_encoded(backend)  # {(device type, dtype): kernel over quantized caches}
        self.qkv_sizes = [config.n_head * config.head_dim] + 2 * [config.n_kv_head * config.head_dim]
        self.register_buffer("qkv_t", None, persistent=False)  # (d_model, sum qkv_sizes) after pack()
        self.register_buffer("o_t", None, persistent=False)  # (H*D, d_model) after pack()
        self.matmul = torch.matmul

    def pack(self, matmul: Matmul) -> None:
        """Decode layout (see the module docstring): products by `matmul` with transposed, packed weights."""
        self.qkv_t = pack_linears(self.q_proj, self.k_proj, self.v_proj)
        self.o_t = pack_linears(self.o_proj)
        self.matmul = matmul

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, T, d_model) -> q (B, T, H*D), k and v (B, T, H_kv*D); one product once the weights are packed."""
        if self.qkv_t is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.matmul(x, self.qkv_t).split(self.qkv_sizes, dim=-1)

    def project_out(self, y: torch.Tensor) -> torch.Tensor:
        """y: (B, T, H*D) -> (B, T, d_model)."""
        return self.o_proj(y) if self.o_t is None else self.matmul(y, self.o_t)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer_cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = self.attend(q, k, v, causal=True) if layer_cache is None else self.attend_cached(q, k, v, layer_cache)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.project_out(y)

    def attend_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_cache) -> torch.Tensor:
        """q (B, H, T, D) and this step's k, v (B, H_kv, T, D) -> (B, H, T, D), attending over everything the layer
        cache keeps; the one place that asks what the cache wants to see of the attention."""
        kernel = self.attend_encoded.get((q.device.type, q.dtype))
        if q.shape[2] == 1 and kernel is not None and layer_cache.keeps_codes:
            # a decode step over a quantized cache, on a kernel that dequantizes the stored codes as it reads them
            return kernel(q, layer_cache.update_encoded(k, v, q), causal=True)
        k, v = layer_cache.update(k, v, q)  # (B, H_kv, Tk, D): kept earlier tokens followed by these T
        if layer_cache.reads_mass:  # H2O: what each key received, summed over the queries
            y, mass = self.attend_with_mass(q, k, v, causal=True)  # (B, H, T, D), (B, H, Tk)
            layer_cache.observe_mass(mass)
            return y
        if not layer_cache.needs_attention:
            return self.attend(q, k, v, causal=True)
        weights = attention_weights(q, k, causal=True)  # (B, H, T, Tk): SnapKV and KV-Compress read the weights
        weights = layer_cache.observe(weights)  # the policy may zero weights that fall on padding
        return mix_values(weights, v)  # (B, H, T, D)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.register_buffer("gate_up_t", None, persistent=False)  # (d_model, 2 * d_ff) after pack()
        self.register_buffer("down_t", None, persistent=False)  # (d_ff, d_model) after pack()
        self.matmul = torch.matmul

    def pack(self, matmul: Matmul) -> None:
        """Decode layout (see the module docstring): products by `matmul` with transposed, packed weights."""
        self.gate_up_t = pack_linears(self.gate_proj, self.up_proj)
        self.down_t = pack_linears(self.down_proj)
        self.matmul = matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_t is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = self.matmul(x, self.gate_up_t).chunk(2, dim=-1)  # (B, T, d_ff) each, from one product
        return self.matmul(F.silu(gate) * up, self.down_t)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, backend: str):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config, backend)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer_cache=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, layer_cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """The decoder. `backend` names the attention implementation (see toymodel.attention.BACKENDS)."""

    def __init__(self, config: ModelConfig, backend: str = "sdpa"):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, backend) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied: one matrix reads and writes tokens
        self.register_buffer("lm_head_t", None, persistent=False)  # (d_model, vocab_size) after pack_for_decode()
        self.matmul = torch.matmul
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                # Residual branches add up over 2 * n_layer paths; shrink them so the stream's variance stays ~1.
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def pack_for_decode(self, cpu_kernel: bool = True) -> "Transformer":
        """Lay the weights out for fast decoding (see the module docstring); logits are unchanged. Call it after
        loading weights and moving the model (.to() copies parameters and buffers apart); not for training.
        cpu_kernel=False keeps torch.matmul on the CPU too (bench/decode.py --compare-layouts measures both)."""
        weight = self.lm_head.weight
        self.matmul = matmul_for(weight.device, weight.dtype) if cpu_kernel else torch.matmul
        for block in self.layers:
            block.attn.pack(self.matmul)
            block.mlp.pack(self.matmul)
        self.lm_head_t = pack_linears(self.lm_head)  # the tied matrix: the embedding reads rows of the same view
        self.embed_tokens.weight = self.lm_head.weight
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields the tied matrix once

    def forward(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        """idx: (B, T) token ids -> logits (B, T, vocab_size). See the module docstring for `cache`."""
        T = idx.shape[1]
        positions = torch.arange(T, device=idx.device) if cache is None else cache.positions(T)  # (T,)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)  # (T, D) each
        x = self.embed_tokens(idx)  # (B, T, d_model)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        return self.lm_head(x) if self.lm_head_t is None else self.matmul(x, self.lm_head_t)  # (B, T, vocab_size)
