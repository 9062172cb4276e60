/* y = x @ W for a few rows of x: the matrix-vector products a decode step is made of, streaming W once.

Where it sits: toymodel/kernels/cpu_matmul.py compiles this file, checks the inputs and calls `kvlab_cpu_matmul`
through ctypes; pack_for_decode (toymodel/decode_layout.py) routes the model's products through it on the CPU.
W is (K, N) row-major (the transposed weight layout of toymodel/decode_layout.py), x is (M, K) with M small (one row
per sequence in the batch).

Why a kernel: decoding one token reads every weight once and does two flops per weight read, so its speed is the
speed at which W streams from memory. The BLAS behind torch splits such a product into column panels, so each
thread reads short pieces of many rows; on the 2-core Zen 4 development machine, the model's 25 products per step
run at 8-19 GB/s that way (the narrow ones, N = 384, slowest) while a plain sum over the same bytes runs at
33-40 GB/s. Here each thread takes a contiguous band of W's rows instead and reads it front to back:

    thread t:  rows k0(t) .. k1(t) of W  ─▶  partial y_t (M, N) = x[:, k0:k1] @ W[k0:k1]      (W read once, in order)
    then:      y = y_0 + y_1 + ...          (each thread adds up its own slice of the M * N outputs)

The inner loop takes four rows of W at a time, so each output is loaded and stored once per four multiply-adds,
and it stays in L1 (N <= 4096 floats). The partial sums of threads 1.. live in a scratch of (threads - 1) * M * N
floats; thread 0 writes y directly.

Ways to split the work, timed on the 25 products of the bench model (44 MB of weights, 2 threads; this shared
machine's timings drift by +-20%): torch x @ W 3.0-3.5 ms; columns split between threads 1.9-2.7 ms; 64-column
tiles 2.8 ms; rows split (this file) 1.4-2.0 ms at M = 1 and about half of torch's time up to M = 16; at M = 32
the BLAS catches up (toymodel/kernels/cpu_matmul.py sends larger M there). 512-bit vectors beat 256-bit ones by
~15% here.
*/

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/* acc (M, N) += x[:, k0:k1] @ W[k0:k1]; x rows have stride K. */
static void accumulate_rows(const float *restrict x, const float *restrict W, float *restrict acc, int M, int64_t K,
                            int64_t N, int64_t k0, int64_t k1) {
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) {
        const float *w0 = W + k * N, *w1 = w0 + N, *w2 = w1 + N, *w3 = w2 + N;
        for (int m = 0; m < M; m++) {
            const float *xm = x + m * K + k;
            const float a0 = xm[0], a1 = xm[1], a2 = xm[2], a3 = xm[3];
            float *restrict am = acc + m * N;
            for (int64_t j = 0; j < N; j++) am[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j];
        }
    }
    for (; k < k1; k++) { /* the last K % 4 rows of the band */
        const float *w0 = W + k * N;
        for (int m = 0; m < M; m++) {
            const float a0 = x[m * K + k];
            float *restrict am = acc + m * N;
            for (int64_t j = 0; j < N; j++) am[j] += a0 * w0[j];
        }
    }
}

/* y (M, N) = x (M, K) @ W (K, N), all float32 and contiguous. Returns 0, or -1 when the scratch cannot be allocated. */
int kvlab_cpu_matmul(const float *x, const float *W, float *y, int M, int64_t K, int64_t N, int threads) {
    const int64_t size = (int64_t)M * N;
    float *scratch = NULL;
    if (threads > 1 && !(scratch = malloc(sizeof(float) * size * (threads - 1))))
        return -1;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nth = omp_get_num_threads();
        const int64_t k0 = K * t / nth / 4 * 4, k1 = t == nth - 1 ? K : K * (t + 1) / nth / 4 * 4;
        float *acc = t == 0 ? y : scratch + (t - 1) * size;
        memset(acc, 0, sizeof(float) * size);
        accumulate_rows(x, W, acc, M, K, N, k0, k1);
#pragma omp barrier
        const int64_t i0 = size * t / nth, i1 = size * (t + 1) / nth;
        for (int u = 1; u < nth; u++) /* y += partial sum u, in thread order: the result is the same every call */
            for (int64_t i = i0; i < i1; i++) y[i] += scratch[(u - 1) * size + i];
    }
    free(scratch);
    return 0;
}
