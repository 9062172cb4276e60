"""Scaled dot-product attention behind one signature, with interchangeable implementations.

Every implementation obeys the same contract, so the model, the caches and the kernels can be swapped freely:

    attend(q, k, v, *, causal=True, scale=None) -> out

    q:   (B, H, Tq, D)      the queries of the tokens being processed now
    k,v: (B, H_kv, Tk, D)   everything they may look at (cached tokens plus the new ones), Tq <= Tk
    out: (B, H, Tq, D)

Notation: B batch, H query heads, H_kv key/value heads, G = H // H_kv query heads per KV head, T tokens, D head_dim.

GQA / MQA: query head h reads KV head h // G. We never copy K/V G times; instead the G query heads of a group
are viewed as one extra axis and attend to their shared K/V in one batched product.

Causal alignment is *bottom-right*: the Tq queries are the last Tq positions of the Tk keys, so query i sees
keys 0 .. Tk - Tq + i. That is what chunked prefill over a cache needs. PyTorch's SDPA with `is_causal=True`
aligns top-left when Tq < Tk (query i sees keys 0 .. i), which is silently wrong there; we only use it when
Tq == Tk and pass an explicit mask otherwise.

The implementation is picked once, by name, with `get_attend(backend)`; the hot path never branches on it.

A second contract serves eviction policies that rank keys by the attention they receive (H2O):

    attend_with_mass(q, k, v, *, causal=True, scale=None) -> (out, mass)      mass: (B, H, Tk) float32

where mass[b, h, j] is the softmax weight key j received, summed over the Tq queries. The reference writes the
weights out and sums them; the Triton backend computes it from the forward's log-sum-exp, without ever holding
the (Tq, Tk) matrix (`get_attend_with_mass(backend)`).

And a third, for decode steps over a quantized cache: `get_attend_encoded(backend)` returns the kernels that read
the codes, scales and zeros as the cache holds them (Triton's flash-decoding on the GPU, a C kernel on the CPU),
by the device and dtype of the queries they serve.
"""

import math
import warnings
from typing import Callable, Protocol

import torch
import torch.nn.functional as F


class AttendFn(Protocol):
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, scale: float | None = None
    ) -> torch.Tensor: ...


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise a ValueError naming the problem if q, k, v do not fit the attend contract."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attend expects 4-D (B, H, T, D) tensors, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k{tuple(k.shape)} v{tuple(v.shape)}")
    B, H, Tq, D = q.shape
    Bk, H_kv, Tk, Dk = k.shape
    if B != Bk or D != Dk:
        raise ValueError(f"q{tuple(q.shape)} and k{tuple(k.shape)} disagree on batch size or head_dim")
    if H % H_kv != 0:
        raise ValueError(f"n_head={H} is not a multiple of n_kv_head={H_kv}")
    if Tq > Tk:
        raise ValueError(f"more queries than keys (Tq={Tq} > Tk={Tk}); the keys must include the queries' own tokens")


