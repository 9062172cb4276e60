/* Decode attention on the CPU straight from a quantized KV cache's stored bytes (packed codes + float16 scale/zero).

Where it sits: cache/kernels/cpu_decode.py compiles this file, checks the inputs and calls `kvlab_cpu_decode` through
ctypes. It is the CPU sibling of cache/kernels/triton_decode.py: same contract, same byte layout (cache/quant.py):

    bits=8: one code per byte; bits=4: channel 2j in the low nibble of byte j, 2j+1 in the high one;
    bits=2: channel 4j+f in bits 2f..2f+1 of byte j.         x_hat = code * scale + zero   (float32 math)

Work is split over (batch, KV head) pairs, one OpenMP unit each. The G = H / H_kv query heads of a KV head times
the Tq queries are the M rows of the unit, so every code byte is read once for all of them. Per unit:

    pass 1   scores S[r][j] = (q_r . k_j) * scale, for the keys of every segment, oldest first
    softmax  per row: max, exp, sum over the keys the row may see (bottom-right causal); the others get 0
    pass 2   out_r = (sum_j S[r][j] v_j) / sum_j S[r][j]

The trick: never unpack codes into channel order. With k = 8 / bits fields per byte, channel d = k*j + f sits in
field f of byte j. Field f of a run of bytes is a contiguous shift-and-mask loop that vectorizes, so key and value
rows are dequantized into *lane order* -- a tile of C bytes gives field 0 of its bytes (C lanes), then field 1,
... -- and q is permuted into that order once per segment (a dot product does not care about the order of its
terms). The value accumulator is in lane order too, un-permuted once per segment:

    lane of channel d:   j = d / k,  f = d % k,  tile i = j / C   ->   lane = (i * k + f) * C + j % C

A tile holds C = gcd(16, bytes per row, bytes per scale group) bytes: 16 bytes widen to 16 int32 (two AVX2
registers), and a tile never straddles two per-token groups, so one scale and zero cover it. KIVI keys (groups of
G tokens per channel) take a scale and zero per lane instead, reloaded every G tokens. float32 rows need no
permutation and are read in place.

Rows are dequantized BLOCK at a time into a scratch that stays in L1 (the cache is never decoded into memory),
padded with zero lanes to Dp, a multiple of LANES = 16 floats; the dot products and value updates then run over
a compile-time number of 16-lane vectors and gcc keeps them in registers.

What each choice buys (int4, G=32, 2048 tokens, B=8 H=6 H_kv=2 D=64: about 0.9 ms of CPU time per call on 1
thread, ~0.5-0.6 ms on 2; `python bench/decode_kernel.py` times a whole step's attention against SDPA):
  - the tile size C is a compile-time constant: with a runtime C, gcc vectorizes the byte loops 64 bytes at a time
    and rows of 32 bytes run scalar;
  - dots run over a constant number of 16-lane vectors folded with vector adds; an `omp simd reduction` would end
    every dot in 16 dependent scalar additions. The number of vectors per row is a constant too (NV_CASES), and
    the value accumulators are copied into registers;
  - rows are dequantized BLOCK = 32 at a time: one dispatch and one scale conversion loop per block;
  - the vector width depends on the CPU's vendor (cpu_decode.py gives the measurements): 256 bits on AMD, where 512-bit
    code was slower for int2 and int8, and 512 on Intel, where it was faster for all but int2;
  - schedule(dynamic) over the (batch, KV head) units lowers the median by ~10% on a shared machine;
  - prefetching the next BLOCK of rows (at a piece's end: the next piece's first rows) takes ~6% off a paged
    cache's call, float32 and int4 alike (48 rows of 640-1,100 tokens in 16-token blocks, runs of 6 blocks at
    random places, caches flushed first; 2-core Xeon): a pool's blocks lie pages apart, and the hardware
    prefetchers stop at a page's end.
  No gain from: query rows held in registers (M a constant), two accumulator chains per value row, 8-lane
  vectors, converting float16 scales one at a time with _Float16 instead of a vector loop.
  Where the time goes (int4, 1 thread): dequantizing K and V ~45%, dots ~25%, value updates ~25%. Counting
  instructions, the floor of this design is ~0.7 ms (2 * M * D FMAs per token ~0.3 ms, dequantizing two rows
  per token ~0.4 ms): going much lower needs integer dot instructions (VNNI), not tidier loops.
*/

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_decode_rows.h"
#include "exp_nonpos.h"

