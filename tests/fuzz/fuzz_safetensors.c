/* fuzz_safetensors.c — libFuzzer target for the safetensors reader: each input is
 * written to a temporary .safetensors file and opened with mt_st_open; on success every
 * tensor and its metadata are touched, and every F32/F16/BF16 tensor of a sane size is
 * converted. A refusal must name the file. Must never crash, leak or read out of bounds.
 * Built by scripts/fuzz (CMake, -DMT_FUZZ=ON); seeds in tests/fuzz/corpus/fuzz_safetensors. */
#define _DEFAULT_SOURCE /* mkstemps */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz_tmpfile.h"
#include "safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static volatile unsigned sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *tmp_path = fuzz_write_tmp("st", ".safetensors", data, size);
    mt_safetensors *st = NULL;
    mt_error err = {MT_OK, ""};
    if (mt_st_open(tmp_path, &st, &err) != MT_OK) {
        if (st || !strstr(err.msg, tmp_path)) abort(); /* every refusal names the file */
        return 0;
    }
    const char *m = mt_st_metadata(st, "format");
    if (m) sink += (unsigned)strlen(m);
    for (size_t i = 0; i < mt_st_count(st); i++) {
        const mt_st_tensor *t = mt_st_at(st, i);
        if (mt_st_find(st, t->name) != t) abort();
        const unsigned char *b = t->data;
        unsigned acc = 0;
        for (size_t k = 0; k < t->nbytes; k++) acc += b[k];
        sink += acc;
        size_t numel = 1;
        for (int d = 0; d < t->ndim; d++) numel *= (size_t)t->shape[d];
        if (numel * mt_st_dtype_size(t->dtype) != t->nbytes) abort(); /* the reader checked it */
        if ((t->dtype == MT_ST_F32 || t->dtype == MT_ST_F16 || t->dtype == MT_ST_BF16) && numel <= (1u << 20)) {
            float *dst = malloc((numel ? numel : 1) * sizeof *dst);
            if (!dst) abort();
            if (mt_st_read_f32(t, dst, &err) != MT_OK) abort();
            free(dst);
        }
    }
    mt_st_close(st);
    return 0;
}
