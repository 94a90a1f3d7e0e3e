/* host_table.c — the function table every plugin receives (moontune/plugin.h).
 *
 * Model handles are mt_model pointers and linear handles mt_linear pointers, cast
 * to the opaque types of the ABI. Tensors carry their device; every compute slot runs
 * on the backend of that device (model/device.h), so a plugin never touches memory
 * that may live on a GPU. */
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h"
#include "dist/dist.h"
#include "model/device.h"
#include "model/model.h"
#include "plugin/adapter_io.h"
#include "plugin/registry.h"

#define MODEL(h) ((mt_model *)(h))
#define LINEAR(h) ((mt_linear *)(h))

static void *host_alloc(size_t bytes) { return mt_alloc_aligned(bytes); }

static void host_free(void *p) { free(p); }

static void host_log(mt_log_level level, const char *plugin, const char *fmt, ...) {
    static const char *names[] = {"debug", "info", "warning", "error"};
    if (level == MT_LOG_DEBUG && !getenv("MOONTUNE_DEBUG")) return;
    /* a data-parallel job tells its information once, from rank 0 (dist/dist.h) */
    const char *all = getenv("MOONTUNE_LOG_ALL_RANKS");
    if (mt_dist_rank() != 0 && level < MT_LOG_WARN && !(all && !strcmp(all, "1"))) return;
    va_list ap;
    va_start(ap, fmt);
    if (mt_dist_size() > 1) fprintf(stderr, "rank %d: ", mt_dist_rank());
    fprintf(stderr, "moontune [%s] %s: ", plugin ? plugin : "plugin",
            (unsigned)level < 4 ? names[level] : "log");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static mt_status host_error(mt_error *err, mt_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    mt_error_setv(err, status, fmt, ap);
    va_end(ap);
    return status;
}

/* ---- compute on tensors ----------------------------------------------------------
 *
 * Every operation checks its tensors (device, dtype, element counts, data), finds the
 * backend of their device and calls the backend's op. A misuse is recorded, not
 * returned: the first failure is kept (later operations are skipped, since their
 * inputs may be wrong) until mt_host_check reports it for the plugin call that made it,
 * as CUDA keeps its first error. */

static mt_error op_error; /* the first failure since the last check; status MT_OK: none */

MT_PRINTF(1, 2) static void op_fail(const char *fmt, ...) {
    if (op_error.status != MT_OK) return;
    va_list ap;
    va_start(ap, fmt);
    mt_error_setv(&op_error, MT_ERR_INVALID_ARG, fmt, ap);
    va_end(ap);
}

static const char *device_name(mt_device d) {
    return d == MT_DEVICE_CPU ? "cpu" : d == MT_DEVICE_CUDA ? "cuda" : "an unknown device";
}

/* The backend of t's device when t is a usable tensor of dtype `dtype`; NULL (recorded)
 * otherwise, or when an earlier failure is pending. */
static mt_backend *op_backend(const char *op, const char *arg, const mt_tensor *t,
                              mt_dtype dtype) {
    if (op_error.status != MT_OK) return NULL;
    if (!t) {
        op_fail("host op %s: %s is NULL", op, arg);
        return NULL;
    }
    if (t->dtype != dtype) {
        op_fail("host op %s: %s has dtype %s, expected %s", op, arg,
                mt_dtype_name(t->dtype) ? mt_dtype_name(t->dtype) : "(invalid)",
                mt_dtype_name(dtype));
        return NULL;
    }
    if (t->ndim < 0 || t->ndim > MT_MAX_DIMS || mt_tensor_numel(t) < 0) {
        op_fail("host op %s: %s has an invalid shape", op, arg);
        return NULL;
    }
    if (!t->data && mt_tensor_numel(t) > 0) {
        op_fail("host op %s: %s has no memory (data NULL)", op, arg);
        return NULL;
    }
    mt_error err = {0};
    mt_backend *be = mt_device_backend(t->device, &err);
    if (!be) op_fail("host op %s: %s: %s", op, arg, err.msg);
    return be;
}

/* Whether `other` may join the operation on `be` with n elements. */
static int op_same(const char *op, const char *arg, mt_backend *be, const mt_tensor *t,
                   const mt_tensor *other, mt_dtype dtype) {
    if (!op_backend(op, arg, other, dtype)) return 0;
    if (other->device != t->device) {
        op_fail("host op %s: %s is on %s, the first argument on %s", op, arg,
                device_name(other->device), device_name(t->device));
        return 0;
    }
    if (mt_tensor_numel(other) != mt_tensor_numel(t)) {
        char a[96], b[96];
        op_fail("host op %s: %s has shape %s, the first argument %s (element counts differ)", op,
                arg, mt_shape_format(a, sizeof a, other->ndim, other->shape),
                mt_shape_format(b, sizeof b, t->ndim, t->shape));
        return 0;
    }
    (void)be;
    return 1;
}

#define N_OF(t) ((size_t)mt_tensor_numel(t))

static void host_matmul(mt_tensor *c, const mt_tensor *a, const mt_tensor *b, int trans_a,
                        int trans_b, float alpha, float beta) {
    mt_backend *be = op_backend("matmul", "c", c, MT_F32);
    if (!be || !op_backend("matmul", "a", a, MT_F32) || !op_backend("matmul", "b", b, MT_F32))
        return;
    char sa[96], sb[96], sc[96];
    if (c->ndim != 2 || a->ndim != 2 || b->ndim != 2 || a->device != c->device ||
        b->device != c->device) {
        op_fail("host op matmul: needs 2-D tensors on one device, got c %s on %s, a %s on %s, "
                "b %s on %s",
                mt_shape_format(sc, sizeof sc, c->ndim, c->shape), device_name(c->device),
                mt_shape_format(sa, sizeof sa, a->ndim, a->shape), device_name(a->device),
                mt_shape_format(sb, sizeof sb, b->ndim, b->shape), device_name(b->device));
        return;
    }
    const int64_t M = c->shape[0], N = c->shape[1];
    const int64_t K = trans_a ? a->shape[0] : a->shape[1];
    const int64_t am = trans_a ? a->shape[1] : a->shape[0];
    const int64_t bk = trans_b ? b->shape[1] : b->shape[0], bn = trans_b ? b->shape[0] : b->shape[1];
    if (am != M || bn != N || bk != K || M > INT32_MAX || N > INT32_MAX || K > INT32_MAX) {
        op_fail("host op matmul: shapes do not fit: c %s = op(a %s%s) · op(b %s%s)",
                mt_shape_format(sc, sizeof sc, c->ndim, c->shape),
                mt_shape_format(sa, sizeof sa, a->ndim, a->shape), trans_a ? "^T" : "",
                mt_shape_format(sb, sizeof sb, b->ndim, b->shape), trans_b ? "^T" : "");
        return;
    }
    if (M == 0 || N == 0) return;
    be->ops->matmul(be, c->data, a->data, b->data, (int)M, (int)N, (int)K, trans_a, trans_b, alpha,
                    beta);
}

static void host_copy(mt_tensor *dst, const mt_tensor *src) {
    mt_backend *be = op_backend("copy", "dst", dst, dst ? dst->dtype : MT_F32);
    if (!be || !op_same("copy", "src", be, dst, src, dst->dtype) || !N_OF(dst)) return;
    be->ops->copy(be, dst->data, src->data, mt_tensor_nbytes(dst));
}

static void host_fill(mt_tensor *t, float value) {
    mt_backend *be = op_backend("fill", "t", t, MT_F32);
    if (be && N_OF(t)) be->ops->fill(be, t->data, value, N_OF(t));
}

static void host_axpby(mt_tensor *y, float alpha, const mt_tensor *x, float beta) {
    mt_backend *be = op_backend("axpby", "y", y, MT_F32);
    if (be && op_same("axpby", "x", be, y, x, MT_F32) && N_OF(y))
        be->ops->axpby(be, y->data, alpha, x->data, beta, N_OF(y));
}

static void host_lerp(mt_tensor *y, const mt_tensor *x, float w) {
    mt_backend *be = op_backend("lerp", "y", y, MT_F32);
    if (be && op_same("lerp", "x", be, y, x, MT_F32) && N_OF(y))
        be->ops->lerp(be, y->data, x->data, w, N_OF(y));
}

static void host_addcmul(mt_tensor *y, float beta, float alpha, const mt_tensor *a,
                         const mt_tensor *b) {
    mt_backend *be = op_backend("addcmul", "y", y, MT_F32);
    if (be && op_same("addcmul", "a", be, y, a, MT_F32) && op_same("addcmul", "b", be, y, b, MT_F32) &&
        N_OF(y))
        be->ops->addcmul(be, y->data, beta, alpha, a->data, b->data, N_OF(y));
}

static void host_addcdiv_sqrt(mt_tensor *y, float alpha, const mt_tensor *a, const mt_tensor *b,
                              float b_div, float eps) {
    mt_backend *be = op_backend("addcdiv_sqrt", "y", y, MT_F32);
    if (be && op_same("addcdiv_sqrt", "a", be, y, a, MT_F32) &&
        op_same("addcdiv_sqrt", "b", be, y, b, MT_F32) && N_OF(y))
        be->ops->addcdiv_sqrt(be, y->data, alpha, a->data, b->data, b_div, eps, N_OF(y));
}

static void host_maximum(mt_tensor *y, const mt_tensor *x) {
    mt_backend *be = op_backend("maximum", "y", y, MT_F32);
    if (be && op_same("maximum", "x", be, y, x, MT_F32) && N_OF(y))
        be->ops->maximum(be, y->data, x->data, N_OF(y));
}

static void host_add_sign(mt_tensor *y, float alpha, const mt_tensor *x) {
    mt_backend *be = op_backend("add_sign", "y", y, MT_F32);
    if (be && op_same("add_sign", "x", be, y, x, MT_F32) && N_OF(y))
        be->ops->add_sign(be, y->data, alpha, x->data, N_OF(y));
}

static void host_mul(mt_tensor *y, const mt_tensor *x) {
    mt_backend *be = op_backend("mul", "y", y, MT_F32);
    if (be && op_same("mul", "x", be, y, x, MT_F32) && N_OF(y))
        be->ops->mul(be, y->data, x->data, N_OF(y));
}

static void host_dropout(mt_tensor *y, const mt_tensor *x, float p, uint64_t seed,
                         uint64_t counter0, int accumulate) {
    mt_backend *be = op_backend("dropout", "y", y, MT_F32);
    if (!be || !op_same("dropout", "x", be, y, x, MT_F32)) return;
    if (!(p >= 0.0f && p < 1.0f)) {
        op_fail("host op dropout: p = %g is outside [0, 1)", (double)p);
        return;
    }
    if (N_OF(y)) be->ops->dropout(be, y->data, x->data, p, seed, counter0, accumulate, N_OF(y));
}

static double host_sum_squares(const mt_tensor *x) {
    mt_backend *be = op_backend("sum_squares", "x", x, MT_F32);
    if (!be) return NAN;
    return N_OF(x) ? be->ops->sum_squares(be, x->data, N_OF(x)) : 0.0;
}

/* logits (n,V) and the per-row tensors of the softmax operations. */
static mt_backend *softmax_args(const char *op, const mt_tensor *logits, const mt_tensor *targets,
                                int *n, int *V) {
    mt_backend *be = op_backend(op, "logits", logits, MT_F32);
    if (!be || !op_backend(op, "targets", targets, MT_I32)) return NULL;
    if (logits->ndim != 2 || logits->shape[0] > INT32_MAX || logits->shape[1] > INT32_MAX ||
        logits->shape[1] < 1) {
        char a[96];
        op_fail("host op %s: logits must be (n, V) with V >= 1, got %s", op,
                mt_shape_format(a, sizeof a, logits->ndim, logits->shape));
        return NULL;
    }
    *n = (int)logits->shape[0];
    *V = (int)logits->shape[1];
    if (targets->device != logits->device || mt_tensor_numel(targets) != *n) {
        op_fail("host op %s: targets must hold %d values on the logits' device", op, *n);
        return NULL;
    }
    return be;
}

static int row_vector(const char *op, const char *arg, const mt_tensor *logits,
                      const mt_tensor *t, int64_t count) {
    if (!op_backend(op, arg, t, MT_F32)) return 0;
    if (t->device != logits->device || mt_tensor_numel(t) != count) {
        op_fail("host op %s: %s must hold %lld values on the logits' device", op, arg,
                (long long)count);
        return 0;
    }
    return 1;
}

static void host_softmax_stats(const mt_tensor *logits, const mt_tensor *targets, mt_tensor *lse,
                               mt_tensor *target_logit, mt_tensor *mean_logit) {
    int n, V;
    mt_backend *be = softmax_args("softmax_stats", logits, targets, &n, &V);
    if (!be || !row_vector("softmax_stats", "lse", logits, lse, n) ||
        (target_logit && !row_vector("softmax_stats", "target_logit", logits, target_logit, n)) ||
        (mean_logit && !row_vector("softmax_stats", "mean_logit", logits, mean_logit, n)) || !n)
        return;
    be->ops->softmax_stats(be, lse->data, target_logit ? target_logit->data : NULL,
                           mean_logit ? mean_logit->data : NULL, logits->data, targets->data, n,
                           V);
}

static void host_softmax_backward(mt_tensor *logits, const mt_tensor *lse,
                                  const mt_tensor *targets, const mt_tensor *coefs) {
    int n, V;
    mt_backend *be = softmax_args("softmax_backward", logits, targets, &n, &V);
    if (!be || !row_vector("softmax_backward", "lse", logits, lse, n) ||
        !row_vector("softmax_backward", "coefs", logits, coefs, 3 * (int64_t)n) || !n)
        return;
    be->ops->softmax_backward(be, logits->data, lse->data, targets->data, coefs->data, n, V);
}

static void host_dequantize_4bit(mt_tensor *out, const mt_tensor *codes, const mt_tensor *absmax_q,
                                 const mt_tensor *absmax2, const mt_tensor *table, float offset,
                                 int64_t first, int block, int block2) {
    const char *op = "dequantize_4bit";
    mt_backend *be = op_backend(op, "out", out, MT_F32);
    if (!be || !op_backend(op, "codes", codes, MT_U8) || !op_backend(op, "absmax_q", absmax_q, MT_U8) ||
        !op_backend(op, "absmax2", absmax2, MT_F32) || !op_backend(op, "table", table, MT_F32))
        return;
    const int64_t n = mt_tensor_numel(out);
    if (codes->device != out->device || absmax_q->device != out->device ||
        absmax2->device != out->device || table->device != out->device) {
        op_fail("host op %s: every tensor must be on the output's device", op);
        return;
    }
    if (first < 0 || block < 1 || block2 < 1 || mt_tensor_numel(table) != 16 + 256) {
        op_fail("host op %s: needs first >= 0, block and block2 >= 1 and a table of 272 values "
                "(got first %lld, block %d, block2 %d, table of %lld)",
                op, (long long)first, block, block2, (long long)mt_tensor_numel(table));
        return;
    }
    const int64_t end = first + n, blocks = n ? (end + block - 1) / block : 0;
    if (n && (mt_tensor_numel(codes) < (end + 1) / 2 || mt_tensor_numel(absmax_q) < blocks ||
              mt_tensor_numel(absmax2) < (blocks + block2 - 1) / block2)) {
        op_fail("host op %s: elements [%lld, %lld) reach past the stored codes or scales", op,
                (long long)first, (long long)end);
        return;
    }
    if (n)
        be->ops->dequantize_4bit(be, out->data, codes->data, absmax_q->data, absmax2->data,
                                 table->data, offset, first, n, block, block2);
}

/* ---- device memory ---- */

static mt_status host_tensor_alloc(mt_device device, mt_dtype dtype, int ndim,
                                   const int64_t *shape, mt_tensor *out, mt_error *err) {
    return mt_device_tensor_alloc(device, dtype, ndim, shape, out, err);
}

static mt_status host_tensor_upload(mt_tensor *dst, const void *src, mt_error *err) {
    if (!dst || (!dst->data && mt_tensor_numel(dst)) || (!src && mt_tensor_nbytes(dst)))
        return mt_error_set(err, MT_ERR_INVALID_ARG, "tensor_upload: NULL tensor or source");
    return mt_device_upload(dst, src, err);
}

static mt_status host_tensor_download(void *dst, const mt_tensor *src, mt_error *err) {
    if (!src || (!src->data && mt_tensor_numel(src)) || (!dst && mt_tensor_nbytes(src)))
        return mt_error_set(err, MT_ERR_INVALID_ARG, "tensor_download: NULL tensor or target");
    mt_status st = mt_host_check("tensor_download", err); /* queued work it depends on */
    return st ? st : mt_device_download(dst, src, err);
}

/* Waits for the accelerator's queued work, whose failures surface there. */
mt_status mt_host_check(const char *who, mt_error *err) {
    mt_backend *accel = mt_device_backend(MT_DEVICE_CUDA, NULL);
    mt_status st = accel ? accel->ops->sync(accel) : MT_OK;
    if (st && op_error.status == MT_OK)
        mt_error_set(&op_error, st, "the %s backend failed (its own message went to the log)",
                     accel->name);
    if (op_error.status == MT_OK) return MT_OK;
    st = op_error.status;
    if (who) mt_error_set(err, st, "%s: %s", who, op_error.msg);
    else mt_error_set(err, st, "%s", op_error.msg);
    op_error = (mt_error){0};
    return st;
}

static mt_status host_check(mt_error *err) { return mt_host_check(NULL, err); }

/* ---- the model, for losses ---- */

static mt_device host_model_device(const mt_model_handle *h) {
    return ((const mt_model *)h)->be->device;
}

static mt_status host_model_forward(mt_model_handle *h, const mt_batch *b, int adapters_enabled,
                                    mt_error *err) {
    mt_model *m = MODEL(h);
    if (!b || b->size < offsetof(mt_batch, targets) + sizeof b->targets)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "model_forward: the batch is NULL or older than ABI 2 (size %u)",
                            b ? (unsigned)b->size : 0u);
    /* a pass without adapters restores whatever state the caller had set */
    int was_enabled = m->adapters_enabled;
    if (!adapters_enabled && was_enabled) mt_model_set_adapters_enabled(m, 0);
    mt_status st = mt_model_forward(m, b->tokens, b->positions, b->segments, b->B, b->T, err);
    if (!adapters_enabled && was_enabled) mt_model_set_adapters_enabled(m, 1);
    return st;
}

