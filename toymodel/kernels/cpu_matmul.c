/* y = x @ W for a few rows of x: the matrix-vector products a decode step is made of, streaming W once.

Where it sits: toymodel/kernels/cpu_matmul.py compiles this file, checks the inputs and calls `kvlab_cpu_matmul`
through ctypes; pack_for_decode (toymodel/decode_layout.py) routes the model's products through it on the CPU.
W is (K, N) row-major (the transposed weight layout of toymodel/decode_layout.py), x is (M, K) with M small (one row
per sequence in the batch).

Why a kernel: decoding one token reads every weight once and does two flops per weight read, so its speed is the
speed at which W streams from memory. The BLAS behind torch splits such a product into many small column panels,
so each thread reads short pieces of many rows; on the 2-core Zen 4 development machine, the model's 25 products
per step run at 8-19 GB/s that way (the narrow ones, N = 384, slowest). Here each thread takes one contiguous band
of W's columns, a multiple of 16 wide, and reads it row after row:

    thread t:  columns n0(t) .. n1(t)  ─▶  y[:, n0:n1] = x @ W[:, n0:n1]      (every row of W, in order)

Splitting the outputs, never the sum, makes the result independent of the thread count: each output is the same
chain of additions over k = 0 .. K-1 whichever thread computes it, so 1 thread and 2 give identical bytes
(tests/toymodel/test_cpu_matmul.py). That is what lets the thread policy (toymodel/threads.py) switch between one
thread and all of them mid-generation without changing a token. Bands start on multiples of 16 floats (64 bytes),
so every column goes through the same vector code whatever the band cut.

The inner loop takes eight rows of W at a time and sums their products as a balanced tree before adding them to the
output, so each output is loaded and stored once per eight multiply-adds, and stays in L1 (N <= 4096 floats).

Ways to split the work, timed on the 25 products of the bench model (44 MB of weights; this shared machine's
timings drift by +-5-20%): torch x @ W 3.0-3.5 ms at M = 1; 64-column tiles 2.8 ms; one band of rows (K) per
thread, partial sums added after a barrier, 0.55-0.66 ms on 2 threads and 0.97-1.10 ms on 1 -- but its sums
change with the thread count; this file's column bands 0.55-0.56 ms and 0.85 ms (1.41-1.44 ms and 2.30 ms at
M = 8), the same as rows on 2 threads and faster on 1. Four rows at a time instead of eight: 5-15% slower. At
M = 32 the BLAS catches up (toymodel/kernels/cpu_matmul.py sends larger M there). 512-bit vectors beat 256-bit ones
by ~15% here.
*/

#include <stdint.h>
#include <string.h>
#include <omp.h>

/* y[:, n0:n1] = x @ W[:, n0:n1]; x (M, K), W (K, N) and y (M, N) row-major. Every column runs the same code: the
   sum over k is one chain, eight rows at a time in a fixed tree, then the K % 8 last rows one by one. */
static void column_band(const float *restrict x, const float *restrict W, float *restrict y, int M, int64_t K,
                        int64_t N, int64_t n0, int64_t n1) {
    for (int m = 0; m < M; m++)
        memset(y + m * N + n0, 0, sizeof(float) * (n1 - n0));
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const float *w0 = W + k * N, *w1 = w0 + N, *w2 = w1 + N, *w3 = w2 + N;
        const float *w4 = w3 + N, *w5 = w4 + N, *w6 = w5 + N, *w7 = w6 + N;
        for (int m = 0; m < M; m++) {
            const float *a = x + m * K + k;
            float *restrict ym = y + m * N;
            for (int64_t j = n0; j < n1; j++)
                ym[j] += ((a[0] * w0[j] + a[1] * w1[j]) + (a[2] * w2[j] + a[3] * w3[j]))
                       + ((a[4] * w4[j] + a[5] * w5[j]) + (a[6] * w6[j] + a[7] * w7[j]));
        }
    }
    for (; k < K; k++) { /* the last K % 8 rows */
        const float *w0 = W + k * N;
        for (int m = 0; m < M; m++) {
            const float a0 = x[m * K + k];
            float *restrict ym = y + m * N;
            for (int64_t j = n0; j < n1; j++)
                ym[j] += a0 * w0[j];
        }
    }
}

/* y (M, N) = x (M, K) @ W (K, N), all float32 and contiguous; the same bytes for any number of threads. */
void kvlab_cpu_matmul(const float *x, const float *W, float *y, int M, int64_t K, int64_t N, int threads) {
    const int64_t tiles = (N + 15) / 16; /* 16-float tiles, shared out in contiguous runs */
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nth = omp_get_num_threads();
        const int64_t n0 = tiles * t / nth * 16, n1 = t == nth - 1 ? N : tiles * (t + 1) / nth * 16;
        if (n0 < n1)
            column_band(x, W, y, M, K, N, n0, n1);
    }
}
