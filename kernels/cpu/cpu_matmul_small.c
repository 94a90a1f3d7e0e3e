/* cpu_matmul_small.c — a register-tiled block product, and through it the products
 * with one short side that LoRA's rank-r branches are made of.
 *
 * cblas_sgemm packs both operands into its own layout on every call. For a product
 * with a side of 16 (x·Aᵀ, dy·B, dyᵀ·u, gᵀ·x and the rank-16 updates u·Bᵀ, g·A of a
 * rank-16 adapter) the packing of the long operand costs more than the few
 * multiply-adds per element it feeds, and OpenBLAS ran these at 30-70 GFLOP/s where
 * its large products reach 300 (docs/speed.md). cpu_matmul_small multiplies the
 * operands where they lie: op(a) is read through row and column strides, op(b) must be
 * row-major (a transposed b is copied, which is cheap because one of its sides is
 * short), and cpu_gemm_tile keeps an 8 x 32 (or 8 x 16) block of c in registers while
 * it walks the inner dimension (6 x 16 where the build targets AVX2 without AVX-512). Every element of c sums over the inner dimension in
 * order, so the result does not depend on the number of threads. */
#include "cpu_kernels.h"

#include <omp.h>
#include <stdlib.h>

/* Rows of the generic register tile; its columns are 32, or 16 where fewer are left. */
#define TILE_M 8
/* Rows and columns of c per task of cpu_matmul_small. */
#define TASK_ROWS 64
#define TASK_COLS 256
/* Multiply-adds below which cpu_matmul_small runs on the calling thread. */
#define SMALL_PAR_MIN ((size_t)1 << 18)

/* One TILE_M x TN block of c at (i0, j0): gemm_block_32 and gemm_block_16. Each is
 * its own function with acc sized exactly, so that the compiler keeps acc in vector
 * registers (with a runtime width it vectorised across the rows instead). c += a·b
 * (alpha == beta == 1) keeps c's value as each sum's first term, as attention's always
 * had. */
#define DEFINE_GEMM_BLOCK(TN)                                                                   \
    static void gemm_block_##TN(float *c, size_t ldc, const float *a, size_t a_rs, size_t a_cs, \
                                const float *b, size_t ldb, int i0, int j0, int k, float alpha,  \
                                float beta) {                                                    \
        float acc[TILE_M][TN];                                                                   \
        const int from_c = alpha == 1.0f && beta == 1.0f;                                        \
        for (int r = 0; r < TILE_M; r++)                                                         \
            for (int j = 0; j < TN; j++)                                                         \
                acc[r][j] = from_c ? c[(size_t)(i0 + r) * ldc + j0 + j] : 0.0f;                  \
        for (int p = 0; p < k; p++) {                                                            \
            const float *brow = b + (size_t)p * ldb + j0;                                        \
            const float *ap = a + (size_t)i0 * a_rs + (size_t)p * a_cs;                          \
            for (int r = 0; r < TILE_M; r++) {                                                   \
                const float av = ap[(size_t)r * a_rs];                                           \
                _Pragma("omp simd") for (int j = 0; j < TN; j++) acc[r][j] =                     \
                    CPU_MADD(av, brow[j], acc[r][j]);                                            \
            }                                                                                    \
        }                                                                                        \
        for (int r = 0; r < TILE_M; r++) {                                                       \
            float *crow = c + (size_t)(i0 + r) * ldc + j0;                                       \
            if (from_c)                                                                          \
                for (int j = 0; j < TN; j++) crow[j] = acc[r][j];                                \
            else if (beta == 0.0f)                                                               \
                for (int j = 0; j < TN; j++) crow[j] = alpha * acc[r][j];                        \
            else                                                                                 \
                for (int j = 0; j < TN; j++) crow[j] = alpha * acc[r][j] + beta * crow[j];       \
        }                                                                                        \
    }

/* Where the compiler targets AVX2 and FMA but not AVX-512, the 8 x 32 tile is 32 of
 * the 16 vector registers and gcc spilled it (attention's products ran at about half
 * of the FMA units' rate on a Zen 2). gemm_rows_avx2 keeps MR <= 6 rows x 16 columns
 * (12 registers) and loads each b row once for all MR rows. Every element is the same
 * chain of fused multiply-adds over p in order, from the same start, and the same
 * alpha, beta steps: the generic tile's bits (CPU_MADD is fmaf there). */
#if defined(__AVX2__) && defined(__FMA__) && defined(FP_FAST_FMAF) && !defined(__AVX512F__)
#include <immintrin.h>
#define GEMM_AVX2 1
#define AVX2_ROWS 6
static inline __attribute__((always_inline)) void
gemm_rows_avx2(float *c, size_t ldc, const float *a, size_t a_rs, size_t a_cs, const float *b,
               size_t ldb, int i0, int j0, int k, float alpha, float beta, const int MR) {
    __m256 acc[AVX2_ROWS][2];
    const int from_c = alpha == 1.0f && beta == 1.0f;
    for (int r = 0; r < MR; r++) {
        const float *crow = c + (size_t)(i0 + r) * ldc + j0;
        acc[r][0] = from_c ? _mm256_loadu_ps(crow) : _mm256_setzero_ps();
        acc[r][1] = from_c ? _mm256_loadu_ps(crow + 8) : _mm256_setzero_ps();
    }
    const float *ap = a + (size_t)i0 * a_rs;
    const float *bp = b + j0;
    for (int p = 0; p < k; p++, ap += a_cs, bp += ldb) {
        const __m256 b0 = _mm256_loadu_ps(bp), b1 = _mm256_loadu_ps(bp + 8);
        for (int r = 0; r < MR; r++) {
            const __m256 av = _mm256_broadcast_ss(ap + (size_t)r * a_rs);
            acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
        }
    }
    const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
    for (int r = 0; r < MR; r++) {
        float *crow = c + (size_t)(i0 + r) * ldc + j0;
        for (int h = 0; h < 2; h++) {
            __m256 v = acc[r][h];
            if (!from_c) {
                v = _mm256_mul_ps(va, v);
                if (beta != 0.0f) v = _mm256_add_ps(v, _mm256_mul_ps(vb, _mm256_loadu_ps(crow + 8 * h)));
            }
            _mm256_storeu_ps(crow + 8 * h, v);
        }
    }
}
#else
#define GEMM_AVX2 0
DEFINE_GEMM_BLOCK(32)
DEFINE_GEMM_BLOCK(16)
#endif