static int host_model_vocab_size(const mt_model_handle *h) {
    return ((const mt_model *)h)->cfg.vocab_size;
}

static int host_model_chunk_rows(const mt_model_handle *h) {
    return ((const mt_model *)h)->plan_chunk;
}

/* A logits tensor of at least nrows x V on the model's device, as the model needs it. */
static mt_status logits_arg(const char *op, const mt_model *m, int nrows, const mt_tensor *t,
                            mt_error *err) {
    if (!t || t->dtype != MT_F32 || t->device != m->be->device || !t->data ||
        mt_tensor_numel(t) < (int64_t)nrows * m->cfg.vocab_size)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: needs an F32 tensor of at least %d x %d on the model's device "
                            "(%s)",
                            op, nrows, m->cfg.vocab_size, m->be->name);
    return MT_OK;
}

static mt_status host_model_logits(mt_model_handle *h, int row0, int nrows, mt_tensor *logits,
                                   mt_error *err) {
    mt_status st = logits_arg("model_logits", MODEL(h), nrows, logits, err);
    return st ? st : mt_model_logits(MODEL(h), row0, nrows, logits->data, err);
}

static mt_status host_model_backward_logits(mt_model_handle *h, int row0, int nrows,
                                            const mt_tensor *dlogits, mt_error *err) {
    mt_status st = logits_arg("model_backward_logits", MODEL(h), nrows, dlogits, err);
    if (!st) st = mt_host_check("model_backward_logits", err); /* d(logits) must be complete */
    return st ? st : mt_model_backward_logits(MODEL(h), row0, nrows, dlogits->data, err);
}

