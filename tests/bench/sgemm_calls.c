/* sgemm_calls.c — where a moontune run's cblas_sgemm time goes, shape by shape.
 *
 * An LD_PRELOAD library that wraps cblas_sgemm, times every call and, when the
 * process ends, prints each (trans_a, trans_b, M, N, K) that took at least 1% of the
 * total: calls, seconds and GFLOP/s. perf shows sgemm_kernel_ZEN as one symbol; this
 * says which products it spent its time on (docs/speed.md, "Narrow products").
 *
 *   cc -O2 -shared -fPIC -o /tmp/sgemm_calls.so tests/bench/sgemm_calls.c -ldl
 *   LD_PRELOAD=/tmp/sgemm_calls.so build/moontune bench --model MODEL ...
 *
 * Calls made from several threads at once are counted without a lock (moontune makes
 * them from one); shapes past the first 512 are not counted. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <time.h>

typedef void (*sgemm_fn)(int order, int trans_a, int trans_b, int M, int N, int K, float alpha,
                         const float *a, int lda, const float *b, int ldb, float beta, float *c,
                         int ldc);

enum { MAX_SHAPES = 512 };
static struct shape {
    int trans_a, trans_b, M, N, K;
    long calls;
    double seconds;
} shapes[MAX_SHAPES];
static int n_shapes;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* cblas.h's enums are ints in the ABI; declared here with ints so that this file
 * needs no BLAS headers. */
void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    static sgemm_fn real;
    if (!real) real = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
    if (!real) return;
    const double t0 = now();
    real(order, trans_a, trans_b, M, N, K, alpha, a, lda, b, ldb, beta, c, ldc);
    const double dt = now() - t0;
    int i = 0;
    while (i < n_shapes && !(shapes[i].trans_a == trans_a && shapes[i].trans_b == trans_b &&
                             shapes[i].M == M && shapes[i].N == N && shapes[i].K == K))
        i++;
    if (i == n_shapes) {
        if (n_shapes == MAX_SHAPES) return;
        shapes[n_shapes++] = (struct shape){trans_a, trans_b, M, N, K, 0, 0.0};
    }
    shapes[i].calls++;
    shapes[i].seconds += dt;
}

__attribute__((destructor)) static void report(void) {
    double total = 0.0;
    for (int i = 0; i < n_shapes; i++) total += shapes[i].seconds;
    for (int i = 0; i < n_shapes; i++) {
        const struct shape *s = &shapes[i];
        if (s->seconds < 0.01 * total) continue;
        fprintf(stderr, "sgemm %c%c %6d x %6d x %6d  %7ld calls  %8.3f s  %6.1f GFLOP/s\n",
                s->trans_a == 112 ? 'T' : 'N', s->trans_b == 112 ? 'T' : 'N', s->M, s->N, s->K,
                s->calls, s->seconds, 2.0 * s->M * s->N * s->K * (double)s->calls / s->seconds / 1e9);
    }
    fprintf(stderr, "sgemm total %.3f s\n", total);
}
