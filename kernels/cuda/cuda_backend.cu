/* cuda_backend.cu — the CUDA backend: fp32 kernels and cuBLASLt matrix products.
 *
 * Status. Verified: this file compiles without warnings for sm_80 and sm_90 with the
 * CUDA 13 toolkit, links against cudart and cuBLASLt, and mt_backend_cuda_init fails
 * cleanly (MT_ERR_BACKEND, "no CUDA device ...") on a machine without a GPU or driver.
 * Not yet verified: any run on a GPU. Every op here is a first, straightforward version
 * written for correctness; a later device check runs each op against the CPU backend
 * (kernels/cpu) on random inputs and compares the results (tests/unit/test_conformance.c,
 * run on a GPU by scripts/device-check). Until that check passes, treat this backend as
 * unproven. The operations of plugin ABI 2 (optimizer updates, dropout, softmax rows,
 * 4-bit dequantization) close the file, before init.
 *
 * Layout. One context per backend: the device, one non-blocking stream that every op
 * is queued on, a cuBLASLt handle with its workspace, and a small buffer for
 * reductions. Every CUDA runtime and cuBLASLt call goes through CUDA_CHECK or
 * CUBLAS_CHECK, which record the first failure (file, line, call, error string) in the
 * context. Ops that return void leave the failure there; sync, upload and download
 * return it, and mt_backend_cuda_error_message (cuda_backend.h) reads the message. The
 * first error is sticky: once one is recorded, the void ops do nothing and every
 * status-returning op returns it, because most CUDA errors leave the context unusable.
 *
 * Numerics. Everything is fp32 (matrix products with CUBLAS_COMPUTE_32F, no TF32), so
 * results should match the CPU backend to float rounding. Reductions run in a fixed
 * order, so repeated runs on one GPU give identical bits; embedding_backward even sums
 * in the CPU's order (ascending token position). See docs/cuda.md for the plan towards
 * bf16 mixed precision. */
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cublasLt.h>
#include <cuda_runtime.h>
#ifdef MT_HAVE_NCCL
#include <nccl.h>
#endif

#include "moontune/moontune.h"

extern "C" {
}
#include "cuda_backend.h" /* includes backend.h with C linkage */

/* ---- context and error recording ------------------------------------------------ */

#define MT_CUDA_WORKSPACE_BYTES ((size_t)32 << 20) /* cuBLASLt workspace: 32 MiB (Hopper) */
#define MT_CUDA_SUMSQ_BLOCKS 1024                  /* fixed, so sum_squares is deterministic */

typedef struct cuda_ctx {
    int device;
    int sm_count;
    cudaStream_t stream;
    cublasLtHandle_t lt;
    void *lt_workspace;  /* MT_CUDA_WORKSPACE_BYTES */
    double *sumsq;       /* MT_CUDA_SUMSQ_BLOCKS partial sums, then the total */
#ifdef MT_HAVE_NCCL
    ncclComm_t comm;     /* data parallel: the job's ranks (NULL until comm_init) */
#endif
    mt_status status;    /* first recorded error; MT_OK when none */
    char msg[MT_ERROR_MSG_MAX];
} cuda_ctx;

#if defined(__GNUC__)
__attribute__((format(printf, 5, 6)))
#endif
static void cuda_record(cuda_ctx *cx, mt_status status, const char *file, int line,
                        const char *fmt, ...) {
    if (cx->status != MT_OK) return; /* keep the first */
    int n = snprintf(cx->msg, sizeof cx->msg, "cuda backend: %s:%d: ", file, line);
    if (n < 0 || (size_t)n >= sizeof cx->msg) n = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cx->msg + n, sizeof cx->msg - (size_t)n, fmt, ap);
    va_end(ap);
    cx->status = status;
}

static int cuda_check(cuda_ctx *cx, cudaError_t e, const char *call, const char *file, int line) {
    if (e == cudaSuccess) return 1;
    cuda_record(cx, MT_ERR_BACKEND, file, line, "%s failed: %s (%s)", call, cudaGetErrorString(e),
                cudaGetErrorName(e));
    return 0;
}

static int cublas_check(cuda_ctx *cx, cublasStatus_t s, const char *call, const char *file,
                        int line) {
    if (s == CUBLAS_STATUS_SUCCESS) return 1;
    cuda_record(cx, MT_ERR_BACKEND, file, line, "%s failed: %s (%s)", call,
                cublasLtGetStatusString(s), cublasLtGetStatusName(s));
    return 0;
}

/* Each evaluates to 1 on success and 0 (with the error recorded in cx) on failure. */
#define CUDA_CHECK(cx, call) cuda_check((cx), (call), #call, __FILE__, __LINE__)
#define CUBLAS_CHECK(cx, call) cublas_check((cx), (call), #call, __FILE__, __LINE__)
/* After a kernel launch: a bad configuration surfaces here, faults in the kernel at sync. */
#define LAUNCH_CHECK(cx, name) cuda_check((cx), cudaGetLastError(), (name), __FILE__, __LINE__)
#define RECORD(cx, status, ...) cuda_record((cx), (status), __FILE__, __LINE__, __VA_ARGS__)

static cuda_ctx *ctx_of(mt_backend *be) { return (cuda_ctx *)be->ctx; }

/* Grid for a grid-stride loop over n items; the cap does not change any result. */
static unsigned grid_for(const cuda_ctx *cx, size_t n, int threads) {
    size_t blocks = (n + (size_t)threads - 1) / (size_t)threads;
    size_t cap = (size_t)(cx->sm_count > 0 ? cx->sm_count : 1) * 32;
    if (blocks > cap) blocks = cap;
    return (unsigned)(blocks ? blocks : 1);
}

/* ---- device helpers ---------------------------------------------------------------- */

template <typename T> __device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum over the block, returned to every thread, in a fixed order (deterministic).
 * blockDim.x must be a multiple of 32; `sh` holds 32 values. */
template <typename T> __device__ T block_sum(T v, T *sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads(); /* sh may still be read by a previous call */
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : (T)0;
    return warp_sum(v);
}

__device__ float block_max(float v, float *sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : -INFINITY;
    return warp_max(v);
}

#define GRID_STRIDE(i, n)                                                                          \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                       \
         i += (size_t)gridDim.x * blockDim.x)

/* ---- memory ------------------------------------------------------------------------ */

static void *cuda_alloc(mt_backend *be, size_t bytes) {
    cuda_ctx *cx = ctx_of(be);
    void *p = NULL;
    /* cudaMalloc aligns to at least 256 bytes, more than the 64 the interface asks. */
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError(); /* out of memory is not sticky: the caller reports it */
        return NULL;
    }
    if (!cuda_check(cx, e, "cudaMalloc", __FILE__, __LINE__)) return NULL;
    /* Queued on the backend's stream, so it is ordered before any later use of p. */
    if (!CUDA_CHECK(cx, cudaMemsetAsync(p, 0, bytes ? bytes : 1, cx->stream))) {
        (void)cudaFree(p);
        return NULL;
    }
    return p;
}

static void cuda_free(mt_backend *be, void *ptr) {
    if (!ptr) return;
    /* cudaFree waits for the device, so queued work that uses ptr completes first. */
    CUDA_CHECK(ctx_of(be), cudaFree(ptr));
}

static mt_status cuda_upload(mt_backend *be, void *dst_device, const void *src_host,
                             size_t bytes) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK) return cx->status;
    if (bytes == 0) return MT_OK;
    if (!CUDA_CHECK(cx, cudaMemcpyAsync(dst_device, src_host, bytes, cudaMemcpyHostToDevice,
                                        cx->stream)))
        return cx->status;
    if (!CUDA_CHECK(cx, cudaStreamSynchronize(cx->stream))) return cx->status;
    return MT_OK;
}

static mt_status cuda_download(mt_backend *be, void *dst_host, const void *src_device,
                               size_t bytes) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK) return cx->status;
    if (bytes == 0) return MT_OK;
    if (!CUDA_CHECK(cx, cudaMemcpyAsync(dst_host, src_device, bytes, cudaMemcpyDeviceToHost,
                                        cx->stream)))
        return cx->status;
    if (!CUDA_CHECK(cx, cudaStreamSynchronize(cx->stream))) return cx->status;
    return MT_OK;
}

static void cuda_zero(mt_backend *be, void *ptr, size_t bytes) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || bytes == 0) return;
    CUDA_CHECK(cx, cudaMemsetAsync(ptr, 0, bytes, cx->stream));
}

static mt_status cuda_sync(mt_backend *be) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK) return cx->status;
    if (!CUDA_CHECK(cx, cudaStreamSynchronize(cx->stream))) return cx->status;
    return MT_OK;
}

/* ---- matrix products ----------------------------------------------------------------- */

