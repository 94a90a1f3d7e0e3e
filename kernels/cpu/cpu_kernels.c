/* cpu_kernels.c — the CPU backend's dense, elementwise and normalisation kernels.
 *
 * Plain loops over row-major fp32 arrays that the compiler vectorises, parallel
 * over rows with OpenMP. Reductions over rows (parameter gradients) are split
 * over blocks of columns instead, each summing its rows in order, so that the
 * result is the same whatever the number of threads and no two threads write
 * the same element. Attention lives in cpu_attention.c; the operations of plugin ABI 2
 * (optimizer updates, dropout, softmax rows, 4-bit dequantization) close this file. */
#include "cpu_kernels.h"

#include <cblas.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define EXP_AVX2 1
#include <immintrin.h>
#else
#define EXP_AVX2 0
#endif

#include "backend.h" /* mt_random_uniform: dropout draws the plugin ABI's stream */

/* Columns per task in the column-blocked reductions (dbias, dweight, dtable). */
#define COL_BLOCK 128
/* Elements below which a loop runs on the calling thread: waking the team
 * costs more than it saves. */
#define PAR_MIN 32768

/* ---- matrix products ----------------------------------------------------- */

/* A linear layer's forward on at most MATMUL_ROWS_MAX rows (decoding) skips
 * cblas_sgemm, which repacks the whole weight on every call (cpu_matmul_rows.c).
 * With fewer than MATMUL_ROWS_MIN inputs or outputs (LoRA's rank-r products) the
 * dot products are too short, or the columns too few to share between threads, and
 * sgemm stays faster. Only where the compiler targets AVX-512: its 32 vector registers
 * hold the kernel's 16 accumulators; built for AVX2 or SSE2 they spill, and the kernel
 * ran at 0.2-0.4x sgemm. Measured in docs/speed.md. */
#define MATMUL_ROWS_MAX 32
#define MATMUL_ROWS_MIN 64
#ifdef __AVX512F__
#define MATMUL_ROWS_PATH 1
#else
#define MATMUL_ROWS_PATH 0
#endif

/* Products with a side of at most MATMUL_SMALL_SIDE (LoRA's rank-r products, r <= 32)
 * and MATMUL_SMALL_WORK multiply-adds or more go to cpu_matmul_small, which packs
 * nothing (measured in docs/speed.md). Smaller ones (the adapter's products for the 32
 * rows of a decoding step, 0.3-0.8 M multiply-adds) stay with sgemm, which splits them
 * between threads where cpu_matmul_small's 64-row tasks would leave one thread to do
 * it all: generation ran 8% slower with them. Only where the compiler targets AVX-512:
 * the tile of 8 x 32 accumulators is 16 of AVX-512's 32 vector registers and would
 * spill from AVX2's 16. */
#define MATMUL_SMALL_SIDE 32
#define MATMUL_SMALL_WORK ((int64_t)1 << 21)
#ifdef __AVX512F__
#define MATMUL_SMALL_PATH 1
#else
#define MATMUL_SMALL_PATH 0
#endif

/* A product of many rows and few columns (LoRA's u = x·Aᵀ and g = dy·B, N = r) that
 * reaches sgemm runs as its transpose, cᵀ (N,M) = op(b)ᵀ·op(a)ᵀ, into a scratch that is
 * then transposed into c. In a LoRA step on a Zen 2 (AVX2, OpenBLAS's Zen kernels)
 * sgemm ran these at 43-48 GFLOP/s as asked and at 71-83 transposed; the copy back is
 * N·M floats (docs/speed.md). cpu_matmul_narrow_use turns it off for tests. */
#define MATMUL_NARROW_COLS 32
#define MATMUL_NARROW_ROWS 256
static _Atomic int matmul_narrow_off;

void cpu_matmul_narrow_use(int on) { atomic_store_explicit(&matmul_narrow_off, !on, memory_order_relaxed); }

/* cblas_sgemm into a dense row-major c (M,N), except that with beta = 0 c is cleared
 * here with memset and sgemm runs with beta = 1. OpenBLAS clears c for beta = 0 with
 * its own beta kernel before the same kernel adds the product into c, so the bits are
 * the same; but that pass ran at a third of memset's speed on a Zen 2 (OpenBLAS 0.3.21,
 * Zen kernels): over 1024 rows, the products of q, k, v, o, gate and up ran
 * 1.13-1.26x faster with memset, down's 1.02-1.08x, and none ran slower
 * (docs/speed.md, "Clearing c before sgemm"). Products of fewer than SGEMM_CLEAR_MIN
 * outputs keep sgemm's beta: there the pass is too short to matter. */
