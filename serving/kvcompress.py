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


class RunningScores:
    """The scores of the running batch's keys while it decodes (compress_once=False): per layer a (B, H_kv,
    capacity) float32 tensor whose rows follow the running cache's rows and whose slots follow each head's, zero
    past a head's length. A decode step adds its squared attention to every row at once (`watch`); a row that does
    not compress again carries its scores unread, which costs less than picking the others out."""

    def __init__(self, n_layer: int, n_kv_head: int):
        self.layers = [torch.zeros(0, n_kv_head, 0) for _ in range(n_layer)]

    def _room(self, l: int, L: int) -> torch.Tensor:
        """Layer l's scores with room for L slots (grown to twice its capacity at least: a step adds one)."""
        s = self.layers[l]
        if s.shape[2] < L:
            s = self.layers[l] = torch.nn.functional.pad(s, (0, max(L, 2 * s.shape[2]) - s.shape[2]))
        return s

    def extend(self, scores: list[torch.Tensor] | None) -> None:
        """A row joins after the others: its scores, (H_kv, L) per layer, or None (zeros)."""
        for l in range(len(self.layers)):
            s = self._room(l, 0 if scores is None else scores[l].shape[1])
            row = s.new_zeros(1, *s.shape[1:])  # (1, H_kv, capacity)
            if scores is not None:
                row[0, :, : scores[l].shape[1]] = scores[l]
            self.layers[l] = torch.cat([s, row])

    def drop(self, keep: list[bool]) -> None:
        """Keep the rows `keep` names, as ModelCache.drop_rows does."""
        index = torch.tensor(keep, dtype=torch.bool)
        self.layers = [s[index] for s in self.layers]

    def row(self, cache: ModelCache, i: int) -> list[torch.Tensor]:
        """Row i's scores as `compress` takes them: (H_kv, its longest head's length) per layer (views)."""
        return [s[i, :, : int(layer.store.lengths[i].max())] for s, layer in zip(self.layers, cache.layers)]

    def set_row(self, i: int, scores: list[torch.Tensor]) -> None:
        """Row i's scores after a compaction: (H_kv, L) per layer (`keep_scores`), zero past them."""
        for s, new in zip(self.layers, scores):
            s[i].zero_()
            s[i, :, : new.shape[1]] = new

    def watch(self, cache: ModelCache) -> None:
        """Make every layer of the running `cache` add a decode step's squared attention to every row's scores:
        from the softmax weights the decode kernel hands out, or recomputed over the gathered keys. `unwatch` ends
        it."""
        for l, layer in enumerate(cache.layers):
            def accumulate(q: torch.Tensor | None, store: Store, weights: torch.Tensor | None, l: int = l) -> None:
                if weights is None:
                    lengths = store.lengths.to(q.device, torch.long)  # (B, H_kv)
                    keys = store.pool.read(store.tables.to(q.device), lengths, q.dtype, values=False)[0]
                    visible = torch.arange(keys.shape[2], device=q.device) < lengths.unsqueeze(-1)  # (B, H_kv, L)
                    weights = attention_weights(q, keys, visible=visible.unsqueeze(2))  # (B, H, 1, L)
                step = squared(weights, store.lengths.shape[1])  # (B, H_kv, L)
                self._room(l, step.shape[2])[:, :, : step.shape[2]] += step.to(self.layers[l].device)
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
