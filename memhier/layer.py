"""A layer store whose sealed blocks live in a TieredStore, for persistent prefixes (memhier/persist.py).

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
These blocks hold a whole layer's batch and heads, so that a prompt's block j, every layer's, is one entry of the
persistent prefix store; without persist, the tiers hold the cache's own pool blocks instead (memhier/frames.py),
retrieval, attention demotion and evicting presets included.

Granularity: a block holds one layer's K and V rather than all layers', so layer i fetches only its own bytes,
and while layer i computes, a background thread fetches layer i + 1's blocks. Blocks loaded from a persistent
prefix store enter through adopt(), as if this layer had sealed them.
"""

from typing import Callable

import torch

from cache.base import State
from cache.codecs import Codec, Payload, slice_tokens
from cache.storage import CodecStore
from memhier.blob import BlockLayout
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
                 layout: BlockLayout):
        self.layer, self.codec, self.store, self.block_tokens = layer, codec, store, block_tokens
        self.open = CodecStore(codec, out_dtype)  # encoded body (< block_tokens after sealing) + KIVI residual
        self.out_dtype, self.layout = out_dtype, layout
        # quantized blocks: a decode kernel may take them as stored (full precision takes the path memhier=off
        # takes, attention over the concatenated K/V, so that both stay equal bit for bit)
        self.hands_codes = not codec.full_precision
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
        """k, v: (B, H_kv, T, D) -> K, V: (B, H_kv, n, D): every sealed block, then the open block, decoded."""
        keys = self.keys()  # the blocks sealed before this step: the ones a prefetch may be fetching
        self.store.wait(keys)
        K_open, V_open = self.open.append(k, v, q)  # (B, H_kv, n_open, D), decoded before any sealing below
        self._seal()
        blobs = [self.store.get(key) for key in keys]  # promoted to the device tier, where room allows
        self._prefetch_next()
        if not keys:
            return K_open, V_open
        k_ps, v_ps = zip(*(self.layout.unpack(blob) for blob in blobs))  # views of each blob
        K_old = self.codec.key.decode(self.codec.key.cat(k_ps), self.out_dtype)  # (B, H_kv, len(keys) * bt, D)
        V_old = self.codec.value.decode(self.codec.value.cat(v_ps), self.out_dtype)  # one decode, not one per block
        return torch.cat([K_old, K_open], dim=2), torch.cat([V_old, V_open], dim=2)  # (B, H_kv, n, D)

    def add(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None) -> None:
        """Store k, v: (B, H_kv, T, D) and seal what fills, decoding nothing (a decode kernel reads encoded())."""
        keys = self.keys()
        self.store.wait(keys)
        self.open.add(k, v, q)
        self._seal()

    def encoded(self) -> list[tuple[Payload, Payload]]:
        """Every token as stored, oldest first, never decoded: each sealed block's (K, V) payloads (views of its
        blob, promoted to the device tier where room allows), then the open block's (CodecStore.encoded)."""
        blobs = [self.store.get(key) for key in self.keys()]
        self._prefetch_next()
        return [self.layout.unpack(blob) for blob in blobs] + self.open.encoded()

    def _prefetch_next(self) -> None:
        if self.prefetch and self.next is not None:
            self.store.prefetch(self.next.keys())  # runs while this layer decodes, attends and runs its MLP

    def keep(self, sel: torch.Tensor, state: State) -> State:
        raise ValueError("memhier's persistent blocks keep every token; an evicting preset runs without "
                         "memhier.persist, on the pool's blocks")

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
        """Put blob in the tiers as block `sealed`."""
        self.store.put((self.layer, self.sealed), blob)
        self.sealed += 1

    def tokens_stored(self) -> int:
        """Tokens kept, summed over batch and KV heads."""
        B, H_kv = self.layout.key_parts[0].shape[:2]
        return B * H_kv * (self.sealed * self.block_tokens + len(self.open))

    def padding(self) -> None:
        return None  # every head holds as many tokens

    def tensors(self) -> list[torch.Tensor]:
        """The open block's tensors (sealed blocks: per tier, in the store)."""
        return self.open.tensors()