/* c (n) = beta * c, with beta == 0 writing zeros (c is not read, as in BLAS). */
__global__ void scale_kernel(float *c, float beta, size_t n) {
    GRID_STRIDE(i, n) c[i] = beta == 0.0f ? 0.0f : beta * c[i];
}

/* Largest power of two (at most 256) that divides the address: cuBLASLt's heuristic
 * assumes 256-byte aligned operands unless told otherwise, and slices of a larger
 * allocation need not be. */
static uint32_t ptr_alignment(const void *p) {
    uintptr_t a = (uintptr_t)p;
    uint32_t align = 256;
    while (align > 4 && (a & (align - 1)) != 0) align >>= 1;
    return align;
}

/* Row-major c (M,N) = alpha op(a) op(b) + beta c is column-major c^T (N,M) =
 * alpha op(b)^T op(a)^T + beta c^T, and a row-major (R,C) array read column-major is its
 * transpose (C,R). So cuBLASLt's first operand is b, its second is a, and the
 * transpose flags carry over unchanged:
 *   b: (K,N) row-major = col-major (N,K), ld N: op N    | trans_b: (N,K) = col (K,N), ld K: op T
 *   a: (M,K) row-major = col-major (K,M), ld K: op N    | trans_a: (K,M) = col (M,K), ld M: op T
 *   c: (M,N) row-major = col-major (N,M), ld N. */
static void cuda_matmul(mt_backend *be, float *c, const float *a, const float *b, int M, int N,
                        int K, int trans_a, int trans_b, float alpha, float beta) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK) return;
    if (M < 0 || N < 0 || K < 0) {
        RECORD(cx, MT_ERR_INVALID_ARG, "matmul: negative size M=%d N=%d K=%d", M, N, K);
        return;
    }
    if (M == 0 || N == 0) return;
    if (K == 0) { /* an empty sum: c = beta c */
        size_t n = (size_t)M * (size_t)N;
        scale_kernel<<<grid_for(cx, n, 256), 256, 0, cx->stream>>>(c, beta, n);
        LAUNCH_CHECK(cx, "scale_kernel");
        return;
    }

    cublasLtMatmulDesc_t op = NULL;
    cublasLtMatrixLayout_t la = NULL, lb = NULL, lc = NULL;
    cublasLtMatmulPreference_t pref = NULL;
    cublasOperation_t opb = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N; /* cuBLASLt's A */
    cublasOperation_t opa = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N; /* cuBLASLt's B */
    uint64_t workspace = MT_CUDA_WORKSPACE_BYTES;
    uint32_t align_b = ptr_alignment(b), align_a = ptr_alignment(a), align_c = ptr_alignment(c);
    cublasLtMatmulHeuristicResult_t heur;
    int found = 0;
    memset(&heur, 0, sizeof heur);

    /* Stored shapes (column-major rows, cols, ld), before the transpose is applied. */
    uint64_t b_rows = (uint64_t)(trans_b ? K : N), b_cols = (uint64_t)(trans_b ? N : K);
    uint64_t a_rows = (uint64_t)(trans_a ? M : K), a_cols = (uint64_t)(trans_a ? K : M);

    if (!CUBLAS_CHECK(cx, cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F))) goto done;
    if (!CUBLAS_CHECK(cx, cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &opb,
                                                         sizeof opb)))
        goto done;
    if (!CUBLAS_CHECK(cx, cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &opa,
                                                         sizeof opa)))
        goto done;
    if (!CUBLAS_CHECK(cx, cublasLtMatrixLayoutCreate(&lb, CUDA_R_32F, b_rows, b_cols,
                                                     (int64_t)b_rows)))
        goto done;
    if (!CUBLAS_CHECK(cx, cublasLtMatrixLayoutCreate(&la, CUDA_R_32F, a_rows, a_cols,
                                                     (int64_t)a_rows)))
        goto done;
    if (!CUBLAS_CHECK(cx, cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, (uint64_t)N, (uint64_t)M,
                                                     (int64_t)N)))
        goto done;
    if (!CUBLAS_CHECK(cx, cublasLtMatmulPreferenceCreate(&pref))) goto done;
    {
        /* the workspace bound, then each operand's real alignment (operands are swapped:
         * cuBLASLt's A is our b) */
        const struct {
            cublasLtMatmulPreferenceAttributes_t attr;
            const void *value;
            size_t size;
        } prefs[] = {
            {CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof workspace},
            {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_b, sizeof align_b},
            {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_a, sizeof align_a},
            {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c, sizeof align_c},
            {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c, sizeof align_c},
        };
        for (size_t i = 0; i < sizeof prefs / sizeof prefs[0]; i++)
            if (!CUBLAS_CHECK(cx, cublasLtMatmulPreferenceSetAttribute(pref, prefs[i].attr,
                                                                       prefs[i].value,
                                                                       prefs[i].size)))
                goto done;
    }
    if (!CUBLAS_CHECK(cx, cublasLtMatmulAlgoGetHeuristic(cx->lt, op, lb, la, lc, lc, pref, 1,
                                                         &heur, &found)))
        goto done;
    if (found < 1) {
        RECORD(cx, MT_ERR_BACKEND,
               "matmul: cuBLASLt found no algorithm for M=%d N=%d K=%d trans_a=%d trans_b=%d", M,
               N, K, trans_a, trans_b);
        goto done;
    }
    /* D = C: the product is written in place over c. */
    CUBLAS_CHECK(cx, cublasLtMatmul(cx->lt, op, &alpha, b, lb, a, la, &beta, c, lc, c, lc,
                                    &heur.algo, cx->lt_workspace, MT_CUDA_WORKSPACE_BYTES,
                                    cx->stream));
done:
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (op) cublasLtMatmulDescDestroy(op);
}

/* out (N,C) += bias (C) */
__global__ void bias_forward_kernel(float *out, const float *bias, size_t total, int C) {
    GRID_STRIDE(i, total) out[i] += bias[i % (size_t)C];
}

static void cuda_bias_forward(mt_backend *be, float *out, const float *bias, int N, int C) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || N <= 0 || C <= 0) return;
    size_t total = (size_t)N * (size_t)C;
    bias_forward_kernel<<<grid_for(cx, total, 256), 256, 0, cx->stream>>>(out, bias, total, C);
    LAUNCH_CHECK(cx, "bias_forward_kernel");
}

/* Column sums of a (N,C), optionally times b (N,C) and a per-row factor r (N):
 * acc[c] += sum_n a[n,c] (* b[n,c] * r[n]). A block covers 32 columns with 8 rows of
 * threads; the 8 partial sums are added in a fixed order (deterministic). */
#define COLSUM_X 32
#define COLSUM_Y 8
__global__ void column_sum_kernel(float *acc, const float *a, const float *b, const float *r,
                                  int N, int C) {
    __shared__ float sh[COLSUM_Y][COLSUM_X + 1];
    int c = blockIdx.x * COLSUM_X + threadIdx.x;
    float s = 0.0f;
    if (c < C) {
        for (int n = threadIdx.y; n < N; n += COLSUM_Y) {
            size_t i = (size_t)n * (size_t)C + (size_t)c;
            s += b ? a[i] * b[i] * r[n] : a[i];
        }
    }
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float t = 0.0f;
        for (int y = 0; y < COLSUM_Y; y++) t += sh[y][threadIdx.x];
        acc[c] += t;
    }
}

static void launch_column_sum(cuda_ctx *cx, float *acc, const float *a, const float *b,
                              const float *r, int N, int C) {
    dim3 block(COLSUM_X, COLSUM_Y);
    dim3 grid((unsigned)((C + COLSUM_X - 1) / COLSUM_X));
    column_sum_kernel<<<grid, block, 0, cx->stream>>>(acc, a, b, r, N, C);
    LAUNCH_CHECK(cx, "column_sum_kernel");
}

static void cuda_bias_backward(mt_backend *be, float *dbias, const float *dout, int N, int C) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || N <= 0 || C <= 0) return;
    launch_column_sum(cx, dbias, dout, NULL, NULL, N, C);
}

/* ---- elementwise ------------------------------------------------------------------- */

/* out may alias a or b: each element is read before it is written, by the same thread. */
__global__ void add_kernel(float *out, const float *a, const float *b, size_t n) {
    GRID_STRIDE(i, n) out[i] = a[i] + b[i];
}

__global__ void axpy_kernel(float *y, const float *x, float alpha, size_t n) {
    GRID_STRIDE(i, n) y[i] += alpha * x[i];
}

static void cuda_add(mt_backend *be, float *out, const float *a, const float *b, size_t n) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || n == 0) return;
    add_kernel<<<grid_for(cx, n, 256), 256, 0, cx->stream>>>(out, a, b, n);
    LAUNCH_CHECK(cx, "add_kernel");
}

