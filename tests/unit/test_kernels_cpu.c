/* test_kernels_cpu.c — the CPU backend's kernels against naive double-precision
 * references, and every backward against central finite differences.
 *
 * Gradient checks follow Torch7's nn Jacobian tests: pick a random weighting R
 * of the output, take the scalar L = sum(out * R) (summed in double), and compare
 * the analytic gradient of each input with (L(x + e) - L(x - e)) / 2e, where the
 * perturbation is applied to the fp32 input the kernel sees. The error is
 * max |analytic - fd| / max |fd| over the checked coordinates. Accumulating
 * ("+=") gradients start from a random base that is subtracted afterwards;
 * overwriting ("=") ones start as NaN, so that any element left unwritten fails. */
#include "testutil.h"

#include <math.h>
#include <cblas.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cpu/cpu_kernels.h"

static mt_backend be;

/* Finite-difference tolerances (relative, see fd_check) with a step of 1e-2 on
 * inputs of order 1. Correct kernels measure 1e-7..1e-5 for linear maps and up
 * to about 1e-4 for the nonlinear ones; a sign error, a missing term or a wrong
 * index gives errors of order 1e-2..1. */
#define FD_TOL_LINEAR 1e-4
#define FD_TOL 1e-3

/* ---- helpers ------------------------------------------------------------- */

static float *fbuf(size_t n) {
    float *p = malloc((n ? n : 1) * sizeof(float));
    assert_non_null(p);
    return p;
}

static float *frand(size_t n, uint64_t *rng, float lo, float hi) {
    float *p = fbuf(n);
    mt_test_fill_uniform(p, n, rng, lo, hi);
    return p;
}

static float *fnan(size_t n) {
    float *p = fbuf(n);
    for (size_t i = 0; i < n; i++) p[i] = NAN;
    return p;
}

static float *fcopy(const float *x, size_t n) {
    float *p = fbuf(n);
    memcpy(p, x, n * sizeof(float));
    return p;
}

static double dot_d(const float *a, const float *b, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

/* a (n) -= b (n): strips the base an accumulating gradient started from. */
static void fsub(float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++) a[i] -= b[i];
}

typedef double (*loss_fn)(void *ctx);

/* Central differences of loss(ctx) with respect to x (n) against grad (n), on every
 * coordinate when n <= max_coords, else on max_coords of them (the last quarter of
 * them from the end of x, the rest at random). Returns the relative error, and prints it. */
static double fd_check(const char *what, float *x, size_t n, const float *grad, loss_fn loss,
                       void *ctx, float eps, size_t max_coords, uint64_t *rng) {
    size_t m = n < max_coords ? n : max_coords;
    double *fd = malloc(m * sizeof(double)), *an = malloc(m * sizeof(double));
    assert_non_null(fd);
    assert_non_null(an);
    for (size_t c = 0; c < m; c++) {
        // sampled: the last m/4 elements (the last positions, where blocks end) and random ones
        size_t i = n <= max_coords ? c
                   : c < m / 4     ? n - 1 - c
                                   : (size_t)(mt_test_rand_u64(rng) % n);
        float x0 = x[i];
        float xp = x0 + eps, xm = x0 - eps;
        x[i] = xp;
        double lp = loss(ctx);
        x[i] = xm;
        double lm = loss(ctx);
        x[i] = x0;
        fd[c] = (lp - lm) / ((double)xp - (double)xm);
        an[c] = grad[i];
    }
    double err = mt_test_rel_err_d(an, fd, m);
    printf("  %-40s rel err %.2e (%zu coords)\n", what, err, m);
    free(fd);
    free(an);
    return err;
}

/* ---- memory -------------------------------------------------------------- */

static void test_memory(void **state) {
    (void)state;
    size_t sizes[] = {0, 1, 63, 64, 1000};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        unsigned char *p = be.ops->alloc(&be, sizes[i]);
        assert_non_null(p);
        assert_int_equal((uintptr_t)p % 64, 0);
        for (size_t j = 0; j < sizes[i]; j++) assert_int_equal(p[j], 0);
        be.ops->free(&be, p);
    }
    float host[37], back[37];
    uint64_t rng = 1;
    mt_test_fill_uniform(host, 37, &rng, -1, 1);
    float *dev = be.ops->alloc(&be, sizeof host);
    assert_int_equal(be.ops->upload(&be, dev, host, sizeof host), MT_OK);
    assert_int_equal(be.ops->download(&be, back, dev, sizeof back), MT_OK);
    assert_memory_equal(host, back, sizeof host);
    be.ops->zero(&be, dev, sizeof host);
    for (int i = 0; i < 37; i++) assert_true(dev[i] == 0.0f);
    assert_int_equal(be.ops->sync(&be), MT_OK);
    be.ops->free(&be, dev);
    be.ops->free(&be, NULL);
    assert_int_equal(be.device, MT_DEVICE_CPU);
    assert_string_equal(be.name, "cpu");
    assert_true(be.num_threads >= 1);
    mt_error err = {0};
    assert_int_equal(mt_backend_cpu_init(NULL, 0, &err), MT_ERR_INVALID_ARG);
    assert_int_equal(err.status, MT_ERR_INVALID_ARG);
    assert_true(strlen(err.msg) > 0);
}

/* ---- matmul -------------------------------------------------------------- */

static void test_matmul_forward(void **state) {
    (void)state;
    uint64_t rng = 2;
    const int N = 5, K = 9, M_max = 7;
    int M = M_max;
    float *a = frand(M_max * K, &rng, -1, 1), *b = frand(K * N, &rng, -1, 1);
    float *c0 = frand(M_max * N, &rng, -1, 1);
    const float alpha = 0.7f, beta = 0.3f;
    // M = 1 (one decoded token) takes the matrix-vector path
    for (int mcase = 0; mcase < 2; mcase++, M = 1)
    for (int ta = 0; ta < 2; ta++) {
        for (int tb = 0; tb < 2; tb++) {
            float *c = fcopy(c0, M * N);
            be.ops->matmul(&be, c, a, b, M, N, K, ta, tb, alpha, beta);
            double ref[7 * 5], got[7 * 5];
            for (int i = 0; i < M; i++) {
                for (int j = 0; j < N; j++) {
                    double s = 0.0;
                    for (int p = 0; p < K; p++) {
                        double av = ta ? a[p * M + i] : a[i * K + p];
                        double bv = tb ? b[j * K + p] : b[p * N + j];
                        s += av * bv;
                    }
                    ref[i * N + j] = alpha * s + beta * c0[i * N + j];
                    got[i * N + j] = c[i * N + j];
                }
            }
            double err = mt_test_rel_err_d(got, ref, M * N);
            printf("  matmul M=%d trans_a=%d trans_b=%d rel err %.2e\n", M, ta, tb, err);
            assert_true(err < 1e-6);
            free(c);
        }
    }
    // beta = 0 must not read c (NaN there stays out of the result), on both paths
    for (M = M_max; M >= 1; M -= M_max - 1) {
        float *c = fnan(M * N);
        be.ops->matmul(&be, c, a, b, M, N, K, 0, 0, 1.0f, 0.0f);
        for (int i = 0; i < M * N; i++) assert_false(isnan(c[i]));
        free(c);
    }
    free(a);
    free(b);
    free(c0);
}

/* The few-row path (cpu_matmul_rows.c: decoding's linear layers, a · bᵀ): odd shapes
 * on both sides of its limits against a double-precision reference, beta = 0 never
 * reading c, and the same bits from 1 and 3 threads. */
static void test_matmul_rows(void **state) {
    (void)state;
    uint64_t rng = 5;
    const int shapes[][3] = {{2, 64, 64}, {3, 67, 77}, {5, 130, 600}, {17, 64, 65},
                             {32, 97, 131}, {33, 70, 64}, {4, 63, 64}, {4, 64, 63}};
    const int saved = omp_get_max_threads();
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        float *a = frand(M * K, &rng, -1, 1), *b = frand(N * K, &rng, -1, 1);
        float *c0 = frand(M * N, &rng, -1, 1), *c = fcopy(c0, M * N);
        double *ref = malloc(sizeof(double) * M * N), *got = malloc(sizeof(double) * M * N);
        assert_non_null(ref);
        assert_non_null(got);
        be.ops->matmul(&be, c, a, b, M, N, K, 0, 1, 0.7f, 0.3f);
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                double sum = 0.0;
                for (int p = 0; p < K; p++) sum += (double)a[i * K + p] * b[j * K + p];
                ref[i * N + j] = 0.7 * sum + 0.3 * c0[i * N + j];
                got[i * N + j] = c[i * N + j];
            }
        const double err = mt_test_rel_err_d(got, ref, M * N);
        printf("  matmul a·bT M=%d N=%d K=%d rel err %.2e\n", M, N, K, err);
        assert_true(err < 1e-6);
        float *one = fnan(M * N), *three = fnan(M * N);
        omp_set_num_threads(1);
        cpu_matmul_rows_nt(one, a, b, M, N, K, 1.0f, 0.0f);
        omp_set_num_threads(3);
        cpu_matmul_rows_nt(three, a, b, M, N, K, 1.0f, 0.0f);
        omp_set_num_threads(saved);
        for (int i = 0; i < M * N; i++) assert_false(isnan(one[i]));
        assert_memory_equal(one, three, sizeof(float) * M * N);
        free(a), free(b), free(c0), free(c), free(ref), free(got), free(one), free(three);
    }
}

/* ref (M,N) = alpha · op(a) · op(b) + beta · c0 in double (c0 not read when beta = 0);
 * a is (M,K) or (K,M) when ta, b is (K,N) or (N,K) when tb. */
static void matmul_reference(double *ref, const float *a, const float *b, const float *c0, int M,
                             int N, int K, int ta, int tb, float alpha, float beta) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double sum = 0.0;
            for (int p = 0; p < K; p++)
                sum += (double)(ta ? a[p * M + i] : a[i * K + p]) * (tb ? b[j * K + p] : b[p * N + j]);
            ref[i * N + j] = alpha * sum + (beta == 0.0f ? 0.0 : beta * c0[i * N + j]);
        }
}

/* The short-side path (cpu_matmul_small.c: LoRA's rank-r products): every transpose
 * case on shapes with a side of 1 .. 32 around the register tile's 8 x 16 / 8 x 32
 * edges, called directly (so the sanitizer build, which does not target AVX-512, runs
 * it too) and through cpu_matmul, against a double-precision reference; beta = 0 never
 * reading c; alpha = beta = 1 (accumulation) and a general alpha, beta; the same bits
 * from 1 and 3 threads. */
static void test_matmul_small(void **state) {
    (void)state;
    uint64_t rng = 6;
    /* M, N, K: x·Aᵀ and dy·B (N = r), dyᵀ·u (N = r, K rows), gᵀ·x (M = r), u·Bᵀ (K = r) */
    const int shapes[][3] = {{1024, 16, 576}, {300, 16, 197}, {77, 24, 130}, {96, 8, 1000},
                             {1536, 16, 257}, {16, 576, 1024}, {5, 300, 333}, {640, 576, 16},
                             {129, 1000, 4}, {1000, 1, 70}, {40, 32, 2048}, {9, 45, 7},
                             {33, 31, 500}, {2, 64, 4096}, {17, 17, 17},
                             /* trans_a and trans_b with a long b: cpu_matmul keeps sgemm */
                             {16, 300, 600}};
    const float ab[][2] = {{1.0f, 0.0f}, {1.0f, 1.0f}, {0.7f, 0.3f}, {2.0f, 1.0f}};
    const int saved = omp_get_max_threads();
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        const int ta = s % 2, tb = s / 2 % 2;
        const float alpha = ab[s % 4][0], beta = ab[s % 4][1];
        float *a = frand(M * K, &rng, -1, 1), *b = frand(N * K, &rng, -1, 1);
        float *c0 = beta == 0.0f ? fnan(M * N) : frand(M * N, &rng, -1, 1);
        double *ref = malloc(sizeof(double) * M * N), *got = malloc(sizeof(double) * M * N);
        assert_non_null(ref);
        assert_non_null(got);
        matmul_reference(ref, a, b, c0, M, N, K, ta, tb, alpha, beta);
        for (int path = 0; path < 2; path++) {
            float *c = fcopy(c0, M * N);
            if (path == 0) {
                assert_int_equal(cpu_matmul_small(c, a, b, M, N, K, ta, tb, alpha, beta), 0);
            } else {
                be.ops->matmul(&be, c, a, b, M, N, K, ta, tb, alpha, beta);
            }
            for (int i = 0; i < M * N; i++) got[i] = c[i];
            const double err = mt_test_rel_err_d(got, ref, M * N);
            printf("  %s M=%d N=%d K=%d trans_a=%d trans_b=%d alpha=%g beta=%g rel err %.2e\n",
                   path ? "matmul" : "matmul_small", M, N, K, ta, tb, alpha, beta, err);
            /* fp32 sums of K products drift as sqrt(K) roundings */
            assert_true(err < 2e-7 * sqrt((double)K));
            free(c);
        }
        float *one = fcopy(c0, M * N), *three = fcopy(c0, M * N);
        omp_set_num_threads(1);
        assert_int_equal(cpu_matmul_small(one, a, b, M, N, K, ta, tb, alpha, beta), 0);
        omp_set_num_threads(3);
        assert_int_equal(cpu_matmul_small(three, a, b, M, N, K, ta, tb, alpha, beta), 0);
        omp_set_num_threads(saved);
        assert_memory_equal(one, three, sizeof(float) * M * N);
        free(a), free(b), free(c0), free(ref), free(got), free(one), free(three);
    }
    float x = 1.0f;
    assert_int_equal(cpu_matmul_small(&x, &x, &x, 1, 1, 0, 0, 0, 1.0f, 0.0f), -1);
}