#define SGEMM_CLEAR_MIN 8192
static void sgemm_rowmajor(int trans_a, int trans_b, int M, int N, int K, float alpha,
                           const float *a, int lda, const float *b, int ldb, float beta,
                           float *c) {
    if (beta == 0.0f && (size_t)M * N >= SGEMM_CLEAR_MIN) {
        memset(c, 0, (size_t)M * N * sizeof *c); /* c is not read: it may hold NaN */
        beta = 1.0f;
    }
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, M, N, K, alpha, a, lda, b, ldb, beta, c, N);
}

/* 0 when done; -1 (nothing written) when the scratch could not be had. */
static int matmul_narrow(float *c, const float *a, const float *b, int M, int N, int K, int lda,
                         int ldb, int trans_a, int trans_b, float alpha, float beta) {
    float *ct = malloc((size_t)M * N * sizeof *ct);
    if (!ct) return -1;
    /* ct = op(b)ᵀ · op(a)ᵀ: op(b)ᵀ is b as stored when trans_b, else b transposed */
    sgemm_rowmajor(!trans_b, !trans_a, N, M, K, alpha, b, ldb, a, lda, 0.0f, ct);
#pragma omp parallel for if ((size_t)M * N >= PAR_MIN) schedule(static)
    for (int i = 0; i < M; i++) {
        float *row = c + (size_t)i * N;
        if (beta == 0.0f) /* c is not read: it may hold NaN */
            for (int j = 0; j < N; j++) row[j] = ct[(size_t)j * M + i];
        else
            for (int j = 0; j < N; j++) row[j] = ct[(size_t)j * M + i] + beta * row[j];
    }
    free(ct);
    return 0;
}

static int small_side(int M, int N, int K, int trans_b) {
    const int shortest = M < N ? (M < K ? M : K) : (N < K ? N : K);
    /* a transposed b is copied: only when one of its own sides is short */
    if (trans_b && N > MATMUL_SMALL_SIDE && K > MATMUL_SMALL_SIDE) return 0;
    return shortest <= MATMUL_SMALL_SIDE && (int64_t)M * N * K >= MATMUL_SMALL_WORK;
}

void cpu_matmul(float *c, const float *a, const float *b, int M, int N, int K, int trans_a,
                int trans_b, float alpha, float beta) {
    // c is (M,N); a is (M,K) or (K,M) when trans_a; b is (K,N) or (N,K) when trans_b
    if (M <= 0 || N <= 0) return;
    if (K <= 0) { // an empty product: c = beta * c (BLAS may reject K == 0)
        for (size_t i = 0; i < (size_t)M * N; i++) c[i] = beta == 0.0f ? 0.0f : beta * c[i];
        return;
    }
    if (M == 1) { // one row (decoding a token): a matrix-vector product reads b once
        // a holds K contiguous values either way; c (N) = op(b)^T-shaped product with a
        if (trans_b) // b is (N,K): c = b · a
            cblas_sgemv(CblasRowMajor, CblasNoTrans, N, K, alpha, b, K, a, 1, beta, c, 1);
        else // b is (K,N): c = b^T · a
            cblas_sgemv(CblasRowMajor, CblasTrans, K, N, alpha, b, N, a, 1, beta, c, 1);
        return;
    }
    if (MATMUL_ROWS_PATH && !trans_a && trans_b && M <= MATMUL_ROWS_MAX &&
        K >= MATMUL_ROWS_MIN && N >= MATMUL_ROWS_MIN) {
        cpu_matmul_rows_nt(c, a, b, M, N, K, alpha, beta);
        return;
    }
    if (MATMUL_SMALL_PATH && small_side(M, N, K, trans_b) &&
        !cpu_matmul_small(c, a, b, M, N, K, trans_a, trans_b, alpha, beta))
        return;
    int lda = trans_a ? M : K;
    int ldb = trans_b ? K : N;
    if (N <= MATMUL_NARROW_COLS && M >= MATMUL_NARROW_ROWS &&
        !atomic_load_explicit(&matmul_narrow_off, memory_order_relaxed) &&
        !matmul_narrow(c, a, b, M, N, K, lda, ldb, trans_a, trans_b, alpha, beta))
        return;
    sgemm_rowmajor(trans_a, trans_b, M, N, K, alpha, a, lda, b, ldb, beta, c);
}

void cpu_bias_forward(float *out, const float *bias, int N, int C) {
    // out is (N,C), bias is (C)
#pragma omp parallel for if ((size_t)N * C >= PAR_MIN) schedule(static)
    for (int n = 0; n < N; n++) {
        float *row = out + (size_t)n * C;
        for (int c = 0; c < C; c++) row[c] += bias[c];
    }
}