static void cuda_axpy(mt_backend *be, float *y, const float *x, float alpha, size_t n) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || n == 0) return;
    axpy_kernel<<<grid_for(cx, n, 256), 256, 0, cx->stream>>>(y, x, alpha, n);
    LAUNCH_CHECK(cx, "axpy_kernel");
}

/* ---- embedding ----------------------------------------------------------------------- */

__global__ void embedding_forward_kernel(float *out, const int32_t *tokens, const float *table,
                                         size_t total, int C) {
    GRID_STRIDE(i, total) {
        size_t n = i / (size_t)C, c = i % (size_t)C;
        out[i] = table[(size_t)tokens[n] * (size_t)C + c];
    }
}

static void cuda_embedding_forward(mt_backend *be, float *out, const int32_t *tokens,
                                   const float *table, int N, int C) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || N <= 0 || C <= 0) return;
    size_t total = (size_t)N * (size_t)C;
    embedding_forward_kernel<<<grid_for(cx, total, 256), 256, 0, cx->stream>>>(out, tokens,
                                                                               table, total, C);
    LAUNCH_CHECK(cx, "embedding_forward_kernel");
}

/* dtable (V,C) += scatter of dout (N,C) by tokens (N), without atomics: the thread for
 * column c of bucket s owns the table entries (v, c) with v % EMB_BUCKETS == s and
 * visits the tokens in ascending order, so each entry's sum has one fixed order (the
 * order of a serial CPU loop). Threads of a block share a bucket, so the token test is
 * uniform across the block; the tokens are staged through shared memory. */
#define EMB_BUCKETS 32
#define EMB_THREADS 128
#define EMB_CHUNK 1024
__global__ void embedding_backward_kernel(float *dtable, const float *dout, const int32_t *tokens,
                                          int N, int C) {
    __shared__ int32_t sh_tok[EMB_CHUNK];
    int c = blockIdx.x * EMB_THREADS + threadIdx.x;
    int bucket = blockIdx.y;
    for (int n0 = 0; n0 < N; n0 += EMB_CHUNK) {
        int len = N - n0 < EMB_CHUNK ? N - n0 : EMB_CHUNK;
        __syncthreads();
        for (int j = threadIdx.x; j < len; j += EMB_THREADS) sh_tok[j] = tokens[n0 + j];
        __syncthreads();
        if (c >= C) continue;
        for (int j = 0; j < len; j++) {
            int32_t v = sh_tok[j];
            if (v % EMB_BUCKETS != bucket) continue;
            dtable[(size_t)v * (size_t)C + (size_t)c] +=
                dout[(size_t)(n0 + j) * (size_t)C + (size_t)c];
        }
    }
}

static void cuda_embedding_backward(mt_backend *be, float *dtable, const float *dout,
                                    const int32_t *tokens, int N, int C) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || N <= 0 || C <= 0) return;
    dim3 grid((unsigned)((C + EMB_THREADS - 1) / EMB_THREADS), EMB_BUCKETS);
    embedding_backward_kernel<<<grid, EMB_THREADS, 0, cx->stream>>>(dtable, dout, tokens, N, C);
    LAUNCH_CHECK(cx, "embedding_backward_kernel");
}

/* ---- RMSNorm ------------------------------------------------------------------------- */

#define ROW_THREADS 256

/* One block per row: rstd = 1 / sqrt(mean(x^2) + eps); out = (x * rstd) * weight. */
__global__ void rmsnorm_forward_kernel(float *out, float *rstd, const float *x,
                                       const float *weight, int C, float eps) {
    __shared__ float sh[32];
    size_t row = blockIdx.x;
    const float *xr = x + row * (size_t)C;
    float *outr = out + row * (size_t)C;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) ss += xr[c] * xr[c];
    ss = block_sum(ss, sh);
    float r = 1.0f / sqrtf(ss / (float)C + eps);
    for (int c = threadIdx.x; c < C; c += blockDim.x) outr[c] = (xr[c] * r) * weight[c];
    if (threadIdx.x == 0) rstd[row] = r;
}

/* One block per row: with g = weight * dout,
 * dx += rstd * g - rstd^3 / C * x * sum(g * x). */
__global__ void rmsnorm_backward_kernel(float *dx, const float *dout, const float *x,
                                        const float *weight, const float *rstd, int C) {
    __shared__ float sh[32];
    size_t row = blockIdx.x;
    const float *xr = x + row * (size_t)C;
    const float *dr = dout + row * (size_t)C;
    float *dxr = dx + row * (size_t)C;
    float r = rstd[row];
    float dot = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) dot += weight[c] * dr[c] * xr[c];
    dot = block_sum(dot, sh);
    float k = r * r * r * dot / (float)C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) dxr[c] += r * weight[c] * dr[c] - k * xr[c];
}

static void cuda_rmsnorm_forward(mt_backend *be, float *out, float *rstd, const float *x,
                                 const float *weight, int N, int C, float eps) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || N <= 0 || C <= 0) return;
    rmsnorm_forward_kernel<<<(unsigned)N, ROW_THREADS, 0, cx->stream>>>(out, rstd, x, weight, C,
                                                                        eps);
    LAUNCH_CHECK(cx, "rmsnorm_forward_kernel");
}

static void cuda_rmsnorm_backward(mt_backend *be, float *dx, float *dweight, const float *dout,
                                  const float *x, const float *weight, const float *rstd, int N,
                                  int C) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || N <= 0 || C <= 0) return;
    rmsnorm_backward_kernel<<<(unsigned)N, ROW_THREADS, 0, cx->stream>>>(dx, dout, x, weight,
                                                                         rstd, C);
    if (!LAUNCH_CHECK(cx, "rmsnorm_backward_kernel")) return;
    /* dweight[c] += sum_n dout[n,c] * x[n,c] * rstd[n] */
    if (dweight) launch_column_sum(cx, dweight, dout, x, rstd, N, C);
}

/* ---- rotary embeddings ------------------------------------------------------------------ */

/* One thread per pair (i, i + D/2) of one head of one token. Forward rotates by +theta:
 *   x_i' = x_i cos - x_{i+h} sin,  x_{i+h}' = x_{i+h} cos + x_i sin;
 * backward applies the transpose (rotation by -theta). */
__global__ void rope_kernel(float *x, const float *cosv, const float *sinv,
                            const int32_t *positions, int H, int D, size_t total, float sign) {
    int half = D / 2;
    GRID_STRIDE(idx, total) {
        size_t i = idx % (size_t)half;
        size_t nh = idx / (size_t)half; /* n * H + head */
        size_t n = nh / (size_t)H;
        size_t table = (size_t)positions[n] * (size_t)half + i;
        float c = cosv[table], s = sign * sinv[table];
        float *xp = x + nh * (size_t)D;
        float x1 = xp[i], x2 = xp[i + (size_t)half];
        xp[i] = x1 * c - x2 * s;
        xp[i + (size_t)half] = x2 * c + x1 * s;
    }
}

static void launch_rope(mt_backend *be, float *x, const float *cosv, const float *sinv,
                        const int32_t *positions, int N, int H, int D, float sign) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || N <= 0 || H <= 0 || D <= 0) return;
    if (D % 2 != 0) {
        RECORD(cx, MT_ERR_INVALID_ARG, "rope: head dim D=%d is odd", D);
        return;
    }
    size_t total = (size_t)N * (size_t)H * (size_t)(D / 2);
    rope_kernel<<<grid_for(cx, total, 256), 256, 0, cx->stream>>>(x, cosv, sinv, positions, H, D,
                                                                  total, sign);
    LAUNCH_CHECK(cx, "rope_kernel");
}

static void cuda_rope_forward(mt_backend *be, float *x, const float *cosv, const float *sinv,
                              const int32_t *positions, int N, int H, int D) {
    launch_rope(be, x, cosv, sinv, positions, N, H, D, 1.0f);
}

static void cuda_rope_backward(mt_backend *be, float *dx, const float *cosv, const float *sinv,
                               const int32_t *positions, int N, int H, int D) {
    launch_rope(be, dx, cosv, sinv, positions, N, H, D, -1.0f);
}

/* ---- causal grouped-query attention ------------------------------------------------------
 *
 * Straightforward and exact, in the shape of flash-decoding: one block per query row
 * (b, h, t) in the forward pass, ATT_WARPS warps each walking a strided subset of the
 * visible keys with an online softmax (running max m, sum l, accumulator acc in
 * registers; lane j holds elements d = j*32 + lane of a D-vector), combined across the
 * warps in a fixed order at the end. No T x T matrix is stored. Backward, with
 * P = softmax(S), S = scale q k^T, dP = dout v^T, Dt = rowsum(dout * out):
 *   dS = P * (dP - Dt);  dq = scale dS k;  dk = scale dS^T q;  dv = P^T dout,
 * in three kernels: Dt per query row (into `work`), dq with one block per query row,
 * and dk, dv with one block per key row (b, kv head, s) walking every query t >= s of
 * every query head of its group. No atomics: every output element is written by one
 * block, and all sums run in a fixed order, so the results are deterministic.
 * Head dims up to 256 (ATT_MAX_NJ * 32). */
