"""Keep freed memory in the process, so that a training step or a prefill does not fault its large tensors in afresh
every time (train.py and infer.py call it first, before the first large tensor).

glibc's malloc serves an allocation of more than 32 MiB at most (its largest mmap threshold) with a fresh mmap, and
gives it back to the OS with munmap when it is freed. A training step of the default model makes several such
tensors -- the logits and their gradients are 16 x 256 x 4096 floats, 64 MiB each -- and frees them before the next
step, so every step maps them again and the kernel zero-fills them page by page: `/usr/bin/time -v python train.py`
counted 60 million minor page faults in a 600-step run. Two settings stop that:

    M_MMAP_MAX = 0             large blocks come from the heap, like small ones, and are reused from its free lists
    M_TRIM_THRESHOLD = 2 GiB   the heap's free top goes back to the OS only past 2 GiB (mallopt's largest value)

Measured on the 2-core development machine (`python -m bench.train_throughput --allocator --rounds 4`, 30-step
runs of `python train.py` alternating with keep_freed_memory=false): 1.23x the training tokens/s and 13.7x fewer
minor page faults, the same losses (only where the bytes live changes). The price is memory: freed blocks wait in
the heap instead of being unmapped, and a heap can fragment. Peak memory was 1.09-1.12 GiB in three runs of four
(1.02-1.03 without), 2.16 GiB in the fourth, whose heap grew around blocks it could not reuse. The whole default
run, `/usr/bin/time -v python train.py`: 3 min 27 s, 0.58 million faults, 2.4 GB at its peak (5 min 54 s, 60 million
and 1.1 GB before). keep_freed_memory=false in train.py's config turns it off.

Serving has the same pattern at a smaller scale: each prefill makes activations of a few MiB (a 1,024-token prompt's
MLP is 1,024 x 2,048 floats), which a mmap threshold raised by the first frees serves from the heap, but the heap's
top is trimmed back to the OS and faulted in again. The serving engine on the serving issue's workload (the engine
side of python -m bench.serving with 64 requests, prompts of 512-1,024 tokens, run alone in a process) took
250,000-310,000 minor faults without these settings and 10,000-61,000 with them, and 13.7-14.3 s instead of
14.1-15.1 s (two runs each, alternating, 2-core Xeon). Not every program gains: transformers' `generate` on the same
workload, whose cache grows by a new concatenated tensor every step, took 41.8-42.2 s with them and 36.5-38.1 s
without. `python -m bench.serving --requests 64 --prompts 512 1024 --new 128 256`, with and without
--keep-freed-memory, shows both sides either way. keep_freed_memory=false in infer.py's config turns it off there.
"""

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameter numbers in glibc's malloc.h


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve large blocks from its heap and keep freed memory for reuse. Returns True when it
    took effect, False where malloc is not glibc's (macOS, Windows, musl): then nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