void cpu_bias_backward(float *dbias, const float *dout, int N, int C) {
    // dbias is (C), dout is (N,C)
    int nblocks = (C + COL_BLOCK - 1) / COL_BLOCK;
#pragma omp parallel for if ((size_t)N * C >= PAR_MIN) schedule(static)
    for (int cb = 0; cb < nblocks; cb++) {
        int c0 = cb * COL_BLOCK;
        int nc = C - c0 < COL_BLOCK ? C - c0 : COL_BLOCK;
        double acc[COL_BLOCK];
        for (int c = 0; c < nc; c++) acc[c] = 0.0;
        for (int n = 0; n < N; n++) {
            const float *row = dout + (size_t)n * C + c0;
            for (int c = 0; c < nc; c++) acc[c] += row[c];
        }
        for (int c = 0; c < nc; c++) dbias[c0 + c] += (float)acc[c];
    }
}

/* ---- elementwise --------------------------------------------------------- */

void cpu_add(float *out, const float *a, const float *b, size_t n) {
    // out, a, b are (n); out may alias a or b
#pragma omp parallel for simd if (parallel : n >= PAR_MIN) schedule(static)
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

void cpu_axpy(float *y, const float *x, float alpha, size_t n) {
    // y, x are (n)
#pragma omp parallel for simd if (parallel : n >= PAR_MIN) schedule(static)
    for (size_t i = 0; i < n; i++) y[i] += alpha * x[i];
}

/* ---- embedding ----------------------------------------------------------- */

void cpu_embedding_forward(float *out, const int32_t *tokens, const float *table, int N, int C) {
    // out is (N,C), tokens is (N), table is (V,C)
#pragma omp parallel for if ((size_t)N * C >= PAR_MIN) schedule(static)
    for (int n = 0; n < N; n++)
        memcpy(out + (size_t)n * C, table + (size_t)tokens[n] * C, (size_t)C * sizeof(float));
}

void cpu_embedding_backward(float *dtable, const float *dout, const int32_t *tokens, int N, int C) {
    // dtable is (V,C), dout is (N,C), tokens is (N)
    // Threads own blocks of columns and add the rows in token order: repeated tokens
    // accumulate without races and in the same order every time.
    int nblocks = (C + COL_BLOCK - 1) / COL_BLOCK;
#pragma omp parallel for if ((size_t)N * C >= PAR_MIN) schedule(static)
    for (int cb = 0; cb < nblocks; cb++) {
        int c0 = cb * COL_BLOCK;
        int nc = C - c0 < COL_BLOCK ? C - c0 : COL_BLOCK;
        for (int n = 0; n < N; n++) {
            float *trow = dtable + (size_t)tokens[n] * C + c0;
            const float *drow = dout + (size_t)n * C + c0;
            for (int c = 0; c < nc; c++) trow[c] += drow[c];
        }
    }
}

/* ---- RMSNorm (Hugging Face LlamaRMSNorm in fp32) ------------------------- */

void cpu_rmsnorm_forward(float *out, float *rstd, const float *x, const float *weight, int N, int C,
                         float eps) {
    // out is (N,C), rstd is (N), x is (N,C), weight is (C)
#pragma omp parallel for if ((size_t)N * C >= PAR_MIN) schedule(static)
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * C;
        float *o = out + (size_t)n * C;
        double ss = 0.0;
#pragma omp simd reduction(+ : ss)
        for (int c = 0; c < C; c++) ss += (double)xr[c] * xr[c];
        float var = (float)(ss / C);
        float r = 1.0f / sqrtf(var + eps);
        for (int c = 0; c < C; c++) o[c] = weight[c] * (xr[c] * r);
        rstd[n] = r;
    }
}

void cpu_rmsnorm_backward(float *dx, float *dweight, const float *dout, const float *x,
                          const float *weight, const float *rstd, int N, int C) {
    // dx is (N,C) +=, dweight is (C) += or NULL, dout, x are (N,C), weight is (C), rstd is (N)
    // y_c = w_c x_c r with r = (mean(x^2) + eps)^-1/2, so
    // dx_j = r w_j dy_j - r^3 / C * x_j * sum_c dy_c w_c x_c.
#pragma omp parallel for if ((size_t)N * C >= PAR_MIN) schedule(static)
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * C;
        const float *dy = dout + (size_t)n * C;
        float *dxr = dx + (size_t)n * C;
        float r = rstd[n];
        double dot = 0.0;
#pragma omp simd reduction(+ : dot)
        for (int c = 0; c < C; c++) dot += (double)dy[c] * weight[c] * xr[c];
        float k = (float)((double)r * r * r * dot / C);
        for (int c = 0; c < C; c++) dxr[c] += r * weight[c] * dy[c] - k * xr[c];
    }
    if (!dweight) return;
    // dweight_c += sum_n dy_nc x_nc r_n, by blocks of columns
    int nblocks = (C + COL_BLOCK - 1) / COL_BLOCK;
