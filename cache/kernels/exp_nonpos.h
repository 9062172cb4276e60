/* e^x for x <= 0 without libm, shared by cache/kernels/cpu_decode.c (the softmax) and cpu_block.c (SiLU): a loop
   of these vectorizes, where one of libm's expf is a scalar call per element. */

#ifndef KVLAB_EXP_NONPOS_H
#define KVLAB_EXP_NONPOS_H

#include <stdint.h>
#include <string.h>

/* e^x = 2^n e^r with n = round(x / ln 2) and r = x - n ln 2 (ln 2 in two parts, Cephes' split, so n * C1 is
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

#endif
