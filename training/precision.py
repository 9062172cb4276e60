"""Training precision: bfloat16 autocast where the hardware multiplies in bf16 natively, float32 elsewhere.

Under autocast the matrix products run in bfloat16 while the master weights, the gradients' accumulation and the
optimizer state stay float32 (PyTorch casts each product's inputs, not the parameters). bf16 keeps float32's
exponent range, so unlike float16 it needs no loss scaling. It pays only where the hardware has bf16 dot
products: CUDA GPUs, and CPUs that report AVX512_BF16 or AMX (this project's 2-core Zen 4 does: about twice
float32's training tokens/s, `python -m bench.train_throughput`). Elsewhere bf16 is emulated and slower, so
`train.dtype=auto` (the default) picks float32 there.
"""

from contextlib import AbstractContextManager
from pathlib import Path

import torch

DTYPES = ("auto", "bfloat16", "float32")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16(device: torch.device) -> bool:
    """True where `device` computes bf16 products natively: a CUDA GPU that supports bf16, or a CPU whose
    /proc/cpuinfo flags include AVX512_BF16 or AMX (False where that file does not exist)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.is_file() else []
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def resolve_dtype(name: str, device: torch.device) -> str:
    """The dtype train.dtype=`name` means on `device`: auto -> bfloat16 where native_bf16, else float32.
    Raises ValueError for a name not in DTYPES."""
    if name not in DTYPES:
        raise ValueError(f"train.dtype={name!r} is not supported; choose one of {', '.join(DTYPES)}")
    if name == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    return name


def autocast(dtype: str, device: torch.device) -> AbstractContextManager:
    """The context the forward (and loss) runs in: bf16 autocast for dtype bfloat16, a no-op for float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
