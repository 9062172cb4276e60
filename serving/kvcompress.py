"""KV-Compress in the serving engine: a request's own budget of cached tokens, met by evicting whole blocks of its
least attended keys, so that its heads and layers keep different numbers of tokens and the blocks really go back
to the pool (Rehg 2024, "KV-Compress: Paged KV-Cache Compression with Variable Compression Rates per Attention
Head"; the knobs keep its names).

    Request(prompt, max_tokens, max_cache_tokens=64, protected_window_size=32)   # compressed once, after prefill
    Request(prompt, max_tokens, max_cache_tokens=64, compress_once=False)        # and again while decoding

Scores. A key's score is the squared attention it receives, summed over the query heads of its GQA group: at
prefill from the prompt's last `protected_window_size` queries (the observation window); with compress_once=False
also from every decode step's query, accumulated for as long as the key stays.

Eviction. Per (layer, KV head), the keys outside the protected window (the last `protected_window_size` tokens,
never evicted) are sorted by score and cut into groups of `block_tokens`; a group's score is the sum of its keys'.
Across every layer and KV head of the sequence, the lowest-scoring groups go until the sequence holds at most
n_layer x n_kv_head x ceil(max_cache_tokens / block_tokens) blocks: `max_cache_tokens` per (layer, KV head) on
average, rounded up to blocks, while a head whose attention is spread keeps more than one whose attention is
concentrated. Compaction keeps each head's tokens in order (PagedStore.keep), so every evicted group frees
exactly one block.

When. Right after the prefill; with compress_once=False, again whenever the sequence has grown by one block per
(layer, KV head) past its budget (about every `block_tokens` decode steps), so a compaction frees whole blocks
and its cost is shared by the steps between.
"""

import numpy as np
import torch

from cache.base import Store
from cache.model_cache import ModelCache
from toymodel.attention import attention_weights


