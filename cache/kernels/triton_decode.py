"""Flash-decoding in Triton: one (or a few) new query tokens against a long KV cache, split along the keys.

Where it sits: at decode time the model attends a handful of queries over everything its layer cache returns.
`triton_attend` (toymodel/kernels/triton_attn.py) parallelises over query blocks x heads: with Tq = 1 that is only B * H
programs, far too few to fill a GPU, and each walks the whole cache alone. Flash-decoding (Dao et al., 2023)
parallelises over the *keys* instead:

    1. split the Tk keys into S splits; one program per (split, batch, KV head) runs the online softmax of
       triton_attn over its split only and writes a partial output o_s (normalised) and its log-sum-exp lse_s;
    2. combine:  lse = log2 sum_s 2^lse_s,   out = sum_s 2^(lse_s - lse) * o_s.

The combination is exact: each split's softmax is re-weighted by its share of the total mass. A split in which a
query sees no key (possible under the causal mask when Tq > 1) reports lse_s = -inf and weighs nothing.

GQA in decode: the G = H // H_kv query heads of a KV head, times the Tq queries, form the G * Tq rows of ONE tile,
so each K/V block is read once for the whole group (MQA decode reads the cache once, not H times).

Quantized caches: the program loads the packed uint8 codes plus float16 scale/zero of a block and dequantizes in
registers, x_hat = code * scale + zero (the byte layout of cache/quant.py). The cache crosses HBM at 4 or 2 bits
per element instead of 16, and decode is memory-bound, so fewer bytes is less time. KIVI stores keys per channel
(scale/zero shared by G tokens of one channel) and values per token, plus a full-precision residual of the most
recent tokens: that residual is simply one more segment of splits, merged by the same log-sum-exp (in a block
pool, each head's tail: its keys follow the head's blocks in the same splits).

Caution / Differences:
- The combination step runs in PyTorch (a few small kernels), not in a second Triton kernel as in the paper.
- Every key block is masked (no unmasked fast path): decode is bound by memory traffic, not by the mask.
- K/V payloads are made contiguous (a no-op for cache buffers); query rows per KV head G * Tq must be <= 128.
- fp16/bf16 queries multiply the dequantized tile in their own dtype on the tensor cores; fp32 uses tf32 on GPU.
  Under TRITON_INTERPRET=1, bf16 `tl.dot` is wrong in Triton 3.9 (triton-lang/triton#11584): use fp32/fp16.
- The default split size aims at ~2 programs per SM; it is a heuristic, not tuned.
"""

import math
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from toymodel.kernels.triton_attn import LOG2E, is_interpreting

if TYPE_CHECKING:  # the quantized payloads come from the cache package; we only read their fields
    from cache.quant import QuantTensor


