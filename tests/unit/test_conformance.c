/* test_conformance.c — every backend operation, on every backend this build has, against
 * a reference.
 *
 * Section 1 is one table: each row is one operation of kernels/backend.h (a few, such as
 * matmul and attention, in several variants) with its tolerance. A row's function draws
 * random inputs from a stream seeded by the row, so every backend sees the same numbers;
 * it uploads them through the backend's ops table, runs the operation, and downloads the
 * outputs. The outputs are compared with a reference:
 *
 *   - on the CPU backend, with naive loops in this file where a row has them (written
 *     from backend.h's formulas, in double where the operation sums). Rows without one
 *     are run twice on the CPU and must give finite numbers and the same bits both
 *     times: outputs written "=" start as NaN, so an element left unwritten fails;
 *   - on any other backend (CUDA when the build has it and a GPU answers), with the CPU
 *     backend's outputs for the same inputs.
 *
 * The error of an output is max |got - ref| (abs) and that over max |ref| (rel; an
 * element's own relative error means nothing near zero). NaN against NaN counts as
 * equal; NaN against a number fails. A row passes when rel <= its tolerance: 0 for
 * operations that move or scale bits without a sum (copy, fill, embedding rows,
 * dropout, dequantization: the backends must agree exactly), 1e-5 for fp32 elementwise
 * work, looser where the backends sum in different orders (matrix products, attention,
 * column sums).
 *
 * CUDA: when mt_backend_cuda_init fails (no GPU, no driver), the CUDA half prints
 * "conformance: cuda backend not run: <message>" and passes, unless the environment sets
 * MT_REQUIRE_CUDA=1 (scripts/device-check does), which makes it a failure. A build
 * without the CUDA backend fails the same way under MT_REQUIRE_CUDA=1.
 *
 * Section 2 is a whole training step of the tiny parity model with each standard adapter,
 * the cross-entropy loss and AdamW on each backend, against the CPU's. */
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "model/device.h"
#include "model/device_select.h"
#include "model/model.h"
#include "model/train.h"
#include "plugin/registry.h"
#ifdef MT_HAVE_CUDA
#include "cuda/cuda_backend.h"
#endif

/* ==== section 0: the backends ========================================================= */

/* MT_REQUIRE_CUDA=1: a CUDA backend that does not open is a failure, not a skip. */
static int conf_require_cuda(void) {
    const char *v = getenv("MT_REQUIRE_CUDA");
    return v && strcmp(v, "1") == 0;
}

/* Opens the backend `name` ("cpu", "cuda"). On failure returns the status with the reason
 * in err; "cuda" in a build without it is MT_ERR_UNSUPPORTED. */
static mt_status conf_open_backend(const char *name, mt_backend *be, mt_error *err) {
    return mt_device_backend_start("conformance", name, 0, be, NULL, 0, err);
}

static void conf_close_backend(mt_backend *be) { mt_device_backend_stop(be); }

/* The recorded error of a backend after a failed status, for messages. */
static const char *conf_backend_message(const mt_backend *be) {
#ifdef MT_HAVE_CUDA
    if (be->device == MT_DEVICE_CUDA) return mt_backend_cuda_error_message(be);
#endif
    (void)be;
    return "";
}

/* ==== section 1: the table of operations ============================================ */

#define CONF_MAX_OUT 4
#define CONF_MAX_BUF 24

typedef struct conf_op conf_op;

typedef struct conf_out {
    const char *name;
    double *v;
    size_t n;
} conf_out;

/* One run of one row: on a backend, or (be NULL) through the row's naive loops. */
typedef struct conf_run {
    const conf_op *op;
    mt_backend *be;  /* NULL: compute the reference with naive loops */
    int no_naive;    /* set by a row that has no naive loops */
    int failed;      /* a backend call failed; msg says which */
    char msg[MT_ERROR_MSG_MAX + 64];
    uint64_t rng;    /* the inputs' stream, seeded by the row */
    void *dev[CONF_MAX_BUF];
    int ndev;
    void *host[CONF_MAX_BUF];
    int nhost;
    conf_out out[CONF_MAX_OUT];
    int nout;
} conf_run;

struct conf_op {
    const char *name;
    double tol;              /* largest rel error that passes */
    void (*run)(conf_run *r);
    int arg[4];              /* the row's variant (transposes, GQA, segments, ...) */
};

/* ---- host and device buffers of a run ---- */

static void *h_alloc(conf_run *r, size_t bytes) {
    assert_true(r->nhost < CONF_MAX_BUF);
    void *p = calloc(1, bytes ? bytes : 1);
    assert_non_null(p);
    r->host[r->nhost++] = p;
    return p;
}

static float *h_rand(conf_run *r, size_t n, float lo, float hi) {
    float *p = h_alloc(r, n * sizeof(float));
    mt_test_fill_uniform(p, n, &r->rng, lo, hi);
    return p;
}

static float *h_copy(conf_run *r, const float *x, size_t n) {
    float *p = h_alloc(r, n * sizeof(float));
    memcpy(p, x, n * sizeof(float));
    return p;
}

static int32_t *h_ints(conf_run *r, size_t n, int32_t bound) {
    int32_t *p = h_alloc(r, n * sizeof(int32_t));
    for (size_t i = 0; i < n; i++) p[i] = (int32_t)(mt_test_rand_u64(&r->rng) % (uint64_t)bound);
    return p;
}

static void conf_fail(conf_run *r, const char *what) {
    if (r->failed) return;
    r->failed = 1;
    snprintf(r->msg, sizeof r->msg, "%s failed: %s", what, conf_backend_message(r->be));
}

/* Device memory holding a copy of host[bytes] (NULL host: zeros). */
static void *d_from(conf_run *r, const void *host, size_t bytes) {
    assert_true(r->ndev < CONF_MAX_BUF);
    void *p = r->be->ops->alloc(r->be, bytes);
    if (!p) {
        conf_fail(r, "alloc");
        return NULL;
    }
    r->dev[r->ndev++] = p;
    if (host && r->be->ops->upload(r->be, p, host, bytes) != MT_OK) conf_fail(r, "upload");
    return p;
}

/* Device floats set to NaN: the output of an "=" operation, whose every element must be
 * written. */
static float *d_nan(conf_run *r, size_t n) {
    float *h = h_alloc(r, n * sizeof(float));
    for (size_t i = 0; i < n; i++) h[i] = NAN;
    return d_from(r, h, n * sizeof(float));
}

static void out_add(conf_run *r, const char *name, size_t n, double **v) {
    assert_true(r->nout < CONF_MAX_OUT);
    conf_out *o = &r->out[r->nout++];
    o->name = name;
    o->n = n;
    o->v = calloc(n ? n : 1, sizeof(double));
    assert_non_null(o->v);
    *v = o->v;
}

/* An output of the naive reference. */
static void out_host(conf_run *r, const char *name, const float *x, size_t n) {
    double *v;
    out_add(r, name, n, &v);
    for (size_t i = 0; i < n; i++) v[i] = x[i];
}

/* An output on the device: waits for the queued work, then downloads it. */
static void out_dev(conf_run *r, const char *name, const float *dev, size_t n) {
    double *v;
    out_add(r, name, n, &v);
    if (r->failed) return;
    if (r->be->ops->sync(r->be) != MT_OK) {
        conf_fail(r, "sync");
        return;
    }
    float *h = h_alloc(r, n * sizeof(float));
    if (r->be->ops->download(r->be, h, dev, n * sizeof(float)) != MT_OK) {
        conf_fail(r, "download");
        return;
    }
    for (size_t i = 0; i < n; i++) v[i] = h[i];
}