def causal_mask(Tq: int, Tk: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where query i may look at key j, aligned bottom-right: j <= Tk - Tq + i."""
    i = torch.arange(Tq, device=device).unsqueeze(1)  # (Tq, 1)
    j = torch.arange(Tk, device=device).unsqueeze(0)  # (1, Tk)
    return j <= (Tk - Tq) + i


def attention_weights(
    q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """The softmax attention matrix, written out: (B, H, Tq, Tk).

    Each row sums to one over the keys that query may see. Eviction policies that rank tokens by the attention
    they receive (H2O, SnapKV) read these weights.
    """
    check_shapes(q, k, k)
    B, H, Tq, D = q.shape
    H_kv, Tk = k.shape[1], k.shape[2]
    G = H // H_kv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg = q.view(B, H_kv, G, Tq, D)  # (B, H_kv, G, Tq, D): the G query heads sharing one KV head
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, k) * scale  # (B, H_kv, G, Tq, Tk)
    if causal:
        scores = scores.masked_fill(~causal_mask(Tq, Tk, q.device), float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return weights.view(B, H, Tq, Tk)  # (B, H, Tq, Tk)


def reference_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """Attention with the softmax written out. Slow and memory-hungry (it builds the Tq x Tk matrix), but it is
    the specification every faster implementation is tested against."""
    check_shapes(q, k, v)
    return mix_values(attention_weights(q, k, causal=causal, scale=scale), v)


def mix_values(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Weighted sum of values: weights (B, H, Tq, Tk), v (B, H_kv, Tk, D) -> (B, H, Tq, D)."""
    B, H, Tq, Tk = weights.shape
    H_kv, D = v.shape[1], v.shape[3]
    wg = weights.view(B, H_kv, H // H_kv, Tq, Tk)  # (B, H_kv, G, Tq, Tk)
    out = torch.einsum("bhgqk,bhkd->bhgqd", wg, v)  # (B, H_kv, G, Tq, D)
    return out.reshape(B, H, Tq, D)


def sdpa_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """PyTorch's fused scaled_dot_product_attention, with the bottom-right causal alignment of our contract."""
    check_shapes(q, k, v)
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if not causal or Tq == 1:
        # A single new token is the last position: it may see every key, so no mask is needed.
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = causal_mask(Tq, Tk, q.device)  # is_causal would align top-left here, so we pass the mask ourselves
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _triton_attend() -> AttendFn:
    # Imported lazily: triton is optional on CPU machines. Without a GPU this fails here, at construction, with a
    # message pointing to attn.backend=sdpa (or TRITON_INTERPRET=1 to step through the kernels on the CPU).
    from toymodel.kernels.triton_attn import check_triton_available, triton_attend

    check_triton_available()
    return triton_attend


def reference_attend_with_mass(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention output (B, H, Tq, D) and each key's mass summed over the queries (B, H, Tk), float32."""
    weights = attention_weights(q, k, causal=causal, scale=scale)  # (B, H, Tq, Tk)
    return mix_values(weights, v), weights.float().sum(dim=2)


def _triton_attend_with_mass() -> Callable:
    from toymodel.kernels.triton_attn import check_triton_available, triton_attend_with_mass

    check_triton_available()
    return triton_attend_with_mass


def _triton_attend_encoded() -> dict[tuple[str, torch.dtype], Callable]:
    from toymodel.kernels.triton_attn import check_triton_available, is_interpreting
    from cache.kernels.triton_decode import triton_decode_segments

    check_triton_available()
    if is_interpreting():  # numpy on the CPU, where bf16 dots are wrong (cache/kernels/triton_decode.py)
        return {("cpu", dtype): triton_decode_segments for dtype in (torch.float32, torch.float16)}
    return {("cuda", dtype): triton_decode_segments for dtype in (torch.float32, torch.float16, torch.bfloat16)}


def _cpu_attend_encoded() -> dict[tuple[str, torch.dtype], Callable]:
    from cache.kernels.cpu_decode import cpu_decode_available, cpu_decode_segments

    reason = cpu_decode_available()  # compiles cache/kernels/cpu_decode.c once per machine (a few seconds)
    if reason is not None:
        warnings.warn(f"quantized caches decode to float32 before SDPA on the CPU (slower): {reason}", stacklevel=3)
        return {}
    return {("cpu", torch.float32): cpu_decode_segments}


BACKENDS: dict[str, Callable[[], AttendFn]] = {
    "reference": lambda: reference_attend,
    "sdpa": lambda: sdpa_attend,
    "triton": _triton_attend,
}


def get_attend(backend: str) -> AttendFn:
    """Return the attention implementation named `backend` (one of BACKENDS). Called once per model."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[backend]()


def get_attend_with_mass(backend: str) -> Callable:
    """The attend_with_mass implementation for `backend`: the Triton kernel, else the reference (SDPA cannot
    return weights). Raises ValueError for an unknown backend."""
    get_attend(backend)  # validates the name (and, for triton, that it can run here)
    return _triton_attend_with_mass() if backend == "triton" else reference_attend_with_mass


def get_attend_encoded(backend: str) -> dict[tuple[str, torch.dtype], Callable]:
    """Kernels that attend over a quantized cache's stored bytes, dequantizing a few rows at a time, keyed by the
    (device type, dtype) of the queries they serve: Triton's flash-decoding for backend=triton, the C kernel of
    cache/kernels/cpu_decode.py for sdpa on the CPU, none for reference (it decodes the cache, then attends).
    Signature: (q, [(k, v), ...], *, causal). Raises ValueError for an unknown backend."""
    get_attend(backend)  # validates the name (and, for triton, that it can run here)
    if backend == "triton":
        return _triton_attend_encoded()
    return _cpu_attend_encoded() if backend == "sdpa" else {}
