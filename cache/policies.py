"""Eviction policies: what a layer cache keeps. Each is a few lines of `score`; cache.base.Policy does the rest.

    full        keep everything
    window      the most recent tokens                                  (sliding-window attention)
    sink        the first `sink` tokens + the most recent, re-rotated    (StreamingLLM, Xiao et al. 2023)
                to their slot in the cache, so generation can run far past the training context
    h2o         heavy hitters: the most attention received, + recent    (H2O, Zhang et al. 2023)
    snapkv      attention from the last `window` queries to the keys     (SnapKV, Li et al. 2024)
                before them, pooled (max or avg)
    l2norm      the keys of lowest L2 norm, + recent                     (Devoto et al. 2024)
    kvcompress  SnapKV's statistic ranked jointly over all KV heads of   (KV-Compress, Rehg 2024)
                a layer: one budget per layer, so heads keep different numbers of tokens (ragged storage)

Scores are per KV head: attention-based policies sum (or average) over the G query heads that share a KV head.
Shapes: B batch, H query heads, H_kv KV heads, G = H // H_kv, T new tokens, n stored tokens, D head_dim.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cache.base import Policy, State, Step
from toymodel.rope import apply_rope, rope_cos_sin


@dataclass
class Full(Policy):
    """Keep every token: the reference every other policy is compared against."""

    budget: int = 0

    reads = "nothing"  # so attention may read the stored codes as they are (cache/kernels/choose.py)

    def select(self, step: Step) -> None:
        return None


@dataclass
class Window(Policy):
    """Keep the `budget` most recent tokens: the score is the token's slot, newer is higher."""

    def score(self, step: Step) -> torch.Tensor:
        B, H_kv, n = step.shape
        return torch.arange(n, device=step.device).expand(B, H_kv, n)  # (B, H_kv, n)

    def select(self, step: Step) -> torch.Tensor | None:
        """What Policy.select picks by these scores, without sorting them: the first `sink` slots and the most
        recent `budget - sink`, the same for every head (rows of different lengths, or protected tokens past the
        budget: Policy.select)."""
        B, H_kv, n = step.shape
        if n <= self.budget or step.padding is not None or self.sink + self.window > self.budget:
            return super().select(step)
        slots = torch.cat([torch.arange(self.sink), torch.arange(n - self.budget + self.sink, n)])  # (budget,)
        return slots.to(step.device).expand(B, H_kv, self.budget)