static void run_free(conf_run *r) {
    for (int i = 0; i < r->ndev; i++) r->be->ops->free(r->be, r->dev[i]);
    for (int i = 0; i < r->nhost; i++) free(r->host[i]);
    for (int i = 0; i < r->nout; i++) free(r->out[i].v);
    r->ndev = r->nhost = r->nout = 0;
}

/* ---- shapes ---- */

#define EW_N 100003 /* elementwise: odd, above the CPU's parallel threshold */
#define MM_M 67
#define MM_N 45
#define MM_K 129
#define ROWS 37 /* rows of the row-wise operations */
#define COLS 203
#define VOCAB 1001

/* ---- matrix products and bias ---- */

static void op_matmul(conf_run *r) {
    const int ta = r->op->arg[0], tb = r->op->arg[1], M = r->op->arg[2] ? r->op->arg[2] : MM_M;
    const int N = MM_N, K = MM_K;
    const float alpha = 0.75f, beta = 0.5f;
    float *a = h_rand(r, (size_t)M * K, -1, 1), *b = h_rand(r, (size_t)K * N, -1, 1);
    float *c = h_rand(r, (size_t)M * N, -1, 1);
    if (!r->be) {
        float *ref = h_alloc(r, (size_t)M * N * sizeof(float));
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                double s = 0.0;
                for (int k = 0; k < K; k++) {
                    double av = ta ? a[(size_t)k * M + i] : a[(size_t)i * K + k];
                    double bv = tb ? b[(size_t)j * K + k] : b[(size_t)k * N + j];
                    s += av * bv;
                }
                ref[(size_t)i * N + j] = (float)(alpha * s + beta * (double)c[(size_t)i * N + j]);
            }
        out_host(r, "c", ref, (size_t)M * N);
        return;
    }
    float *da = d_from(r, a, (size_t)M * K * 4), *db = d_from(r, b, (size_t)K * N * 4);
    float *dc = d_from(r, c, (size_t)M * N * 4);
    if (r->failed) return;
    r->be->ops->matmul(r->be, dc, da, db, M, N, K, ta, tb, alpha, beta);
    out_dev(r, "c", dc, (size_t)M * N);
}

static void op_bias_forward(conf_run *r) {
    float *out = h_rand(r, (size_t)ROWS * COLS, -1, 1), *bias = h_rand(r, COLS, -1, 1);
    if (!r->be) {
        float *ref = h_copy(r, out, (size_t)ROWS * COLS);
        for (size_t i = 0; i < (size_t)ROWS * COLS; i++) ref[i] += bias[i % COLS];
        out_host(r, "out", ref, (size_t)ROWS * COLS);
        return;
    }
    float *d = d_from(r, out, sizeof(float) * ROWS * COLS), *db = d_from(r, bias, sizeof(float) * COLS);
    if (r->failed) return;
    r->be->ops->bias_forward(r->be, d, db, ROWS, COLS);
    out_dev(r, "out", d, (size_t)ROWS * COLS);
}

static void op_bias_backward(conf_run *r) {
    float *dbias = h_rand(r, COLS, -1, 1), *dout = h_rand(r, (size_t)ROWS * COLS, -1, 1);
    if (!r->be) {
        float *ref = h_copy(r, dbias, COLS);
        for (int c = 0; c < COLS; c++) {
            double s = 0.0;
            for (int n = 0; n < ROWS; n++) s += dout[(size_t)n * COLS + c];
            ref[c] = (float)(ref[c] + s);
        }
        out_host(r, "dbias", ref, COLS);
        return;
    }
    float *d = d_from(r, dbias, sizeof(float) * COLS), *dd = d_from(r, dout, sizeof(float) * ROWS * COLS);
    if (r->failed) return;
    r->be->ops->bias_backward(r->be, d, dd, ROWS, COLS);
    out_dev(r, "dbias", d, COLS);
}

/* ---- elementwise (backend.h's first ones) ---- */

static void op_add(conf_run *r) {
    float *a = h_rand(r, EW_N, -2, 2), *b = h_rand(r, EW_N, -2, 2);
    if (!r->be) {
        float *ref = h_alloc(r, EW_N * sizeof(float));
        for (size_t i = 0; i < EW_N; i++) ref[i] = a[i] + b[i];
        out_host(r, "out", ref, EW_N);
        out_host(r, "out=a", ref, EW_N);
        return;
    }
    float *da = d_from(r, a, EW_N * 4), *db = d_from(r, b, EW_N * 4), *dout = d_nan(r, EW_N);
    if (r->failed) return;
    r->be->ops->add(r->be, dout, da, db, EW_N);
    r->be->ops->add(r->be, da, da, db, EW_N); /* the residual add: out aliases a */
    out_dev(r, "out", dout, EW_N);
    out_dev(r, "out=a", da, EW_N);
}

static void op_axpy(conf_run *r) {
    float *y = h_rand(r, EW_N, -2, 2), *x = h_rand(r, EW_N, -2, 2);
    if (!r->be) {
        float *ref = h_copy(r, y, EW_N);
        for (size_t i = 0; i < EW_N; i++) ref[i] += -0.37f * x[i];
        out_host(r, "y", ref, EW_N);
        return;
    }
    float *dy = d_from(r, y, EW_N * 4), *dx = d_from(r, x, EW_N * 4);
    if (r->failed) return;
    r->be->ops->axpy(r->be, dy, dx, -0.37f, EW_N);
    out_dev(r, "y", dy, EW_N);
}

/* ---- embedding ---- */

static void op_embedding_forward(conf_run *r) {
    const int V = 53;
    float *table = h_rand(r, (size_t)V * COLS, -1, 1);
    int32_t *tok = h_ints(r, ROWS, V);
    if (!r->be) {
        float *ref = h_alloc(r, (size_t)ROWS * COLS * sizeof(float));
        for (int n = 0; n < ROWS; n++)
            for (int c = 0; c < COLS; c++) ref[(size_t)n * COLS + c] = table[(size_t)tok[n] * COLS + c];
        out_host(r, "out", ref, (size_t)ROWS * COLS);
        return;
    }
    float *dt = d_from(r, table, (size_t)V * COLS * 4), *dout = d_nan(r, (size_t)ROWS * COLS);
    int32_t *dtok = d_from(r, tok, ROWS * sizeof(int32_t));
    if (r->failed) return;
    r->be->ops->embedding_forward(r->be, dout, dtok, dt, ROWS, COLS);
    out_dev(r, "out", dout, (size_t)ROWS * COLS);
}

static void op_embedding_backward(conf_run *r) {
    const int V = 11; /* few rows: tokens repeat, so rows accumulate */
    float *dtable = h_rand(r, (size_t)V * COLS, -1, 1), *dout = h_rand(r, (size_t)ROWS * COLS, -1, 1);
    int32_t *tok = h_ints(r, ROWS, V);
    if (!r->be) {
        r->no_naive = 1;
        return;
    }
    float *dt = d_from(r, dtable, (size_t)V * COLS * 4), *dd = d_from(r, dout, (size_t)ROWS * COLS * 4);
    int32_t *dtok = d_from(r, tok, ROWS * sizeof(int32_t));
    if (r->failed) return;
    r->be->ops->embedding_backward(r->be, dt, dd, dtok, ROWS, COLS);
    out_dev(r, "dtable", dt, (size_t)V * COLS);
}

/* ---- RMSNorm ---- */

