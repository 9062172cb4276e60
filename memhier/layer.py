"""A layer store whose sealed blocks live in a TieredStore: the piece of memhier that a LayerCache talks to.

Each layer keeps an *open* block in an ordinary CodecStore (the same codec as without memhier, so a 4-bit cache
stays 4-bit). When its encoded body reaches `block_tokens` tokens, the first `block_tokens` are cut off, without
decoding, packed into one uint8 blob (K then V: codes, scales, zeros) and put in the TieredStore under the key
(layer, block index). Every step, append() gets the sealed blocks it needs back (promoting them to the device
tier), decodes them and the open block, and concatenates them in token order:

    K = [ block 0 | block 1 | ... | open block (encoded body + KIVI's fp residual) | the T new tokens ]

Exact mode reads every block. Decoding is elementwise given each group's scale and zero, so decoding block by
block and concatenating equals decoding the whole payload at once: bit-identical to the cache without memhier.
Where a decode kernel reads quantized bytes (cache/kernels/cpu_decode.py, cache/kernels/triton_decode.py), add() and
encoded() hand it the blocks as stored instead, one segment each, and nothing is decoded.
Retrieval mode (memhier/retrieval.py) reads only the blocks its Retriever chooses for the step's query.
These blocks hold a whole layer's batch and heads and serve retrieval, attention demotion and persistent
prefixes, which keep every token; exact mode with LRU demotion keeps the cache's own pool blocks in the tiers
instead (memhier/frames.py), evicting presets included.

Granularity: a block holds one layer's K and V rather than all layers', so layer i fetches only its own bytes,
and while layer i computes, a background thread fetches layer i + 1's blocks (exact mode; retrieval cannot know
the next layer's blocks before its query exists). Blocks loaded from a persistent prefix store enter through
adopt(), as if this layer had sealed them.
"""

from typing import Callable

import torch

from cache.base import State
from cache.codecs import Codec, Payload, gather_tokens, slice_tokens
from cache.storage import CodecStore
from memhier.blob import BlockLayout
from memhier.retrieval import Retriever
from memhier.store import TieredStore
from memhier.tiers import Key

OnSeal = Callable[[int, int, torch.Tensor], None]  # (layer, block index, blob) of each block this layer seals


