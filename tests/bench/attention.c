/* attention.c — the CPU attention kernels (cpu_attention_forward and _backward) alone,
 * on rows packed as the trainer packs them, and how many query·key pairs they compute
 * against the pairs a query may see.
 *
 *   cc -O2 -fopenmp -Ikernels/cpu -Ikernels -Icore -Icore/include tests/bench/attention.c \
 *      build/libmoontune_static.a -lopenblas -llua5.4 -ljansson -lpcre2-8 -lm -ldl \
 *      -o /tmp/attention
 *   env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=2 /tmp/attention B T H KVH D LEN...
 *
 * Each of the B rows packs examples of the lengths LEN... (in turn, as many as fit T;
 * none given: one example per row, plain causal attention) and pads the rest, as
 * mt.batcher does. Prints the best of 20 calls of each kernel in ms, and the visible
 * pairs per row. SmolLM2-135M with the quickstart's rows (two examples of about 117
 * tokens): 4 256 9 3 64 117 123 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "base/internal.h" /* mt_now_seconds */
#include "cpu_kernels.h"

static float *random_floats(size_t n, unsigned *state) {
    float *x = malloc(n * sizeof *x);
    if (!x) {
        fprintf(stderr, "attention: out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < n; i++) x[i] = (float)rand_r(state) / (float)RAND_MAX * 2.0f - 1.0f;
    return x;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s B T H KVH D [LEN...]\n", argv[0]);
        return 2;
    }
    const int B = atoi(argv[1]), T = atoi(argv[2]), H = atoi(argv[3]), KVH = atoi(argv[4]),
              D = atoi(argv[5]);
    if (B < 1 || T < 1 || H < 1 || KVH < 1 || H % KVH || D < 1) {
        fprintf(stderr, "attention: expected positive B T H KVH D with H a multiple of KVH\n");
        return 2;
    }
    const int nlens = argc - 6;
    int32_t *seg = malloc((size_t)B * T * sizeof *seg);
    if (!seg) return 1;
    long visible = 0; /* (query, key) pairs in the same example, key not after query */
    for (int b = 0, next = 0; b < B; b++) {
        int used = 0, id = 0;
        while (nlens > 0) {
            const int len = atoi(argv[6 + next % nlens]);
            if (len < 1 || used + len > T) break;
            for (int t = used; t < used + len; t++) seg[b * T + t] = id;
            visible += (long)len * (len + 1) / 2;
            used += len, id++, next++;
        }
        if (nlens == 0) visible += (long)T * (T + 1) / 2;
        for (int t = used; t < T; t++) seg[b * T + t] = nlens ? -1 : 0; /* padding */
    }
    unsigned state = 7;
    const size_t nq = (size_t)B * T * H * D, nk = (size_t)B * T * KVH * D;
    float *q = random_floats(nq, &state), *k = random_floats(nk, &state);
    float *v = random_floats(nk, &state), *dout = random_floats(nq, &state);
    float *out = random_floats(nq, &state), *lse = random_floats((size_t)B * H * T, &state);
    float *dq = random_floats(nq, &state), *dk = random_floats(nk, &state);
    float *dv = random_floats(nk, &state);
    void *work = malloc(cpu_attention_work_bytes(B, T, H, KVH, D, 0));
    if (!work) return 1;
    const float scale = 1.0f / sqrtf((float)D);
    double best_fwd = 1e30, best_bwd = 1e30;
    for (int r = 0; r < 21; r++) {
        double t0 = mt_now_seconds();
        cpu_attention_forward(out, lse, q, k, v, nlens ? seg : NULL, B, T, H, KVH, D, scale, work, 0);
        double t1 = mt_now_seconds();
        cpu_attention_backward(dq, dk, dv, dout, out, lse, q, k, v, nlens ? seg : NULL, B, T, H,
                               KVH, D, scale, work, 0);
        double t2 = mt_now_seconds();
        if (r == 0) continue; /* warms the caches */
        if (t1 - t0 < best_fwd) best_fwd = t1 - t0;
        if (t2 - t1 < best_bwd) best_bwd = t2 - t1;
    }
    printf("B %d T %d H %d KVH %d D %d: %.1f visible pairs per row (of %ld causal)\n", B, T, H,
           KVH, D, (double)visible / B, (long)T * (T + 1) / 2);
    printf("forward %.3f ms  backward %.3f ms  (%.2f GFLOP/s on visible pairs)\n", best_fwd * 1e3,
           best_bwd * 1e3,
           /* forward 2 products, backward 5 (p again, dp, dv, dk, dq), 2 FLOPs each */
           (double)visible * H * D * 2.0 * 7.0 / (best_fwd + best_bwd) / 1e9);
    free(q), free(k), free(v), free(dout), free(out), free(lse), free(dq), free(dk), free(dv);
    free(seg), free(work);
    return 0;
}