#pragma omp parallel for if ((size_t)N * C >= PAR_MIN) schedule(static)
    for (int cb = 0; cb < nblocks; cb++) {
        int c0 = cb * COL_BLOCK;
        int nc = C - c0 < COL_BLOCK ? C - c0 : COL_BLOCK;
        double acc[COL_BLOCK];
        for (int c = 0; c < nc; c++) acc[c] = 0.0;
        for (int n = 0; n < N; n++) {
            const float *xr = x + (size_t)n * C + c0;
            const float *dy = dout + (size_t)n * C + c0;
            float r = rstd[n];
            for (int c = 0; c < nc; c++) acc[c] += (double)(dy[c] * (xr[c] * r));
        }
        for (int c = 0; c < nc; c++) dweight[c0 + c] += (float)acc[c];
    }
}

/* ---- rotary embeddings (rotate_half: pairs i and i + D/2) ---------------- */

/* Rotates every head vector of x (N,H,D) by the angles at positions; sign = +1
 * rotates forward, -1 by the opposite angle (the transpose). */
static void rope_rotate(float *x, const float *cos, const float *sin, const int32_t *positions,
                        int N, int H, int D, float sign) {
    int half = D / 2;
#pragma omp parallel for if ((size_t)N * H * D >= PAR_MIN) schedule(static)
    for (int n = 0; n < N; n++) {
        const float *cr = cos + (size_t)positions[n] * half;
        const float *sr = sin + (size_t)positions[n] * half;
        for (int h = 0; h < H; h++) {
            float *x1 = x + ((size_t)n * H + h) * D;
            float *x2 = x1 + half;
            for (int i = 0; i < half; i++) {
                float a = x1[i], b = x2[i], c = cr[i], s = sign * sr[i];
                x1[i] = a * c - b * s;
                x2[i] = b * c + a * s;
            }
        }
    }
}

void cpu_rope_forward(float *x, const float *cos, const float *sin, const int32_t *positions, int N,
                      int H, int D) {
    // x is (N,H,D) in place, cos and sin are (P,D/2), positions is (N)
    rope_rotate(x, cos, sin, positions, N, H, D, 1.0f);
}

void cpu_rope_backward(float *dx, const float *cos, const float *sin, const int32_t *positions,
                       int N, int H, int D) {
    // dx is (N,H,D) in place: [c -s; s c]^T = [c s; -s c], the rotation by -angle
    rope_rotate(dx, cos, sin, positions, N, H, D, -1.0f);
}

/* ---- exp ----------------------------------------------------------------- */

/* exp of anything below this is taken as 0: exp(-87) ~ 1.6e-38, about the smallest
 * normal float. */
#define EXP_MIN -87.0f

/* exp(x) for x in [EXP_MIN, 1] as 2^n * p(r), n = round(x / ln 2), |r| <= ln 2 / 2,
 * with Cephes' expf polynomial. Branch-free, so loops over it vectorise (glibc's
 * expf does not without -ffast-math). n is rounded by adding 1.5 * 2^23, whose
 * float then holds n in its low bits: only integer arithmetic on bits, so a NaN
 * input gives a NaN out and no undefined conversion to int. */
static inline float exp_core(float x) {
    const float magic = 12582912.0f; // 1.5 * 2^23, bits 0x4b400000
    float t = x * 1.44269504088896341f + magic;
    float fn = t - magic;
    float r = x - fn * 0.693359375f; // ln 2 in two parts (Cody and Waite)
    r = r - fn * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = CPU_MADD(p, r, 1.3981999507e-3f);
    p = CPU_MADD(p, r, 8.3334519073e-3f);
    p = CPU_MADD(p, r, 4.1665795894e-2f);
    p = CPU_MADD(p, r, 1.6666665459e-1f);
    p = CPU_MADD(p, r, 5.0000001201e-1f);
    p = CPU_MADD(p, r * r, r + 1.0f);
    uint32_t tb;
    memcpy(&tb, &t, sizeof tb);
    uint32_t bits = (tb - 0x4b400000u + 127u) << 23; // 2^n: a normal float for n in [-126, 2]
    float s;
    memcpy(&s, &bits, sizeof s);
    return p * s;
}

static float exp_shifted_scalar(float *y, const float *x, float shift, int n) {
    // y, x are (n); y may alias x. The clamp has a loop of its own: fused into the
    // next one, it keeps the compiler from vectorising that.
    for (int j = 0; j < n; j++) {
        float a = x[j] - shift;
        y[j] = a < EXP_MIN ? EXP_MIN : a;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < n; j++) {
        float a = y[j];
        float e = exp_core(a) * (float)(a > EXP_MIN);
        y[j] = e;
        sum += e;
    }
    return sum;
}

/* The same operations on 8 lanes (AVX2 and FMA): every element gets the scalar loop's
 * bits where CPU_MADD is fmaf; the sum is 8 running sums, then the tail's. gcc keeps
 * the scalar loop scalar (the mask's multiply), where exp took a tenth of a LoRA step
 * on a Zen 2 (softmax, SwiGLU, cross-entropy). Its clamp is max(EXP_MIN, a), whose NaN case
 * returns the NaN, as the scalar a < EXP_MIN ? EXP_MIN : a does. */