static void op_rmsnorm_forward(conf_run *r) {
    const float eps = 1e-5f;
    float *x = h_rand(r, (size_t)ROWS * COLS, -2, 2), *w = h_rand(r, COLS, 0.5f, 1.5f);
    if (!r->be) {
        float *ref = h_alloc(r, (size_t)ROWS * COLS * sizeof(float)), *rs = h_alloc(r, ROWS * sizeof(float));
        for (int n = 0; n < ROWS; n++) {
            const float *xr = x + (size_t)n * COLS;
            double ss = 0.0;
            for (int c = 0; c < COLS; c++) ss += (double)xr[c] * xr[c];
            double rstd = 1.0 / sqrt(ss / COLS + eps);
            for (int c = 0; c < COLS; c++) ref[(size_t)n * COLS + c] = (float)(w[c] * xr[c] * rstd);
            rs[n] = (float)rstd;
        }
        out_host(r, "out", ref, (size_t)ROWS * COLS);
        out_host(r, "rstd", rs, ROWS);
        return;
    }
    float *dx = d_from(r, x, (size_t)ROWS * COLS * 4), *dw = d_from(r, w, COLS * 4);
    float *dout = d_nan(r, (size_t)ROWS * COLS), *drstd = d_nan(r, ROWS);
    if (r->failed) return;
    r->be->ops->rmsnorm_forward(r->be, dout, drstd, dx, dw, ROWS, COLS, eps);
    out_dev(r, "out", dout, (size_t)ROWS * COLS);
    out_dev(r, "rstd", drstd, ROWS);
}

static void op_rmsnorm_backward(conf_run *r) {
    const size_t nc = (size_t)ROWS * COLS;
    float *x = h_rand(r, nc, -2, 2), *w = h_rand(r, COLS, 0.5f, 1.5f), *dout = h_rand(r, nc, -1, 1);
    float *rstd = h_rand(r, ROWS, 0.5f, 1.5f), *dx = h_rand(r, nc, -1, 1), *dw = h_rand(r, COLS, -1, 1);
    if (!r->be) {
        r->no_naive = 1;
        return;
    }
    float *d_x = d_from(r, x, nc * 4), *d_w = d_from(r, w, COLS * 4), *d_dout = d_from(r, dout, nc * 4);
    float *d_rstd = d_from(r, rstd, ROWS * 4), *d_dx = d_from(r, dx, nc * 4), *d_dw = d_from(r, dw, COLS * 4);
    if (r->failed) return;
    r->be->ops->rmsnorm_backward(r->be, d_dx, d_dw, d_dout, d_x, d_w, d_rstd, ROWS, COLS);
    out_dev(r, "dx", d_dx, nc);
    out_dev(r, "dweight", d_dw, COLS);
}

/* ---- rotary embeddings ---- */

static void op_rope(conf_run *r) {
    const int backward = r->op->arg[0], N = ROWS, H = 3, D = 64, P = 50;
    const size_t nx = (size_t)N * H * D;
    float *x = h_rand(r, nx, -1, 1), *cosv = h_alloc(r, (size_t)P * D / 2 * 4), *sinv = h_alloc(r, (size_t)P * D / 2 * 4);
    for (int p = 0; p < P; p++)
        for (int i = 0; i < D / 2; i++) {
            double ang = p * pow(10000.0, -2.0 * i / D);
            cosv[(size_t)p * D / 2 + i] = (float)cos(ang);
            sinv[(size_t)p * D / 2 + i] = (float)sin(ang);
        }
    int32_t *pos = h_ints(r, N, P);
    if (!r->be) {
        r->no_naive = 1;
        return;
    }
    float *dx = d_from(r, x, nx * 4), *dc = d_from(r, cosv, (size_t)P * D / 2 * 4);
    float *ds = d_from(r, sinv, (size_t)P * D / 2 * 4);
    int32_t *dp = d_from(r, pos, N * sizeof(int32_t));
    if (r->failed) return;
    if (backward)
        r->be->ops->rope_backward(r->be, dx, dc, ds, dp, N, H, D);
    else
        r->be->ops->rope_forward(r->be, dx, dc, ds, dp, N, H, D);
    out_dev(r, "x", dx, nx);
}

/* ---- attention: arg[0] segments, arg[1] KVH (H = 4), arg[2] D ---- */

#define ATT_B 2
#define ATT_T 37
#define ATT_H 4

static void op_attention(conf_run *r, int backward) {
    const int B = ATT_B, T = ATT_T, H = ATT_H, KVH = r->op->arg[1], D = r->op->arg[2];
    const int with_seg = r->op->arg[0];
    const float scale = 1.0f / sqrtf((float)D);
    const size_t nq = (size_t)B * T * H * D, nk = (size_t)B * T * KVH * D, nl = (size_t)B * H * T;
    float *q = h_rand(r, nq, -1, 1), *k = h_rand(r, nk, -1, 1), *v = h_rand(r, nk, -1, 1);
    float *dout = h_rand(r, nq, -1, 1);
    int32_t *seg = h_alloc(r, (size_t)B * T * sizeof(int32_t));
    for (int b = 0; b < B; b++) /* packed examples: a new segment every 11 + b tokens */
        for (int t = 0; t < T; t++) seg[b * T + t] = t / (11 + b);
    if (!r->be) {
        r->no_naive = 1;
        return;
    }
    float *dq = d_from(r, q, nq * 4), *dk = d_from(r, k, nk * 4), *dv = d_from(r, v, nk * 4);
    int32_t *dseg = with_seg ? d_from(r, seg, (size_t)B * T * sizeof(int32_t)) : NULL;
    float *out = d_nan(r, nq), *lse = d_nan(r, nl);
    size_t wb = r->be->ops->attention_work_bytes(r->be, B, T, H, KVH, D);
    void *work = wb ? d_from(r, NULL, wb) : NULL;
    if (r->failed) return;
    r->be->ops->attention_forward(r->be, out, lse, dq, dk, dv, dseg, B, T, H, KVH, D, scale, work);
    if (!backward) {
        out_dev(r, "out", out, nq);
        out_dev(r, "lse", lse, nl);
        return;
    }
    float *ddout = d_from(r, dout, nq * 4);
    float *gq = d_nan(r, nq), *gk = d_nan(r, nk), *gv = d_nan(r, nk);
    if (r->failed) return;
    r->be->ops->attention_backward(r->be, gq, gk, gv, ddout, out, lse, dq, dk, dv, dseg, B, T, H,
                                   KVH, D, scale, work);
    out_dev(r, "dq", gq, nq);
    out_dev(r, "dk", gk, nk);
    out_dev(r, "dv", gv, nk);
}

static void op_attention_forward(conf_run *r) { op_attention(r, 0); }
static void op_attention_backward(conf_run *r) { op_attention(r, 1); }

/* ---- SwiGLU ---- */

static void op_swiglu_forward(conf_run *r) {
    float *g = h_rand(r, EW_N, -6, 6), *u = h_rand(r, EW_N, -2, 2);
    if (!r->be) {
        float *ref = h_alloc(r, EW_N * sizeof(float));
        for (size_t i = 0; i < EW_N; i++) ref[i] = (float)(g[i] / (1.0 + exp(-(double)g[i])) * u[i]);
        out_host(r, "out", ref, EW_N);
        return;
    }
    float *dg = d_from(r, g, EW_N * 4), *du = d_from(r, u, EW_N * 4), *dout = d_nan(r, EW_N);
    if (r->failed) return;
    r->be->ops->swiglu_forward(r->be, dout, dg, du, EW_N);
    out_dev(r, "out", dout, EW_N);
}

static void op_swiglu_backward(conf_run *r) {
    float *g = h_rand(r, EW_N, -6, 6), *u = h_rand(r, EW_N, -2, 2), *dy = h_rand(r, EW_N, -1, 1);
    if (!r->be) {
        r->no_naive = 1;
        return;
    }
    float *dg = d_from(r, g, EW_N * 4), *du = d_from(r, u, EW_N * 4), *ddy = d_from(r, dy, EW_N * 4);
    float *gg = d_nan(r, EW_N), *gu = d_nan(r, EW_N);
    if (r->failed) return;
    r->be->ops->swiglu_backward(r->be, gg, gu, ddy, dg, du, EW_N);
    out_dev(r, "dgate", gg, EW_N);
    out_dev(r, "dup", gu, EW_N);
}

