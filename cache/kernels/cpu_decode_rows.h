/* Reading a KV payload's rows and multiplying them: the inner loops of cache/kernels/cpu_decode.c.

A payload (float32 rows, or packed codes with float16 scales and zeros: cache/quant.py) is read a BLOCK of rows at a
time into lane order (cpu_decode.c's opening comment explains the order and why), and the scores and value updates
run over rows of NV vectors of LANES floats. Included by cpu_decode.c only; toymodel/kernels/native.py recompiles
when this file changes.
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

/* lane order: tile i of C bytes gives field 0 of its bytes, then field 1, ...; byte j holds channels k*j + f */
static void set_lanes(const Slice *s)
{
    const int k = s->k, C = s->tile;
    for (int i = 0; i < s->width / C; i++)
        for (int f = 0; f < k; f++)
            for (int j = 0; j < C; j++)
                s->lane[k * (i * C + j) + f] = (i * k + f) * C + j;
}

/* Rows of D floats in channel order <-> rows of Dp floats in lane order (pads 0), M rows; exact copies. */
static void to_lanes(const float *x, float *y, const int *lane, int M, int D, int Dp, float scale)
{
    memset(y, 0, sizeof(float) * M * Dp);
    for (int r = 0; r < M; r++)
        for (int d = 0; d < D; d++)
            y[r * Dp + lane[d]] = x[r * D + d] * scale;
}

static void from_lanes(const float *y, float *x, const int *lane, int M, int D, int Dp)
{
    for (int r = 0; r < M; r++)
        for (int d = 0; d < D; d++)
            x[r * D + d] = y[r * Dp + lane[d]];
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