#define ATT_WARPS 4
#define ATT_THREADS (ATT_WARPS * 32)
#define ATT_MAX_D 256

template <int NJ>
__global__ void attention_forward_kernel(float *out, float *lse, const float *q, const float *k,
                                         const float *v, const int32_t *segments, int T, int H,
                                         int KVH, int D, float scale) {
    __shared__ float sh_m[ATT_WARPS], sh_l[ATT_WARPS];
    __shared__ float sh_acc[ATT_WARPS][NJ * 32];
    size_t row = blockIdx.x; /* ((b * H) + h) * T + t */
    int t = (int)(row % (size_t)T);
    int h = (int)((row / (size_t)T) % (size_t)H);
    size_t b = row / ((size_t)T * (size_t)H);
    int g = h / (H / KVH);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    const float *qr = q + ((b * T + t) * H + h) * (size_t)D;
    float qv[NJ], acc[NJ];
#pragma unroll
    for (int j = 0; j < NJ; j++) {
        int d = j * 32 + lane;
        qv[j] = d < D ? qr[d] : 0.0f;
        acc[j] = 0.0f;
    }
    int32_t seg_t = segments ? segments[b * T + t] : 0;
    float m = -INFINITY, l = 0.0f;
    for (int s = warp; s <= t; s += ATT_WARPS) {
        if (segments && segments[b * T + s] != seg_t && segments[b * T + s] != MT_SHARED_SEGMENT)
            continue; /* uniform in the warp */
        const float *kr = k + ((b * T + s) * KVH + g) * (size_t)D;
        const float *vr = v + ((b * T + s) * KVH + g) * (size_t)D;
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < NJ; j++) {
            int d = j * 32 + lane;
            if (d < D) dot += qv[j] * kr[d];
        }
        float sc = warp_sum(dot) * scale;
        float m_new = fmaxf(m, sc);
        float corr = expf(m - m_new); /* 0 on the first key (m = -inf) */
        float p = expf(sc - m_new);
        l = l * corr + p;
#pragma unroll
        for (int j = 0; j < NJ; j++) {
            int d = j * 32 + lane;
            acc[j] = acc[j] * corr + (d < D ? p * vr[d] : 0.0f);
        }
        m = m_new;
    }
    if (lane == 0) {
        sh_m[warp] = m;
        sh_l[warp] = l;
    }
#pragma unroll
    for (int j = 0; j < NJ; j++) sh_acc[warp][j * 32 + lane] = acc[j];
    __syncthreads();

    /* Key t itself is always visible, so some warp has a finite max. */
    float M = -INFINITY;
    for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, sh_m[w]);
    float L = 0.0f;
    for (int w = 0; w < ATT_WARPS; w++) L += sh_l[w] * expf(sh_m[w] - M);
    float *outr = out + ((b * T + t) * H + h) * (size_t)D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++) o += sh_acc[w][d] * expf(sh_m[w] - M);
        outr[d] = o / L;
    }
    if (threadIdx.x == 0) lse[row] = M + logf(L);
}

/* Dt (B,H,T) = rowsum(dout * out): one warp per query row. */
__global__ void attention_dt_kernel(float *Dt, const float *dout, const float *out, int T, int H,
                                    int D, size_t rows) {
    size_t row = (size_t)blockIdx.x * ATT_WARPS + (threadIdx.x >> 5); /* ((b*H)+h)*T+t */
    int lane = threadIdx.x & 31;
    if (row >= rows) return; /* uniform in the warp */
    size_t t = row % (size_t)T, h = (row / (size_t)T) % (size_t)H, b = row / ((size_t)T * H);
    size_t base = ((b * T + t) * H + h) * (size_t)D;
    float s = 0.0f;
    for (int d = lane; d < D; d += 32) s += dout[base + d] * out[base + d];
    s = warp_sum(s);
    if (lane == 0) Dt[row] = s;
}

/* dq (B,T,H,D) =: one block per query row (b, h, t), warps over the visible keys. */
template <int NJ>
__global__ void attention_dq_kernel(float *dq, const float *dout, const float *lse,
                                    const float *Dt, const float *q, const float *k,
                                    const float *v, const int32_t *segments, int T, int H,
                                    int KVH, int D, float scale) {
    __shared__ float sh_acc[ATT_WARPS][NJ * 32];
    size_t row = blockIdx.x;
    int t = (int)(row % (size_t)T);
    int h = (int)((row / (size_t)T) % (size_t)H);
    size_t b = row / ((size_t)T * (size_t)H);
    int g = h / (H / KVH);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    size_t qbase = ((b * T + t) * H + h) * (size_t)D;
    float qv[NJ], dov[NJ], acc[NJ];
#pragma unroll
    for (int j = 0; j < NJ; j++) {
        int d = j * 32 + lane;
        qv[j] = d < D ? q[qbase + d] : 0.0f;
        dov[j] = d < D ? dout[qbase + d] : 0.0f;
        acc[j] = 0.0f;
    }
    float lse_t = lse[row], dt = Dt[row];
    int32_t seg_t = segments ? segments[b * T + t] : 0;
    for (int s = warp; s <= t; s += ATT_WARPS) {
        if (segments && segments[b * T + s] != seg_t && segments[b * T + s] != MT_SHARED_SEGMENT)
            continue;
        const float *kr = k + ((b * T + s) * KVH + g) * (size_t)D;
        const float *vr = v + ((b * T + s) * KVH + g) * (size_t)D;
        float kv[NJ];
        float dot = 0.0f, dp = 0.0f;
#pragma unroll
        for (int j = 0; j < NJ; j++) {
            int d = j * 32 + lane;
            kv[j] = d < D ? kr[d] : 0.0f;
            dot += qv[j] * kv[j];
            dp += d < D ? dov[j] * vr[d] : 0.0f;
        }
        dot = warp_sum(dot);
        dp = warp_sum(dp);
        float p = expf(dot * scale - lse_t);
        float ds = p * (dp - dt);
#pragma unroll
        for (int j = 0; j < NJ; j++) acc[j] += ds * kv[j];
    }
#pragma unroll
    for (int j = 0; j < NJ; j++) sh_acc[warp][j * 32 + lane] = acc[j];
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float s = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++) s += sh_acc[w][d];
        dq[qbase + d] = scale * s;
    }
}

/* dk, dv (B,T,KVH,D) =: one block per key row (b, g, s); warps over the pairs
 * (query head of group g, query t >= s) that see key s. */
template <int NJ>
__global__ void attention_dkdv_kernel(float *dk, float *dv, const float *dout, const float *lse,
                                      const float *Dt, const float *q, const float *k,
                                      const float *v, const int32_t *segments, int T, int H,
                                      int KVH, int D, float scale) {
    __shared__ float sh_dk[ATT_WARPS][NJ * 32];
    __shared__ float sh_dv[ATT_WARPS][NJ * 32];
    size_t row = blockIdx.x; /* ((b * KVH) + g) * T + s */
    int s = (int)(row % (size_t)T);
    int g = (int)((row / (size_t)T) % (size_t)KVH);
    size_t b = row / ((size_t)T * (size_t)KVH);
    int G = H / KVH;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    size_t kbase = ((b * T + s) * KVH + g) * (size_t)D;
    float kv[NJ], vv[NJ], dk_acc[NJ], dv_acc[NJ];
#pragma unroll
    for (int j = 0; j < NJ; j++) {
        int d = j * 32 + lane;
        kv[j] = d < D ? k[kbase + d] : 0.0f;
        vv[j] = d < D ? v[kbase + d] : 0.0f;
        dk_acc[j] = 0.0f;
        dv_acc[j] = 0.0f;
    }
    int32_t seg_s = segments ? segments[b * T + s] : 0;
    int n = T - s;                        /* queries t = s .. T-1 */
    long long pairs = (long long)G * n;   /* times the G query heads of group g */
    for (long long i = warp; i < pairs; i += ATT_WARPS) {
        int hh = (int)(i / n);
        int t = s + (int)(i % n);
        if (segments && segments[b * T + t] != seg_s && seg_s != MT_SHARED_SEGMENT)
            continue; /* uniform in the warp */
        int h = g * G + hh;
        size_t qbase = ((b * T + t) * H + h) * (size_t)D;
        size_t lrow = (b * H + h) * (size_t)T + t;
        float qv[NJ], dov[NJ];
        float dot = 0.0f, dp = 0.0f;
#pragma unroll
        for (int j = 0; j < NJ; j++) {
            int d = j * 32 + lane;
            qv[j] = d < D ? q[qbase + d] : 0.0f;
            dov[j] = d < D ? dout[qbase + d] : 0.0f;
            dot += qv[j] * kv[j];
            dp += dov[j] * vv[j];
        }
        dot = warp_sum(dot);
        dp = warp_sum(dp);
        float p = expf(dot * scale - lse[lrow]);
        float ds = p * (dp - Dt[lrow]);
#pragma unroll
        for (int j = 0; j < NJ; j++) {
            dk_acc[j] += ds * qv[j];
            dv_acc[j] += p * dov[j];
        }
    }
#pragma unroll
    for (int j = 0; j < NJ; j++) {
        sh_dk[warp][j * 32 + lane] = dk_acc[j];
        sh_dv[warp][j * 32 + lane] = dv_acc[j];
    }
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float sk = 0.0f, sv = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++) {
            sk += sh_dk[w][d];
            sv += sh_dv[w][d];
        }
        dk[kbase + d] = scale * sk;
        dv[kbase + d] = sv;
    }
}