/* ---- cross-entropy: targets with ignore_index (-100) and negative ones ---- */

static int32_t *ce_targets(conf_run *r) {
    int32_t *t = h_ints(r, ROWS, VOCAB);
    for (int i = 0; i < ROWS; i++)
        if (i % 5 == 1) t[i] = -100;
        else if (i % 7 == 3) t[i] = -1;
    return t;
}

static void op_cross_entropy_forward(conf_run *r) {
    float *x = h_rand(r, (size_t)ROWS * VOCAB, -8, 8);
    int32_t *t = ce_targets(r);
    if (!r->be) {
        float *ref = h_alloc(r, ROWS * sizeof(float));
        for (int n = 0; n < ROWS; n++) {
            if (t[n] < 0) continue;
            const float *xr = x + (size_t)n * VOCAB;
            double m = -INFINITY, s = 0.0;
            for (int j = 0; j < VOCAB; j++) m = xr[j] > m ? xr[j] : m;
            for (int j = 0; j < VOCAB; j++) s += exp(xr[j] - m);
            ref[n] = (float)(m + log(s) - xr[t[n]]);
        }
        out_host(r, "losses", ref, ROWS);
        return;
    }
    float *dx = d_from(r, x, (size_t)ROWS * VOCAB * 4), *dl = d_nan(r, ROWS);
    int32_t *dt = d_from(r, t, ROWS * sizeof(int32_t));
    if (r->failed) return;
    r->be->ops->cross_entropy_forward(r->be, dl, dx, dt, ROWS, VOCAB, -100);
    out_dev(r, "losses", dl, ROWS);
}

static void op_cross_entropy_backward(conf_run *r) {
    float *x = h_rand(r, (size_t)ROWS * VOCAB, -8, 8);
    int32_t *t = ce_targets(r);
    if (!r->be) {
        r->no_naive = 1;
        return;
    }
    float *dx = d_from(r, x, (size_t)ROWS * VOCAB * 4), *dg = d_nan(r, (size_t)ROWS * VOCAB);
    int32_t *dt = d_from(r, t, ROWS * sizeof(int32_t));
    if (r->failed) return;
    r->be->ops->cross_entropy_backward(r->be, dg, dx, dt, ROWS, VOCAB, -100, 0.25f);
    r->be->ops->cross_entropy_backward(r->be, dx, dx, dt, ROWS, VOCAB, -100, 0.25f); /* in place */
    out_dev(r, "dlogits", dg, (size_t)ROWS * VOCAB);
    out_dev(r, "dlogits in place", dx, (size_t)ROWS * VOCAB);
}

/* ---- reductions ---- */

static void op_sum_squares(conf_run *r) {
    float *x = h_rand(r, EW_N, -2, 2);
    double *v;
    if (!r->be) {
        out_add(r, "sum", 1, &v);
        for (size_t i = 0; i < EW_N; i++) v[0] += (double)x[i] * x[i];
        return;
    }
    float *dx = d_from(r, x, EW_N * 4);
    out_add(r, "sum", 1, &v);
    if (r->failed) return;
    v[0] = r->be->ops->sum_squares(r->be, dx, EW_N);
    if (isnan(v[0])) conf_fail(r, "sum_squares");
}

/* ---- plugin ABI 2: elementwise ---- */

/* x with NaN, +0, -0 and inf at a few places: maximum and add_sign propagate NaN. */
static float *h_specials(conf_run *r, size_t n, size_t phase) {
    float *x = h_rand(r, n, -2, 2);
    const float sp[4] = {NAN, 0.0f, -0.0f, INFINITY};
    for (size_t i = phase; i < n; i += 997) x[i] = sp[(i / 997) % 4];
    return x;
}

static void op_copy(conf_run *r) {
    float *x = h_rand(r, EW_N, -2, 2);
    if (!r->be) {
        out_host(r, "dst", x, EW_N);
        return;
    }
    float *dx = d_from(r, x, EW_N * 4), *dd = d_nan(r, EW_N);
    if (r->failed) return;
    r->be->ops->copy(r->be, dd, dx, EW_N * sizeof(float));
    out_dev(r, "dst", dd, EW_N);
}

static void op_fill(conf_run *r) {
    if (!r->be) {
        float *ref = h_alloc(r, EW_N * sizeof(float));
        for (size_t i = 0; i < EW_N; i++) ref[i] = -1.75f;
        out_host(r, "x", ref, EW_N);
        return;
    }
    float *dx = d_nan(r, EW_N);
    if (r->failed) return;
    r->be->ops->fill(r->be, dx, -1.75f, EW_N);
    out_dev(r, "x", dx, EW_N);
}

static void op_axpby(conf_run *r) {
    const float beta = r->op->arg[0] ? 0.0f : -1.3f;
    float *x = h_rand(r, EW_N, -2, 2), *y = h_rand(r, EW_N, -2, 2);
    if (beta == 0.0f) /* beta 0 overwrites: NaN in y must not survive */
        for (size_t i = 0; i < EW_N; i += 101) y[i] = NAN;
    if (!r->be) {
        float *ref = h_alloc(r, EW_N * sizeof(float));
        for (size_t i = 0; i < EW_N; i++) ref[i] = beta == 0.0f ? 0.7f * x[i] : 0.7f * x[i] + beta * y[i];
        out_host(r, "y", ref, EW_N);
        return;
    }
    float *dx = d_from(r, x, EW_N * 4), *dy = d_from(r, y, EW_N * 4);
    if (r->failed) return;
    r->be->ops->axpby(r->be, dy, 0.7f, dx, beta, EW_N);
    out_dev(r, "y", dy, EW_N);
}

static void op_lerp(conf_run *r) {
    const float w = r->op->arg[0] / 100.0f;
    float *x = h_rand(r, EW_N, -2, 2), *y = h_rand(r, EW_N, -2, 2);
    if (!r->be) {
        float *ref = h_alloc(r, EW_N * sizeof(float));
        for (size_t i = 0; i < EW_N; i++)
            ref[i] = fabsf(w) < 0.5f ? y[i] + w * (x[i] - y[i]) : x[i] - (x[i] - y[i]) * (1.0f - w);
        out_host(r, "y", ref, EW_N);
        return;
    }
    float *dx = d_from(r, x, EW_N * 4), *dy = d_from(r, y, EW_N * 4);
    if (r->failed) return;
    r->be->ops->lerp(r->be, dy, dx, w, EW_N);
    out_dev(r, "y", dy, EW_N);
}

static void op_addcmul(conf_run *r) {
    float *y = h_rand(r, EW_N, 0, 2), *a = h_rand(r, EW_N, -2, 2), *b = h_rand(r, EW_N, -2, 2);
    if (!r->be) {
        float *ref = h_alloc(r, EW_N * sizeof(float));
        for (size_t i = 0; i < EW_N; i++) ref[i] = y[i] * 0.999f + 0.001f * a[i] * b[i];
        out_host(r, "y", ref, EW_N);
        return;
    }
    float *dy = d_from(r, y, EW_N * 4), *da = d_from(r, a, EW_N * 4), *db = d_from(r, b, EW_N * 4);
    if (r->failed) return;
    r->be->ops->addcmul(r->be, dy, 0.999f, 0.001f, da, db, EW_N);
    out_dev(r, "y", dy, EW_N);
}

