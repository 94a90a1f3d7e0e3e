/* sgemm_beta.c — what OpenBLAS' clearing of c costs: one product C (M,N) = A (M,K) · Bᵀ
 * (B stored (N,K), as a linear layer's weight) with beta = 0, against memset then
 * beta = 1 (what cpu_matmul does, "Clearing c before sgemm" in docs/speed.md), against
 * beta = 1 alone (no clearing at all: the bound). Best of 3 rounds of 50 calls each.
 *
 *   cc -O2 -fopenmp -Icore -Icore/include tests/bench/sgemm_beta.c build/libmoontune_static.a \
 *      -lopenblas -llua5.4 -ljansson -lpcre2-8 -lm -ldl -o /tmp/sgemm_beta
 *   env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=2 /tmp/sgemm_beta 1024 1536 576
 */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h" /* mt_now_seconds */

enum { BETA_ZERO, MEMSET_BETA_ONE, BETA_ONE, N_WAYS };

static void product(int way, int M, int N, int K, const float *a, const float *b, float *c) {
    float beta = 1.0f;
    if (way == BETA_ZERO) beta = 0.0f;
    if (way == MEMSET_BETA_ONE) memset(c, 0, (size_t)M * N * sizeof *c);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, a, K, b, K, beta, c, N);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s M N K\n", argv[0]);
        return 2;
    }
    const int M = atoi(argv[1]), N = atoi(argv[2]), K = atoi(argv[3]), calls = 50;
    if (M <= 0 || N <= 0 || K <= 0) {
        fprintf(stderr, "sgemm_beta: M, N and K must be positive\n");
        return 2;
    }
    float *a = malloc((size_t)M * K * sizeof *a), *b = malloc((size_t)N * K * sizeof *b);
    float *c = malloc((size_t)M * N * sizeof *c);
    if (!a || !b || !c) {
        fprintf(stderr, "sgemm_beta: out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < (size_t)M * K; i++) a[i] = (float)(i % 7) * 0.1f;
    for (size_t i = 0; i < (size_t)N * K; i++) b[i] = (float)(i % 5) * 0.1f;
    memset(c, 0, (size_t)M * N * sizeof *c);
    static const char *names[N_WAYS] = {"beta = 0", "memset, beta = 1", "beta = 1 (no clearing)"};
    for (int way = 0; way < N_WAYS; way++) {
        double best = 1e30;
        for (int round = 0; round < 3; round++) {
            const double t0 = mt_now_seconds();
            for (int i = 0; i < calls; i++) product(way, M, N, K, a, b, c);
            const double s = (mt_now_seconds() - t0) / calls;
            if (s < best) best = s;
        }
        printf("M %d N %d K %d  %-24s %8.3f ms  %6.1f GFLOP/s\n", M, N, K, names[way], best * 1e3,
               2.0 * M * N * K / best * 1e-9);
    }
    free(a), free(b), free(c);
    return 0;
}