/* cpu_gemm_tile (attention's blocks, cpu_matmul_small's tasks) sums every element over
 * p in order from its start (c's value when alpha = beta = 1, else 0) with CPU_MADD,
 * then applies alpha and beta: the same bits as that loop written naively, whichever
 * register tile the build uses (8 x 32 with AVX-512, 6 x 16 with AVX2), on row and
 * column counts around both tiles' edges and with a transposed a. */
static void test_gemm_tile_bits(void **state) {
    (void)state;
    uint64_t rng = 9;
    const int shapes[][3] = {{64, 64, 64}, {13, 37, 5}, {6, 16, 1}, {7, 47, 33}, {1, 16, 64},
                             {5, 15, 9}, {48, 80, 64}, {25, 33, 100}};
    const float ab[][2] = {{1.0f, 0.0f}, {1.0f, 1.0f}, {0.7f, 0.3f}, {0.125f, 0.0f}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int m = shapes[s][0], n = shapes[s][1], k = shapes[s][2];
        const int ta = s % 2;
        const size_t lda = (size_t)(ta ? m : k) + 3, ldb = (size_t)n + 5, ldc = (size_t)n + 2;
        const size_t a_rs = ta ? 1 : lda, a_cs = ta ? lda : 1;
        float *a = frand((int)(lda * (ta ? k : m)), &rng, -1, 1), *b = frand((int)(ldb * k), &rng, -1, 1);
        float *c0 = frand((int)(ldc * m), &rng, -1, 1);
        for (int t = 0; t < 4; t++) {
            const float alpha = ab[t][0], beta = ab[t][1];
            float *got = fcopy(c0, (int)(ldc * m)), *want = fcopy(c0, (int)(ldc * m));
            cpu_gemm_tile(got, ldc, a, a_rs, a_cs, b, ldb, m, n, k, alpha, beta);
            const int from_c = alpha == 1.0f && beta == 1.0f;
            for (int i = 0; i < m; i++)
                for (int j = 0; j < n; j++) {
                    float *cij = want + (size_t)i * ldc + j;
                    float acc = from_c ? *cij : 0.0f;
                    for (int p = 0; p < k; p++)
                        acc = CPU_MADD(a[(size_t)i * a_rs + (size_t)p * a_cs], b[(size_t)p * ldb + j], acc);
                    *cij = from_c ? acc : beta == 0.0f ? alpha * acc : alpha * acc + beta * *cij;
                }
            printf("  gemm_tile m=%d n=%d k=%d trans_a=%d alpha=%g beta=%g\n", m, n, k, ta, alpha, beta);
            assert_memory_equal(got, want, sizeof(float) * ldc * m);
            free(got), free(want);
        }
        free(a), free(b), free(c0);
    }
}

/* Products of many rows and at most 32 columns that reach sgemm run as their transpose
 * (cpu_matmul_narrow_use): every transpose case, alpha and beta, beta = 0 with NaN in
 * c, on both sides of the limits (N 32 / 33, M 256 / 255), with the path on and off,
 * against a double-precision reference. Below cpu_matmul_small's 2^21 multiply-adds,
 * so that AVX-512 builds reach this path too. */
static void test_matmul_narrow(void **state) {
    (void)state;
    uint64_t rng = 8;
    const int shapes[][3] = {{256, 16, 100}, {300, 32, 200}, {1000, 7, 33}, {257, 1, 5},
                             {512, 31, 64}, {255, 16, 64}, {256, 33, 64}, {4096, 3, 17}};
    const float ab[][2] = {{1.0f, 0.0f}, {1.0f, 1.0f}, {0.7f, 0.3f}, {-2.0f, 0.5f}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        float *a = frand(M * K, &rng, -1, 1), *b = frand(N * K, &rng, -1, 1);
        double *ref = malloc(sizeof(double) * M * N), *got = malloc(sizeof(double) * M * N);
        assert_non_null(ref);
        assert_non_null(got);
        for (int t = 0; t < 4; t++) {
            const int ta = t % 2, tb = t / 2;
            const float alpha = ab[(s + t) % 4][0], beta = ab[(s + t) % 4][1];
            float *c0 = beta == 0.0f ? fnan(M * N) : frand(M * N, &rng, -1, 1);
            matmul_reference(ref, a, b, c0, M, N, K, ta, tb, alpha, beta);
            for (int on = 0; on < 2; on++) {
                float *c = fcopy(c0, M * N);
                cpu_matmul_narrow_use(on);
                be.ops->matmul(&be, c, a, b, M, N, K, ta, tb, alpha, beta);
                for (int i = 0; i < M * N; i++) got[i] = c[i];
                const double err = mt_test_rel_err_d(got, ref, M * N);
                printf("  matmul narrow %s M=%d N=%d K=%d trans_a=%d trans_b=%d alpha=%g beta=%g "
                       "rel err %.2e\n", on ? "on " : "off", M, N, K, ta, tb, alpha, beta, err);
                assert_true(err < 2e-7 * sqrt((double)K) + 1e-7);
                free(c);
            }
            free(c0);
        }
        free(a), free(b), free(ref), free(got);
    }
    cpu_matmul_narrow_use(1);
}

/* cpu_matmul clears c itself and asks sgemm for beta = 1 where the caller gave beta = 0
 * (sgemm_rowmajor): the bits must stay sgemm's own for beta = 0, with NaN in c before
 * (not read), for every transpose case, on both sides of SGEMM_CLEAR_MIN outputs. */
static void test_matmul_beta_zero_bits(void **state) {
    (void)state;
    uint64_t rng = 9;
    const int shapes[][3] = {{1024, 192, 64}, {64, 128, 33}, {90, 91, 200}, {100, 82, 7},
                             {33, 1536, 576}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        float *a = frand((size_t)M * K, &rng, -1, 1), *b = frand((size_t)N * K, &rng, -1, 1);
        for (int t = 0; t < 4; t++) {
            const int ta = t % 2, tb = t / 2;
            float *got = fnan((size_t)M * N), *want = fnan((size_t)M * N);
            be.ops->matmul(&be, got, a, b, M, N, K, ta, tb, 0.5f, 0.0f);
            cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                        M, N, K, 0.5f, a, ta ? M : K, b, tb ? K : N, 0.0f, want, N);
            assert_memory_equal(got, want, (size_t)M * N * sizeof *got);
            free(got), free(want);
        }
        free(a), free(b);
    }
}

/* The int8 product's documented quantisation, naively and in double: weight groups of
 * 32 inputs as codes on (max - min) / 255 steps from their minimum, input groups as
 * integers in [-127, 127] times max |x| / 127, their products summed. */
#define Q8_GROUP 32
static void int8_reference(double *c, const float *a, const float *w, int M, int N, int K) {
    for (int i = 0; i < M; i++)
        for (int n = 0; n < N; n++) {
            double sum = 0.0;
            for (int k0 = 0; k0 < K; k0 += Q8_GROUP) {
                const int k1 = k0 + Q8_GROUP < K ? k0 + Q8_GROUP : K;
                float lo = w[(size_t)n * K + k0], hi = lo, amax = 0.0f;
                for (int k = k0; k < k1; k++) {
                    lo = fminf(lo, w[(size_t)n * K + k]);
                    hi = fmaxf(hi, w[(size_t)n * K + k]);
                    amax = fmaxf(amax, fabsf(a[(size_t)i * K + k]));
                }
                const float step = (hi - lo) / 255.0f, sa = amax / 127.0f;
                for (int k = k0; k < k1; k++) {
                    double code = step > 0.0f ? (double)lrintf((w[(size_t)n * K + k] - lo) / step) : 0.0;
                    double q = sa > 0.0f ? (double)lrintf(a[(size_t)i * K + k] / sa) : 0.0;
                    sum += ((double)step * code + lo) * ((double)sa * q);
                }
            }
            c[(size_t)i * N + n] = sum;
        }
}

static void int8_exact(double *c, const float *a, const float *w, int M, int N, int K) {
    for (int i = 0; i < M; i++)
        for (int n = 0; n < N; n++) {
            double sum = 0.0;
            for (int k = 0; k < K; k++) sum += (double)a[(size_t)i * K + k] * w[(size_t)n * K + k];
            c[(size_t)i * N + n] = sum;
        }
}

/* c (M,N) through the backend's int8 op; fails the test unless it ran. */
static float *int8_product(const float *a, const void *q, int M, int N) {
    float *c = fnan((size_t)M * N);
    assert_int_equal(be.ops->matmul_int8(&be, c, a, q, M, 0, 0), 0);
    return c;
}

/* Every int8 kernel this CPU runs besides the best (AVX2 where the CPU has VNNI) gives
 * `want`, the best kernel's product with round_seed, to the bit. Returns how many ran. */
static int lesser_kernels_agree(const float *want, const float *a, const void *q, int M, int N,
                                uint64_t round_seed) {
    const int best = cpu_int8_best_kernel();
    int ran = 0;
    for (int k = best - 1; k > CPU_INT8_NONE; k--, ran++) {
        assert_int_equal(cpu_int8_use_kernel(k), 0);
        float *c = fnan((size_t)M * N);
        assert_int_equal(be.ops->matmul_int8(&be, c, a, q, M, 0, round_seed), 0);
        assert_memory_equal(c, want, sizeof(float) * M * N);
        free(c);
    }
    assert_int_equal(cpu_int8_use_kernel(best), 0);
    return ran;
}

/* The input rows quantised once (int8_rows_create, for products that share them) and
 * multiplied by q give `want`, the product of matmul_int8 rounding to nearest, to the
 * bit, into c holding anything; and refuse a copy of another K. */
static void shared_rows_agree(const float *want, const float *a, const void *q, int M, int N,
                              int K) {
    void *rows = be.ops->int8_rows_create(&be, a, M, K);
    assert_non_null(rows);
    float *c = fnan((size_t)M * N);
    assert_int_equal(be.ops->matmul_int8_rows(&be, c, rows, q, 0), 0);
    assert_memory_equal(c, want, sizeof(float) * M * N);
    be.ops->int8_rows_free(&be, rows);
    float *wider = calloc((size_t)K + 1, sizeof *wider);
    assert_non_null(wider);
    void *other = be.ops->int8_rows_create(&be, wider, 1, K + 1);
    free(wider);
    assert_non_null(other);
    assert_int_not_equal(be.ops->matmul_int8_rows(&be, c, other, q, 0), 0);
    be.ops->int8_rows_free(&be, other);
    free(c);
}

/* On AVX2 CPUs, the kernel for small codes gives `want` (its product with round_seed)
 * to the bit when it is turned off and the 8-bit kernel multiplies the same codes. */
static void small_codes_agree(const float *want, const float *a, const void *q, int M, int N,
                              uint64_t round_seed) {
    if (cpu_int8_kernel() != CPU_INT8_AVX2 || !cpu_weight_int8_small_codes(q)) return;
    cpu_int8_use_small_codes(0);
    float *c = fnan((size_t)M * N);
    assert_int_equal(be.ops->matmul_int8(&be, c, a, q, M, 0, round_seed), 0);
    cpu_int8_use_small_codes(1);
    assert_memory_equal(c, want, sizeof(float) * M * N);
    free(c);
}

/* Int8 weight products (generation, frozen weights in training): the documented
 * quantisation, computed naively;
 * exact on weights that lie on a 16-step grid per group (a GGUF's Q4 blocks) with inputs
 * that are integers times a group scale; close to fp32 on anything; odd shapes on both
 * sides of the panel (32 outputs), group (32 inputs) and row-block sizes; NaN rows;
 * the same bits on 1 and 3 threads; the copy of a transposed source; accumulation;
 * stochastic rounding. */
