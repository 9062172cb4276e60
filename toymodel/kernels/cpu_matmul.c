/* y = x @ W for a few rows of x: the matrix products a decode step is made of, one row per sequence in the batch.

Where it sits: toymodel/kernels/cpu_matmul.py compiles this file, checks the inputs and calls `kvlab_cpu_matmul`
through ctypes; pack_for_decode (toymodel/decode_layout.py) routes the model's products through it on the CPU.
W is (K, N) row-major (the transposed weight layout of toymodel/decode_layout.py), x is (M, K) with M small.

Why a kernel: decoding one token reads every weight once and does two flops per weight read, so at one row its
speed is the speed at which W streams from memory, and at a few rows the speed of the multiply-adds. The BLAS
behind torch changes its sums with the thread count (at one row, and from 32 rows on here), which the thread
policy (toymodel/threads.py) cannot allow: it switches between one thread and all of them mid-generation, and a
token must not change with it.

How: threads split the output columns, never a sum. Each output is one chain of multiply-adds over k = 0 .. K-1
(fused where the CPU has them: gcc contracts acc + a * w), whichever thread and whichever tile computes it, so 1
thread and 2 give identical bytes (tests/toymodel/test_cpu_matmul.py). The columns are cut into tiles of 64 (four
16-float vectors), and a tile of R = 4 rows of x by 64 columns keeps its 16 sums in vector registers:

    for each panel of P = 4 tiles (256 columns) of the thread's band, each run of KC = 128 rows of W:
        more than 4 rows of x: copy W[run, panel] (128 KB) into a buffer, tile after tile, each tile's rows side
                               by side (3-4 rows read the tiles in place, over all K rows in one run)
        for each tile of the panel, each 4 rows of x:
            acc[4][4] = y so far (0 at the first run)
            for k in the run:  w = tile[k] (four vectors);  acc[i] += x[i, k] * w   for i < 4
            y[rows, tile] = acc

For one or two rows of x, where the speed is W's stream from memory, the loops turn: KS = 32 rows of the whole band,
tile after tile, then the next 32, each tile's sums taken from y and put back between sweeps. W is then read nearly
front to back, a few rows at a time, where the order above jumps N floats at every row of a tile, and the
processor's prefetchers keep up better: on the 2-core AMD EPYC (Zen 5, 2026-12-08), 0.84-0.87x the time at one row
on 2 threads and 0.93-0.94x on one, 0.85-1.01x at two rows (the 25 products, 15 alternating rounds, two runs); at
three and four rows, where the multiply-adds weigh more, the sweeps lost (1.05-1.59x). Every output is still the
same chain of multiply-adds: a sum is stored and loaded as it is, so the bytes do not change.

Every weight loaded feeds R multiply-adds, and every x value C = 4; a tile's 32 KB of the copy stays in L1 while
the row groups pass over it. In W itself the tile's rows lie N floats apart, and those addresses fall on few of L1's
64 sets (N = 2,048: every row on the same 4, 48 lines for the tile's 512), so each group of rows would read the tile
again from L2; the copy is contiguous and fills every set. The copy reads W a panel's 1 KB of a row at a time, a
longer stretch than one tile's 256 bytes, which the prefetchers follow better. Copying moves values, not sums: each
output's chain of multiply-adds is the same with or without it, so a row's bytes do not depend on the other rows of
its call. Columns past the last whole tile take 16-wide tiles (read in place), then the N % 16 last ones a scalar
chain of the same operations.

Timed on the bench model's 25 products of a decode step, back to back, on the 2-core Intel Xeon (2026-12-07, 2 threads,
medians of alternating rounds): against the kernel it replaced -- eight rows of W at a time, their products summed as a
tree, each output loaded and stored once per eight rows -- 0.88x the time at 1 row, 0.83x at 2, 0.65x at 4, 0.50-0.58x
at 8-32 (both in one process, 11 rounds). x[i, k] reaches every lane as x - 0, which is x, so gcc folds the broadcast
into the multiply-add (a load with {1to16}); written as 0 + x, which is not x for x = -0, it cost an add and a shuffle
per row and k on the multiply-add ports: 0.94x the time at 32 rows, 0.82-0.85x at 51-64, the same at 1-16 (one thread,
11 alternating rounds). Against torch's BLAS, before the copy below: 1.03-1.12x at 1 row, 1.15-1.18x at 4, 1.23-1.31x at
8-32, 1.06-1.31x at 64 in two runs (`python -m bench.matmul`, bench/results/matmul.json; this shared machine drifts).
Copying the tile, against the same kernel reading W in place (2026-12-07, 30 alternating rounds): 0.99x the time at 1
row, 0.95-0.97x at 4-8, 0.88x at 16 and 0.79-0.85x at 32-64 on 2 threads; 0.81-0.86x at 32-64 on one. Against torch's
BLAS after it: 1.07x at 1 row, 1.13-1.20x at 4-8, 1.04x at 16, 1.00x at 32 and 0.93x at 64 (41 rounds). A run of 64 or
96 rows of W in place of 128 made no difference. Prefetching the next rows of W in software gained 0-15% in some runs
and nothing in others, so it is left out. Copying a panel of four tiles instead of one tile at a time, on the 2-core AMD
EPYC (Zen 5, 2026-12-08, 15 alternating rounds): 0.85-0.91x the time at 8 rows, 0.89-0.93x at 16, 0.93x at 32,
0.96-0.98x at 64; panels of 8 tiles by 64 rows and of 16 by 32 did no better, and copying for 3-4 rows too lost at 3.
*/

