"""KV-Compress in the serving engine: a request's own budget of cached tokens, met by evicting whole blocks of its
least attended keys, so that its heads and layers keep different numbers of tokens and the blocks really go back
to the pool (Rehg 2024, "KV-Compress: Paged KV-Cache Compression with Variable Compression Rates per Attention
Head"; the knobs keep its names).

    Request(prompt, max_tokens, max_cache_tokens=64, protected_window_size=32)   # compressed once, after prefill
    Request(prompt, max_tokens, max_cache_tokens=64, compress_once=False)        # and again while decoding

Scores. A key's score is the squared attention it receives, summed over the query heads of its GQA group: at
prefill from the prompt's last `protected_window_size` queries (the observation window); with compress_once=False
also from every decode step's query, accumulated for as long as the key stays.

Eviction. Per (layer, KV head), the keys outside the protected window (the last `protected_window_size` tokens, never
evicted) are sorted by score and cut into groups of `block_tokens`; a group's score is the sum of its keys'. Across
every layer and KV head of the sequence, the lowest-scoring groups go until the sequence holds at most n_layer x
n_kv_head x ceil(max_cache_tokens / block_tokens) blocks: `max_cache_tokens` per (layer, KV head) on average, rounded up
to blocks, while a head whose attention is spread keeps more than one whose attention is concentrated. Compaction keeps
each head's tokens in order (`compact`, as PagedStore.keep does for a whole layer), so every evicted group frees exactly
one block.

When. Right after the prefill; with compress_once=False, again whenever the sequence has grown by one block per (layer,
KV head) past its budget (about every `block_tokens` decode steps), so a compaction frees whole blocks and its cost is
shared by the steps between. The sequences due in one decode step compress together: `compress` takes several rows and
chooses for all of them, every layer and head, in one pass of tensor operations (each row's choice is the one it would
get alone), then moves their kept tokens in every layer with one copy in the pool, so its fixed cost is paid once per
step, not once per sequence and layer.
"""

import numpy as np
import torch
import torch.nn.functional as F

from cache.base import Store
from cache.model_cache import ModelCache
from cache.pool import compaction
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
    layer that its step fills with (H_kv, L) scores (a chunked prefill: its last chunk's). A chunk of one token is
    a decode step: its window is that token, whose softmax weights the decode kernel hands out (in one call without
    the queries). `unwatch` ends it."""
    scores: list[torch.Tensor | None] = [None] * len(cache.layers)
    for i, layer in enumerate(cache.layers):
        def score(q: torch.Tensor | None, store: Store, weights: torch.Tensor | None, i: int = i) -> None:
            if weights is None:
                scores[i] = window_scores(q, store.read(values=False)[0], window)[0]
            else:  # (1, H, 1, L)
                scores[i] = squared(weights, store.lengths.shape[1])[0]
        layer.observe = score
    return scores


class RunningScores:
    """The scores of the running batch's keys while it decodes (compress_once=False): per layer a (B, H_kv,
    capacity) float32 tensor whose rows follow the running cache's rows and whose slots follow each head's, zero
    past a head's length. A decode step adds its squared attention to every row at once (`watch`); a row that does
    not compress again carries its scores unread, which costs less than picking the others out."""

    def __init__(self, n_layer: int, n_kv_head: int):
        self.layers = [torch.zeros(0, n_kv_head, 0) for _ in range(n_layer)]

    def room(self, l: int, L: int) -> torch.Tensor:
        """Layer l's scores with room for L slots (grown to twice its capacity at least: a step adds one)."""
        s = self.layers[l]
        if s.shape[2] < L:
            s = self.layers[l] = F.pad(s, (0, max(L, 2 * s.shape[2]) - s.shape[2]))
        return s

    def extend(self, scores: list[torch.Tensor] | None) -> None:
        """A row joins after the others: its scores, (1, H_kv, L) per layer, or None (zeros)."""
        for l in range(len(self.layers)):
            s = self.room(l, 0 if scores is None else scores[l].shape[2])
            row = s.new_zeros(1, *s.shape[1:])  # (1, H_kv, capacity)
            if scores is not None:
                row[:, :, : scores[l].shape[2]] = scores[l]
            self.layers[l] = torch.cat([s, row])

    def drop(self, keep: list[bool]) -> None:
        """Keep the rows `keep` names, as ModelCache.drop_rows does."""
        index = torch.tensor(keep, dtype=torch.bool)
        self.layers = [s[index] for s in self.layers]

    def rows(self, cache: ModelCache, rows: list[int]) -> list[torch.Tensor]:
        """The scores of `rows` as `compress` takes them: (len(rows), H_kv, their longest head's length) per
        layer."""
        index = torch.tensor(rows)
        return [s[index, :, : int(layer.store.lengths.numpy()[rows].max())]
                for s, layer in zip(self.layers, cache.layers)]

    def set_rows(self, rows: list[int], scores: list[torch.Tensor]) -> None:
        """The scores of `rows` after a compaction: (len(rows), H_kv, L) per layer (`compress`), zero past them."""
        index = torch.tensor(rows)
        for s, new in zip(self.layers, scores):
            s[index] = 0
            s[index, :, : new.shape[2]] = new

    def watch(self, cache: ModelCache) -> None:
        """Make every layer of the running `cache` add a decode step's squared attention to every row's scores
        (`Accumulate`). `unwatch` ends it."""
        for l, layer in enumerate(cache.layers):
            layer.observe = Accumulate(self, l)


