"""What the kernel tests share: the device they run on, their tolerances, random inputs, the error measure, a call
on a chosen number of threads, a model run through a cache on several backends, a block pool with a reference over
each head's gathered tokens, and a model beside a copy packed for decoding."""

from typing import Callable

import torch

from cache.presets import CacheSpec, build_cache
from toymodel.attention import reference_attend
from toymodel.config import ModelConfig
from toymodel.decode_layout import pack_for_decode
from toymodel.model import Transformer

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

# fp32 tolerance covers tf32 dots on a GPU (~3e-4); half precision rounds P to 8/11 mantissa bits.
TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|: one number per tensor, insensitive to the tensor's scale."""
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def packed_pair() -> tuple[Transformer, Transformer]:
    """A tiny GQA model and a copy of it packed for decoding (toymodel/decode_layout.py): the same weights, the
    packed one's products and norms through the CPU kernels."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, block_size=64)
    model = Transformer(config).eval()
    packed = Transformer(config).eval()
    packed.load_state_dict(model.state_dict())
    return model, pack_for_decode(packed)


def on_threads(threads: int, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """fn() with torch.set_num_threads(threads) (which the C kernels are handed), then the old count back."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def make_qkv(B, H, H_kv, Tq, Tk, D, dtype=torch.float32, seed=0):
    """Seeded random q (B, H, Tq, D), k and v (B, H_kv, Tk, D) on DEVICE in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, H_kv, Tk, D, generator=g)
    v = torch.randn(B, H_kv, Tk, D, generator=g)
    return (t.to(DEVICE, dtype) for t in (q, k, v))


def run_backends(config: ModelConfig, spec: CacheSpec, idx: torch.Tensor, prefill: int, backends: tuple[str, ...],
                 before_decode: Callable | None = None) -> dict[str, tuple[torch.Tensor, object]]:
    """The same seeded model on each backend, through a fresh cache built for that backend: idx (B, T) fed as one
    prefill of `prefill` tokens, then one token at a time. before_decode(backend, cache), if given, runs between
    the two. Returns {backend: (logits (B, T, vocab), cache)}."""
    runs = {}
    for backend in backends:
        torch.manual_seed(1)
        model = Transformer(config, backend=backend).to(DEVICE).eval()
        cache = build_cache(spec, config, idx.shape[0], torch.device(DEVICE), torch.float32, backend=backend)
        with torch.no_grad():
            logits = [model(idx[:, :prefill], cache)]
            if before_decode is not None:
                before_decode(backend, cache)
            logits += [model(idx[:, t : t + 1], cache) for t in range(prefill, idx.shape[1])]
        runs[backend] = torch.cat(logits, dim=1), cache
    return runs


def paged_inputs(B, H, H_kv, Tq, lengths, block_tokens, D=32, seed=0):
    """q, a block pool (n_blocks, 1, block_tokens, D) holding every (b, h)'s blocks at shuffled places, its tables
    (B, H_kv, max_blocks), lengths (B, H_kv), and each head's tokens in order [(K (n, D), V (n, D)), ...]; on the
    CPU (kernel tests move them where they run)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths).view(B, H_kv)
    per_head = [-(-int(n) // block_tokens) for n in lengths.flatten()]
    order = torch.randperm(sum(per_head), generator=g)
    pool_k = torch.randn(sum(per_head), 1, block_tokens, D, generator=g)
    pool_v = torch.randn(sum(per_head), 1, block_tokens, D, generator=g)
    tables = torch.zeros(B, H_kv, max(per_head), dtype=torch.int32)
    heads, start = [], 0
    for u, n_blocks in enumerate(per_head):
        ids = order[start : start + n_blocks]
        tables.view(B * H_kv, -1)[u, :n_blocks] = ids.int()
        n = int(lengths.flatten()[u])
        heads.append((pool_k[ids, 0].reshape(-1, D)[:n], pool_v[ids, 0].reshape(-1, D)[:n]))  # (n, D) each
        start += n_blocks
    q = torch.randn(B, H, Tq, D, generator=g)
    return q, pool_k, pool_v, tables, lengths, heads


def gathered_reference(q, heads, H_kv, causal=True):
    """Each (b, h) alone: reference attention of its G query heads over its own tokens."""
    B, H, Tq, D = q.shape
    G = H // H_kv
    out = torch.zeros_like(q)
    for u, (k, v) in enumerate(heads):
        b, h = divmod(u, H_kv)
        qs = q[b : b + 1, h * G : (h + 1) * G]  # (1, G, Tq, D)
        out[b, h * G : (h + 1) * G] = reference_attend(qs, k[None, None], v[None, None], causal=causal)[0]
    return out