def block_layout(codec: Codec, B: int, n_kv_head: int, block_tokens: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> BlockLayout:
    """The byte layout of one block, known before any token arrives: encode a block of zeros once."""
    zeros = torch.zeros(B, n_kv_head, block_tokens, head_dim, dtype=dtype, device=device)  # (B, H_kv, bt, D)
    return BlockLayout.of(codec.key.encode(zeros), codec.value.encode(zeros))


class TieredLayerStore:
    """One layer's tokens: sealed blocks in a shared TieredStore, the open block in a CodecStore."""

    def __init__(self, layer: int, codec: Codec, out_dtype: torch.dtype, store: TieredStore, block_tokens: int,
                 layout: BlockLayout, retriever: Retriever | None = None, retrieve: bool = False,
                 rank: bool = False):
        self.layer, self.codec, self.store, self.block_tokens = layer, codec, store, block_tokens
        self.open = CodecStore(codec, out_dtype)  # encoded body (< block_tokens after sealing) + KIVI residual
        self.out_dtype, self.layout, self.retriever = out_dtype, layout, retriever
        self.retrieve = retrieve  # read only the blocks the retriever chooses (memhier.mode=retrieval)
        self.rank = rank  # rank the blocks for demotion by the retriever's scores (memhier.demotion=attention)
        # every block read and quantized: a decode kernel may take the blocks as stored (full precision takes the
        # path memhier=off takes, attention over the concatenated K/V, so that both stay equal bit for bit)
        self.hands_codes = not (retrieve or codec.full_precision)
        self.ragged_rows = False  # one length for every row of the batch
        self.paged = False  # memhier's own blocks, in its tiers
        self.sealed = 0  # blocks handed to the store
        self.next: "TieredLayerStore | None" = None  # the layer computed after this one (prefetch target)
        self.prefetch = False
        self.on_seal: OnSeal | None = None  # set by a cache that persists the blocks it seals

    def __len__(self) -> int:
        """Tokens kept per KV head."""
        B, H_kv = self.layout.key_parts[0].shape[:2]
        return self.tokens_stored() // (B * H_kv)

    def keys(self) -> tuple[Key, ...]:
        return tuple((self.layer, i) for i in range(self.sealed))

    def append(
        self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, H_kv, T, D) -> K, V: (B, H_kv, n, D): the sealed blocks read this step, then the open block,
        decoded. n counts every token in exact mode, the chosen blocks' tokens plus the open block in retrieval,
        where q (B, H, T, D) chooses the blocks."""
        if self.retrieve and q is None:
            raise ValueError("memhier.mode=retrieval needs each step's queries to choose blocks: attend through "
                             "layer_cache.attend(q, k, v, backend), as Transformer.forward does")
        keys = self.keys()  # the blocks sealed before this step: the ones a prefetch may be fetching
        self.store.wait(keys)
        K_open, V_open = self.open.append(k, v, q)  # (B, H_kv, n_open, D), decoded before any sealing below
        self._seal()
        self._rank(keys, q)
        picks = self.retriever.choose(len(keys), q) if self.retrieve else None  # (B, H_kv, m) or None
        read = keys if picks is None else [keys[i] for i in picks.unique().tolist()]  # union over rows and heads
        blobs = [self.store.get(key) for key in read]  # promoted to the device tier, where room allows
        self._prefetch_next()
        if not read:
            return K_open, V_open
        k_ps, v_ps = zip(*(self.layout.unpack(blob) for blob in blobs))  # views of each blob
        K_old = self.codec.key.decode(self.codec.key.cat(k_ps), self.out_dtype)  # (B, H_kv, len(read) * bt, D)
        V_old = self.codec.value.decode(self.codec.value.cat(v_ps), self.out_dtype)  # one decode, not one per block
        if picks is not None:  # each KV head keeps its own m blocks out of the union
            idx = self._token_index(picks, torch.tensor([key[1] for key in read], device=picks.device))
            K_old, V_old = gather_tokens(K_old, idx), gather_tokens(V_old, idx)  # (B, H_kv, m * bt, D)
        return torch.cat([K_old, K_open], dim=2), torch.cat([V_old, V_open], dim=2)  # (B, H_kv, n, D)

    def add(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None) -> None:
        """Store k, v: (B, H_kv, T, D) and seal what fills, decoding nothing (a decode kernel reads encoded())."""
        keys = self.keys()
        self.store.wait(keys)
        self.open.add(k, v, q)
        self._seal()
        self._rank(keys, q)

    def encoded(self) -> list[tuple[Payload, Payload]]:
        """Every token as stored, oldest first, never decoded: each sealed block's (K, V) payloads (views of its
        blob, promoted to the device tier where room allows), then the open block's (CodecStore.encoded)."""
        blobs = [self.store.get(key) for key in self.keys()]
        self._prefetch_next()
        return [self.layout.unpack(blob) for blob in blobs] + self.open.encoded()

    def _rank(self, keys: tuple[Key, ...], q: torch.Tensor) -> None:
        """memhier.demotion=attention, at a decode step: rank the blocks sealed before it by this step's queries
        q (B, H, 1, D), before any get(), so that promotions demote the least wanted first."""
        if self.rank and keys and q is not None and q.shape[2] == 1:
            self.store.rank(dict(zip(keys, self.retriever.ranks(len(keys), q).tolist())))

    def _prefetch_next(self) -> None:
        if self.prefetch and self.next is not None:
            self.store.prefetch(self.next.keys())  # runs while this layer decodes, attends and runs its MLP

    def keep(self, sel: torch.Tensor, state: State) -> State:
        raise ValueError("memhier's own blocks keep every token (retrieval, attention demotion, persistence); an "
                         "evicting preset runs in exact mode with lru demotion, on the pool's blocks")

    def _token_index(self, picks: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
        """picks (B, H_kv, m) block indices, read (u,) the sorted blocks decoded -> (B, H_kv, m * bt) token slots."""
        slot = torch.searchsorted(read, picks)  # (B, H_kv, m): where each chosen block sits in the decoded union
        offsets = torch.arange(self.block_tokens, device=picks.device)  # (bt,)
        return (slot.unsqueeze(-1) * self.block_tokens + offsets).flatten(2)  # (B, H_kv, m * bt)

    def _seal(self) -> None:
        """Cut every whole block off the open store's encoded tokens and put it in the store, encoded as it is."""
        n_seal = self.open.encoded_tokens() // self.block_tokens * self.block_tokens
        if n_seal == 0:
            return
        k_all, v_all = self.open.take_front(n_seal)  # (B, H_kv, n_seal, D) encoded
        for a in range(0, n_seal, self.block_tokens):
            k_p = slice_tokens(k_all, a, a + self.block_tokens)  # (B, H_kv, block_tokens, D) encoded
            v_p = slice_tokens(v_all, a, a + self.block_tokens)
            blob = self.layout.pack(k_p, v_p)
            if self.on_seal is not None:
                self.on_seal(self.layer, self.sealed, blob)
            self._store(blob)

    def adopt(self, blob: torch.Tensor) -> None:
        """Take blob (nbytes,) uint8, loaded from a prefix store, as this layer's next block."""
        if len(self.open):
            raise ValueError(f"layer {self.layer}: a stored block can only follow whole blocks; load stored "
                             f"prefixes into an empty cache, before any token is computed")
        self._store(blob)

    def _store(self, blob: torch.Tensor) -> None:
        """Put blob in the tiers as block `sealed` (and give its keys' representatives to the retriever)."""
        if self.retriever is not None:
            k_p, _ = self.layout.unpack(blob)
            self.retriever.add(self.codec.key.decode(k_p, self.out_dtype))  # (B, H_kv, bt, D) keys
        self.store.put((self.layer, self.sealed), blob)
        self.sealed += 1

    def tokens_stored(self) -> int:
        """Tokens kept, summed over batch and KV heads."""
        B, H_kv = self.layout.key_parts[0].shape[:2]
        return B * H_kv * (self.sealed * self.block_tokens + len(self.open))

    def padding(self) -> None:
        return None  # every head holds as many tokens

    def tensors(self) -> list[torch.Tensor]:
        """The open block's tensors and the retriever's representatives (sealed blocks: per tier, in the store)."""
        held = self.open.tensors()
        return held + ([] if self.retriever is None else self.retriever.tensors())
