/* backend.h — the one compute interface every backend implements.
 *
 * Kernels know tensors and numbers only: no model names, no files, no Lua.
 * Every operation works on device pointers with explicit sizes, in the style
 * of llm.c; each argument carries its shape in a comment. All arrays are
 * row-major and contiguous. Compute is fp32 on the CPU backend, except the optional
 * int8 products of frozen weights (generation, and training when a recipe asks).
 *
 * Conventions for backward passes (as in Torch7's nn): a gradient argument
 * documented as "+=" is accumulated into (the caller zeroes it when a fresh
 * value is wanted); one documented as "=" is overwritten. Parameter gradients
 * that are NULL are not computed (the frozen path).
 *
 * Optional slots say so; the host checks for NULL before calling them. */
#ifndef MT_KERNELS_BACKEND_H
#define MT_KERNELS_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "moontune/moontune.h"
#include "moontune/plugin.h" /* mt_mix64 */

typedef struct mt_backend mt_backend;

/* What an int8 weight copy is for (weight_int8_create's `use`): decoding (a few rows a
 * product, and every row's result the same whatever rows share its product) or
 * training's frozen base (products of hundreds of rows, where fp32 runs near peak). */
enum { MT_INT8_USE_DECODING = 0, MT_INT8_USE_TRAINING = 1 };

/* The largest communicator id a backend's comm_id writes (NCCL's is 128 bytes). */
#define MT_COMM_ID_BYTES 256