/* Checks the shapes shared by forward and backward; 0 (error recorded) when unusable. */
static int attention_shapes_ok(cuda_ctx *cx, const char *what, int B, int T, int H, int KVH,
                               int D) {
    if (B < 0 || T < 0 || H <= 0 || KVH <= 0 || D <= 0 || H % KVH != 0) {
        RECORD(cx, MT_ERR_INVALID_ARG,
               "%s: bad shape B=%d T=%d H=%d KVH=%d D=%d (H must be a multiple of KVH)", what,
               B, T, H, KVH, D);
        return 0;
    }
    if ((size_t)B * (size_t)H * (size_t)T > (size_t)INT32_MAX) {
        RECORD(cx, MT_ERR_UNSUPPORTED, "%s: B*H*T = %zu rows exceed one launch's grid", what,
               (size_t)B * (size_t)H * (size_t)T);
        return 0;
    }
    if (D > ATT_MAX_D) {
        RECORD(cx, MT_ERR_UNSUPPORTED, "%s: head dim D=%d; the CUDA backend supports D <= %d",
               what, D, ATT_MAX_D);
        return 0;
    }
    return 1;
}

/* Register-array width for head dim D: 32 * NJ >= D. */
static int att_nj(int D) { return D <= 32 ? 1 : D <= 64 ? 2 : D <= 128 ? 4 : 8; }

static void cuda_attention_forward(mt_backend *be, float *out, float *lse, const float *q,
                                   const float *k, const float *v, const int32_t *segments, int B,
                                   int T, int H, int KVH, int D, float scale, void *work) {
    cuda_ctx *cx = ctx_of(be);
    (void)work; /* the forward pass needs none */
    if (cx->status != MT_OK) return;
    if (!attention_shapes_ok(cx, "attention_forward", B, T, H, KVH, D)) return;
    if (B == 0 || T == 0) return;
    unsigned rows = (unsigned)((size_t)B * H * T);
#define ATT_FWD(NJ)                                                                                \
    attention_forward_kernel<NJ><<<rows, ATT_THREADS, 0, cx->stream>>>(out, lse, q, k, v,          \
                                                                      segments, T, H, KVH, D,     \
                                                                      scale)
    switch (att_nj(D)) {
    case 1: ATT_FWD(1); break;
    case 2: ATT_FWD(2); break;
    case 4: ATT_FWD(4); break;
    default: ATT_FWD(8); break;
    }
#undef ATT_FWD
    LAUNCH_CHECK(cx, "attention_forward_kernel");
}

static size_t cuda_attention_work_bytes(mt_backend *be, int B, int T, int H, int KVH, int D) {
    (void)be;
    (void)KVH;
    (void)D;
    if (B <= 0 || T <= 0 || H <= 0) return 0;
    return (size_t)B * (size_t)H * (size_t)T * sizeof(float); /* Dt (B,H,T) */
}

static void cuda_attention_backward(mt_backend *be, float *dq, float *dk, float *dv,
                                    const float *dout, const float *out, const float *lse,
                                    const float *q, const float *k, const float *v,
                                    const int32_t *segments, int B, int T, int H, int KVH, int D,
                                    float scale, void *work) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK) return;
    if (!attention_shapes_ok(cx, "attention_backward", B, T, H, KVH, D)) return;
    if (B == 0 || T == 0) return;
    if (!work) {
        RECORD(cx, MT_ERR_INVALID_ARG, "attention_backward: work is NULL (needs %zu bytes)",
               cuda_attention_work_bytes(be, B, T, H, KVH, D));
        return;
    }
    float *Dt = (float *)work;
    size_t qrows = (size_t)B * H * T, krows = (size_t)B * KVH * T;
    attention_dt_kernel<<<(unsigned)((qrows + ATT_WARPS - 1) / ATT_WARPS), ATT_THREADS, 0,
                          cx->stream>>>(Dt, dout, out, T, H, D, qrows);
    if (!LAUNCH_CHECK(cx, "attention_dt_kernel")) return;
#define ATT_BWD(NJ)                                                                                \
    do {                                                                                           \
        attention_dq_kernel<NJ><<<(unsigned)qrows, ATT_THREADS, 0, cx->stream>>>(                  \
            dq, dout, lse, Dt, q, k, v, segments, T, H, KVH, D, scale);                            \
        if (!LAUNCH_CHECK(cx, "attention_dq_kernel")) return;                                      \
        attention_dkdv_kernel<NJ><<<(unsigned)krows, ATT_THREADS, 0, cx->stream>>>(                \
            dk, dv, dout, lse, Dt, q, k, v, segments, T, H, KVH, D, scale);                        \
        LAUNCH_CHECK(cx, "attention_dkdv_kernel");                                                 \
    } while (0)
    switch (att_nj(D)) {
    case 1: ATT_BWD(1); break;
    case 2: ATT_BWD(2); break;
    case 4: ATT_BWD(4); break;
    default: ATT_BWD(8); break;
    }
#undef ATT_BWD
}

/* ---- SwiGLU -------------------------------------------------------------------------------- */

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

__global__ void swiglu_forward_kernel(float *out, const float *gate, const float *up, size_t n) {
    GRID_STRIDE(i, n) {
        float g = gate[i];
        out[i] = g * sigmoidf(g) * up[i];
    }
}

/* d silu(g)/dg = sig(g) (1 + g (1 - sig(g))). */
__global__ void swiglu_backward_kernel(float *dgate, float *dup, const float *dout,
                                       const float *gate, const float *up, size_t n) {
    GRID_STRIDE(i, n) {
        float g = gate[i], u = up[i], d = dout[i];
        float sg = sigmoidf(g);
        float silu = g * sg;
        dgate[i] = d * u * sg * (1.0f + g * (1.0f - sg));
        dup[i] = d * silu;
    }
}

static void cuda_swiglu_forward(mt_backend *be, float *out, const float *gate, const float *up,
                                size_t n) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || n == 0) return;
    swiglu_forward_kernel<<<grid_for(cx, n, 256), 256, 0, cx->stream>>>(out, gate, up, n);
    LAUNCH_CHECK(cx, "swiglu_forward_kernel");
}

static void cuda_swiglu_backward(mt_backend *be, float *dgate, float *dup, const float *dout,
                                 const float *gate, const float *up, size_t n) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || n == 0) return;
    swiglu_backward_kernel<<<grid_for(cx, n, 256), 256, 0, cx->stream>>>(dgate, dup, dout, gate,
                                                                         up, n);
    LAUNCH_CHECK(cx, "swiglu_backward_kernel");
}

/* ---- cross-entropy ------------------------------------------------------------------------- */

#define CE_THREADS 512

/* One block per row: loss = log(sum exp(l - max)) + max - l[target]. */
__global__ void cross_entropy_forward_kernel(float *losses, const float *logits,
                                             const int32_t *targets, int V, int ignore_index) {
    __shared__ float sh[32];
    size_t row = blockIdx.x;
    int32_t target = targets[row];
    if (target == ignore_index || target < 0) { /* uniform in the block */
        if (threadIdx.x == 0) losses[row] = 0.0f;
        return;
    }
    const float *lr = logits + row * (size_t)V;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, lr[i]);
    mx = block_max(mx, sh);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) sum += expf(lr[i] - mx);
    sum = block_sum(sum, sh);
    if (threadIdx.x == 0) losses[row] = logf(sum) + mx - lr[target];
}

/* dlogits = dloss * (softmax - onehot). dlogits may alias logits: both reductions finish
 * (block barriers) before any write, and each element is then read and written by the
 * same thread, so the pointers are deliberately not __restrict__. */
