"""Decode attention on the CPU over a quantized KV cache's stored bytes: the CPU sibling of triton_decode.py.

Where it sits: at a decode step (LayerCache.attend in cache/base.py, the kernel chosen by cache/kernels/choose.py
when the cache is built), a contiguous cache hands `cpu_decode_segments` its segments as held -- packed uint8 codes
plus float16 scale/zero (cache/quant.py), and KIVI's float32 residual -- and a block pool hands
`cpu_decode_paged` its blocks and block tables (cache/blocks.py), instead of decoding the whole cache into float32
and running SDPA over it. With `weights=True` both also return the softmax weights (H2O and SnapKV read them). The kernel (cache/kernels/cpu_decode.c,
plain C + OpenMP) dequantizes a block of rows at a time into a scratch that stays in L1; its opening comment explains
the algorithm.

Building: toymodel/kernels/native.py compiles the C file at first use (about 3 s) with the system C compiler and
caches the library in the user cache dir; later processes just load it. `cpu_decode_available()` returns why the
kernel cannot run (no compiler, a failed compile and its messages), so that the cache can fall back to
decode-then-SDPA.
The kernel shares torch's OpenMP thread pool (native.py says how) and runs on torch.get_num_threads() threads.

Caution / Differences (from triton_decode):
- Per-token groups must hold a whole number of bytes, i.e. G a multiple of 8 // bits (G >= 2 for int4, G >= 4 for
  int2); groups of fewer than 4 * (8 // bits) channels run correct but slow code. Queries and full-precision
  segments must be float32.
- Work is split over (batch, KV head) pairs only, not over keys (flash-decoding's splits): with fewer pairs than
  threads, some threads idle.
- Two passes (scores, then values) over a per-thread M x Tk scratch instead of an online softmax; exp is a
  vectorizable polynomial (relative error < 1e-7).
- Payloads may be views with any batch and head strides as long as rows are contiguous (a cache's capacity
  buffers `buf[:, :, :n]`): they are read in place. Other layouts are copied once per call.
"""

import ctypes
import functools
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from toymodel.kernels.native import BASE_FLAGS, X86, cpuinfo, load_library, unavailable_reason

if TYPE_CHECKING:  # the quantized payloads come from the cache package; we only read their fields
    from cache.quant import QuantTensor

SOURCE = Path(__file__).with_name("cpu_decode.c")
# The vector width on x86-64, by vendor (what gcc 12's code did on the two kinds of development machine, 2 cores
# each; AVX2-only machines run 256-bit code either way):
#   - AMD (Zen 4, whose cores split a 512-bit operation in two): 512-bit code was 20-40% slower for int2 (G=32) and
#     int8, about even for int4, so 256;
#   - Intel (a Xeon with AVX-512): 512-bit code was faster for float32 (1.14-1.17x), int4 (1.33x), KIVI-4 (1.15x)
#     and int8 (1.02-1.06x), slower for int2 (0.88-0.92x), so 512 (B=8 at 2,048 tokens and B=48 at 1,024, 2
#     threads, the two builds alternating in one process).
# KVLAB_DECODE_WIDTH=256 or 512 overrides the choice: `KVLAB_DECODE_WIDTH=256 python -m bench.decode_kernel`, then
# 512, compares the two on a machine.
WIDTH = int(os.environ.get("KVLAB_DECODE_WIDTH", 512 if cpuinfo("vendor_id") == "GenuineIntel" else 256))
if WIDTH not in (256, 512):
    raise ValueError(f"KVLAB_DECODE_WIDTH={WIDTH}: the decode kernel's vector width is 256 or 512 bits")
FLAGS = BASE_FLAGS + ((f"-mprefer-vector-width={WIDTH}",) if X86 else ())


# ----------------------------------------------------------------------------------------------------------------
# Building and loading the library
# ----------------------------------------------------------------------------------------------------------------
class Payload(ctypes.Structure):
    """Mirror of `Payload` in cpu_decode.c: one K or V of one segment. Payload, Segment, Paged and `payload()`
    are public: cache/kernels/cpu_block.py hands the same description of a block pool to the kernel it calls."""

    _fields_ = [("data", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p),
                ("data_sb", ctypes.c_int64), ("data_sh", ctypes.c_int64),
                ("scale_sb", ctypes.c_int64), ("scale_sh", ctypes.c_int64),
                ("zero_sb", ctypes.c_int64), ("zero_sh", ctypes.c_int64),
                ("bits", ctypes.c_int32), ("group", ctypes.c_int32), ("per_channel", ctypes.c_int32)]


