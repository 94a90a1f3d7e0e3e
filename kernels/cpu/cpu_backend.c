/* cpu_backend.c — the CPU backend: host memory and the ops table over cpu_kernels.h.
 *
 * Device memory is host memory (64-byte aligned, zeroed); upload and download
 * are copies and sync has nothing to wait for. Every op is a thin wrapper
 * around a free function of cpu_kernels.h. */
#include "backend.h"

#include <cblas.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

/* ---- memory ---- */

static void *cpu_alloc(mt_backend *be, size_t bytes) {
    (void)be;
    return mt_alloc_aligned(bytes);
}

static void cpu_free(mt_backend *be, void *ptr) {
    (void)be;
    free(ptr);
}

static mt_status cpu_upload(mt_backend *be, void *dst_device, const void *src_host, size_t bytes) {
    (void)be;
    if (bytes) memcpy(dst_device, src_host, bytes);
    return MT_OK;
}

static mt_status cpu_download(mt_backend *be, void *dst_host, const void *src_device,
                              size_t bytes) {
    (void)be;
    if (bytes) memcpy(dst_host, src_device, bytes);
    return MT_OK;
}

static void cpu_zero(mt_backend *be, void *ptr, size_t bytes) {
    (void)be;
    if (bytes) memset(ptr, 0, bytes);
}

static mt_status cpu_sync(mt_backend *be) {
    (void)be;
    return MT_OK;
}

/* ---- wrappers: the backend argument is not needed by the CPU kernels ---- */

static void op_matmul(mt_backend *be, float *c, const float *a, const float *b, int M, int N, int K,
                      int trans_a, int trans_b, float alpha, float beta) {
    (void)be;
    cpu_matmul(c, a, b, M, N, K, trans_a, trans_b, alpha, beta);
}

static void op_bias_forward(mt_backend *be, float *out, const float *bias, int N, int C) {
    (void)be;
    cpu_bias_forward(out, bias, N, C);
}

static void op_bias_backward(mt_backend *be, float *dbias, const float *dout, int N, int C) {
    (void)be;
    cpu_bias_backward(dbias, dout, N, C);
}

static void op_add(mt_backend *be, float *out, const float *a, const float *b, size_t n) {
    (void)be;
    cpu_add(out, a, b, n);
}

static void op_axpy(mt_backend *be, float *y, const float *x, float alpha, size_t n) {
    (void)be;
    cpu_axpy(y, x, alpha, n);
}

static void op_embedding_forward(mt_backend *be, float *out, const int32_t *tokens,
                                 const float *table, int N, int C) {
    (void)be;
    cpu_embedding_forward(out, tokens, table, N, C);
}

static void op_embedding_backward(mt_backend *be, float *dtable, const float *dout,
                                  const int32_t *tokens, int N, int C) {
    (void)be;
    cpu_embedding_backward(dtable, dout, tokens, N, C);
}

static void op_rmsnorm_forward(mt_backend *be, float *out, float *rstd, const float *x,
                               const float *weight, int N, int C, float eps) {
    (void)be;
    cpu_rmsnorm_forward(out, rstd, x, weight, N, C, eps);
}

static void op_rmsnorm_backward(mt_backend *be, float *dx, float *dweight, const float *dout,
                                const float *x, const float *weight, const float *rstd, int N,
                                int C) {
    (void)be;
    cpu_rmsnorm_backward(dx, dweight, dout, x, weight, rstd, N, C);
}

static void op_rope_forward(mt_backend *be, float *x, const float *cos, const float *sin,
                            const int32_t *positions, int N, int H, int D) {
    (void)be;
    cpu_rope_forward(x, cos, sin, positions, N, H, D);
}

static void op_rope_backward(mt_backend *be, float *dx, const float *cos, const float *sin,
                             const int32_t *positions, int N, int H, int D) {
    (void)be;
    cpu_rope_backward(dx, cos, sin, positions, N, H, D);
}

static void op_attention_forward(mt_backend *be, float *out, float *lse, const float *q,
                                 const float *k, const float *v, const int32_t *segments, int B,
                                 int T, int H, int KVH, int D, float scale, void *work) {
    cpu_attention_forward(out, lse, q, k, v, segments, B, T, H, KVH, D, scale, work,
                          be->num_threads);
}

