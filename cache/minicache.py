"""MiniCache (Liu et al. 2024): two adjacent layers' caches share one direction per token and KV head.

Deep layers' keys (and values) point in nearly the same directions from one layer to the next. From the start
layer S on (S = n_layer // 2 by default), each pair of layers (l - 1, l), l = S, S + 2, ... < n_layer, stores for
every token and KV head the two layers' norms and ONE direction, merged by SLERP with interpolation t:

    u_a = x_a / |x_a|,  u_b = x_b / |x_b|,  W = arccos(u_a . u_b)           (a = layer l - 1, b = layer l)
    e   = sin((1 - t) W) / sin W * u_a + sin(t W) / sin W * u_b               (t = 0: u_a, t = 1: u_b)
    x_a ~ |x_a| e,   x_b ~ |x_b| e

A token whose two directions are far apart is *retained* instead: with the normalized angle d = W / pi, every token
with d > d_min + (d_max - d_min) * gamma keeps both layers' vectors exactly, with its (row, slot); d_min and d_max
run over every token the pair has merged so far, per sequence and KV head. K and V are merged and retained apart.

Streaming: in every forward layer l - 1 attends before layer l. Its new tokens wait, exact, in the pair (`pending`)
until layer l brings the same tokens; then they are merged. So layer l - 1's newest tokens are exact until their
pair completes, and layer l's are merged at once.

Storage, per pair (the merged directions go through the cache's codec, in the store `build_cache` gives the pair:
a BufferStore for fp, a CodecStore for int4, so `minicache_int4` is the paper's 4-bit configuration):

    directions   the codec's bytes for n tokens, K and V                          one set for both layers
    norms        (B, H_kv, n, 2) in the model's dtype, K and V                    both layers' norms
    retained     (N, 2, D) in the model's dtype and (N, 2) int32 (row, slot)      K and V apart
    angle range  d_min, d_max: (B, H_kv) float32, K and V
    pending      layer l - 1's newest tokens, from its attend to layer l's        none once a forward has ended

The pair's tensors are counted once, by the store of its first layer (MergedLayerStore.tensors).
"""

import torch

from cache.base import State, Store


def unit_and_norm(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) -> its direction (..., D) float32 (0 for a zero vector) and its norm (..., 1) float32."""
    norm = x.float().norm(dim=-1, keepdim=True)
    return x.float() / norm.clamp_min(torch.finfo(torch.float32).tiny), norm


def normalized_angle(ua: torch.Tensor, ub: torch.Tensor) -> torch.Tensor:
    """Unit vectors (..., D) -> the angle between them over pi, (...,) in [0, 1]."""
    return torch.arccos((ua * ub).sum(dim=-1).clamp(-1.0, 1.0)) / torch.pi


def slerp(ua: torch.Tensor, ub: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of unit vectors (..., D) by t in [0, 1]: along the great circle from ua (t = 0) to
    ub (t = 1). Where the two are (anti)parallel, sin W ~ 0: the normalized linear interpolation instead."""
    W = torch.arccos((ua * ub).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0))  # (..., 1)
    sin = torch.sin(W)
    near = sin < 1e-6
    safe = torch.where(near, torch.ones_like(sin), sin)
    wa = torch.where(near, torch.full_like(sin, 1 - t), torch.sin((1 - t) * W) / safe)
    wb = torch.where(near, torch.full_like(sin, t), torch.sin(t * W) / safe)
    e = wa * ua + wb * ub
    lerp_norm = e.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(near, e / lerp_norm, e)


class MergedTensor:
    """K or V of a layer pair: both layers' norms, the retained tokens and the running angle range (the merged
    directions themselves live in the pair's store)."""

    def __init__(self, t: float, gamma: float):
        self.t, self.gamma = t, gamma
        self.norms: torch.Tensor | None = None  # (B, H_kv, n, 2): layer l - 1's norm, layer l's
        self.kept: torch.Tensor | None = None  # (N, 2, D): both layers' vectors of the retained tokens, exact
        self.kept_at: torch.Tensor | None = None  # (N, 2) int32: (b * H_kv + h, slot) of each retained token
        self.d_min: torch.Tensor | None = None  # (B, H_kv) float32, over every token merged so far
        self.d_max: torch.Tensor | None = None

    def merge(self, xa: torch.Tensor, xb: torch.Tensor, start: int) -> torch.Tensor:
        """Both layers' tokens xa, xb (B, H_kv, T, D), stored at slots start .. start + T - 1 -> their merged
        directions (B, H_kv, T, D) in xa's dtype; norms and retained tokens are kept here."""
        B, H_kv, T, D = xa.shape
        (ua, na), (ub, nb) = unit_and_norm(xa), unit_and_norm(xb)
        d = normalized_angle(ua, ub)  # (B, H_kv, T)
        lo, hi = d.amin(dim=-1), d.amax(dim=-1)  # (B, H_kv)
        self.d_min = lo if self.d_min is None else torch.minimum(self.d_min, lo)
        self.d_max = hi if self.d_max is None else torch.maximum(self.d_max, hi)
        threshold = torch.lerp(self.d_min, self.d_max, self.gamma)  # d_min + (d_max - d_min) gamma, exact at 0 and 1
        keep = d > threshold.unsqueeze(-1)  # (B, H_kv, T)
        where = keep.nonzero()  # (N, 3): b, h, t of each retained token
        at = torch.stack([where[:, 0] * H_kv + where[:, 1], start + where[:, 2]], dim=-1).to(torch.int32)  # (N, 2)
        kept = torch.stack([xa[keep], xb[keep]], dim=1)  # (N, 2, D), as they came
        norms = torch.cat([na, nb], dim=-1).to(xa.dtype)  # (B, H_kv, T, 2)
        self.norms = norms if self.norms is None else torch.cat([self.norms, norms], dim=2)
        self.kept = kept if self.kept is None else torch.cat([self.kept, kept])
        self.kept_at = at if self.kept_at is None else torch.cat([self.kept_at, at])
        return slerp(ua, ub, self.t).to(xa.dtype)

    def restore(self, e: torch.Tensor, side: int, out: torch.Tensor) -> None:
        """Write layer `side`'s tokens (0: l - 1, 1: l) into out (B, H_kv, n, D): its norm times the merged
        direction e (B, H_kv, n, D), then its retained tokens, exactly."""
        out.copy_(e * self.norms[..., side : side + 1])  # (B, H_kv, n, D)
        if self.kept.shape[0]:
            rows = out.view(-1, *out.shape[2:])  # (B * H_kv, n, D), a view of the contiguous out
            rows[self.kept_at[:, 0].long(), self.kept_at[:, 1].long()] = self.kept[:, side]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.norms, self.kept, self.kept_at, self.d_min, self.d_max) if t is not None]


