"""Contiguous stores: where a layer cache keeps its tokens when the block pool (cache/blocks.py) cannot hold them
(MiniCache's pairs): two stores behind one small interface.

    store.append(k, v, q) -> (K, V) add the T new tokens, return every stored token decoded, in the model's dtype
                                    (q, the step's queries, is for stores that read only what they need: memhier's
                                    retrieval, cache/blocks.py)
    store.read() -> (K, V)          every stored token decoded, adding none (BufferStore, CodecStore: MiniCache's
                                    pairs read their merged directions at the first layer's step, cache/minicache.py)
    store.keep(sel, state) -> state physically drop the tokens a policy evicted (the tensors shrink), and gather
                                    the policy's per-token state the same way
    store.padding()                 None, or (B, H_kv, n) True at transient padding slots of the last (K, V)
    store.tensors()                 every tensor held, so that memory_bytes() counts real storage
    store.hands_codes               True: store.add(k, v, q) + encoded() give a decode kernel the stored bytes

    BufferStore   full precision, a preallocated (B, H_kv, capacity, D) buffer, gpt-fast style: appending writes
                  in place and returns views, no torch.cat per step. Capacity doubles when full; memory_bytes()
                  counts the whole allocated capacity (what the memory really costs). Eviction copies the kept
                  tokens into a new, exactly sized buffer, so eviction frees memory.
    CodecStore    any cache.codecs.Codec (int8, int4, KIVI, GEAR): an encoded body plus a short encoded tail, plus
                  KIVI's full-precision residual of recent tokens, flushed into quantized groups as it fills.
                  New tokens are appended to the tail (a copy of at most TAIL_TOKENS tokens, not of the whole
                  body), and the tail joins the body when it fills: every byte held is a token stored, and a step
                  costs O(TAIL_TOKENS) copying instead of O(n). add() + encoded() hand a decode kernel the stored
                  bytes as they are (never decoded).

Notation: B batch, H_kv KV heads, T new tokens, n tokens stored (per head), D head_dim, N packed rows.
"""

import torch

from cache.base import State
from cache.codecs import (Codec, Payload, TensorCodec, gather_tokens, payload_tensors, payload_tokens,
                          tokens_to_flush)

TAIL_TOKENS = 256  # encoded tokens appended by copying before they join the body (one body copy per this many)


def gather_state(state: State, sel: torch.Tensor) -> State:
    """Per-token policy state (B, H_kv, n) each, gathered like the tokens: sel (B, H_kv, n_keep) sorted indices per
    KV head, or a boolean (B, H_kv, n) selection that keeps each head's selected entries, in order, at its front
    (zero past them), as the block pool compacts its tokens."""
    if sel.dtype == torch.bool:
        if not state:
            return {}
        kept = sel.sum(dim=-1, keepdim=True)  # (B, H_kv, 1)
        width = int(kept.max())
        first = (~sel).to(torch.uint8).argsort(dim=-1, stable=True)[..., :width]  # (B, H_kv, width): kept slots
        pad = torch.arange(width, device=sel.device) >= kept  # (B, H_kv, width)
        return {name: t.gather(-1, first).masked_fill(pad, 0) for name, t in state.items()}
    return {name: t.gather(-1, sel) for name, t in state.items()}


