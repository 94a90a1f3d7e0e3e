/* int8_kernel.c — the int8 weight product (cpu_matmul_int8) alone, against the bound of
 * the instructions it is built from, on this machine.
 *
 *   cc -O2 -fopenmp -mavx2 -mfma -Ikernels/cpu -Ikernels -Icore -Icore/include \
 *      tests/bench/int8_kernel.c build/libmoontune_static.a \
 *      -lopenblas -llua5.4 -ljansson -lpcre2-8 -lm -ldl -o /tmp/int8_kernel
 *   env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=1 /tmp/int8_kernel N K M
 *
 * Prints, for one thread: how many vpmaddubsw + vpaddw pairs (32 multiply-adds each) and
 * fp32 FMAs (8) the core retires per ns with 12 independent sums, so that neither is
 * bound by latency; then the best of 20 calls of cpu_matmul_int8 for M rows against an
 * N × K weight, first with weights on a Q4 grid (the copy has small codes: the
 * vpmaddubsw kernel on AVX2), then with weights on no grid (8-bit codes), in GOPS
 * (2 · N · K · M operations per call, the rows' quantisation included) and in
 * multiply-adds per ns. On OMP_NUM_THREADS threads for the products; the instruction
 * loops run on the calling thread only. */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>

#include "base/internal.h" /* mt_now_seconds */
#include "cpu_kernels.h"

#define CHAINS 12

/* vpmaddubsw + vpaddw pairs per ns on this thread */
static double pairs_per_ns(long iterations) {
    __m256i w = _mm256_set1_epi8(3), x = _mm256_set1_epi8(5), sums[CHAINS];
    for (int i = 0; i < CHAINS; i++) sums[i] = _mm256_setzero_si256();
    const double t0 = mt_now_seconds();
    for (long k = 0; k < iterations; k++) {
#pragma GCC unroll 12 /* CHAINS: the sums in registers */
        for (int i = 0; i < CHAINS; i++) sums[i] = _mm256_add_epi16(sums[i], _mm256_maddubs_epi16(w, x));
        __asm__ volatile("" : "+x"(w), "+x"(x)); /* keeps the products in the loop */
    }
    const double t = mt_now_seconds() - t0;
    __m256i all = sums[0];
    for (int i = 1; i < CHAINS; i++) all = _mm256_add_epi16(all, sums[i]);
    if (_mm256_extract_epi16(all, 0) == 1) puts(""); /* uses the sums */
    return (double)iterations * CHAINS / t / 1e9;
}

/* fp32 FMAs per ns on this thread */
static double fmas_per_ns(long iterations) {
    __m256 a = _mm256_set1_ps(1.0001f), b = _mm256_set1_ps(0.9999f), sums[CHAINS];
    for (int i = 0; i < CHAINS; i++) sums[i] = _mm256_setzero_ps();
    const double t0 = mt_now_seconds();
    for (long k = 0; k < iterations; k++) {
#pragma GCC unroll 12
        for (int i = 0; i < CHAINS; i++) sums[i] = _mm256_fmadd_ps(a, b, sums[i]);
        __asm__ volatile("" : "+x"(a), "+x"(b));
    }
    const double t = mt_now_seconds() - t0;
    __m256 all = sums[0];
    for (int i = 1; i < CHAINS; i++) all = _mm256_add_ps(all, sums[i]);
    if (_mm256_cvtss_f32(all) == 1.0f) puts("");
    return (double)iterations * CHAINS / t / 1e9;
}

/* the best of 20 calls, in seconds; -1 when the CPU declines the int8 copy */
static double time_product(const float *w, const float *x, float *c, int N, int K, int M,
                           int *small) {
    cpu_weight_int8 *q = cpu_weight_int8_create(w, N, K, 0);
    if (!q) return -1.0;
    *small = cpu_weight_int8_small_codes(q);
    double best = 1e30;
    for (int r = 0; r < 21; r++) {
        const double t0 = mt_now_seconds();
        if (cpu_matmul_int8(c, x, q, M, 0, 0)) {
            cpu_weight_int8_free(q);
            return -1.0;
        }
        const double t = mt_now_seconds() - t0;
        if (r > 0 && t < best) best = t; /* the first call warms the caches */
    }
    cpu_weight_int8_free(q);
    return best;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s N K M   (an N x K weight, M input rows)\n", argv[0]);
        return 2;
    }
    const int N = atoi(argv[1]), K = atoi(argv[2]), M = atoi(argv[3]);
    if (N <= 0 || K <= 0 || M <= 0) {
        fprintf(stderr, "%s: N, K and M must be positive\n", argv[0]);
        return 2;
    }
    const double pairs = pairs_per_ns(200000000L), fmas = fmas_per_ns(200000000L);
    printf("one thread: vpmaddubsw + vpaddw %.2f per ns (%.1f multiply-adds per ns), "
           "fp32 FMA %.2f per ns (%.1f multiply-adds per ns)\n",
           pairs, 32 * pairs, fmas, 8 * fmas);

    float *w = malloc(sizeof(float) * (size_t)N * K), *x = malloc(sizeof(float) * (size_t)M * K),
          *c = malloc(sizeof(float) * (size_t)M * N);
    if (!w || !x || !c) {
        fprintf(stderr, "%s: out of memory\n", argv[0]);
        return 1;
    }
    srand(1);
    for (size_t i = 0; i < (size_t)M * K; i++) x[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    for (int grid = 1; grid >= 0; grid--) {
        /* a Q4 grid: each group of 32 weights min + d · j, j in 0..15 */
        for (int n = 0; n < N; n++)
            for (int k0 = 0; k0 < K; k0 += 32) {
                const float d = 0.01f + 0.001f * (float)(rand() % 10), mn = -8.0f * d;
                for (int k = k0; k < K && k < k0 + 32; k++)
                    w[(size_t)n * K + k] = grid ? mn + d * (float)(rand() % 16)
                                                : (float)rand() / (float)RAND_MAX - 0.5f;
            }
        int small = 0;
        const double t = time_product(w, x, c, N, K, M, &small);
        if (t < 0) {
            printf("cpu_matmul_int8: this CPU has no int8 kernel\n");
            break;
        }
        const double macs = (double)N * K * M;
        printf("cpu_matmul_int8 %d x %d, %d rows, %s codes: %.3f ms, %.1f GOPS, %.1f multiply-adds per ns\n",
               N, K, M, small ? "small (Q4 grid)" : "8-bit", 1e3 * t, 2 * macs / t / 1e9, macs / t / 1e9);
    }
    free(w), free(x), free(c);
    return 0;
}