typedef struct mt_backend_ops {
    /* ---- memory ---- */
    /* Zero-filled, 64-byte aligned device memory; NULL when out of memory. */
    void *(*alloc)(mt_backend *be, size_t bytes);
    void (*free)(mt_backend *be, void *ptr);
    mt_status (*upload)(mt_backend *be, void *dst_device, const void *src_host, size_t bytes);
    mt_status (*download)(mt_backend *be, void *dst_host, const void *src_device, size_t bytes);
    void (*zero)(mt_backend *be, void *ptr, size_t bytes);
    /* Wait for queued work; errors from asynchronous work surface here. */
    mt_status (*sync)(mt_backend *be);

    /* ---- matrix products ---- */
    /* c = alpha * op(a) · op(b) + beta * c, row-major.
     * c is (M,N); op(a) is (M,K): a is (M,K), or (K,M) when trans_a;
     * op(b) is (K,N): b is (K,N), or (N,K) when trans_b. */
    void (*matmul)(mt_backend *be, float *c, const float *a, const float *b, int M, int N, int K,
                   int trans_a, int trans_b, float alpha, float beta);
    /* out (N,C) += bias (C) broadcast over rows. */
    void (*bias_forward)(mt_backend *be, float *out, const float *bias, int N, int C);
    /* dbias (C) += column sums of dout (N,C). */
    void (*bias_backward)(mt_backend *be, float *dbias, const float *dout, int N, int C);

    /* ---- elementwise ---- */
    /* out (n) = a (n) + b (n); out may alias a or b (the residual add). */
    void (*add)(mt_backend *be, float *out, const float *a, const float *b, size_t n);
    /* y (n) += alpha * x (n). */
    void (*axpy)(mt_backend *be, float *y, const float *x, float alpha, size_t n);

    /* ---- embedding ---- */
    /* out (N,C) = table (V,C) [tokens (N)]. Tokens are already validated < V. */
    void (*embedding_forward)(mt_backend *be, float *out, const int32_t *tokens, const float *table,
                              int N, int C);
    /* dtable (V,C) += scatter of dout (N,C) by tokens (N); deterministic. */
    void (*embedding_backward)(mt_backend *be, float *dtable, const float *dout,
                               const int32_t *tokens, int N, int C);

    /* ---- RMSNorm (Hugging Face Llama: weight * x * rsqrt(mean(x^2) + eps)) ---- */
    /* out (N,C), rstd (N) saved for backward, x (N,C), weight (C). */
    void (*rmsnorm_forward)(mt_backend *be, float *out, float *rstd, const float *x,
                            const float *weight, int N, int C, float eps);
    /* dx (N,C) +=, dweight (C) += or NULL, from dout (N,C), x (N,C), weight (C), rstd (N). */
    void (*rmsnorm_backward)(mt_backend *be, float *dx, float *dweight, const float *dout,
                             const float *x, const float *weight, const float *rstd, int N, int C);

    /* ---- rotary embeddings (Hugging Face convention: rotate_half pairs i and i + D/2) ---- */
    /* x (N,H,D) rotated in place. cos, sin (P, D/2) tables: cos[p][i] = cos(p * inv_freq[i]);
     * positions (N) index rows of the tables and are already validated < P. */
    void (*rope_forward)(mt_backend *be, float *x, const float *cos, const float *sin,
                         const int32_t *positions, int N, int H, int D);
    /* dx (N,H,D) in place: the inverse rotation (the transpose of forward). */
    void (*rope_backward)(mt_backend *be, float *dx, const float *cos, const float *sin,
                          const int32_t *positions, int N, int H, int D);

    /* ---- causal grouped-query attention ---- */
    /* Query head h uses key/value head h / (H / KVH). Query t of row b attends to keys
     * s <= t, and when segments is not NULL only to keys with segments[b][s] ==
     * segments[b][t] (packed examples never see each other) or == MT_SHARED_SEGMENT
     * (a prompt prefix the row's examples share, plugin.h). Scores are scaled by
     * `scale` (1/sqrt(D) for Llama). Probabilities are not stored: lse keeps each
     * row's log-sum-exp and backward recomputes them.
     * out (B,T,H,D) =, lse (B,H,T) =, q (B,T,H,D), k, v (B,T,KVH,D), segments (B,T) or NULL,
     * work: attention_work_bytes(...) bytes of backend memory, reused by every call. */
    void (*attention_forward)(mt_backend *be, float *out, float *lse, const float *q,
                              const float *k, const float *v, const int32_t *segments, int B,
                              int T, int H, int KVH, int D, float scale, void *work);
    /* dq (B,T,H,D) =, dk, dv (B,T,KVH,D) =, from dout (B,T,H,D) and the forward's
     * out, lse, q, k, v, segments. */
    void (*attention_backward)(mt_backend *be, float *dq, float *dk, float *dv, const float *dout,
                               const float *out, const float *lse, const float *q,
                               const float *k, const float *v, const int32_t *segments, int B,
                               int T, int H, int KVH, int D, float scale, void *work);
    size_t (*attention_work_bytes)(mt_backend *be, int B, int T, int H, int KVH, int D);

    /* ---- SwiGLU: out = silu(gate) * up ---- */
    /* out (n) =, gate (n), up (n). */
    void (*swiglu_forward)(mt_backend *be, float *out, const float *gate, const float *up,
                           size_t n);
    /* dgate (n) =, dup (n) =, from dout (n), gate (n), up (n). */
    void (*swiglu_backward)(mt_backend *be, float *dgate, float *dup, const float *dout,
                            const float *gate, const float *up, size_t n);

    /* ---- softmax cross-entropy with an ignore mask ---- */
    /* losses (N) = -log softmax(logits (N,V))[targets]; 0 where targets[i] == ignore_index
     * (or is negative). Targets are already validated < V. */
    void (*cross_entropy_forward)(mt_backend *be, float *losses, const float *logits,
                                  const int32_t *targets, int N, int V, int ignore_index);
    /* dlogits (N,V) = dloss * (softmax(logits) - onehot(targets)), zero rows where ignored.
     * dlogits may alias logits (computed in place to save memory). */
    void (*cross_entropy_backward)(mt_backend *be, float *dlogits, const float *logits,
                                   const int32_t *targets, int N, int V, int ignore_index,
                                   float dloss);

    /* ---- reductions ---- */
    /* Sum of squares of x (n), accumulated in double (for gradient norms and checks). */
    double (*sum_squares)(mt_backend *be, const float *x, size_t n);

    /* ---- plugin ABI 2: the operations optimizers, losses and adapters compute with
     * (moontune/plugin.h states each one's exact formula; the host table validates the
     * tensors and calls these with raw device pointers) ---- */
    /* dst (bytes) = src (bytes), both device memory; they do not overlap. */
    void (*copy)(mt_backend *be, void *dst, const void *src, size_t bytes);
    /* x (n) = value. */
    void (*fill)(mt_backend *be, float *x, float value, size_t n);
    /* y (n) = alpha * x (n) + beta * y; beta == 0 overwrites y (NaN in y does not survive). */
    void (*axpby)(mt_backend *be, float *y, float alpha, const float *x, float beta, size_t n);
    /* y (n) = torch.lerp(y, x, w): y + w (x - y) when |w| < 0.5, else x - (x - y)(1 - w). */
    void (*lerp)(mt_backend *be, float *y, const float *x, float w, size_t n);
    /* y (n) = beta * y + alpha * a (n) * b (n), evaluated as (y * beta) + (alpha * a) * b. */
    void (*addcmul)(mt_backend *be, float *y, float beta, float alpha, const float *a,
                    const float *b, size_t n);
    /* y (n) = y + alpha * a (n) / (sqrtf(b (n)) / b_div + eps). */
    void (*addcdiv_sqrt)(mt_backend *be, float *y, float alpha, const float *a, const float *b,
                         float b_div, float eps, size_t n);
    /* y (n) = x (n) when x > y or x is NaN, else y. */
    void (*maximum)(mt_backend *be, float *y, const float *x, size_t n);
    /* y (n) += alpha * sign(x (n)), sign(0) = 0, sign(NaN) = NaN. */
    void (*add_sign)(mt_backend *be, float *y, float alpha, const float *x, size_t n);
    /* y (n) *= x (n). */
    void (*mul)(mt_backend *be, float *y, const float *x, size_t n);
    /* y (n) (= or += when accumulate) u_i >= p ? x_i / (1 - p) : 0, where u_i is
     * mt_random_uniform(seed, counter0 + i) (below), computed as x_i * (1 / (1 - p)). */
    void (*dropout)(mt_backend *be, float *y, const float *x, float p, uint64_t seed,
                    uint64_t counter0, int accumulate, size_t n);
    /* Per row r of logits (n,V), targets (n): lse (n) = log Σ exp, target_logit (n) = x[t]
     * (0 when t >= V: a row without a target), mean_logit (n) = Σ x / V; the last two may
     * be NULL. A row with t < 0 is skipped: its three values are 0 and its logits are not
     * read (a loss's masked prompt rows cost nothing). Max-shifted, sums in double. */
    void (*softmax_stats)(mt_backend *be, float *lse, float *target_logit, float *mean_logit,
                          const float *logits, const int32_t *targets, int n, int V);
    /* In place per row r of x (n,V), coefs (n,3): x_j = c0 * exp(x_j - lse_r) + c1, then
     * x_t += c2 where row r has a target t (0 <= t < V). A row with t < 0 is set to 0
     * (skipped, as in softmax_stats). In double, stored as float. */
    void (*softmax_backward)(mt_backend *be, float *x, const float *lse, const int32_t *targets,
                             const float *coefs, int n, int V);
    /* out (n) = elements [first, first+n) of a 4-bit tensor: code c_i (high nibble of
     * codes[i/2] for even i, low for odd), scale s_b = table[16 + absmax_q[b]] *
     * absmax2[b / block2] + offset for block b = i / block, out = table[c_i] * s_b. */
    void (*dequantize_4bit)(mt_backend *be, float *out, const uint8_t *codes,
                            const uint8_t *absmax_q, const float *absmax2, const float *table,
                            float offset, int64_t first, int64_t n, int block, int block2);

    /* ---- int8 weights for frozen projections (optional: NULL where the backend has none) ----
     * weight_int8_create: an 8-bit copy of w (N,K) (a backend's own format: the CPU's
     * is codes per group of 32 inputs, kernels/cpu/cpu_matmul_int8.c), or with
     * transposed of wᵀ where w is stored (K,N); for products that tolerate quantisation
     * (decoding, and frozen weights' products in training when a recipe asks: never a
     * trainable weight); `use` says which (MT_INT8_USE_*): a backend declines a copy
     * for a use its int8 products would slow down. NULL when this backend or this CPU
     * has no int8 products for it (the caller keeps its fp32 product), or when w has
     * a NaN or an infinity.
     * matmul_int8: c (M,N) = a (M,K) · wᵀ, or += with accumulate, the rows of a
     * quantised on the fly to 8 bits, rounded to nearest when round_seed is 0 and
     * otherwise stochastically from that seed (unbiased: for gradients, whose small
     * values rounding to nearest would drop); returns 0, or nonzero with nothing
     * written when it could not run (then use matmul). */
    void *(*weight_int8_create)(mt_backend *be, const float *w, int N, int K, int transposed,
                                int use);
    void (*weight_int8_free)(mt_backend *be, void *w);
    int (*matmul_int8)(mt_backend *be, float *c, const float *a, const void *w, int M,
                       int accumulate, uint64_t round_seed);
    /* matmul_int8 in two steps for products that share their input (optional: NULL
     * where the backend has none; then matmul_int8): int8_rows_create quantises a (M,K)
     * to nearest once (NULL when it cannot), matmul_int8_rows multiplies those rows by
     * any int8 copy of K inputs with matmul_int8's bits (0, or nonzero with nothing
     * written), int8_rows_free releases them. */
    void *(*int8_rows_create)(mt_backend *be, const float *a, int M, int K);
    int (*matmul_int8_rows)(mt_backend *be, float *c, const void *rows, const void *w,
                            int accumulate);
    void (*int8_rows_free)(mt_backend *be, void *rows);

    /* ---- data parallel (optional: NULL where the backend brings no collective library) ----
     * A communicator over the ranks of a data-parallel job for device memory (NCCL on
     * CUDA). Rank 0 fills an opaque id of at most `bytes` (MT_COMM_ID_BYTES) with
     * comm_id; every rank receives it (the core sends it over MPI) and joins with
     * comm_init; comm_sum_f32 then sums n device buffers of counts[i] floats each in place
     * over the ranks, as one grouped call, and returns when the sums are done. Every rank
     * calls them in the same order. */
    mt_status (*comm_id)(mt_backend *be, void *id, size_t bytes);
    mt_status (*comm_init)(mt_backend *be, const void *id, size_t bytes, int rank, int size);
    mt_status (*comm_sum_f32)(mt_backend *be, float *const *bufs, const size_t *counts, size_t n);
} mt_backend_ops;