__global__ void cross_entropy_backward_kernel(float *dlogits, const float *logits,
                                              const int32_t *targets, int V, int ignore_index,
                                              float dloss) {
    __shared__ float sh[32];
    size_t row = blockIdx.x;
    int32_t target = targets[row];
    float *dr = dlogits + row * (size_t)V;
    if (target == ignore_index || target < 0) {
        for (int i = threadIdx.x; i < V; i += blockDim.x) dr[i] = 0.0f;
        return;
    }
    const float *lr = logits + row * (size_t)V;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, lr[i]);
    mx = block_max(mx, sh);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) sum += expf(lr[i] - mx);
    sum = block_sum(sum, sh);
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float p = expf(lr[i] - mx) / sum;
        dr[i] = dloss * (p - (i == target ? 1.0f : 0.0f));
    }
}

static void cuda_cross_entropy_forward(mt_backend *be, float *losses, const float *logits,
                                       const int32_t *targets, int N, int V, int ignore_index) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || N <= 0 || V <= 0) return;
    cross_entropy_forward_kernel<<<(unsigned)N, CE_THREADS, 0, cx->stream>>>(losses, logits,
                                                                             targets, V,
                                                                             ignore_index);
    LAUNCH_CHECK(cx, "cross_entropy_forward_kernel");
}

static void cuda_cross_entropy_backward(mt_backend *be, float *dlogits, const float *logits,
                                        const int32_t *targets, int N, int V, int ignore_index,
                                        float dloss) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || N <= 0 || V <= 0) return;
    cross_entropy_backward_kernel<<<(unsigned)N, CE_THREADS, 0, cx->stream>>>(
        dlogits, logits, targets, V, ignore_index, dloss);
    LAUNCH_CHECK(cx, "cross_entropy_backward_kernel");
}

/* ---- reductions ---------------------------------------------------------------------------- */

/* Two passes in a fixed order (deterministic): MT_CUDA_SUMSQ_BLOCKS partials in double,
 * then one block adds them. */
__global__ void sum_squares_partial_kernel(double *partials, const float *x, size_t n) {
    __shared__ double sh[32];
    double acc = 0.0;
    GRID_STRIDE(i, n) {
        double v = (double)x[i];
        acc += v * v;
    }
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

__global__ void sum_squares_final_kernel(double *total, const double *partials, int count) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) *total = acc;
}

static double cuda_sum_squares(mt_backend *be, const float *x, size_t n) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK) return NAN;
    if (n == 0) return 0.0;
    size_t want = (n + 255) / 256;
    int blocks = want < MT_CUDA_SUMSQ_BLOCKS ? (int)want : MT_CUDA_SUMSQ_BLOCKS;
    double *total = cx->sumsq + MT_CUDA_SUMSQ_BLOCKS;
    double result = NAN;
    sum_squares_partial_kernel<<<(unsigned)blocks, 256, 0, cx->stream>>>(cx->sumsq, x, n);
    if (!LAUNCH_CHECK(cx, "sum_squares_partial_kernel")) return NAN;
    sum_squares_final_kernel<<<1, 256, 0, cx->stream>>>(total, cx->sumsq, blocks);
    if (!LAUNCH_CHECK(cx, "sum_squares_final_kernel")) return NAN;
    if (!CUDA_CHECK(cx, cudaMemcpyAsync(&result, total, sizeof result, cudaMemcpyDeviceToHost,
                                        cx->stream)))
        return NAN;
    if (!CUDA_CHECK(cx, cudaStreamSynchronize(cx->stream))) return NAN;
    return result;
}

/* ---- plugin ABI 2 ----------------------------------------------------------------------
 *
 * The operations optimizers, losses and adapters compute with. The elementwise ones are
 * written with explicitly rounded intrinsics (__fmul_rn, __fadd_rn, __fsub_rn, __fdiv_rn,
 * __fsqrt_rn): nvcc fuses a * b + c into one fma by default, which rounds once where the
 * CPU backend (ISO C, no contraction) rounds twice, and these intrinsics are never fused.
 * So each element is the CPU backend's float, in the order backend.h states, and an
 * optimizer step gives the same parameters on either backend. */

#define EW_THREADS 256

/* Launches an elementwise kernel over n items on the context's stream and checks it. */
#define LAUNCH_ELEMENTWISE(cx, n, kernel, ...)                                                     \
    do {                                                                                           \
        kernel<<<grid_for((cx), (n), EW_THREADS), EW_THREADS, 0, (cx)->stream>>>(__VA_ARGS__);     \
        LAUNCH_CHECK((cx), #kernel);                                                               \
    } while (0)

__global__ void fill_kernel(float *x, float value, size_t n) { GRID_STRIDE(i, n) x[i] = value; }

/* beta == 0 does not read y (it may hold NaN): the branch is uniform across the grid. */
__global__ void axpby_kernel(float *y, float alpha, const float *x, float beta, size_t n) {
    if (beta == 0.0f) {
        GRID_STRIDE(i, n) y[i] = __fmul_rn(alpha, x[i]);
    } else {
        GRID_STRIDE(i, n) y[i] = __fadd_rn(__fmul_rn(alpha, x[i]), __fmul_rn(beta, y[i]));
    }
}

/* torch's lerp: y + w (x - y) when |w| < 0.5 (small), else x - (x - y)(1 - w); the host
 * decides `small` and computes one_minus_w = 1 - w, as the CPU loop does. */
__global__ void lerp_kernel(float *y, const float *x, float w, float one_minus_w, int small,
                            size_t n) {
    GRID_STRIDE(i, n) {
        float xi = x[i], yi = y[i];
        y[i] = small ? __fadd_rn(yi, __fmul_rn(w, __fsub_rn(xi, yi)))
                     : __fsub_rn(xi, __fmul_rn(__fsub_rn(xi, yi), one_minus_w));
    }
}

/* y = (y * beta) + (alpha * a) * b; a and b may be the same array. */
__global__ void addcmul_kernel(float *y, float beta, float alpha, const float *a, const float *b,
                               size_t n) {
    GRID_STRIDE(i, n) y[i] = __fadd_rn(__fmul_rn(y[i], beta), __fmul_rn(__fmul_rn(alpha, a[i]), b[i]));
}

/* y = y + (alpha * a) / (sqrt(b) / b_div + eps) */
__global__ void addcdiv_sqrt_kernel(float *y, float alpha, const float *a, const float *b,
                                    float b_div, float eps, size_t n) {
    GRID_STRIDE(i, n) {
        float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(b[i]), b_div), eps);
        y[i] = __fadd_rn(y[i], __fdiv_rn(__fmul_rn(alpha, a[i]), denom));
    }
}

/* torch.maximum: NaN in x or y propagates (x > NaN is false, so a NaN in y stays). */
__global__ void maximum_kernel(float *y, const float *x, size_t n) {
    GRID_STRIDE(i, n) {
        float xi = x[i], yi = y[i];
        y[i] = (xi > yi || xi != xi) ? xi : yi;
    }
}

/* y += alpha * sign(x), sign(0) = 0, sign(NaN) = NaN */
__global__ void add_sign_kernel(float *y, float alpha, const float *x, size_t n) {
    GRID_STRIDE(i, n) {
        float c = x[i];
        float sign = c != c ? c : (float)((c > 0.0f) - (c < 0.0f));
        y[i] = __fadd_rn(y[i], __fmul_rn(alpha, sign));
    }
}

__global__ void mul_kernel(float *y, const float *x, size_t n) {
    GRID_STRIDE(i, n) y[i] = __fmul_rn(y[i], x[i]);
}

/* mt_mix64 (moontune/plugin.h) for device code: the header's inline function is host
 * code only. The two must stay the same function; the conformance test compares
 * dropout's output with the CPU backend's bit for bit, so a drift fails it. */
__device__ __forceinline__ uint64_t dev_mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* mt_random_uniform(seed, counter) (backend.h) with seed_mixed = mt_mix64(seed), mixed
 * once on the host: 24 bits, exactly representable, so no rounding can differ. */
__device__ __forceinline__ float dev_random_uniform(uint64_t seed_mixed, uint64_t counter) {
    uint64_t x = dev_mix64(seed_mixed ^ counter);
    return (float)(x >> 40) * (1.0f / 16777216.0f);
}

__global__ void dropout_kernel(float *y, const float *x, float p, float keep_scale,
                               uint64_t seed_mixed, uint64_t counter0, int accumulate, size_t n) {
    GRID_STRIDE(i, n) {
        int keep = dev_random_uniform(seed_mixed, counter0 + i) >= p;
        if (accumulate) {
            if (keep) y[i] = __fadd_rn(y[i], __fmul_rn(x[i], keep_scale));
        } else {
            y[i] = keep ? __fmul_rn(x[i], keep_scale) : 0.0f;
        }
    }
}