static mt_status host_model_logits_rows(mt_model_handle *h, const int32_t *rows, int nrows,
                                        mt_tensor *logits, mt_error *err) {
    mt_status st = logits_arg("model_logits_rows", MODEL(h), nrows, logits, err);
    if (!st && nrows > 0 && !rows)
        st = mt_error_set(err, MT_ERR_INVALID_ARG, "model_logits_rows: no row list");
    return st ? st : mt_model_logits_rows(MODEL(h), rows, nrows, logits->data, err);
}

static mt_status host_model_backward_logits_rows(mt_model_handle *h, const int32_t *rows,
                                                 int nrows, const mt_tensor *dlogits,
                                                 mt_error *err) {
    mt_status st = logits_arg("model_backward_logits_rows", MODEL(h), nrows, dlogits, err);
    if (!st && nrows > 0 && !rows)
        st = mt_error_set(err, MT_ERR_INVALID_ARG, "model_backward_logits_rows: no row list");
    if (!st) st = mt_host_check("model_backward_logits_rows", err);
    return st ? st : mt_model_backward_logits_rows(MODEL(h), rows, nrows, dlogits->data, err);
}

static mt_status host_model_backward(mt_model_handle *h, mt_error *err) {
    return mt_model_backward(MODEL(h), err);
}

