"""FlashAttention-2 in Triton: the `attend` contract as tiled kernels that never build the Tq x Tk matrix.

Where it sits: `get_attend("triton")` (toymodel/attention.py) returns `triton_attend`, a drop-in replacement for
`reference_attend` that is also differentiable, so `python train.py attn.backend=triton` trains with it.
`triton_attend_with_mass` also returns the attention mass each key received (what H2O ranks keys by).

The algorithm (forward), for one block of BLOCK_M queries of one head, with s = q k^T * scale:

    m = -inf, l = 0, acc = 0                       running row max, running denominator, unnormalised output
    for each block of BLOCK_N keys the queries may see:
        s     = q @ k_blk^T * scale                (BLOCK_M, BLOCK_N), lives in registers / SRAM only
        m_new = max(m, rowmax(s))
        p     = exp(s - m_new)
        alpha = exp(m - m_new)                     rescales everything summed under the old max
        l     = alpha * l + rowsum(p)
        acc   = alpha * acc + p @ v_blk
        m     = m_new
    out = acc / l,   lse = m + log(l)              lse is saved for the backward pass

We work in base 2 (exp2 is one instruction; exp is exp2 of a product), so s carries a factor log2(e) and the
saved `lse` is a base-2 log-sum-exp. Causal masking uses the bottom-right alignment of the contract: query i sees
key j iff j <= i + shift with shift = Tk - Tq. Non-causal attention is the same loop with shift = Tk (every key
is visible), so one kernel serves both. Key blocks that every query of the tile sees in full run without a mask;
only the diagonal and ragged-tail blocks pay for one.

Backward (FA2): with P = softmax(S) recomputed from the saved lse and delta_i = sum_d dO_id * O_id,
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale * dS K,   dK = scale * dS^T Q.
One kernel owns a block of keys and loops over every query (and every query head of its GQA group, so the sum
over the group happens in registers, without atomics) to produce dK, dV; a second owns a block of queries and
loops over the keys to produce dQ.

GQA/MQA: query head h reads KV head h // G (G = H // H_kv) through pointer arithmetic; K/V are never repeated.

Caution / Differences (from the Triton tutorial and Dao's flash-attention):
- No autotuning: block sizes are fixed per head_dim (good defaults on an A100/H100, not tuned per shape).
- delta = rowsum(dO * O) is computed in PyTorch, not in a pre-processing kernel (one extra pass over O and dO).
- fp32 inputs use Triton's default tf32 dot on Ampere+ GPUs (relative error ~3e-4 vs fp32); fp16/bf16 use
  the tensor cores with fp32 accumulation. No dropout, no ALiBi/sliding windows, no variable-length batches.
- head_dim must be a power of two in [16, 128]; the last dimension of every input must be contiguous (the
  launcher copies it otherwise).
- Under TRITON_INTERPRET=1 (CPU, numpy) bf16 `tl.dot` is wrong in Triton 3.9 (triton-lang/triton#11584): use
  fp32 or fp16 there. The interpreter is for stepping through the algorithm, not for speed.
"""

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError as err:  # a helpful message instead of a bare ModuleNotFoundError
    raise ImportError(
        "attn.backend=triton needs the `triton` package (pip install -e '.[triton]'); without it use attn.backend=sdpa"
    ) from err

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)


