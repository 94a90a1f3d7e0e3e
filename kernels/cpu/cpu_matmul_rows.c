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
 * ones elsewhere) and sums their lanes at the end, all 16 at once (sums16). Every
 * output is computed by one thread in a fixed order, so the result does not depend on
 * the number of threads. */
#include "cpu_kernels.h"

#include <string.h>

#define VL 16 /* floats per vector */
#define MR 4  /* rows of a per block */
#define NR 4  /* rows of b per block: MR * NR = 16 vectors, summed by sums16 */

typedef float vec __attribute__((vector_size(VL * sizeof(float))));
_Static_assert(VL == 16 && MR * NR == 16, "sums16 sums 16 vectors of 16 lanes");

/* v = the VL floats at p, unaligned: one vector load. A macro, not a function, so that
 * no vector is passed by value: without AVX-512 that has another ABI, and GCC and clang
 * warn (-Wpsabi) in builds not made for the machine (the sanitizer build). */
#define LOAD(v, p) memcpy(&(v), (p), sizeof(vec))

/* The lane sums of 16 vectors in one vector, v[i]'s in lane bitrev4(i) (i's four bits
 * reversed): four rounds of pairwise shuffles and adds, 30 shuffles and 15 adds in all,
 * in place of 16 lane-by-lane sums. Each round halves the lanes every vector keeps. */
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
static inline void sums16(const vec v[16], vec *out) {
    vec w[8], x[4], y[2];
    for (int p = 0; p < 8; p++) /* lanes 0-7: v[2p]'s, 8-15: v[2p+1]'s */
        w[p] = SHUFFLE(v[2 * p], v[2 * p + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               SHUFFLE(v[2 * p], v[2 * p + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int q = 0; q < 4; q++) /* four lanes each */
        x[q] = SHUFFLE(w[2 * q], w[2 * q + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
               SHUFFLE(w[2 * q], w[2 * q + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int r = 0; r < 2; r++) /* two lanes each */
        y[r] = SHUFFLE(x[2 * r], x[2 * r + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
               SHUFFLE(x[2 * r], x[2 * r + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    *out = SHUFFLE(y[0], y[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
           SHUFFLE(y[0], y[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}
static const unsigned char bitrev4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

static inline void store(float *c, float sum, float alpha, float beta) {
    *c = beta == 0.0f ? alpha * sum : alpha * sum + beta * *c;
}

/* c[i][j] for rows a[0..mr) and b[0..nr) (mr <= MR, nr <= NR), leading dimension K. */
static void block(float *c, int ldc, const float *a, const float *b, int mr, int nr, int K,
                  float alpha, float beta) {
    vec acc[MR * NR]; /* acc[i * NR + j]: row i of a with row j of b */
    memset(acc, 0, sizeof acc);
    const int kv = K - K % VL;
    if (mr == MR && nr == NR) { /* the full block: fixed trip counts, registers only */
        for (int k = 0; k < kv; k += VL) {
            vec av[MR], bv[NR];
            for (int i = 0; i < MR; i++) LOAD(av[i], a + (size_t)i * K + k);
            for (int j = 0; j < NR; j++) LOAD(bv[j], b + (size_t)j * K + k);
            for (int i = 0; i < MR; i++)
                for (int j = 0; j < NR; j++) acc[i * NR + j] += av[i] * bv[j];
        }
    } else {
        for (int k = 0; k < kv; k += VL)
            for (int i = 0; i < mr; i++) {
                vec av, bv;
                LOAD(av, a + (size_t)i * K + k);
                for (int j = 0; j < nr; j++) {
                    LOAD(bv, b + (size_t)j * K + k);
                    acc[i * NR + j] += av * bv;
                }
            }
    }
    vec sums;
    sums16(acc, &sums);
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            float sum = sums[bitrev4[i * NR + j]];
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