/* One block per row of logits (n,V): max, then Σ exp(x - max) and Σ x in double. The
 * order of the sums differs from the CPU's serial loop, so lse and the mean agree
 * with it to double rounding, stored as float. */
__global__ void softmax_stats_kernel(float *lse, float *target_logit, float *mean_logit,
                                     const float *logits, const int32_t *targets, int V) {
    __shared__ float sh_f[32];
    __shared__ double sh_d[32];
    size_t row = blockIdx.x;
    const float *x = logits + row * (size_t)V;
    const int32_t t = targets[row];
    if (t < 0) { /* a skipped row: the whole block leaves before any barrier */
        if (threadIdx.x == 0) {
            lse[row] = 0.0f;
            if (target_logit) target_logit[row] = 0.0f;
            if (mean_logit) mean_logit[row] = 0.0f;
        }
        return;
    }
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < V; j += blockDim.x) mx = fmaxf(mx, x[j]);
    mx = block_max(mx, sh_f);
    double sum = 0.0, sum_x = 0.0;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        sum += exp((double)x[j] - (double)mx);
        sum_x += (double)x[j];
    }
    sum = block_sum(sum, sh_d);
    sum_x = block_sum(sum_x, sh_d);
    if (threadIdx.x == 0) {
        lse[row] = (float)((double)mx + log(sum));
        if (target_logit) target_logit[row] = t < V ? x[t] : 0.0f;
        if (mean_logit) mean_logit[row] = (float)(sum_x / (double)V);
    }
}

/* One block per row of x (n,V), in place: x_j = c0 exp(x_j - lse) + c1 (+ c2 at the
 * target), in double with explicit rounding (no fused multiply-add, as on the CPU). */
__global__ void softmax_backward_kernel(float *x, const float *lse, const int32_t *targets,
                                        const float *coefs, int V) {
    size_t row = blockIdx.x;
    float *xr = x + row * (size_t)V;
    double l = lse[row], c0 = coefs[3 * row], c1 = coefs[3 * row + 1], c2 = coefs[3 * row + 2];
    int32_t t = targets[row];
    if (t < 0) { /* a skipped row: no gradient */
        for (int j = threadIdx.x; j < V; j += blockDim.x) xr[j] = 0.0f;
        return;
    }
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        double v = __dadd_rn(__dmul_rn(c0, exp((double)xr[j] - l)), c1);
        if (j == t) v = __dadd_rn(v, c2); /* a target out of [0, V) matches no j */
        xr[j] = (float)v;
    }
}

/* out (n) = elements [first, first + n): code of element e in codes[e/2] (high nibble for
 * even e), scale (table[16 + absmax_q[b]] * absmax2[b / block2]) + offset for block
 * b = e / block, out = table[code] * scale, rounded as the CPU and the QLoRA plugin do. */
__global__ void dequantize_4bit_kernel(float *out, const uint8_t *codes, const uint8_t *absmax_q,
                                       const float *absmax2, const float *table, float offset,
                                       int64_t first, size_t n, int block, int block2) {
    GRID_STRIDE(i, n) {
        int64_t e = first + (int64_t)i;
        uint8_t byte = codes[e >> 1];
        int code = (e & 1) ? byte & 15 : byte >> 4;
        int64_t b = e / block;
        float s = __fadd_rn(__fmul_rn(table[16 + absmax_q[b]], absmax2[b / block2]), offset);
        out[i] = __fmul_rn(table[code], s);
    }
}

static void cuda_copy(mt_backend *be, void *dst, const void *src, size_t bytes) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || bytes == 0) return;
    CUDA_CHECK(cx, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cx->stream));
}

static void cuda_fill(mt_backend *be, float *x, float value, size_t n) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || n == 0) return;
    LAUNCH_ELEMENTWISE(cx, n, fill_kernel, x, value, n);
}

static void cuda_axpby(mt_backend *be, float *y, float alpha, const float *x, float beta,
                       size_t n) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || n == 0) return;
    LAUNCH_ELEMENTWISE(cx, n, axpby_kernel, y, alpha, x, beta, n);
}

static void cuda_lerp(mt_backend *be, float *y, const float *x, float w, size_t n) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || n == 0) return;
    LAUNCH_ELEMENTWISE(cx, n, lerp_kernel, y, x, w, 1.0f - w, fabsf(w) < 0.5f, n);
}

static void cuda_addcmul(mt_backend *be, float *y, float beta, float alpha, const float *a,
                         const float *b, size_t n) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || n == 0) return;
    LAUNCH_ELEMENTWISE(cx, n, addcmul_kernel, y, beta, alpha, a, b, n);
}

static void cuda_addcdiv_sqrt(mt_backend *be, float *y, float alpha, const float *a,
                              const float *b, float b_div, float eps, size_t n) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || n == 0) return;
    LAUNCH_ELEMENTWISE(cx, n, addcdiv_sqrt_kernel, y, alpha, a, b, b_div, eps, n);
}

static void cuda_maximum(mt_backend *be, float *y, const float *x, size_t n) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || n == 0) return;
    LAUNCH_ELEMENTWISE(cx, n, maximum_kernel, y, x, n);
}

static void cuda_add_sign(mt_backend *be, float *y, float alpha, const float *x, size_t n) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || n == 0) return;
    LAUNCH_ELEMENTWISE(cx, n, add_sign_kernel, y, alpha, x, n);
}

static void cuda_mul(mt_backend *be, float *y, const float *x, size_t n) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || n == 0) return;
    LAUNCH_ELEMENTWISE(cx, n, mul_kernel, y, x, n);
}

static void cuda_dropout(mt_backend *be, float *y, const float *x, float p, uint64_t seed,
                         uint64_t counter0, int accumulate, size_t n) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || n == 0) return;
    /* keep_scale as the CPU computes it, in float on the host */
    const float keep_scale = 1.0f / (1.0f - p);
    LAUNCH_ELEMENTWISE(cx, n, dropout_kernel, y, x, p, keep_scale, mt_mix64(seed), counter0,
                       accumulate, n);
}

static void cuda_softmax_stats(mt_backend *be, float *lse, float *target_logit,
                               float *mean_logit, const float *logits, const int32_t *targets,
                               int n, int V) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || n <= 0) return;
    if (V <= 0) {
        RECORD(cx, MT_ERR_INVALID_ARG, "softmax_stats: vocabulary size V=%d", V);
        return;
    }
    softmax_stats_kernel<<<(unsigned)n, ROW_THREADS, 0, cx->stream>>>(lse, target_logit,
                                                                      mean_logit, logits,
                                                                      targets, V);
    LAUNCH_CHECK(cx, "softmax_stats_kernel");
}

static void cuda_softmax_backward(mt_backend *be, float *x, const float *lse,
                                  const int32_t *targets, const float *coefs, int n, int V) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || n <= 0 || V <= 0) return;
    softmax_backward_kernel<<<(unsigned)n, ROW_THREADS, 0, cx->stream>>>(x, lse, targets, coefs,
                                                                         V);
    LAUNCH_CHECK(cx, "softmax_backward_kernel");
}

static void cuda_dequantize_4bit(mt_backend *be, float *out, const uint8_t *codes,
                                 const uint8_t *absmax_q, const float *absmax2,
                                 const float *table, float offset, int64_t first, int64_t n,
                                 int block, int block2) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK || n <= 0) return;
    if (block <= 0 || block2 <= 0 || first < 0) {
        RECORD(cx, MT_ERR_INVALID_ARG, "dequantize_4bit: block=%d block2=%d first=%lld", block,
               block2, (long long)first);
        return;
    }
    LAUNCH_ELEMENTWISE(cx, (size_t)n, dequantize_4bit_kernel, out, codes, absmax_q, absmax2,
                       table, offset, first, (size_t)n, block, block2);
}

/* ---- data parallel: NCCL --------------------------------------------------------------
 *
 * One communicator per process over the job's ranks, made from the id rank 0 draws and
 * the core sends over MPI. The gradient buckets are summed in place on the device by one
 * grouped call on the backend's stream. */
#ifdef MT_HAVE_NCCL
static int nccl_check(cuda_ctx *cx, ncclResult_t r, const char *call, const char *file, int line) {
    if (r == ncclSuccess) return 1;
    cuda_record(cx, MT_ERR_BACKEND, file, line, "%s failed: %s", call, ncclGetErrorString(r));
    return 0;
}
#define NCCL_CHECK(cx, call) nccl_check((cx), (call), #call, __FILE__, __LINE__)