def squared(weights: torch.Tensor, n_kv_head: int) -> torch.Tensor:
    """Each key's squared attention, summed over the queries and the GQA group: weights (B, H, T, L) -> (B, H_kv,
    L) float32."""
    B, H, T, L = weights.shape
    return weights.float().square().view(B, n_kv_head, H // n_kv_head, T, L).sum(dim=(2, 3))  # (B, H_kv, L)


def window_scores(q: torch.Tensor, keys: torch.Tensor, window: int) -> torch.Tensor:
    """The observation window's scores: the squared attention from the last `window` queries of q (B, H, T, D),
    the last T of the keys (B, H_kv, L, D) -> (B, H_kv, L) float32."""
    W = max(1, min(window, q.shape[2]))
    return squared(attention_weights(q[:, :, -W:], keys, causal=True), keys.shape[1])


def watch_prefill(cache: ModelCache, window: int) -> list[torch.Tensor | None]:
    """Make every layer of a fresh one-row cache score its keys when its prompt goes through; returns one slot per
    layer that its step fills with (H_kv, L) scores (a chunked prefill: its last chunk's). `unwatch` ends it."""
    scores: list[torch.Tensor | None] = [None] * len(cache.layers)
    for i, layer in enumerate(cache.layers):
        def score(q: torch.Tensor, store: Store, weights: torch.Tensor | None, i: int = i) -> None:
            scores[i] = window_scores(q, store.read(values=False)[0], window)[0]
        layer.observe = score
    return scores


def watch_decode(cache: ModelCache, rows: list[int], scores: list[list[torch.Tensor]]) -> None:
    """Make every layer of the running cache add a decode step's squared attention to the scores of `rows`:
    scores[i][l] (H_kv, L) of row rows[i] in layer l, grown to the step's length: from the softmax weights the
    decode kernel hands out, or recomputed over the gathered keys. `unwatch` ends it."""
    index = torch.tensor(rows)
    for l, layer in enumerate(cache.layers):
        def accumulate(q: torch.Tensor, store: Store, weights: torch.Tensor | None, l: int = l) -> None:
            lengths = store.lengths[index].to(q.device, torch.long)  # (b, H_kv)
            if weights is None:
                keys = store.pool.read(store.tables[index].to(q.device), lengths, q.dtype, values=False)[0]
                visible = torch.arange(keys.shape[2], device=q.device) < lengths.unsqueeze(-1)  # (b, H_kv, L)
                weights = attention_weights(q[index], keys, visible=visible.unsqueeze(2))  # (b, H, 1, L)
            else:
                weights = weights[index]  # (b, H, 1, L)
            step = squared(weights, lengths.shape[1])  # (b, H_kv, L)
            for i, (s, L) in enumerate(zip(scores, lengths.amax(dim=1).tolist())):  # L: the row's longest head
                s[l] = torch.nn.functional.pad(s[l], (0, L - s[l].shape[1])) + step[i, :, :L]
        layer.observe = accumulate


def unwatch(cache: ModelCache) -> None:
    for layer in cache.layers:
        layer.observe = None


def budget_blocks(cache: ModelCache, max_cache_tokens: int) -> int:
    """The blocks a sequence may hold once compressed: ceil(max_cache_tokens / block_tokens) per (layer, KV
    head)."""
    bt = cache.layers[0].store.pool.block_tokens
    return len(cache.layers) * cache.n_kv_head * -(-max_cache_tokens // bt)


def compress(cache: ModelCache, scores: list[torch.Tensor], max_cache_tokens: int, protected: int,
             row: int = 0) -> tuple[int, list[torch.Tensor] | None]:
    """Evict the lowest-scoring groups of keys of row `row` until it holds at most its budget of blocks; scores[l]
    (H_kv, L) scores its heads' slots in layer l. Returns the blocks freed and, when it evicted, each layer's mask
    (H_kv, L) of the row's kept slots (for `keep_scores`)."""
    bt = cache.layers[0].store.pool.block_tokens
    held = sum(int(layer.store.row_blocks()[0][row]) for layer in cache.layers)
    if held <= budget_blocks(cache, max_cache_tokens):
        return 0, None
    orders, sums, owners = [], [], []
    for l, (layer, s) in enumerate(zip(cache.layers, scores)):
        H_kv, L = s.shape
        lengths = layer.store.lengths[row].long()  # (H_kv,)
        evictable = (lengths - protected).clamp(min=0)  # (H_kv,)
        groups, G = evictable // bt, int(evictable.max()) // bt  # (H_kv,) groups per head, the most of any
        slot = torch.arange(L)
        order = s.masked_fill(slot >= evictable[:, None], float("inf")).argsort(dim=-1, stable=True)  # (H_kv, L)
        group_sums = s.gather(1, order[:, : G * bt]).view(H_kv, G, bt).sum(dim=-1)  # (H_kv, G): least first
        group_sums = group_sums.masked_fill(torch.arange(G) >= groups[:, None], float("inf"))  # past a head's
        orders.append(order)
        sums.append(group_sums.flatten())
        owners.append((l * H_kv + torch.arange(H_kv)).repeat_interleave(G))  # (H_kv * G,)
    candidates = sum(int(torch.isfinite(s).sum()) for s in sums)
    n_evict = min(held - budget_blocks(cache, max_cache_tokens), candidates)
    chosen = torch.cat(sums).argsort(stable=True)[:n_evict]  # the lowest groups, over every layer and head
    per_head = torch.bincount(torch.cat(owners)[chosen], minlength=len(scores) * cache.n_kv_head)  # groups each
    kept = []
    for l, (layer, order) in enumerate(zip(cache.layers, orders)):
        H_kv, L = scores[l].shape
        row_keep = torch.arange(L) < layer.store.lengths[row].long()[:, None]  # (H_kv, L): the slots it holds
        for h in range(H_kv):  # a head's evicted groups are its lowest: its first k * bt keys by score
            row_keep[h, order[h, : int(per_head[l * H_kv + h]) * bt]] = False
        layer.store.keep(row_keep[None], {}, rows=np.array([row]))  # (1, H_kv, L): this row alone compacts
        kept.append(row_keep)
    return n_evict, kept


def keep_scores(scores: list[torch.Tensor], kept: list[torch.Tensor]) -> list[torch.Tensor]:
    """The scores of the kept slots, in order, as compaction moved their keys: (H_kv, L) per layer -> (H_kv,
    the most any head kept) per layer, zero past a head's length."""
    out = []
    for s, keep in zip(scores, kept):
        n = keep.sum(dim=-1)  # (H_kv,)
        compact = torch.zeros(s.shape[0], int(n.max()), dtype=s.dtype)
        compact[torch.arange(compact.shape[1]) < n[:, None]] = s[keep]  # row-major: each head's kept, in order
        out.append(compact)
    return out