/* ---- the model, for adapters ---- */

static int host_model_linear_count(const mt_model_handle *h) {
    return mt_model_linear_count((const mt_model *)h);
}

static mt_linear_handle *host_model_linear(mt_model_handle *h, int index) {
    return (mt_linear_handle *)mt_model_linear(MODEL(h), index);
}

static void host_linear_info(const mt_linear_handle *h, mt_linear_info *out) {
    const mt_linear *lin = (const mt_linear *)h;
    /* the caller may write the weight through this pointer (an adapter's merge): int8
     * copies made from it before would be stale */
    if (lin->model) mt_model_int8_drop(lin->model);
    mt_linear_info info = {
        .size = sizeof info,
        .name = lin->name,
        .module = mt_module_name(lin->module),
        .layer = lin->layer,
        .in = lin->in,
        .out = lin->out,
        .weight = {.dtype = MT_F32, .device = lin->be->device, .ndim = 2,
                   .shape = {lin->out, lin->in}, .data = lin->weight},
        .bias = {.dtype = MT_F32, .device = lin->be->device, .ndim = 1, .shape = {lin->out},
                 .data = lin->bias},
    };
    /* the caller's struct may be older and shorter: fill what it has */
    uint32_t size = out->size < sizeof info ? out->size : (uint32_t)sizeof info;
    memcpy(out, &info, size);
    out->size = size;
}