# ----------------------------------------------------------------------------------------------------------------
# Forward: the inner loop (one stretch of key blocks), then the kernel (one query block of one head)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d, lo, hi, Tk, shift, qk_scale,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BN,) key positions of this block
        # -- load one block of keys and values; rows past Tk read as zeros --
        k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=offs_n[:, None] < Tk, other=0.0)  # (BN, D)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=offs_n[:, None] < Tk, other=0.0)  # (BN, D)
        # -- scores in log2 units: s = q k^T * scale * log2(e) --
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BM, BN)
        if MASKED:  # diagonal / ragged blocks only: hide keys past Tk and keys in the future
            visible = (offs_n[None, :] < Tk) & (offs_n[None, :] <= offs_m[:, None] + shift)
            s = tl.where(visible, s, float("-inf"))
        # -- online softmax: move the running sums to the new max, then add this block --
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BM,)
        p = tl.exp2(s - m_new[:, None])  # (BM, BN)
        alpha = tl.exp2(m_i - m_new)  # (BM,) how much the old terms shrink
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # (BM, D)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                H, H_kv, Tq, Tk, shift, qk_scale,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // (H // H_kv)  # GQA: the KV head this query head reads
    offs_m = start_m + tl.arange(0, BLOCK_M)  # (BM,) query rows
    offs_d = tl.arange(0, D)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=offs_m[:, None] < Tq, other=0.0)  # (BM, D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # Keys [0, full) are visible to every row of the tile; [full, hi) need the mask. Row start_m sees keys
    # <= start_m + shift; the last row sees keys < start_m + BLOCK_M + shift.
    hi = tl.minimum(Tk, start_m + BLOCK_M + shift)
    full = tl.minimum((start_m + shift + 1) // BLOCK_N * BLOCK_N, Tk // BLOCK_N * BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d, 0, full, Tk, shift,
                               qk_scale, BLOCK_N, False)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d, full, hi, Tk, shift,
                               qk_scale, BLOCK_N, True)
    # Every real row sees key 0, so l_i > 0 here; padding rows are computed but never stored.
    out = acc / l_i[:, None]
    O += b * stride_ob + h * stride_oh
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty), mask=offs_m[:, None] < Tq)
    tl.store(LSE + bh * Tq + offs_m, m_i + tl.log2(l_i), mask=offs_m < Tq)


# ----------------------------------------------------------------------------------------------------------------
# Backward and attention mass: both recompute P^T for a (key block, query block) pair from the saved lse
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _probs_T(k, q, lse, offs_n, offs_m, Tq, shift, qk_scale):
    """P^T for one tile: (BN, BM), zero where the key is invisible to the query or the query is padding."""
    s_T = tl.dot(k, tl.trans(q)) * qk_scale  # (BN, BM) log2 units
    visible = (offs_m[None, :] < Tq) & (offs_n[:, None] <= offs_m[None, :] + shift)
    return tl.where(visible, tl.exp2(s_T - lse[None, :]), 0.0)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     H, H_kv, Tq, Tk, shift, qk_scale, sm_scale,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # q/dO share strides (made contiguous by the launcher), as do k/v/dK/dV.
    start_n = tl.program_id(0) * BLOCK_N
    bh_kv = tl.program_id(1)
    b, hk = bh_kv // H_kv, bh_kv % H_kv
    G = H // H_kv
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kv_off = b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]  # (BN, D)
    k = tl.load(K + kv_off, mask=offs_n[:, None] < Tk, other=0.0)
    v = tl.load(V + kv_off, mask=offs_n[:, None] < Tk, other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M  # first query that can see key start_n
    for g in range(G):  # the query heads sharing this KV head: their gradients sum here
        h = hk * G + g
        for start_m in range(lo, Tq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            # -- load the queries, their output gradients and softmax statistics --
            q_off = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]  # (BM, D)
            q = tl.load(Q + q_off, mask=offs_m[:, None] < Tq, other=0.0)
            do = tl.load(DO + q_off, mask=offs_m[:, None] < Tq, other=0.0)
            lse = tl.load(LSE + (b * H + h) * Tq + offs_m, mask=offs_m < Tq, other=float("inf"))  # (BM,)
            delta = tl.load(DELTA + (b * H + h) * Tq + offs_m, mask=offs_m < Tq, other=0.0)
            # -- dV += P^T dO ;  dS^T = P^T * (dP^T - delta) ;  dK += dS^T Q --
            p_T = _probs_T(k, q, lse, offs_n, offs_m, Tq, shift, qk_scale)  # (BN, BM)
            dv += tl.dot(p_T.to(do.dtype), do)
            dp_T = tl.dot(v, tl.trans(do))  # (BN, BM)
            ds_T = p_T * (dp_T - delta[None, :])
            dk += tl.dot(ds_T.to(q.dtype), q)
    tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=offs_n[:, None] < Tk)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < Tk)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   H, H_kv, Tq, Tk, shift, qk_scale, sm_scale,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // (H // H_kv)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q_off = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]  # (BM, D)
    q = tl.load(Q + q_off, mask=offs_m[:, None] < Tq, other=0.0)
    do = tl.load(DO + q_off, mask=offs_m[:, None] < Tq, other=0.0)
    lse = tl.load(LSE + bh * Tq + offs_m, mask=offs_m < Tq, other=float("inf"))
    delta = tl.load(DELTA + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(0, tl.minimum(Tk, start_m + BLOCK_M + shift), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_off = b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]  # (BN, D)
        k = tl.load(K + kv_off, mask=offs_n[:, None] < Tk, other=0.0)
        v = tl.load(V + kv_off, mask=offs_n[:, None] < Tk, other=0.0)
        # -- recompute P, then dS = P * (dO V^T - delta) and dQ += dS K --
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BM, BN)
        visible = (offs_n[None, :] < Tk) & (offs_n[None, :] <= offs_m[:, None] + shift)
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=offs_m[:, None] < Tq)


