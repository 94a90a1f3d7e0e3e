/* lora_shared.c — one decoder layer's LoRA branches of q, k, v and of gate, up (the
 * projections that read one input), forward and backward, each projection alone
 * against the group in one product (lora.c's forward_shared and backward_shared):
 * u = x·Aᵀ for all members at once, dA_G += s·gᵀ·x and dx += s·g·A_G as one product
 * each ("LoRA's down-projections as one product" in docs/speed.md). Through moontune's
 * own cpu_matmul (its narrow-product path included), 8 interleaved rounds of 10
 * layers, so that the machine's drift falls on both alike; also prints how far apart
 * the two ways' dx, dA and dB are (the order of the sums differs).
 *
 *   cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release -DMT_CUDA=OFF -DMT_MPI=OFF \
 *         -DMT_BUILD_TESTS=OFF && cmake --build build-bench -j2
 *   cc -O2 -Ikernels/cpu tests/bench/lora_shared.c build-bench/libmoontune_static.a \
 *      -lopenblas -fopenmp -lm -o /tmp/lora_shared
 *   env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=2 /tmp/lora_shared [rows] [r]
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cpu_kernels.h"

enum { IN = 576, ROUNDS = 8, LAYERS = 10, MAX_MEMBERS = 3 };
static const int group_outs[2][MAX_MEMBERS] = {{576, 192, 192}, {1536, 1536, 0}};
static const int group_members[2] = {3, 2};
static const float scaling = 2.0f;

typedef struct group {
    int n, out[MAX_MEMBERS];
    float *A, *dA;                          /* (n·r, IN) stacked */
    float *B[MAX_MEMBERS], *dB[MAX_MEMBERS]; /* (out, r) */
    float *y[MAX_MEMBERS], *dy[MAX_MEMBERS]; /* (N, out) */
} group;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static float *alloc_uniform(size_t n, float scale) {
    float *p = malloc(n * sizeof *p);
    if (!p) {
        fprintf(stderr, "lora_shared: out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < n; i++) p[i] = scale * ((float)rand() / (float)RAND_MAX - 0.5f);
    return p;
}

/* each member alone, as lora_forward and lora_backward run it (u, g: (N, r)) */
static void alone(group *g, const float *x, float *dx, int N, int r, float *u, float *gr) {
    for (int k = 0; k < g->n; k++) {
        cpu_matmul(u, x, g->A + (size_t)k * r * IN, N, r, IN, 0, 1, 1.0f, 0.0f);
        cpu_matmul(g->y[k], u, g->B[k], N, g->out[k], r, 0, 1, scaling, 1.0f);
    }
    for (int k = 0; k < g->n; k++) {
        const float *A = g->A + (size_t)k * r * IN;
        float *dA = g->dA + (size_t)k * r * IN;
        cpu_matmul(u, x, A, N, r, IN, 0, 1, 1.0f, 0.0f);
        cpu_matmul(gr, g->dy[k], g->B[k], N, r, g->out[k], 0, 0, 1.0f, 0.0f);
        cpu_matmul(g->dB[k], g->dy[k], u, g->out[k], r, N, 1, 0, scaling, 1.0f);
        cpu_matmul(dA, gr, x, r, IN, N, 1, 0, scaling, 1.0f);
        cpu_matmul(dx, gr, A, N, IN, r, 0, 0, scaling, 1.0f);
    }
}

/* the group in one product where the members share it (ut, gt: (n·r, N)) */
static void shared(group *g, const float *x, float *dx, int N, int r, float *ut, float *gt) {
    const int nr = g->n * r;
    cpu_matmul(ut, g->A, x, nr, N, IN, 0, 1, 1.0f, 0.0f);
    for (int k = 0; k < g->n; k++)
        cpu_matmul(g->y[k], ut + (size_t)k * r * N, g->B[k], N, g->out[k], r, 1, 1, scaling, 1.0f);
    cpu_matmul(ut, g->A, x, nr, N, IN, 0, 1, 1.0f, 0.0f);
    for (int k = 0; k < g->n; k++) {
        cpu_matmul(gt + (size_t)k * r * N, g->B[k], g->dy[k], r, N, g->out[k], 1, 1, 1.0f, 0.0f);
        cpu_matmul(g->dB[k], g->dy[k], ut + (size_t)k * r * N, g->out[k], r, N, 1, 1, scaling, 1.0f);
    }
    cpu_matmul(g->dA, gt, x, nr, IN, N, 0, 0, scaling, 1.0f);
    cpu_matmul(dx, gt, g->A, N, IN, nr, 1, 0, scaling, 1.0f);
}

static double max_rel(const float *a, const float *b, size_t n) {
    double diff = 0, ref = 0;
    for (size_t i = 0; i < n; i++) {
        diff = fmax(diff, fabs((double)a[i] - b[i]));
        ref = fmax(ref, fabs((double)b[i]));
    }
    return ref > 0 ? diff / ref : diff;
}

int main(int argc, char **argv) {
    const int N = argc > 1 ? atoi(argv[1]) : 1024, r = argc > 2 ? atoi(argv[2]) : 16;
    if (N < 1 || N > 65536 || r < 1 || r > 256) {
        fprintf(stderr, "usage: lora_shared [rows 1..65536] [r 1..256]\n");
        return 2;
    }
    srand(1);
    group groups[2];
    for (int gi = 0; gi < 2; gi++) {
        group *g = &groups[gi];
        g->n = group_members[gi];
        g->A = alloc_uniform((size_t)g->n * r * IN, 0.1f);
        g->dA = calloc((size_t)g->n * r * IN, sizeof(float));
        for (int k = 0; k < g->n; k++) {
            g->out[k] = group_outs[gi][k];
            g->B[k] = alloc_uniform((size_t)g->out[k] * r, 0.1f);
            g->dB[k] = calloc((size_t)g->out[k] * r, sizeof(float));
            g->y[k] = alloc_uniform((size_t)N * g->out[k], 1.0f);
            g->dy[k] = alloc_uniform((size_t)N * g->out[k], 1.0f);
            if (!g->dB[k]) return 1;
        }
        if (!g->dA) return 1;
    }
    float *x = alloc_uniform((size_t)N * IN, 2.0f), *dx = calloc((size_t)N * IN, sizeof(float));
    float *s1 = calloc((size_t)N * MAX_MEMBERS * r, sizeof(float));
    float *s2 = calloc((size_t)N * MAX_MEMBERS * r, sizeof(float));
    if (!dx || !s1 || !s2) return 1;

    /* how far apart the two ways are, from the same gradients (zero) */
    float *dx_ref = calloc((size_t)N * IN, sizeof(float)), *dA_ref = NULL, *dB_ref = NULL;
    group *g0 = &groups[0];
    size_t nA = (size_t)g0->n * r * IN, nB = (size_t)g0->out[0] * r;
    dA_ref = malloc(nA * sizeof(float));
    dB_ref = malloc(nB * sizeof(float));
    if (!dx_ref || !dA_ref || !dB_ref) return 1;
    alone(g0, x, dx_ref, N, r, s1, s2);
    memcpy(dA_ref, g0->dA, nA * sizeof(float));
    memcpy(dB_ref, g0->dB[0], nB * sizeof(float));
    memset(g0->dA, 0, nA * sizeof(float));
    memset(g0->dB[0], 0, nB * sizeof(float));
    shared(g0, x, dx, N, r, s1, s2);
    printf("q, k, v (N %d, r %d): shared against alone, max |diff| / max |ref|: dx %.2g, dA %.2g, "
           "dB of q %.2g\n", N, r, max_rel(dx, dx_ref, (size_t)N * IN), max_rel(g0->dA, dA_ref, nA),
           max_rel(g0->dB[0], dB_ref, nB));

    double seconds[2] = {0, 0};
    for (int round = 0; round < ROUNDS; round++)
        for (int way = 0; way < 2; way++) {
            const double t0 = now();
            for (int l = 0; l < LAYERS; l++)
                for (int gi = 0; gi < 2; gi++) {
                    if (way) shared(&groups[gi], x, dx, N, r, s1, s2);
                    else alone(&groups[gi], x, dx, N, r, s1, s2);
                }
            seconds[way] += now() - t0;
        }
    const double per_layer[2] = {1e3 * seconds[0] / (ROUNDS * LAYERS),
                                 1e3 * seconds[1] / (ROUNDS * LAYERS)};
    printf("one layer's branches of q, k, v and gate, up, forward + backward: alone %.2f ms, "
           "shared %.2f ms (%.2fx)\n", per_layer[0], per_layer[1], per_layer[0] / per_layer[1]);
    return 0;
}