static void op_addcdiv_sqrt(conf_run *r) {
    float *y = h_rand(r, EW_N, -2, 2), *a = h_rand(r, EW_N, -2, 2), *b = h_rand(r, EW_N, 0, 1e-4f);
    const float alpha = -1e-3f, b_div = 0.0316f, eps = 1e-8f;
    if (!r->be) {
        float *ref = h_alloc(r, EW_N * sizeof(float));
        for (size_t i = 0; i < EW_N; i++) ref[i] = y[i] + alpha * a[i] / (sqrtf(b[i]) / b_div + eps);
        out_host(r, "y", ref, EW_N);
        return;
    }
    float *dy = d_from(r, y, EW_N * 4), *da = d_from(r, a, EW_N * 4), *db = d_from(r, b, EW_N * 4);
    if (r->failed) return;
    r->be->ops->addcdiv_sqrt(r->be, dy, alpha, da, db, b_div, eps, EW_N);
    out_dev(r, "y", dy, EW_N);
}

static void op_maximum(conf_run *r) {
    float *y = h_specials(r, EW_N, 0), *x = h_specials(r, EW_N, 500);
    if (!r->be) {
        float *ref = h_alloc(r, EW_N * sizeof(float));
        for (size_t i = 0; i < EW_N; i++) ref[i] = isnan(x[i]) || isnan(y[i]) ? NAN : fmaxf(x[i], y[i]);
        out_host(r, "y", ref, EW_N);
        return;
    }
    float *dy = d_from(r, y, EW_N * 4), *dx = d_from(r, x, EW_N * 4);
    if (r->failed) return;
    r->be->ops->maximum(r->be, dy, dx, EW_N);
    out_dev(r, "y", dy, EW_N);
}

static void op_add_sign(conf_run *r) {
    float *y = h_rand(r, EW_N, -2, 2), *x = h_specials(r, EW_N, 3);
    if (!r->be) {
        float *ref = h_alloc(r, EW_N * sizeof(float));
        for (size_t i = 0; i < EW_N; i++)
            ref[i] = isnan(x[i]) ? NAN : y[i] + -0.01f * (float)((x[i] > 0) - (x[i] < 0));
        out_host(r, "y", ref, EW_N);
        return;
    }
    float *dy = d_from(r, y, EW_N * 4), *dx = d_from(r, x, EW_N * 4);
    if (r->failed) return;
    r->be->ops->add_sign(r->be, dy, -0.01f, dx, EW_N);
    out_dev(r, "y", dy, EW_N);
}

static void op_mul(conf_run *r) {
    float *y = h_rand(r, EW_N, -2, 2), *x = h_rand(r, EW_N, -2, 2);
    if (!r->be) {
        float *ref = h_alloc(r, EW_N * sizeof(float));
        for (size_t i = 0; i < EW_N; i++) ref[i] = y[i] * x[i];
        out_host(r, "y", ref, EW_N);
        return;
    }
    float *dy = d_from(r, y, EW_N * 4), *dx = d_from(r, x, EW_N * 4);
    if (r->failed) return;
    r->be->ops->mul(r->be, dy, dx, EW_N);
    out_dev(r, "y", dy, EW_N);
}

/* arg[0]: accumulate. The counter starts past 2^32, as a long run's passes do. */
static void op_dropout(conf_run *r) {
    const int acc = r->op->arg[0];
    const float p = 0.1f;
    const uint64_t seed = 0xD00Dull, counter0 = (1ull << 32) + 12345;
    float *x = h_rand(r, EW_N, -2, 2), *y = h_rand(r, EW_N, -2, 2);
    if (!r->be) {
        float *ref = h_alloc(r, EW_N * sizeof(float));
        const float keep = 1.0f / (1.0f - p);
        for (size_t i = 0; i < EW_N; i++) {
            int kept = mt_random_uniform(seed, counter0 + i) >= p;
            ref[i] = acc ? (kept ? y[i] + x[i] * keep : y[i]) : (kept ? x[i] * keep : 0.0f);
        }
        out_host(r, "y", ref, EW_N);
        return;
    }
    float *dx = d_from(r, x, EW_N * 4), *dy = acc ? d_from(r, y, EW_N * 4) : d_nan(r, EW_N);
    if (r->failed) return;
    r->be->ops->dropout(r->be, dy, dx, p, seed, counter0, acc, EW_N);
    out_dev(r, "y", dy, EW_N);
}

/* ---- plugin ABI 2: softmax rows (targets: in range, skipped < 0, statistics only >= V) ---- */

static int32_t *softmax_targets(conf_run *r) {
    int32_t *t = h_ints(r, ROWS, VOCAB);
    for (int i = 0; i < ROWS; i++)
        if (i % 4 == 1) t[i] = -1;
        else if (i % 4 == 2) t[i] = VOCAB + i;
    return t;
}

static void op_softmax_stats(conf_run *r) {
    float *x = h_rand(r, (size_t)ROWS * VOCAB, -10, 10);
    for (int j = 0; j < VOCAB; j++) x[VOCAB + j] += 500.0f; /* row 1 needs the max shift */
    int32_t *t = softmax_targets(r);
    if (!r->be) {
        float *lse = h_alloc(r, ROWS * 4), *tl = h_alloc(r, ROWS * 4), *ml = h_alloc(r, ROWS * 4);
        for (int n = 0; n < ROWS; n++) {
            const float *xr = x + (size_t)n * VOCAB;
            double m = -INFINITY, s = 0.0, sx = 0.0;
            for (int j = 0; j < VOCAB; j++) m = xr[j] > m ? xr[j] : m;
            for (int j = 0; j < VOCAB; j++) s += exp(xr[j] - m), sx += xr[j];
            const int skipped = t[n] < 0; /* a skipped row: zeros */
            lse[n] = skipped ? 0.0f : (float)(m + log(s));
            tl[n] = !skipped && t[n] < VOCAB ? xr[t[n]] : 0.0f;
            ml[n] = skipped ? 0.0f : (float)(sx / VOCAB);
        }
        out_host(r, "lse", lse, ROWS);
        out_host(r, "target_logit", tl, ROWS);
        out_host(r, "mean_logit", ml, ROWS);
        out_host(r, "lse (no options)", lse, ROWS);
        return;
    }
    float *dx = d_from(r, x, (size_t)ROWS * VOCAB * 4);
    int32_t *dt = d_from(r, t, ROWS * sizeof(int32_t));
    float *lse = d_nan(r, ROWS), *tl = d_nan(r, ROWS), *ml = d_nan(r, ROWS), *lse2 = d_nan(r, ROWS);
    if (r->failed) return;
    r->be->ops->softmax_stats(r->be, lse, tl, ml, dx, dt, ROWS, VOCAB);
    r->be->ops->softmax_stats(r->be, lse2, NULL, NULL, dx, dt, ROWS, VOCAB); /* optional outputs */
    out_dev(r, "lse", lse, ROWS);
    out_dev(r, "target_logit", tl, ROWS);
    out_dev(r, "mean_logit", ml, ROWS);
    out_dev(r, "lse (no options)", lse2, ROWS);
}