#include <stdint.h>
#include <omp.h>

#define R 4    /* rows of x per tile */
#define C 4    /* 16-float vectors per tile of columns */
#define KC 128 /* rows of W per run */
#define P 4    /* tiles per panel */
#define KS 32  /* rows of W per sweep of a band, for one or two rows of x */

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4))); /* the same, at any float address */

static inline v16 load(const float *p) { return *(const v16u *)p; }
static inline void store(float *p, v16 v) { *(v16u *)p = v; }

/* y[0:r, j0:j0 + 16c] += x[0:r, k0:k1] @ W[k0:k1, j0:j0 + 16c] (y read as 0 when k0 == 0), where w points at
   W[k0, j0] and its rows lie ldw floats apart (N in W itself, 16c in a copy of the tile). r and c are constants at
   every call site, so the sums stay in registers. */
static inline __attribute__((always_inline)) void tile(const float *restrict x, const float *restrict w_tile,
                                                       int64_t ldw, float *restrict y, const int r, const int c,
                                                       int64_t K, int64_t N, int64_t j0, int64_t k0, int64_t k1)
{
    v16 acc[R][C];
    for (int i = 0; i < r; i++)
        for (int v = 0; v < c; v++)
            acc[i][v] = k0 == 0 ? (v16){0} : load(y + i * N + j0 + 16 * v);
    for (int64_t k = k0; k < k1; k++) {
        v16 w[C];
        for (int v = 0; v < c; v++)
            w[v] = load(w_tile + (k - k0) * ldw + 16 * v);
        for (int i = 0; i < r; i++) {
            const v16 a = x[i * K + k] - (v16){0}; /* x[i, k] in every lane: x - 0 is x, so no subtraction is left */
            for (int v = 0; v < c; v++)
                acc[i][v] += a * w[v];
        }
    }
    for (int i = 0; i < r; i++)
        for (int v = 0; v < c; v++)
            store(y + i * N + j0 + 16 * v, acc[i][v]);
}

/* The tiles of r rows of x (1 <= r <= R) for a column tile of c vectors (C or 1). */
static void rows_tile(const float *x, const float *w_tile, int64_t ldw, float *y, int r, int c, int64_t K, int64_t N,
                      int64_t j0, int64_t k0, int64_t k1)
{
#define TILE(rr, cc) tile(x, w_tile, ldw, y, rr, cc, K, N, j0, k0, k1)
    if (c == C) {
        switch (r) {
        case 1: TILE(1, C); break;
        case 2: TILE(2, C); break;
        case 3: TILE(3, C); break;
        default: TILE(R, C);
        }
    } else {
        switch (r) {
        case 1: TILE(1, 1); break;
        case 2: TILE(2, 1); break;
        case 3: TILE(3, 1); break;
        default: TILE(R, 1);
        }
    }
#undef TILE
}