typedef struct {
    Payload k, v;
    int64_t T;                        /* tokens in this segment */
} Segment;

/* A paged cache (cache/blocks.py): the pool's K and V blocks as one Segment viewed as (n_blocks, 1, block_tokens,
   D), so a block id is a batch index; (batch, KV head) u reads blocks tables[u * max_blocks + i] for its
   lengths[u] tokens, the last block partly filled, then tail_lengths[u] tokens of its row of `tail` (KIVI's
   full-precision residual, (B, H_kv, R, D); NULL: none). */
typedef struct {
    const Segment *pool;
    const int32_t *tables, *lengths;
    int64_t max_blocks;
    const Segment *tail;
    const int32_t *tail_lengths;
} Paged;

/* ------------------------------------------------------------------------------------------------------------
   One (batch, KV head): M query rows against its keys, piece by piece (segments, or the blocks of its table)
   ------------------------------------------------------------------------------------------------------------ */
typedef struct {
    const Segment *segs;      /* the same segments for every unit, or NULL for a paged cache */
    const Paged *paged;
    int n_seg, M, Tq, D, Dp;  /* Dp: D rounded up to a multiple of LANES */
    int64_t Tk;               /* keys of every unit (segments), or the most any unit has (paged) */
    int causal;               /* query i of a unit with Tk keys sees key j iff j <= Tk - Tq + i */
    float scale;
    float *weights;           /* NULL, or the softmax weights out: (B * H_kv, M, Tk), zero past a unit's keys */
} Problem;

/* Where a piece of a unit lies: a payload pair, the (batch, head) index into it, and its tokens. */
typedef struct { const Payload *k, *v; int64_t b, h, T; } Piece;

static int64_t tail_keys(const Paged *pg, int64_t u) { return pg->tail ? pg->tail_lengths[u] : 0; }

static int64_t unit_blocks(const Paged *pg, int64_t u) { return (pg->lengths[u] + pg->pool->T - 1) / pg->pool->T; }

static int64_t unit_keys(const Problem *P, int64_t u)
{
    return P->paged ? P->paged->lengths[u] + tail_keys(P->paged, u) : P->Tk;
}

/* Segments, or blocks of the unit's table (and its tail, if it holds tokens). */
static int64_t unit_parts(const Problem *P, int64_t u)
{
    return P->paged ? unit_blocks(P->paged, u) + (tail_keys(P->paged, u) > 0) : P->n_seg;
}

/* The piece starting at part *i, and *i moved past it: one segment, a run of blocks whose ids follow each other
   (their rows follow each other in the pool, so they are read as one), or the unit's tail. */
static Piece next_piece(const Problem *P, int64_t u, int64_t H_kv, int64_t *i)
{
    if (!P->paged) {
        const Segment *s = &P->segs[(*i)++];
        return (Piece){&s->k, &s->v, u / H_kv, u % H_kv, s->T};
    }
    const Paged *pg = P->paged;
    const int32_t *row = pg->tables + u * pg->max_blocks;
    const int64_t bt = pg->pool->T, first = *i, n = unit_blocks(pg, u);
    if (first == n) { /* past the blocks: the tail */
        (*i)++;
        return (Piece){&pg->tail->k, &pg->tail->v, u / H_kv, u % H_kv, tail_keys(pg, u)};
    }
    while (++*i < n && row[*i] == row[*i - 1] + 1)
        ;
    const int64_t left = pg->lengths[u] - first * bt, T = (*i - first) * bt;
    return (Piece){&pg->pool->k, &pg->pool->v, row[first], 0, left < T ? left : T};
}