static void op_softmax_backward(conf_run *r) {
    float *x = h_rand(r, (size_t)ROWS * VOCAB, -10, 10), *coefs = h_rand(r, ROWS * 3, -1, 1);
    int32_t *t = softmax_targets(r);
    float *lse = h_alloc(r, ROWS * sizeof(float));
    for (int n = 0; n < ROWS; n++) { /* the rows' log-sum-exp, computed here in double */
        const float *xr = x + (size_t)n * VOCAB;
        double m = -INFINITY, s = 0.0;
        for (int j = 0; j < VOCAB; j++) m = xr[j] > m ? xr[j] : m;
        for (int j = 0; j < VOCAB; j++) s += exp(xr[j] - m);
        lse[n] = (float)(m + log(s));
    }
    if (!r->be) {
        float *ref = h_alloc(r, (size_t)ROWS * VOCAB * sizeof(float));
        for (int n = 0; n < ROWS; n++)
            for (int j = 0; j < VOCAB; j++) {
                double v = coefs[3 * n] * exp((double)x[(size_t)n * VOCAB + j] - lse[n]) + coefs[3 * n + 1];
                ref[(size_t)n * VOCAB + j] =
                    t[n] < 0 ? 0.0f : (float)(v + (j == t[n] ? coefs[3 * n + 2] : 0.0));
            }
        out_host(r, "x", ref, (size_t)ROWS * VOCAB);
        return;
    }
    float *dx = d_from(r, x, (size_t)ROWS * VOCAB * 4), *dl = d_from(r, lse, ROWS * 4);
    float *dc = d_from(r, coefs, ROWS * 3 * 4);
    int32_t *dt = d_from(r, t, ROWS * sizeof(int32_t));
    if (r->failed) return;
    r->be->ops->softmax_backward(r->be, dx, dl, dt, dc, ROWS, VOCAB);
    out_dev(r, "x", dx, (size_t)ROWS * VOCAB);
}

/* ---- plugin ABI 2: 4-bit dequantization, from an odd first inside a block ---- */

static void op_dequantize_4bit(conf_run *r) {
    const int block = 64, block2 = 256;
    const int64_t first = 64 * 17 + 9, n = EW_N, total = first + n;
    const int64_t nb = (total + block - 1) / block, nb2 = (nb + block2 - 1) / block2;
    uint8_t *codes = h_alloc(r, (size_t)(total + 1) / 2), *aq = h_alloc(r, (size_t)nb);
    for (int64_t i = 0; i < (total + 1) / 2; i++) codes[i] = (uint8_t)mt_test_rand_u64(&r->rng);
    for (int64_t i = 0; i < nb; i++) aq[i] = (uint8_t)mt_test_rand_u64(&r->rng);
    float *a2 = h_rand(r, (size_t)nb2, 0.01f, 0.2f), *table = h_rand(r, 16 + 256, -1, 1);
    const float offset = 0.021f;
    if (!r->be) {
        float *ref = h_alloc(r, (size_t)n * sizeof(float));
        for (int64_t i = 0; i < n; i++) {
            int64_t e = first + i, b = e / block;
            int code = e % 2 ? codes[e / 2] & 0x0F : codes[e / 2] >> 4;
            float s = table[16 + aq[b]] * a2[b / block2];
            s = s + offset;
            ref[i] = table[code] * s;
        }
        out_host(r, "out", ref, (size_t)n);
        return;
    }
    uint8_t *dcodes = d_from(r, codes, (size_t)(total + 1) / 2), *daq = d_from(r, aq, (size_t)nb);
    float *da2 = d_from(r, a2, (size_t)nb2 * 4), *dtab = d_from(r, table, 272 * 4);
    float *dout = d_nan(r, (size_t)n);
    if (r->failed) return;
    r->be->ops->dequantize_4bit(r->be, dout, dcodes, daq, da2, dtab, offset, first, n, block,
                                block2);
    out_dev(r, "out", dout, (size_t)n);
}

/* ---- the table ---- */

#define TOL_EXACT 0.0   /* data movement and single roundings: the same bits */
#define TOL_EW 1e-5     /* fp32 elementwise */
#define TOL_ROW 1e-5    /* row reductions in double or with a max shift */
#define TOL_SUM 1e-4    /* sums whose order differs between backends */

static const conf_op conf_ops[] = {
    {"matmul nn", TOL_SUM, op_matmul, {0, 0, 0, 0}},
    {"matmul nt", TOL_SUM, op_matmul, {0, 1, 0, 0}},
    {"matmul tn", TOL_SUM, op_matmul, {1, 0, 0, 0}},
    {"matmul tt", TOL_SUM, op_matmul, {1, 1, 0, 0}},
    {"matmul nt M=1", TOL_SUM, op_matmul, {0, 1, 1, 0}},
    {"matmul nn M=1", TOL_SUM, op_matmul, {0, 0, 1, 0}},
    {"bias_forward", TOL_EW, op_bias_forward, {0}},
    {"bias_backward", TOL_SUM, op_bias_backward, {0}},
    {"add", TOL_EW, op_add, {0}},
    {"axpy", TOL_EW, op_axpy, {0}},
    {"embedding_forward", TOL_EXACT, op_embedding_forward, {0}},
    {"embedding_backward", TOL_EW, op_embedding_backward, {0}},
    {"rmsnorm_forward", TOL_ROW, op_rmsnorm_forward, {0}},
    {"rmsnorm_backward", TOL_SUM, op_rmsnorm_backward, {0}},
    {"rope_forward", TOL_EW, op_rope, {0}},
    {"rope_backward", TOL_EW, op_rope, {1}},
    {"attention_forward", TOL_SUM, op_attention_forward, {0, 4, 64, 0}},
    {"attention_forward gqa", TOL_SUM, op_attention_forward, {0, 2, 64, 0}},
    {"attention_forward seg", TOL_SUM, op_attention_forward, {1, 4, 32, 0}},
    {"attention_forward seg gqa", TOL_SUM, op_attention_forward, {1, 1, 96, 0}},
    {"attention_backward", TOL_SUM, op_attention_backward, {0, 4, 64, 0}},
    {"attention_backward gqa", TOL_SUM, op_attention_backward, {0, 2, 64, 0}},
    {"attention_backward seg", TOL_SUM, op_attention_backward, {1, 4, 32, 0}},
    {"attention_backward seg gqa", TOL_SUM, op_attention_backward, {1, 1, 96, 0}},
    {"swiglu_forward", TOL_EW, op_swiglu_forward, {0}},
    {"swiglu_backward", TOL_EW, op_swiglu_backward, {0}},
    {"cross_entropy_forward", TOL_ROW, op_cross_entropy_forward, {0}},
    {"cross_entropy_backward", TOL_ROW, op_cross_entropy_backward, {0}},
    {"sum_squares", 1e-10, op_sum_squares, {0}},
    /* plugin ABI 2 */
    {"copy", TOL_EXACT, op_copy, {0}},
    {"fill", TOL_EXACT, op_fill, {0}},
    {"axpby", TOL_EW, op_axpby, {0}},
    {"axpby beta=0", TOL_EW, op_axpby, {1}},
    {"lerp w=0.1", TOL_EW, op_lerp, {10}},
    {"lerp w=0.9", TOL_EW, op_lerp, {90}},
    {"addcmul", TOL_EW, op_addcmul, {0}},
    {"addcdiv_sqrt", TOL_EW, op_addcdiv_sqrt, {0}},
    {"maximum", TOL_EW, op_maximum, {0}},
    {"add_sign", TOL_EW, op_add_sign, {0}},
    {"mul", TOL_EW, op_mul, {0}},
    {"dropout", TOL_EXACT, op_dropout, {0}},
    {"dropout accumulate", TOL_EXACT, op_dropout, {1}},
    {"softmax_stats", TOL_ROW, op_softmax_stats, {0}},
    {"softmax_backward", TOL_ROW, op_softmax_backward, {0}},
    {"dequantize_4bit", TOL_EXACT, op_dequantize_4bit, {0}},
};
#define N_CONF_OPS (sizeof conf_ops / sizeof conf_ops[0])

/* ---- running and comparing ---- */