/* y[:, j0:j1] = x @ W[:, j0:j1], j1 - j0 a multiple of 16: tiles of C vectors, then of one. One or two rows sweep W
   by rows; more than R copy each panel of P tiles into `panel`, tile after tile, each tile's rows side by side; the
   tiles left (all of them for 3 to R rows, else the 16-wide ones) are read in place. */
static void column_band(const float *x, const float *W, float *y, int M, int64_t K, int64_t N, int64_t j0,
                        int64_t j1)
{
    if (M <= 2) { /* W read row after row: KS rows of the whole band, then the next KS */
        for (int64_t k0 = 0; k0 < K; k0 += KS) {
            const int64_t k1 = k0 + KS < K ? k0 + KS : K;
            for (int64_t j = j0; j < j1;) {
                const int c = j1 - j >= 16 * C ? C : 1;
                rows_tile(x, W + k0 * N + j, N, y, M, c, K, N, j, k0, k1);
                j += 16 * c;
            }
        }
        return;
    }
    const int64_t jt = M > R ? j0 + (j1 - j0) / (16 * C) * (16 * C) : j0; /* copied in panels up to here */
    v16 panel[P * KC * C]; /* 128 KB: tile after tile, KC rows of C vectors each */
    for (int64_t jp = j0; jp < jt; jp += 16 * C * P) {
        const int tiles = jt - jp < 16 * C * P ? (jt - jp) / (16 * C) : P;
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            const int64_t k1 = k0 + KC < K ? k0 + KC : K;
            for (int64_t k = k0; k < k1; k++) /* row k of the panel, front to back */
                for (int t = 0; t < tiles; t++)
                    for (int v = 0; v < C; v++)
                        panel[(t * KC + k - k0) * C + v] = load(W + k * N + jp + 16 * (t * C + v));
            for (int t = 0; t < tiles; t++)
                for (int m = 0; m < M; m += R)
                    rows_tile(x + (int64_t)m * K, (const float *)(panel + t * KC * C), 16 * C, y + (int64_t)m * N,
                              M - m < R ? M - m : R, C, K, N, jp + 16 * C * t, k0, k1);
        }
    }
    for (int64_t j = jt; j < j1;) {
        const int c = j1 - j >= 16 * C ? C : 1;
        for (int m = 0; m < M; m += R)
            rows_tile(x + (int64_t)m * K, W + j, N, y + (int64_t)m * N, M - m < R ? M - m : R, c, K, N, j, 0, K);
        j += 16 * c;
    }
}

/* The N % 16 last columns: the same chain of multiply-adds, one output at a time. */
static void last_columns(const float *x, const float *W, float *y, int M, int64_t K, int64_t N, int64_t j0)
{
    for (int m = 0; m < M; m++)
        for (int64_t j = j0; j < N; j++) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; k++)
                s += x[m * K + k] * W[k * N + j];
            y[m * N + j] = s;
        }
}

/* y (M, N) = x (M, K) @ W (K, N), all float32 and contiguous; the same bytes for any number of threads. */
void kvlab_cpu_matmul(const float *x, const float *W, float *y, int M, int64_t K, int64_t N, int threads)
{
    const int64_t vectors = N / 16; /* whole groups of 16 columns, shared out in contiguous runs */
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nth = omp_get_num_threads();
        const int64_t j0 = vectors * t / nth * 16, j1 = vectors * (t + 1) / nth * 16;
        if (j0 < j1)
            column_band(x, W, y, M, K, N, j0, j1);
        if (t == nth - 1 && vectors * 16 < N)
            last_columns(x, W, y, M, K, N, vectors * 16);
    }
}
