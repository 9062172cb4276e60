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
  - 256-bit vectors (the flags in cpu_decode.py) beat 512-bit ones for int2 and int8, and even for int4;
  - schedule(dynamic) over the (batch, KV head) units lowers the median by ~10% on a shared machine.
  No gain from: query rows held in registers (M a constant), two accumulator chains per value row, 8-lane
  vectors, converting float16 scales one at a time with _Float16 instead of a vector loop.
  Where the time goes (int4, 1 thread): dequantizing K and V ~45%, dots ~25%, value updates ~25%. Counting
  instructions, the floor of this design is ~0.7 ms (2 * M * D FMAs per token ~0.3 ms, dequantizing two rows
  per token ~0.4 ms): going much lower needs integer dot instructions (VNNI), not tidier loops.
*/

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum {
    LANES = 16, /* floats per inner vector loop: two AVX2 registers */
    BLOCK = 32, /* rows dequantized per call of read_rows */
};

/* One K or V payload as the Python side describes it; a view of a larger buffer is fine: batch and head strides
   are free, rows must be contiguous. */
typedef struct {
    const void *data;                 /* float32 rows (bits == 0) or packed uint8 codes (bits 2, 4, 8) */
    const uint16_t *scale, *zero;     /* float16 bit patterns: (T, D/G) per token or (T/G, D) per channel */
    int64_t data_sb, data_sh;         /* strides along batch and head, in elements */
    int64_t scale_sb, scale_sh, zero_sb, zero_sh;
    int32_t bits, group, per_channel; /* bits 0: float32 */
} Payload;

typedef struct {
    Payload k, v;
    int64_t T;                        /* tokens in this segment */
} Segment;

/* A paged cache (cache/blocks.py): the pool's K and V blocks as one Segment viewed as (n_blocks, 1, block_tokens,
   D), so a block id is a batch index; (batch, KV head) u reads blocks tables[u * max_blocks + i] for its
   lengths[u] tokens, the last block partly filled. */
typedef struct {
    const Segment *pool;
    const int32_t *tables, *lengths;
    int64_t max_blocks;
} Paged;

/* float16 -> float32, exact for every input (subnormals, inf, nan included), in plain integer and float
   operations: portable C, and a loop of them vectorizes (gcc 12 converts _Float16 one element at a time). */
