"""The KV cache the model talks to: a ModelCache of LayerCaches, each a policy (what to keep) times a store (how).

    Transformer.forward(idx, cache)
        cache.positions(T)            RoPE positions of the T new tokens: tokens *seen*, pos .. pos+T-1
        cache.layers[i].update(k, v, q)  store.append -> (K, V) to attend over; then policy.select -> store.keep
        cache.layers[i].update_encoded(k, v)  instead, when keeps_codes and a kernel reads codes: the stored bytes
        cache.layers[i].observe_mass(m)  only if reads_mass: each key's attention summed over the queries (H2O)
        cache.layers[i].observe(w)    only if needs_attention: the policy reads the attention weights first
        cache.advance(T)              pos += T

Eviction, kvpress style: a policy is a small class whose `score(keys)` says, per KV head, how much each stored
token is worth (B, H_kv, n); `Policy.select` protects the first `sink` and last `window` tokens, keeps the top
`budget` by score and hands the sorted indices to the store, which gathers them into smaller tensors. Scores are
per KV head (policies sum the scores of the query heads sharing it), so GQA's saving survives eviction.

Memory: `memory_bytes()` counts every tensor a cache holds (codes, scales, zeros, residual, lengths, a policy's
per-token statistics), split by tier; a hierarchical store will add "host" and "disk" next to "device".
Use caches under torch.inference_mode() / torch.no_grad(): they hold plain tensors, not autograd history.
"""

from dataclasses import dataclass

import torch

from cache.storage import BufferStore, CodecStore, RaggedStore

Store = BufferStore | CodecStore | RaggedStore


