"""KV-Compress in the serving engine: a request's own budget of cached tokens, met by evicting whole blocks of its
least attended keys, so that its heads and layers keep different numbers of tokens and the blocks really go back
to the pool (Rehg 2024, "KV-Compress: Paged KV-Cache Compression with Variable Compression Rates per Attention
Head"; the knobs keep its names).

    Request(prompt, max_tokens, max_cache_tokens=64, protected_window_size=32)   # compressed once, after prefill

Scores. A key's score is the squared attention it receives from the prompt's last `protected_window_size`
queries (the observation window), summed over those queries and over the query heads of its GQA group.

Eviction. Per (layer, KV head), the keys outside the protected window (the last `protected_window_size` tokens,
never evicted) are sorted by score and cut into groups of `block_tokens`; a group's score is the sum of its keys'.
Across every layer and KV head of the sequence, the lowest-scoring groups go until the sequence holds at most
n_layer x n_kv_head x ceil(max_cache_tokens / block_tokens) blocks: `max_cache_tokens` per (layer, KV head) on
average, rounded up to blocks, while a head whose attention is spread keeps more than one whose attention is
concentrated. Compaction keeps each head's tokens in order (PagedStore.keep), so every evicted group frees
exactly one block.

Only compress_once is here: the budget is met once, right after the prefill; the sequence then grows by one token
per step. Compressing again while decoding (KV-Compress's scores accumulated over decode steps) is not built yet.
"""

import torch

from cache.base import ModelCache, Store
from toymodel.attention import attention_weights


def window_scores(q: torch.Tensor, keys: torch.Tensor, window: int) -> torch.Tensor:
    """Each key's squared attention from the last `window` queries, summed over them and the GQA group: q
    (B, H, T, D), keys (B, H_kv, L, D), the queries the last T of the keys -> (B, H_kv, L) float32."""
    W = max(1, min(window, q.shape[2]))
    weights = attention_weights(q[:, :, -W:], keys, causal=True)  # (B, H, W, L)
    B, H, _, L = weights.shape
    H_kv = keys.shape[1]
    return weights.float().square().view(B, H_kv, H // H_kv, W, L).sum(dim=(2, 3))  # (B, H_kv, L)


def watch_prefill(cache: ModelCache, window: int) -> list[torch.Tensor | None]:
    """Make every layer of a fresh cache score its keys when its prompt goes through; returns one slot per layer
    that its step fills with (B, H_kv, L) scores (a chunked prefill: its last chunk's)."""
    scores: list[torch.Tensor | None] = [None] * len(cache.layers)
    for i, layer in enumerate(cache.layers):
        def score(q: torch.Tensor, store: Store, i: int = i) -> None:
            scores[i] = window_scores(q, store.read(values=False)[0], window)
        layer.on_prefill = score
    return scores


def compress(cache: ModelCache, scores: list[torch.Tensor], max_cache_tokens: int, protected: int) -> int:
    """Evict the lowest-scoring groups of keys of a one-row cache just prefilled (every head the same length) until
    it holds at most its budget of blocks. Returns the blocks freed."""
    for layer in cache.layers:
        layer.on_prefill = None
    bt = cache.layers[0].store.pool.block_tokens
    target = len(cache.layers) * cache.n_kv_head * -(-max_cache_tokens // bt)
    held = sum(layer.store.blocks_held() for layer in cache.layers)
    if held <= target:
        return 0
    orders, sums, owners = [], [], []
    for l, layer_scores in enumerate(scores):
        s = layer_scores[0]  # (H_kv, L)
        H_kv, L = s.shape
        evictable = max(0, L - protected)
        groups = evictable // bt
        order = s[:, :evictable].argsort(dim=-1, stable=True)  # (H_kv, evictable): least attended first
        group_sums = s.gather(1, order[:, : groups * bt]).view(H_kv, groups, bt).sum(dim=-1)  # (H_kv, groups)
        orders.append(order)
        sums.append(group_sums.flatten())
        owners.append((l * H_kv + torch.arange(H_kv)).repeat_interleave(groups))  # (H_kv * groups,)
    n_evict = min(held - target, sum(len(s) for s in sums))
    chosen = torch.cat(sums).argsort(stable=True)[:n_evict]  # the lowest groups, over every layer and head
    per_head = torch.bincount(torch.cat(owners)[chosen], minlength=len(scores) * cache.n_kv_head)  # groups each
    for l, (layer, order) in enumerate(zip(cache.layers, orders)):
        H_kv, L = scores[l].shape[1:]
        keep = torch.ones(1, H_kv, L, dtype=torch.bool)
        for h in range(H_kv):  # a head's evicted groups are its lowest: its first k * bt keys by score
            keep[0, h, order[h, : int(per_head[l * H_kv + h]) * bt]] = False
        layer.store.keep(keep, {})
    return n_evict
