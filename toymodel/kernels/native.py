"""Building kvlab's small C kernels at first use: one compile per machine, then a load from the user cache dir.

Four kernels are plain C (+ OpenMP) called through ctypes: the decode attention over quantized caches
(cache/kernels/cpu_decode.c), the few-row matrix product that decoding is made of (toymodel/kernels/cpu_matmul.c),
the RMSNorm of inference (toymodel/kernels/cpu_norm.c) and the quantizer of new tokens (cache/kernels/quant_cpu.c).
None needs torch's headers or a build step at install time: `load_library(source, flags)` runs the system C
compiler, `$CC` or `cc`, and writes the library into $XDG_CACHE_HOME/kvlab or ~/.cache/kvlab under a name that
hashes the source, the flags and the CPU's features, so that later processes only load it (a few milliseconds).

OpenMP runtime: torch ships torch/lib/libgomp.so.1 and has loaded it by the time we dlopen a library that needs
libgomp.so.1 too; the dynamic linker reuses the library already loaded under that soname instead of the system's
(checked in /proc/self/maps: after a call, only torch's libgomp is mapped). So the kernels and torch share one
OpenMP runtime and thread pool; the kernels are handed torch.get_num_threads() on every call.
"""

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import torch  # noqa: F401  imported before any library is loaded, so that torch's libgomp.so.1 is the one bound

BASE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
X86 = platform.machine() in ("x86_64", "AMD64")


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "kvlab"


def cpuinfo(field: str) -> str | None:
    """The value of the first `field` line of /proc/cpuinfo (Linux), e.g. cpuinfo("vendor_id") == "GenuineIntel"
    (the decode attention kernel picks its vector width by it: cache/kernels/cpu_decode.py); None where there is
    none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(field)), None)
    except OSError:
        return None


def _cpu_id() -> str:
    """-march=native code runs only on CPUs with the same features: a shared home directory must not mix them."""
    return cpuinfo("flags") or os.uname().machine


def load_library(source: Path, flags: tuple[str, ...]) -> ctypes.CDLL:
    """Compile `source` with `flags` once per (source, flags, CPU) into cache_dir() and load it.

    Raises:
        RuntimeError: no C compiler, or the compile failed (the message carries the compiler's output).
    """
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        raise RuntimeError("no C compiler found (looked for $CC or `cc` on PATH); install gcc >= 12 or clang >= 15")
    text = source.read_bytes()
    for header in re.findall(rb'#include "([^"]+)"', text):  # local headers: a change to one recompiles too
        text += (source.parent / header.decode()).read_bytes()
    key = hashlib.sha256(text + " ".join(flags).encode() + _cpu_id().encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{source.stem}-", suffix=".so")
        os.close(fd)
        try:
            done = subprocess.run([cc, *flags, str(source), "-o", tmp], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"compiling {source.name} with `{cc} {' '.join(flags)}` failed:\n{done.stderr}")
            os.replace(tmp, target)  # atomic: a process racing us loads either its own copy or ours, never half
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(target))


def unavailable_reason(load: Callable[[], ctypes.CDLL]) -> str | None:
    """None when load() -- a cached load_library plus the kernel's signatures -- succeeds, else why it failed (no
    compiler, a failed compile with its messages): what the kernels' *_available() functions report."""
    try:
        load()
    except (RuntimeError, OSError) as e:
        return str(e)
    return None
