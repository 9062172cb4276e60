"""quantize_per_token for float32 CPU tensors in one C call: the same bytes as cache/quant.py, without its per-op cost.

Where it sits: GroupQuant.encode (cache/codecs.py) quantizes through `quantize_per_token` here. A decode step
encodes one token per sequence and KV head, where the reference's ~25 small tensor ops cost about 90 us per K or
V and the C loop (cache/kernels/quant_cpu.c, built at first use by toymodel/kernels/native.py) about a
microsecond. Anything else -- another device or dtype, no C compiler -- goes to the reference, which stays the
specification: the tests check that both give identical codes, scales and zeros.
"""

import ctypes
import functools
from pathlib import Path

import torch

from cache import quant
from cache.quant import QuantTensor
from toymodel.kernels.native import BASE_FLAGS, load_library, unavailable_reason

SOURCE = Path(__file__).with_name("quant_cpu.c")


@functools.cache
def library() -> ctypes.CDLL:
    """Compile quant_cpu.c once per machine (toymodel/kernels/native.py) and load it. Raises RuntimeError."""
    lib = load_library(SOURCE, BASE_FLAGS)
    lib.kvlab_quantize_per_token.restype = None
    lib.kvlab_quantize_per_token.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] + [ctypes.c_int] * 3
    return lib


def quantize_per_token(x: torch.Tensor, bits: int, group_size: int) -> QuantTensor:
    """cache.quant.quantize_per_token(x, bits, group_size), bit for bit; by the C loop for a float32 CPU x.

    x: (B, H_kv, T, D). Raises ValueError as the reference does (bits not 2/4/8, a group_size that does not divide D,
    a D that does not fill whole bytes).
    """
    if not (x.is_cpu and x.dtype == torch.float32) or unavailable_reason(library) is not None:
        return quant.quantize_per_token(x, bits, group_size)  # the reference does the work
    quant.check_input(x, bits, group_size, "token")
    B, H_kv, T, D = x.shape
    quant.check_packable(D, bits)
    x = x.contiguous()
    codes = torch.empty(B, H_kv, T, D * bits // 8, dtype=torch.uint8)
    scale = torch.empty(B, H_kv, T, D // group_size, dtype=torch.float16)
    zero = torch.empty_like(scale)
    rows = B * H_kv * T
    library().kvlab_quantize_per_token(x.data_ptr(), codes.data_ptr(), scale.data_ptr(), zero.data_ptr(), rows, D,
                                       group_size, bits)
    return QuantTensor(codes, scale, zero, bits, group_size, "token")
