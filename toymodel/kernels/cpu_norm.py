"""The RMSNorm of inference on the CPU in one call: toymodel/kernels/cpu_norm.c.

Where it sits: `pack_for_decode(model)` (toymodel/decode_layout.py) swaps each RMSNorm's `normalize` (the model's
`rms_norm`, six PyTorch operations) for `norm_for(device, dtype)`: on a CPU in float32 that is `fast_rms_norm`,
the C kernel wherever no gradient is tracked (decode steps and prefills alike). A decode step runs 13 norms in the
bench model, and each PyTorch operation of a norm costs a dispatch and a fresh tensor; one call instead made a
decode step of the bench model 1.09-1.14x as fast on the 2-core Xeon (batch 1: 3.89 to 3.40 ms on two threads;
batch 8: 8.34 to 7.65 ms; one thread alike; medians of 11 rounds of 100 steps after a 512-token prompt, switching
`normalize` between the two in one process). `python -m bench.decode --sections hf --compare-layouts` times the
layout with PyTorch's norm (ours_torch_norm) beside ours. The kernel is built at first use by
toymodel/kernels/native.py; `cpu_norm_available()` says why it cannot be (then the model warns and keeps
`rms_norm`).

Caution / Differences (from toymodel.model.rms_norm):
- float32 on the CPU only; x is made contiguous; the gain `weight` must be contiguous (D,).
- The sum of squares runs in a different order, so results differ in the last bits (relative ~1e-7); the same on
  every call, on one thread.
"""

import ctypes
import functools
import warnings
from pathlib import Path
from typing import Callable

import torch

from toymodel.kernels.native import BASE_FLAGS, load_library, unavailable_reason
from toymodel.model import rms_norm

SOURCE = Path(__file__).with_name("cpu_norm.c")
Norm = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (x (..., D), weight (D,), eps) -> (..., D)


@functools.cache
def library() -> ctypes.CDLL:
    """Compile cpu_norm.c once per machine (toymodel/kernels/native.py) and load it. Raises RuntimeError."""
    lib = load_library(SOURCE, BASE_FLAGS)
    lib.kvlab_cpu_rms_norm.restype = None
    lib.kvlab_cpu_rms_norm.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                       ctypes.c_int64, ctypes.c_float]
    return lib


def cpu_norm_available() -> str | None:
    """None when the kernel can run here, else the reason (no C compiler, a failed compile with its messages)."""
    return unavailable_reason(library)


def cpu_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm(x, weight, eps) by the C kernel: x (..., D) and weight (D,) float32 CPU tensors.

    Raises:
        ValueError: a dtype, device, layout or shape outside that contract.
    """
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or not (x.is_cpu and weight.is_cpu):
        raise ValueError(f"cpu_rms_norm takes float32 CPU tensors, got x {x.dtype} on {x.device}, "
                         f"weight {weight.dtype} on {weight.device}")
    if weight.shape != x.shape[-1:] or not weight.is_contiguous():
        raise ValueError(f"cpu_rms_norm needs a contiguous weight of shape ({x.shape[-1]},) for x{tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}{'' if weight.is_contiguous() else ' (not contiguous)'}")
    x = x.contiguous()
    y = torch.empty_like(x)
    D = x.shape[-1]
    if x.numel():
        library().kvlab_cpu_rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // D, D, eps)
    return y


def fast_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The C kernel where no gradient is tracked (inference), else rms_norm."""
    if (x.requires_grad or weight.requires_grad) and torch.is_grad_enabled():
        return rms_norm(x, weight, eps)
    return cpu_rms_norm(x, weight, eps)


def norm_for(device: torch.device, dtype: torch.dtype) -> Norm:
    """The RMSNorm a model packed for decoding on (device, dtype) should use: fast_rms_norm on a CPU in float32
    when the kernel builds here (else a warning that says why), rms_norm everywhere else."""
    if device.type != "cpu" or dtype != torch.float32:
        return rms_norm
    reason = cpu_norm_available()  # compiles toymodel/kernels/cpu_norm.c once per machine (about a second)
    if reason is not None:
        warnings.warn(f"RMSNorm runs as PyTorch operations (slower): {reason}", stacklevel=3)
        return rms_norm
    return fast_rms_norm