class BufferStore:
    """Full-precision K/V in a preallocated buffer; `dtype` None stores them as they arrive (bit-exact)."""

    hands_codes = False  # no add()/encoded(): attention reads the buffer's views
    ragged_rows = False  # one length for every row of the batch
    paged = False

    def __init__(self, dtype: torch.dtype | None, out_dtype: torch.dtype):
        self.dtype, self.out_dtype = dtype, out_dtype
        self.k: torch.Tensor | None = None  # (B, H_kv, capacity, D); only [:, :, :n] is meaningful
        self.v: torch.Tensor | None = None
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def append(
        self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, H_kv, T, D) -> K, V: (B, H_kv, n, D), views of the buffer when no dtype cast is needed."""
        T = k.shape[2]
        capacity = 0 if self.k is None else self.k.shape[2]
        if self.n + T > capacity:
            self._grow(k, max(self.n + T, 2 * capacity))  # doubling: O(log n) reallocations over a generation
        self.k[:, :, self.n : self.n + T] = k  # earlier views cover [:n] only, so writing here never changes them
        self.v[:, :, self.n : self.n + T] = v
        self.n += T
        return self.read()

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V: (B, H_kv, n, D), views of the buffer when no dtype cast is needed."""
        return self.k[:, :, : self.n].to(self.out_dtype), self.v[:, :, : self.n].to(self.out_dtype)

    def _grow(self, like: torch.Tensor, capacity: int) -> None:
        B, H_kv, _, D = like.shape
        dtype = like.dtype if self.dtype is None else self.dtype
        k = like.new_empty((B, H_kv, capacity, D), dtype=dtype)  # (B, H_kv, capacity, D)
        v = like.new_empty((B, H_kv, capacity, D), dtype=dtype)
        if self.k is not None:
            k[:, :, : self.n], v[:, :, : self.n] = self.k[:, :, : self.n], self.v[:, :, : self.n]
        self.k, self.v = k, v

    def keep(self, idx: torch.Tensor, state: State) -> State:
        """idx: (B, H_kv, n_keep) sorted token indices per KV head. New exact-size tensors: the old ones are
        freed once the views handed to attention are dropped (they are never written again)."""
        self.k = gather_tokens(self.k[:, :, : self.n], idx)  # (B, H_kv, n_keep, D)
        self.v = gather_tokens(self.v[:, :, : self.n], idx)
        self.n = idx.shape[2]
        return gather_state(state, idx)

    def tokens_stored(self) -> int:
        """Tokens summed over batch and KV heads."""
        return 0 if self.k is None else self.k.shape[0] * self.k.shape[1] * self.n

    def padding(self) -> None:
        return None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v) if t is not None]