static void conf_run_op(conf_run *r, const conf_op *op, mt_backend *be) {
    memset(r, 0, sizeof *r);
    r->op = op;
    r->be = be;
    r->rng = 0x5EEDull + (uint64_t)(op - conf_ops) * 7919; /* the row's inputs */
    op->run(r);
}

typedef struct conf_err {
    double abs, rel;
    const char *worst; /* the output with the largest rel */
} conf_err;

/* The worst error over the outputs of got against ref (same row, same order). */
static int conf_compare(const conf_run *got, const conf_run *ref, conf_err *e) {
    e->abs = e->rel = 0.0;
    e->worst = "";
    if (got->nout != ref->nout) return 0;
    for (int k = 0; k < got->nout; k++) {
        const conf_out *g = &got->out[k], *f = &ref->out[k];
        if (g->n != f->n) return 0;
        double max_err = 0.0, max_ref = 0.0;
        for (size_t i = 0; i < g->n; i++) {
            double a = g->v[i], b = f->v[i];
            if (isnan(a) && isnan(b)) continue;
            double d = isnan(a) || isnan(b) ? INFINITY : a == b ? 0.0 : fabs(a - b);
            if (!(d <= max_err)) max_err = d; /* inf - inf is NaN: a failure too */
            if (isfinite(b) && fabs(b) > max_ref) max_ref = fabs(b);
        }
        double rel = max_ref > 0.0 ? max_err / max_ref : max_err;
        if (!(max_err <= e->abs)) e->abs = max_err;
        if (k == 0 || !(rel <= e->rel)) {
            e->rel = rel;
            e->worst = g->name;
        }
    }
    return 1;
}

/* Every output finite (the CPU's own check where a row has no naive loops; the inputs of
 * those rows are finite, so a NaN is an unwritten or broken element). */
static int conf_all_finite(const conf_run *r) {
    for (int k = 0; k < r->nout; k++)
        for (size_t i = 0; i < r->out[k].n; i++)
            if (!isfinite(r->out[k].v[i])) return 0;
    return 1;
}

static void conf_header(void) {
    printf("conformance: %-28s %-5s %-7s %10s %10s %8s  %s\n", "op", "on", "against", "max abs",
           "max rel", "tol", "result");
}

static void conf_line(const conf_op *op, const char *on, const char *against, const conf_err *e,
                      int pass, const char *note) {
    printf("conformance: %-28s %-5s %-7s %10.2e %10.2e %8.0e  %s%s%s\n", op->name, on, against,
           e->abs, e->rel, op->tol, pass ? "PASS" : "FAIL", note[0] ? "  " : "", note);
}

/* The CPU backend against the naive loops, or against itself (finite, same bits twice)
 * where a row has none. Returns the number of failures. */
static int conf_check_cpu(mt_backend *cpu) {
    int failures = 0;
    conf_header();
    for (size_t i = 0; i < N_CONF_OPS; i++) {
        const conf_op *op = &conf_ops[i];
        conf_run naive, got, again;
        conf_err e = {0, 0, ""};
        conf_run_op(&naive, op, NULL);
        conf_run_op(&got, op, cpu);
        int pass;
        char note[MT_ERROR_MSG_MAX + 96] = "";
        if (got.failed) {
            pass = 0;
            snprintf(note, sizeof note, "%s", got.msg);
        } else if (!naive.no_naive) {
            int same_shape = conf_compare(&got, &naive, &e);
            pass = same_shape && e.rel <= op->tol;
            if (!pass)
                snprintf(note, sizeof note, "%s%s", same_shape ? "worst output: " : "",
                         same_shape ? e.worst : "the outputs differ in number or size");
        } else {
            conf_run_op(&again, op, cpu);
            pass = !again.failed && conf_all_finite(&got) && conf_compare(&again, &got, &e) &&
                   e.abs == 0.0;
            snprintf(note, sizeof note, "%s", pass ? "" : "not finite, or not the same twice");
            run_free(&again);
        }
        conf_line(op, "cpu", naive.no_naive ? "itself" : "naive", &e, pass, note);
        failures += !pass;
        run_free(&naive);
        run_free(&got);
    }
    return failures;
}

/* Another backend against the CPU backend. Returns the number of failures. */
static int conf_check_against_cpu(mt_backend *be, mt_backend *cpu) {
    int failures = 0;
    conf_header();
    for (size_t i = 0; i < N_CONF_OPS; i++) {
        const conf_op *op = &conf_ops[i];
        conf_run ref, got;
        conf_err e = {0, 0, ""};
        conf_run_op(&ref, op, cpu);
        conf_run_op(&got, op, be);
        char note[MT_ERROR_MSG_MAX + 96] = "";
        int pass = !ref.failed && !got.failed && conf_compare(&got, &ref, &e) && e.rel <= op->tol;
        if (got.failed) snprintf(note, sizeof note, "%s", got.msg);
        else if (!pass) snprintf(note, sizeof note, "worst output: %s", e.worst);
        conf_line(op, be->name, "cpu", &e, pass, note);
        failures += !pass;
        run_free(&ref);
        run_free(&got);
    }
    return failures;
}

static void test_conformance_cpu(void **state) {
    (void)state;
    mt_backend cpu;
    mt_error err = {0};
    assert_int_equal(conf_open_backend("cpu", &cpu, &err), MT_OK);
    int failures = conf_check_cpu(&cpu);
    conf_close_backend(&cpu);
    printf("conformance: cpu: %d of %zu rows failed\n", failures, N_CONF_OPS);
    assert_int_equal(failures, 0);
}

static void test_conformance_cuda(void **state) {
    (void)state;
    mt_backend cuda, cpu;
    mt_error err = {0};
    memset(&cuda, 0, sizeof cuda);
    if (conf_open_backend("cuda", &cuda, &err) != MT_OK) {
        printf("conformance: cuda backend not run: %s\n", err.msg);
        if (conf_require_cuda()) fail_msg("MT_REQUIRE_CUDA=1 but the CUDA backend did not open");
        return;
    }
    assert_int_equal(conf_open_backend("cpu", &cpu, &err), MT_OK);
    int failures = conf_check_against_cpu(&cuda, &cpu);
    conf_close_backend(&cpu);
    conf_close_backend(&cuda);
    printf("conformance: cuda: %d of %zu rows failed\n", failures, N_CONF_OPS);
    assert_int_equal(failures, 0);
}

/* ==== section 2: a whole training step of a tiny model ================================
 *
 * The tiny GQA parity model with each standard adapter, the cross-entropy loss and AdamW,
 * through the plugin ABI on one backend: one optimizer step over two micro-batches with
 * unequal target counts. The loss, every trainable gradient and every updated value are
 * compared with the CPU backend's (on the CPU itself: a second run must give the same
 * bits, so the step is deterministic). */

#define STEP_ROWS 2
#define STEP_LEN 9
#define STEP_LR 1e-2
#define STEP_ADAM_EPS 1e-8 /* adamw's default */

typedef struct step_out {
    double loss;
    size_t n;      /* values in grads and values */
    float *grads;  /* every trainable gradient, then */
    float *values; /* every trainable value after the step, in trainable-parameter order */
} step_out;

static mt_plugin *step_plugin(const char *name, mt_error *err) {
    char path[512];
    snprintf(path, sizeof path, "%s/plugins/%s.so", MT_BUILD_DIR, name);
    mt_plugin *p = NULL;
    return mt_plugin_load(path, &p, err) ? NULL : p;
}