static void test_matmul_int8(void **state) {
    (void)state;
    assert_non_null(be.ops->weight_int8_create);
    float w0[64] = {0};
    if (!cpu_int8_supported()) {
        assert_null(be.ops->weight_int8_create(&be, w0, 2, 32, 0, MT_INT8_USE_DECODING));
        printf("  int8 products: this CPU has neither AVX512-VNNI nor AVX2 + FMA; the op declines (fp32 is used)\n");
        return;
    }
    /* copies for training where the products are VNNI's, or AVX2's for small codes (a
     * Q4 base: w0's equal weights); AVX2's 8-bit products are slower than fp32 there.
     * Without a kernel, no copies, and a product declines */
    const int best = cpu_int8_best_kernel();
    float w8[64];
    for (int i = 0; i < 64; i++) w8[i] = 0.01f * (float)(i * i % 37); /* on no grid of 16 */
    void *q0 = be.ops->weight_int8_create(&be, w8, 2, 32, 0, MT_INT8_USE_TRAINING);
    assert_true((q0 != NULL) == (best == CPU_INT8_VNNI));
    be.ops->weight_int8_free(&be, q0);
    q0 = be.ops->weight_int8_create(&be, w8, 2, 32, 0, MT_INT8_USE_DECODING);
    assert_non_null(q0);
    assert_false(cpu_weight_int8_small_codes(q0));
    be.ops->weight_int8_free(&be, q0);
    q0 = be.ops->weight_int8_create(&be, w0, 2, 32, 0, MT_INT8_USE_TRAINING);
    assert_non_null(q0);
    assert_true(cpu_weight_int8_small_codes(q0));
    be.ops->weight_int8_free(&be, q0);
    q0 = be.ops->weight_int8_create(&be, w0, 2, 32, 0, MT_INT8_USE_DECODING);
    assert_non_null(q0);
    assert_int_equal(cpu_int8_use_kernel(best + 1), -1);
    assert_int_equal(cpu_int8_use_kernel(CPU_INT8_NONE), 0);
    assert_null(be.ops->weight_int8_create(&be, w0, 2, 32, 0, MT_INT8_USE_DECODING));
    float c0[64];
    assert_int_not_equal(be.ops->matmul_int8(&be, c0, w0, q0, 2, 0, 0), 0);
    assert_int_equal(cpu_int8_use_kernel(best), 0);
    be.ops->weight_int8_free(&be, q0);
    printf("  int8 products: the %s kernel%s\n", best == CPU_INT8_VNNI ? "AVX512-VNNI" : "AVX2",
           best == CPU_INT8_VNNI ? ", checked against the AVX2 kernel bit for bit" : " (this CPU has no AVX512-VNNI)");
    uint64_t rng = 11;
    const int shapes[][3] = {{1, 1, 1},   {1, 32, 32},  {5, 31, 33},  {6, 33, 64},
                             {7, 64, 100}, {32, 97, 577}, {33, 40, 31}, {11, 200, 96}};
    const int saved = omp_get_max_threads();
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        double *ref = malloc(sizeof(double) * M * N), *got = malloc(sizeof(double) * M * N);
        assert_non_null(ref);
        assert_non_null(got);

        /* any weights and inputs: the quantisation as documented, and near fp32 */
        float *a = frand((size_t)M * K, &rng, -1, 1), *w = frand((size_t)N * K, &rng, -0.2f, 0.3f);
        void *q = be.ops->weight_int8_create(&be, w, N, K, 0, MT_INT8_USE_DECODING);
        assert_non_null(q);
        /* three inputs or more in a group of ordinary numbers lie on no grid of 16 */
        assert_true(cpu_weight_int8_small_codes(q) == (K <= 2));
        float *c = int8_product(a, q, M, N);
        assert_int_equal(lesser_kernels_agree(c, a, q, M, N, 0), best - CPU_INT8_AVX2);
        shared_rows_agree(c, a, q, M, N, K);
        for (int i = 0; i < M * N; i++) got[i] = c[i];
        int8_reference(ref, a, w, M, N, K);
        const double err_doc = mt_test_rel_err_d(got, ref, (size_t)M * N);
        int8_exact(ref, a, w, M, N, K);
        const double err_fp = mt_test_rel_err_d(got, ref, (size_t)M * N);
        /* the same bits whatever the number of threads */
        omp_set_num_threads(1);
        float *one = int8_product(a, q, M, N);
        omp_set_num_threads(3);
        float *three = int8_product(a, q, M, N);
        omp_set_num_threads(saved);
        assert_memory_equal(one, c, sizeof(float) * M * N);
        assert_memory_equal(three, c, sizeof(float) * M * N);
        /* a copy made from the weight stored transposed (K,N) is the same copy, and
         * accumulate adds the same product to what c held */
        float *wt = fnan((size_t)N * K);
        for (int n = 0; n < N; n++)
            for (int k = 0; k < K; k++) wt[(size_t)k * N + n] = w[(size_t)n * K + k];
        void *qt = be.ops->weight_int8_create(&be, wt, N, K, 1, MT_INT8_USE_DECODING);
        assert_non_null(qt);
        float *ct = int8_product(a, qt, M, N);
        assert_memory_equal(ct, c, sizeof(float) * M * N);
        for (int i = 0; i < M * N; i++) ct[i] = 0.5f - (float)(i % 7);
        assert_int_equal(be.ops->matmul_int8(&be, ct, a, qt, M, 1, 0), 0);
        for (int i = 0; i < M * N; i++) assert_true(ct[i] == (0.5f - (float)(i % 7)) + c[i]);
        be.ops->weight_int8_free(&be, qt);
        free(wt), free(ct);
        be.ops->weight_int8_free(&be, q);

        /* weights on a Q4 grid (min + d · j, j in 0..15, both ends used) and inputs
         * sa · integer (one of them ±127): nothing is lost but rounding */
        for (int n = 0; n < N; n++)
            for (int k0 = 0; k0 < K; k0 += Q8_GROUP) {
                const float mn = -0.1f - 0.1f * mt_test_rand_uniform(&rng, 0, 1);
                const float d = 0.001f + 0.02f * mt_test_rand_uniform(&rng, 0, 1);
                for (int k = k0; k < K && k < k0 + Q8_GROUP; k++) {
                    int j = k == k0 ? 0 : k == k0 + 1 ? 15 : (int)(16 * mt_test_rand_uniform(&rng, 0, 1)) % 16;
                    w[(size_t)n * K + k] = mn + d * (float)j;
                }
            }
        for (int i = 0; i < M; i++)
            for (int k0 = 0; k0 < K; k0 += Q8_GROUP) {
                const float sa = 0.01f + mt_test_rand_uniform(&rng, 0, 1);
                for (int k = k0; k < K && k < k0 + Q8_GROUP; k++) {
                    int v = k == k0 ? -127 : (int)(255 * mt_test_rand_uniform(&rng, 0, 1)) % 255 - 127;
                    a[(size_t)i * K + k] = sa * (float)v;
                }
            }
        q = be.ops->weight_int8_create(&be, w, N, K, 0, MT_INT8_USE_DECODING);
        assert_non_null(q);
        assert_true(cpu_weight_int8_small_codes(q));
        free(c);
        c = int8_product(a, q, M, N);
        for (int i = 0; i < M * N; i++) got[i] = c[i];
        int8_exact(ref, a, w, M, N, K);
        const double err_grid = mt_test_rel_err_d(got, ref, (size_t)M * N);
        small_codes_agree(c, a, q, M, N, 0);
        lesser_kernels_agree(c, a, q, M, N, 0);
        shared_rows_agree(c, a, q, M, N, K);

        /* stochastic rounding: the same bits for a seed on 1 and 3 threads, other bits
         * for another seed, and unbiased: the mean of many products comes much nearer
         * the exact one than the product rounded to nearest (inputs not on the grid) */
        float *noisy = frand((size_t)M * K, &rng, -1, 1);
        float *sr1 = fnan((size_t)M * N), *sr3 = fnan((size_t)M * N);
        omp_set_num_threads(1);
        assert_int_equal(be.ops->matmul_int8(&be, sr1, noisy, q, M, 0, 7), 0);
        omp_set_num_threads(3);
        assert_int_equal(be.ops->matmul_int8(&be, sr3, noisy, q, M, 0, 7), 0);
        omp_set_num_threads(saved);
        assert_memory_equal(sr1, sr3, sizeof(float) * M * N);
        lesser_kernels_agree(sr1, noisy, q, M, N, 7);
        small_codes_agree(sr1, noisy, q, M, N, 7);
        double *mean = calloc((size_t)M * N, sizeof(double));
        assert_non_null(mean);
        const int draws = 256;
        int moved = 0;
        for (int t = 1; t <= draws; t++) {
            assert_int_equal(be.ops->matmul_int8(&be, sr3, noisy, q, M, 0, 100 + (uint64_t)t), 0);
            for (int i = 0; i < M * N; i++) {
                mean[i] += sr3[i] / draws;
                moved += sr3[i] != sr1[i];
            }
        }
        free(c);
        c = int8_product(noisy, q, M, N);
        for (int i = 0; i < M * N; i++) got[i] = c[i];
        int8_exact(ref, noisy, w, M, N, K);
        const double err_nearest = mt_test_rel_err_d(got, ref, (size_t)M * N);
        const double err_mean = mt_test_rel_err_d(mean, ref, (size_t)M * N);
        if (err_nearest > 1e-5) { /* one input per row (K = 1) is its own scale: exact */
            assert_true(moved > 0);
            assert_true(err_mean < 0.35 * err_nearest);
        }
        free(noisy), free(sr1), free(sr3), free(mean);

        /* a row with a NaN gives NaN, and only there */
        a[(size_t)(M / 2) * K + K / 2] = NAN;
        free(c);
        c = int8_product(a, q, M, N);
        for (int i = 0; i < M; i++)
            for (int n = 0; n < N; n++)
                assert_true(isnan(c[(size_t)i * N + n]) == (i == M / 2));
        be.ops->weight_int8_free(&be, q);
        printf("  int8 M=%d N=%d K=%d: rel err %.1e against the documented quantisation, "
               "%.1e against fp32, %.1e on a Q4 grid; stochastic rounding: %.1e for the mean "
               "of %d, %.1e to nearest\n", M, N, K, err_doc, err_fp, err_grid, err_mean, draws,
               err_nearest);
        assert_true(err_doc < 2e-6);
        assert_true(err_fp < 2e-2);
        assert_true(err_grid < 2e-6);
        free(a), free(w), free(c), free(one), free(three), free(ref), free(got);
    }
    /* a weight with a NaN or an infinity stays fp32 */
    float w[4 * 40];
    for (int i = 0; i < 4 * 40; i++) w[i] = 0.01f * (float)i;
    w[77] = INFINITY;
    assert_null(be.ops->weight_int8_create(&be, w, 4, 40, 0, MT_INT8_USE_DECODING));
}

/* The relative error of c (M,N) against a · wᵀ summed in double. */
static double int8_err_exact(const float *c, const float *a, const float *w, int M, int N, int K) {
    double *ref = malloc(sizeof(double) * M * N), *got = malloc(sizeof(double) * M * N);
    assert_non_null(ref);
    assert_non_null(got);
    for (int i = 0; i < M * N; i++) got[i] = c[i];
    int8_exact(ref, a, w, M, N, K);
    const double err = mt_test_rel_err_d(got, ref, (size_t)M * N);
    free(ref), free(got);
    return err;
}

/* Weights on a grid of 16 values or fewer per group of 32 inputs keep their codes
 * (0..15), and on AVX2 CPUs a kernel of its own multiplies them: Q4_0-like groups that
 * use only part of their 16 values, the kernel's 16-bit sums at their largest (every
 * code 15 but one, every input 127), equal weights; one group off the grid makes the
 * whole copy 8-bit. Exact against double sums, the same bits as the 8-bit kernel. */
static void test_matmul_int8_small_codes(void **state) {
    (void)state;
    if (!cpu_int8_supported()) return;
    uint64_t rng = 23;
    const int M = 7, N = 45, K = 100;
    float *w = fnan((size_t)N * K), *a = fnan((size_t)M * K);
    for (int round = 0; round < 3; round++) {
        for (int n = 0; n < N; n++)
            for (int k0 = 0; k0 < K; k0 += Q8_GROUP) {
                /* Q4_0: d · (j - 8), here with j in [lo, hi], not always 0..15 */
                const float d = 0.001f + 0.02f * mt_test_rand_uniform(&rng, 0, 1);
                const int lo = (int)(6 * mt_test_rand_uniform(&rng, 0, 1)), hi = 15 - (n + k0) % 7;
                for (int k = k0; k < K && k < k0 + Q8_GROUP; k++) {
                    int j = lo + (int)((hi - lo + 1) * mt_test_rand_uniform(&rng, 0, 1)) % (hi - lo + 1);
                    if (round == 1) j = k == k0 ? 0 : 15; /* the largest sums */
                    if (round == 2 && n % 3 == 0) j = 4;   /* equal weights */
                    w[(size_t)n * K + k] = d * (float)(j - 8);
                }
            }
        for (int i = 0; i < M; i++)
            for (int k0 = 0; k0 < K; k0 += Q8_GROUP) {
                const float sa = 0.01f + mt_test_rand_uniform(&rng, 0, 1);
                for (int k = k0; k < K && k < k0 + Q8_GROUP; k++) {
                    int v = k == k0 ? -127 : (int)(255 * mt_test_rand_uniform(&rng, 0, 1)) % 255 - 127;
                    if (round == 1) v = 127;
                    a[(size_t)i * K + k] = sa * (float)v;
                }
            }
        void *q = be.ops->weight_int8_create(&be, w, N, K, 0, MT_INT8_USE_DECODING);
        assert_non_null(q);
        assert_true(cpu_weight_int8_small_codes(q));
        float *c = int8_product(a, q, M, N);
        const double err = int8_err_exact(c, a, w, M, N, K);
        printf("  int8 small codes, case %d: rel err %.1e against double sums\n", round, err);
        assert_true(err < 2e-6);
        small_codes_agree(c, a, q, M, N, 0);
        lesser_kernels_agree(c, a, q, M, N, 0);
        shared_rows_agree(c, a, q, M, N, K);
        be.ops->weight_int8_free(&be, q);
        free(c);
    }
    /* a group whose range is one denormal: on a grid of 15 (down to 2) steps the step
     * underflows to 0, which must not pass for a grid (it would pack every weight as
     * the minimum); on 1 step it is exact. Inputs of 2^100 make the product normal. */
    {
        float tiny[32], big[32];
        for (int i = 0; i < 32; i++) tiny[i] = i % 2 ? 0x1p-149f : 0.0f, big[i] = 0x1p100f;
        void *qt = be.ops->weight_int8_create(&be, tiny, 1, 32, 0, MT_INT8_USE_DECODING);
        assert_non_null(qt);
        assert_true(cpu_weight_int8_small_codes(qt));
        float *ct = int8_product(big, qt, 1, 1);
        assert_true(fabsf(ct[0] - 0x1p-45f) <= 1e-6f * 0x1p-45f); /* 16 · 2^-149 · 2^100 */
        be.ops->weight_int8_free(&be, qt);
        free(ct);
    }
    /* one group of ordinary numbers: the copy is 8-bit, and near the exact product */
    for (int k = 32; k < 64; k++) w[(size_t)5 * K + k] = mt_test_rand_uniform(&rng, -0.1f, 0.1f);
    void *q = be.ops->weight_int8_create(&be, w, N, K, 0, MT_INT8_USE_DECODING);
    assert_non_null(q);
    assert_false(cpu_weight_int8_small_codes(q));
    float *c = int8_product(a, q, M, N);
    assert_true(int8_err_exact(c, a, w, M, N, K) < 1e-2);
    be.ops->weight_int8_free(&be, q);
    free(c), free(w), free(a);
}

