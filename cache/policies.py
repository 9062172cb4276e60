"""Eviction policies: what a layer cache keeps. Each is a few lines of `score`; cache.base.Policy does the rest.

    full        keep everything
    window      the most recent tokens                                  (sliding-window attention)
    sink        the first `sink` tokens + the most recent, re-rotated    (StreamingLLM, Xiao et al. 2023)
                to their slot in the cache, so generation can run far past the training context
    h2o         heavy hitters: the most attention received, + recent    (H2O, Zhang et al. 2023)
    snapkv      attention from the last `window` queries, max-pooled    (SnapKV, Li et al. 2024)
    l2norm      the keys of lowest L2 norm, + recent                     (Devoto et al. 2024)
    kvcompress  SnapKV's statistic ranked jointly over all KV heads of   (KV-Compress, Rehg 2024)
                a layer: one budget per layer, so heads keep different numbers of tokens (ragged storage)

Scores are per KV head: attention-based policies sum (or average) over the G query heads that share a KV head.
Shapes: B batch, H query heads, H_kv KV heads, G = H // H_kv, T new tokens, n stored tokens, D head_dim.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cache.base import Policy
from toymodel.rope import apply_rope, rope_cos_sin


@dataclass
class Full(Policy):
    """Keep every token: the reference every other policy is compared against."""

    budget: int = 0

    reads_keys = False

    def select(self, keys: torch.Tensor, padding: torch.Tensor | None) -> None:
        return None


@dataclass
class Window(Policy):
    """Keep the `budget` most recent tokens: the score is the token's slot, newer is higher."""

    def score(self, keys: torch.Tensor) -> torch.Tensor:
        B, H_kv, n, _ = keys.shape
        return torch.arange(n, device=keys.device).expand(B, H_kv, n)  # (B, H_kv, n)


@dataclass
class Sink(Window):
    """StreamingLLM: the first `sink` tokens (attention sinks) plus the most recent, with positions by *slot*.

    Explicit choice: the cache reports the new tokens' RoPE positions as their slots (tokens stored, not seen),
    and a kept key is re-rotated to its current slot at read time. RoPE rotations compose, R(s - p) R(p) = R(s),
    so a key that arrived rotated at slot p is rotated by s - p. Keys are stored as they arrived (a quantized key
    is never decoded, rotated and re-encoded), and `rotated_at` (n,) remembers each one's p. Until something is
    evicted, s == p and the rotation by 0 is exact: with a large budget this is the full cache, bit for bit.
    """

    rope_theta: float = 10000.0
    rotated_at: torch.Tensor | None = field(default=None, init=False, repr=False)  # (n,) int64, the same in every head

    def positions(self, seen: int, stored: int, T: int, device: torch.device) -> torch.Tensor:
        return torch.arange(stored, stored + T, device=device)  # slots, so queries and keys agree on distances

    def append(self, keys: torch.Tensor, n_new: int) -> None:
        n = keys.shape[2]
        new = torch.arange(n - n_new, n, device=keys.device)  # (n_new,): the slots positions() gave them
        self.rotated_at = new if self.rotated_at is None else torch.cat([self.rotated_at, new])

    def read_keys(self, keys: torch.Tensor) -> torch.Tensor:
        delta = torch.arange(keys.shape[2], device=keys.device) - self.rotated_at  # (n,): slot - rotated at
        cos, sin = rope_cos_sin(delta, keys.shape[-1], self.rope_theta)  # (n, D) each
        return apply_rope(keys, cos, sin)  # (B, H_kv, n, D)

    def keep(self, idx: torch.Tensor) -> None:
        self.rotated_at = self.rotated_at[idx[0, 0]]  # recency and sinks pick the same slots in every head

    def state(self) -> list[torch.Tensor]:
        return [self.rotated_at]


@dataclass
class H2O(Policy):
    """Heavy hitters: keep the tokens that have received the most attention so far, plus the recent `window`.

    `mass` (B, H_kv, n) accumulates, for each stored token, the attention weights of every query since it arrived,
    summed over the query heads of its group. Decided after each step, prefill included. It needs only each key's
    weights summed over the queries (observe_mass), which a fused kernel gives without the weights matrix.
    """

    mass: torch.Tensor | None = field(default=None, init=False, repr=False)

    reads_mass = True

    def append(self, keys: torch.Tensor, n_new: int) -> None:
        B, H_kv = keys.shape[:2]
        zeros = keys.new_zeros((B, H_kv, n_new), dtype=torch.float32)  # (B, H_kv, n_new)
        self.mass = zeros if self.mass is None else torch.cat([self.mass, zeros], dim=-1)

    def observe_mass(self, mass: torch.Tensor) -> None:
        B, H_kv, n = self.mass.shape
        self.mass += mass.view(B, H_kv, -1, n).sum(dim=2)  # (B, H, n) -> (B, H_kv, n): the group's query heads

    def score(self, keys: torch.Tensor) -> torch.Tensor:
        return self.mass

    def keep(self, idx: torch.Tensor) -> None:
        self.mass = self.mass.gather(-1, idx)  # (B, H_kv, budget)

    def state(self) -> list[torch.Tensor]:
        return [self.mass]


