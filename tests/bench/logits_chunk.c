/* logits_chunk.c — the output layer's products for one batch's target rows, in chunks of
 * 176, 352 and 704 rows ("a larger logits chunk tried again" in docs/speed.md): forward
 * logits (rows, V) = x (rows, C) · Wᵀ and backward dx (rows, C) += dlogits · W, each way
 * timed over 8 interleaved rounds, so that the machine's drift falls on all alike. Also
 * says whether a chunking gives the 176-row chunking's bits (OpenBLAS's sums depend on
 * the row count).
 *
 *   cc -O2 tests/bench/logits_chunk.c -lopenblas -o /tmp/logits_chunk
 *   env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=2 /tmp/logits_chunk 430
 */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { V = 49152, C = 576, ROUNDS = 8, WAYS = 3 };
static const int chunk_rows[WAYS] = {176, 352, 704};

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* forward into logits, or backward from logits into dx, chunk rows at a time */
static double run(int rows, int chunk, int backward, const float *w, const float *x,
                  float *logits, float *dx) {
    const double t0 = now();
    for (int r0 = 0; r0 < rows; r0 += chunk) {
        const int m = rows - r0 < chunk ? rows - r0 : chunk;
        if (!backward)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, V, C, 1.0f, x + (size_t)r0 * C, C,
                        w, C, 0.0f, logits + (size_t)r0 * V, V);
        else
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, C, V, 1.0f,
                        logits + (size_t)r0 * V, V, w, C, 1.0f, dx + (size_t)r0 * C, C);
    }
    return now() - t0;
}

int main(int argc, char **argv) {
    const int rows = argc > 1 ? atoi(argv[1]) : 430;
    if (rows <= 0 || rows > 4096) {
        fprintf(stderr, "usage: logits_chunk [rows 1..4096]\n");
        return 2;
    }
    float *w = malloc(sizeof(float) * (size_t)V * C), *x = malloc(sizeof(float) * (size_t)rows * C);
    float *logits = malloc(sizeof(float) * (size_t)rows * V), *ref = malloc(sizeof(float) * (size_t)rows * V);
    float *dx = calloc((size_t)rows * C, sizeof(float)), *dx_ref = calloc((size_t)rows * C, sizeof(float));
    if (!w || !x || !logits || !ref || !dx || !dx_ref) {
        fprintf(stderr, "logits_chunk: out of memory\n");
        return 1;
    }
    srand(1);
    for (size_t i = 0; i < (size_t)V * C; i++) w[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    for (size_t i = 0; i < (size_t)rows * C; i++) x[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    double seconds[2][WAYS] = {{0}};
    for (int round = 0; round < ROUNDS; round++)
        for (int backward = 0; backward < 2; backward++)
            for (int k = 0; k < WAYS; k++)
                seconds[backward][k] += run(rows, chunk_rows[k], backward, w, x, logits, dx);
    const double flops = 2.0 * rows * (double)V * C * ROUNDS;
    for (int backward = 0; backward < 2; backward++) {
        printf("%s, %d rows:", backward ? "backward" : "forward", rows);
        for (int k = 0; k < WAYS; k++)
            printf("  chunk %d %.1f GFLOP/s", chunk_rows[k], flops / seconds[backward][k] / 1e9);
        printf("\n");
    }
    /* bits: each chunking's forward and backward against the 176-row chunking's */
    run(rows, chunk_rows[0], 0, w, x, ref, NULL);
    memset(dx_ref, 0, sizeof(float) * (size_t)rows * C);
    run(rows, chunk_rows[0], 1, w, x, ref, dx_ref);
    for (int k = 1; k < WAYS; k++) {
        run(rows, chunk_rows[k], 0, w, x, logits, NULL);
        long differ_fwd = 0, differ_bwd = 0;
        for (size_t i = 0; i < (size_t)rows * V; i++) differ_fwd += logits[i] != ref[i];
        memset(dx, 0, sizeof(float) * (size_t)rows * C);
        run(rows, chunk_rows[k], 1, w, x, ref, dx); /* the same dlogits as the reference */
        for (size_t i = 0; i < (size_t)rows * C; i++) differ_bwd += dx[i] != dx_ref[i];
        printf("chunk %d against 176: %ld of %zu logits and %ld of %zu input gradients differ\n",
               chunk_rows[k], differ_fwd, (size_t)rows * V, differ_bwd, (size_t)rows * C);
    }
    free(w), free(x), free(logits), free(ref), free(dx), free(dx_ref);
    return 0;
}