#if EXP_AVX2
__attribute__((target("avx2,fma"))) static float exp_shifted_avx2(float *y, const float *x,
                                                                  float shift, int n) {
    const __m256 vshift = _mm256_set1_ps(shift), vmin = _mm256_set1_ps(EXP_MIN);
    const __m256 magic = _mm256_set1_ps(12582912.0f), log2e = _mm256_set1_ps(1.44269504088896341f);
    const __m256 ln2_hi = _mm256_set1_ps(0.693359375f), ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256i bias = _mm256_set1_epi32((int)(0x4b400000u - 127u));
    __m256 sum8 = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 a = _mm256_max_ps(vmin, _mm256_sub_ps(_mm256_loadu_ps(x + j), vshift));
        __m256 t = _mm256_add_ps(_mm256_mul_ps(a, log2e), magic);
        __m256 fn = _mm256_sub_ps(t, magic);
        __m256 r = _mm256_sub_ps(a, _mm256_mul_ps(fn, ln2_hi));
        r = _mm256_sub_ps(r, _mm256_mul_ps(fn, ln2_lo));
        __m256 p = _mm256_set1_ps(1.9875691500e-4f);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
        p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, one));
        __m256i bits = _mm256_slli_epi32(_mm256_sub_epi32(_mm256_castps_si256(t), bias), 23);
        __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
        e = _mm256_mul_ps(e, _mm256_and_ps(_mm256_cmp_ps(a, vmin, _CMP_GT_OQ), one));
        _mm256_storeu_ps(y + j, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    float lanes[8], sum = 0.0f;
    _mm256_storeu_ps(lanes, sum8);
    for (int l = 0; l < 8; l++) sum += lanes[l];
    return sum + exp_shifted_scalar(y + j, x + j, shift, n - j);
}
#endif

/* -1: not chosen yet; 0 scalar; 1 AVX2. Atomic: the first calls may come from several
 * OpenMP threads at once, each storing the same choice. */
static _Atomic int exp_kernel = -1;

int cpu_exp_use_avx2(int use) {
    int had = atomic_load_explicit(&exp_kernel, memory_order_relaxed) == 1;
#if EXP_AVX2
    use = use && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    use = 0;
#endif
    atomic_store_explicit(&exp_kernel, use, memory_order_relaxed);
    return had;
}

float cpu_exp_shifted(float *y, const float *x, float shift, int n) {
    int kernel = atomic_load_explicit(&exp_kernel, memory_order_relaxed);
    if (kernel < 0) {
        cpu_exp_use_avx2(1);
        kernel = atomic_load_explicit(&exp_kernel, memory_order_relaxed);
    }
#if EXP_AVX2
    if (kernel) return exp_shifted_avx2(y, x, shift, n);
#endif
    return exp_shifted_scalar(y, x, shift, n);
}

float cpu_max(const float *x, int n) {
    // x is (n). 32 running maxima, elementwise: both gcc and clang vectorise this,
    // where clang will not reorder a float max reduction (and gcc scalarises 16 lanes).
    float lane[32];
    for (int l = 0; l < 32; l++) lane[l] = -INFINITY;
    int n32 = n - n % 32;
    for (int j = 0; j < n32; j += 32)
        for (int l = 0; l < 32; l++) lane[l] = x[j + l] > lane[l] ? x[j + l] : lane[l];
    float m = -INFINITY;
    for (int j = n32; j < n; j++) m = x[j] > m ? x[j] : m;
    for (int l = 0; l < 32; l++) m = lane[l] > m ? lane[l] : m;
    return m;
}

/* Elements per chunk where a kernel needs exp of values it may not overwrite. */
#define EXP_CHUNK 512

/* ---- SwiGLU -------------------------------------------------------------- */

/* sig (n) = sigmoid(g (n)) = 1 / (1 + exp(-g)), through exp(-|g|) <= 1 so that
 * nothing overflows; n <= EXP_CHUNK. */
static void sigmoid_chunk(float *sig, const float *g, int n) {
    for (int j = 0; j < n; j++) sig[j] = -fabsf(g[j]);
    cpu_exp_shifted(sig, sig, 0.0f, n);
    for (int j = 0; j < n; j++) sig[j] = (g[j] >= 0.0f ? 1.0f : sig[j]) / (1.0f + sig[j]);
}

