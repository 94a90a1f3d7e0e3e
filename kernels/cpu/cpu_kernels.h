/* cpu_kernels.h — the CPU backend's kernels as plain free functions.
 *
 * llm.c style: each layer is a pair x_forward / x_backward over row-major
 * fp32 arrays with explicit sizes; every argument carries its shape. The
 * accumulation conventions are those of kernels/backend.h: "+=" accumulates,
 * "=" overwrites, a NULL parameter gradient is not computed. Parallel with
 * OpenMP; every reduction has a fixed order, so results do not depend on the
 * number of threads. The ops table in cpu_backend.c wraps these. */
#ifndef MT_CPU_KERNELS_H
#define MT_CPU_KERNELS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* a * b + c in one rounding where the target has a fused multiply-add. ISO C mode
 * (-std=c11) does not contract a * b + c by itself; fmaf is inlined and vectorised
 * when FP_FAST_FMAF says it is fast. */
#ifdef FP_FAST_FMAF
#define CPU_MADD(a, b, c) fmaf(a, b, c)
#else
#define CPU_MADD(a, b, c) ((a) * (b) + (c))
#endif

/* c (M,N) = alpha * op(a) · op(b) + beta * c; a is (M,K) or (K,M) when trans_a,
 * b is (K,N) or (N,K) when trans_b. cblas_sgemm. */
void cpu_matmul(float *c, const float *a, const float *b, int M, int N, int K, int trans_a,
                int trans_b, float alpha, float beta);
/* Whether cpu_matmul computes products of many rows and at most 32 columns that reach
 * sgemm as their transpose (on, the default) or as asked (off). For tests. */
void cpu_matmul_narrow_use(int on);
/* cpu_matmul for a product with a short side (cpu_matmul_small.c): no packing of the
 * long operands, a transposed b copied (K·N floats: cpu_matmul takes this path only
 * when one of b's sides is short). Returns 0, or -1 (nothing written) for an empty
 * product or when out of memory. */
int cpu_matmul_small(float *c, const float *a, const float *b, int M, int N, int K, int trans_a,
                     int trans_b, float alpha, float beta);
/* c (m,n) = alpha * a (m,k) · b (k,n) + beta * c; beta == 0 never reads c, and with
 * alpha == beta == 1 each sum starts from c's value. Element (i,p) of a is
 * a[i * a_rs + p * a_cs] (a transposed operand has a_rs = 1); b and c are row-major
 * with row strides ldb, ldc. Every c element sums over p in order. One thread. */
void cpu_gemm_tile(float *c, size_t ldc, const float *a, size_t a_rs, size_t a_cs, const float *b,
                   size_t ldb, int m, int n, int k, float alpha, float beta);
/* c (M,N) = alpha * a · bᵀ + beta * c; a is (M,K), b is (N,K). Dot products of
 * contiguous rows, nothing packed: cpu_matmul's path for a few rows (decoding). */
void cpu_matmul_rows_nt(float *c, const float *a, const float *b, int M, int N, int K,
                        float alpha, float beta);
/* 8-bit weights for frozen projections (cpu_matmul_int8.c, which documents the format):
 * a weight (N,K) as codes on 255 steps from the minimum of each group of 32 inputs (or
 * on the group's own grid of at most 16 values where it lies on one), for
 * products whose input rows are quantised on the fly in groups of 32. transposed: w is
 * stored (K,N) and the copy is of its transpose (for input gradients, dy · W). NULL
 * where the CPU has neither AVX512-VNNI nor AVX2 with FMA, for a weight with a NaN or
 * an infinity, or when out of memory: the caller keeps the fp32 product. */
typedef struct cpu_weight_int8 cpu_weight_int8;
/* The int8 micro-kernels, each giving the same bits: none, AVX2 + FMA, AVX512-VNNI. */
enum { CPU_INT8_NONE = 0, CPU_INT8_AVX2 = 1, CPU_INT8_VNNI = 2 };
int cpu_int8_best_kernel(void); /* the best one this CPU runs */
int cpu_int8_kernel(void);      /* the one in use: the best unless a test chose another */
/* For tests: use `kernel` (one this CPU runs) from now on; CPU_INT8_NONE turns the int8
 * products off. Returns -1 for a kernel this CPU cannot run. */
int cpu_int8_use_kernel(int kernel);
int cpu_int8_supported(void); /* cpu_int8_kernel() != CPU_INT8_NONE */
/* For tests: with on = 0 the AVX2 kernel multiplies small codes as it does any (the
 * same bits, slower). */