static mt_status host_linear_wrap(mt_linear_handle *h, const mt_linear_impl *impl, void *self,
                                  mt_error *err) {
    mt_linear *lin = LINEAR(h);
    if (impl && (impl->size < offsetof(mt_linear_impl, backward) + sizeof impl->backward ||
                 !impl->forward || !impl->backward))
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: an adapter wrapper needs its size set and forward and backward",
                            lin->name);
    lin->impl = impl;
    lin->impl_self = impl ? self : NULL;
    return MT_OK;
}

/* Rows of x (N, in) and y (N, out) of this projection, on its device. */
static int linear_rows(const char *op, const mt_linear *lin, const mt_tensor *x, int in,
                       const mt_tensor *y, int out, int *N) {
    if (!op_backend(op, "x", x, MT_F32) || !op_backend(op, "y", y, MT_F32)) return 0;
    if (x->ndim != 2 || y->ndim != 2 || x->shape[1] != in || y->shape[1] != out ||
        x->shape[0] != y->shape[0] || x->shape[0] > INT32_MAX || x->device != lin->be->device ||
        y->device != lin->be->device) {
        char a[96], b[96];
        op_fail("host op %s of %s: expects (N, %d) and (N, %d) on %s, got %s and %s", op,
                lin->name, in, out, lin->be->name, mt_shape_format(a, sizeof a, x->ndim, x->shape),
                mt_shape_format(b, sizeof b, y->ndim, y->shape));
        return 0;
    }
    *N = (int)x->shape[0];
    return 1;
}