void cpu_swiglu_forward(float *out, const float *gate, const float *up, size_t n) {
    // out, gate, up are (n)
    size_t nchunks = (n + EXP_CHUNK - 1) / EXP_CHUNK;
#pragma omp parallel for if (n >= PAR_MIN) schedule(static)
    for (size_t ch = 0; ch < nchunks; ch++) {
        size_t i0 = ch * EXP_CHUNK;
        int len = (int)(n - i0 < EXP_CHUNK ? n - i0 : EXP_CHUNK);
        const float *g = gate + i0, *u = up + i0;
        float *o = out + i0;
        float sig[EXP_CHUNK];
        sigmoid_chunk(sig, g, len);
        for (int j = 0; j < len; j++) o[j] = g[j] * sig[j] * u[j];
    }
}

void cpu_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                         const float *up, size_t n) {
    // dgate, dup are (n) =, dout, gate, up are (n)
    // silu(g) = g sig(g), silu'(g) = sig(g) (1 + g (1 - sig(g)))
    size_t nchunks = (n + EXP_CHUNK - 1) / EXP_CHUNK;
#pragma omp parallel for if (n >= PAR_MIN) schedule(static)
    for (size_t ch = 0; ch < nchunks; ch++) {
        size_t i0 = ch * EXP_CHUNK;
        int len = (int)(n - i0 < EXP_CHUNK ? n - i0 : EXP_CHUNK);
        const float *g = gate + i0, *u = up + i0, *dy = dout + i0;
        float *dg = dgate + i0, *du = dup + i0;
        float sig[EXP_CHUNK];
        sigmoid_chunk(sig, g, len);
        for (int j = 0; j < len; j++) {
            float sg = sig[j];
            dg[j] = dy[j] * u[j] * sg * (1.0f + g[j] * (1.0f - sg));
            du[j] = dy[j] * g[j] * sg;
        }
    }
}

/* ---- softmax cross-entropy ----------------------------------------------- */

static int ce_ignored(int32_t target, int ignore_index) {
    return target < 0 || target == ignore_index;
}

/* sum of exp(x[j] - shift) over x (n): each chunk of EXP_CHUNK through cpu_exp_shifted's
 * lanes, the chunks' float sums added in double, in order. */
static double exp_sum(const float *x, int n, float shift) {
    float e[EXP_CHUNK];
    double sum = 0.0;
    for (int j0 = 0; j0 < n; j0 += EXP_CHUNK)
        sum += cpu_exp_shifted(e, x + j0, shift, n - j0 < EXP_CHUNK ? n - j0 : EXP_CHUNK);
    return sum;
}

void cpu_cross_entropy_forward(float *losses, const float *logits, const int32_t *targets, int N,
                               int V, int ignore_index) {
    // losses is (N), logits is (N,V), targets is (N)
#pragma omp parallel for if ((size_t)N * V >= PAR_MIN) schedule(static)
    for (int n = 0; n < N; n++) {
        if (ce_ignored(targets[n], ignore_index)) {
            losses[n] = 0.0f;
            continue;
        }
        const float *x = logits + (size_t)n * V;
        float m = cpu_max(x, V);
        losses[n] = (float)(log(exp_sum(x, V, m)) + (double)m - (double)x[targets[n]]);
    }
}

void cpu_cross_entropy_backward(float *dlogits, const float *logits, const int32_t *targets, int N,
                                int V, int ignore_index, float dloss) {
    // dlogits is (N,V) =, may alias logits (N,V); targets is (N)
    // Every element is read before the same element is written, so in place is safe.
#pragma omp parallel for if ((size_t)N * V >= PAR_MIN) schedule(static)
    for (int n = 0; n < N; n++) {
        float *d = dlogits + (size_t)n * V;
        if (ce_ignored(targets[n], ignore_index)) {
            memset(d, 0, (size_t)V * sizeof(float));
            continue;
        }
        const float *x = logits + (size_t)n * V;
        float m = cpu_max(x, V);
        double sum = 0.0;
        for (int j0 = 0; j0 < V; j0 += EXP_CHUNK)
            sum += cpu_exp_shifted(d + j0, x + j0, m, V - j0 < EXP_CHUNK ? V - j0 : EXP_CHUNK);
        float f = (float)(dloss / sum);
        for (int j = 0; j < V; j++) d[j] *= f;
        d[targets[n]] -= dloss;
    }
}

/* ---- reductions ---------------------------------------------------------- */

/* Fixed chunks, each summed in order and the partial sums added in order:
 * the same bits whatever the number of threads. */
#define SUMSQ_CHUNKS 256
#define SUMSQ_MIN_CHUNK 4096

double cpu_sum_squares(const float *x, size_t n) {
    // x is (n)
    size_t chunk = (n + SUMSQ_CHUNKS - 1) / SUMSQ_CHUNKS;
    if (chunk < SUMSQ_MIN_CHUNK) chunk = SUMSQ_MIN_CHUNK;
    int nchunks = (int)((n + chunk - 1) / chunk);
    double partial[SUMSQ_CHUNKS];
#pragma omp parallel for if (n >= PAR_MIN) schedule(static)
    for (int i = 0; i < nchunks; i++) {
        size_t lo = (size_t)i * chunk, hi = lo + chunk < n ? lo + chunk : n;
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (size_t j = lo; j < hi; j++) s += (double)x[j] * x[j];
        partial[i] = s;
    }
    double total = 0.0;
    for (int i = 0; i < nchunks; i++) total += partial[i];
    return total;
}