@triton.jit
def _mass_kernel(Q, K, LSE, MASS,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 H, H_kv, Tq, Tk, shift, qk_scale,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """mass[b, h, j] = sum_i P[b, h, i, j]: one program per (key block, query head), so no atomics."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // (H // H_kv)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=offs_n[:, None] < Tk, other=0.0)  # (BN, D)
    mass = tl.zeros([BLOCK_N], tl.float32)
    for start_m in range(tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M, Tq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                    mask=offs_m[:, None] < Tq, other=0.0)  # (BM, D)
        lse = tl.load(LSE + bh * Tq + offs_m, mask=offs_m < Tq, other=float("inf"))
        mass += tl.sum(_probs_T(k, q, lse, offs_n, offs_m, Tq, shift, qk_scale), 1)  # (BN,)
    tl.store(MASS + bh * Tk + offs_n, mass, mask=offs_n < Tk)


# ----------------------------------------------------------------------------------------------------------------
# Availability check and launchers
# ----------------------------------------------------------------------------------------------------------------
def is_interpreting() -> bool:
    """True if this module's kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_fwd_kernel, triton.runtime.JITFunction)


def triton_unavailable_reason(has_cuda: bool, interpreting: bool) -> str | None:
    """Why the Triton backend cannot run here, or None if it can. Pure, so the message itself is testable."""
    if has_cuda or interpreting:
        return None
    return ("the triton attention backend needs a CUDA GPU, and none was found. On this machine use the sdpa "
            "backend (python train.py attn.backend=sdpa; python infer.py backend=sdpa), "
            "or set TRITON_INTERPRET=1 in the environment before starting Python to step through the Triton "
            "kernels on the CPU (numpy; slow, for small shapes).")


def check_triton_available() -> None:
    """Raise RuntimeError with a helpful message if the Triton kernels cannot run on this machine.

    Without CUDA they run only if TRITON_INTERPRET=1 is set now and was set when this module was imported."""
    interpreting = triton.knobs.runtime.interpret and is_interpreting()
    reason = triton_unavailable_reason(torch.cuda.is_available(), interpreting)
    if reason is not None:
        raise RuntimeError(reason)


def default_blocks(D: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for the forward: larger heads and fp32 tiles take smaller blocks to fit in registers."""
    if dtype == torch.float32:
        return (64, 32)
    return (128, 64) if D <= 64 else (128, 32)


def _num_warps(block_m: int) -> int:
    return 8 if block_m >= 128 else 4


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> tuple:
    """Validate the launch preconditions; return contiguous-last-dim q, k, v and the scale."""
    from toymodel.attention import check_shapes

    check_shapes(q, k, v)
    D = q.shape[-1]
    if D not in (16, 32, 64, 128):
        raise ValueError(f"the Triton kernels need head_dim in (16, 32, 64, 128), got {D}; use attn.backend=sdpa")
    want = "cpu" if is_interpreting() else "cuda"
    if any(t.device.type != want for t in (q, k, v)):
        raise ValueError(f"the Triton kernels here run on {want!r} tensors (interpreter={is_interpreting()}), "
                         f"got q on {q.device}, k on {k.device}, v on {v.device}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q, k, v must share one of float32/float16/bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return q, k, v, 1.0 / math.sqrt(D) if scale is None else scale


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                  scale: float | None = None, block_m: int | None = None, block_n: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns out (B, H, Tq, D) and the base-2 log-sum-exp lse (B, H, Tq) fp32."""
    q, k, v, scale = _prepare(q, k, v, scale)
    B, H, Tq, D = q.shape
    H_kv, Tk = k.shape[1], k.shape[2]
    dm, dn = default_blocks(D, q.dtype)
    block_m, block_n = block_m or dm, block_n or dn
    shift = Tk - Tq if causal else Tk  # query i sees key j iff j <= i + shift
    out = torch.empty_like(q)
    lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(Tq, block_m), B * H)
    _fwd_kernel[grid](q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                      H, H_kv, Tq, Tk, shift, scale * LOG2E, D=D, BLOCK_M=block_m, BLOCK_N=block_n,
                      num_warps=_num_warps(block_m))
    return out, lse


def flash_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, *, causal: bool = True, scale: float | None = None,
                   block_m: int | None = None, block_n: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the two backward kernels. Returns dq (B, H, Tq, D), dk and dv (B, H_kv, Tk, D)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # q/dO and k/v/dK/dV then share strides
    do = do.contiguous().to(q.dtype)
    q, k, v, scale = _prepare(q, k, v, scale)
    B, H, Tq, D = q.shape
    H_kv, Tk = k.shape[1], k.shape[2]
    dm, dn = default_blocks(D, q.dtype)
    block_m, block_n = block_m or dm // 2, block_n or dn  # the backward tiles hold more live tensors
    shift = Tk - Tq if causal else Tk
    delta = (out.float() * do.float()).sum(-1)  # (B, H, Tq): rowsum(dO * O) = rowsum(P * dP)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    args = (*q.stride()[:3], *k.stride()[:3], H, H_kv, Tq, Tk, shift, scale * LOG2E, scale)
    _bwd_dkdv_kernel[(triton.cdiv(Tk, block_n), B * H_kv)](q, k, v, do, lse, delta, dk, dv, *args,
                                                           D=D, BLOCK_M=block_m, BLOCK_N=block_n)
    _bwd_dq_kernel[(triton.cdiv(Tq, block_m), B * H)](q, k, v, do, lse, delta, dq, *args,
                                                      D=D, BLOCK_M=block_m, BLOCK_N=block_n)
    return dq, dk, dv


def attention_mass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, causal: bool = True,
                   scale: float | None = None, block_m: int | None = None, block_n: int | None = None
                   ) -> torch.Tensor:
    """Attention mass per key, (B, H, Tk) fp32 = softmax weights summed over the queries, from the forward's lse."""
    q, k, _, scale = _prepare(q, k, k, scale)
    B, H, Tq, D = q.shape
    H_kv, Tk = k.shape[1], k.shape[2]
    dm, dn = default_blocks(D, q.dtype)
    block_m, block_n = block_m or dm // 2, block_n or dn
    mass = torch.empty(B, H, Tk, device=q.device, dtype=torch.float32)
    _mass_kernel[(triton.cdiv(Tk, block_n), B * H)](q, k, lse, mass, *q.stride()[:3], *k.stride()[:3],
                                                    H, H_kv, Tq, Tk, Tk - Tq if causal else Tk, scale * LOG2E,
                                                    D=D, BLOCK_M=block_m, BLOCK_N=block_n)
    return mass


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public entry points
# ----------------------------------------------------------------------------------------------------------------
class FlashAttention(torch.autograd.Function):
    """out, lse = FlashAttention.apply(q, k, v, causal, scale); lse is a non-differentiable by-product."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float | None):
        out, lse = flash_forward(q, k, v, causal=causal, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_backward(dout, q, k, v, out, lse, causal=ctx.causal, scale=ctx.scale)
        return dq, dk, dv, None, None


def triton_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                  scale: float | None = None) -> torch.Tensor:
    """FlashAttention-2 under the `attend` contract: q (B, H, Tq, D), k/v (B, H_kv, Tk, D) -> out (B, H, Tq, D).

    Differentiable (dq, dk, dv by the FA2 backward kernels). Causal masking is aligned bottom-right.
    """
    out, _ = FlashAttention.apply(q, k, v, causal, scale)
    return out


def triton_attend_with_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                            scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `triton_attend`, plus the attention mass per key: (B, H, Tk) fp32, equal to
    `attention_weights(q, k, causal=causal, scale=scale).sum(dim=2)`. `out` is differentiable; `mass` is not
    (it is a statistic for eviction policies such as H2O)."""
    out, lse = FlashAttention.apply(q, k, v, causal, scale)
    return out, attention_mass(q.detach(), k.detach(), lse, causal=causal, scale=scale)
