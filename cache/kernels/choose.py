"""Which kernel attends a decode step over what a cache keeps, decided once when the cache is built.

A decode step (one query per sequence) over a cache can attend straight over the K and V as the cache holds them:
a quantized cache's codes, scales and zeros, dequantized a few rows at a time instead of decoding a float32 copy of
the whole cache first, and a full-precision cache's buffer read in place:

    backend=sdpa on the CPU, float32      the C kernel (cache/kernels/cpu_decode.py), compiled at first use
    backend=triton on a GPU               Triton's split-K flash-decoding (cache/kernels/triton_decode.py)
    backend=triton under TRITON_INTERPRET the same kernels, interpreted on the CPU (float32, float16)
    anything else                         none: the cache decodes, then attends with the backend (the reference)

On the CPU the C kernel also beats SDPA over float32 (1.06-1.45x a whole decode step of the bench model, batch 1 to
8, 512 to 2,048 tokens), and its result does not depend on the thread count, while SDPA's does in the last bits at
one query per sequence: the thread policy (toymodel/threads.py) changes the count mid-generation.

Every kernel has the signature `kernel(q, segments, *, causal) -> out`, q (B, H, Tq, D), segments the stored
tokens oldest first as [(K payload, V payload), ...] (cache.storage.CodecStore.encoded); a paged kernel
(`paged_kernel`) reads a block pool instead, `kernel(q, k_pool, v_pool, tables, lengths[, tail], *, causal)`. The C
kernels also take `weights=True` and return the softmax weights beside the output (`gives_weights`).
"""

import warnings
from typing import Callable

import torch

DecodeKernel = Callable[..., torch.Tensor]  # (q, [(K, V)] or (k_pool, v_pool, tables, lengths[, tail]), ...) -> out


def _triton_serves(device: torch.device, dtype: torch.dtype) -> bool:
    from toymodel.kernels.triton_attn import check_triton_available, is_interpreting

    check_triton_available()
    if is_interpreting():  # numpy on the CPU, where bf16 dots are wrong (cache/kernels/triton_decode.py)
        return device.type == "cpu" and dtype in (torch.float32, torch.float16)
    return device.type == "cuda" and dtype in (torch.float32, torch.float16, torch.bfloat16)


def _triton_kernel(device: torch.device, dtype: torch.dtype) -> DecodeKernel | None:
    from cache.kernels.triton_decode import triton_decode_segments

    return triton_decode_segments if _triton_serves(device, dtype) else None


def _triton_paged_kernel(device: torch.device, dtype: torch.dtype,
                         float32_or_codes: bool) -> Callable[..., torch.Tensor] | None:
    from cache.kernels.triton_decode import triton_decode_paged

    return triton_decode_paged if _triton_serves(device, dtype) else None  # it reads float16/bfloat16 blocks too


def _cpu_kernel(device: torch.device, dtype: torch.dtype) -> DecodeKernel | None:
    from cache.kernels.cpu_decode import cpu_decode_available, cpu_decode_segments

    if device.type != "cpu" or dtype != torch.float32:
        return None
    reason = cpu_decode_available()  # compiles cache/kernels/cpu_decode.c once per machine (a few seconds)
    if reason is not None:
        warnings.warn(f"decode steps attend with SDPA, quantized caches after decoding to float32 (slower): "
                      f"{reason}", stacklevel=3)
        return None
    return cpu_decode_segments


def _cpu_paged_kernel(device: torch.device, dtype: torch.dtype,
                      float32_or_codes: bool) -> Callable[..., torch.Tensor] | None:
    from cache.kernels.cpu_decode import cpu_decode_paged

    return cpu_decode_paged if float32_or_codes and _cpu_kernel(device, dtype) is not None else None


KERNELS: dict[str, Callable[[torch.device, torch.dtype], DecodeKernel | None]] = {
    "sdpa": _cpu_kernel,
    "triton": _triton_kernel,
    "reference": lambda device, dtype: None,
}


def decode_kernel(backend: str, device: torch.device | str, dtype: torch.dtype) -> DecodeKernel | None:
    """The kernel that attends over stored codes for a model on `backend`, with queries on `device` in `dtype`, or
    None where no kernel serves them. Raises ValueError for an unknown backend."""
    if backend not in KERNELS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {sorted(KERNELS)}")
    return KERNELS[backend](torch.device(device), dtype)


PAGED_KERNELS: dict[str, Callable[[torch.device, torch.dtype, bool], Callable[..., torch.Tensor] | None]] = {
    "sdpa": _cpu_paged_kernel,
    "triton": _triton_paged_kernel,
    "reference": lambda device, dtype, float32_or_codes: None,
}


def paged_kernel(backend: str, device: torch.device | str, dtype: torch.dtype,
                 float32_or_codes: bool = True) -> Callable[..., torch.Tensor] | None:
    """The kernel that attends a decode step over a block pool where its blocks lie, `kernel(q, k_pool, v_pool,
    tables, lengths[, tail]) -> out` (cpu_decode_paged, or triton_decode_paged on a GPU), or None where none
    serves. `float32_or_codes`: the pool holds float32 rows or packed codes (codecs.Codec.float32_or_codes), all
    the C kernel reads; Triton reads float16 and bfloat16 blocks too. Both read a `tail` of tokens past each head's
    blocks (KIVI's residual, cache/residual.py)."""
    if backend not in PAGED_KERNELS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {sorted(PAGED_KERNELS)}")
    return PAGED_KERNELS[backend](torch.device(device), dtype, float32_or_codes)


def gives_weights(kernel: Callable[..., torch.Tensor]) -> bool:
    """Whether `kernel(..., weights=True)` also returns the softmax weights (B, H, Tq, Tk), which H2O and SnapKV
    read: the C kernels do; Triton's flash-decoding never holds them."""
    from cache.kernels.cpu_decode import cpu_decode_paged, cpu_decode_segments

    return kernel in (cpu_decode_segments, cpu_decode_paged)