class Accumulate:
    """Layer l's observer while the running batch decodes: a step's squared attention added to its scores in
    `running`, from the softmax weights the decode kernel hands out, or recomputed over the gathered keys; or added
    by the one-call decode block itself, into the tensor `squares_into` gives it (cache/kernels/cpu_block.py)."""

    def __init__(self, running: RunningScores, l: int):
        self.running, self.l = running, l

    def __call__(self, q: torch.Tensor | None, store: Store, weights: torch.Tensor | None) -> None:
        if weights is None:
            lengths = store.lengths.to(q.device, torch.long)  # (B, H_kv)
            keys = store.pool.read(store.tables.to(q.device), lengths, q.dtype, values=False)[0]
            visible = torch.arange(keys.shape[2], device=q.device) < lengths.unsqueeze(-1)  # (B, H_kv, L)
            weights = attention_weights(q, keys, visible=visible.unsqueeze(2))  # (B, H, 1, L)
        step = squared(weights, store.lengths.shape[1])  # (B, H_kv, L)
        self.squares_into(step.shape[2])[:, :, : step.shape[2]] += step.to(self.running.layers[self.l].device)

    def squares_into(self, L: int) -> torch.Tensor:
        """The layer's scores with room for L slots, (B, H_kv, capacity >= L), zero past each head's length."""
        return self.running.room(self.l, L)


def unwatch(cache: ModelCache) -> None:
    for layer in cache.layers:
        layer.observe = None


