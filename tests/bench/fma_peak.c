/* fma_peak.c — this machine's fp32 multiply-add rate: the bound against which sgemm's
 * and the evaluations' GFLOP/s are read ("The quickstart's accuracy over seeds, and
 * what is left of its time" in docs/speed.md). Each thread runs 12 independent chains
 * of 8-lane FMAs (enough to hide the FMA's latency on two pipes), on 1 thread and then
 * on every thread OpenMP gives.
 *
 *   cc -O2 -fopenmp tests/bench/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
 */
#define _POSIX_C_SOURCE 199309L /* clock_gettime */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <time.h>

#define CHAINS 12
#define ITERS 200000000L

static double now_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* The chains' sum, so that the compiler keeps every FMA. */
__attribute__((target("avx2,fma"))) static float fma_chains(long iters, float seed) {
    __m256 acc[CHAINS];
    const __m256 mul = _mm256_set1_ps(0.999999f), add = _mm256_set1_ps(1e-7f);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_set1_ps(seed + (float)i);
    for (long it = 0; it < iters; it++) {
#pragma GCC unroll 12
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_fmadd_ps(acc[i], mul, add);
    }
    __m256 sum = acc[0];
    for (int i = 1; i < CHAINS; i++) sum = _mm256_add_ps(sum, acc[i]);
    float lanes[8];
    _mm256_storeu_ps(lanes, sum);
    return lanes[0];
}

int main(void) {
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
        fprintf(stderr, "fma_peak: this CPU has no AVX2 + FMA\n");
        return 1;
    }
    const int most = omp_get_max_threads();
    for (int threads = 1; threads <= most; threads = threads == most ? most + 1 : most) {
        float keep = 0.0f;
        const double t0 = now_seconds();
#pragma omp parallel num_threads(threads) reduction(+ : keep)
        keep += fma_chains(ITERS, 1.0f);
        const double seconds = now_seconds() - t0;
        /* 8 lanes x 2 flops per FMA */
        printf("%d thread%s: %.1f GFLOP/s fp32 (checksum %g)\n", threads, threads == 1 ? "" : "s",
               (double)threads * ITERS * CHAINS * 16.0 / seconds / 1e9, (double)keep);
    }
    return 0;
}