static inline float half_to_float(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    const float tiny = (float)man * 0x1p-24f; /* exponent 0: zero or subnormal, man * 2^-24 exactly */
    uint32_t tiny_bits;
    memcpy(&tiny_bits, &tiny, sizeof tiny_bits);
    const uint32_t inf_nan = 0u - (exp == 31), sub = 0u - (exp == 0); /* masks: all ones where true */
    const uint32_t normal = (exp + 112 + (inf_nan & 112)) << 23 | man << 13; /* rebias 15 -> 127 (31 -> 255) */
    const uint32_t bits = sign | (sub & tiny_bits) | (~sub & normal);     /* masks, not ?:, or gcc branches */
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void halves_to_floats(const uint16_t *restrict h, float *restrict f, int n)
{
#pragma omp simd
    for (int i = 0; i < n; i++)
        f[i] = half_to_float(h[i]);
}

/* e^x for x <= 0 in plain arithmetic, so that the softmax loop vectorizes (libm's expf is a scalar call):
   e^x = 2^n e^r with n = round(x / ln 2) and r = x - n ln 2 (ln 2 in two parts, Cephes' split, so n * C1 is
   exact), |r| <= ln 2 / 2, e^r by its Taylor polynomial of degree 7. Relative error < 1e-7 on [-87, 0]; below
   -87 it returns e^-87 ~ 1.6e-38 instead of ~0 (keys the mask hides never come here). */
static inline float exp_nonpos(float x)
{
    x = x < -87.0f ? -87.0f : x;
    const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f; /* adding 1.5 * 2^23 rounds to an integer */
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23; /* the float 2^n, n >= -126 */
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* ------------------------------------------------------------------------------------------------------------
   One payload of one (batch, KV head): its rows in lane order
   ------------------------------------------------------------------------------------------------------------ */
typedef struct {
    int bits, k, tile, group, per_channel, D, width; /* width: bytes per row of codes (D floats for float32) */
    const float *f32;                                /* bits == 0 */
    const uint8_t *codes;                            /* bits > 0 */
    const uint16_t *scale, *zero;
    int *lane;      /* lane[d]: where channel d sits in a row (D) */
    float *sf, *zf; /* scale/zero as float32: per channel, the current token group's in lane order (D each);
                       per token, those of the rows being read (BLOCK x D / G each) */
} Slice;

static int gcd(int a, int b) { return b == 0 ? a : gcd(b, a % b); }

static Slice slice_of(const Payload *p, int64_t b, int64_t h, int D, int *lane, float *sz_buf)
{
    Slice s = {.bits = p->bits, .k = p->bits ? 8 / p->bits : 1, .group = p->group, .per_channel = p->per_channel,
               .D = D, .lane = lane};
    s.width = D / s.k;
    s.tile = gcd(16, s.width);
    if (p->bits && !p->per_channel)
        s.tile = gcd(s.tile, p->group / s.k); /* Python checks that G / k is whole */
    /* lane order: tile i of C bytes gives field 0 of its bytes, then field 1, ...; byte j holds channels k*j + f */
    const int k = s.k, C = s.tile;
    for (int i = 0; i < s.width / C; i++)
        for (int f = 0; f < k; f++)
            for (int j = 0; j < C; j++)
                lane[k * (i * C + j) + f] = (i * k + f) * C + j;
    if (p->bits == 0) {
        s.f32 = (const float *)p->data + b * p->data_sb + h * p->data_sh;
    } else {
        s.codes = (const uint8_t *)p->data + b * p->data_sb + h * p->data_sh;
        s.scale = p->scale + b * p->scale_sb + h * p->scale_sh;
        s.zero = p->zero + b * p->zero_sb + h * p->zero_sh;
        s.sf = sz_buf;
        s.zf = sz_buf + BLOCK * D;
    }
    return s;
}

/* Scale/zero row g of a per-channel slice ((T / G, D) float16) into lane order. */
static void load_lane_scales(Slice *s, int64_t g)
{
    const uint16_t *sc = s->scale + g * s->D, *ze = s->zero + g * s->D;
    for (int d = 0; d < s->D; d++) {
        s->sf[s->lane[d]] = half_to_float(sc[d]);
        s->zf[s->lane[d]] = half_to_float(ze[d]);
    }
}

/* Dequantize rows t0 .. t0 + n - 1 into x (Dp floats apart), in lane order. BITS and C (the tile's bytes) are
   compile-time constants in the copies read_rows calls, so the inner loop is straight vector code: load C bytes,
   widen, shift, mask, convert, multiply-add. Rows are read in order from 0, so a per-channel slice reloads its
   scale/zero lanes whenever t enters a new group of G tokens. */
static inline __attribute__((always_inline)) void dequantize_rows(Slice *s, int64_t t0, int n, float *restrict x,
                                                                  int Dp, const int BITS, const int C)
{
    const int K = 8 / BITS, MASK = (1 << BITS) - 1, n_tiles = s->width / C;
    const int n_groups = s->D / s->group, tiles_per_group = n_tiles / n_groups; /* per token: (T, D / G) */
    if (!s->per_channel) { /* the rows' float16 scale/zero, (n, D / G), converted in one vector loop */
        halves_to_floats(s->scale + t0 * n_groups, s->sf, n * n_groups);
        halves_to_floats(s->zero + t0 * n_groups, s->zf, n * n_groups);
    }
    for (int r = 0; r < n; r++) {
        const int64_t t = t0 + r;
        const uint8_t *restrict row = s->codes + t * s->width;
        float *restrict xr = x + (size_t)r * Dp;
        if (s->per_channel) { /* a scale and zero per lane */
            if (t % s->group == 0)
                load_lane_scales(s, t / s->group);
            const float *restrict ls = s->sf, *restrict lz = s->zf;
            for (int i = 0; i < n_tiles; i++)
                for (int f = 0; f < K; f++)
                    for (int j = 0; j < C; j++) {
                        const int lane = (i * K + f) * C + j;
                        xr[lane] = (float)((row[i * C + j] >> (f * BITS)) & MASK) * ls[lane] + lz[lane];
                    }
            continue;
        }
        for (int g = 0; g < n_groups; g++) { /* a scale and zero per tile */
            const float sc = s->sf[r * n_groups + g], ze = s->zf[r * n_groups + g];
            for (int i = g * tiles_per_group; i < (g + 1) * tiles_per_group; i++)
                for (int f = 0; f < K; f++)
                    for (int j = 0; j < C; j++)
                        xr[(i * K + f) * C + j] = (float)((row[i * C + j] >> (f * BITS)) & MASK) * sc + ze;
        }
    }
}

/* Any bits and tile size at runtime: groups of fewer than 4 * k channels (correct, but not vectorized well). */
static void dequantize_rows_any(Slice *s, int64_t t0, int n, float *restrict x, int Dp)
{
    dequantize_rows(s, t0, n, x, Dp, s->bits, s->tile);
}

/* dequantize_rows with BITS and C compile-time constants for tiles of 16, 8 and 4 bytes */
#define DEQUANTIZE_TILES(BITS)                                                                                   \
    switch (s->tile) {                                                                                           \
    case 16: dequantize_rows(s, t0, n, x, Dp, BITS, 16); break;                                                 \
    case 8: dequantize_rows(s, t0, n, x, Dp, BITS, 8); break;                                                   \
    case 4: dequantize_rows(s, t0, n, x, Dp, BITS, 4); break;                                                   \
    default: dequantize_rows_any(s, t0, n, x, Dp); break;                                                       \
    }

/* Rows t0 .. t0 + n - 1 (n <= BLOCK) in lane order, Dp floats apart; the lanes beyond D are 0. float32 rows are
   read in place when D fills whole vectors (Dp == D), else copied into x. Returns where the rows are. */
static const float *read_rows(Slice *s, int64_t t0, int n, float *restrict x, int Dp)
{
    if (s->bits == 0) {
        if (Dp == s->D)
            return s->f32 + t0 * s->D;
        for (int r = 0; r < n; r++)
            memcpy(x + (size_t)r * Dp, s->f32 + (t0 + r) * s->D, sizeof(float) * s->D);
        return x;
    }
    switch (s->bits) {
    case 2: DEQUANTIZE_TILES(2); break;
    case 4: DEQUANTIZE_TILES(4); break;
    default: DEQUANTIZE_TILES(8); break;
    }
    return x;
}

/* ------------------------------------------------------------------------------------------------------------
   Dot products and value updates over rows of NV vectors of LANES floats
   ------------------------------------------------------------------------------------------------------------ */
/* Scores of the M query rows qa against n key rows: S[r * Tk + i] = qa_r . row_i. NV is a compile-time constant
   in the common copies (NV_CASES), so a dot is NV vector FMAs in registers; its 16 lanes are folded to 4 with
   vector adds (a plain sum, or an `omp simd reduction`, ends in 16 dependent scalar additions), and the last 4
   are summed for the whole block in one vector loop. */
static inline __attribute__((always_inline)) void score_rows(const float *restrict qa, const float *restrict rows,
                                                             int n, int M, float *restrict S, int64_t Tk,
                                                             const int NV)
{
    float part[BLOCK][4];
    for (int r = 0; r < M; r++) {
        for (int i = 0; i < n; i++) {
            float acc[LANES] = {0};
            for (int v = 0; v < NV; v++)
                for (int l = 0; l < LANES; l++)
                    acc[l] += qa[(r * NV + v) * LANES + l] * rows[(i * NV + v) * LANES + l];
            for (int w = LANES / 2; w >= 4; w /= 2) /* fold to 4 partial sums with vector adds */
#pragma omp simd
                for (int l = 0; l < w; l++)
                    acc[l] += acc[l + w];
            memcpy(part[i], acc, sizeof part[i]);
        }
#pragma omp simd
        for (int i = 0; i < n; i++)
            S[r * Tk + i] = (part[i][0] + part[i][1]) + (part[i][2] + part[i][3]);
    }
}

/* The value update of n rows: acc_r += S[r * Tk + i] * row_i for each of the M rows, NV * LANES floats each.
   The accumulator is copied into a local array for the block, which gcc keeps in registers. */
static inline __attribute__((always_inline)) void accumulate_rows(float *restrict acc, const float *restrict rows,
                                                                  int n, int M, const float *restrict S,
                                                                  int64_t Tk, const int NV)
{
    for (int r = 0; r < M; r++) {
        float a[NV * LANES]; /* updated in place, acc would be stored back after every row */
        memcpy(a, acc + r * NV * LANES, sizeof a);
        for (int i = 0; i < n; i++) {
            const float w = S[r * Tk + i];
            for (int v = 0; v < NV; v++)
                for (int l = 0; l < LANES; l++)
                    a[v * LANES + l] += w * rows[(i * NV + v) * LANES + l];
        }
        memcpy(acc + r * NV * LANES, a, sizeof a);
    }
}

/* Call F(..., NV) with NV = Dp / LANES a constant for head_dim 32, 64, 128 (a runtime value otherwise). */
#define NV_CASES(F, ...)                                                                                         \
    switch (Dp / LANES) {                                                                                        \
    case 2: F(__VA_ARGS__, 2); break;                                                                            \
    case 4: F(__VA_ARGS__, 4); break;                                                                            \
    case 8: F(__VA_ARGS__, 8); break;                                                                            \
    default: F(__VA_ARGS__, Dp / LANES); break;                                                                  \
    }

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
} Problem;

/* Where piece i of a unit lies: a payload pair, the (batch, head) index into it, and its tokens. */
typedef struct { const Payload *k, *v; int64_t b, h, T; } Piece;

static int64_t unit_keys(const Problem *P, int64_t u) { return P->paged ? P->paged->lengths[u] : P->Tk; }

static int64_t unit_pieces(const Problem *P, int64_t u)
{
    return P->paged ? (unit_keys(P, u) + P->paged->pool->T - 1) / P->paged->pool->T : P->n_seg;
}

static Piece piece_of(const Problem *P, int64_t u, int64_t H_kv, int64_t i)
{
    if (!P->paged)
        return (Piece){&P->segs[i].k, &P->segs[i].v, u / H_kv, u % H_kv, P->segs[i].T};
    const Paged *pg = P->paged;
    const int64_t bt = pg->pool->T, left = pg->lengths[u] - i * bt;
    return (Piece){&pg->pool->k, &pg->pool->v, pg->tables[u * pg->max_blocks + i], 0, left < bt ? left : bt};
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
    const int64_t Tk = unit_keys(P, u), n_pieces = unit_pieces(P, u), shift = P->causal ? Tk - P->Tq : Tk;
    float *x = scratch, *sz = x + (size_t)BLOCK * Dp, *qa = sz + 2 * (size_t)BLOCK * D, *S = qa + (size_t)M * Dp;
    int lane[D];
    if (Tk < P->Tq) { /* a head of a paged cache with fewer keys than queries: nothing it may attend */
        memset(out, 0, sizeof(float) * M * D);
        return;
    }

    /* -- pass 1: scores; per piece, q is permuted into the keys' lane order (pads 0) and scaled once -- */
    int64_t t0 = 0;
    for (int64_t pi = 0; pi < n_pieces; pi++) {
        const Piece pc = piece_of(P, u, H_kv, pi);
        Slice K = slice_of(pc.k, pc.b, pc.h, D, lane, sz);
        memset(qa, 0, sizeof(float) * M * Dp);
        for (int r = 0; r < M; r++)
            for (int d = 0; d < D; d++)
                qa[r * Dp + K.lane[d]] = q[r * D + d] * P->scale;
        for (int64_t t = 0; t < pc.T; t += BLOCK) {
            const int n = pc.T - t < BLOCK ? (int)(pc.T - t) : BLOCK;
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

    /* -- pass 2: weighted sum of values in the piece's lane order. The running sum moves into each piece's
       lane order and back (exact copies), so every channel is one chain of updates over all keys, oldest first:
       the output does not change by a bit with where the keys are split into pieces (memhier's or the pool's
       blocks). -- */
    memset(out, 0, sizeof(float) * M * D);
    float *acc = qa;
    t0 = 0;
    for (int64_t pi = 0; pi < n_pieces; pi++) {
        const Piece pc = piece_of(P, u, H_kv, pi);
        Slice V = slice_of(pc.v, pc.b, pc.h, D, lane, sz);
        memset(acc, 0, sizeof(float) * M * Dp);
        for (int r = 0; r < M; r++)
            for (int d = 0; d < D; d++)
                acc[r * Dp + V.lane[d]] = out[r * D + d];
        for (int64_t t = 0; t < pc.T; t += BLOCK) {
            const int n = pc.T - t < BLOCK ? (int)(pc.T - t) : BLOCK;
            const float *v_rows = read_rows(&V, t, n, x, Dp);
            NV_CASES(accumulate_rows, acc, v_rows, n, M, S + t0 + t, Tk)
        }
        for (int r = 0; r < M; r++)
            for (int d = 0; d < D; d++)
                out[r * D + d] = acc[r * Dp + V.lane[d]];
        t0 += pc.T;
    }
    for (int r = 0; r < M; r++)
        for (int d = 0; d < D; d++)
            out[r * D + d] *= inv_sum[r];
}

/* ------------------------------------------------------------------------------------------------------------
   Entry point. q and out are contiguous (B, H, Tq, D) float32, so the M = G * Tq rows of KV head hk are the
   contiguous block at (b * H_kv + hk) * M * D. Every unit reads the same n_seg segments, or with `paged` its own
   blocks (Tk then is the most keys any unit has). Returns 0, or -1 if a thread's scratch could not be allocated.
   ------------------------------------------------------------------------------------------------------------ */
int kvlab_cpu_decode(const float *q, float *out, const Segment *segs, int n_seg, const Paged *paged, int64_t B,
                     int64_t H_kv, int M, int Tq, int D, int64_t Tk, int causal, float scale, int n_threads)
{
    const Problem P = {.segs = segs, .paged = paged, .n_seg = n_seg, .M = M, .Tq = Tq, .D = D,
                       .Dp = (D + LANES - 1) / LANES * LANES, .Tk = Tk, .causal = causal, .scale = scale};
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