class CodecStore:
    """Tokens stored through a Codec, oldest first: encoded body | encoded tail | `codec.residual` recent tokens in
    full precision (KIVI)."""

    hands_codes = True  # add() + encoded(): a decode kernel may read the stored bytes as they are
    ragged_rows = False  # one length for every row of the batch
    paged = False

    def __init__(self, codec: Codec, out_dtype: torch.dtype, tail_tokens: int = TAIL_TOKENS):
        self.codec, self.out_dtype, self.tail_tokens = codec, out_dtype, tail_tokens
        self.k_body: Payload | None = None  # encoded (B, H_kv, n_body, D)
        self.v_body: Payload | None = None
        self.k_tail: Payload | None = None  # encoded (B, H_kv, n_tail, D), n_tail < tail_tokens
        self.v_tail: Payload | None = None
        self.k_res: torch.Tensor | None = None  # (B, H_kv, n_res, D), n_res < residual, in the model's dtype
        self.v_res: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.encoded_tokens() + (0 if self.k_res is None else self.k_res.shape[2])

    def encoded_tokens(self) -> int:
        """Tokens held encoded (body and tail), i.e. all but the full-precision residual."""
        return payload_tokens(self.k_body) + payload_tokens(self.k_tail)

    def append(
        self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, H_kv, T, D) -> K, V: (B, H_kv, n, D) decoded in the model's dtype (a transient copy)."""
        self.add(k, v, q)
        return self.read()

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V: (B, H_kv, n, D), every stored token decoded in the model's dtype (a transient copy)."""
        K = self._decoded(self.codec.key, [self.k_body, self.k_tail], self.k_res)  # (B, H_kv, n, D)
        return K, self._decoded(self.codec.value, [self.v_body, self.v_tail], self.v_res)

    def add(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None) -> None:
        """Store k, v: (B, H_kv, T, D): into the residual, then encode whatever the residual rule flushes."""
        k_res = k if self.k_res is None else torch.cat([self.k_res, k], dim=2)  # (B, H_kv, n_res + T, D)
        v_res = v if self.v_res is None else torch.cat([self.v_res, v], dim=2)
        n_flush = tokens_to_flush(k_res.shape[2], self.codec.residual)  # KIVI: whole blocks of R; else all
        if n_flush > 0:
            self.k_tail = self._grow(self.codec.key, self.k_tail, k_res[:, :, :n_flush])
            self.v_tail = self._grow(self.codec.value, self.v_tail, v_res[:, :, :n_flush])
            if payload_tokens(self.k_tail) >= self.tail_tokens:
                self._merge()
        # clone(): a slice would keep the whole concatenated tensor alive, and memory_bytes() would lie
        self.k_res, self.v_res = k_res[:, :, n_flush:].clone(), v_res[:, :, n_flush:].clone()

    def encoded(self) -> list[tuple[Payload, Payload]]:
        """The stored tokens as held, oldest first, never decoded: [(K body, V body), (K tail, V tail),
        (K residual, V residual)], leaving out the parts that hold no token. What a kernel that dequantizes in
        registers reads."""
        parts = [(self.k_body, self.v_body), (self.k_tail, self.v_tail), (self.k_res, self.v_res)]
        return [(k, v) for k, v in parts if payload_tokens(k)]

    @staticmethod
    def _grow(tc: TensorCodec, part: Payload | None, x: torch.Tensor) -> Payload:
        encoded = tc.encode(x)
        return encoded if part is None else tc.cat([part, encoded])

    def _merge(self) -> None:
        """Move the tail into the body: the one copy of the whole body, once per tail_tokens tokens."""
        if self.k_tail is None:
            return
        if self.k_body is None:
            self.k_body, self.v_body = self.k_tail, self.v_tail
        else:
            self.k_body = self.codec.key.cat([self.k_body, self.k_tail])
            self.v_body = self.codec.value.cat([self.v_body, self.v_tail])
        self.k_tail = self.v_tail = None

    def _decoded(self, tc: TensorCodec, parts: list[Payload | None], res: torch.Tensor) -> torch.Tensor:
        """The encoded parts decoded in float32 straight into one buffer, followed by the residual: no torch.cat."""
        parts = [p for p in parts if p is not None]
        if not parts:
            return res.to(self.out_dtype)
        B, H_kv, n_res, D = res.shape
        n_enc = sum(payload_tokens(p) for p in parts)
        out = res.new_empty((B, H_kv, n_enc + n_res, D), dtype=torch.float32)  # (B, H_kv, n, D)
        start = 0
        for p in parts:
            tc.decode_into(p, out[:, :, start : start + payload_tokens(p)])
            start += payload_tokens(p)
        out[:, :, n_enc:] = res
        return out.to(self.out_dtype)  # a no-op for a float32 model

    def keep(self, idx: torch.Tensor, state: State) -> State:
        """idx: (B, H_kv, n_keep) sorted token indices per KV head, selected without decoding (quant.select_tokens).
        Only for codecs without a residual (the builder refuses KIVI with eviction: its key groups span G tokens)."""
        self._merge()
        self.k_body = self.codec.key.select(self.k_body, idx)
        self.v_body = self.codec.value.select(self.v_body, idx)
        return gather_state(state, idx)

    def tokens_stored(self) -> int:
        """Tokens summed over batch and KV heads."""
        return 0 if self.k_res is None else self.k_res.shape[0] * self.k_res.shape[1] * len(self)

    def padding(self) -> None:
        return None

    def tensors(self) -> list[torch.Tensor]:
        held = [t for p in (self.k_body, self.v_body, self.k_tail, self.v_tail) for t in payload_tensors(p)]
        return held + [t for t in (self.k_res, self.v_res) if t is not None]
