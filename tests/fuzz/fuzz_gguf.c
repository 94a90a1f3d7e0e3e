/* fuzz_gguf.c — libFuzzer target for the GGUF reader: each input is written to a
 * temporary file, opened with mt_gguf_open, and on success every key, value, array
 * element and tensor is touched and every tensor of a dequantizable type is
 * dequantized. Must never crash, leak or read out of bounds.
 *
 * Build and run (from the repository root; not part of the CMake build):
 *   clang -g -O1 -std=c11 -D_POSIX_C_SOURCE=200809L -fsanitize=fuzzer,address,undefined \
 *       -Icore -Icore/include tests/fuzz/fuzz_gguf.c core/formats/gguf.c core/base/util.c \
 *       -ljansson -lm -o /tmp/fuzz_gguf
 *   mkdir -p /tmp/gguf-corpus && cp tests/fixtures/gguf/small.gguf tests/fixtures/gguf/align64.gguf \
 *       /tmp/gguf-corpus/
 *   /tmp/fuzz_gguf -max_total_time=60 -max_len=4096 /tmp/gguf-corpus */
#define _DEFAULT_SOURCE /* mkstemps */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz_tmpfile.h"
#include "formats/gguf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Reads every byte a value points at, so that ASan sees any out-of-bounds pointer. */
static volatile unsigned sink;

static void touch(const void *p, uint64_t n) {
    const unsigned char *b = p;
    unsigned acc = 0;
    for (uint64_t i = 0; i < n; i++) acc += b[i];
    sink += acc;
}

static size_t elem_size(mt_gguf_type t) {
    switch (t) {
    case MT_GGUF_UINT8:
    case MT_GGUF_INT8:
    case MT_GGUF_BOOL: return 1;
    case MT_GGUF_UINT16:
    case MT_GGUF_INT16: return 2;
    case MT_GGUF_UINT32:
    case MT_GGUF_INT32:
    case MT_GGUF_FLOAT32: return 4;
    case MT_GGUF_UINT64:
    case MT_GGUF_INT64:
    case MT_GGUF_FLOAT64: return 8;
    default: return 0;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *tmp_path = fuzz_write_tmp("gguf", "", data, size);
    mt_gguf *g = NULL;
    mt_error err = {MT_OK, ""};
    if (mt_gguf_open(tmp_path, &g, &err) != MT_OK) {
        if (g || !strstr(err.msg, tmp_path)) abort(); /* every error names the file */
        return 0;
    }
    (void)mt_gguf_version(g);
    for (size_t i = 0; i < mt_gguf_kv_count(g); i++) {
        const char *key = mt_gguf_kv_key(g, i);
        const mt_gguf_value *v = mt_gguf_get(g, key);
        if (!key || !v) abort();
        int64_t iv;
        double dv;
        char *s = NULL;
        (void)mt_gguf_get_int(g, key, &iv, &err);
        (void)mt_gguf_get_float(g, key, &dv, &err);
        if (mt_gguf_get_string(g, key, &s, &err) == MT_OK) free(s);
        if (v->type == MT_GGUF_STRING) touch(v->str, v->str_len);
        if (v->type == MT_GGUF_ARRAY) {
            if (v->arr_type == MT_GGUF_STRING) {
                for (uint64_t k = 0; k < v->arr_len; k++) {
                    uint64_t len = 0;
                    const char *e = mt_gguf_array_string(g, v, k, &len);
                    if (!e) abort();
                    touch(e, len);
                }
            } else {
                touch(v->arr_data, v->arr_len * elem_size(v->arr_type));
            }
        }
    }
    for (size_t i = 0; i < mt_gguf_tensor_count(g); i++) {
        const mt_gguf_tensor *t = mt_gguf_tensor_at(g, i);
        if (!t || mt_gguf_find_tensor(g, t->name) != t) abort();
        touch(t->data, t->nbytes);
        (void)mt_ggml_type_name(t->type);
        uint64_t numel = 1;
        for (int d = 0; d < 4; d++) numel *= (uint64_t)t->ne[d];
        if (numel > (1u << 22)) continue;
        float *out = malloc(numel ? numel * sizeof *out : 1);
        if (!out) abort();
        (void)mt_gguf_dequantize(g, t, out, &err);
        free(out);
    }
    mt_gguf_close(g);
    return 0;
}