static void op_attention_backward(mt_backend *be, float *dq, float *dk, float *dv,
                                  const float *dout, const float *out, const float *lse,
                                  const float *q, const float *k, const float *v,
                                  const int32_t *segments, int B, int T, int H, int KVH, int D,
                                  float scale, void *work) {
    cpu_attention_backward(dq, dk, dv, dout, out, lse, q, k, v, segments, B, T, H, KVH, D, scale,
                           work, be->num_threads);
}

static size_t op_attention_work_bytes(mt_backend *be, int B, int T, int H, int KVH, int D) {
    return cpu_attention_work_bytes(B, T, H, KVH, D, be->num_threads);
}

static void op_swiglu_forward(mt_backend *be, float *out, const float *gate, const float *up,
                              size_t n) {
    (void)be;
    cpu_swiglu_forward(out, gate, up, n);
}

static void op_swiglu_backward(mt_backend *be, float *dgate, float *dup, const float *dout,
                               const float *gate, const float *up, size_t n) {
    (void)be;
    cpu_swiglu_backward(dgate, dup, dout, gate, up, n);
}

static void op_cross_entropy_forward(mt_backend *be, float *losses, const float *logits,
                                     const int32_t *targets, int N, int V, int ignore_index) {
    (void)be;
    cpu_cross_entropy_forward(losses, logits, targets, N, V, ignore_index);
}

static void op_cross_entropy_backward(mt_backend *be, float *dlogits, const float *logits,
                                      const int32_t *targets, int N, int V, int ignore_index,
                                      float dloss) {
    (void)be;
    cpu_cross_entropy_backward(dlogits, logits, targets, N, V, ignore_index, dloss);
}

static double op_sum_squares(mt_backend *be, const float *x, size_t n) {
    (void)be;
    return cpu_sum_squares(x, n);
}

/* ---- plugin ABI 2 ---- */

static void op_copy(mt_backend *be, void *dst, const void *src, size_t bytes) {
    (void)be;
    if (bytes) memcpy(dst, src, bytes);
}

static void op_fill(mt_backend *be, float *x, float value, size_t n) {
    (void)be;
    cpu_fill(x, value, n);
}

static void op_axpby(mt_backend *be, float *y, float alpha, const float *x, float beta, size_t n) {
    (void)be;
    cpu_axpby(y, alpha, x, beta, n);
}

static void op_lerp(mt_backend *be, float *y, const float *x, float w, size_t n) {
    (void)be;
    cpu_lerp(y, x, w, n);
}

static void op_addcmul(mt_backend *be, float *y, float beta, float alpha, const float *a,
                       const float *b, size_t n) {
    (void)be;
    cpu_addcmul(y, beta, alpha, a, b, n);
}

static void op_addcdiv_sqrt(mt_backend *be, float *y, float alpha, const float *a, const float *b,
                            float b_div, float eps, size_t n) {
    (void)be;
    cpu_addcdiv_sqrt(y, alpha, a, b, b_div, eps, n);
}

static void op_maximum(mt_backend *be, float *y, const float *x, size_t n) {
    (void)be;
    cpu_maximum(y, x, n);
}

static void op_add_sign(mt_backend *be, float *y, float alpha, const float *x, size_t n) {
    (void)be;
    cpu_add_sign(y, alpha, x, n);
}

static void op_mul(mt_backend *be, float *y, const float *x, size_t n) {
    (void)be;
    cpu_mul(y, x, n);
}

static void op_dropout(mt_backend *be, float *y, const float *x, float p, uint64_t seed,
                       uint64_t counter0, int accumulate, size_t n) {
    (void)be;
    cpu_dropout(y, x, p, seed, counter0, accumulate, n);
}

static void op_softmax_stats(mt_backend *be, float *lse, float *target_logit, float *mean_logit,
                             const float *logits, const int32_t *targets, int n, int V) {
    (void)be;
    cpu_softmax_stats(lse, target_logit, mean_logit, logits, targets, n, V);
}

static void op_softmax_backward(mt_backend *be, float *x, const float *lse,
                                const int32_t *targets, const float *coefs, int n, int V) {
    (void)be;
    cpu_softmax_backward(x, lse, targets, coefs, n, V);
}

static void op_dequantize_4bit(mt_backend *be, float *out, const uint8_t *codes,
                               const uint8_t *absmax_q, const float *absmax2, const float *table,
                               float offset, int64_t first, int64_t n, int block, int block2) {
    (void)be;
    cpu_dequantize_4bit(out, codes, absmax_q, absmax2, table, offset, first, n, block, block2);
}