struct mm_ctx {
    float *a, *b, *c, *R;
    int M, N, K;
};

static double mm_loss(void *p) {
    struct mm_ctx *x = p;
    be.ops->matmul(&be, x->c, x->a, x->b, x->M, x->N, x->K, 0, 0, 1.0f, 0.0f);
    return dot_d(x->c, x->R, (size_t)x->M * x->N);
}

/* The host's linear backward: for c = a·b, da += dc·b^T and db += a^T·dc. */
static void test_matmul_backward(void **state) {
    (void)state;
    uint64_t rng = 3;
    struct mm_ctx x = {.M = 6, .N = 4, .K = 5};
    x.a = frand(x.M * x.K, &rng, -1, 1);
    x.b = frand(x.K * x.N, &rng, -1, 1);
    x.c = fbuf(x.M * x.N);
    x.R = frand(x.M * x.N, &rng, -1, 1);
    float *da0 = frand(x.M * x.K, &rng, -1, 1), *db0 = frand(x.K * x.N, &rng, -1, 1);
    float *da = fcopy(da0, x.M * x.K), *db = fcopy(db0, x.K * x.N);
    be.ops->matmul(&be, da, x.R, x.b, x.M, x.K, x.N, 0, 1, 1.0f, 1.0f);
    be.ops->matmul(&be, db, x.a, x.R, x.K, x.N, x.M, 1, 0, 1.0f, 1.0f);
    fsub(da, da0, x.M * x.K);
    fsub(db, db0, x.K * x.N);
    assert_true(fd_check("matmul da", x.a, x.M * x.K, da, mm_loss, &x, 1e-2f, 1000, &rng) <
                FD_TOL_LINEAR);
    assert_true(fd_check("matmul db", x.b, x.K * x.N, db, mm_loss, &x, 1e-2f, 1000, &rng) <
                FD_TOL_LINEAR);
    free(x.a), free(x.b), free(x.c), free(x.R), free(da0), free(db0), free(da), free(db);
}

/* ---- bias ---------------------------------------------------------------- */

struct bias_ctx {
    float *out0, *out, *bias, *R;
    int N, C;
};

static double bias_loss(void *p) {
    struct bias_ctx *x = p;
    memcpy(x->out, x->out0, (size_t)x->N * x->C * sizeof(float));
    be.ops->bias_forward(&be, x->out, x->bias, x->N, x->C);
    return dot_d(x->out, x->R, (size_t)x->N * x->C);
}

static void test_bias(void **state) {
    (void)state;
    uint64_t rng = 4;
    // C > 256 crosses a column block of the backward
    struct bias_ctx x = {.N = 5, .C = 300};
    size_t n = (size_t)x.N * x.C;
    x.out0 = frand(n, &rng, -1, 1);
    x.out = fbuf(n);
    x.bias = frand(x.C, &rng, -1, 1);
    x.R = frand(n, &rng, -1, 1);
    bias_loss(&x);
    for (int i = 0; i < x.N; i++)
        for (int c = 0; c < x.C; c++)
            assert_true(x.out[i * x.C + c] == x.out0[i * x.C + c] + x.bias[c]);
    float *g0 = frand(x.C, &rng, -1, 1), *g = fcopy(g0, x.C);
    be.ops->bias_backward(&be, g, x.R, x.N, x.C);
    fsub(g, g0, x.C);
    assert_true(fd_check("bias dbias (+=)", x.bias, x.C, g, bias_loss, &x, 1e-2f, 64, &rng) <
                FD_TOL_LINEAR);
    free(x.out0), free(x.out), free(x.bias), free(x.R), free(g0), free(g);
}

/* ---- elementwise --------------------------------------------------------- */

static void test_add_axpy(void **state) {
    (void)state;
    uint64_t rng = 5;
    const size_t n = 1001;
    float *a = frand(n, &rng, -1, 1), *b = frand(n, &rng, -1, 1), *out = fnan(n);
    be.ops->add(&be, out, a, b, n);
    for (size_t i = 0; i < n; i++) assert_true(out[i] == a[i] + b[i]);
    float *y = fcopy(a, n); // aliased: the residual add
    be.ops->add(&be, y, y, b, n);
    assert_memory_equal(y, out, n * sizeof(float));
    memcpy(y, a, n * sizeof(float));
    be.ops->axpy(&be, y, b, -0.5f, n);
    for (size_t i = 0; i < n; i++) assert_true(y[i] == a[i] + -0.5f * b[i]);
    free(a), free(b), free(out), free(y);
}

/* ---- embedding ----------------------------------------------------------- */

struct emb_ctx {
    float *out, *table, *R;
    const int32_t *tokens;
    int N, C;
};

static double emb_loss(void *p) {
    struct emb_ctx *x = p;
    be.ops->embedding_forward(&be, x->out, x->tokens, x->table, x->N, x->C);
    return dot_d(x->out, x->R, (size_t)x->N * x->C);
}

static void test_embedding(void **state) {
    (void)state;
    uint64_t rng = 6;
    static const int32_t tokens[] = {3, 1, 3, 3, 0, 1, 6}; // repeats; 2, 4, 5 unused
    struct emb_ctx x = {.tokens = tokens, .N = 7, .C = 270};
    const int V = 7;
    x.table = frand((size_t)V * x.C, &rng, -1, 1);
    x.out = fnan((size_t)x.N * x.C);
    x.R = frand((size_t)x.N * x.C, &rng, -1, 1);
    emb_loss(&x);
    for (int i = 0; i < x.N; i++)
        assert_memory_equal(x.out + i * x.C, x.table + tokens[i] * x.C, x.C * sizeof(float));
    float *g0 = frand((size_t)V * x.C, &rng, -1, 1), *g = fcopy(g0, (size_t)V * x.C);
    be.ops->embedding_backward(&be, g, x.R, tokens, x.N, x.C);
    fsub(g, g0, (size_t)V * x.C);
    // row 3 is the sum of three rows of dout, in token order
    for (int c = 0; c < x.C; c++) {
        float ref = g0[3 * x.C + c] + x.R[0 * x.C + c];
        ref += x.R[2 * x.C + c];
        ref += x.R[3 * x.C + c];
        assert_true(fabsf(g[3 * x.C + c] - (ref - g0[3 * x.C + c])) < 1e-6f);
        assert_true(g[2 * x.C + c] == 0.0f);
    }
    assert_true(fd_check("embedding dtable (+=, repeats)", x.table, (size_t)V * x.C, g, emb_loss,
                         &x, 1e-2f, 4000, &rng) < FD_TOL_LINEAR);
    free(x.table), free(x.out), free(x.R), free(g0), free(g);
}

/* ---- RMSNorm ------------------------------------------------------------- */

struct rms_ctx {
    float *x, *w, *out, *rstd, *R;
    int N, C;
    float eps;
};

static double rms_loss(void *p) {
    struct rms_ctx *c = p;
    be.ops->rmsnorm_forward(&be, c->out, c->rstd, c->x, c->w, c->N, c->C, c->eps);
    return dot_d(c->out, c->R, (size_t)c->N * c->C);
}

static void test_rmsnorm_forward(void **state) {
    (void)state;
    uint64_t rng = 7;
    const int N = 6, C = 33;
    const float eps = 1e-5f;
    float *x = frand(N * C, &rng, -2, 2), *w = frand(C, &rng, 0.5f, 1.5f);
    float *out = fnan(N * C), *rstd = fnan(N);
    be.ops->rmsnorm_forward(&be, out, rstd, x, w, N, C, eps);
    double ref[6 * 33], got[6 * 33], rref[6], rgot[6];
    for (int i = 0; i < N; i++) {
        double ss = 0.0;
        for (int c = 0; c < C; c++) ss += (double)x[i * C + c] * x[i * C + c];
        double r = 1.0 / sqrt(ss / C + eps);
        rref[i] = r;
        rgot[i] = rstd[i];
        for (int c = 0; c < C; c++) {
            ref[i * C + c] = w[c] * x[i * C + c] * r;
            got[i * C + c] = out[i * C + c];
        }
    }
    double err = mt_test_rel_err_d(got, ref, N * C), rerr = mt_test_rel_err_d(rgot, rref, N);
    printf("  rmsnorm out rel err %.2e, rstd %.2e\n", err, rerr);
    assert_true(err < 1e-6);
    assert_true(rerr < 1e-6);
    free(x), free(w), free(out), free(rstd);
}

static void test_rmsnorm_backward(void **state) {
    (void)state;
    uint64_t rng = 8;
    struct rms_ctx c = {.N = 5, .C = 260, .eps = 1e-5f}; // C crosses a dweight column block
    size_t n = (size_t)c.N * c.C;
    c.x = frand(n, &rng, -2, 2);
    c.w = frand(c.C, &rng, 0.5f, 1.5f);
    c.out = fbuf(n);
    c.rstd = fbuf(c.N);
    c.R = frand(n, &rng, -1, 1);
    rms_loss(&c);
    float *dx0 = frand(n, &rng, -1, 1), *dw0 = frand(c.C, &rng, -1, 1);
    float *dx = fcopy(dx0, n), *dw = fcopy(dw0, c.C), *dx_frozen = fcopy(dx0, n);
    be.ops->rmsnorm_backward(&be, dx, dw, c.R, c.x, c.w, c.rstd, c.N, c.C);
    be.ops->rmsnorm_backward(&be, dx_frozen, NULL, c.R, c.x, c.w, c.rstd, c.N, c.C);
    assert_memory_equal(dx, dx_frozen, n * sizeof(float)); // dweight NULL: same dx
    fsub(dx, dx0, n);
    fsub(dw, dw0, c.C);
    assert_true(fd_check("rmsnorm dx (+=)", c.x, n, dx, rms_loss, &c, 1e-2f, 400, &rng) < FD_TOL);
    assert_true(fd_check("rmsnorm dweight (+=)", c.w, c.C, dw, rms_loss, &c, 1e-2f, 400, &rng) <
                FD_TOL);
    free(c.x), free(c.w), free(c.out), free(c.rstd), free(c.R);
    free(dx0), free(dw0), free(dx), free(dw), free(dx_frozen);
}

/* ---- RoPE ---------------------------------------------------------------- */

/* cos, sin (P, D/2) tables as Llama builds them: angle p * 10000^(-2i/D). */
static void rope_tables(float *cosv, float *sinv, int P, int D) {
    for (int p = 0; p < P; p++) {
        for (int i = 0; i < D / 2; i++) {
            double inv_freq = pow(10000.0, -2.0 * i / D);
            cosv[p * (D / 2) + i] = (float)cos(p * inv_freq);
            sinv[p * (D / 2) + i] = (float)sin(p * inv_freq);
        }
    }
}

static void test_rope_forward(void **state) {
    (void)state;
    uint64_t rng = 9;
    enum { N = 4, H = 3, D = 8, P = 20 };
    static const int32_t pos[N] = {0, 5, 17, 3};
    float cosv[P * D / 2], sinv[P * D / 2];
    rope_tables(cosv, sinv, P, D);
    float *x = frand(N * H * D, &rng, -1, 1), *y = fcopy(x, N * H * D);
    be.ops->rope_forward(&be, y, cosv, sinv, pos, N, H, D);
    double ref[N * H * D], got[N * H * D];
    for (int n = 0; n < N; n++) {
        for (int h = 0; h < H; h++) {
            const float *v = x + (n * H + h) * D;
            for (int i = 0; i < D / 2; i++) {
                double ang = pos[n] * pow(10000.0, -2.0 * i / D);
                ref[(n * H + h) * D + i] = v[i] * cos(ang) - v[i + D / 2] * sin(ang);
                ref[(n * H + h) * D + i + D / 2] = v[i + D / 2] * cos(ang) + v[i] * sin(ang);
            }
        }
    }
    for (int i = 0; i < N * H * D; i++) got[i] = y[i];
    double err = mt_test_rel_err_d(got, ref, N * H * D);
    printf("  rope forward rel err %.2e\n", err);
    assert_true(err < 1e-6);
    // position 0 is the identity
    assert_memory_equal(y, x, H * D * sizeof(float));
    // backward undoes forward (a rotation's transpose is its inverse)
    be.ops->rope_backward(&be, y, cosv, sinv, pos, N, H, D);
    assert_true(mt_test_rel_err(y, x, N * H * D) < 1e-6);
    free(x), free(y);
}

struct rope_ctx {
    float *x, *y, *cosv, *sinv, *R;
    const int32_t *pos;
    int N, H, D;
};

