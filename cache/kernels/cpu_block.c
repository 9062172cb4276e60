/* A decode step of one transformer block in one call: norm, q/k/v, RoPE, the new token into the block pool (as
float32 rows or quantized), attention over the pool, output projection, norm, SwiGLU, each residual add.

Where it sits: cache/kernels/cpu_block.py compiles this file, checks the blocks and the cache and calls
`kvlab_decode_layers` (every block of a decode step, one after another) through ctypes; ModelCache.decode_blocks
(cache/model_cache.py) runs a decode step's blocks through it where the layers live in a block pool of float32 rows or
per-token codes on the CPU, and toymodel/model.py's Transformer.forward asks for that before running the blocks
operation by operation.

Why: in a decode step of the bench model at batch 1 each block does a few dozen small operations -- the products,
a norm, RoPE on q and k, storing k and v, the attention call and its checks, SiLU, residual adds -- and each costs
a dispatch, a fresh tensor or a few lines of Python. Their arithmetic is a fraction of a microsecond; their cost
was 1.6-2.1 ms of a 4.4-4.7 ms batch-1 step on the 2-core Xeon, more than reading the weights. Here the block
is one call, and the work between the kernels is plain loops.

Nothing is computed a new way: the matrix products, the norm, the attention and the quantizer of new tokens are the
kernels the op-by-op path calls (toymodel/kernels/cpu_matmul.c, toymodel/kernels/cpu_norm.c, cpu_decode.c, quant_cpu.c),
handed over as function pointers so that each keeps the flags it was built with. RoPE is written out here with PyTorch's
formula and SiLU with the softmax's e^x (exp_nonpos.h); their last bits may differ from PyTorch's (its vector exp, its
fused multiply-adds), so the logits agree to ~1e-6, not bit for bit. Shapes: B rows (one token each), H query heads and
H_kv KV heads of D channels, d = d_model, f = d_ff; every weight is transposed, (d_in, d_out) row-major, as
toymodel/decode_layout.py packs it.
*/

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "exp_nonpos.h"

typedef void (*Matmul)(const float *x, const float *W, float *y, int M, int64_t K, int64_t N, int threads);
typedef void (*Norm)(const float *x, const float *w, float *y, int64_t M, int64_t D, float eps);
typedef int (*Decode)(const float *q, float *out, float *weights, const void *segs, int n_seg, const void *paged,
                      int64_t B, int64_t H_kv, int M, int Tq, int D, int64_t Tk, int causal, float scale,
                      int n_threads);

typedef void (*Quantize)(const float *x, uint8_t *codes, uint16_t *scale, uint16_t *zero, int64_t rows, int D, int G,
                         int bits);

typedef struct { /* the kernels of the op-by-op path */
    Matmul matmul;
    Norm norm;
    Decode decode;
    Quantize quantize; /* cache/kernels/quant_cpu.c: the new token's codes, as GroupQuant.encode writes them */
} Kernels;

typedef struct { /* one block's weights: norms (d,), products (d_in, d_out) */
    const float *attn_norm, *qkv, *out, *mlp_norm, *gate_up, *down;
    int64_t d_model, d_ff;
    int n_head, n_kv_head, head_dim;
    float eps;
} Block;

typedef struct {       /* K's or V's blocks, (n_blocks * block_tokens) rows of one token each */
    void *data;        /* float32 (rows, D), or bits > 0: codes (rows, D * bits / 8) */
    uint16_t *scale, *zero; /* bits > 0: float16 (rows, D / group) */
    int bits, group;   /* 0: float32 rows; 2, 4 or 8: per-token group codes (cache/quant.py) */
} Rows;

typedef struct {      /* one layer's block pool this step */
    Rows k, v;
    const int64_t *at; /* (B * H_kv,): the pool row of each head's new token */
    const void *paged; /* cpu_decode.c's Paged: the block tables and lengths, the new token counted */
    int64_t max_keys;  /* the most tokens a head holds */
} Pool;

