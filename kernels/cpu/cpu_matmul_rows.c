/* cpu_matmul_rows.c — c = alpha · a · bᵀ + beta · c for a few rows of a.
 *
 * Decoding runs every linear layer on a handful of rows (one per sequence being
 * generated) against a weight stored (out, in), row-major. cblas_sgemm repacks the
 * whole weight for each such call, and for 32 rows the packing costs about as much as
 * the product. Here each output is the dot product of a row of a with a row of b,
 * both contiguous, so nothing is packed: a block of NR rows of b (a few KiB) stays in
 * L1 while every row of a, in L2, passes over it, and b is read from memory once.
 *
 * The micro-kernel keeps MR x NR accumulators of VL lanes (GCC vector extensions: one
 * AVX-512 register each where the compiler targets it, two AVX2 registers or four SSE
 * ones elsewhere) and sums their lanes at the end. Every output is computed by one
 * thread in a fixed order, so the result does not depend on the number of threads. */
#include "cpu_kernels.h"

#include <string.h>

#define VL 16 /* floats per vector */
#define MR 4  /* rows of a per block */
#define NR 4  /* rows of b per block */

typedef float vec __attribute__((vector_size(VL * sizeof(float))));

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v); /* unaligned; compiles to one vector load */
    return v;
}

static inline float lanes_sum(vec v) {
    float s = 0.0f;
    for (int i = 0; i < VL; i++) s += v[i];
    return s;
}

static inline void store(float *c, float sum, float alpha, float beta) {
    *c = beta == 0.0f ? alpha * sum : alpha * sum + beta * *c;
}

/* c[i][j] for rows a[0..mr) and b[0..nr) (mr <= MR, nr <= NR), leading dimension K. */
static void block(float *c, int ldc, const float *a, const float *b, int mr, int nr, int K,
                  float alpha, float beta) {
    vec acc[MR][NR];
    memset(acc, 0, sizeof acc);
    const int kv = K - K % VL;
    if (mr == MR && nr == NR) { /* the full block: fixed trip counts, registers only */
        for (int k = 0; k < kv; k += VL) {
            vec av[MR], bv[NR];
            for (int i = 0; i < MR; i++) av[i] = load(a + (size_t)i * K + k);
            for (int j = 0; j < NR; j++) bv[j] = load(b + (size_t)j * K + k);
            for (int i = 0; i < MR; i++)
                for (int j = 0; j < NR; j++) acc[i][j] += av[i] * bv[j];
        }
    } else {
        for (int k = 0; k < kv; k += VL)
            for (int i = 0; i < mr; i++) {
                const vec av = load(a + (size_t)i * K + k);
                for (int j = 0; j < nr; j++) acc[i][j] += av * load(b + (size_t)j * K + k);
            }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            float sum = lanes_sum(acc[i][j]);
            for (int k = kv; k < K; k++) sum += a[(size_t)i * K + k] * b[(size_t)j * K + k];
            store(c + (size_t)i * ldc + j, sum, alpha, beta);
        }
}

void cpu_matmul_rows_nt(float *c, const float *a, const float *b, int M, int N, int K,
                        float alpha, float beta) {
    // c (M,N), a (M,K), b (N,K); blocks of NR columns of c are the parallel tasks
    const int nblocks = (N + NR - 1) / NR;
#pragma omp parallel for schedule(static) if ((int64_t)M * N * K >= 262144)
    for (int nb = 0; nb < nblocks; nb++) {
        const int n0 = nb * NR, nr = N - n0 < NR ? N - n0 : NR;
        for (int m0 = 0; m0 < M; m0 += MR) {
            const int mr = M - m0 < MR ? M - m0 : MR;
            block(c + (size_t)m0 * N + n0, N, a + (size_t)m0 * K, b + (size_t)n0 * K, mr, nr, K,
                  alpha, beta);
        }
    }
}