static double rope_loss(void *p) {
    struct rope_ctx *c = p;
    size_t n = (size_t)c->N * c->H * c->D;
    memcpy(c->y, c->x, n * sizeof(float));
    be.ops->rope_forward(&be, c->y, c->cosv, c->sinv, c->pos, c->N, c->H, c->D);
    return dot_d(c->y, c->R, n);
}

static void test_rope_backward(void **state) {
    (void)state;
    uint64_t rng = 10;
    static const int32_t pos[] = {1, 7, 2, 30, 7};
    struct rope_ctx c = {.pos = pos, .N = 5, .H = 2, .D = 12};
    const int P = 31;
    size_t n = (size_t)c.N * c.H * c.D;
    c.cosv = fbuf((size_t)P * c.D / 2);
    c.sinv = fbuf((size_t)P * c.D / 2);
    rope_tables(c.cosv, c.sinv, P, c.D);
    c.x = frand(n, &rng, -1, 1);
    c.y = fbuf(n);
    c.R = frand(n, &rng, -1, 1);
    float *g = fcopy(c.R, n); // in place: dout becomes dx
    be.ops->rope_backward(&be, g, c.cosv, c.sinv, pos, c.N, c.H, c.D);
    assert_true(fd_check("rope dx", c.x, n, g, rope_loss, &c, 1e-2f, 1000, &rng) < FD_TOL_LINEAR);
    free(c.cosv), free(c.sinv), free(c.x), free(c.y), free(c.R), free(g);
}

/* ---- attention ----------------------------------------------------------- */

/* Naive reference in double: softmax(scale q·k^T) with an explicit causal/segment mask. */
static void attention_ref(double *out, double *lse, const float *q, const float *k, const float *v,
                          const int32_t *seg, int B, int T, int H, int KVH, int D, float scale) {
    double *sc = malloc((size_t)T * sizeof(double));
    assert_non_null(sc);
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < H; h++) {
            int kvh = h / (H / KVH);
            for (int t = 0; t < T; t++) {
                const float *qr = q + (((size_t)b * T + t) * H + h) * D;
                double mx = -INFINITY;
                for (int s = 0; s < T; s++) {
                    int vis = s <= t && (!seg || seg[b * T + s] == seg[b * T + t] ||
                                         seg[b * T + s] == MT_SHARED_SEGMENT);
                    sc[s] = -INFINITY;
                    if (!vis) continue;
                    const float *kr = k + (((size_t)b * T + s) * KVH + kvh) * D;
                    double d = 0.0;
                    for (int i = 0; i < D; i++) d += (double)qr[i] * kr[i];
                    sc[s] = d * scale;
                    if (sc[s] > mx) mx = sc[s];
                }
                double sum = 0.0;
                for (int s = 0; s < T; s++) sum += exp(sc[s] - mx);
                lse[((size_t)b * H + h) * T + t] = mx + log(sum);
                double *o = out + (((size_t)b * T + t) * H + h) * D;
                for (int i = 0; i < D; i++) o[i] = 0.0;
                for (int s = 0; s < T; s++) {
                    double p = exp(sc[s] - mx) / sum;
                    if (p == 0.0) continue;
                    const float *vr = v + (((size_t)b * T + s) * KVH + kvh) * D;
                    for (int i = 0; i < D; i++) o[i] += p * vr[i];
                }
            }
        }
    }
    free(sc);
}

struct att_ctx {
    float *q, *k, *v, *out, *lse, *R;
    const int32_t *seg;
    int B, T, H, KVH, D;
    float scale;
    void *work;
};

static double att_loss(void *p) {
    struct att_ctx *c = p;
    be.ops->attention_forward(&be, c->out, c->lse, c->q, c->k, c->v, c->seg, c->B, c->T, c->H,
                              c->KVH, c->D, c->scale, c->work);
    return dot_d(c->out, c->R, (size_t)c->B * c->T * c->H * c->D);
}

/* Fills a context with random q, k, v, R; segments (B,T): packed examples per row. */
static void att_setup(struct att_ctx *c, int B, int T, int H, int KVH, int D, const int32_t *seg,
                      uint64_t *rng) {
    memset(c, 0, sizeof *c);
    c->B = B, c->T = T, c->H = H, c->KVH = KVH, c->D = D, c->seg = seg;
    c->scale = 1.0f / sqrtf((float)D);
    size_t nq = (size_t)B * T * H * D, nk = (size_t)B * T * KVH * D;
    c->q = frand(nq, rng, -1.5f, 1.5f);
    c->k = frand(nk, rng, -1.5f, 1.5f);
    c->v = frand(nk, rng, -1, 1);
    c->R = frand(nq, rng, -1, 1);
    c->out = fnan(nq);
    c->lse = fnan((size_t)B * H * T);
    size_t wb = be.ops->attention_work_bytes(&be, B, T, H, KVH, D);
    c->work = be.ops->alloc(&be, wb);
    assert_non_null(c->work);
}

static void att_free(struct att_ctx *c) {
    free(c->q), free(c->k), free(c->v), free(c->R), free(c->out), free(c->lse);
    be.ops->free(&be, c->work);
}

/* Segment ids (B,T). kind 1, as the batcher packs: row 0 packs examples of lengths
 * 3, T-3-4 and 4 (the last one spans a block boundary when T > 64); row 1 holds one
 * example then padding. kind 2, what packing never makes but the kernel must still
 * get right: row 0 alternates ids 4 and 6 in runs of 20, so that a query sees keys of
 * its id's earlier runs, blocks back (the key range clipped per chunk starts at an id's
 * first position, not its run's); row 1 changes id every 2 positions, more ids than
 * the kernel tracks for clipping. */
static int32_t *make_segments(int B, int T, int kind) {
    int32_t *seg = malloc((size_t)B * T * sizeof(int32_t));
    assert_non_null(seg);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            if (kind == 2)
                seg[b * T + t] = b % 2 == 0 ? (t / 20 % 2 ? 6 : 4) : t / 2;
            else if (kind == 3) /* shared prefixes: 13 tokens; 70 (past a block); mid-row */
                seg[b * T + t] = b % 3 == 0   ? (t < 13 ? MT_SHARED_SEGMENT : t < 80 ? 0 : t < T - 5 ? 1 : -1)
                                 : b % 3 == 1 ? (t < 70 ? MT_SHARED_SEGMENT : (t - 70) / 30)
                                              : (t >= 10 && t < 20 ? MT_SHARED_SEGMENT : t / 40 + 3);
            else
                seg[b * T + t] =
                    b % 2 == 0 ? (t < 3 ? 0 : t < T - 4 ? 1 : 2) : (t < T / 2 ? 5 : 9);
        }
    return seg;
}

static void check_attention_forward(int B, int T, int H, int KVH, int D, int with_seg) {
    uint64_t rng = 11 + (uint64_t)T * 7 + (uint64_t)with_seg;
    int32_t *seg = with_seg ? make_segments(B, T, with_seg) : NULL;
    struct att_ctx c;
    att_setup(&c, B, T, H, KVH, D, seg, &rng);
    att_loss(&c);
    size_t nq = (size_t)B * T * H * D, nl = (size_t)B * H * T;
    double *oref = malloc(nq * sizeof(double)), *lref = malloc(nl * sizeof(double));
    double *ogot = malloc(nq * sizeof(double)), *lgot = malloc(nl * sizeof(double));
    assert_non_null(oref), assert_non_null(lref), assert_non_null(ogot), assert_non_null(lgot);
    attention_ref(oref, lref, c.q, c.k, c.v, seg, B, T, H, KVH, D, c.scale);
    for (size_t i = 0; i < nq; i++) ogot[i] = c.out[i];
    for (size_t i = 0; i < nl; i++) lgot[i] = c.lse[i];
    double eo = mt_test_rel_err_d(ogot, oref, nq), el = mt_test_rel_err_d(lgot, lref, nl);
    printf("  attention fwd B=%d T=%d H=%d KVH=%d D=%d seg=%d: out %.2e lse %.2e\n", B, T, H, KVH,
           D, with_seg, eo, el);
    assert_true(eo < 1e-5);
    assert_true(el < 1e-5);
    free(oref), free(lref), free(ogot), free(lgot), free(seg);
    att_free(&c);
}

static void test_attention_forward(void **state) {
    (void)state;
    check_attention_forward(2, 9, 4, 2, 8, 0);
    check_attention_forward(2, 9, 4, 2, 8, 1);
    check_attention_forward(2, 150, 4, 2, 16, 0); // several query and key blocks
    check_attention_forward(2, 150, 4, 2, 16, 1);
    check_attention_forward(1, 70, 4, 4, 8, 1);   // MHA
    check_attention_forward(1, 70, 4, 1, 8, 0);   // MQA
    check_attention_forward(1, 150, 2, 1, 40, 1); // D over the 32-wide register tile
    check_attention_forward(2, 65, 4, 2, 8, 1);   // a last block of one query and one key
    check_attention_forward(2, 150, 4, 2, 16, 2); // ids that come back; more ids than tracked
    check_attention_forward(3, 150, 4, 2, 16, 3); // shared prefixes (MT_SHARED_SEGMENT)
}

static void check_attention_backward(int B, int T, int H, int KVH, int D, int with_seg,
                                     size_t max_coords) {
    uint64_t rng = 101 + (uint64_t)T * 3 + (uint64_t)with_seg;
    int32_t *seg = with_seg ? make_segments(B, T, with_seg) : NULL;
    struct att_ctx c;
    att_setup(&c, B, T, H, KVH, D, seg, &rng);
    att_loss(&c);
    size_t nq = (size_t)B * T * H * D, nk = (size_t)B * T * KVH * D;
    float *out = fcopy(c.out, nq), *lse = fcopy(c.lse, (size_t)B * H * T);
    float *dq = fnan(nq), *dk = fnan(nk), *dv = fnan(nk); // "=": every element is written
    be.ops->attention_backward(&be, dq, dk, dv, c.R, out, lse, c.q, c.k, c.v, seg, B, T, H, KVH, D,
                               c.scale, c.work);
    char what[96];
    snprintf(what, sizeof what, "attention dq T=%d H=%d KVH=%d seg=%d", T, H, KVH, with_seg);
    assert_true(fd_check(what, c.q, nq, dq, att_loss, &c, 1e-2f, max_coords, &rng) < FD_TOL);
    snprintf(what, sizeof what, "attention dk T=%d H=%d KVH=%d seg=%d", T, H, KVH, with_seg);
    assert_true(fd_check(what, c.k, nk, dk, att_loss, &c, 1e-2f, max_coords, &rng) < FD_TOL);
    snprintf(what, sizeof what, "attention dv T=%d H=%d KVH=%d seg=%d", T, H, KVH, with_seg);
    assert_true(fd_check(what, c.v, nk, dv, att_loss, &c, 1e-2f, max_coords, &rng) < FD_TOL);
    free(out), free(lse), free(dq), free(dk), free(dv), free(seg);
    att_free(&c);
}

static void test_attention_backward(void **state) {
    (void)state;
    // GQA H=4 over KVH=2, every coordinate
    check_attention_backward(2, 7, 4, 2, 8, 0, 100000);
    check_attention_backward(2, 11, 4, 2, 8, 1, 100000);
    // several blocks of queries and keys (64 each): a random sample of coordinates.
    // Kept small enough to run on one thread (each FD step is two forwards);
    // test_attention_deterministic covers the threaded path.
    check_attention_backward(1, 129, 4, 2, 8, 1, 160); // the last block holds one key
    check_attention_backward(1, 80, 4, 2, 8, 0, 160);
    check_attention_backward(1, 70, 4, 2, 40, 1, 120); // D over the register tile
    check_attention_backward(2, 150, 4, 2, 8, 2, 160); // ids that come back; more than tracked
    check_attention_backward(3, 150, 4, 2, 8, 3, 200); // shared prefixes
    // groups of three query heads and one group of three (MQA): each head's dk and dv
    // are added to its group's in order after every task, whole rows checked
    check_attention_backward(1, 40, 6, 2, 8, 3, 100000);
    check_attention_backward(2, 21, 3, 1, 8, 1, 100000);
}

/* Results do not depend on the number of threads (bit for bit). */
static void test_attention_deterministic(void **state) {
    (void)state;
    uint64_t rng = 12;
    const int B = 2, T = 100, H = 6, KVH = 2, D = 40; // groups of three query heads
    int32_t *seg = make_segments(B, T, 1);
    size_t nq = (size_t)B * T * H * D, nk = (size_t)B * T * KVH * D, nl = (size_t)B * H * T;
    float *q = frand(nq, &rng, -1, 1), *k = frand(nk, &rng, -1, 1), *v = frand(nk, &rng, -1, 1);
    float *dout = frand(nq, &rng, -1, 1);
    float *o[2], *l[2], *dq[2], *dk[2], *dv[2];
    void *work = be.ops->alloc(&be, cpu_attention_work_bytes(B, T, H, KVH, D, 3));
    for (int r = 0; r < 2; r++) {
        int threads = r == 0 ? 1 : 3;
        o[r] = fbuf(nq), l[r] = fbuf(nl), dq[r] = fbuf(nq), dk[r] = fbuf(nk), dv[r] = fbuf(nk);
        cpu_attention_forward(o[r], l[r], q, k, v, seg, B, T, H, KVH, D, 0.25f, work, threads);
        cpu_attention_backward(dq[r], dk[r], dv[r], dout, o[r], l[r], q, k, v, seg, B, T, H, KVH, D,
                               0.25f, work, threads);
    }
    assert_memory_equal(o[0], o[1], nq * sizeof(float));
    assert_memory_equal(l[0], l[1], nl * sizeof(float));
    assert_memory_equal(dq[0], dq[1], nq * sizeof(float));
    assert_memory_equal(dk[0], dk[1], nk * sizeof(float));
    assert_memory_equal(dv[0], dv[1], nk * sizeof(float));
    for (int r = 0; r < 2; r++) free(o[r]), free(l[r]), free(dq[r]), free(dk[r]), free(dv[r]);
    free(q), free(k), free(v), free(dout), free(seg);
    be.ops->free(&be, work);
}