def budget_blocks(cache: ModelCache, max_cache_tokens: int) -> int:
    """The blocks a sequence may hold once compressed: ceil(max_cache_tokens / block_tokens) per (layer, KV
    head)."""
    bt = cache.layers[0].store.pool.block_tokens
    return len(cache.layers) * cache.n_kv_head * -(-max_cache_tokens // bt)


def compress(cache: ModelCache, scores: list[torch.Tensor], max_cache_tokens: list[int], protected: list[int],
             rows: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """Evict the lowest-scoring groups of keys of each row rows[i] until it holds at most its budget of blocks
    (max_cache_tokens[i], its protected window protected[i]); scores[l] (len(rows), H_kv, L) scores the rows'
    slots in layer l. Returns the blocks each row freed and each layer's scores of the kept keys in their new
    slots, (len(rows), H_kv, the most any head kept), zero past a head's length. In numpy: a step's few rows are
    small arrays, on which each numpy operation costs a few microseconds and each torch one several times that."""
    bt, n_layer, H_kv = cache.layers[0].store.pool.block_tokens, len(cache.layers), cache.n_kv_head
    LH, index, b = n_layer * H_kv, np.asarray(rows), len(rows)  # LH: every (layer, KV head) of a row
    over = np.asarray(cache.row_blocks()[0])[index] - [budget_blocks(cache, m) for m in max_cache_tokens]  # (b,)
    S = layer_major([s.cpu().numpy() for s in scores])  # (b, LH, L)
    lengths = np.stack([layer.store.lengths.numpy()[index] for layer in cache.layers], axis=1).reshape(b, LH)
    evictable = np.maximum(lengths - np.asarray(protected)[:, None], 0)  # (b, LH)
    groups, G = evictable // bt, int(evictable.max()) // bt  # groups per head, the most of any
    slot = np.arange(S.shape[2])
    candidates = np.where(slot < evictable[..., None], S, np.inf)  # (b, LH, L): the window and past a head: inf
    least = np.sort(candidates, axis=-1)  # (b, LH, L): each head's evictable scores, least first
    sums = least[..., : G * bt].reshape(b, LH, G, bt).sum(axis=-1)  # (b, LH, G): least first
    sums = np.where(np.arange(G) < groups[..., None], sums, np.inf).reshape(b, LH * G)  # none past a head's groups
    n_evict = np.minimum(np.maximum(over, 0), np.isfinite(sums).sum(axis=1))  # (b,)
    rank = sums.argsort(axis=-1, kind="stable").argsort(axis=-1)  # (b, LH * G): each group's place across the row
    evicted = (rank < n_evict[:, None]).reshape(b, LH, G).sum(axis=-1) * bt  # (b, LH): each head's lowest keys go
    keep = (slot < lengths[..., None]) & ~lowest(candidates, least, evicted)  # (b, LH, L)
    go = n_evict > 0  # the rows with something to evict; the others stay as they are
    if go.any():
        compact(cache, keep[go], index[go])
    n = keep.sum(axis=-1)  # (b, LH)
    kept = np.zeros((b, LH, int(n.max())), dtype=np.float32)
    kept[np.arange(kept.shape[2]) < n[..., None]] = S[keep]  # each head's kept scores, in order
    n, kept = n.reshape(b, n_layer, H_kv), torch.from_numpy(kept).view(b, n_layer, H_kv, -1)
    return n_evict.tolist(), [kept[:, l, :, : int(n[:, l].max())] for l in range(n_layer)]


def layer_major(per_layer: list[np.ndarray]) -> np.ndarray:
    """Every layer's (b, H_kv, width) array side by side: (b, n_layer * H_kv, the widest), layer-major heads, each
    zero past its own width."""
    b, H_kv = per_layer[0].shape[:2]
    out = np.zeros((b, len(per_layer) * H_kv, max(a.shape[2] for a in per_layer)), dtype=per_layer[0].dtype)
    for l, a in enumerate(per_layer):
        out[:, l * H_kv : (l + 1) * H_kv, : a.shape[2]] = a
    return out


def lowest(x: np.ndarray, ordered: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The k (...,) least entries of each row of x (..., L), given `ordered`, x sorted along its rows: a mask
    (..., L), ties going to the earlier slot, as a stable sort orders them: every entry below the k-th least, and
    the first of those equal to it that make up k (none where k = 0). Sorting the values alone is several times
    faster than a stable argsort."""
    kth = np.take_along_axis(ordered, np.maximum(k - 1, 0)[..., None], axis=-1)  # (..., 1): the k-th least
    below, tied = x < kth, x == kth  # (..., L) each
    return below | (tied & (np.cumsum(tied, axis=-1) <= (k - below.sum(axis=-1))[..., None]))


def compact(cache: ModelCache, keep: np.ndarray, rows: np.ndarray) -> None:
    """Compact the rows `rows` (indices) of every layer at once to the slots `keep` (len(rows), n_layer * H_kv,
    L) marks, layer-major heads: what PagedStore.keep does for a whole layer, for a few rows of all of them. Each
    head's kept tokens move to its first slots in order, in one move of the pool the layers share, and the blocks
    past them go back."""
    stores = [layer.store for layer in cache.layers]
    pool, tables = stores[0].pool, layer_major([store.tables.numpy()[rows] for store in stores])  # (b, LH, width)
    src, dst, _ = compaction(tables, keep, pool.block_tokens)  # (n,) each
    moved = src != dst  # tokens that stay put are not copied
    pool.move(*(torch.from_numpy(a[moved]).to(pool.device) for a in (src, dst)))
    n_keep = keep.sum(axis=-1).reshape(len(rows), len(stores), -1)  # (b, n_layer, H_kv)
    for l, store in enumerate(stores):
        store.truncate(n_keep[:, l], rows)