# ----------------------------------------------------------------------------------------------------------------
# Loading one (BLOCK_N, D) tile of K or V: as-is, or dequantized from packed codes in registers
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(X, S, Z, offs_n, offs_d, mask_n,
               D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr):
    """X points at one (T, D) slice (BITS == 0) or its (T, D * BITS // 8) codes; S/Z at its scale/zero."""
    if BITS == 0:
        x = tl.load(X + offs_n[:, None] * D + offs_d[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
    else:
        PER_BYTE: tl.constexpr = 8 // BITS
        # -- every channel d reads the byte holding it (d // PER_BYTE) and shifts its bit field down --
        byte = tl.load(X + offs_n[:, None] * (D // PER_BYTE) + (offs_d // PER_BYTE)[None, :],
                       mask=mask_n[:, None], other=0)  # (BN, D) uint8, each byte read PER_BYTE times
        code = (byte.to(tl.int32) >> ((offs_d % PER_BYTE) * BITS)[None, :]) & ((1 << BITS) - 1)  # (BN, D)
        # -- the group's scale and zero: per token, G channels share one; per channel, G tokens share one --
        if PER_CHANNEL:
            sz = (offs_n // GROUP)[:, None] * D + offs_d[None, :]  # scale/zero: (T // G, D)
        else:
            sz = offs_n[:, None] * (D // GROUP) + (offs_d // GROUP)[None, :]  # scale/zero: (T, D // G)
        scale = tl.load(S + sz, mask=mask_n[:, None], other=0.0).to(tl.float32)
        zero = tl.load(Z + sz, mask=mask_n[:, None], other=0.0).to(tl.float32)
        x = code.to(tl.float32) * scale + zero  # x_hat = code * scale + zero
    return x


# ----------------------------------------------------------------------------------------------------------------
# One step of the online softmax, and a split's partial result: what both split kernels share
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _empty_state(BLOCK_M: tl.constexpr, D: tl.constexpr):
    """The online softmax's state before any key: running max -inf, sum 0, weighted sum of values 0."""
    return (tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
            tl.zeros([BLOCK_M, D], tl.float32))


@triton.jit
def _fold_tile(q, k, v, visible, m_i, l_i, acc, qk_scale):
    """Fold a (BN, D) key/value tile into the running max m_i, sum l_i and output acc of the (BM, D) queries q,
    scores in log2 units; `visible` (BM, BN) hides keys. A row that has seen no key yet keeps m = -inf, so it
    subtracts 0 instead (no NaN)."""
    s = tl.dot(q, tl.trans(k.to(q.dtype))) * qk_scale  # (BM, BN)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])  # (BM, BN)
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return m_new, l_i, acc


@triton.jit
def _store_split(O_PART, LSE_PART, part, m_i, l_i, acc, offs_r, offs_d, M: tl.constexpr, D: tl.constexpr):
    """A split's partial result at (b, hk, split) index `part`: normalised output and its log-sum-exp (-inf if it
    saw no key, so that it weighs nothing in combine_splits)."""
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(O_PART + (part * M + offs_r[:, None]) * D + offs_d[None, :], out, mask=offs_r[:, None] < M)
    tl.store(LSE_PART + part * M + offs_r, lse, mask=offs_r < M)


# ----------------------------------------------------------------------------------------------------------------
# The split kernel: online softmax over one split of one segment of keys, for the G * Tq rows of a KV head
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _decode_split_kernel(Q, K, KS, KZ, V, VS, VZ, O_PART, LSE_PART,
                         T_seg, key_pos0, Tq, shift, split_size, n_splits, split0, qk_scale,
                         M: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_PER_CHANNEL: tl.constexpr,
                         V_BITS: tl.constexpr, V_GROUP: tl.constexpr, V_PER_CHANNEL: tl.constexpr):
    pid_s = tl.program_id(0)  # which split of this segment
    bh = tl.program_id(1)  # b * H_kv + hk
    offs_r = tl.arange(0, BLOCK_M)  # (BM,) rows r = g * Tq + i: query head g of the group, query i
    offs_d = tl.arange(0, D)
    # q is contiguous (B, H, Tq, D), so the G * Tq rows of KV head hk are contiguous: M * D numbers at bh * M * D
    q = tl.load(Q + bh * M * D + offs_r[:, None] * D + offs_d[None, :], mask=offs_r[:, None] < M, other=0.0)
    q_pos = offs_r % Tq  # (BM,) the query's index among the Tq new tokens

    # -- this program's slices of the segment: contiguous (B, H_kv, T_seg, ...) payloads --
    if K_BITS == 0:
        K += bh * T_seg * D
    else:
        K += bh * T_seg * (D * K_BITS // 8)  # packed codes: D * bits / 8 bytes per token
    if V_BITS == 0:
        V += bh * T_seg * D
    else:
        V += bh * T_seg * (D * V_BITS // 8)
    KS += bh * T_seg * D // K_GROUP  # scale/zero hold T * D / G numbers per (b, hk) on either axis
    KZ += bh * T_seg * D // K_GROUP
    VS += bh * T_seg * D // V_GROUP
    VZ += bh * T_seg * D // V_GROUP

    m_i, l_i, acc = _empty_state(BLOCK_M, D)
    lo = pid_s * split_size
    hi = tl.minimum(lo + split_size, T_seg)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BN,) key index within the segment
        mask_n = offs_n < hi
        # -- a (dequantized) key and value tile; hide keys outside the split or in the future --
        k = _load_tile(K, KS, KZ, offs_n, offs_d, mask_n, D, K_BITS, K_GROUP, K_PER_CHANNEL)  # (BN, D) fp32
        v = _load_tile(V, VS, VZ, offs_n, offs_d, mask_n, D, V_BITS, V_GROUP, V_PER_CHANNEL)  # (BN, D) fp32
        visible = mask_n[None, :] & (key_pos0 + offs_n[None, :] <= q_pos[:, None] + shift)
        m_i, l_i, acc = _fold_tile(q, k, v, visible, m_i, l_i, acc, qk_scale)
    _store_split(O_PART, LSE_PART, bh * n_splits + split0 + pid_s, m_i, l_i, acc, offs_r, offs_d, M, D)


# ----------------------------------------------------------------------------------------------------------------
# The paged split kernel: the same online softmax, the keys of each (b, hk) gathered from a block pool by its table
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _paged_split_kernel(Q, K, KS, KZ, V, VS, VZ, TABLES, LENGTHS, KT, VT, TAIL_LENGTHS, O_PART, LSE_PART,
                        max_blocks, R, Tq, causal, split_size, n_splits, qk_scale,
                        M: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, K_BITS: tl.constexpr, K_GROUP: tl.constexpr,
                        K_PER_CHANNEL: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr,
                        HAS_TAIL: tl.constexpr):
    pid_s = tl.program_id(0)  # which split of this (b, hk)'s keys
    bh = tl.program_id(1)  # b * H_kv + hk
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + bh * M * D + offs_r[:, None] * D + offs_d[None, :], mask=offs_r[:, None] < M, other=0.0)
    L = tl.load(LENGTHS + bh)  # this head's tokens in blocks
    total = L
    if HAS_TAIL:  # then tail_lengths[bh] more in its row of the (B * H_kv, R, D) tail (KIVI's residual)
        total = L + tl.load(TAIL_LENGTHS + bh)
    shift = tl.where(causal != 0, total - Tq, total)  # query i sees key j iff j <= i + shift
    m_i, l_i, acc = _empty_state(BLOCK_M, D)
    lo = pid_s * split_size
    hi = tl.minimum(lo + split_size, total)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BN,) key index within the head
        mask_n = offs_n < hi
        in_blocks = mask_n & (offs_n < L)
        block = tl.load(TABLES + bh * max_blocks + offs_n // BT, mask=in_blocks, other=0)  # (BN,) block ids
        rows = block.to(tl.int64) * BT + offs_n % BT  # (BN,) rows of the pool's (n_blocks * BT) token rows
        # per channel (KIVI's keys): row r's scale is row r // G of the pool's, as BT is a multiple of G
        k = _load_tile(K, KS, KZ, rows, offs_d, in_blocks, D, K_BITS, K_GROUP, K_PER_CHANNEL)  # (BN, D) fp32
        v = _load_tile(V, VS, VZ, rows, offs_d, in_blocks, D, V_BITS, V_GROUP, False)
        if HAS_TAIL:
            in_tail = mask_n & (offs_n >= L)
            tail = (bh * R + offs_n - L).to(tl.int64)  # (BN,) rows of the tail
            k = tl.where(in_tail[:, None], _load_tile(KT, KT, KT, tail, offs_d, in_tail, D, 0, 1, False), k)
            v = tl.where(in_tail[:, None], _load_tile(VT, VT, VT, tail, offs_d, in_tail, D, 0, 1, False), v)
        visible = mask_n[None, :] & (offs_n[None, :] <= (offs_r % Tq)[:, None] + shift)
        m_i, l_i, acc = _fold_tile(q, k, v, visible, m_i, l_i, acc, qk_scale)
    _store_split(O_PART, LSE_PART, bh * n_splits + pid_s, m_i, l_i, acc, offs_r, offs_d, M, D)


# ----------------------------------------------------------------------------------------------------------------
# Launcher: validate, launch one grid per segment of keys, combine the splits by log-sum-exp
# ----------------------------------------------------------------------------------------------------------------
def _payload(x: "torch.Tensor | QuantTensor") -> tuple:
    """(data, scale, zero, bits, group, per_channel, (B, H_kv, T, D)) for a full-precision tensor or a QuantTensor."""
    if isinstance(x, torch.Tensor):
        x = x.contiguous()
        return x, x, x, 0, 1, False, tuple(x.shape)  # scale/zero are unused placeholders
    if x.axis not in ("token", "channel") or x.bits not in (2, 4, 8):
        raise ValueError(f"unsupported quantized payload: bits={x.bits}, axis={x.axis!r}")
    return (x.codes.contiguous(), x.scale.contiguous(), x.zero.contiguous(), x.bits, x.group_size,
            x.axis == "channel", tuple(x.shape))


def default_split_size(Tk: int, n_bh: int, block_n: int, device: torch.device) -> int:
    """Keys per split: enough splits for ~2 programs per SM (1 SM under the interpreter), a multiple of block_n."""
    n_sm = 1 if is_interpreting() else torch.cuda.get_device_properties(device).multi_processor_count
    want_splits = max(1, 2 * n_sm // max(n_bh, 1))
    return max(block_n, triton.cdiv(triton.cdiv(Tk, want_splits), block_n) * block_n)


def combine_splits(o_part: torch.Tensor, lse_part: torch.Tensor) -> torch.Tensor:
    """Merge partial softmax results: o_part (B, H_kv, S, M, D), lse_part (B, H_kv, S, M) base 2 -> (B, H_kv, M, D)."""
    lse_max = lse_part.amax(dim=2, keepdim=True)  # (B, H_kv, 1, M); finite: every query sees key 0
    w = torch.exp2(lse_part - lse_max)  # (B, H_kv, S, M): each split's share of the mass (0 for empty splits)
    return (w.unsqueeze(-1) * o_part).sum(dim=2) / w.sum(dim=2).unsqueeze(-1)  # (B, H_kv, M, D)


def _decode(q: torch.Tensor, segments: list[tuple], *, causal: bool, scale: float | None,
            split_size: int | None, block_n: int = 64) -> torch.Tensor:
    """Attend q (B, H, Tq, D) over consecutive key segments [(k, v), ...], each full precision or quantized."""
    segments = [(_payload(k), _payload(v)) for k, v in segments]
    segments = [(k, v) for k, v in segments if k[-1][2] > 0]  # an empty residual adds nothing
    if q.dim() != 4 or not segments:
        raise ValueError(f"decode expects q (B, H, Tq, D) and at least one non-empty key segment, got {tuple(q.shape)}")
    B, H, Tq, D = q.shape
    H_kv = segments[0][0][-1][1]
    for k, v in segments:
        if k[-1] != v[-1] or k[-1][0] != B or k[-1][1] != H_kv or k[-1][3] != D:
            raise ValueError(f"k{k[-1]} / v{v[-1]} do not match q{tuple(q.shape)} or the other segments")
    Tk = sum(k[-1][2] for k, _ in segments)
    G = H // H_kv if H % H_kv == 0 else 0
    if G == 0 or Tq > Tk or D not in (16, 32, 64, 128) or G * Tq > 128:
        raise ValueError(f"decode needs H % H_kv == 0 (H={H}, H_kv={H_kv}), Tq <= Tk (Tq={Tq}, Tk={Tk}), head_dim "
                         f"in (16, 32, 64, 128) (got {D}) and G * Tq <= 128 (got {G * Tq}); use triton_attend")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q must be float32/float16/bfloat16, got {q.dtype}")
    want = "cpu" if is_interpreting() else "cuda"
    if q.device.type != want:
        raise ValueError(f"the Triton kernels here run on {want!r} tensors, got q on {q.device}")

    q = q.contiguous()
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    shift = Tk - Tq if causal else Tk  # query i sees global key j iff j <= i + shift
    M = G * Tq
    BLOCK_M = max(16, triton.next_power_of_2(M))
    split_size = split_size or default_split_size(Tk, B * H_kv, block_n, q.device)
    n_per_seg = [triton.cdiv(k[-1][2], split_size) for k, _ in segments]
    S = sum(n_per_seg)
    o_part = torch.empty(B, H_kv, S, M, D, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B, H_kv, S, M, device=q.device, dtype=torch.float32)
    key_pos0, split0 = 0, 0
    for (k, v), n_splits in zip(segments, n_per_seg):
        T_seg = k[-1][2]
        _decode_split_kernel[(n_splits, B * H_kv)](
            q, k[0], k[1], k[2], v[0], v[1], v[2], o_part, lse_part,
            T_seg, key_pos0, Tq, shift, split_size, S, split0, scale * LOG2E,
            M=M, D=D, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
            K_BITS=k[3], K_GROUP=k[4], K_PER_CHANNEL=k[5], V_BITS=v[3], V_GROUP=v[4], V_PER_CHANNEL=v[5])
        key_pos0, split0 = key_pos0 + T_seg, split0 + n_splits
    out = combine_splits(o_part, lse_part)  # (B, H_kv, G * Tq, D)
    return out.view(B, H, Tq, D).to(q.dtype)  # rows g * Tq + i of KV head hk are query head hk * G + g


# ----------------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------------
def triton_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                  scale: float | None = None, split_size: int | None = None) -> torch.Tensor:
    """Flash-decoding over a full-precision cache: q (B, H, Tq, D), k/v (B, H_kv, Tk, D) -> (B, H, Tq, D).

    Same contract as `attend` (bottom-right causal alignment), for small Tq (G * Tq <= 128). Not differentiable.
    """
    return _decode(q, [(k, v)], causal=causal, scale=scale, split_size=split_size)


def triton_decode_segments(q: torch.Tensor, segments: list[tuple], *, causal: bool = True,
                           scale: float | None = None, split_size: int | None = None) -> torch.Tensor:
    """Flash-decoding over consecutive key segments [(k, v), ...], oldest first, each a full-precision tensor or a
    QuantTensor of (B, H_kv, T_s, D): what a quantized layer cache holds (cache.storage.CodecStore.encoded)."""
    return _decode(q, segments, causal=causal, scale=scale, split_size=split_size)


def triton_decode_int(q: torch.Tensor, k_q: "QuantTensor", v_q: "QuantTensor", *, causal: bool = True,
                      scale: float | None = None, split_size: int | None = None) -> torch.Tensor:
    """Flash-decoding over an int8/int4/int2 cache, dequantized in registers: equals
    `attend(q, dequantize(k_q), dequantize(v_q))` up to rounding. k_q/v_q: QuantTensor of (B, H_kv, Tk, D)."""
    return _decode(q, [(k_q, v_q)], causal=causal, scale=scale, split_size=split_size)


def triton_decode_kivi(q: torch.Tensor, k_q: "QuantTensor", v_q: "QuantTensor", k_res: torch.Tensor,
                       v_res: torch.Tensor, *, causal: bool = True, scale: float | None = None,
                       split_size: int | None = None) -> torch.Tensor:
    """Flash-decoding over a KIVI cache: quantized keys (per channel) and values (per token) for the oldest
    tokens, then the full-precision residual k_res/v_res (B, H_kv, R, D) of the most recent ones. Equals
    `attend(q, cat(dequantize(k_q), k_res), cat(dequantize(v_q), v_res))` up to rounding."""
    return _decode(q, [(k_q, v_q), (k_res, v_res)], causal=causal, scale=scale, split_size=split_size)


def triton_decode_paged(q: torch.Tensor, k_pool: "torch.Tensor | QuantTensor", v_pool: "torch.Tensor | QuantTensor",
                        tables: torch.Tensor, lengths: torch.Tensor, tail: tuple | None = None, *, causal: bool = True,
                        scale: float | None = None, split_size: int | None = None, block_n: int = 64) -> torch.Tensor:
    """Flash-decoding over a block pool (cache/blocks.py): K and V pools of (n_blocks, 1, block_tokens, D) blocks,
    full precision or QuantTensors (keys per token or, block_tokens a multiple of G, per channel), `tables` (B, H_kv,
    max_blocks) block ids and `lengths` (B, H_kv) tokens per (sequence, KV head); `tail` = (k, v, tail_lengths):
    tokens that follow each head's blocks, k and v (B, H_kv, R, D) in q's dtype of which head (b, h) holds
    tail_lengths[b, h] (KIVI's residual, cache/residual.py). Equals attention over each head's gathered tokens,
    bottom-right causal per head (a head with fewer keys than queries is not allowed: every query must see a key).
    Returns (B, H, Tq, D)."""
    B, H, Tq, D = q.shape
    (kd, ks, kz, k_bits, k_group, k_pc, k_shape), (vd, vs, vz, v_bits, v_group, v_pc, _) = map(_payload,
                                                                                         (k_pool, v_pool))
    H_kv, block_tokens = tables.shape[1], k_shape[2]
    if v_pc or (k_pc and block_tokens % k_group) or k_shape[1] != 1 or tables.shape[0] != B or \
            lengths.shape != tables.shape[:2]:
        raise ValueError(f"paged decode needs pools (n_blocks, 1, block_tokens, D) of per-token values (keys per "
                         f"channel in whole groups), tables (B={B}, H_kv, max_blocks) and lengths (B, H_kv); got pool "
                         f"{k_shape}, tables {tuple(tables.shape)}, lengths {tuple(lengths.shape)}")
    G = H // H_kv if H % H_kv == 0 else 0
    if G == 0 or D not in (16, 32, 64, 128) or G * Tq > 128 or q.dtype not in (torch.float32, torch.float16,
                                                                                 torch.bfloat16):
        raise ValueError(f"paged decode needs H % H_kv == 0 (H={H}, H_kv={H_kv}), head_dim in (16, 32, 64, 128) "
                         f"(got {D}), G * Tq <= 128 (got {G * Tq}) and a float32/float16/bfloat16 q ({q.dtype})")
    q = q.contiguous()
    tables = tables.to(q.device, torch.int32).contiguous()  # a store keeps its tables on the host
    lengths = lengths.to(q.device, torch.int32).contiguous()
    total = lengths
    k_tail = v_tail = tail_lengths = q  # placeholders the kernel never reads without a tail
    if tail is not None:
        k_tail, v_tail, tail_lengths = (t.to(q.device).contiguous() for t in tail)
        tail_lengths = tail_lengths.to(torch.int32)
        if k_tail.shape != v_tail.shape or k_tail.shape[:2] != (B, H_kv) or k_tail.shape[3] != D or \
                tail_lengths.shape != lengths.shape or int(tail_lengths.max()) > k_tail.shape[2]:
            raise ValueError(f"the tail's k{tuple(k_tail.shape)} / v{tuple(v_tail.shape)} must be (B={B}, H_kv="
                             f"{H_kv}, R, D={D}) with (B, H_kv) tail_lengths of at most R")
        total = lengths + tail_lengths
    max_len = int(total.max())
    M = G * Tq
    split_size = split_size or default_split_size(max_len, B * H_kv, block_n, q.device)
    S = triton.cdiv(max_len, split_size)
    o_part = torch.empty(B, H_kv, S, M, D, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B, H_kv, S, M, device=q.device, dtype=torch.float32)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    _paged_split_kernel[(S, B * H_kv)](
        q, kd, ks, kz, vd, vs, vz, tables, lengths, k_tail, v_tail, tail_lengths, o_part, lse_part,
        tables.shape[2], k_tail.shape[2] if tail is not None else 0, Tq, int(causal), split_size, S, scale * LOG2E,
        M=M, D=D, BT=block_tokens, BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=block_n,
        K_BITS=k_bits, K_GROUP=k_group, K_PER_CHANNEL=k_pc, V_BITS=v_bits, V_GROUP=v_group,
        HAS_TAIL=tail is not None)
    return combine_splits(o_part, lse_part).view(B, H, Tq, D).to(q.dtype)