/* ---- plugin ABI 2 -----------------------------------------------------------
 * Elementwise updates for optimizers and adapters, and row statistics for losses.
 * Each expression is written in the order backend.h states, one rounding per operation:
 * the build is ISO C (-std=c11), where the compiler does not fuse a * b + c, so these
 * give the floats of the loops the plugins ran before ABI 2. */

void cpu_fill(float *x, float value, size_t n) {
    // x is (n)
#pragma omp parallel for simd if (parallel : n >= PAR_MIN) schedule(static)
    for (size_t i = 0; i < n; i++) x[i] = value;
}

void cpu_axpby(float *y, float alpha, const float *x, float beta, size_t n) {
    // y, x are (n). beta == 0 must not read y: y may hold NaN or garbage (a fresh buffer).
    if (beta == 0.0f) {
#pragma omp parallel for simd if (parallel : n >= PAR_MIN) schedule(static)
        for (size_t i = 0; i < n; i++) y[i] = alpha * x[i];
        return;
    }
#pragma omp parallel for simd if (parallel : n >= PAR_MIN) schedule(static)
    for (size_t i = 0; i < n; i++) y[i] = alpha * x[i] + beta * y[i];
}

void cpu_lerp(float *y, const float *x, float w, size_t n) {
    // y, x are (n). torch's lerp(start=y, end=x, weight=w): the form chosen by |w| keeps
    // the result exact at both ends (w = 0 gives y, w = 1 gives x).
    if (fabsf(w) < 0.5f) {
#pragma omp parallel for simd if (parallel : n >= PAR_MIN) schedule(static)
        for (size_t i = 0; i < n; i++) y[i] = y[i] + w * (x[i] - y[i]);
    } else {
        const float omw = 1.0f - w;
#pragma omp parallel for simd if (parallel : n >= PAR_MIN) schedule(static)
        for (size_t i = 0; i < n; i++) y[i] = x[i] - (x[i] - y[i]) * omw;
    }
}

void cpu_addcmul(float *y, float beta, float alpha, const float *a, const float *b, size_t n) {
    // y, a, b are (n); a and b may be the same array (Adam's g * g)
#pragma omp parallel for simd if (parallel : n >= PAR_MIN) schedule(static)
    for (size_t i = 0; i < n; i++) y[i] = y[i] * beta + alpha * a[i] * b[i];
}

void cpu_addcdiv_sqrt(float *y, float alpha, const float *a, const float *b, float b_div,
                      float eps, size_t n) {
    // y, a, b are (n): Adam's p + (-lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
#pragma omp parallel for simd if (parallel : n >= PAR_MIN) schedule(static)
    for (size_t i = 0; i < n; i++) y[i] = y[i] + alpha * a[i] / (sqrtf(b[i]) / b_div + eps);
}

void cpu_maximum(float *y, const float *x, size_t n) {
    // y, x are (n). torch.maximum: a NaN in either propagates (one in y stays, since
    // x > NaN is false).
#pragma omp parallel for simd if (parallel : n >= PAR_MIN) schedule(static)
    for (size_t i = 0; i < n; i++) y[i] = (x[i] > y[i] || x[i] != x[i]) ? x[i] : y[i];
}

void cpu_add_sign(float *y, float alpha, const float *x, size_t n) {
    // y, x are (n). torch.sign: 0 at 0 (either zero), NaN at NaN.
#pragma omp parallel for simd if (parallel : n >= PAR_MIN) schedule(static)
    for (size_t i = 0; i < n; i++) {
        const float c = x[i];
        const float sign = c != c ? c : (float)((c > 0.0f) - (c < 0.0f));
        y[i] = y[i] + alpha * sign;
    }
}

void cpu_mul(float *y, const float *x, size_t n) {
    // y, x are (n)
#pragma omp parallel for simd if (parallel : n >= PAR_MIN) schedule(static)
    for (size_t i = 0; i < n; i++) y[i] = y[i] * x[i];
}

void cpu_dropout(float *y, const float *x, float p, uint64_t seed, uint64_t counter0,
                 int accumulate, size_t n) {
    // y, x are (n). The mask of element i is a pure function of (seed, counter0 + i), so
    // backward regenerates forward's mask and any split of the elements draws the same.
    const float keep_scale = 1.0f / (1.0f - p);
    if (accumulate) {
#pragma omp parallel for if (n >= PAR_MIN) schedule(static)
        for (size_t i = 0; i < n; i++)
            if (mt_random_uniform(seed, counter0 + i) >= p) y[i] += x[i] * keep_scale;
    } else {
#pragma omp parallel for if (n >= PAR_MIN) schedule(static)
        for (size_t i = 0; i < n; i++)
            y[i] = mt_random_uniform(seed, counter0 + i) >= p ? x[i] * keep_scale : 0.0f;
    }
}