/* ---- SwiGLU -------------------------------------------------------------- */

struct swiglu_ctx {
    float *gate, *up, *out, *R;
    size_t n;
};

static double swiglu_loss(void *p) {
    struct swiglu_ctx *c = p;
    be.ops->swiglu_forward(&be, c->out, c->gate, c->up, c->n);
    return dot_d(c->out, c->R, c->n);
}

static void test_swiglu(void **state) {
    (void)state;
    uint64_t rng = 13;
    struct swiglu_ctx c = {.n = 1100}; // three chunks of the sigmoid
    c.gate = frand(c.n, &rng, -6, 6);
    c.up = frand(c.n, &rng, -2, 2);
    c.out = fnan(c.n);
    c.R = frand(c.n, &rng, -1, 1);
    swiglu_loss(&c);
    for (size_t i = 0; i < c.n; i++) {
        double g = c.gate[i], ref = g / (1.0 + exp(-g)) * c.up[i];
        assert_true(fabs(c.out[i] - ref) <= 1e-6 * (1.0 + fabs(ref)));
    }
    float *dgate = fnan(c.n), *dup = fnan(c.n);
    be.ops->swiglu_backward(&be, dgate, dup, c.R, c.gate, c.up, c.n);
    assert_true(fd_check("swiglu dgate", c.gate, c.n, dgate, swiglu_loss, &c, 1e-2f, 1000, &rng) <
                FD_TOL);
    assert_true(fd_check("swiglu dup", c.up, c.n, dup, swiglu_loss, &c, 1e-2f, 1000, &rng) <
                FD_TOL_LINEAR);
    free(c.gate), free(c.up), free(c.out), free(c.R), free(dgate), free(dup);
}

/* ---- cross-entropy ------------------------------------------------------- */

enum { CE_N = 6, CE_V = 11, CE_IGNORE = -100 };
static const int32_t ce_targets[CE_N] = {3, CE_IGNORE, 0, 10, -1, 3};

static void test_cross_entropy_forward(void **state) {
    (void)state;
    uint64_t rng = 14;
    float *logits = frand(CE_N * CE_V, &rng, -4, 4);
    logits[2 * CE_V + 5] = 80.0f; // large logits stay finite (the row max is subtracted)
    float *losses = fnan(CE_N);
    be.ops->cross_entropy_forward(&be, losses, logits, ce_targets, CE_N, CE_V, CE_IGNORE);
    double ref[CE_N], got[CE_N];
    for (int i = 0; i < CE_N; i++) {
        got[i] = losses[i];
        ref[i] = 0.0;
        if (ce_targets[i] < 0) continue;
        const float *x = logits + i * CE_V;
        double mx = -INFINITY, sum = 0.0;
        for (int j = 0; j < CE_V; j++) mx = x[j] > mx ? x[j] : mx;
        for (int j = 0; j < CE_V; j++) sum += exp(x[j] - mx);
        ref[i] = mx + log(sum) - x[ce_targets[i]];
    }
    double err = mt_test_rel_err_d(got, ref, CE_N);
    printf("  cross-entropy forward rel err %.2e\n", err);
    assert_true(err < 1e-6);
    assert_true(losses[1] == 0.0f && losses[4] == 0.0f);
    // a NaN in a row gives a NaN loss (for the trainer to report), not a crash
    logits[0 * CE_V + 2] = NAN;
    be.ops->cross_entropy_forward(&be, losses, logits, ce_targets, CE_N, CE_V, CE_IGNORE);
    assert_true(isnan(losses[0]) && !isnan(losses[2]));
    logits[0 * CE_V + 2] = 0.0f;
    // a custom ignore_index is ignored too
    be.ops->cross_entropy_forward(&be, losses, logits, ce_targets, CE_N, CE_V, 3);
    assert_true(losses[0] == 0.0f && losses[5] == 0.0f && losses[2] > 0.0f);
    free(logits), free(losses);
}

struct ce_ctx {
    float *logits, *losses;
    float dloss;
};

static double ce_loss(void *p) {
    struct ce_ctx *c = p;
    be.ops->cross_entropy_forward(&be, c->losses, c->logits, ce_targets, CE_N, CE_V, CE_IGNORE);
    double s = 0.0;
    for (int i = 0; i < CE_N; i++) s += c->losses[i];
    return c->dloss * s;
}

static void test_cross_entropy_backward(void **state) {
    (void)state;
    uint64_t rng = 15;
    struct ce_ctx c = {.dloss = 0.37f};
    c.logits = frand(CE_N * CE_V, &rng, -3, 3);
    c.losses = fbuf(CE_N);
    float *dlogits = fnan(CE_N * CE_V);
    be.ops->cross_entropy_backward(&be, dlogits, c.logits, ce_targets, CE_N, CE_V, CE_IGNORE,
                                   c.dloss);
    for (int j = 0; j < CE_V; j++) {
        assert_true(dlogits[1 * CE_V + j] == 0.0f);
        assert_true(dlogits[4 * CE_V + j] == 0.0f);
    }
    assert_true(fd_check("cross-entropy dlogits", c.logits, CE_N * CE_V, dlogits, ce_loss, &c,
                         1e-2f, 1000, &rng) < FD_TOL);
    // in place gives the same bits
    float *inplace = fcopy(c.logits, CE_N * CE_V);
    be.ops->cross_entropy_backward(&be, inplace, inplace, ce_targets, CE_N, CE_V, CE_IGNORE,
                                   c.dloss);
    assert_memory_equal(inplace, dlogits, CE_N * CE_V * sizeof(float));
    // a custom ignore_index zeroes its rows (targets 3: rows 0 and 5), negative ones still ignored
    be.ops->cross_entropy_backward(&be, dlogits, c.logits, ce_targets, CE_N, CE_V, 3, c.dloss);
    for (int j = 0; j < CE_V; j++) {
        assert_true(dlogits[0 * CE_V + j] == 0.0f && dlogits[5 * CE_V + j] == 0.0f);
        assert_true(dlogits[1 * CE_V + j] == 0.0f && dlogits[4 * CE_V + j] == 0.0f);
    }
    assert_true(dlogits[2 * CE_V + 0] < 0.0f); // row 2's target 0 still has its gradient
    free(c.logits), free(c.losses), free(dlogits), free(inplace);
}

/* A vocabulary over several exp chunks, against a double softmax. */
static void test_cross_entropy_large_vocab(void **state) {
    (void)state;
    uint64_t rng = 18;
    enum { N = 3, V = 1300 };
    static const int32_t targets[N] = {1299, 0, 517};
    float *logits = frand(N * V, &rng, -8, 8);
    float *losses = fnan(N), *dlogits = fnan(N * V);
    const float dloss = 1.0f / 3.0f;
    be.ops->cross_entropy_forward(&be, losses, logits, targets, N, V, -100);
    be.ops->cross_entropy_backward(&be, dlogits, logits, targets, N, V, -100, dloss);
    double lref[N], lgot[N];
    double *dref = malloc(N * V * sizeof(double)), *dgot = malloc(N * V * sizeof(double));
    assert_non_null(dref);
    assert_non_null(dgot);
    for (int i = 0; i < N; i++) {
        const float *x = logits + i * V;
        double mx = -INFINITY, sum = 0.0;
        for (int j = 0; j < V; j++) mx = x[j] > mx ? x[j] : mx;
        for (int j = 0; j < V; j++) sum += exp(x[j] - mx);
        lref[i] = mx + log(sum) - x[targets[i]];
        lgot[i] = losses[i];
        for (int j = 0; j < V; j++) {
            dref[i * V + j] = dloss * (exp(x[j] - mx) / sum - (j == targets[i]));
            dgot[i * V + j] = dlogits[i * V + j];
        }
    }
    double el = mt_test_rel_err_d(lgot, lref, N), ed = mt_test_rel_err_d(dgot, dref, N * V);
    printf("  cross-entropy V=%d: loss rel err %.2e, dlogits %.2e\n", V, el, ed);
    assert_true(el < 1e-6);
    assert_true(ed < 1e-6);
    free(logits), free(losses), free(dlogits), free(dref), free(dgot);
}

/* The vectorised exp against exp in double; masked (-inf) and very negative give 0. */
static void test_exp_shifted(void **state) {
    (void)state;
    enum { N = 100001 };
    float *x = fbuf(N), *y = fbuf(N);
    for (int i = 0; i < N; i++) x[i] = -86.0f + 87.0f * (float)i / (N - 1); // shifted: [-86.5, 0.5]
    float sum = cpu_exp_shifted(y, x, 0.5f, N);
    double max_rel = 0.0, ref_sum = 0.0;
    for (int i = 0; i < N; i++) {
        double ref = exp((double)(x[i] - 0.5f)); // the kernel subtracts in float too
        ref_sum += ref;
        double rel = fabs(y[i] - ref) / ref;
        if (rel > max_rel) max_rel = rel;
    }
    printf("  exp max rel err %.2e, sum rel err %.2e\n", max_rel, fabs(sum - ref_sum) / ref_sum);
    assert_true(max_rel < 3e-7);
    assert_true(fabs(sum - ref_sum) / ref_sum < 1e-5);
    float special[5] = {-INFINITY, -200.0f, 0.0f, 1.0f, NAN};
    cpu_exp_shifted(special, special, 1.0f, 5); // in place
    assert_true(special[0] == 0.0f && special[1] == 0.0f);
    assert_true(fabsf(special[2] - expf(-1.0f)) < 1e-7f && special[3] == 1.0f);
    assert_true(isnan(special[4])); // a NaN stays visible
    // the AVX2 kernel against the scalar loop: the same elements (where CPU_MADD fuses,
    // as the vector loop does), the sum within rounding, at every tail length, with
    // clamped, masked and NaN inputs among them
    const int had_avx2 = cpu_exp_use_avx2(1);
    if (cpu_exp_use_avx2(1)) {
        float *ys = fbuf(N);
        uint64_t rng = 5;
        for (int i = 0; i < 64; i++) x[i] = mt_test_rand_uniform(&rng, -100.0f, 1.0f);
        x[3] = -INFINITY, x[12] = NAN, x[21] = -87.0f, x[30] = -86.99f;
        for (int n = 0; n <= 64; n++) {
            float sv = cpu_exp_shifted(y, x, 0.25f, n);
            cpu_exp_use_avx2(0);
            float ss = cpu_exp_shifted(ys, x, 0.25f, n);
            cpu_exp_use_avx2(1);
            for (int i = 0; i < n; i++) {
#ifdef FP_FAST_FMAF
                assert_memory_equal(&y[i], &ys[i], sizeof(float));
#else
                assert_true(isnan(ys[i]) ? isnan(y[i]) : fabsf(y[i] - ys[i]) <= 1e-6f * ys[i]);
#endif
            }
            if (n > 12) assert_true(isnan(sv) && isnan(ss));
            else assert_true(fabsf(sv - ss) <= 1e-6f * ss);
        }
        free(ys);
    } else {
        printf("  exp: this CPU has no AVX2 and FMA; the scalar loop only\n");
    }
    cpu_exp_use_avx2(had_avx2);
    // cpu_max over the 32 lanes and the tail
    for (int i = 0; i < 100; i++) x[i] = (float)-i;
    assert_true(cpu_max(x, 100) == 0.0f);
    x[37] = 5.0f;
    assert_true(cpu_max(x, 100) == 5.0f);
    x[97] = 6.0f;
    assert_true(cpu_max(x, 100) == 6.0f);
    assert_true(cpu_max(x, 0) == -INFINITY);
    free(x), free(y);
}

/* ---- reductions ---------------------------------------------------------- */

static void test_sum_squares(void **state) {
    (void)state;
    uint64_t rng = 16;
    size_t sizes[] = {0, 1, 1000, 3000001};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        size_t n = sizes[k];
        float *x = frand(n, &rng, -1, 1);
        long double ref = 0.0L;
        for (size_t i = 0; i < n; i++) ref += (long double)x[i] * x[i];
        double got = be.ops->sum_squares(&be, x, n);
        assert_true(fabs(got - (double)ref) <= 1e-12 * (1.0 + (double)ref));
        free(x);
    }
}