static void host_linear_base_forward(mt_linear_handle *h, mt_tensor *y, const mt_tensor *x) {
    mt_linear *lin = LINEAR(h);
    int N;
    if (!linear_rows("linear_base_forward", lin, x, lin->in, y, lin->out, &N)) return;
    if (!lin->weight) {
        op_fail("host op linear_base_forward: %s: the base weight was released", lin->name);
        return;
    }
    if (N) mt_linear_base_forward(lin, y->data, x->data, N);
}

static void host_linear_base_backward(mt_linear_handle *h, mt_tensor *dx, const mt_tensor *dy,
                                      const mt_tensor *x) {
    mt_linear *lin = LINEAR(h);
    int N, Nx;
    if (!linear_rows("linear_base_backward", lin, dx, lin->in, dy, lin->out, &N) ||
        !linear_rows("linear_base_backward", lin, x, lin->in, dy, lin->out, &Nx))
        return;
    if (!lin->weight) {
        op_fail("host op linear_base_backward: %s: the base weight was released", lin->name);
        return;
    }
    if (N) mt_linear_base_backward(lin, dx->data, dy->data, x->data, N);
}

static mt_status host_linear_set_trainable(mt_linear_handle *h, int trainable, mt_error *err) {
    mt_linear *lin = LINEAR(h);
    if (!lin->weight)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: the base weight was released (quantized) and cannot train",
                            lin->name);
    mt_param *w = mt_model_param_of(lin->model, lin->weight_memory),
             *b = mt_model_param_of(lin->model, lin->bias);
    mt_status st = w ? mt_model_set_trainable(lin->model, w, trainable, err) : MT_OK;
    if (!st && b) st = mt_model_set_trainable(lin->model, b, trainable, err);
    return st;
}