void cpu_softmax_stats(float *lse, float *target_logit, float *mean_logit, const float *logits,
                       const int32_t *targets, int n, int V) {
    // lse, target_logit, mean_logit are (n), logits is (n,V), targets is (n).
    // One row per iteration, summed in order: the same bits for any number of threads.
    // exp through exp_sum's 8 lanes: libm's double exp per logit took 3.6% of a LoRA step.
#pragma omp parallel for if ((size_t)n * V >= PAR_MIN) schedule(static)
    for (int r = 0; r < n; r++) {
        const float *x = logits + (size_t)r * V;
        const int32_t t = targets[r];
        if (t < 0) { // a skipped row: nothing is read
            lse[r] = 0.0f;
            if (target_logit) target_logit[r] = 0.0f;
            if (mean_logit) mean_logit[r] = 0.0f;
            continue;
        }
        const float mx = cpu_max(x, V);
        double sum_x = 0.0;
        if (mean_logit)
            for (int j = 0; j < V; j++) sum_x += x[j];
        lse[r] = (float)((double)mx + log(exp_sum(x, V, mx)));
        if (target_logit) target_logit[r] = t < V ? x[t] : 0.0f;
        if (mean_logit) mean_logit[r] = (float)(sum_x / V);
    }
}

/* c0 exp(x - lse) + c1 in double: an entry of softmax_backward before its c2 */
static double softmax_grad_double(float x, float lse, float c0, float c1) {
    return (double)c0 * exp((double)x - lse) + c1;
}

void cpu_softmax_backward(float *x, const float *lse, const int32_t *targets, const float *coefs,
                          int n, int V) {
    // x is (n,V) in place, lse and targets are (n), coefs is (n,3); exp as in
    // cpu_softmax_stats
#pragma omp parallel for if ((size_t)n * V >= PAR_MIN) schedule(static)
    for (int r = 0; r < n; r++) {
        float *xr = x + (size_t)r * V;
        const float c0 = coefs[3 * (size_t)r], c1 = coefs[3 * (size_t)r + 1],
                    c2 = coefs[3 * (size_t)r + 2];
        const int32_t t = targets[r];
        if (t < 0) { // a skipped row: no gradient
            memset(xr, 0, (size_t)V * sizeof(float));
            continue;
        }
        if (cpu_max(xr, V) > lse[r] + 1.0f) {
            /* not the lse of these logits (a plugin's own): cpu_exp_shifted is exact
             * for exponents up to 1 only, libm's double exp for any */
            for (int j = 0; j < V; j++) {
                double v = softmax_grad_double(xr[j], lse[r], c0, c1);
                if (j == t) v += c2;
                xr[j] = (float)v;
            }
            continue;
        }
        const float xt = t < V ? xr[t] : 0.0f; // a target out of [0, V) gets no c2
        cpu_exp_shifted(xr, xr, lse[r], V);
        for (int j = 0; j < V; j++) xr[j] = CPU_MADD(c0, xr[j], c1);
        /* the target's c0 p + c2 cancels as p nears 1: in double, as before */
        if (t < V) xr[t] = (float)(softmax_grad_double(xt, lse[r], c0, c1) + c2);
    }
}

void cpu_dequantize_4bit(float *out, const uint8_t *codes, const uint8_t *absmax_q,
                         const float *absmax2, const float *table, float offset, int64_t first,
                         int64_t n, int block, int block2) {
    // out is (n); element e = first + i has code codes[e/2] (high nibble for even e), and
    // the scale of block e / block. The host validated the sizes; a zero block would
    // divide by zero, so there is nothing to compute.
    if (n <= 0 || block <= 0 || block2 <= 0) return;
    const int64_t end = first + n, b_first = first / block, b_last = (end - 1) / block;
    // One block per iteration: its scale once, then its elements. Blocks write disjoint
    // ranges of out, so any number of threads gives the same result.
#pragma omp parallel for if (n >= PAR_MIN) schedule(static)
    for (int64_t b = b_first; b <= b_last; b++) {
        const float s = table[16 + absmax_q[b]] * absmax2[b / block2] + offset;
        const int64_t lo = b * block > first ? b * block : first;
        const int64_t hi = b * block + block < end ? b * block + block : end;
        for (int64_t e = lo; e < hi; e++) {
            const uint8_t byte = codes[e >> 1];
            out[e - first] = table[(e & 1) ? byte & 15 : byte >> 4] * s;
        }
    }
}