/* Parameter-gradient reductions give the same bits with 1 thread as with many. */
static void test_reductions_deterministic(void **state) {
    (void)state;
    uint64_t rng = 17;
    const int N = 300, C = 700;
    float *dout = frand((size_t)N * C, &rng, -1, 1), *x = frand((size_t)N * C, &rng, -1, 1);
    float *w = frand(C, &rng, -1, 1), *rstd = frand(N, &rng, 0.5f, 1.5f);
    int32_t *tok = malloc(N * sizeof(int32_t));
    assert_non_null(tok);
    for (int i = 0; i < N; i++) tok[i] = (int32_t)(mt_test_rand_u64(&rng) % 13);
    float *dw[2], *db[2], *dt[2];
    double ss[2];
    int saved = omp_get_max_threads();
    for (int r = 0; r < 2; r++) {
        omp_set_num_threads(r == 0 ? 1 : 3);
        dw[r] = calloc(C, sizeof(float)), db[r] = calloc(C, sizeof(float));
        dt[r] = calloc((size_t)13 * C, sizeof(float));
        float *dx = calloc((size_t)N * C, sizeof(float));
        assert_non_null(dw[r]), assert_non_null(db[r]), assert_non_null(dt[r]), assert_non_null(dx);
        cpu_rmsnorm_backward(dx, dw[r], dout, x, w, rstd, N, C);
        cpu_bias_backward(db[r], dout, N, C);
        cpu_embedding_backward(dt[r], dout, tok, N, C);
        ss[r] = cpu_sum_squares(dout, (size_t)N * C);
        free(dx);
    }
    omp_set_num_threads(saved);
    assert_memory_equal(dw[0], dw[1], C * sizeof(float));
    assert_memory_equal(db[0], db[1], C * sizeof(float));
    assert_memory_equal(dt[0], dt[1], (size_t)13 * C * sizeof(float));
    assert_true(ss[0] == ss[1]);
    for (int r = 0; r < 2; r++) free(dw[r]), free(db[r]), free(dt[r]);
    free(dout), free(x), free(w), free(rstd), free(tok);
}

/* ---- plugin ABI 2 -------------------------------------------------------- *
 * The naive loops below are the formulas the plugins ran on host memory before ABI 2
 * (adamw.c, lion.c, lora.c's dropout, cross_entropy.c's rows, qlora.c's decoder). The
 * backend must give the same floats, so the elementwise ops, dropout and the decoder
 * are compared bit for bit; the softmax rows, which sum in double, against a double
 * reference. Sizes 1 and 7 take the serial path, 1000003 (odd, above PAR_MIN) the
 * OpenMP one. */

static const size_t abi2_sizes[] = {1, 7, 1000003};

/* Bitwise equality, except that any NaN equals any NaN. Names the first mismatch. */
static void assert_same_floats(const char *what, size_t n_case, const float *got,
                               const float *want, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (isnan(got[i]) && isnan(want[i])) continue;
        if (memcmp(&got[i], &want[i], sizeof(float)) != 0) {
            fail_msg("%s (n=%zu): element %zu is %.9g, want %.9g", what, n_case, i,
                     (double)got[i], (double)want[i]);
        }
    }
}

/* x (n) with special values planted at fixed places when n allows: NaN, +0, -0, +inf. */
static void plant_specials(float *x, size_t n, size_t phase) {
    const float special[4] = {NAN, 0.0f, -0.0f, INFINITY};
    for (size_t k = 0; k < 4; k++)
        if (k * 3 + phase < n) x[k * 3 + phase] = special[k];
}

static void test_abi2_elementwise(void **state) {
    (void)state;
    uint64_t rng = 21;
    for (size_t k = 0; k < sizeof abi2_sizes / sizeof abi2_sizes[0]; k++) {
        size_t n = abi2_sizes[k];
        float *x = frand(n, &rng, -2, 2), *y0 = frand(n, &rng, -2, 2);
        float *a = frand(n, &rng, -1, 1), *b = frand(n, &rng, 0, 3); // b >= 0: sqrt(b)
        float *y = fbuf(n), *want = fbuf(n);

        // fill
        be.ops->fill(&be, y, -3.25f, n);
        for (size_t i = 0; i < n; i++) want[i] = -3.25f;
        assert_same_floats("fill", n, y, want, n);

        // axpby, beta != 0, then beta == 0 over NaN (which must not survive)
        memcpy(y, y0, n * sizeof(float));
        be.ops->axpby(&be, y, 0.7f, x, -1.3f, n);
        for (size_t i = 0; i < n; i++) want[i] = 0.7f * x[i] + -1.3f * y0[i];
        assert_same_floats("axpby", n, y, want, n);
        for (size_t i = 0; i < n; i++) y[i] = NAN;
        be.ops->axpby(&be, y, 0.7f, x, 0.0f, n);
        for (size_t i = 0; i < n; i++) want[i] = 0.7f * x[i];
        assert_same_floats("axpby beta=0", n, y, want, n);

        // lerp, both of torch's forms, and the exact ends
        const float ws[] = {0.1f, -0.3f, 0.5f, 0.9f, 1.0f, 0.0f}; // 0.5: the second form
        for (size_t wi = 0; wi < sizeof ws / sizeof ws[0]; wi++) {
            const float w = ws[wi];
            memcpy(y, y0, n * sizeof(float));
            be.ops->lerp(&be, y, x, w, n);
            for (size_t i = 0; i < n; i++)
                want[i] = fabsf(w) < 0.5f ? y0[i] + w * (x[i] - y0[i])
                                          : x[i] - (x[i] - y0[i]) * (1.0f - w);
            assert_same_floats("lerp", n, y, want, n);
            if (w == 1.0f) assert_same_floats("lerp w=1 is x", n, y, x, n);
            if (w == 0.0f) assert_same_floats("lerp w=0 is y", n, y, y0, n);
        }

        // addcmul: Adam's v * b2 + w2 * g * g, with a and b the same array too
        memcpy(y, y0, n * sizeof(float));
        be.ops->addcmul(&be, y, 0.999f, 0.001f, a, x, n);
        for (size_t i = 0; i < n; i++) want[i] = y0[i] * 0.999f + 0.001f * a[i] * x[i];
        assert_same_floats("addcmul", n, y, want, n);
        memcpy(y, y0, n * sizeof(float));
        be.ops->addcmul(&be, y, 0.999f, 0.001f, a, a, n);
        for (size_t i = 0; i < n; i++) want[i] = y0[i] * 0.999f + 0.001f * a[i] * a[i];
        assert_same_floats("addcmul a*a", n, y, want, n);

        // addcdiv_sqrt: Adam's p + (-lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
        memcpy(y, y0, n * sizeof(float));
        be.ops->addcdiv_sqrt(&be, y, -1e-3f, a, b, 0.0316f, 1e-8f, n);
        for (size_t i = 0; i < n; i++) want[i] = y0[i] + -1e-3f * a[i] / (sqrtf(b[i]) / 0.0316f + 1e-8f);
        assert_same_floats("addcdiv_sqrt", n, y, want, n);

        // maximum: NaN in x or y propagates
        float *xs = fcopy(x, n), *ys = fcopy(y0, n);
        plant_specials(xs, n, 0);
        plant_specials(ys, n, 1);
        memcpy(y, ys, n * sizeof(float));
        be.ops->maximum(&be, y, xs, n);
        for (size_t i = 0; i < n; i++) want[i] = (xs[i] > ys[i] || isnan(xs[i])) ? xs[i] : ys[i];
        assert_same_floats("maximum", n, y, want, n);
        for (size_t i = 0; i < n; i++)
            if (isnan(xs[i]) || isnan(ys[i])) assert_true(isnan(y[i]));

        // add_sign: sign(±0) = 0, sign(NaN) = NaN (Lion's update)
        memcpy(y, y0, n * sizeof(float));
        be.ops->add_sign(&be, y, -0.01f, xs, n);
        for (size_t i = 0; i < n; i++) {
            float sg = isnan(xs[i]) ? xs[i] : xs[i] > 0.0f ? 1.0f : xs[i] < 0.0f ? -1.0f : 0.0f;
            want[i] = y0[i] + -0.01f * sg;
        }
        assert_same_floats("add_sign", n, y, want, n);
        if (n > 9) { // planted: xs[0] NaN, xs[3] +0, xs[6] -0, xs[9] +inf
            assert_true(isnan(y[0]));
            assert_true(y[3] == y0[3] && y[6] == y0[6]);
            assert_true(y[9] == y0[9] - 0.01f);
        }

        // mul
        memcpy(y, y0, n * sizeof(float));
        be.ops->mul(&be, y, x, n);
        for (size_t i = 0; i < n; i++) want[i] = y0[i] * x[i];
        assert_same_floats("mul", n, y, want, n);

        // copy (bytes, any dtype)
        be.ops->copy(&be, y, x, n * sizeof(float));
        assert_memory_equal(y, x, n * sizeof(float));

        free(x), free(y0), free(a), free(b), free(y), free(want), free(xs), free(ys);
    }
}

static void test_abi2_dropout(void **state) {
    (void)state;
    uint64_t rng = 22;
    const uint64_t seed = 0x5EED5EEDull, counter0 = 123456789;
    for (size_t k = 0; k < sizeof abi2_sizes / sizeof abi2_sizes[0]; k++) {
        size_t n = abi2_sizes[k];
        float *x = frand(n, &rng, -2, 2), *y0 = frand(n, &rng, -2, 2);
        float *y = fbuf(n), *want = fbuf(n);
        const float p = 0.3f, keep_scale = 1.0f / (1.0f - p);
        size_t kept = 0;
        for (size_t i = 0; i < n; i++) {
            int keep = mt_random_uniform(seed, counter0 + i) >= p;
            kept += keep;
            want[i] = keep ? x[i] * keep_scale : 0.0f;
        }
        for (size_t i = 0; i < n; i++) y[i] = NAN; // "=" overwrites every element
        be.ops->dropout(&be, y, x, p, seed, counter0, 0, n);
        assert_same_floats("dropout", n, y, want, n);
        if (n > 100000) { // the stream is uniform: 70% kept, within 6 standard deviations
            double frac = (double)kept / (double)n;
            printf("  dropout p=0.3 kept %.5f of %zu\n", frac, n);
            assert_true(fabs(frac - 0.7) < 6.0 * sqrt(0.21 / (double)n));
        }

        // accumulate: y0 plus the kept elements; a dropped element is left as it was
        memcpy(y, y0, n * sizeof(float));
        be.ops->dropout(&be, y, x, p, seed, counter0, 1, n);
        for (size_t i = 0; i < n; i++)
            want[i] = mt_random_uniform(seed, counter0 + i) >= p ? y0[i] + x[i] * keep_scale : y0[i];
        assert_same_floats("dropout accumulate", n, y, want, n);

        // the mask is keyed by the element's counter: two calls over a split draw the same
        if (n > 1) {
            size_t h = n / 2;
            float *y2 = fbuf(n);
            be.ops->dropout(&be, y, x, p, seed, counter0, 0, n);
            be.ops->dropout(&be, y2, x, p, seed, counter0, 0, h);
            be.ops->dropout(&be, y2 + h, x + h, p, seed, counter0 + h, 0, n - h);
            assert_same_floats("dropout split", n, y2, y, n);
            free(y2);
        }

        // u == p keeps the element (>=): p set to the draw of element n/2
        const float p_edge = mt_random_uniform(seed, counter0 + n / 2);
        be.ops->dropout(&be, y, x, p_edge, seed, counter0, 0, n);
        assert_true(y[n / 2] == x[n / 2] * (1.0f / (1.0f - p_edge)));
        memcpy(y, y0, n * sizeof(float));
        be.ops->dropout(&be, y, x, p_edge, seed, counter0, 1, n);
        assert_true(y[n / 2] == y0[n / 2] + x[n / 2] * (1.0f / (1.0f - p_edge)));

        // p = 0 keeps everything, scaled by exactly 1
        be.ops->dropout(&be, y, x, 0.0f, seed, counter0, 0, n);
        assert_same_floats("dropout p=0", n, y, x, n);
        free(x), free(y0), free(y), free(want);
    }
}

/* targets of the softmax tests: in range, skipped (< 0) and none (>= V: statistics only) */
static int32_t softmax_target(int r, int V) {
    switch (r % 5) {
    case 0: return -1;
    case 1: return V; // no target: at or past the vocabulary
    case 2: return 0;
    case 3: return V - 1;
    default: return (int32_t)((r * 7919) % V);
    }
}

static float *softmax_logits(int n, int V, uint64_t *rng) {
    float *x = frand((size_t)n * V, rng, -20, 20);
    // one row far from 0 and one with a dominant entry: only a max shift keeps exp finite
    for (int j = 0; j < V; j++) x[(size_t)1 * V + j] += 1000.0f;
    x[(size_t)2 * V + V / 2] = 200.0f;
    return x;
}

static void test_abi2_softmax_stats(void **state) {
    (void)state;
    uint64_t rng = 23;
    const int n = 41, V = 1001; // n * V above PAR_MIN: rows in parallel
    float *x = softmax_logits(n, V, &rng);
    int32_t *t = malloc(n * sizeof(int32_t));
    assert_non_null(t);
    for (int r = 0; r < n; r++) t[r] = softmax_target(r, V);
    float *lse = fnan(n), *tl = fnan(n), *ml = fnan(n);
    be.ops->softmax_stats(&be, lse, tl, ml, x, t, n, V);
    double max_err_lse = 0.0, max_err_mean = 0.0;
    for (int r = 0; r < n; r++) {
        const float *xr = x + (size_t)r * V;
        if (t[r] < 0) { // skipped: zeros, whatever the logits
            assert_true(lse[r] == 0.0f && tl[r] == 0.0f && ml[r] == 0.0f);
            continue;
        }
        double m = -INFINITY, sum = 0.0, sx = 0.0;
        for (int j = 0; j < V; j++) m = xr[j] > m ? xr[j] : m;
        for (int j = 0; j < V; j++) sum += exp((double)xr[j] - m), sx += xr[j];
        double ref_lse = m + log(sum), ref_mean = sx / V;
        double e1 = fabs(lse[r] - ref_lse) / fmax(1.0, fabs(ref_lse));
        double e2 = fabs(ml[r] - ref_mean) / fmax(1.0, fabs(ref_mean));
        max_err_lse = e1 > max_err_lse ? e1 : max_err_lse;
        max_err_mean = e2 > max_err_mean ? e2 : max_err_mean;
        float want_tl = t[r] < V ? xr[t[r]] : 0.0f;
        assert_true(tl[r] == want_tl);
    }
    printf("  softmax_stats rel err: lse %.2e, mean %.2e\n", max_err_lse, max_err_mean);
    assert_true(max_err_lse < 2e-7); // float storage of a double result: 6e-8
    assert_true(max_err_mean < 2e-7);
    assert_true(fabs(lse[1] - 1000.0f) < 30.0f); // the shifted row stayed finite

    // the optional outputs may be NULL; lse does not change, and one thread gives the same
    float *lse2 = fnan(n);
    int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    be.ops->softmax_stats(&be, lse2, NULL, NULL, x, t, n, V);
    omp_set_num_threads(saved);
    assert_memory_equal(lse2, lse, n * sizeof(float));
    free(x), free(t), free(lse), free(tl), free(ml), free(lse2);
}

