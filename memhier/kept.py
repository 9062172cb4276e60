"""Eviction over sealed blocks: which slots each (batch, KV head) still keeps, so that any cache preset composes
with memhier.

Sealed blocks are immutable bytes in the tiers (a 4-bit block moves as 4-bit bytes; rewriting one would mean
fetching, decoding and re-encoding it). So an evicting policy does not edit blocks: it edits a list of *kept
slots*. Number the slots a layer can read this step in order,

    slots:  [ live block 0 | live block 1 | ... | open block | the T new tokens ]      (block_tokens each)

and keep, per (batch, KV head), the sorted slots of the tokens the policy kept: `slots` (B, H_kv, L). A step reads
every live block, decodes [blocks | open block] once and gathers the kept slots: the same K and V, bit for bit,
as the cache without memhier hands attention (it gathers the same tokens out of its own tensors).

Memory is freed a block at a time: once no (batch, KV head) keeps a slot of a block, the block is dropped from
its tier and the slots after it move down by block_tokens. Dead tokens inside a live block still cost their bytes
until the whole block dies; the report counts them (bytes held are bytes held).

Ragged policies (KV-Compress) keep different numbers of tokens per head. Their view is padded, each head
[ its kept tokens | padding up to the longest | the T new tokens ] (so the causal mask stays bottom-right
aligned), with zeros at padding slots and `pad` saying where they are.

Notation: B batch, H_kv KV heads, L kept slots per head (padded), T new tokens, N slots readable this step.
"""

import torch
import torch.nn.functional as F

from cache.codecs import gather_tokens


class KeptSlots:
    """The slots an evicting policy kept, per (batch, KV head); None until the policy first evicts."""

    def __init__(self, block_tokens: int):
        self.block_tokens = block_tokens
        self.slots: torch.Tensor | None = None  # (B, H_kv, L) int64, sorted per row; None: every slot is kept
        self.pad: torch.Tensor | None = None  # (B, H_kv, L) bool, True at padding (ragged policies); None: none
        self._like: torch.Tensor | None = None  # (B, H_kv, N) bool zeros: the last view, when nothing is padding

    def view(self, K: torch.Tensor, V: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V: (B, H_kv, N, D) every readable slot, the T new tokens last -> the kept ones, (B, H_kv, L + T, D).
        The new tokens are kept from now on, unless the policy's keep() says otherwise."""
        B, H_kv, N, _ = K.shape
        if self.slots is None:  # nothing evicted yet: every slot is kept, nothing to gather
            self._like = K.new_zeros(B, H_kv, N, dtype=torch.bool)  # (B, H_kv, N)
            return K, V
        new = torch.arange(N - T, N, device=K.device).expand(B, H_kv, T)  # (B, H_kv, T)
        self.slots = torch.cat([self.slots, new], dim=2)  # (B, H_kv, L + T)
        K, V = gather_tokens(K, self.slots), gather_tokens(V, self.slots)  # (B, H_kv, L + T, D)
        if self.pad is not None:
            self.pad = F.pad(self.pad, (0, T))  # (B, H_kv, L + T): the new tokens are never padding
            K = K.masked_fill(self.pad.unsqueeze(-1), 0.0)  # zeros at padding
            V = V.masked_fill(self.pad.unsqueeze(-1), 0.0)
        return K, V

    def padding(self) -> torch.Tensor:
        """(B, H_kv, L + T) bool: True at padding slots of the last view (all False for one-budget policies)."""
        if self.pad is not None:
            return self.pad
        return self._like if self.slots is None else torch.zeros_like(self.slots, dtype=torch.bool)

    def keep(self, sel: torch.Tensor, n_blocks: int) -> list[int]:
        """sel: (B, H_kv, n_keep) sorted indices into the last view (one budget per head), or a (B, H_kv, L + T)
        bool mask over it (ragged). Records the kept slots and returns the live blocks (indices 0..n_blocks - 1)
        that no head keeps a slot of any more; the caller drops them, and the slots after them have moved down."""
        view = self.slots
        if view is None:
            B, H_kv, N = self._like.shape
            view = torch.arange(N, device=sel.device).expand(B, H_kv, N)  # (B, H_kv, N): every slot
        keep = sel
        if sel.dtype != torch.bool:
            keep = torch.zeros(view.shape, dtype=torch.bool, device=sel.device).scatter_(2, sel, True)
        lengths = keep.sum(dim=-1)  # (B, H_kv)
        L = int(lengths.max())
        order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[:, :, :L]  # kept first, in order
        pad = torch.arange(L, device=sel.device) >= lengths.unsqueeze(-1)  # (B, H_kv, L)
        self.slots = view.gather(2, order).masked_fill(pad, 0)  # (B, H_kv, L); slot 0 at padding (never read)
        self.pad = pad if bool(pad.any()) else None
        return self._drop_dead(n_blocks)

    def _drop_dead(self, n_blocks: int) -> list[int]:
        """Find the live blocks no kept slot falls in and renumber the slots after them."""
        if n_blocks == 0:
            return []
        bt = self.block_tokens
        kept = self.slots if self.pad is None else self.slots[~self.pad]
        block = (kept // bt).clamp(max=n_blocks).flatten()  # n_blocks stands for the open block and new tokens
        dead = torch.bincount(block, minlength=n_blocks + 1)[:n_blocks] == 0  # (n_blocks,)
        if not bool(dead.any()):
            return []
        before = F.pad(dead.cumsum(0), (1, 0))  # (n_blocks + 1,): dead blocks before block i (n_blocks: all)
        self.slots = self.slots - bt * before[(self.slots // bt).clamp(max=n_blocks)]  # (B, H_kv, L)
        return dead.nonzero().flatten().tolist()

    def stored(self, B: int, H_kv: int, n_slots: int) -> int:
        """Tokens kept, summed over batch and KV heads (n_slots: the layer's slots, all kept before any eviction)."""
        if self.slots is None:
            return B * H_kv * n_slots
        return int((~self.pad).sum()) if self.pad is not None else self.slots.numel()

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.slots, self.pad) if t is not None]
