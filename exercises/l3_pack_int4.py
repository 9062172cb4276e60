"""Lesson 3, exercise: pack 4-bit codes two per byte, and unpack them (about 20 minutes).

A 4-bit cache is only 4 bits per element if two codes really share a byte. cache/quant.py's layout: channel 2j
goes in the low nibble of byte j, channel 2j + 1 in the high nibble. Read docs/03_quantization.md first, then fill
in both functions and run `pytest exercises/test_l3_pack_int4.py`.
"""

import torch


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(..., D) integer codes in [0, 16), D even  ->  (..., D // 2) uint8, channel 2j in the low nibble of byte j."""
    raise NotImplementedError("write pack_int4(): two codes per byte, the even channel in the low nibble")


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse: (..., D // 2) uint8  ->  (..., D) uint8 codes in [0, 16)."""
    raise NotImplementedError("write unpack_int4(): the low nibble is the even channel, the high one the odd")