static void test_abi2_softmax_backward(void **state) {
    (void)state;
    uint64_t rng = 24;
    const int n = 41, V = 1001;
    float *x = softmax_logits(n, V, &rng);
    int32_t *t = malloc(n * sizeof(int32_t));
    assert_non_null(t);
    for (int r = 0; r < n; r++) t[r] = softmax_target(r, V);
    float *coefs = frand((size_t)n * 3, &rng, -2, 2), *lse = fbuf(n);
    // lse from a double naive, so this test does not lean on softmax_stats
    for (int r = 0; r < n; r++) {
        const float *xr = x + (size_t)r * V;
        double m = -INFINITY, sum = 0.0;
        for (int j = 0; j < V; j++) m = xr[j] > m ? xr[j] : m;
        for (int j = 0; j < V; j++) sum += exp((double)xr[j] - m);
        lse[r] = (float)(m + log(sum));
    }
    float *want = fbuf((size_t)n * V), *got = fcopy(x, (size_t)n * V);
    for (int r = 0; r < n; r++) {
        const double c0 = coefs[3 * r], c1 = coefs[3 * r + 1], c2 = coefs[3 * r + 2];
        for (int j = 0; j < V; j++) {
            double p = exp((double)x[(size_t)r * V + j] - (double)lse[r]);
            // a skipped row (t < 0) has no gradient
            want[(size_t)r * V + j] = t[r] < 0 ? 0.0f : (float)(c0 * p + c1 + (j == t[r] ? c2 : 0.0));
        }
    }
    be.ops->softmax_backward(&be, got, lse, t, coefs, n, V);
    double err = mt_test_rel_err(got, want, (size_t)n * V);
    printf("  softmax_backward rel err %.2e\n", err);
    assert_true(err < 1e-6);
    // rows without a target carry no c2 anywhere, in particular not in the next row's
    // first element (a target of V would land there): every element within float rounding
    for (size_t i = 0; i < (size_t)n * V; i++)
        assert_true(fabs(got[i] - want[i]) <= 1e-6 * fmax(1.0, fabs(want[i])));
    free(x), free(t), free(coefs), free(lse), free(want), free(got);
}

/* A confident target: p near 1, coefficients (1, 0, -1) as cross-entropy's, so its
 * gradient p - 1 is a small difference of large terms; every other entry is p itself.
 * Held to 1e-5 of itself: p rounded to float first would be off by about 6e-4. The
 * others within 4e-6 of p: their exponent x - lse, about -24, is rounded to float
 * (2^-24 of 24, 1.4e-6), as in PyTorch's float softmax. */
static void test_softmax_backward_confident_target(void **state) {
    (void)state;
    uint64_t rng = 25;
    const int V = 1001, t = 321;
    float *x = frand(V, &rng, -5, 5);
    x[t] = 19.0f; // the other entries' share, 1 - p, is about 1e-4
    double m = x[t], sum = 0.0;
    for (int j = 0; j < V; j++) sum += exp((double)x[j] - m);
    float lse = (float)(m + log(sum));
    const float coefs[3] = {1.0f, 0.0f, -1.0f};
    float *got = fcopy(x, V);
    be.ops->softmax_backward(&be, got, &lse, &t, coefs, 1, V);
    const double want_t = exp((double)x[t] - (double)lse) - 1.0;
    printf("  confident target: p - 1 = %.6e, got %.6e\n", want_t, got[t]);
    assert_true(want_t < -1e-5 && want_t > -1e-3);
    assert_true(fabs(got[t] - want_t) <= 1e-5 * fabs(want_t));
    for (int j = 0; j < V; j++) {
        if (j == t) continue;
        const double p = exp((double)x[j] - (double)lse);
        assert_true(fabs(got[j] - p) <= 4e-6 * p);
    }
    free(x), free(got);
}

/* An lse that is not these logits' (a plugin may pass its own): exponents above 1, one
 * past float's range. Every entry is what double exp gives, rounded: the overflow inf,
 * the rest exactly, not the 8-lane exp's wrapped exponent bits. */
static void test_softmax_backward_foreign_lse(void **state) {
    (void)state;
    uint64_t rng = 26;
    const int V = 64, t = 7;
    float *x = frand(V, &rng, -1, 1);
    x[5] = 100.0f; // exp(100) is 2.7e43, above FLT_MAX
    const float lse = 0.0f;
    const float coefs[3] = {1.0f, 0.0f, -1.0f};
    float *got = fcopy(x, V);
    be.ops->softmax_backward(&be, got, &lse, &t, coefs, 1, V);
    for (int j = 0; j < V; j++) {
        const float want = (float)(exp((double)x[j]) - (j == t ? 1.0 : 0.0));
        assert_true(got[j] == want);
    }
    assert_true(isinf(got[5]) && got[5] > 0);
    free(x), free(got);
}

/* The decoder of qlora.c's comment, one element at a time. */
static float dequant_naive(int64_t e, const uint8_t *codes, const uint8_t *absmax_q,
                           const float *absmax2, const float *table, float offset, int block,
                           int block2) {
    uint8_t byte = codes[e / 2];
    int code = e % 2 == 0 ? byte >> 4 : byte & 0x0F;
    int64_t b = e / block;
    float scale = table[16 + absmax_q[b]] * absmax2[b / block2];
    scale = scale + offset;
    return table[code] * scale;
}

static void check_dequant(int64_t first, int64_t n, int block, int block2, uint64_t *rng) {
    int64_t total = first + n, nb = (total + block - 1) / block, nb2 = (nb + block2 - 1) / block2;
    uint8_t *codes = malloc((size_t)(total + 1) / 2), *aq = malloc((size_t)nb);
    assert_non_null(codes);
    assert_non_null(aq);
    for (int64_t i = 0; i < (total + 1) / 2; i++) codes[i] = (uint8_t)mt_test_rand_u64(rng);
    for (int64_t i = 0; i < nb; i++) aq[i] = (uint8_t)mt_test_rand_u64(rng);
    float *a2 = frand((size_t)nb2, rng, 0.01f, 0.2f), *table = frand(16 + 256, rng, -1, 1);
    const float offset = 0.037f;
    float *got = fnan((size_t)n), *want = fbuf((size_t)n);
    for (int64_t i = 0; i < n; i++)
        want[i] = dequant_naive(first + i, codes, aq, a2, table, offset, block, block2);
    be.ops->dequantize_4bit(&be, got, codes, aq, a2, table, offset, first, n, block, block2);
    assert_same_floats("dequantize_4bit", (size_t)n, got, want, (size_t)n);
    free(codes), free(aq), free(a2), free(table), free(got), free(want);
}

static void test_abi2_dequantize_4bit(void **state) {
    (void)state;
    uint64_t rng = 25;
    // the layout by hand: byte 0x1F holds element 0 (code 1, high) and element 1 (code 15)
    uint8_t codes[1] = {0x1F}, aq[1] = {3};
    float table[16 + 256] = {0}, a2[1] = {2.0f}, out[2] = {0, 0};
    table[1] = 0.5f, table[15] = -1.0f, table[16 + 3] = 0.25f;
    be.ops->dequantize_4bit(&be, out, codes, aq, a2, table, 1.0f, 0, 2, 64, 256);
    assert_true(out[0] == 0.5f * (0.25f * 2.0f + 1.0f) && out[1] == -1.0f * 1.5f);
    be.ops->dequantize_4bit(&be, out, codes, aq, a2, table, 1.0f, 1, 1, 64, 256);
    assert_true(out[0] == -1.5f); // an odd first starts at a low nibble

    // bitsandbytes' blocks (64, 256) from an odd first that is no block boundary, odd n
    check_dequant(197, 1, 64, 256, &rng);
    check_dequant(197, 7, 64, 256, &rng);
    check_dequant(64 * 300 + 5, 1000003, 64, 256, &rng);
    check_dequant(0, 1000003, 64, 256, &rng);
    // sizes that divide nothing
    check_dequant(13, 1001, 5, 3, &rng);

    // the same bits with one thread as with several
    const int64_t first = 333, n = 200001;
    int64_t total = first + n, nb = (total + 63) / 64;
    uint8_t *c = malloc((size_t)(total + 1) / 2), *q = malloc((size_t)nb);
    assert_non_null(c);
    assert_non_null(q);
    for (int64_t i = 0; i < (total + 1) / 2; i++) c[i] = (uint8_t)mt_test_rand_u64(&rng);
    for (int64_t i = 0; i < nb; i++) q[i] = (uint8_t)mt_test_rand_u64(&rng);
    float *s2 = frand((size_t)(nb + 255) / 256, &rng, 0.01f, 0.2f), *tb = frand(272, &rng, -1, 1);
    float *o1 = fbuf((size_t)n), *o2 = fbuf((size_t)n);
    int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    be.ops->dequantize_4bit(&be, o1, c, q, s2, tb, 0.01f, first, n, 64, 256);
    omp_set_num_threads(3);
    be.ops->dequantize_4bit(&be, o2, c, q, s2, tb, 0.01f, first, n, 64, 256);
    omp_set_num_threads(saved);
    assert_memory_equal(o1, o2, (size_t)n * sizeof(float));
    free(c), free(q), free(s2), free(tb), free(o1), free(o2);
}

static int setup(void **state) {
    (void)state;
    mt_error err = {0};
    return mt_backend_cpu_init(&be, 0, &err) == MT_OK ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    mt_backend_cpu_shutdown(&be);
    return 0;
}

/* OpenBLAS kernels named for the CPU when the library chose those of CPUs without AVX2
 * (an OpenBLAS older than the CPU), and never otherwise. */
static void test_blas_core_choice(void **state) {
    (void)state;
    assert_string_equal(mt_cpu_blas_core_for("Prescott", 1, 1, 1), "Cooperlake");
    assert_string_equal(mt_cpu_blas_core_for("Prescott", 1, 1, 0), "SkylakeX");
    assert_string_equal(mt_cpu_blas_core_for("Sandybridge", 1, 0, 0), "Haswell");
    assert_null(mt_cpu_blas_core_for("Prescott", 0, 0, 0)); /* an SSE3 CPU keeps SSE3 */
    assert_null(mt_cpu_blas_core_for("Haswell", 1, 1, 1));  /* a core the library knows */
    assert_null(mt_cpu_blas_core_for("Zen", 1, 1, 0));
    assert_null(mt_cpu_blas_core_for(NULL, 1, 1, 1));
    assert_true(strlen(mt_cpu_blas_core()) > 0); /* the library names its kernels */
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0); // our lines and cmocka's in order when piped
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_memory),
        cmocka_unit_test(test_blas_core_choice),
        cmocka_unit_test(test_matmul_forward),
        cmocka_unit_test(test_matmul_rows),
        cmocka_unit_test(test_matmul_small),
        cmocka_unit_test(test_gemm_tile_bits),
        cmocka_unit_test(test_matmul_narrow),
        cmocka_unit_test(test_matmul_beta_zero_bits),
        cmocka_unit_test(test_matmul_int8),
        cmocka_unit_test(test_matmul_int8_small_codes),
        cmocka_unit_test(test_matmul_backward),
        cmocka_unit_test(test_bias),
        cmocka_unit_test(test_add_axpy),
        cmocka_unit_test(test_embedding),
        cmocka_unit_test(test_rmsnorm_forward),
        cmocka_unit_test(test_rmsnorm_backward),
        cmocka_unit_test(test_rope_forward),
        cmocka_unit_test(test_rope_backward),
        cmocka_unit_test(test_attention_forward),
        cmocka_unit_test(test_attention_backward),
        cmocka_unit_test(test_attention_deterministic),
        cmocka_unit_test(test_swiglu),
        cmocka_unit_test(test_cross_entropy_forward),
        cmocka_unit_test(test_cross_entropy_backward),
        cmocka_unit_test(test_cross_entropy_large_vocab),
        cmocka_unit_test(test_exp_shifted),
        cmocka_unit_test(test_sum_squares),
        cmocka_unit_test(test_reductions_deterministic),
        cmocka_unit_test(test_abi2_elementwise),
        cmocka_unit_test(test_abi2_dropout),
        cmocka_unit_test(test_abi2_softmax_stats),
        cmocka_unit_test(test_abi2_softmax_backward),
        cmocka_unit_test(test_softmax_backward_confident_target),
        cmocka_unit_test(test_softmax_backward_foreign_lse),
        cmocka_unit_test(test_abi2_dequantize_4bit),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
