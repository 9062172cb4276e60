"""A layer's KV cache: a policy (what to keep) times a store (how); the model talks to a ModelCache of them
(cache/model_cache.py).

    Transformer.forward(idx, cache, lengths)
        cache.positions(T, lengths)             (B, T) RoPE positions of the new tokens: tokens *seen*, per row
                                                pos[b] .. pos[b]+T-1; `lengths` (B,) real tokens per row (ragged)
        cache.layers[i].attend(q, k, v, backend) -> y
            store.append(k, v, q) -> (K, V)     every kept token, these T last, in the model's dtype (a block
                                                pool's decode step: store.add, then the kernel over the blocks)
            attend q over (K, V)                 the way chosen when the cache was built (below)
            policy.select(Step) -> store.keep   evict: the store drops the tokens and gathers the policy's state
        (a decode step in a float32 pool: cache.decode_blocks runs every block in one C call, storing,
         attending and evicting the same way: cache/kernels/cpu_block.py)
        cache.advance()                         pos += each row's new tokens

What a policy reads (`Policy.reads`) fixes how a layer cache attends when it is built: nothing (full: keeps every
token), keys (window, sink, l2norm: the slots or the keys), mass (h2o: each key's attention summed over queries), or
weights (snapkv, kvcompress: the attention weights).

Every policy evicts in the block pool (cache/blocks.py). Decode steps (one query per sequence) run the decode kernel
where one serves the device: it reads the blocks where they lie and, for the policies that read the attention, hands out
the softmax weights; prefill attends with the model's backend (mass: `attend_with_mass`; weights: the backend's
`attend`, and the weights of the policy's observation queries written out). The contiguous stores (MiniCache's pairs)
keep every token and attend with the backend, or a kernel over their stored codes. An evicting policy decides once per
block; KV-Compress leaves each head its own length, and so do rows of different lengths: a step over several tokens then
attends each query over its own head's keys (`PagedStore.visible`), and a row evicts when its own turn comes.

Eviction, kvpress style: a policy is a small class whose `score(step)` says, per KV head (the query heads sharing
it summed, so GQA's saving survives eviction), how much each stored token is worth (B, H_kv, n); `Policy.select`
protects the first `sink` and last `window` tokens, keeps the top `budget` by score and hands them to the store,
which moves them to the front of the head's blocks and frees the emptied ones (a contiguous store: gathers them).
Per-token policy state (H2O's attention totals, StreamingLLM's rotation of each key) lives in `LayerCache.state`,
one tensor per statistic with the tokens on its last axis; the store gathers it with the tokens it keeps.

Memory: `memory_bytes()` counts every tensor a cache holds (codes, scales, zeros, residual, lengths, the policy's
state), by tier (memhier adds "host" and "disk" to "device"); in the block pool, the blocks the layers hold (each
head's partly filled last one included) and their tables, the pool's free blocks being `figures()["kv_pool_bytes"]`.
Use caches under torch.inference_mode() / torch.no_grad(): they hold plain tensors, not autograd history.
"""

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, ClassVar, Literal, Protocol

import numpy as np
import torch

from cache.kernels.choose import DecodeKernel, gives_weights
from cache.kernels.cpu_block import BlockKernel
from toymodel.attention import Backend, attention_weights, masked_attend, ragged_mass, ragged_observed_weights

Reads = Literal["nothing", "keys", "mass", "weights"]
State = dict[str, torch.Tensor]  # per-token statistics, (B, H_kv, n) each