@dataclass
class SnapKV(Policy):
    """Keep the tokens the last `window` queries (the observation window) attend to most, plus that window.

    Per KV head: attention of the observation queries, summed over them and averaged over the group's query heads,
    then max-pooled along the keys with a `kernel`-wide window so neighbours of a hit survive with it (a clue
    rarely sits in one token). At prefill the window is the last `window` prompt tokens, as in the paper.
    Our choice after prefill: the cache stays at the budget by the same rule, each decoding step's single new query
    being the observation window (memoryless: nothing is accumulated across steps, unlike H2O).
    """

    kernel: int = 5
    obs: torch.Tensor | None = field(default=None, init=False, repr=False)  # (B, H, n): this step's, pooled

    needs_attention = True

    def observe(self, weights: torch.Tensor) -> None:
        B, H, T, n = weights.shape
        seen = weights[:, :, -self.window :].float().sum(dim=2)  # (B, H, n): attention of the observation queries
        pooled = F.max_pool1d(seen.view(B * H, 1, n), self.kernel, stride=1, padding=self.kernel // 2)
        self.obs = pooled.view(B, H, n)  # (B, H, n)

    def select(self, keys: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor | None:
        keep = super().select(keys, padding)
        self.obs = None  # used once: the next step brings its own observation window
        return keep

    def score(self, keys: torch.Tensor) -> torch.Tensor:
        B, H_kv, n, _ = keys.shape
        return self.obs.view(B, H_kv, -1, n).mean(dim=2)  # (B, H_kv, n): averaged over the group's query heads


@dataclass
class L2Norm(Policy):
    """Keep the keys of lowest L2 norm, plus the recent `window`: low-norm keys draw high attention (Devoto et al.).
    RoPE rotates pairs of channels, so the norm of a rotated key is that of the original."""

    def score(self, keys: torch.Tensor) -> torch.Tensor:
        return -keys.float().norm(dim=-1)  # (B, H_kv, n)


@dataclass
class KVCompress(SnapKV):
    """KV-Compress: SnapKV's statistic, but one budget per layer, `budget * H_kv` tokens, shared by its KV heads.

    Each head's scores are normalized to sum to one, then every (head, token) pair of the layer is ranked jointly:
    a head whose attention is concentrated on a few tokens gives up its tail, a head whose attention is spread
    keeps more. Lengths then differ per head, so the store is ragged (RaggedStore) and `select` returns a boolean
    mask over its padded view; the first `sink` and last `window` tokens of every head are kept.
    """

    ragged = True

    def select(self, keys: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        valid = ~padding  # (B, H_kv, n)
        B, H_kv, n = valid.shape
        total = self.budget * H_kv
        scores = self.score(keys)  # (B, H_kv, n); zero at padding (the store zeroed those weights)
        self.obs = None  # used once: the next step brings its own observation window
        if int(valid[0].sum()) <= total:  # every batch row holds the same number of tokens
            return valid  # nothing to evict; the store still repacks what it holds
        scores = scores / scores.sum(dim=-1, keepdim=True)  # each head's scores sum to one: heads compare
        first = valid.cumsum(dim=-1)  # (B, H_kv, n): 1 for a head's oldest token, 2 for the next, ...
        last = valid.flip(-1).cumsum(dim=-1).flip(-1)  # (B, H_kv, n): 1 for its newest token
        protected = valid & ((first <= self.sink) | (last <= self.window))
        scores = scores.masked_fill(protected, torch.inf).masked_fill(padding, -torch.inf)
        top = scores.view(B, H_kv * n).topk(total, dim=-1).indices  # (B, total): jointly over heads and tokens
        keep = torch.zeros(B, H_kv * n, dtype=torch.bool, device=keys.device).scatter_(1, top, True)
        return keep.view(B, H_kv, n)  # (B, H_kv, n)


POLICIES: dict[str, type[Policy]] = {
    "full": Full,
    "window": Window,
    "sink": Sink,
    "h2o": H2O,
    "snapkv": SnapKV,
    "l2norm": L2Norm,
    "kvcompress": KVCompress,
}
