/* Per-token group quantization of float32 rows in one pass: the C twin of quantize_per_token in cache/quant.py.

Where it sits: cache/kernels/quant_cpu.py compiles this file (toymodel/kernels/native.py) and calls it for CPU
float32 inputs. A decode step quantizes one new token per sequence and KV head; the PyTorch version spends ~25 small
tensor ops on that (about 90 us per K or V, most of it per-op overhead), this loop about a microsecond. It must give
the same bytes as the reference, so it repeats its arithmetic step by step, in float32, with float16 roundings:

    zero  = fp16(min), stepped down one float16 ulp if it rounded above the min (zero <= min)
    scale = fp16((max - zero) / levels), stepped up one ulp if it rounded below; 1 if it is 0 (a constant group)
    code  = clamp(round_half_even((x - zero) / scale), 0, levels)          packed as in cache/quant.py:
    bits=8: one code per byte; bits=4: channel 2j low nibble of byte j; bits=2: channel 4j+f in bits 2f..2f+1

No -ffast-math: every operation is IEEE float32 as in torch, and there is no multiply-add to contract.
*/

#include <math.h>
#include <stdint.h>
#include <string.h>

/* The next float16 after h (bit pattern) toward -inf (down) or +inf (up); infinities and NaN stay put. */
static uint16_t half_step(uint16_t h, int up) {
    if ((h & 0x7c00) == 0x7c00)
        return h;
    if ((h & 0x7fff) == 0) /* +-0: the smallest subnormal of the right sign */
        return up ? 0x0001 : 0x8001;
    const int negative = h >> 15;
    return (up != negative) ? h + 1 : h - 1; /* away from zero adds one to the magnitude */
}

static float half_to_float(uint16_t h) {
    _Float16 f;
    memcpy(&f, &h, 2);
    return (float)f;
}

static uint16_t float_to_half(float x) { /* round to nearest even, as torch's .to(float16) */
    _Float16 f = (_Float16)x;
    uint16_t h;
    memcpy(&h, &f, 2);
    return h;
}

/* x (rows, D) float32 -> codes (rows, D * bits / 8) uint8, scale and zero (rows, D / G) float16 bit patterns. */
void kvlab_quantize_per_token(const float *x, uint8_t *codes, uint16_t *scale, uint16_t *zero, int64_t rows, int D,
                              int G, int bits) {
    const int levels = (1 << bits) - 1, per_byte = 8 / bits, groups = D / G;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * D;
        uint8_t *cr = codes + r * (D / per_byte);
        memset(cr, 0, D / per_byte);
        for (int g = 0; g < groups; g++) {
            const float *xg = xr + g * G;
            float mn = xg[0], mx = xg[0];
            for (int i = 1; i < G; i++) {
                mn = fminf(mn, xg[i]);
                mx = fmaxf(mx, xg[i]);
            }
            uint16_t z = float_to_half(mn);
            if (half_to_float(z) > mn)
                z = half_step(z, 0);
            const float zf = half_to_float(z);
            const float scale32 = (mx - zf) / (float)levels;
            uint16_t s = float_to_half(scale32);
            if (half_to_float(s) < scale32)
                s = half_step(s, 1);
            if ((s & 0x7fff) == 0)
                s = 0x3c00; /* 1.0 */
            const float sf = half_to_float(s);
            scale[r * groups + g] = s;
            zero[r * groups + g] = z;
            for (int i = 0; i < G; i++) {
                float c = nearbyintf((xg[i] - zf) / sf); /* the default rounding mode: half to even */
                c = c < 0.0f ? 0.0f : (c > (float)levels ? (float)levels : c);
                const int d = g * G + i;
                cr[d / per_byte] |= (uint8_t)((int)c << (bits * (d % per_byte)));
            }
        }
    }
}
