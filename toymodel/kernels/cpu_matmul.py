"""The few-row matrix products of a decode step, on the CPU, with the same bytes on any number of threads.

Where it sits: `pack_for_decode(model)` (toymodel/decode_layout.py) stores every weight transposed, (d_in, d_out)
row-major, and picks `matmul_for(device, dtype)` to multiply by them. On a CPU in float32 that is `decode_matmul`:
products of at most MAX_ROWS rows -- a decode step, one row per sequence -- go to the C kernel of
toymodel/kernels/cpu_matmul.c, whose opening comment says why it exists (the BLAS's sums change with the thread
count) and how it tiles the work. Larger products (prefill, the output head of a big batch) go to oneDNN's
(`onednn_matmul`), and anything that needs autograd stays with `x @ w_t`.
The kernel is built at first use by toymodel/kernels/native.py; `cpu_matmul_available()` says why it cannot be (then
the model warns and keeps torch.matmul).

Caution / Differences (from torch.matmul):
- float32 on the CPU only, w_t contiguous (K, N); x is made contiguous.
- Sums run in a different order than the BLAS's, so results differ in the last bits (relative ~1e-7). They are
  the same on every call and for every torch.get_num_threads(): threads split the output columns, never a sum.

Why oneDNN past MAX_ROWS: torch's BLAS on x86 is MKL, which takes its AVX2 code on AMD processors; oneDNN (in every
x86 and ARM build of torch, as `mkldnn`) takes AVX-512 wherever the processor has it. On one core of a Zen 5 EPYC,
products of the bench model's shapes at 768 rows ran at 105-114 GFLOP/s in MKL and 250-266 in oneDNN; `python -m
bench.matmul --rows 16 64 768` measures the three products on any machine (bench/results/matmul_zen5*.json).
"""

import ctypes
import functools
import warnings
from pathlib import Path
from typing import Callable

import torch

from toymodel.kernels.native import BASE_FLAGS, X86, load_library, unavailable_reason

SOURCE = Path(__file__).with_name("cpu_matmul.c")
FLAGS = BASE_FLAGS + (("-mprefer-vector-width=512",) if X86 else ())  # gcc prefers 256-bit; 512 streams faster here
Matmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (..., K), w_t (K, N)) -> (..., N)
# Up to here the C kernel, whose bytes never depend on the thread count (the BLAS's do at one row and from 32 rows
# on); past it oneDNN's product (prefill; at 32-64 rows the kernel took 0.93-1.00x the BLAS's time on an Intel Xeon:
# python -m bench.matmul)
MAX_ROWS = 16
ONEDNN = torch.backends.mkldnn.is_available()  # torch built with oneDNN (every x86 and ARM wheel)


@functools.cache
def library() -> ctypes.CDLL:
    """Compile cpu_matmul.c once per machine (toymodel/kernels/native.py) and load it. Raises RuntimeError."""
    lib = load_library(SOURCE, FLAGS)
    lib.kvlab_cpu_matmul.restype = None
    lib.kvlab_cpu_matmul.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                     ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    return lib


def cpu_matmul_available() -> str | None:
    """None when the kernel can run here, else the reason (no C compiler, a failed compile with its messages)."""
    return unavailable_reason(library)


def cpu_matmul(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w_t (K, N) -> (..., N) by the C kernel; float32 CPU tensors, w_t contiguous.

    Raises:
        ValueError: a dtype, device, layout or shape outside that contract.
    """
    if x.dtype != torch.float32 or w_t.dtype != torch.float32 or not (x.is_cpu and w_t.is_cpu):
        raise ValueError(f"cpu_matmul takes float32 CPU tensors, got x {x.dtype} on {x.device}, "
                         f"w_t {w_t.dtype} on {w_t.device}")
    if w_t.dim() != 2 or not w_t.is_contiguous() or x.shape[-1] != w_t.shape[0]:
        raise ValueError(f"cpu_matmul needs w_t (K, N) contiguous with K = x.shape[-1]; got x{tuple(x.shape)}, "
                         f"w_t{tuple(w_t.shape)}{'' if w_t.is_contiguous() else ' (not contiguous)'}")
    K, N = w_t.shape
    x = x.contiguous()
    M = x.numel() // K if K else 0
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)  # (..., N)
    if M == 0 or N == 0:
        return y.zero_()
    library().kvlab_cpu_matmul(x.data_ptr(), w_t.data_ptr(), y.data_ptr(), M, K, N, torch.get_num_threads())
    return y


def onednn_matmul(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w_t (K, N) by oneDNN's linear (float32 CPU tensors, no autograd), which reads w_t's transpose
    (N, K) where it lies; torch's BLAS where torch was built without oneDNN."""
    if not ONEDNN:
        return x @ w_t
    return torch.ops.mkldnn._linear_pointwise(x, w_t.t(), None, "none", [], "")


def decode_matmul(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w_t (K, N): the C kernel for at most MAX_ROWS rows of x (a decode step), else oneDNN's product
    (a prefill), or torch's where autograd needs it."""
    if x.requires_grad:
        return x @ w_t
    if x.numel() > MAX_ROWS * x.shape[-1]:
        return onednn_matmul(x, w_t)
    return cpu_matmul(x, w_t)


def matmul_for(device: torch.device, dtype: torch.dtype) -> Matmul:
    """The product a model packed for decoding on (device, dtype) should use: decode_matmul on a CPU in float32
    when the kernel builds here (else a warning that says why), torch.matmul everywhere else."""
    if device.type != "cpu" or dtype != torch.float32:
        return torch.matmul
    reason = cpu_matmul_available()  # compiles toymodel/kernels/cpu_matmul.c once per machine (a few seconds)
    if reason is not None:
        warnings.warn(f"decode steps multiply by the weights with torch.matmul (slower): {reason}", stacklevel=3)
        return torch.matmul
    return decode_matmul