static mt_status cuda_comm_id(mt_backend *be, void *id, size_t bytes) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK) return cx->status;
    ncclUniqueId unique;
    if (bytes < sizeof unique) {
        RECORD(cx, MT_ERR_INVALID_ARG, "comm_id: %zu bytes is less than NCCL's id (%zu)", bytes,
               sizeof unique);
        return cx->status;
    }
    if (!NCCL_CHECK(cx, ncclGetUniqueId(&unique))) return cx->status;
    memcpy(id, &unique, sizeof unique);
    return MT_OK;
}

static mt_status cuda_comm_init(mt_backend *be, const void *id, size_t bytes, int rank, int size) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK) return cx->status;
    ncclUniqueId unique;
    if (bytes < sizeof unique || cx->comm) {
        RECORD(cx, MT_ERR_INVALID_ARG, "comm_init: %s", cx->comm ? "called twice" : "id too short");
        return cx->status;
    }
    memcpy(&unique, id, sizeof unique);
    if (!CUDA_CHECK(cx, cudaSetDevice(cx->device))) return cx->status;
    if (!NCCL_CHECK(cx, ncclCommInitRank(&cx->comm, size, unique, rank))) return cx->status;
    return MT_OK;
}

static mt_status cuda_comm_sum_f32(mt_backend *be, float *const *bufs, const size_t *counts,
                                   size_t n) {
    cuda_ctx *cx = ctx_of(be);
    if (cx->status != MT_OK) return cx->status;
    if (!cx->comm) {
        RECORD(cx, MT_ERR_INVALID_ARG, "comm_sum_f32 before comm_init");
        return cx->status;
    }
    if (!NCCL_CHECK(cx, ncclGroupStart())) return cx->status;
    int ok = 1;
    for (size_t i = 0; ok && i < n; i++)
        if (counts[i] > 0)
            ok = NCCL_CHECK(cx, ncclAllReduce(bufs[i], bufs[i], counts[i], ncclFloat, ncclSum,
                                              cx->comm, cx->stream));
    /* the group is closed whatever happened inside it */
    if (!NCCL_CHECK(cx, ncclGroupEnd()) || !ok) return cx->status;
    if (!CUDA_CHECK(cx, cudaStreamSynchronize(cx->stream))) return cx->status;
    return MT_OK;
}
#endif

/* ---- init and shutdown ------------------------------------------------------------------- */

static mt_backend_ops make_ops(void) {
    mt_backend_ops o;
    memset(&o, 0, sizeof o);
    o.alloc = cuda_alloc;
    o.free = cuda_free;
    o.upload = cuda_upload;
    o.download = cuda_download;
    o.zero = cuda_zero;
    o.sync = cuda_sync;
    o.matmul = cuda_matmul;
    o.bias_forward = cuda_bias_forward;
    o.bias_backward = cuda_bias_backward;
    o.add = cuda_add;
    o.axpy = cuda_axpy;
    o.embedding_forward = cuda_embedding_forward;
    o.embedding_backward = cuda_embedding_backward;
    o.rmsnorm_forward = cuda_rmsnorm_forward;
    o.rmsnorm_backward = cuda_rmsnorm_backward;
    o.rope_forward = cuda_rope_forward;
    o.rope_backward = cuda_rope_backward;
    o.attention_forward = cuda_attention_forward;
    o.attention_backward = cuda_attention_backward;
    o.attention_work_bytes = cuda_attention_work_bytes;
    o.swiglu_forward = cuda_swiglu_forward;
    o.swiglu_backward = cuda_swiglu_backward;
    o.cross_entropy_forward = cuda_cross_entropy_forward;
    o.cross_entropy_backward = cuda_cross_entropy_backward;
    o.sum_squares = cuda_sum_squares;
    o.copy = cuda_copy;
    o.fill = cuda_fill;
    o.axpby = cuda_axpby;
    o.lerp = cuda_lerp;
    o.addcmul = cuda_addcmul;
    o.addcdiv_sqrt = cuda_addcdiv_sqrt;
    o.maximum = cuda_maximum;
    o.add_sign = cuda_add_sign;
    o.mul = cuda_mul;
    o.dropout = cuda_dropout;
    o.softmax_stats = cuda_softmax_stats;
    o.softmax_backward = cuda_softmax_backward;
    o.dequantize_4bit = cuda_dequantize_4bit;
#ifdef MT_HAVE_NCCL
    o.comm_id = cuda_comm_id;
    o.comm_init = cuda_comm_init;
    o.comm_sum_f32 = cuda_comm_sum_f32;
#endif
    return o;
}

/* Assigned by name, so a reordering of backend.h cannot misplace a slot. */
static const mt_backend_ops cuda_ops = make_ops();

static void ctx_destroy(cuda_ctx *cx) {
    if (!cx) return;
    if (cx->stream) (void)cudaStreamSynchronize(cx->stream);
#ifdef MT_HAVE_NCCL
    if (cx->comm) (void)ncclCommDestroy(cx->comm);
#endif
    if (cx->sumsq) (void)cudaFree(cx->sumsq);
    if (cx->lt_workspace) (void)cudaFree(cx->lt_workspace);
    if (cx->lt) (void)cublasLtDestroy(cx->lt);
    if (cx->stream) (void)cudaStreamDestroy(cx->stream);
    free(cx);
}

extern "C" mt_status mt_backend_cuda_init(mt_backend *be, int device_index, mt_error *err) {
    if (!be) return mt_error_set(err, MT_ERR_INVALID_ARG, "mt_backend_cuda_init: backend is NULL");
    memset(be, 0, sizeof *be);
    if (device_index < 0) device_index = 0;

    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        const char *hint = "";
        if (e == cudaErrorInsufficientDriver)
            hint = "; no NVIDIA driver is loaded, or it is older than this build's CUDA runtime";
        else if (e == cudaErrorNoDevice)
            hint = "; no NVIDIA GPU is visible (check CUDA_VISIBLE_DEVICES)";
        return mt_error_set(err, MT_ERR_BACKEND,
                            "cuda backend: no CUDA device: cudaGetDeviceCount failed: %s (%s)%s",
                            cudaGetErrorString(e), cudaGetErrorName(e), hint);
    }
    if (count == 0)
        return mt_error_set(err, MT_ERR_BACKEND, "cuda backend: no CUDA device found");
    device_index %= count; /* a rank's local index over the devices it can see */

    cuda_ctx *cx = (cuda_ctx *)mt_calloc(1, sizeof *cx, "the CUDA backend context", err);
    if (!cx) return MT_ERR_NOMEM;
    cx->device = device_index;
    cx->status = MT_OK;
    mt_status st = MT_ERR_BACKEND;
    int major = 0, minor = 0;
    if (!CUDA_CHECK(cx, cudaSetDevice(device_index))) goto fail;
    if (!CUDA_CHECK(cx, cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                               device_index)))
        goto fail;
    if (!CUDA_CHECK(cx, cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor,
                                               device_index)))
        goto fail;
    if (major < 8) {
        RECORD(cx, MT_ERR_UNSUPPORTED,
               "device %d has compute capability %d.%d; this build needs 8.0 or newer "
               "(it is compiled for sm_80 and sm_90)",
               device_index, major, minor);
        goto fail;
    }
    if (!CUDA_CHECK(cx, cudaDeviceGetAttribute(&cx->sm_count, cudaDevAttrMultiProcessorCount,
                                               device_index)))
        goto fail;
    if (!CUDA_CHECK(cx, cudaStreamCreateWithFlags(&cx->stream, cudaStreamNonBlocking))) goto fail;
    if (!CUBLAS_CHECK(cx, cublasLtCreate(&cx->lt))) goto fail;
    if (!CUDA_CHECK(cx, cudaMalloc(&cx->lt_workspace, MT_CUDA_WORKSPACE_BYTES))) goto fail;
    if (!CUDA_CHECK(cx, cudaMalloc((void **)&cx->sumsq,
                                   (MT_CUDA_SUMSQ_BLOCKS + 1) * sizeof(double))))
        goto fail;
    if (!CUDA_CHECK(cx, cudaStreamSynchronize(cx->stream))) goto fail;

    be->ops = &cuda_ops;
    be->device = MT_DEVICE_CUDA;
    be->name = "cuda";
    be->num_threads = 0; /* not meaningful on a GPU */
    be->ctx = cx;
    return MT_OK;

fail:
    st = cx->status != MT_OK ? cx->status : MT_ERR_BACKEND;
    mt_error_set(err, st, "%s", cx->msg);
    ctx_destroy(cx);
    return st;
}

extern "C" void mt_backend_cuda_shutdown(mt_backend *be) {
    if (!be || !be->ctx) return;
    ctx_destroy(ctx_of(be));
    memset(be, 0, sizeof *be);
}

extern "C" const char *mt_backend_cuda_error_message(const mt_backend *be) {
    if (!be || !be->ctx) return "";
    return ((const cuda_ctx *)be->ctx)->msg;
}