static void host_linear_release_weight(mt_linear_handle *h) { mt_linear_release_weight(LINEAR(h)); }

static mt_status host_linear_restore_weight(mt_linear_handle *h, mt_tensor *weight,
                                            mt_error *err) {
    mt_linear *lin = LINEAR(h);
    if (!weight)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: linear_restore_weight needs a tensor",
                            lin->name);
    *weight = (mt_tensor){.dtype = MT_F32, .device = lin->be->device, .ndim = 2,
                          .shape = {lin->out, lin->in}, .data = mt_linear_restore_weight(lin)};
    return MT_OK;
}

static mt_status host_model_set_param_trainable(mt_model_handle *h, const char *name,
                                                int trainable, mt_error *err) {
    mt_model *m = MODEL(h);
    mt_param *p = mt_model_find_param(m, name);
    if (!p) return mt_error_set(err, MT_ERR_INVALID_ARG, "the model has no parameter named %s", name);
    return mt_model_set_trainable(m, p, trainable, err);
}

static int host_model_param_count(const mt_model_handle *h) {
    return (int)((const mt_model *)h)->num_params;
}

static int host_model_base_frozen(const mt_model_handle *h) {
    const mt_model *m = (const mt_model *)h;
    for (size_t i = 0; i < m->num_params; i++)
        if (m->params[i].trainable) return 0;
    return 1;
}

static const char *host_model_param_name(const mt_model_handle *h, int index) {
    const mt_model *m = (const mt_model *)h;
    return index >= 0 && (size_t)index < m->num_params ? m->params[index].name : NULL;
}

static mt_status host_model_param(mt_model_handle *h, const char *name, mt_tensor *value,
                                  mt_error *err) {
    mt_model *m = MODEL(h);
    mt_param *p = name ? mt_model_find_param(m, name) : NULL;
    if (!p || !value)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "the model has no parameter named %s",
                            name ? name : "(null)");
    *value = (mt_tensor){.dtype = MT_F32, .device = m->be->device, .ndim = p->ndim,
                         .data = p->data};
    for (int d = 0; d < p->ndim; d++) value->shape[d] = p->shape[d];
    return MT_OK;
}

static mt_status host_model_add_param(mt_model_handle *h, const mt_param_view *param,
                                      mt_error *err) {
    return mt_model_add_param(MODEL(h), param, err);
}

/* ---- adapter directories: the io's own operations (core/store implements them) ---- */

static mt_status io_missing(const char *op, mt_error *err) {
    return mt_error_set(err, MT_ERR_INVALID_ARG,
                        "%s: this adapter directory is not open for that (saving writes, "
                        "loading reads)",
                        op);
}

static mt_status host_io_put_config(mt_adapter_io *io, const char *key, const char *json,
                                    mt_error *err) {
    if (!io || !io->ops->put_config) return io_missing("io_put_config", err);
    return io->ops->put_config(io, key, json, err);
}

