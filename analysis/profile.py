"""Operator profiles for the throughput predictor (analysis/predictor.py), as Vidur profiles an LLM's operators
(Agrawal et al., "Vidur: A Large-Scale Simulation Framework for LLM Inference", MLSys 2024): each operator timed
alone, on this device, over the sizes that decide its cost.

    operator        what runs                                                   sizes
    dense decode    the model's forward on B rows of one token, attention       B (tokens)
                    left out: embedding, every block's norms, projections,
                    RoPE and MLP, the final norm and the lm_head on B rows
    dense prefill   the same on one row of n tokens, the lm_head on its last     n = B x T (tokens)
    attention       every layer's LayerCache of a preset: prefill (store T       (B, T) per preset
                    tokens, attend causally: one chunk of T) and decode steps
                    (store one token, attend over T + s); encoding included
    encode          a codec encoding one layer's K and V                         per token, per codec

"Attention left out" is the model's own forward with a stand-in cache whose layers hand back the queries as their
output (`NoAttention`): the dense operators run exactly the code a real step runs, and nothing of it is copied
here. Every time is the fastest of a few runs (the predictor's `repeats`): on a shared machine, the least disturbed.
"""

import time
from typing import Callable

import torch

from cache.presets import CacheSpec, build_cache
from serving.generate import sync


class _Skip:
    """A layer cache that attends nowhere: the layer's output is its queries (B, H, T, D), so the shapes after it
    are a real step's."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend) -> torch.Tensor:
        return q


class NoAttention:
    """What Transformer.forward asks of a cache (positions, layers, advance), with every layer's attention left out:
    the model's forward through it times everything but attention."""

    def __init__(self, n_layer: int, device: torch.device):
        self.layers, self.device = [_Skip()] * n_layer, device

    def positions(self, T: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return torch.arange(T, device=self.device).unsqueeze(0)  # (1, T): broadcast over the rows

    def advance(self) -> None:
        pass


def fastest_seconds(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Wall-clock seconds of the fastest of `repeats` runs of `call`, after one run not counted: on a shared
    machine the fastest run is the one least disturbed."""
    call()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


@torch.inference_mode()
def dense(model: torch.nn.Module, rows: int, tokens: int, repeats: int) -> float:
    """Seconds of the model's forward minus attention on `rows` rows of `tokens` tokens each (the lm_head on each
    row's last token): (B, 1) is a decode step's, (1, n) a prefill's."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (rows, tokens), device=device)  # (B, T)
    skip = NoAttention(model.config.n_layer, device)
    return fastest_seconds(lambda: model(ids, skip, last_only=True), device, repeats)


@torch.inference_mode()
def attention(model: torch.nn.Module, spec: CacheSpec, batch: int, length: int, steps: int,
              seed: int = 0) -> tuple[float, list[float]]:
    """Every layer's attention through a `spec` cache, on random queries, keys and values (how fast a cache is does
    not depend on what its keys say): seconds to prefill `length` tokens of `batch` rows in one chunk, and the
    seconds of each of `steps` decode steps after it."""
    weight = next(model.parameters())
    device, dtype, c = weight.device, weight.dtype, model.config
    cache = build_cache(spec, c, batch, device, dtype, model.backend.name, max_tokens=length + steps)
    g = torch.Generator().manual_seed(seed)

    def qkv(T: int) -> tuple[torch.Tensor, ...]:
        """Laid out as a layer hands them over: q, k as RoPE writes them, v a view of the projection's output."""
        q = torch.randn(batch, c.n_head, T, c.head_dim, generator=g)  # (B, H, T, D)
        k = torch.randn(batch, c.n_kv_head, T, c.head_dim, generator=g)  # (B, H_kv, T, D)
        v = torch.randn(batch, T, c.n_kv_head, c.head_dim, generator=g)  # (B, T, H_kv, D)
        return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype).transpose(1, 2)

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
        sync(device)
        start = time.perf_counter()
        cache.positions(q.shape[2])
        for layer in cache.layers:
            layer.attend(q, k, v, model.backend)
        cache.advance()
        sync(device)
        return time.perf_counter() - start

    prefill = step(*qkv(length))
    decode = [step(*qkv(1)) for _ in range(steps)]
    return prefill, decode


@torch.inference_mode()
def encode(spec: CacheSpec, model: torch.nn.Module, tokens: int, repeats: int) -> float:
    """Seconds per token for `spec`'s codec to encode one layer's K and V (every KV head) of `tokens` tokens."""
    weight = next(model.parameters())
    c = model.config
    codec = spec.build_codec(c.head_dim)
    x = torch.randn(1, c.n_kv_head, tokens, c.head_dim).to(weight.device, weight.dtype)  # (1, H_kv, T, D)
    seconds = fastest_seconds(lambda: (codec.key.encode(x), codec.value.encode(x)), weight.device, repeats)
    return seconds / tokens