static mt_status train_step_on(mt_backend *be, const char *adapter, step_out *out, mt_error *err) {
    memset(out, 0, sizeof *out);
    mt_model *m = NULL;
    mt_plugin *pl[3] = {step_plugin("cross_entropy", err), NULL, NULL};
    pl[1] = pl[0] ? step_plugin("adamw", err) : NULL;
    pl[2] = pl[1] ? step_plugin(adapter, err) : NULL;
    mt_plugin_instance *loss = NULL, *opt = NULL, *ad = NULL;
    mt_param_view *params = NULL;
    size_t n_params = 0;
    mt_status st = pl[2] ? MT_OK : MT_ERR_IO;
    if (!st) st = mt_model_load_hf(MT_FIXTURE_DIR "/tiny_gqa", be, &m, err);
    if (!st) st = mt_plugin_instantiate(pl[0], NULL, 0, &loss, err);
    if (!st) st = mt_plugin_instantiate(pl[1], NULL, 0, &opt, err);
    if (!st) st = mt_plugin_instantiate(pl[2], NULL, 0, &ad, err);
    if (!st) st = mt_model_attach_adapter(m, ad->desc->vtable, ad->state, err);
    if (!st) st = mt_model_plan(m, STEP_ROWS, STEP_LEN, 0, err);
    int32_t tokens[2][STEP_ROWS * STEP_LEN], targets[2][STEP_ROWS * STEP_LEN];
    for (int b = 0; b < 2; b++)
        for (int i = 0; i < STEP_ROWS * STEP_LEN; i++) {
            tokens[b][i] = (int32_t)((i * 31 + 7 * b + 3) % (m ? m->cfg.vocab_size : 1));
            /* micro-batch 0 trains on 2 positions per row, micro-batch 1 on 6 */
            int from = b == 0 ? STEP_LEN - 2 : 3;
            targets[b][i] = i % STEP_LEN >= from ? (int32_t)((i * 13 + b) % (m ? m->cfg.vocab_size : 1)) : -100;
        }
    mt_batch mb[2];
    for (int b = 0; b < 2; b++)
        mb[b] = (mt_batch){.size = sizeof(mt_batch), .B = STEP_ROWS, .T = STEP_LEN,
                           .tokens = tokens[b], .targets = targets[b]};
    mt_step_result res;
    if (!st) st = mt_train_step(m, loss, opt, mb, 2, STEP_LR, 1, 0.0, &res, err);
    if (!st) st = mt_model_trainable_params(m, &params, &n_params, err);
    for (size_t i = 0; !st && i < n_params; i++) out->n += (size_t)mt_tensor_numel(&params[i].value);
    if (!st) {
        out->loss = res.loss;
        out->grads = calloc(out->n + 1, sizeof(float));
        out->values = calloc(out->n + 1, sizeof(float));
        if (!out->grads || !out->values) st = mt_error_set(err, MT_ERR_NOMEM, "step copies");
    }
    size_t k = 0;
    for (size_t i = 0; !st && i < n_params; i++) {
        size_t n = (size_t)mt_tensor_numel(&params[i].value);
        st = mt_device_download(out->grads + k, &params[i].grad, err);
        if (!st) st = mt_device_download(out->values + k, &params[i].value, err);
        k += n;
    }
    free(params);
    mt_model_free(m);
    mt_plugin_instance_free(loss);
    mt_plugin_instance_free(opt);
    mt_plugin_instance_free(ad);
    for (int i = 0; i < 3; i++)
        if (pl[i]) mt_plugin_unload(pl[i]);
    return st;
}

static double max_rel(const float *a, const float *b, size_t n) {
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]) / fmax(fabs((double)b[i]), 1e-3);
        if (!(d <= worst)) worst = d; /* NaN is the worst */
    }
    return worst;
}

/* The updated values, with AdamW's first step in mind: the step moves each value by
 * lr * g / (|g| + eps) (plus decay), so an element whose gradient is near zero, where
 * fp32 sums in another order differ most in relative terms, moves by up to 2 lr more or
 * less for a gradient difference that is tiny in absolute terms. Each element may differ
 * by the tolerance relative to its value plus lr * min(2, |dg| / (|g| + eps)), the
 * first step's sensitivity to the gradient difference that was measured. */
static double max_rel_updated(const step_out *got, const step_out *ref, double lr, double eps) {
    double worst = 0.0;
    for (size_t i = 0; i < ref->n; i++) {
        double dg = fabs((double)got->grads[i] - ref->grads[i]);
        double allowed_move = lr * fmin(2.0, dg / (fabs((double)ref->grads[i]) + eps));
        double d = fabs((double)got->values[i] - ref->values[i]) - allowed_move;
        d = (d > 0 ? d : 0.0) / fmax(fabs((double)ref->values[i]), 1e-3);
        if (!(d <= worst)) worst = d; /* NaN is the worst */
    }
    return worst;
}

/* Returns the failures of one backend against the CPU for every standard adapter. */
static int conf_train_steps(mt_backend *be, mt_backend *cpu, double tolerance) {
    static const char *const adapters[] = {"full", "lora", "qlora"};
    int failures = 0;
    for (size_t a = 0; a < sizeof adapters / sizeof *adapters; a++) {
        step_out got, ref;
        mt_error err = {0};
        if (train_step_on(be, adapters[a], &got, &err) || train_step_on(cpu, adapters[a], &ref, &err)) {
            printf("conformance: train step %-6s %-5s FAIL: %s\n", adapters[a], be->name, err.msg);
            failures++;
            continue;
        }
        double dl = fabs(got.loss - ref.loss) / fabs(ref.loss);
        double dg = got.n == ref.n ? max_rel(got.grads, ref.grads, ref.n) : INFINITY;
        double dv = got.n == ref.n ? max_rel_updated(&got, &ref, STEP_LR, STEP_ADAM_EPS) : INFINITY;
        int pass = dl <= tolerance && dg <= tolerance && dv <= tolerance && ref.n > 0;
        printf("conformance: train step %-6s %-5s loss %.8g vs %.8g, %zu values: rel. err. loss "
               "%.2g, gradients %.2g, updated values %.2g (beyond AdamW's sensitivity)  %s\n",
               adapters[a], be->name, got.loss, ref.loss, ref.n, dl, dg, dv, pass ? "PASS" : "FAIL");
        failures += !pass;
        free(got.grads), free(got.values), free(ref.grads), free(ref.values);
    }
    return failures;
}

static void test_train_step_cpu(void **state) {
    (void)state;
    mt_backend cpu, cpu2;
    mt_error err = {0};
    assert_int_equal(conf_open_backend("cpu", &cpu, &err), MT_OK);
    assert_int_equal(conf_open_backend("cpu", &cpu2, &err), MT_OK);
    int failures = conf_train_steps(&cpu2, &cpu, 0.0); /* the same bits, run twice */
    conf_close_backend(&cpu2);
    conf_close_backend(&cpu);
    assert_int_equal(failures, 0);
}

static void test_train_step_cuda(void **state) {
    (void)state;
    mt_backend cuda, cpu;
    mt_error err = {0};
    memset(&cuda, 0, sizeof cuda);
    if (conf_open_backend("cuda", &cuda, &err) != MT_OK) {
        printf("conformance: cuda train step not run: %s\n", err.msg);
        if (conf_require_cuda()) fail_msg("MT_REQUIRE_CUDA=1 but the CUDA backend did not open");
        return;
    }
    assert_int_equal(conf_open_backend("cpu", &cpu, &err), MT_OK);
    /* fp32 on both, different summation orders: 1e-3 relative on a tiny model */
    int failures = conf_train_steps(&cuda, &cpu, 1e-3);
    conf_close_backend(&cpu);
    conf_close_backend(&cuda);
    assert_int_equal(failures, 0);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0); /* our lines and cmocka's in order when piped */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_conformance_cpu),
        cmocka_unit_test(test_conformance_cuda),
        cmocka_unit_test(test_train_step_cpu),
        cmocka_unit_test(test_train_step_cuda),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