@dataclass
class Policy:
    """Which tokens a layer keeps: at most `budget` per KV head, always the first `sink` and the last `window`.

    Subclasses define `score`; the hooks below default to "nothing to do" and are overridden by the few policies
    that need them (attention statistics, per-token state, StreamingLLM's positions). A ragged policy overrides
    `select` to return a (B, H_kv, n) boolean mask instead, and is paired with a RaggedStore.
    """

    budget: int
    sink: int = 0
    window: int = 0

    needs_attention = False  # True: update() is followed by observe(weights) and eviction waits for it
    reads_mass = False  # True: update() is followed by observe_mass(mass): the weights summed over the queries
    reads_keys = True  # False (Full): never looks at stored keys, so attention may read them still encoded
    ragged = False  # True: per-head budgets, stored in a RaggedStore; select returns a boolean mask

    def score(self, keys: torch.Tensor) -> torch.Tensor:
        """keys: (B, H_kv, n, D) stored keys (RoPE-rotated) -> (B, H_kv, n), higher is kept first."""
        raise NotImplementedError

    def select(self, keys: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor | None:
        """The tokens to keep, (B, H_kv, budget) sorted indices, or None when nothing needs evicting."""
        n = keys.shape[2]
        if n <= self.budget:
            return None
        scores = self.score(keys).float()  # (B, H_kv, n)
        slot = torch.arange(n, device=keys.device)  # (n,)
        protected = (slot < self.sink) | (slot >= n - self.window)  # (n,): the first and last tokens stay
        scores = scores.masked_fill(protected, torch.inf)
        return scores.topk(self.budget, dim=-1).indices.sort(dim=-1).values  # (B, H_kv, budget), in token order

    def positions(self, seen: int, stored: int, T: int, device: torch.device) -> torch.Tensor:
        """RoPE positions (T,) of the new tokens: the count of tokens seen, never `stored` (StreamingLLM differs)."""
        return torch.arange(seen, seen + T, device=device)

    def append(self, keys: torch.Tensor, n_new: int) -> None:
        """The store now holds keys: (B, H_kv, n, D), the last n_new just arrived; extend per-token state."""

    def read_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys as attention should see them (B, H_kv, n, D); StreamingLLM re-rotates them by their slot."""
        return keys

    def observe(self, weights: torch.Tensor) -> None:
        """weights: (B, H, T, n) attention of the T new queries over the n stored keys (needs_attention only)."""

    def observe_mass(self, mass: torch.Tensor) -> None:
        """mass: (B, H, n) float32, the attention each stored key received from the T new queries (reads_mass only)."""

    def keep(self, idx: torch.Tensor) -> None:
        """The store kept idx (what select returned); gather per-token state the same way."""

    def state(self) -> list[torch.Tensor]:
        """Per-token statistics the policy holds; they count in memory_bytes()."""
        return []


class LayerCache:
    """One layer's cache: `policy` decides what stays, `store` holds it (through a codec). No branches on either."""

    def __init__(self, policy: Policy, store: Store):
        self.policy, self.store = policy, store
        self.needs_attention = policy.needs_attention or policy.ragged  # padding's weights must be zeroed
        self.reads_mass = policy.reads_mass and not self.needs_attention
        # a quantized store whose tokens nobody but attention reads: a decode kernel may take the codes as they are
        self.keeps_codes = store.hands_codes and not policy.reads_keys
        self._keys: torch.Tensor | None = None  # this step's keys, held from update() to observe() only

    def __len__(self) -> int:
        """Tokens stored per KV head (a ragged store: the mean over heads, rounded down)."""
        return len(self.store)

    def tokens_stored(self) -> int:
        """Tokens stored, summed over batch and KV heads."""
        return self.store.tokens_stored()

    def positions(self, seen: int, T: int, device: torch.device) -> torch.Tensor:
        return self.policy.positions(seen, len(self.store), T, device)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, H_kv, T, D) RoPE-rotated -> K, V: (B, H_kv, n, D) kept tokens then these T, model dtype.

        Trims the store by the policy right away, or, when the policy reads attention, in observe(). q: (B, H, T, D),
        the step's rotated queries, is not needed here; a cache that reads only what the query needs overrides
        update to use it (memhier's retrieval mode, memhier/cache.py).
        """
        K, V = self.store.append(k, v)  # (B, H_kv, n, D)
        self.policy.append(K, k.shape[2])
        K = self.policy.read_keys(K)
        if self.needs_attention or self.reads_mass:
            self._keys = K  # eviction waits for observe() / observe_mass()
        else:
            self._trim(K)
        return K, V

    def update_encoded(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None) -> list[tuple]:
        """Like update (q as there), for a cache that keeps_codes: store k, v (B, H_kv, T, D) and return every
        stored token as held, oldest first, [(K payload, V payload), ...] (CodecStore.encoded), for a kernel that
        dequantizes as it reads (cache/kernels/triton_decode.py, cache/kernels/cpu_decode.py). Nothing is decoded and
        nothing is evicted (the policy is Full)."""
        self.store.add(k, v)
        return self.store.encoded()

    def observe(self, weights: torch.Tensor) -> torch.Tensor:
        """weights: (B, H, T, n) of this step's queries over the K update() returned. Ragged stores zero the
        weights of padding slots first, in place (and return them), so the values are mixed with the right ones."""
        weights = self.store.renormalize(weights)
        self.policy.observe(weights)
        self._trim(self._keys)
        self._keys = None
        return weights

    def observe_mass(self, mass: torch.Tensor) -> None:
        """mass: (B, H, n) float32, each key's attention summed over this step's queries; then evict."""
        self.policy.observe_mass(mass)
        self._trim(self._keys)
        self._keys = None

    def _trim(self, keys: torch.Tensor) -> None:
        keep = self.policy.select(keys, self.store.padding())
        if keep is not None:
            self.store.keep(keep)
            self.policy.keep(keep)

    def memory_bytes(self) -> dict[str, int]:
        """Real bytes of every tensor held, by tier: {"device": n}."""
        held = self.store.tensors() + self.policy.state()
        return {"device": sum(t.numel() * t.element_size() for t in held)}


class ModelCache:
    """One LayerCache per layer, and `pos`: the number of tokens seen, the RoPE offset of the next token."""

    def __init__(self, layers: list[LayerCache], batch_size: int, n_kv_head: int, head_dim: int, device: torch.device):
        self.layers = layers
        self.batch_size, self.n_kv_head, self.head_dim, self.device = batch_size, n_kv_head, head_dim, device
        self.pos = 0

    def positions(self, T: int) -> torch.Tensor:
        """(T,) RoPE positions of the next T tokens; every layer runs the same policy, so layer 0 answers."""
        return self.layers[0].positions(self.pos, T, self.device)

    def advance(self, T: int) -> None:
        self.pos += T

    def memory_bytes(self) -> dict[str, int]:
        """Real storage bytes of every layer, summed per tier: {"device": n}."""
        total: dict[str, int] = {}
        for layer in self.layers:
            for tier, n in layer.memory_bytes().items():
                total[tier] = total.get(tier, 0) + n
        return total

    def total_bytes(self) -> int:
        return sum(self.memory_bytes().values())

    def full_cache_bytes(self, bytes_per_element: int = 2) -> int:
        """What a full cache would hold for the tokens seen: B * pos * 2 (K, V) * n_layer * H_kv * D * bytes (fp16)."""
        return self.batch_size * self.pos * 2 * len(self.layers) * self.n_kv_head * self.head_dim * bytes_per_element

    def cached_elements(self) -> int:
        """K and V numbers cached: tokens stored (over layers, batch, KV heads) * 2 * D."""
        return sum(layer.tokens_stored() for layer in self.layers) * 2 * self.head_dim

    def figures(self) -> dict[str, float]:
        """The numbers a report prints: bytes held, a full fp16 cache's bytes, their ratio, bits per element."""
        held, full, elements = self.total_bytes(), self.full_cache_bytes(), self.cached_elements()
        return {
            "tokens_seen": self.pos,
            "tokens_cached": sum(len(layer) for layer in self.layers) / len(self.layers),
            "kv_bytes": held,
            "kv_bytes_full_fp16": full,
            "compression_ratio": full / held if held else float("nan"),
            "bits_per_element": 8 * held / elements if elements else float("nan"),
        }
