"""Throughput as the MLSys 2025 study defines it, measured through any cache preset.

    prefill throughput = B x prompt tokens / prefill seconds
    decode throughput  = B / mean decode step seconds, the fastest and the slowest step dropped

One measurement: a batch of B random prompts of T tokens goes through the cache in one prefill forward, then
`steps` greedy decode steps follow, each timed alone. Random tokens are enough: how fast a cache is does not depend
on what its keys say (an evicting policy evicts as many tokens whatever it keeps).
"""

import time

import torch

from cache.presets import CacheSpec, build_cache
from serving.generate import sync


def prefill_throughput(batch: int, prompt_tokens: int, seconds: float) -> float:
    return batch * prompt_tokens / seconds


def decode_throughput(batch: int, step_seconds: list[float]) -> float:
    """B / the mean of the steps' seconds without the fastest and the slowest (at least 3 steps)."""
    if len(step_seconds) < 3:
        raise ValueError(f"decode throughput drops the fastest and the slowest step: give at least 3 steps, got "
                         f"{len(step_seconds)}")
    kept = sorted(step_seconds)[1:-1]
    return batch / (sum(kept) / len(kept))


@torch.inference_mode()
def measure(model: torch.nn.Module, spec: CacheSpec, batch: int, length: int, steps: int, seed: int = 0) -> dict:
    """Prefill and decode throughput of `model` through a `spec` cache at batch `batch`, prompts of `length`
    tokens, `steps` decode steps; and the cache's bytes after them."""
    weight = next(model.parameters())
    device, dtype, config = weight.device, weight.dtype, model.config
    cache = build_cache(spec, config, batch, device, dtype, model.backend.name, max_tokens=length + steps)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=g).to(device)  # (B, T)
    sync(device)
    start = time.perf_counter()
    logits = model(ids, cache, last_only=True)  # (B, 1, V)
    sync(device)
    prefill = time.perf_counter() - start
    times = []
    for _ in range(steps):
        token = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        start = time.perf_counter()
        logits = model(token, cache)
        sync(device)
        times.append(time.perf_counter() - start)
    return {"prefill_tokens_per_s": prefill_throughput(batch, length, prefill),
            "decode_tokens_per_s": decode_throughput(batch, times), "kv_bytes": cache.total_bytes()}