static mt_status host_io_put_tensor(mt_adapter_io *io, const char *name, const mt_tensor *t,
                                    mt_error *err) {
    if (!io || !io->ops->put_tensor) return io_missing("io_put_tensor", err);
    mt_status st = mt_host_check("io_put_tensor", err);
    return st ? st : io->ops->put_tensor(io, name, t, err);
}

static const char *host_io_get_config(const mt_adapter_io *io, const char *key) {
    return io && io->ops->get_config ? io->ops->get_config(io, key) : NULL;
}

static const char *host_io_config_key(const mt_adapter_io *io, int index) {
    return io && io->ops->config_key ? io->ops->config_key(io, index) : NULL;
}

static const char *host_io_tensor_name(const mt_adapter_io *io, int index) {
    return io && io->ops->tensor_name ? io->ops->tensor_name(io, index) : NULL;
}

static mt_status host_io_get_tensor(mt_adapter_io *io, const char *name, mt_tensor *out,
                                    mt_error *err) {
    if (!io || !io->ops->get_tensor) return io_missing("io_get_tensor", err);
    return io->ops->get_tensor(io, name, out, err);
}

static mt_status host_io_set_option(mt_adapter_io *io, const char *name, const char *value,
                                    mt_error *err) {
    if (!io || !io->ops->set_option) return io_missing("io_set_option", err);
    return io->ops->set_option(io, name, value, err);
}

static const mt_host host_table = {
    .abi_version = MT_PLUGIN_ABI_VERSION,
    .size = sizeof(mt_host),
    .alloc = host_alloc,
    .free = host_free,
    .log = host_log,
    .error = host_error,
    .opt_bool = mt_options_bool,
    .opt_int = mt_options_int,
    .opt_float = mt_options_float,
    .opt_string = mt_options_string,
    .opt_list_len = mt_options_list_len,
    .opt_list_item = mt_options_list_item,
    .random_uniform = mt_random_uniform,
    .tensor_alloc = host_tensor_alloc,
    .tensor_free = mt_device_tensor_free,
    .tensor_upload = host_tensor_upload,
    .tensor_download = host_tensor_download,
    .check = host_check,
    .matmul = host_matmul,
    .copy = host_copy,
    .fill = host_fill,
    .axpby = host_axpby,
    .lerp = host_lerp,
    .addcmul = host_addcmul,
    .addcdiv_sqrt = host_addcdiv_sqrt,
    .maximum = host_maximum,
    .add_sign = host_add_sign,
    .mul = host_mul,
    .dropout = host_dropout,
    .sum_squares = host_sum_squares,
    .softmax_stats = host_softmax_stats,
    .softmax_backward = host_softmax_backward,
    .dequantize_4bit = host_dequantize_4bit,
    .model_device = host_model_device,
    .model_forward = host_model_forward,
    .model_vocab_size = host_model_vocab_size,
    .model_chunk_rows = host_model_chunk_rows,
    .model_logits = host_model_logits,
    .model_backward_logits = host_model_backward_logits,
    .model_backward = host_model_backward,
    .model_linear_count = host_model_linear_count,
    .model_linear = host_model_linear,
    .linear_info = host_linear_info,
    .linear_wrap = host_linear_wrap,
    .linear_base_forward = host_linear_base_forward,
    .linear_base_backward = host_linear_base_backward,
    .linear_set_trainable = host_linear_set_trainable,
    .linear_release_weight = host_linear_release_weight,
    .linear_restore_weight = host_linear_restore_weight,
    .model_set_param_trainable = host_model_set_param_trainable,
    .model_param_count = host_model_param_count,
    .model_param_name = host_model_param_name,
    .model_param = host_model_param,
    .model_add_param = host_model_add_param,
    .io_put_config = host_io_put_config,
    .io_put_tensor = host_io_put_tensor,
    .io_get_config = host_io_get_config,
    .io_config_key = host_io_config_key,
    .io_tensor_name = host_io_tensor_name,
    .io_get_tensor = host_io_get_tensor,
    .io_set_option = host_io_set_option,
    .model_base_frozen = host_model_base_frozen,
    .model_logits_rows = host_model_logits_rows,
    .model_backward_logits_rows = host_model_backward_logits_rows,
};

const mt_host *mt_host_table(void) { return &host_table; }