class Store(Protocol):
    """Where a layer cache keeps its tokens (cache/storage.py, cache/blocks.py)."""

    hands_codes: bool  # True: add() + encoded() give a decode kernel the stored bytes (those two only then)
    ragged_rows: bool  # True: rows of a batch may hold different numbers of tokens (ModelCache.positions)
    paged: bool  # True: the block pool (cache/blocks.py), which a kernel reads where the blocks lie

    def __len__(self) -> int: ...
    def append(
        self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def add(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None) -> None: ...
    def encoded(self) -> list[tuple]: ...
    def keep(self, sel: torch.Tensor, state: State) -> State: ...
    def tokens_stored(self) -> int: ...
    def padding(self) -> torch.Tensor | None: ...
    def tensors(self) -> list[torch.Tensor]: ...


@dataclass
class Step:
    """What a policy may read when it decides, once this step's attention is done.

    shape:   (B, H_kv, n) of the view it scores: n slots per head (a ragged view: padded to the longest), this
             step's T last, on `device`
    seen:    what the policy reads of the attention: (B, H, n) float32 mass (reads == "mass"), (B, H, T, n)
             weights (reads == "weights"), else None
    state:   the layer's per-token statistics (LayerCache.state), each with n tokens on its last axis
    padding: (B, H_kv, n) True at padding slots of a ragged view, or None
    keys:    (B, H_kv, n, D) every stored key as attention saw it (RoPE-rotated), gathered by `gather_keys` when a
             policy first reads them (the block pool's keys lie in blocks: only L2-norm scores their values)"""

    shape: tuple[int, int, int]
    device: torch.device
    seen: torch.Tensor | None
    state: State
    padding: torch.Tensor | None
    gather_keys: Callable[[], torch.Tensor] | None = None

    @cached_property
    def keys(self) -> torch.Tensor:
        return self.gather_keys()


@dataclass
class Policy:
    """Which tokens a layer keeps: at most `budget` per KV head, always the first `sink` and the last `window`.

    Subclasses define `score`; the other methods default to "nothing to do" and are overridden by the few policies
    that need them. A ragged policy (per-head budgets, KV-Compress) overrides `select` to return a mask."""

    budget: int
    sink: int = 0
    window: int = 0

    reads: ClassVar[Reads] = "keys"  # what `select` reads besides the slots (see the table in the module docstring)
    ragged: ClassVar[bool] = False  # True: heads keep different numbers of tokens (how it is stored, not read)
    # True: a key is attended rotated to its slot (StreamingLLM). Where a kernel reads keys where they lie (the block
    # pool, an exact codec), they are stored at their slot and a compaction turns the ones it moves
    # (PagedStore.keep's `turn`); otherwise keys stay as they arrived and are rotated at every read (`read_keys`: an int
    # code is never re-rotated), the slot each one arrived at kept as per-token state
    rotates_by_slot: ClassVar[bool] = False
    keeps_state: ClassVar[bool] = False  # True: per-token statistics (`new_state`), gathered with the kept tokens
    # True: `observe` adds each key's softmax weights, summed over its group's query heads, to state["mass"] (zero
    # past each head's length), which the one-call decode block does in C instead (cache/kernels/cpu_block.c)
    sums_attention: ClassVar[bool] = False

    def score(self, step: Step) -> torch.Tensor:
        """-> (B, H_kv, n), higher is kept first."""
        raise NotImplementedError

    def select(self, step: Step) -> torch.Tensor | None:
        """The tokens to keep, (B, H_kv, budget) sorted indices, or None when nothing needs evicting; over a view
        with padding (rows of different lengths), a (B, H_kv, n) mask: each head's top `budget` of its own tokens."""
        n = step.shape[2]
        if n <= self.budget:
            return None
        scores = self.score(step).float()  # (B, H_kv, n)
        ragged = step.padding is not None and bool(step.padding.any())
        if ragged:  # each head's own first `sink` and last `window` tokens, and never its padding
            valid = ~step.padding
            scores = scores.masked_fill(self.protected(valid), torch.inf).masked_fill(~valid, -torch.inf)
        else:  # every head holds n tokens: the same slots are protected in each
            slot = torch.arange(n, device=scores.device)
            scores = scores.masked_fill((slot < self.sink) | (slot >= n - self.window), torch.inf)
        top = scores.sort(dim=-1, descending=True, stable=True).indices[..., : self.budget]  # ties: the older
        if not ragged:
            return top.sort(dim=-1).values  # in token order
        return torch.zeros_like(valid).scatter_(-1, top, True) & valid  # (B, H_kv, n)

    def protected(self, valid: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, n) True at each head's first `sink` and last `window` tokens; valid: not padding."""
        first, last = valid.cumsum(dim=-1), valid.flip(-1).cumsum(dim=-1).flip(-1)  # counted from each head's ends
        return valid & ((first <= self.sink) | (last <= self.window))

    def positions(self, seen: torch.Tensor, stored: torch.Tensor, T: int) -> torch.Tensor:
        """RoPE positions (B, T) of the new tokens from `seen` (B,), the tokens each row has seen, never `stored`
        (B,), the tokens each row's cache holds (StreamingLLM differs)."""
        return seen.unsqueeze(1) + torch.arange(T, device=seen.device)  # (B, T)

    def new_state(self, start: torch.Tensor, k: torch.Tensor) -> State:
        """Per-token statistics of the T new tokens k (B, H_kv, T, D), stored at slots start .. start + T - 1 of
        each head (start: (B, H_kv))."""
        return {}

    def read_keys(self, keys: torch.Tensor, state: State) -> torch.Tensor:
        """Keys as attention should see them (B, H_kv, n, D); StreamingLLM re-rotates them by their slot."""
        return keys

    def observe(self, step: Step) -> None:
        """Update the per-token statistics in step.state from this step's attention (H2O sums its mass)."""

    def observed_queries(self, T: int) -> int:
        """How many of a step's last T queries `score` reads the softmax weights of (a policy that reads weights)."""
        return T

    def turn(self, keys: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
        """keys (..., D) rotated by `by` (...) more positions: how a policy that `rotates_by_slot` moves a stored
        key to a new slot (StreamingLLM's; cache/blocks.py's compaction calls it)."""
        raise NotImplementedError(f"{type(self).__name__} sets rotates_by_slot: define turn(keys, by)")


class LayerCache:
    """One layer's cache: `policy` decides what stays, `store` holds it. `kernel`, when given, attends decode steps
    (cache/kernels/choose.py): over the blocks of a block pool where they lie, straight over the stored codes when
    a store hands them over, else over the kept K, V; the C kernel also hands out the softmax weights H2O and
    SnapKV read, and its result does not depend on the thread count (toymodel/threads.py says why it matters)."""

    def __init__(self, policy: Policy, store: Store, kernel: DecodeKernel | None = None):
        self.policy, self.store, self.kernel = policy, store, kernel
        self.kernel_weights = kernel is not None and gives_weights(kernel)  # also the softmax weights, on request
        self.realigns = policy.rotates_by_slot and store.paged and kernel is not None  # keys stored at their slot
        # True: the policy has work at every decode step (H2O adds the step's attention to its totals, a per-token
        # state grows by the new token's), not only when an eviction is due
        self.every_step = policy.reads == "mass" or (policy.keeps_state and not self.realigns)
        self.state: State = {}
        self.block_kernel: BlockKernel | None = None  # the one-call step's, built at the layer's first decode step
        # Called after every step in the block pool of a policy that keeps every token with its queries (B, H, T,
        # D) (None where the decode block ran in one call), the store, which holds the step's tokens by then, and
        # the softmax weights (B, H, T, L) when the decode kernel handed them out (else None): the serving engine
        # scores keys this way for KV-Compress (serving/kvcompress.py). The one-call block calls an observer with a
        # method `squares_into(L)` that instead: it returns a (B, H_kv, >= L) float32 tensor, which the block adds
        # the step's squared weights to, summed over each KV head's queries, in place.
        self.observe: Callable[[torch.Tensor, Store, torch.Tensor | None], None] | None = None
        # How to attend, chosen once here, never per call (a function, not a bound method: no reference cycle).
        if store.paged and policy.reads == "nothing":  # the block pool (cache/blocks.py), keeping every token
            self._attend = LayerCache._attend_paged
        elif store.paged:  # the block pool, evicting a block's worth of tokens at a time
            self._attend = LayerCache._attend_paged_evicting
        elif policy.reads == "nothing" and store.hands_codes and kernel is not None:
            self._attend = LayerCache._attend_codes
        elif policy.reads in ("nothing", "keys"):  # a contiguous store
            self._attend = LayerCache._attend_plain
        else:
            raise ValueError(f"policy {type(policy).__name__} reads the attention ({policy.reads}), which only the "
                             f"block pool hands out")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Backend) -> torch.Tensor:
        """Store this step's k, v (B, H_kv, T, D), attend q (B, H, T, D) over every kept token with `backend`,
        evict by the policy -> y (B, H, T, D)."""
        return self._attend(self, q, k, v, backend)

    def __len__(self) -> int:
        """Tokens stored per KV head (a ragged store: the mean over heads, rounded down)."""
        return len(self.store)

    def tokens_stored(self) -> int:
        """Tokens stored, summed over batch and KV heads."""
        return self.store.tokens_stored()

    def positions(self, seen: torch.Tensor, T: int) -> torch.Tensor:
        """(B, T) RoPE positions of the next T tokens of the rows, which have seen `seen` (B,) tokens each and hold
        as many as their first heads (StreamingLLM counts those; a rectangular store: one length for all)."""
        stored = self.store.token_counts()[:, 0] if self.store.paged else np.full(seen.shape[0], len(self.store))
        return self.policy.positions(seen, torch.from_numpy(stored).to(seen), T)

    # The ways to attend: in a contiguous store plainly or over its codes, in the pool by whether the policy evicts

    def _attend_plain(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Backend) -> torch.Tensor:
        K, V = self.store_tokens(q, k, v)  # (B, H_kv, n, D)
        if self.kernel is not None and q.shape[2] == 1:  # a decode step: the kernel reads K, V in place
            y = self.kernel(q, [(K, V)], causal=True)
        else:
            y = backend.attend(q, K, V, causal=True)
        self.evict(K, None)
        return y

    def _attend_codes(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Backend) -> torch.Tensor:
        if q.shape[2] > 1:  # prefill: decode the few stored tokens once and attend as usual
            return self._attend_plain(q, k, v, backend)
        self.store.add(k, v, q)  # a decode step: nothing is decoded, and the policy (Full) evicts nothing
        return self.kernel(q, self.store.encoded(), causal=True)

    def _attend_paged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Backend) -> torch.Tensor:
        self.store.add(k, v, q)  # each row's real tokens into its heads' blocks (q: for a chooser, if any)
        weights = None
        if self.kernel is None or q.shape[2] > 1:
            y = self.store.attend_gathered(q, k, v, backend)
        elif self.observe is None or not self.kernel_weights:  # a decode step: the kernel reads the blocks in place
            y = self.kernel(q, *self.store.kernel_args())
        else:  # and hands out the softmax weights (B, H, 1, L) for the observer
            y, weights = self.kernel(q, *self.store.kernel_args(), weights=True)
        if self.observe is not None:
            self.observe(q, self.store, weights)
        return y

    def _attend_paged_evicting(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               backend: Backend) -> torch.Tensor:
        """A head holds up to `budget + block_tokens - 1` tokens: the policy selects `budget` when its row fills a
        block past the budget (every step with blocks of one token), so the tokens it drops free a block. Decode
        steps run the kernel over the blocks (it also hands out the weights H2O and SnapKV read)."""
        due = self.store.due(self.policy.budget, 1 if q.shape[2] == 1 else None)  # (B,): the rows whose turn it is
        reads = self.policy.reads
        if self.kernel is not None and q.shape[2] == 1 and (reads == "keys" or self.kernel_weights):
            return self._decode_paged(q, k, v, due)
        K, V = self.store_tokens(q, k, v)  # (B, H_kv, n, D), zero past a head's length
        visible = self.store.visible(q.shape[2])  # None: every row and head level, the causal mask says it
        if reads == "weights" and visible is None:  # rectangular: the backend attends, and the policy reads the
            # weights of its observation queries only, not a (T, n) matrix per head (SnapKV: the last `window`)
            W = self.policy.observed_queries(q.shape[2])
            y, seen = backend.attend(q, K, V, causal=True), attention_weights(q[:, :, -W:], K, causal=True)
        elif visible is not None:  # ragged: each query sees its own head's keys, and the policy reads its rows'
            # real queries only, their mass a chunk at a time or its observation window's weights: no (T, n) matrix
            y, real, seen = masked_attend(q, K, V, visible), self.store.rows.new, None  # real: (B,), first in a row
            if reads == "mass":
                seen = ragged_mass(q, K, visible, real)  # (B, H, n)
            elif reads == "weights":
                seen = ragged_observed_weights(q, K, visible, real, self.policy.observed_queries(q.shape[2]))
        elif reads == "mass":
            y, seen = backend.attend_with_mass(q, K, V, causal=True)  # (B, H, T, D), (B, H, n)
        else:
            y, seen = backend.attend(q, K, V, causal=True), None
        self.evict(K, seen, due)
        return y

    def _decode_paged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, due: np.ndarray) -> torch.Tensor:
        """A decode step in the block pool: the kernel reads the blocks where they lie (and hands out the softmax
        weights when the policy reads them); the keys are gathered only when the policy evicts."""
        self.store.add(k, v)
        if self.reads_weights(due):
            y, weights = self.kernel(q, *self.store.kernel_args(), weights=True)  # (B, H, 1, D), (B, H, 1, n)
        else:
            y, weights = self.kernel(q, *self.store.kernel_args()), None
        if self.every_step or due.any():
            self.after_decode(k, weights, due)
        return y

    def reads_weights(self, due: np.ndarray) -> bool:
        """Whether a decode step's kernel should hand out the softmax weights: H2O adds them up at every step,
        SnapKV and KV-Compress score by them when a row's eviction is `due` (B,) (a policy that observes every step:
        at every step)."""
        reads = self.policy.reads
        return reads == "mass" or (reads == "weights" and (self.every_step or bool(due.any())))

    def after_decode(self, k: torch.Tensor, weights: torch.Tensor | None, due: np.ndarray) -> None:
        """An evicting policy's part of a decode step in the block pool, once it is stored and attended, where it
        has one (`every_step`, or a row `due`): the state of the new keys k (B, H_kv, 1, D), the softmax weights
        (B, H, 1, n) it reads, eviction of the rows `due`."""
        self.append_state(k)
        if due.any() or weights is not None:  # a policy that reads the attention observes every step it is handed
            self.evict(None, weights.sum(dim=2) if self.policy.reads == "mass" else weights, due)

    def append_state(self, k: torch.Tensor) -> None:
        """Append the policy's statistics of the new tokens k (B, H_kv, T, D), which the store holds by now."""
        if not self.policy.keeps_state or self.realigns:  # keys at their slots: a compaction's choice says the rest
            return
        if self.store.paged:  # each head's after its own old ones (cache/blocks.py)
            self.state = self.store.place_state(self.state, self.policy.new_state(self.store.new_slots(), k))
        else:
            start = torch.full(k.shape[:2], len(self.store) - k.shape[2])  # (B, H_kv)
            self.state = append_entries(self.state, self.policy.new_state(start, k))

    def store_tokens(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v and return every kept token, (B, H_kv, n, D) each, with the new tokens' state appended."""
        K, V = self.store.append(k, v, q)
        self.append_state(k)
        return (K if self.realigns else self.policy.read_keys(K, self.state)), V  # stored at their slots already

    def evict(self, keys: torch.Tensor | None, seen: torch.Tensor | None, due: bool | np.ndarray = True,
              observed: bool = False) -> None:
        """The policy observes this step (keys as attention saw them, None: the block pool's, read if the policy
        asks; `seen` what it reads of the attention; `observed`: its state holds this step already, as the one-call
        decode block adds H2O's totals) and, when an eviction is `due` (for the batch, or (B,) per row: the others
        keep every token, as they would alone), selects; the store drops every other token and gathers the policy's
        state with the kept ones."""
        if keys is None:
            counts = self.store.token_counts()  # (B, H_kv)
            step = Step((*counts.shape, int(counts.max())), self.store.pool.device, seen, self.state,
                        self.store.padding(), lambda: self.store.read(values=False)[0])
        else:
            step = Step(tuple(keys.shape[:3]), keys.device, seen, self.state, self.store.padding(), lambda: keys)
        if not observed:
            self.policy.observe(step)
        keep = self.policy.select(step) if np.any(due) else None
        if keep is not None and not np.all(due) and step.padding is not None:  # rows of different lengths: a mask
            keep |= torch.from_numpy(~due).to(keep.device).view(-1, 1, 1) & ~step.padding
        if keep is not None:
            if self.realigns:  # keys stored rotated at their slot: the ones that move turn with them
                self.state = self.store.keep(keep, self.state, turn=self.policy.turn)
            else:
                self.state = self.store.keep(keep, self.state)

    def memory_bytes(self) -> dict[str, int]:
        """Real bytes of every tensor held, by tier: {"device": n}."""
        held = self.store.tensors() + list(self.state.values())
        return {"device": sum(t.numel() * t.element_size() for t in held)}


def append_entries(state: State, new: State) -> State:
    """Each statistic's new entries (B, H_kv, T) after its old ones, on the tokens' axis."""
    return {name: torch.cat([state[name], t], dim=-1) if name in state else t for name, t in new.items()}