class Segment(ctypes.Structure):
    _fields_ = [("k", Payload), ("v", Payload), ("T", ctypes.c_int64)]


class Paged(ctypes.Structure):
    """Mirror of `Paged` in cpu_decode.c: the pool as one segment of block_tokens tokens, the block tables, and
    the optional tail after each head's blocks (KIVI's residual) with its lengths."""

    _fields_ = [("pool", ctypes.POINTER(Segment)), ("tables", ctypes.c_void_p), ("lengths", ctypes.c_void_p),
                ("max_blocks", ctypes.c_int64), ("tail", ctypes.POINTER(Segment)),
                ("tail_lengths", ctypes.c_void_p)]


@functools.cache
def library() -> ctypes.CDLL:
    """Compile cpu_decode.c once per machine (toymodel/kernels/native.py) and load it. Raises RuntimeError."""
    lib = load_library(SOURCE, FLAGS)
    lib.kvlab_cpu_decode.restype = ctypes.c_int
    lib.kvlab_cpu_decode.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(Segment), ctypes.c_int,
        ctypes.POINTER(Paged), ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_int]
    return lib


def cpu_decode_available() -> str | None:
    """None when the kernel can run here, else the reason (no C compiler, a failed compile with its messages)."""
    return unavailable_reason(library)


# ----------------------------------------------------------------------------------------------------------------
# Validating the payloads and describing them to C
# ----------------------------------------------------------------------------------------------------------------
def _rows(t: torch.Tensor, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, int, int]:
    """t (B, H_kv, rows, width) with contiguous rows, and its batch/head strides in elements. A view with other
    strides on dims 0 and 1 is kept as is (no copy of the cache per step); anything else is made contiguous."""
    if t.dtype != dtype or not t.is_cpu or t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D {dtype} CPU tensor, got {t.dim()}-D {t.dtype} on {t.device}")
    _, _, rows, width = t.shape
    stride = t.stride()
    if (width > 1 and stride[3] != 1) or (rows > 1 and stride[2] != width):
        t = t.contiguous()
        stride = t.stride()
    return t, stride[0], stride[1]


