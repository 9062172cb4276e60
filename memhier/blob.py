"""Encoded blocks as opaque bytes: the K and V payloads of n pool blocks, flattened into one uint8 tensor.

The tiers (memhier/tiers.py) move these blobs and never look inside them, so a 4-bit cache moves 4-bit bytes.
Only their owner, the pool that keeps a group of n blocks (n, 1, block_tokens, width) in device frames
(memhier/frames.py), turns them back into its payloads' tensors, through the `BlockLayout` of n blocks.

    layout = BlockLayout.of(k_payload, v_payload)
    blob = layout.pack_tensors(tensors)             # (nbytes,) uint8: codes, scales, zeros, back to back
    tensors = layout.unpack_tensors(blob)           # views into blob, bit for bit what was packed
"""

from dataclasses import dataclass

import torch

from cache.codecs import Payload, payload_tensors

_ALIGN = 8  # bytes: every tensor of a blob starts at a multiple of this


@dataclass(frozen=True)
class _Part:
    """Where one tensor of a block lives inside the blob."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class BlockLayout:
    """The byte layout of blocks: K's tensors then V's (payload_tensors' order), raw, each 8-byte aligned."""

    key_parts: tuple[_Part, ...]
    value_parts: tuple[_Part, ...]
    nbytes: int

    @staticmethod
    def of(k: Payload, v: Payload) -> "BlockLayout":
        """The layout of blocks shaped like the payloads k and v."""
        offset, parts = 0, []
        for p in (k, v):
            mine = []
            for t in payload_tensors(p):
                n = t.numel() * t.element_size()
                mine.append(_Part(offset, n, t.dtype, tuple(t.shape)))
                offset += -(-n // _ALIGN) * _ALIGN  # the next tensor starts aligned, so views of any dtype work
            parts.append(tuple(mine))
        return BlockLayout(parts[0], parts[1], offset)

    def pack_tensors(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """K's tensors then V's, as payload_tensors lists them -> (nbytes,) uint8 blob on their device."""
        for t, part in zip(tensors, self.key_parts + self.value_parts):
            if tuple(t.shape) != part.shape or t.dtype != part.dtype:
                raise ValueError(f"block tensor {t.dtype}{tuple(t.shape)} does not match the layer's block layout "
                                 f"{part.dtype}{part.shape}; every block of a layer must hold the same shapes")
        blob = torch.zeros(self.nbytes, dtype=torch.uint8, device=tensors[0].device)  # (nbytes,), padding zeroed
        for t, part in zip(tensors, self.key_parts + self.value_parts):
            blob[part.offset : part.offset + part.nbytes] = t.contiguous().view(-1).view(torch.uint8)  # raw bytes
        return blob

    def unpack_tensors(self, blob: torch.Tensor) -> list[torch.Tensor]:
        """(nbytes,) uint8 blob -> views of K's tensors then V's, in pack_tensors' order."""
        if blob.dtype != torch.uint8 or blob.numel() != self.nbytes:
            raise ValueError(f"blob of {blob.numel()} {blob.dtype} does not match the block layout's "
                             f"{self.nbytes} uint8 bytes")
        return [blob[p.offset : p.offset + p.nbytes].view(p.dtype).view(p.shape)
                for p in self.key_parts + self.value_parts]