class PairStore:
    """What two adjacent layers share: merged directions in `directions` (a Store of the cache's codec), K's and
    V's norms and retained tokens, and layer l - 1's newest tokens until layer l completes the pair."""

    def __init__(self, directions: Store, t: float, gamma: float):
        self.directions = directions
        self.keys, self.values = MergedTensor(t, gamma), MergedTensor(t, gamma)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # layer l - 1's k, v (B, H_kv, T, D)

    def __len__(self) -> int:
        """Tokens merged (both layers hold them)."""
        return len(self.directions)

    def hold(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer l - 1's step: keep its k, v (B, H_kv, T, D) exact until layer l's, and return its view: the merged
        tokens restored, then these T, (B, H_kv, n + T, D) each."""
        if self.pending is not None:
            raise ValueError("layer l - 1 of a MiniCache pair attended twice before layer l; run the layers in order")
        self.pending = (k, v)
        if len(self) == 0:
            return k, v
        return self._restore(0, *self.directions.read(), k, v)

    def read(self, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `side`'s K, V (B, H_kv, n, D) of the merged tokens (0: layer l - 1, 1: layer l), nothing added."""
        return self._restore(side, *self.directions.read())

    def complete(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer l's step: merge its k, v (B, H_kv, T, D) with layer l - 1's waiting tokens and return layer l's
        view of every token, (B, H_kv, n, D) each."""
        if self.pending is None or self.pending[0].shape != k.shape:
            raise ValueError(f"layer l of a MiniCache pair got {tuple(k.shape)} tokens, but layer l - 1 holds "
                             f"{None if self.pending is None else tuple(self.pending[0].shape)}; run both layers on "
                             f"the same tokens, l - 1 first")
        (ka, va), start = self.pending, len(self)
        self.pending = None
        e_k, e_v = self.keys.merge(ka, k, start), self.values.merge(va, v, start)  # (B, H_kv, T, D) each
        return self._restore(1, *self.directions.append(e_k, e_v))

    def _restore(self, side: int, e_k: torch.Tensor, e_v: torch.Tensor, k: torch.Tensor | None = None,
                 v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `side`'s K, V from the merged directions e_k, e_v (B, H_kv, n, D), followed by k, v if given."""
        out = []
        for half, e, new in ((self.keys, e_k, k), (self.values, e_v, v)):
            B, H_kv, n, D = e.shape
            T = 0 if new is None else new.shape[2]
            x = e.new_empty((B, H_kv, n + T, D))  # (B, H_kv, n + T, D)
            half.restore(e, side, x[:, :, :n] if T else x)
            if T:
                x[:, :, n:] = new  # layer l - 1's newest tokens, exact until layer l merges them
            out.append(x)
        return out[0], out[1]

    def tensors(self) -> list[torch.Tensor]:
        held = self.directions.tensors() + self.keys.tensors() + self.values.tensors()
        return held + ([] if self.pending is None else list(self.pending))


class MergedLayerStore:
    """One layer's view of a PairStore: `side` 0 is layer l - 1, 1 is layer l. Keeps every token (policy full)."""

    hands_codes = False  # the merged tokens are decoded, scaled by their norms, then attended
    ragged_rows = False  # one length for every row of the batch
    paged = False

    def __init__(self, pair: PairStore, side: int):
        self.pair, self.side = pair, side

    def __len__(self) -> int:
        waiting = self.pair.pending is not None and self.side == 0
        return len(self.pair) + (self.pair.pending[0].shape[2] if waiting else 0)

    def append(
        self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, H_kv, T, D) -> K, V: (B, H_kv, n, D), this layer's tokens restored, these T last."""
        return self.pair.hold(k, v) if self.side == 0 else self.pair.complete(k, v)

    def keep(self, sel: torch.Tensor, state: State) -> State:
        raise ValueError("MiniCache keeps every token of both layers of a pair; it cannot evict (policy=full)")

    def tokens_stored(self) -> int:
        """Tokens summed over batch and KV heads."""
        some = self.pair.keys.norms if self.pair.pending is None else self.pair.pending[0]  # (B, H_kv, ...)
        return 0 if some is None else some.shape[0] * some.shape[1] * len(self)

    def padding(self) -> None:
        return None

    def tensors(self) -> list[torch.Tensor]:
        """The pair's tensors, once: the first layer's store counts them, the second's nothing."""
        return self.pair.tensors() if self.side == 0 else []