def payload(x: "torch.Tensor | QuantTensor", name: str, keep: list) -> tuple[Payload, tuple]:
    """The C description of a K or V payload and its logical (B, H_kv, T, D); `keep` holds what C will read."""
    if isinstance(x, torch.Tensor):
        data, sb, sh = _rows(x, name, torch.float32)
        keep.append(data)
        return Payload(data.data_ptr(), None, None, sb, sh, 0, 0, 0, 0, 0, 1, 0), tuple(x.shape)
    bits, G, axis = x.bits, x.group_size, x.axis
    if bits not in (2, 4, 8) or axis not in ("token", "channel"):
        raise ValueError(f"{name}: unsupported quantized payload bits={bits}, axis={axis!r}; use bits 2/4/8")
    codes, csb, csh = _rows(x.codes, f"{name}.codes", torch.uint8)
    B, H_kv, T, D = x.shape
    want = (B, H_kv, T, D // G) if axis == "token" else (B, H_kv, T // G, D)
    n = D if axis == "token" else T
    if G <= 0 or n % G or (axis == "token" and G % (8 // bits)):
        raise ValueError(f"{name}: group_size={G} must divide {'D' if axis == 'token' else 'T'}={n}"
                         + (f" and be a multiple of {8 // bits} (codes per byte)" if axis == "token" else ""))
    scale, ssb, ssh = _rows(x.scale, f"{name}.scale", torch.float16)
    zero, zsb, zsh = _rows(x.zero, f"{name}.zero", torch.float16)
    if tuple(scale.shape) != want or tuple(zero.shape) != want:
        raise ValueError(f"{name}: scale{tuple(scale.shape)} / zero{tuple(zero.shape)} should be {want} for "
                         f"axis={axis!r}, group_size={G}")
    keep += [codes, scale, zero]
    p = Payload(codes.data_ptr(), scale.data_ptr(), zero.data_ptr(), csb, csh, ssb, ssh, zsb, zsh,
                bits, G, int(axis == "channel"))
    return p, (B, H_kv, T, D)


# ----------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------
def cpu_decode_segments(q: torch.Tensor, segments: list[tuple], *, causal: bool = True,
                        scale: float | None = None, weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Attend q (B, H, Tq, D) over consecutive key segments [(k, v), ...], oldest first, each a float32 tensor or a
    QuantTensor of (B, H_kv, T_s, D): what a quantized layer cache holds (cache.storage.CodecStore.encoded).

    Equals reference_attend(q, cat_T(dequantize(k_s)), cat_T(dequantize(v_s)), causal=causal, scale=scale) up to
    float rounding, with bottom-right causal alignment. Returns (B, H, Tq, D) float32, and with `weights` also the
    softmax weights (B, H, Tq, Tk) float32 (what H2O and SnapKV read). Empty segments are skipped.
    Raises ValueError for inputs outside this contract and RuntimeError when the kernel cannot be built here.
    """
    if not isinstance(q, torch.Tensor) or q.dtype != torch.float32 or not q.is_cpu or q.dim() != 4:
        raise ValueError(f"q must be a 4-D float32 CPU tensor (B, H, Tq, D), got {getattr(q, 'dtype', type(q))} "
                         f"of shape {tuple(getattr(q, 'shape', ()))} on {getattr(q, 'device', '?')}")
    B, H, Tq, D = q.shape
    keep: list[torch.Tensor] = []  # every tensor C reads stays alive until the call returns
    described, H_kv = [], None
    for i, (k, v) in enumerate(segments):
        (pk, k_shape), (pv, v_shape) = payload(k, f"segment {i} k", keep), payload(v, f"segment {i} v", keep)
        H_kv = k_shape[1] if H_kv is None else H_kv
        if k_shape != v_shape or k_shape[0] != B or k_shape[1] != H_kv or k_shape[3] != D:
            raise ValueError(f"segment {i}: k{k_shape} / v{v_shape} do not match each other, q{tuple(q.shape)} "
                             f"or the n_kv_head={H_kv} of segment 0")
        if k_shape[2] > 0:  # an empty residual adds nothing
            described.append(Segment(pk, pv, k_shape[2]))
    if not described:
        raise ValueError("cpu_decode_segments needs at least one non-empty key segment")
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"n_head={H} is not a multiple of n_kv_head={H_kv}")
    Tk = sum(seg.T for seg in described)
    if Tq > Tk:
        raise ValueError(f"more queries than keys (Tq={Tq} > Tk={Tk}); the keys must include the queries' own tokens")

    lib = library()
    q = q.contiguous()  # (B, H, Tq, D): the M = G * Tq rows of KV head hk are contiguous
    out = torch.empty(B, H, Tq, D, dtype=torch.float32)
    seg_array = (Segment * len(described))(*described)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    w = torch.empty(B, H, Tq, Tk, dtype=torch.float32) if weights else None  # rows as out's
    rc = lib.kvlab_cpu_decode(q.data_ptr(), out.data_ptr(), None if w is None else w.data_ptr(), seg_array,
                              len(described), None, B, H_kv, (H // H_kv) * Tq, Tq, D, Tk, int(causal), scale,
                              torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"cpu_decode: could not allocate the per-thread score scratch ({(H // H_kv) * Tq} x {Tk})")
    return out if w is None else (out, w)  # rows g * Tq + i of KV head hk are query head hk * G + g


def cpu_decode_paged(q: torch.Tensor, k_pool: "torch.Tensor | QuantTensor", v_pool: "torch.Tensor | QuantTensor",
                     tables: torch.Tensor, lengths: torch.Tensor, tail: tuple | None = None, *, causal: bool = True,
                     scale: float | None = None, weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Attend q (B, H, Tq, D) over a paged cache where its blocks lie: K and V pools of (n_blocks, 1, block_tokens,
    D) blocks (float32, or QuantTensors of that shape: cache/blocks.py), `tables` (B, H_kv, max_blocks) int32 block
    ids and `lengths` (B, H_kv) int32 tokens of each (sequence, KV head), oldest first; entries past a row's blocks
    are never read. `tail` = (k, v, tail_lengths): tokens that follow each head's blocks, k and v (B, H_kv, R, D)
    float32 of which head (b, h) holds tail_lengths[b, h] (KIVI's full-precision residual, cache/residual.py).

    Equals reference attention over each (sequence, KV head)'s gathered tokens, with bottom-right causal alignment
    per row (a head with fewer keys than queries gets zeros). Returns (B, H, Tq, D) float32, and with `weights` also
    the softmax weights (B, H, Tq, max length) float32, zero past each head's length.
    Raises ValueError for inputs outside this contract and RuntimeError when the kernel cannot be built here.
    """
    if not isinstance(q, torch.Tensor) or q.dtype != torch.float32 or not q.is_cpu or q.dim() != 4:
        raise ValueError(f"q must be a 4-D float32 CPU tensor (B, H, Tq, D), got {getattr(q, 'dtype', type(q))} "
                         f"of shape {tuple(getattr(q, 'shape', ()))} on {getattr(q, 'device', '?')}")
    B, H, Tq, D = q.shape
    keep: list[torch.Tensor] = []
    for name, pool in (("k_pool", k_pool), ("v_pool", v_pool)):  # consecutive blocks are read as one run of rows
        parts = [pool] if isinstance(pool, torch.Tensor) else [pool.codes, pool.scale, pool.zero]
        if not all(t.is_contiguous() for t in parts):
            raise ValueError(f"{name} must be contiguous: the kernel reads blocks with consecutive ids as one run")
    pk, k_shape = payload(k_pool, "k_pool", keep)  # (n_blocks, 1, block_tokens, D): a block id is a batch index
    pv, v_shape = payload(v_pool, "v_pool", keep)
    _, one, block_tokens, Dk = k_shape
    if k_shape != v_shape or Dk != D or one != 1:
        raise ValueError(f"k_pool{k_shape} / v_pool{v_shape} must both be (n_blocks, 1, block_tokens, D={D})")
    if tables.dim() != 3 or tables.shape[0] != B or lengths.shape != tables.shape[:2]:
        raise ValueError(f"tables must be (B={B}, H_kv, max_blocks) and lengths (B, H_kv), got "
                         f"{tuple(tables.shape)} and {tuple(lengths.shape)}")
    H_kv = tables.shape[1]
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"n_head={H} is not a multiple of n_kv_head={H_kv}")
    tables = tables.to(torch.int32).contiguous()
    lengths = lengths.to(torch.int32).contiguous()
    if int(lengths.max()) > tables.shape[2] * block_tokens:
        raise ValueError(f"a length of {int(lengths.max())} tokens needs more than the {tables.shape[2]} blocks of "
                         f"{block_tokens} tokens a table row holds")
    total = lengths
    tail_segment, tail_lengths = None, None
    if tail is not None:
        k_tail, v_tail, tail_lengths = tail
        if not (isinstance(k_tail, torch.Tensor) and isinstance(v_tail, torch.Tensor)):
            raise ValueError("the tail's k and v must be float32 tensors (a full-precision residual)")
        (tk, tk_shape), (tv, tv_shape) = payload(k_tail, "tail k", keep), payload(v_tail, "tail v", keep)
        if tk_shape != tv_shape or tk_shape[:2] != (B, H_kv) or tk_shape[3] != D:
            raise ValueError(f"the tail's k{tk_shape} / v{tv_shape} must both be float32 (B={B}, H_kv={H_kv}, R, "
                             f"D={D})")
        tail_lengths = tail_lengths.to(torch.int32).contiguous()
        if tail_lengths.shape != lengths.shape or int(tail_lengths.max()) > tk_shape[2]:
            raise ValueError(f"tail_lengths {tuple(tail_lengths.shape)} must be (B, H_kv) counts of at most the "
                             f"tail's {tk_shape[2]} tokens")
        tail_segment = ctypes.pointer(Segment(tk, tv, tk_shape[2]))
        total = lengths + tail_lengths
    lib = library()
    q = q.contiguous()
    out = torch.empty(B, H, Tq, D, dtype=torch.float32)
    pool = Segment(pk, pv, block_tokens)
    paged = Paged(ctypes.pointer(pool), tables.data_ptr(), lengths.data_ptr(), tables.shape[2], tail_segment,
                  None if tail_lengths is None else tail_lengths.data_ptr())
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    max_Tk = max(int(total.max()), 1)
    w = torch.empty(B, H, Tq, max_Tk, dtype=torch.float32) if weights else None
    rc = lib.kvlab_cpu_decode(q.data_ptr(), out.data_ptr(), None if w is None else w.data_ptr(), None, 0,
                              ctypes.byref(paged), B, H_kv, (H // H_kv) * Tq, Tq, D, max_Tk, int(causal), scale,
                              torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"cpu_decode: could not allocate the per-thread score scratch ({(H // H_kv) * Tq} x "
                          f"{max_Tk})")
    return out if w is None else (out, w)