void cpu_int8_use_small_codes(int on);
cpu_weight_int8 *cpu_weight_int8_create(const float *w, int N, int K, int transposed);
void cpu_weight_int8_free(cpu_weight_int8 *w);
/* 1 when every group of 32 weights lay on a grid of at most 16 values (a Q4 GGUF's
 * blocks): the copy keeps them exactly, and the AVX2 kernel runs them twice as wide. */
int cpu_weight_int8_small_codes(const cpu_weight_int8 *w);
/* c (M,N) = a (M,K) · wᵀ, or c += a · wᵀ when accumulate, with each row of a quantised
 * on the fly to integers in [-127, 127], a scale per group of 32, rounded to nearest
 * when round_seed is 0 and otherwise stochastically (unbiased, drawn from round_seed and
 * the row: the same bits for any number of threads); a row with a NaN or an infinity
 * gives NaN. Returns 0, or -1 (nothing written) when out of memory or without the
 * kernel. */
int cpu_matmul_int8(float *c, const float *a, const cpu_weight_int8 *w, int M, int accumulate,
                    uint64_t round_seed);
/* cpu_matmul_int8 in two steps, for products that share their input rows (q, k and v;
 * gate and up): the rows of a (M,K) quantised once as cpu_matmul_int8 would, NULL when
 * out of memory or without the kernel; then c (M,N) = those rows · wᵀ (or +=) for any
 * copy w of K inputs, the same bits as cpu_matmul_int8 with the same seed. Returns 0,
 * or -1 (nothing written) without the kernel or for a copy of another K. */
typedef struct cpu_int8_rows cpu_int8_rows;
cpu_int8_rows *cpu_int8_rows_quantize(const float *a, int M, int K, uint64_t round_seed);
int cpu_matmul_int8_rows(float *c, const cpu_int8_rows *rows, const cpu_weight_int8 *w,
                         int accumulate);
void cpu_int8_rows_free(cpu_int8_rows *rows);
/* out (N,C) += bias (C). */
void cpu_bias_forward(float *out, const float *bias, int N, int C);
/* dbias (C) += column sums of dout (N,C). */
void cpu_bias_backward(float *dbias, const float *dout, int N, int C);

/* out (n) = a (n) + b (n); out may alias a or b. */
void cpu_add(float *out, const float *a, const float *b, size_t n);
/* y (n) += alpha * x (n). */
void cpu_axpy(float *y, const float *x, float alpha, size_t n);

/* out (N,C) = table (V,C) [tokens (N)]. */
void cpu_embedding_forward(float *out, const int32_t *tokens, const float *table, int N, int C);
/* dtable (V,C) += scatter of dout (N,C) by tokens (N). */
void cpu_embedding_backward(float *dtable, const float *dout, const int32_t *tokens, int N, int C);

/* out (N,C) = weight (C) * x (N,C) * rstd; rstd (N) = 1/sqrt(mean(x^2) + eps). */
void cpu_rmsnorm_forward(float *out, float *rstd, const float *x, const float *weight, int N, int C,
                         float eps);
/* dx (N,C) +=, dweight (C) += or NULL, from dout (N,C), x (N,C), weight (C), rstd (N). */
void cpu_rmsnorm_backward(float *dx, float *dweight, const float *dout, const float *x,
                          const float *weight, const float *rstd, int N, int C);

/* x (N,H,D) rotated in place by cos, sin (P, D/2) at rows positions (N); rotate_half pairs. */
void cpu_rope_forward(float *x, const float *cos, const float *sin, const int32_t *positions, int N,
                      int H, int D);
/* dx (N,H,D) rotated in place by the inverse angle. */
void cpu_rope_backward(float *dx, const float *cos, const float *sin, const int32_t *positions,
                       int N, int H, int D);

/* Causal grouped-query attention, blocked, without (T,T) matrices.
 * Scratch bytes for `num_threads` threads; the kernels run on at most that many. */
size_t cpu_attention_work_bytes(int B, int T, int H, int KVH, int D, int num_threads);
/* out (B,T,H,D) =, lse (B,H,T) =, q (B,T,H,D), k, v (B,T,KVH,D), segments (B,T) or NULL. */
void cpu_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                           const int32_t *segments, int B, int T, int H, int KVH, int D,
                           float scale, void *work, int num_threads);
/* dq (B,T,H,D) =, dk, dv (B,T,KVH,D) =, from dout (B,T,H,D), out, lse (B,H,T), q, k, v. */
void cpu_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                            const float *lse, const float *q, const float *k, const float *v,
                            const int32_t *segments, int B, int T, int H, int KVH, int D,
                            float scale, void *work, int num_threads);

