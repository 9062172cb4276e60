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

The implementation is picked once, by name, with `get_backend(name)`; the hot path never branches on it.

A second contract serves eviction policies that rank keys by the attention they receive (H2O):

    attend_with_mass(q, k, v, *, causal=True, scale=None) -> (out, mass)      mass: (B, H, Tk) float32

where mass[b, h, j] is the softmax weight key j received, summed over the Tq queries. The reference writes the
weights out and sums them; the SDPA backend does the same a chunk of queries at a time, over the keys each chunk
may see; the Triton backend computes it from the forward's log-sum-exp, without ever holding the (Tq, Tk) matrix.

A `Backend` carries one implementation of each contract. The model hands it to a layer cache with every step, and
the cache attends with it (cache/base.py); kernels that read a quantized cache's stored codes belong to the cache
(cache/kernels/), which picks them when it is built.
"""

import functools
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F


class AttendFn(Protocol):
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, scale: float | None = None
    ) -> torch.Tensor: ...


class AttendWithMassFn(Protocol):
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, scale: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


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
    q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, scale: float | None = None,
    visible: torch.Tensor | None = None
) -> torch.Tensor:
    """The softmax attention matrix, written out: (B, H, Tq, Tk).

    Each row sums to one over the keys that query may see: by the causal mask, or by `visible` (B, H_kv, Tq, Tk)
    where KV heads hold different numbers of keys (a block pool after KV-Compress). Eviction policies that rank
    tokens by the attention they receive (H2O, SnapKV) read these weights.
    """
    check_shapes(q, k, k)
    B, H, Tq, D = q.shape
    H_kv, Tk = k.shape[1], k.shape[2]
    G = H // H_kv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg = q.view(B, H_kv, G, Tq, D)  # (B, H_kv, G, Tq, D): the G query heads sharing one KV head
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, k).mul_(scale)  # (B, H_kv, G, Tq, Tk)
    if visible is not None:
        scores = scores.masked_fill(~visible.unsqueeze(2), float("-inf"))  # (B, H_kv, 1, Tq, Tk) over the group
    elif causal:  # every query sees the keys before its own Tq: only the last Tq columns hold masked weights
        scores[..., Tk - Tq :].masked_fill_(~causal_mask(Tq, Tq, q.device), float("-inf"))
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
    if Tq == Tk and q.is_cpu and not q.requires_grad and CPU_CHUNKED_PREFILL[0] < Tq <= CPU_CHUNKED_PREFILL[1]:
        return chunked_causal(q, k, v, scale, gqa)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = causal_mask(Tq, Tk, q.device)  # is_causal would align top-left here, so we pass the mask ourselves
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


# PyTorch's CPU flash kernel cuts the keys into blocks of 512 and skips only blocks wholly above the diagonal, so a
# causal prompt of up to about a thousand tokens pays for the full square. Between these lengths queries go in chunks
# of 64, each over the keys it may see; past them the kernel's own skipping wins, below them the chunks cost more
# than they save (`python -m bench.prefill_attention` sweeps the lengths; bench/results/prefill_attention.json).
CPU_CHUNKED_PREFILL = (128, 1024)
PREFILL_CHUNK = 64


@functools.lru_cache(maxsize=4)
def _causal_bias(T: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(T, T) additive mask: 0 where query i may see key j (j <= i), -inf elsewhere; built once per prompt length,
    not once per layer."""
    return torch.zeros(T, T, dtype=dtype, device=device).masked_fill_(~causal_mask(T, T, device), -math.inf)


def chunked_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   gqa: bool = False) -> torch.Tensor:
    """Causal attention of T queries over their own T keys, PREFILL_CHUNK queries at a time: chunk [s, e) attends
    keys [0, e) with the bottom-right mask, so no work goes to keys above the diagonal past the chunk."""
    T = q.shape[2]
    bias = _causal_bias(T, q.device, q.dtype)  # (T, T)
    outs = [F.scaled_dot_product_attention(q[:, :, :PREFILL_CHUNK], k[:, :, :PREFILL_CHUNK], v[:, :, :PREFILL_CHUNK],
                                           is_causal=True, scale=scale, enable_gqa=gqa)]  # the first: a square
    for s in range(PREFILL_CHUNK, T, PREFILL_CHUNK):
        e = min(T, s + PREFILL_CHUNK)
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], scale=scale,
                                                   attn_mask=bias[s:e, :e], enable_gqa=gqa))  # 0 or -inf
    return torch.cat(outs, dim=2)  # (B, H, T, D)


def masked_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """SDPA where `visible` (B, H_kv, Tq, Tk) says which keys each query may see, per KV head: a ragged batch,
    whose rows hold different numbers of keys and queries (cache/blocks.py builds the mask). Every query must see
    at least one key. The mask is the one tensor repeated for the G query heads of a group.

    PREFILL_CHUNK queries at a time, each chunk over the keys up to the last one any of its queries sees: SDPA
    turns a boolean mask into a float one, (B, H, Tq, Tk) at 4 bytes a weight (6 GB per layer for 4 rows of 8k
    tokens in the bench model), so a chunk's is the most it holds, and no chunk works on keys past its reach."""
    check_shapes(q, k, v)
    B, H, Tq = q.shape[:3]
    H_kv = k.shape[1]
    out = q.new_empty(B, H, Tq, v.shape[3])
    for s in range(0, Tq, PREFILL_CHUNK):
        e = min(Tq, s + PREFILL_CHUNK)
        seen = visible[:, :, s:e]  # (B, H_kv, e - s, Tk)
        n = int(seen.any(dim=(0, 1, 2)).nonzero().max()) + 1  # the keys up to the last one the chunk sees
        mask = seen[..., :n].unsqueeze(2).expand(B, H_kv, H // H_kv, e - s, n).reshape(B, H, e - s, n)
        out[:, :, s:e] = F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :n], v[:, :, :n], attn_mask=mask,
                                                        enable_gqa=H != H_kv)
    return out