@dataclass
class Sink(Window):
    """StreamingLLM: the first `sink` tokens (attention sinks) plus the most recent, with positions by *slot*.

    Explicit choice: the cache reports the new tokens' RoPE positions as their slots (tokens its row stores, not
    tokens seen), and a kept key is re-rotated to its current slot. RoPE rotations compose, R(s - p) R(p) = R(s), so a
    key that arrived rotated at slot p is rotated by s - p (every head of a row keeps the same slots: recency and
    sinks; rows of a ragged batch differ). Where a decode kernel reads keys where they lie (the block pool, exact
    codecs), every key is stored rotated at its slot: a compaction turns each key it moves by the slots it moved
    (PagedStore.keep), and nothing else is kept. Otherwise (int codes: a quantized key is never
    decoded, rotated and re-encoded) keys stay as they arrived, the state `rotated_at` (B, H_kv, n) remembers each
    one's p, and they are rotated at every read. Until something is evicted, s == p and the rotation by 0 is exact:
    with a large budget this is the full cache, bit for bit.
    """

    rope_theta: float = 10000.0

    rotates_by_slot = True
    keeps_state = True

    def positions(self, seen: torch.Tensor, stored: torch.Tensor, T: int) -> torch.Tensor:
        return stored.unsqueeze(1) + torch.arange(T, device=seen.device)  # (B, T): queries and keys agree on distances

    def new_state(self, start: torch.Tensor, k: torch.Tensor) -> State:
        slots = start.to(k.device).unsqueeze(-1) + torch.arange(k.shape[2], device=k.device)  # (B, H_kv, T)
        return {"rotated_at": slots.to(torch.int32)}  # the slots positions() gave the new tokens

    def read_keys(self, keys: torch.Tensor, state: State) -> torch.Tensor:
        return self.turn(keys, torch.arange(keys.shape[2], device=keys.device) - state["rotated_at"])  # by slot - p

    def turn(self, keys: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
        """keys (..., D) rotated by `by` (...) more positions (RoPE's rotations compose)."""
        cos, sin = rope_cos_sin(by, keys.shape[-1], self.rope_theta)  # (..., D/2) each
        return apply_rope(keys, cos, sin)  # (..., D)


@dataclass
class H2O(Policy):
    """Heavy hitters: keep the tokens that have received the most attention so far, plus the recent `window`.

    The state `mass` (B, H_kv, n) accumulates, for each stored token, the attention weights of every query since
    it arrived, summed over the query heads of its group. Decided after each step, prefill included. It needs only
    each key's weights summed over the queries, which a fused kernel gives without the weights matrix. A new
    token's total starts at zero: the state, laid out like the view (zero past each head's length), grows by zeros
    at its end to the step's width, which puts them where every head's new tokens lie.
    """

    reads = "mass"
    sums_attention = True

    def observe(self, step: Step) -> None:
        B, H, n = step.seen.shape  # (B, H, n) float32
        seen = step.seen.view(B, step.shape[1], -1, n).sum(dim=2)  # (B, H_kv, n): the group's query heads
        mass = step.state.get("mass")
        step.state["mass"] = seen if mass is None else F.pad(mass, (0, n - mass.shape[-1])) + seen

    def score(self, step: Step) -> torch.Tensor:
        return step.state["mass"]


@dataclass
class SnapKV(Policy):
    """Keep the tokens the last `window` queries (the observation window) attend to most, plus that window.

    Per KV head: attention of the observation queries to the keys *before* the window, summed over the queries,
    pooled along the keys with a `kernel`-wide window so neighbours of a hit survive with it (a clue rarely sits in
    one token), and averaged over the group's query heads. The window itself is kept anyway, so its attention to
    itself is not scored: pooled, it would leak into the tokens just before the window and keep them alive (as in
    the SnapKV reference code and kvpress). `pooling` is "max" (our default) or "avg" (the SnapKV paper's). At
    prefill the window is the last `window` prompt tokens, as in the paper. Our choice after prefill: the cache
    stays at the budget by the same rule, each decoding step's single new query being the observation window
    (memoryless, unlike H2O).
    """

    kernel: int = 5
    pooling: str = "max"

    reads = "weights"

    def observed_queries(self, T: int) -> int:
        return min(T, self.window or T)  # the observation window (none: every query)

    def score(self, step: Step) -> torch.Tensor:
        B, H, T, n = step.seen.shape
        H_kv = step.shape[1]
        seen = step.seen[:, :, -self.window :].float().sum(dim=2)  # (B, H, n): attention of the observation queries
        own = self.recent(step).unsqueeze(2)  # (B, H_kv, 1, n): the window's own keys, kept anyway
        seen = seen.view(B, H_kv, H // H_kv, n).masked_fill(own, 0.0)  # as if cut off: weights are never negative
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        pooled = pool(seen.view(B * H, 1, n), self.kernel, stride=1, padding=self.kernel // 2)  # (B * H, 1, n)
        return pooled.view(B, H_kv, H // H_kv, n).mean(dim=2)  # (B, H_kv, n): averaged over the group's heads

    def recent(self, step: Step) -> torch.Tensor:
        """(B, H_kv, n) True at each head's last `window` real tokens (a ragged view has padding before them)."""
        B, H_kv, n = step.shape
        if step.padding is None:
            return (torch.arange(n, device=step.device) >= n - self.window).expand(B, H_kv, n)
        valid = ~step.padding
        return valid & (valid.flip(-1).cumsum(dim=-1).flip(-1) <= self.window)  # counted from each head's end


@dataclass
class L2Norm(Policy):
    """Keep the keys of lowest L2 norm, plus the recent `window`: low-norm keys draw high attention (Devoto et al.).
    RoPE rotates pairs of channels, so the norm of a rotated key is that of the original, up to rounding: norms are
    compared in float16, so that a token repeated at several positions ties exactly (the older kept) whatever
    rounding a batch's shapes bring, and a row decides in a batch as it would alone."""

    def score(self, step: Step) -> torch.Tensor:
        return -step.keys.float().norm(dim=-1).half().float()  # (B, H_kv, n)


@dataclass
class KVCompress(SnapKV):
    """KV-Compress: SnapKV's statistic, but one budget per layer, `budget * H_kv` tokens, shared by its KV heads.

    Each head's scores are normalized to sum to one, then every (head, token) pair of the layer is ranked jointly:
    a head whose attention is concentrated on a few tokens gives up its tail, a head whose attention is spread
    keeps more. Lengths then differ per head (the block pool gives each head its own table and length), and
    `select` returns a boolean mask over the padded view; the first `sink` and last `window` tokens of every head
    are kept.
    """

    ragged = True

    def select(self, step: Step) -> torch.Tensor:
        B, H_kv, n = step.shape
        padding = step.padding  # None: every head holds n tokens
        if padding is None:
            padding = torch.zeros(B, H_kv, n, dtype=torch.bool, device=step.device)
        valid = ~padding  # (B, H_kv, n)
        total = self.budget * H_kv
        if bool((valid.sum(dim=(1, 2)) <= total).all()):
            return valid  # nothing to evict; the store still repacks what it holds
        scores = self.score(step)  # (B, H_kv, n); zero at padding (the store zeroed those weights)
        scores = scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)  # heads compare
        protected = self.protected(valid)  # each head's first `sink` and last `window` tokens
        scores = scores.masked_fill(protected, torch.inf).masked_fill(padding, -torch.inf)
        # Jointly over heads and tokens; a stable sort breaks ties (max pooling makes many) by head, then by token
        # order, so a view with padding mid-head (memhier's) and one with padding at the end (the block
        # pool) keep the same tokens.
        top = scores.view(B, H_kv * n).sort(dim=-1, descending=True, stable=True).indices[:, :total]  # (B, total)
        keep = torch.zeros(B, H_kv * n, dtype=torch.bool, device=padding.device).scatter_(1, top, True)
        return keep.view(B, H_kv, n) & valid  # (B, H_kv, n): a shorter row's top holds padding too


POLICIES: dict[str, type[Policy]] = {
    "full": Full,
    "window": Window,
    "sink": Sink,
    "h2o": H2O,
    "snapkv": SnapKV,
    "l2norm": L2Norm,
    "kvcompress": KVCompress,
}
