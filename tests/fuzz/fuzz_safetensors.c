/* fuzz_safetensors.c — libFuzzer target for the safetensors reader. Each input is
 *  - written to a temporary .safetensors file and opened with mt_st_open, and
 *  - when it starts with '{', also written as a model.safetensors.index.json into a
 *    directory that holds two small valid shards (a.safetensors, b.safetensors, made at
 *    start-up with the writer), so that the sharded-checkpoint reader is fuzzed too.
 * On success every tensor and its metadata are touched, and every F32/F16/BF16 tensor
 * of a sane size is converted, plainly and with the finiteness check: the checked read
 * must refuse exactly the tensors that hold NaN or an infinity, naming the file and
 * the tensor. A refusal to open must name the file. Must never crash, leak or read out
 * of bounds. Built by scripts/fuzz (CMake, -DMT_FUZZ=ON); seeds in
 * tests/fuzz/corpus/fuzz_safetensors (index seeds start with '{'). */
#define _DEFAULT_SOURCE /* mkdtemp, mkstemps */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz_tmpfile.h"
#include "moontune/moontune.h"
#include "formats/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static volatile unsigned sink;

/* ---- the directory for index inputs ---- */

static char index_dir[64];
static char index_path[128];
static const char *const shard_names[] = {"a.safetensors", "b.safetensors"};

static void remove_index_dir(void) {
    char p[192];
    for (size_t i = 0; i < 2; i++) {
        snprintf(p, sizeof p, "%s/%s", index_dir, shard_names[i]);
        unlink(p);
    }
    unlink(index_path);
    rmdir(index_dir);
}

/* a.safetensors: w F32 [2, 3], b BF16 [2], metadata; b.safetensors: n F32 [2] holding a NaN */
static void make_index_dir(void) {
    /* in memory when there is a tmpfs: the fuzzer writes a file per input */
    snprintf(index_dir, sizeof index_dir, "%s/fuzz-st-index-%ld-XXXXXX",
             access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp", (long)getpid());
    if (!mkdtemp(index_dir)) abort();
    snprintf(index_path, sizeof index_path, "%s/model.safetensors.index.json", index_dir);
    atexit(remove_index_dir);
    static const float w[6] = {1, -2, 3.5f, 0, 1e-3f, -7};
    static const uint16_t b[2] = {0x3F80, 0xC000}; /* 1, -2 in BF16 */
    const float n[2] = {1.0f, NAN};
    mt_st_entry a_entries[] = {
        {.name = "w", .dtype = MT_ST_F32, .ndim = 2, .shape = {2, 3}, .data = w},
        {.name = "b", .dtype = MT_ST_BF16, .ndim = 1, .shape = {2}, .data = b},
    };
    mt_st_entry b_entries[] = {{.name = "n", .dtype = MT_ST_F32, .ndim = 1, .shape = {2}, .data = n}};
    static const char *const meta[] = {"format", "pt", NULL};
    char p[192];
    mt_error err = {MT_OK, ""};
    snprintf(p, sizeof p, "%s/%s", index_dir, shard_names[0]);
    if (mt_st_write(p, a_entries, 2, meta, &err) != MT_OK) abort();
    snprintf(p, sizeof p, "%s/%s", index_dir, shard_names[1]);
    if (mt_st_write(p, b_entries, 1, NULL, &err) != MT_OK) abort();
}

/* ---- checks on an opened set ---- */

static void exercise(mt_safetensors *st) {
    mt_error err = {MT_OK, ""};
    const char *m = mt_st_metadata(st, "format");
    if (m) sink += (unsigned)strlen(m);
    sink += (unsigned)strlen(mt_st_source(st));
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
        int convertible = t->dtype == MT_ST_F32 || t->dtype == MT_ST_F16 || t->dtype == MT_ST_BF16;
        if (!convertible) {
            /* refused with the file and the tensor named */
            if (mt_st_read_f32(t, NULL, &err) == MT_OK || !strstr(err.msg, t->file) ||
                !strstr(err.msg, t->name))
                abort();
            continue;
        }
        if (numel > (1u << 20)) continue;
        float *dst = malloc((numel ? numel : 1) * sizeof *dst);
        if (!dst) abort();
        if (mt_st_read_f32(t, dst, &err) != MT_OK) abort();
        size_t nonfinite = 0;
        for (size_t k = 0; k < numel; k++) nonfinite += !isfinite(dst[k]);
        mt_status s = mt_st_read_f32_finite(t, dst, &err);
        if ((s == MT_OK) != (nonfinite == 0)) abort();
        if (s != MT_OK) {
            char count[48];
            snprintf(count, sizeof count, ": %zu non-finite value", nonfinite);
            if (!strstr(err.msg, t->file) || !strstr(err.msg, t->name) || !strstr(err.msg, count))
                abort();
        }
        free(dst);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *tmp_path = fuzz_write_tmp("st", ".safetensors", data, size);
    mt_safetensors *st = NULL;
    mt_error err = {MT_OK, ""};
    if (mt_st_open(tmp_path, &st, &err) != MT_OK) {
        if (st || !strstr(err.msg, tmp_path)) abort(); /* every refusal names the file */
    } else {
        exercise(st);
        mt_st_close(st);
    }
    if (size == 0 || data[0] != '{') return 0;
    if (!index_dir[0]) make_index_dir();
    FILE *f = fopen(index_path, "wb");
    if (!f) abort();
    if (fwrite(data, 1, size, f) != size) abort();
    if (fclose(f) != 0) abort();
    st = NULL;
    if (mt_st_open(index_path, &st, &err) != MT_OK) {
        if (st || !strstr(err.msg, index_path)) abort();
        return 0;
    }
    exercise(st);
    mt_st_close(st);
    return 0;
}
