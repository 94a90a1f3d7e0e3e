/* st_compare.c — compares two safetensors files of F32 tensors for the data-parallel test
 * (tests/run/check_distributed.sh): the same tensor names and shapes, and for each
 * tensor max|a - b| <= rtol * max|a| (rtol 0: bit for bit).
 *   st_compare A.safetensors B.safetensors RTOL
 * Prints the largest relative difference found; exit 0 when within RTOL, 1 when not,
 * 2 on an error. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h"
#include "formats/safetensors.h"

static float *read_all(const mt_st_tensor *t, size_t *n) {
    *n = 1;
    for (int d = 0; d < t->ndim; d++) *n *= (size_t)t->shape[d];
    float *v = malloc((*n ? *n : 1) * sizeof *v);
    mt_error err = {0};
    if (v && mt_st_read_f32(t, v, &err)) {
        fprintf(stderr, "st_compare: %s\n", err.msg);
        free(v);
        return NULL;
    }
    return v;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: st_compare A.safetensors B.safetensors RTOL\n");
        return 2;
    }
    double rtol = atof(argv[3]);
    mt_safetensors *a = NULL, *b = NULL;
    mt_error err = {0};
    if (mt_st_open(argv[1], &a, &err) || mt_st_open(argv[2], &b, &err)) {
        fprintf(stderr, "st_compare: %s\n", err.msg);
        return 2;
    }
    int rc = 0;
    double worst = 0.0;
    const char *worst_name = "";
    if (mt_st_count(a) != mt_st_count(b)) {
        fprintf(stderr, "st_compare: %zu tensors in %s, %zu in %s\n", mt_st_count(a), argv[1],
                mt_st_count(b), argv[2]);
        rc = 1;
    }
    for (size_t i = 0; rc != 2 && i < mt_st_count(a); i++) {
        const mt_st_tensor *ta = mt_st_at(a, i), *tb = mt_st_find(b, ta->name);
        if (!tb || tb->ndim != ta->ndim || memcmp(ta->shape, tb->shape, sizeof ta->shape[0] * (size_t)ta->ndim)) {
            fprintf(stderr, "st_compare: %s: missing or of another shape in %s\n", ta->name, argv[2]);
            rc = 1;
            continue;
        }
        size_t n, m;
        float *va = read_all(ta, &n), *vb = read_all(tb, &m);
        if (!va || !vb) {
            free(va);
            free(vb);
            rc = 2;
            break;
        }
        double scale = 0.0, diff = 0.0;
        for (size_t k = 0; k < n; k++) {
            scale = fmax(scale, fabs((double)va[k]));
            double d = fabs((double)va[k] - (double)vb[k]);
            if (!(d <= diff)) diff = d; /* NaN counts as a difference */
        }
        double rel = diff == 0.0 ? 0.0 : scale > 0.0 ? diff / scale : INFINITY;
        if (!(rel <= worst)) {
            worst = rel;
            worst_name = ta->name;
        }
        free(va);
        free(vb);
    }
    printf("st_compare: largest relative difference %.3g (%s)\n", worst, worst_name);
    if (rc == 0 && !(worst <= rtol)) rc = 1;
    mt_st_close(a);
    mt_st_close(b);
    return rc;
}