/* Ask the memory for the rows a unit reads next, BLOCK of them: rows t .. of piece pc when t is inside it, else
   the first rows of the piece at part i (none past the last part). A paged cache's blocks lie pages apart, and
   the hardware prefetchers stop at a page's end. */
static void prefetch_ahead(const Problem *P, int64_t u, int64_t H_kv, const Piece *pc, int64_t t, int64_t i,
                           int64_t n_parts, int value)
{
    Piece next = *pc;
    if (t >= pc->T) {
        if (i >= n_parts)
            return;
        next = next_piece(P, u, H_kv, &i);
        t = 0;
    }
    const Payload *p = value ? next.v : next.k;
    const int64_t width = p->bits ? P->D / (8 / p->bits) : P->D * (int64_t)sizeof(float), n = next.T - t;
    const char *row = (const char *)p->data + (next.b * p->data_sb + next.h * p->data_sh) * (p->bits ? 1 : 4);
    const char *start = row + t * width, *end = start + (n < BLOCK ? n : BLOCK) * width;
    for (uintptr_t line = (uintptr_t)start & ~(uintptr_t)63; line < (uintptr_t)end; line += 64) /* whole lines */
        __builtin_prefetch((const void *)line);
}

/* Floats of scratch per thread: dequantized rows (BLOCK x Dp, first: their pad lanes are zeroed once), float32
   scale/zero (2 x BLOCK x D), q or the value accumulator (M x Dp), scores (M x Tk). */
static size_t scratch_floats(const Problem *P)
{
    return (size_t)BLOCK * P->Dp + 2 * (size_t)BLOCK * P->D + (size_t)P->M * P->Dp + (size_t)P->M * P->Tk;
}

static void attend_unit(const Problem *P, int64_t u, int64_t H_kv, const float *q, float *out, float *scratch)
{
    const int M = P->M, D = P->D, Dp = P->Dp;
    const int64_t Tk = unit_keys(P, u), n_parts = unit_parts(P, u), shift = P->causal ? Tk - P->Tq : Tk;
    float *x = scratch, *sz = x + (size_t)BLOCK * Dp, *qa = sz + 2 * (size_t)BLOCK * D, *S = qa + (size_t)M * Dp;
    int lane[D];
    if (Tk < P->Tq) { /* a head of a paged cache with fewer keys than queries: nothing it may attend */
        memset(out, 0, sizeof(float) * M * D);
        if (P->weights != NULL)
            memset(P->weights + u * M * P->Tk, 0, sizeof(float) * M * P->Tk);
        return;
    }

    /* -- pass 1: scores; q is permuted into the keys' lane order (pads 0) and scaled once per payload (the
       blocks of a pool share one) -- */
    int64_t t0 = 0;
    const Payload *last = NULL;
    for (int64_t i = 0; i < n_parts;) {
        const Piece pc = next_piece(P, u, H_kv, &i);
        Slice K = slice_of(pc.k, pc.b, pc.h, D, lane, sz);
        if (pc.k != last) {
            set_lanes(&K);
            to_lanes(q, qa, lane, M, D, Dp, P->scale);
            last = pc.k;
        }
        for (int64_t t = 0; t < pc.T; t += BLOCK) {
            const int n = pc.T - t < BLOCK ? (int)(pc.T - t) : BLOCK;
            prefetch_ahead(P, u, H_kv, &pc, t + BLOCK, i, n_parts, 0);
            const float *k_rows = read_rows(&K, t, n, x, Dp);
            NV_CASES(score_rows, qa, k_rows, n, M, S + t0 + t, Tk)
        }
        t0 += pc.T;
    }

    /* -- softmax per row over its visible keys; the hidden ones get exactly 0 -- */
    float inv_sum[M];
    for (int r = 0; r < M; r++) {
        float *s = S + r * Tk;
        const int64_t last = shift + r % P->Tq, seen = last + 1 < Tk ? last + 1 : Tk; /* >= 1: Tq <= Tk */
        float mx = s[0], sum = 0.0f;
#pragma omp simd reduction(max : mx)
        for (int64_t j = 0; j < seen; j++)
            mx = s[j] > mx ? s[j] : mx;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < seen; j++) {
            s[j] = exp_nonpos(s[j] - mx);
            sum += s[j];
        }
        for (int64_t j = seen; j < Tk; j++)
            s[j] = 0.0f;
        inv_sum[r] = 1.0f / sum;
    }
    if (P->weights != NULL) /* what an eviction policy reads: H2O sums them, SnapKV pools them */
        for (int r = 0; r < M; r++) {
            float *w = P->weights + (u * M + r) * P->Tk;
            for (int64_t j = 0; j < Tk; j++)
                w[j] = S[r * Tk + j] * inv_sum[r];
            memset(w + Tk, 0, sizeof(float) * (P->Tk - Tk));
        }

    /* -- pass 2: weighted sum of values in the payload's lane order. The running sum moves into each payload's
       lane order and back (exact copies), so every channel is one chain of updates over all keys, oldest first:
       the output does not change by a bit with where the keys are split into pieces (memhier's or the pool's
       blocks). -- */
    memset(out, 0, sizeof(float) * M * D);
    float *acc = qa;
    t0 = 0;
    last = NULL;
    for (int64_t i = 0; i < n_parts;) {
        const Piece pc = next_piece(P, u, H_kv, &i);
        Slice V = slice_of(pc.v, pc.b, pc.h, D, lane, sz);
        if (pc.v != last) {
            if (last != NULL)
                from_lanes(acc, out, lane, M, D, Dp); /* with the previous payload's lanes */
            set_lanes(&V);
            to_lanes(out, acc, lane, M, D, Dp, 1.0f);
            last = pc.v;
        }
        for (int64_t t = 0; t < pc.T; t += BLOCK) {
            const int n = pc.T - t < BLOCK ? (int)(pc.T - t) : BLOCK;
            prefetch_ahead(P, u, H_kv, &pc, t + BLOCK, i, n_parts, 1);
            const float *v_rows = read_rows(&V, t, n, x, Dp);
            NV_CASES(accumulate_rows, acc, v_rows, n, M, S + t0 + t, Tk)
        }
        t0 += pc.T;
    }
    from_lanes(acc, out, lane, M, D, Dp);
    for (int r = 0; r < M; r++)
        for (int d = 0; d < D; d++)
            out[r * D + d] *= inv_sum[r];
}

