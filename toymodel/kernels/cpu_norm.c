/* y = x / sqrt(mean(x^2) + eps) * w, row by row: the RMSNorm of inference in one call.

Where it sits: toymodel/kernels/cpu_norm.py compiles this file, checks the inputs and calls `kvlab_cpu_rms_norm`
through ctypes; pack_for_decode (toymodel/decode_layout.py) routes the model's RMSNorms through it on the CPU,
decode steps and prefills alike. The norm itself is a few hundred multiply-adds per row; what a decode step pays
for in PyTorch is the six operations its RMSNorm is made of (a square, a mean, an add, an rsqrt, two products), each
a dispatch and a fresh tensor, 13 times per step in the bench model. One call here replaces them.

The arithmetic follows PyTorch's: the mean of the squares in float32, s = 1 / sqrt(mean + eps), then (x * s) * w.
The sum of squares runs in another order (a vector loop) and the reciprocal square root may round differently, so
results differ from F.rms_norm in the last bits. One thread: even a prefill's norm is small next to its matrix
products, and the result cannot depend on the thread count.
*/

#include <math.h>
#include <stdint.h>

/* y (M, D) = rms_norm(x (M, D)) * w (D,), all float32 and contiguous. */
void kvlab_cpu_rms_norm(const float *x, const float *w, float *y, int64_t M, int64_t D, float eps)
{
    for (int64_t m = 0; m < M; m++) {
        const float *restrict xm = x + m * D;
        float *restrict ym = y + m * D;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t d = 0; d < D; d++)
            squares += xm[d] * xm[d];
        const float s = 1.0f / sqrtf(squares / (float)D + eps);
#pragma omp simd
        for (int64_t d = 0; d < D; d++)
            ym[d] = (xm[d] * s) * w[d];
    }
}