typedef struct {      /* a total of the attention each key has received, per KV head: H2O's (cache/policies.py),
                         or with `squared` KV-Compress's scores, the squared weights (serving/kvcompress.py) */
    const float *old; /* (B, H_kv, old_width): before this step, zero past each head's length */
    int64_t old_width;
    float *out;       /* (B, H_kv, out_width >= max_keys): old plus this step's weights (squared) summed over the
                         head's queries; it may be old itself, the totals then updated in place */
    int64_t out_width;
    int squared;
} Mass;

/* n heads of D channels rotated into `out`: pair (j, j + D/2) -> (x1 cos - x2 sin, x2 cos + x1 sin), one angle
   per pair (toymodel/rope.py). */
static void rotate(const float *x, float *out, int n, int D, const float *cos, const float *sin)
{
    const int half = D / 2;
    for (int h = 0; h < n; h++, x += D, out += D)
        for (int j = 0; j < half; j++) {
            out[j] = x[j] * cos[j] - x[j + half] * sin[j];
            out[j + half] = x[j + half] * cos[j] + x[j] * sin[j];
        }
}

/* silu(g) = g / (1 + e^-g), from e^-|g| (exp_nonpos.h) so that a loop of them vectorizes: for g < 0 it is
   g e^g / (1 + e^g). libm's expf, one scalar call per element, took 1.4 ms of a 20 ms decode step at batch 51. */
static inline float silu(float g)
{
    const float t = exp_nonpos(-fabsf(g));
    return (g >= 0.0f ? g : g * t) / (1.0f + t);
}

/* A token's D channels x into pool row `row`: copied, or quantized by the op-by-op path's quantizer. */
static void store_row(const Kernels *fn, const Rows *rows, int64_t row, const float *x, int D)
{
    if (rows->bits == 0) {
        memcpy((float *)rows->data + row * D, x, sizeof(float) * D);
        return;
    }
    const int64_t groups = D / rows->group;
    fn->quantize(x, (uint8_t *)rows->data + row * (D * rows->bits / 8), rows->scale + row * groups,
                 rows->zero + row * groups, 1, D, rows->group, rows->bits);
}

/* mass->out = mass->old (zero past its width) + weights (B * H_kv, G, L), squared or not, summed over each head's G
   queries, in the order PyTorch adds them (H2O.observe; serving/kvcompress.py's `squared`): the G weights one after
   another, then the old total. */
static inline float term(float w, int squared) { return squared ? w * w : w; }

static void add_mass(const Mass *mass, const float *weights, int64_t units, int G, int64_t L)
{
    enum { CHUNK = 256 }; /* keys at a time, their sums in `seen`: each loop below runs over keys and vectorizes */
    float seen[CHUNK];
    const int sq = mass->squared;
    for (int64_t u = 0; u < units; u++) {
        const float *w = weights + u * G * L, *old = mass->old + u * mass->old_width;
        float *out = mass->out + u * mass->out_width;
        for (int64_t j0 = 0; j0 < L; j0 += CHUNK) {
            const int64_t n = L - j0 < CHUNK ? L - j0 : CHUNK, had = mass->old_width - j0; /* keys with a total */
            for (int64_t j = 0; j < n; j++)
                seen[j] = term(w[j0 + j], sq);
            for (int g = 1; g < G; g++)
                for (int64_t j = 0; j < n; j++)
                    seen[j] += term(w[g * L + j0 + j], sq);
            for (int64_t j = 0; j < n; j++)
                out[j0 + j] = j < had ? old[j0 + j] + seen[j] : seen[j];
        }
    }
}

/* x (B, d) += the block's output for B new tokens at angles cos, sin (B, D/2), storing each head's k, v at its
   pool row. `weights` (B, H, 1, max_keys) or NULL: the softmax weights, as cpu_decode.c writes them; `mass` or
   NULL: H2O's totals or KV-Compress's scores with this step's weights added (then `weights` must be given, as
   scratch); `k_new` (B, H_kv, D): the rotated new keys (stored from there; a policy's per-token state reads them).
   `work` holds B * (2d + (H + 2 H_kv) D + 2 H D + 3f) floats. Returns 0, or -1 if the attention's scratch could not
   be allocated. */