struct mt_backend {
    const mt_backend_ops *ops;
    mt_device device;
    const char *name; /* "cpu", "cuda" */
    int num_threads;  /* CPU worker threads (OpenMP); informational elsewhere */
    void *ctx;        /* backend-private state */
};

/* The CPU backend (kernels/cpu). num_threads <= 0 uses OpenMP's default. */
mt_status mt_backend_cpu_init(mt_backend *be, int num_threads, mt_error *err);
void mt_backend_cpu_shutdown(mt_backend *be);

/* The OpenBLAS kernels in use ("SkylakeX", "Haswell", "Prescott", ...:
 * openblas_get_corename). */
const char *mt_cpu_blas_core(void);
/* The OPENBLAS_CORETYPE this CPU should run when OpenBLAS chose a core of CPUs without
 * AVX2 (an OpenBLAS older than the CPU), else NULL (kernels/cpu/cpu_blas_core.c). */
const char *mt_cpu_blas_better_core(void);
/* The same decision from a core name and the CPU's features, for tests. */
const char *mt_cpu_blas_core_for(const char *current, int avx2_fma, int avx512, int avx512_bf16);

/* The counter-based uniform stream of the plugin ABI (host->random_uniform): the seed
 * mixed, then mixed with the counter; 24 bits, exactly representable, in [0, 1).
 * Inline so that every backend's dropout draws the same numbers. */