void cpu_gemm_tile(float *c, size_t ldc, const float *a, size_t a_rs, size_t a_cs, const float *b,
                   size_t ldb, int m, int n, int k, float alpha, float beta) {
#if GEMM_AVX2
    const int m_full = m, n16 = n - n % 16;
    for (int i0 = 0; i0 < m; i0 += AVX2_ROWS) {
        const int mr = m - i0 < AVX2_ROWS ? m - i0 : AVX2_ROWS;
        for (int j0 = 0; j0 < n16; j0 += 16) {
            switch (mr) { /* a copy per row count, so that acc stays in registers */
            case 6: gemm_rows_avx2(c, ldc, a, a_rs, a_cs, b, ldb, i0, j0, k, alpha, beta, 6); break;
            case 5: gemm_rows_avx2(c, ldc, a, a_rs, a_cs, b, ldb, i0, j0, k, alpha, beta, 5); break;
            case 4: gemm_rows_avx2(c, ldc, a, a_rs, a_cs, b, ldb, i0, j0, k, alpha, beta, 4); break;
            case 3: gemm_rows_avx2(c, ldc, a, a_rs, a_cs, b, ldb, i0, j0, k, alpha, beta, 3); break;
            case 2: gemm_rows_avx2(c, ldc, a, a_rs, a_cs, b, ldb, i0, j0, k, alpha, beta, 2); break;
            default: gemm_rows_avx2(c, ldc, a, a_rs, a_cs, b, ldb, i0, j0, k, alpha, beta, 1); break;
            }
        }
    }
#else
    const int m_full = m - m % TILE_M, n32 = n - n % 32, n16 = n - n % 16;
    for (int i0 = 0; i0 < m_full; i0 += TILE_M) {
        for (int j0 = 0; j0 < n32; j0 += 32) gemm_block_32(c, ldc, a, a_rs, a_cs, b, ldb, i0, j0, k, alpha, beta);
        if (n16 > n32) gemm_block_16(c, ldc, a, a_rs, a_cs, b, ldb, i0, n32, k, alpha, beta);
    }
#endif
    /* the edges: rows [m_full, m) in full, and columns [n16, n) of the tiled rows */
    for (int i = 0; i < m; i++) {
        const int j0 = i < m_full ? n16 : 0;
        if (j0 >= n) continue;
        float *crow = c + (size_t)i * ldc;
        for (int j = j0; j < n; j++) {
            float acc = alpha == 1.0f && beta == 1.0f ? crow[j] : 0.0f;
            for (int p = 0; p < k; p++)
                acc = CPU_MADD(a[(size_t)i * a_rs + (size_t)p * a_cs], b[(size_t)p * ldb + j], acc);
            if (alpha == 1.0f && beta == 1.0f) crow[j] = acc;
            else crow[j] = beta == 0.0f ? alpha * acc : alpha * acc + beta * crow[j];
        }
    }
}

int cpu_matmul_small(float *c, const float *a, const float *b, int M, int N, int K, int trans_a,
                     int trans_b, float alpha, float beta) {
    // c is (M,N); a is (M,K) or (K,M) when trans_a; b is (K,N) or (N,K) when trans_b
    if (M <= 0 || N <= 0 || K <= 0) return -1;
    float *bt = NULL;
    if (trans_b) { /* b (N,K) copied to (K,N) */
        if (!(bt = malloc((size_t)K * N * sizeof(float)))) return -1;
        for (int n = 0; n < N; n++)
            for (int p = 0; p < K; p++) bt[(size_t)p * N + n] = b[(size_t)n * K + p];
        b = bt;
    }
    const size_t a_rs = trans_a ? 1 : (size_t)K, a_cs = trans_a ? (size_t)M : 1;
    const int row_tasks = (M + TASK_ROWS - 1) / TASK_ROWS, col_tasks = (N + TASK_COLS - 1) / TASK_COLS;
    const int tasks = row_tasks * col_tasks;
#pragma omp parallel for schedule(static) if ((size_t)M * N * K >= SMALL_PAR_MIN && tasks > 1)
    for (int t = 0; t < tasks; t++) {
        const int i0 = t / col_tasks * TASK_ROWS, j0 = t % col_tasks * TASK_COLS;
        const int m = M - i0 < TASK_ROWS ? M - i0 : TASK_ROWS, n = N - j0 < TASK_COLS ? N - j0 : TASK_COLS;
        cpu_gemm_tile(c + (size_t)i0 * N + j0, (size_t)N, a + (size_t)i0 * a_rs, a_rs, a_cs,
                      b + j0, (size_t)N, m, n, K, alpha, beta);
    }
    free(bt);
    return 0;
}