/* ------------------------------------------------------------------------------------------------------------
   Entry point. q and out are contiguous (B, H, Tq, D) float32, so the M = G * Tq rows of KV head hk are the
   contiguous block at (b * H_kv + hk) * M * D. Every unit reads the same n_seg segments, or with `paged` its own
   blocks (Tk then is the most keys any unit has); `weights`, if not NULL, receives the softmax weights. Returns
   0, or -1 if a thread's scratch could not be allocated.
   ------------------------------------------------------------------------------------------------------------ */
int kvlab_cpu_decode(const float *q, float *out, float *weights, const Segment *segs, int n_seg, const Paged *paged,
                     int64_t B, int64_t H_kv, int M, int Tq, int D, int64_t Tk, int causal, float scale, int n_threads)
{
    const Problem P = {.segs = segs, .paged = paged, .n_seg = n_seg, .M = M, .Tq = Tq, .D = D,
                       .Dp = (D + LANES - 1) / LANES * LANES, .Tk = Tk, .causal = causal, .scale = scale,
                       .weights = weights};
    int failed = 0;
#pragma omp parallel num_threads(n_threads) reduction(| : failed)
    {
        float *scratch = malloc(sizeof(float) * scratch_floats(&P));
        failed = scratch == NULL;
        if (scratch != NULL)
            memset(scratch, 0, sizeof(float) * BLOCK * P.Dp); /* rows: lanes beyond D are never written */
        /* dynamic: a thread that loses its core for a while (a shared machine) leaves its pairs to the others */
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < B * H_kv; u++) /* u = b * H_kv + hk */
            if (scratch != NULL)
                attend_unit(&P, u, H_kv, q + u * M * D, out + u * M * D, scratch);
        free(scratch);
    }
    return failed ? -1 : 0;
}