static inline float mt_random_uniform(uint64_t seed, uint64_t counter) {
    uint64_t x = mt_mix64(mt_mix64(seed) ^ counter);
    return (float)(x >> 40) * (1.0f / 16777216.0f);
}

/* ---- what the core provides to backends --------------------------------------
 * Kernels include no core header: these few core functions (core/base/util.c) are
 * part of the backend interface. */
/* Sets err (when not NULL) to status and the formatted message; returns status. */
mt_status mt_error_set(mt_error *err, mt_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
/* calloc that names what it allocates in err when memory runs out. */
void *mt_calloc(size_t count, size_t size, const char *what, mt_error *err);
/* Zero-filled, 64-byte aligned memory (size rounded up); free() releases it. */
void *mt_alloc_aligned(size_t bytes);

/* The CUDA backend (kernels/cuda), present when the build found nvcc. device_index
 * counts the visible devices modulo their number: a data-parallel rank passes its index
 * on its node and gets its own GPU, or the one CUDA_VISIBLE_DEVICES left it. */
#ifdef MT_HAVE_CUDA
mt_status mt_backend_cuda_init(mt_backend *be, int device_index, mt_error *err);
void mt_backend_cuda_shutdown(mt_backend *be);
#endif

#endif /* MT_KERNELS_BACKEND_H */