def ragged_observed_weights(q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor, real: torch.Tensor,
                            W: int) -> torch.Tensor:
    """The softmax weights of each row's last W real queries, (B, H, W, Tk), where `visible` (B, H_kv, Tq, Tk) is a
    ragged batch's mask (masked_attend) and its rows are right-padded: row b's real queries are its first real[b]
    (B,). A row with fewer than W real queries gets zero rows first, for the ones it lacks: what the row alone
    would show (SnapKV's observation window), without writing out every query's weights."""
    B, H, _, D = q.shape
    H_kv, Tk = k.shape[1], k.shape[2]
    at = real.to(q.device).view(B, 1) - W + torch.arange(W, device=q.device)  # (B, W): each window query's index
    pick = at.clamp(min=0)[:, None, :, None]  # (B, 1, W, 1); a query the row lacks reads query 0, zeroed below
    weights = attention_weights(q.gather(2, pick.expand(B, H, W, D)), k,
                                visible=visible.gather(2, pick.expand(B, H_kv, W, Tk)))  # (B, H, W, Tk)
    return weights.masked_fill((at < 0)[:, None, :, None], 0.0)


def ragged_mass(q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Each key's softmax weight summed over the real queries of its row, (B, H, Tk) float32, for a ragged batch
    (`visible` and `real` as ragged_observed_weights takes them): H2O's mass, PREFILL_CHUNK queries at a time, so
    no (Tq, Tk) matrix per head is held."""
    B, H, Tq, _ = q.shape
    mass = torch.zeros(B, H, k.shape[2], dtype=torch.float32, device=q.device)
    padding = torch.arange(Tq, device=q.device) >= real.to(q.device).view(B, 1)  # (B, Tq)
    for s in range(0, Tq, PREFILL_CHUNK):
        e = min(Tq, s + PREFILL_CHUNK)
        weights = attention_weights(q[:, :, s:e], k, visible=visible[:, :, s:e]).float()  # (B, H, e - s, Tk)
        mass += weights.masked_fill_(padding[:, None, s:e, None], 0.0).sum(dim=2)
    return mass


def reference_attend_with_mass(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention output (B, H, Tq, D) and each key's mass summed over the queries (B, H, Tk), float32."""
    weights = attention_weights(q, k, causal=causal, scale=scale)  # (B, H, Tq, Tk)
    return mix_values(weights, v), weights.float().sum(dim=2)


def chunked_attend_with_mass(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's output and mass, PREFILL_CHUNK queries at a time: each chunk's weights are written out over
    only the keys its queries may see, so no weight above the diagonal is computed and a prompt never holds a
    (Tq, Tk) matrix per head (a third of a prefill's time at 768 tokens in the bench model, 1.6 GB per layer at
    8k). Equal to the reference up to rounding: a chunk's rows are the reference's rows, cut where their zeros
    start."""
    check_shapes(q, k, v)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    out = q.new_empty(B, H, Tq, D)
    mass = torch.zeros(B, H, Tk, dtype=torch.float32, device=q.device)
    for s in range(0, Tq, PREFILL_CHUNK):
        e = min(Tq, s + PREFILL_CHUNK)
        seen = Tk - Tq + e if causal else Tk  # the keys the chunk's last query may see
        weights = attention_weights(q[:, :, s:e], k[:, :, :seen], causal=causal, scale=scale)  # (B, H, e - s, seen)
        out[:, :, s:e] = mix_values(weights, v[:, :, :seen])
        mass[:, :, :seen] += weights.float().sum(dim=2)
    return out, mass


@dataclass(frozen=True)
class Backend:
    """One attention implementation of each contract: `attend`, and `attend_with_mass` for H2O."""

    name: str
    attend: AttendFn
    attend_with_mass: AttendWithMassFn


def _triton_backend() -> Backend:
    # Imported lazily: triton is optional on CPU machines. Without a GPU this fails here, at construction, with a
    # message pointing to attn.backend=sdpa (or TRITON_INTERPRET=1 to step through the kernels on the CPU).
    from toymodel.kernels.triton_attn import check_triton_available, triton_attend, triton_attend_with_mass

    check_triton_available()
    return Backend("triton", triton_attend, triton_attend_with_mass)


# SDPA cannot return the weights, so its attend_with_mass writes them out, a chunk of queries at a time.
BACKENDS: dict[str, Callable[[], Backend]] = {
    "reference": lambda: Backend("reference", reference_attend, reference_attend_with_mass),
    "sdpa": lambda: Backend("sdpa", sdpa_attend, chunked_attend_with_mass),
    "triton": _triton_backend,
}


def get_backend(name: str) -> Backend:
    """The attention implementation named `name` (one of BACKENDS). Called once per model.

    Raises:
        ValueError: for an unknown name; for triton, also when it cannot run here (no GPU and no interpreter).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]()