static void *op_weight_int8_create(mt_backend *be, const float *w, int N, int K, int transposed,
                                   int use) {
    (void)be;
    /* The AVX2 kernel's vpmaddwd does 16 multiply-adds an instruction, as many as two
     * fp32 FMAs: it wins where sgemm repacks for a few rows (decoding, 1.3x), and loses
     * on training's large products (a LoRA step ran at 0.88x). Its kernel for small
     * codes (a Q4 base's weights) does 32 and wins there too; docs/speed.md. */
    cpu_weight_int8 *q = cpu_weight_int8_create(w, N, K, transposed);
    if (q && use == MT_INT8_USE_TRAINING && cpu_int8_kernel() != CPU_INT8_VNNI &&
        !cpu_weight_int8_small_codes(q)) {
        cpu_weight_int8_free(q);
        return NULL;
    }
    return q;
}

static void op_weight_int8_free(mt_backend *be, void *w) {
    (void)be;
    cpu_weight_int8_free(w);
}

static int op_matmul_int8(mt_backend *be, float *c, const float *a, const void *w, int M,
                          int accumulate, uint64_t round_seed) {
    (void)be;
    return cpu_matmul_int8(c, a, w, M, accumulate, round_seed);
}

static void *op_int8_rows_create(mt_backend *be, const float *a, int M, int K) {
    (void)be;
    return cpu_int8_rows_quantize(a, M, K, 0);
}

static int op_matmul_int8_rows(mt_backend *be, float *c, const void *rows, const void *w,
                               int accumulate) {
    (void)be;
    return cpu_matmul_int8_rows(c, rows, w, accumulate);
}

static void op_int8_rows_free(mt_backend *be, void *rows) {
    (void)be;
    cpu_int8_rows_free(rows);
}

static const mt_backend_ops cpu_ops = {
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_upload,
    .download = cpu_download,
    .zero = cpu_zero,
    .sync = cpu_sync,
    .matmul = op_matmul,
    .bias_forward = op_bias_forward,
    .bias_backward = op_bias_backward,
    .add = op_add,
    .axpy = op_axpy,
    .embedding_forward = op_embedding_forward,
    .embedding_backward = op_embedding_backward,
    .rmsnorm_forward = op_rmsnorm_forward,
    .rmsnorm_backward = op_rmsnorm_backward,
    .rope_forward = op_rope_forward,
    .rope_backward = op_rope_backward,
    .attention_forward = op_attention_forward,
    .attention_backward = op_attention_backward,
    .attention_work_bytes = op_attention_work_bytes,
    .swiglu_forward = op_swiglu_forward,
    .swiglu_backward = op_swiglu_backward,
    .cross_entropy_forward = op_cross_entropy_forward,
    .cross_entropy_backward = op_cross_entropy_backward,
    .sum_squares = op_sum_squares,
    .copy = op_copy,
    .fill = op_fill,
    .axpby = op_axpby,
    .lerp = op_lerp,
    .addcmul = op_addcmul,
    .addcdiv_sqrt = op_addcdiv_sqrt,
    .maximum = op_maximum,
    .add_sign = op_add_sign,
    .mul = op_mul,
    .dropout = op_dropout,
    .softmax_stats = op_softmax_stats,
    .softmax_backward = op_softmax_backward,
    .dequantize_4bit = op_dequantize_4bit,
    .weight_int8_create = op_weight_int8_create,
    .weight_int8_free = op_weight_int8_free,
    .int8_rows_create = op_int8_rows_create,
    .matmul_int8_rows = op_matmul_int8_rows,
    .int8_rows_free = op_int8_rows_free,
    .matmul_int8 = op_matmul_int8,
};

mt_status mt_backend_cpu_init(mt_backend *be, int num_threads, mt_error *err) {
    if (!be) return mt_error_set(err, MT_ERR_INVALID_ARG, "cpu backend: be is NULL");
    if (num_threads > 0) {
        omp_set_num_threads(num_threads);
#ifdef OPENBLAS_VERSION
        openblas_set_num_threads(num_threads);
#endif
    } else {
        num_threads = omp_get_max_threads();
    }
    memset(be, 0, sizeof *be);
    be->ops = &cpu_ops;
    be->device = MT_DEVICE_CPU;
    be->name = "cpu";
    be->num_threads = num_threads;
    be->ctx = NULL;
    return MT_OK;
}

void mt_backend_cpu_shutdown(mt_backend *be) {
    if (!be) return;
    memset(be, 0, sizeof *be);
}