static int kvlab_decode_block(const Kernels *fn, const Block *w, const Pool *pool, float *x, int B, const float *cos,
                              const float *sin, float *weights, const Mass *mass, float *k_new, float *work,
                              int threads)
{
    const int H = w->n_head, H_kv = w->n_kv_head, D = w->head_dim;
    const int64_t d = w->d_model, f = w->d_ff, width = (int64_t)(H + 2 * H_kv) * D, HD = (int64_t)H * D;
    float *h = work, *qkv = h + B * d, *q = qkv + B * width, *att = q + B * HD, *y = att + B * HD;
    float *gate_up = y + B * d, *act = gate_up + B * 2 * f;

    fn->norm(x, w->attn_norm, h, B, d, w->eps);
    fn->matmul(h, w->qkv, qkv, B, d, width, threads); /* row b: its H q heads, H_kv k heads, H_kv v heads */
    for (int b = 0; b < B; b++) {
        const float *row = qkv + b * width, *c = cos + b * (D / 2), *s = sin + b * (D / 2);
        rotate(row, q + b * HD, H, D, c, s);
        for (int hk = 0; hk < H_kv; hk++) {
            float *k_row = k_new + ((int64_t)b * H_kv + hk) * D;
            rotate(row + (int64_t)(H + hk) * D, k_row, 1, D, c, s);
            store_row(fn, &pool->k, pool->at[b * H_kv + hk], k_row, D);
            store_row(fn, &pool->v, pool->at[b * H_kv + hk], row + (int64_t)(H + H_kv + hk) * D, D);
        }
    }
    const float scale = (float)(1.0 / sqrt((double)D)); /* SDPA's default, rounded as the Python side rounds it */
    if (fn->decode(q, att, weights, NULL, 0, pool->paged, B, H_kv, H / H_kv, 1, D, pool->max_keys, 1, scale,
                   threads) != 0)
        return -1;
    if (mass != NULL)
        add_mass(mass, weights, (int64_t)B * H_kv, H / H_kv, pool->max_keys);
    fn->matmul(att, w->out, y, B, HD, d, threads); /* att (B, H, 1, D) is (B, H * D): the heads side by side */
    for (int64_t i = 0; i < B * d; i++)
        x[i] += y[i];

    fn->norm(x, w->mlp_norm, h, B, d, w->eps);
    fn->matmul(h, w->gate_up, gate_up, B, d, 2 * f, threads); /* row b: gate (f), then up (f) */
    for (int b = 0; b < B; b++) {
        const float *g = gate_up + b * 2 * f, *u = g + f;
        for (int64_t j = 0; j < f; j++)
            act[b * f + j] = silu(g[j]) * u[j]; /* silu(gate) * up */
    }
    fn->matmul(act, w->down, y, B, f, d, threads);
    for (int64_t i = 0; i < B * d; i++)
        x[i] += y[i];
    return 0;
}

typedef struct { /* one layer's part of a decode step: what kvlab_decode_block takes that differs by layer */
    const Block *w;
    const Pool *pool;
    float *weights;
    const Mass *mass;
    float *k_new;
} Layer;

/* A decode step's blocks one after another, x (B, d) updated in place by each: layer i as kvlab_decode_block runs
   it, with layers[i]'s weights, pool and outputs. One call for the whole step: between two layers the Python side
   has nothing to do (their caches are independent), and each return to it after a layer finds its own code and data
   evicted from the core's caches by the layer's weights (about 50 us a layer at batch 1 on the 2-core Xeon). */
int kvlab_decode_layers(const Kernels *fn, const Layer *layers, int n_layer, float *x, int B, const float *cos,
                        const float *sin, float *work, int threads)
{
    for (int i = 0; i < n_layer; i++) {
        const Layer *l = layers + i;
        if (kvlab_decode_block(fn, l->w, l->pool, x, B, cos, sin, l->weights, l->mass, l->k_new, work, threads))
            return -1;
    }
    return 0;
}