/* out (n) = silu(gate (n)) * up (n). */
void cpu_swiglu_forward(float *out, const float *gate, const float *up, size_t n);
/* dgate (n) =, dup (n) =, from dout (n), gate (n), up (n). */
void cpu_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                         const float *up, size_t n);

/* losses (N) = -log softmax(logits (N,V))[targets (N)]; 0 where ignored. */
void cpu_cross_entropy_forward(float *losses, const float *logits, const int32_t *targets, int N,
                               int V, int ignore_index);
/* dlogits (N,V) = dloss * (softmax(logits) - onehot(targets)); may alias logits. */
void cpu_cross_entropy_backward(float *dlogits, const float *logits, const int32_t *targets, int N,
                                int V, int ignore_index, float dloss);

/* y (n) = exp(x (n) - shift), for x - shift <= about 1 (a softmax after its max is
 * subtracted); exactly 0 where x - shift < -87 or is -INFINITY (masked entries).
 * Returns the sum of y in a fixed order. Vectorised polynomial, within 2 ulp of expf.
 * y may alias x. */
float cpu_exp_shifted(float *y, const float *x, float shift, int n);
/* cpu_exp_shifted through AVX2 (the default where the CPU has AVX2 and FMA: the same
 * elements, the sum in another fixed order) or the scalar loop (0); returns whether
 * AVX2 was in use. For tests. */
int cpu_exp_use_avx2(int use);

/* The largest element of x (n); -INFINITY when n == 0. */
float cpu_max(const float *x, int n);

/* Sum of x (n) squared, in double, in a fixed order. */
double cpu_sum_squares(const float *x, size_t n);

/* ---- plugin ABI 2: what optimizers, losses and adapters compute with -------------
 * The formulas are those of kernels/backend.h, evaluated in the order written there,
 * one rounding per operation (no fused multiply-add), so that the plugins that used to
 * loop over host memory get the same floats through the backend. Elementwise loops run
 * in parallel for large n; each element is computed alone, so nothing depends on the
 * number of threads. */

/* x (n) = value. */
void cpu_fill(float *x, float value, size_t n);
/* y (n) = alpha * x (n) + beta * y; beta == 0 does not read y. */
void cpu_axpby(float *y, float alpha, const float *x, float beta, size_t n);
/* y (n) = torch.lerp(y, x (n), w). */
void cpu_lerp(float *y, const float *x, float w, size_t n);
/* y (n) = (y * beta) + (alpha * a (n)) * b (n). */
void cpu_addcmul(float *y, float beta, float alpha, const float *a, const float *b, size_t n);
/* y (n) = y + (alpha * a (n)) / (sqrtf(b (n)) / b_div + eps). */
void cpu_addcdiv_sqrt(float *y, float alpha, const float *a, const float *b, float b_div,
                      float eps, size_t n);
/* y (n) = x (n) where x > y or x is NaN. */
void cpu_maximum(float *y, const float *x, size_t n);
/* y (n) = y + alpha * sign(x (n)); sign(0) = 0, sign(NaN) = NaN. */
void cpu_add_sign(float *y, float alpha, const float *x, size_t n);
/* y (n) *= x (n). */
void cpu_mul(float *y, const float *x, size_t n);
/* y (n) = (or += when accumulate) x_i * (1 / (1 - p)) where
 * mt_random_uniform(seed, counter0 + i) >= p, else 0 (or unchanged). */
void cpu_dropout(float *y, const float *x, float p, uint64_t seed, uint64_t counter0,
                 int accumulate, size_t n);
/* Per row of logits (n,V): lse (n), target_logit (n) or NULL, mean_logit (n) or NULL;
 * targets (n) < 0 or >= V are no target. Max-shifted, in double. */
void cpu_softmax_stats(float *lse, float *target_logit, float *mean_logit, const float *logits,
                       const int32_t *targets, int n, int V);
/* In place per row r of x (n,V): x_j = c0 exp(x_j - lse_r) + c1 (+ c2 at the target),
 * coefs (n,3) = (c0, c1, c2); in double, stored as float. */
void cpu_softmax_backward(float *x, const float *lse, const int32_t *targets, const float *coefs,
                          int n, int V);
/* out (n) = elements [first, first + n) of a 4-bit block-quantized tensor (backend.h). */
void cpu_dequantize_4bit(float *out, const uint8_t *codes, const uint8_t *absmax_q,
                         const float *absmax2, const float *table, float offset, int64_t first,
                         int64_t n, int block, int block2);

#endif /* MT_CPU_KERNELS_H */
