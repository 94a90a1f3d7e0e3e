/* internal.h — helpers shared by the core's modules; not installed, not exported. */
#ifndef MT_CORE_INTERNAL_H
#define MT_CORE_INTERNAL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "moontune/moontune.h"

#if defined(__GNUC__)
#define MT_PRINTF(fmt_index, first_arg) __attribute__((format(printf, fmt_index, first_arg)))
#else
#define MT_PRINTF(fmt_index, first_arg)
#endif

/* Fills err (when not NULL) with a formatted message and returns status, so that
 * a failure site reads: return mt_error_set(err, MT_ERR_FORMAT, "%s: ...", path); */
mt_status mt_error_set(mt_error *err, mt_status status, const char *fmt, ...) MT_PRINTF(3, 4);

/* Overflow-checked size arithmetic: return 0 and leave *out untouched on overflow. */
static inline int mt_mul_size(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return 0;
    *out = a * b;
    return 1;
}
static inline int mt_add_size(size_t a, size_t b, size_t *out) {
    if (b > SIZE_MAX - a) return 0;
    *out = a + b;
    return 1;
}

/* Carves consecutive 64-byte aligned regions out of one allocation. A first pass with
 * base == NULL only adds up the size; a second pass with the allocation hands out the
 * same regions (llm.c's "one allocation, named arrays" planning). */
typedef struct mt_carver {
    char *base;
    size_t offset;
} mt_carver;

static inline void *mt_carve(mt_carver *cv, size_t count, size_t elem) {
    void *p = cv->base ? cv->base + cv->offset : NULL;
    cv->offset += (count * elem + 63) & ~(size_t)63;
    return p;
}

/* Checked allocation helpers: NULL and an MT_ERR_NOMEM message naming `what` on failure. */
void *mt_malloc(size_t bytes, const char *what, mt_error *err);
void *mt_calloc(size_t count, size_t size, const char *what, mt_error *err);
char *mt_strdup(const char *s, const char *what, mt_error *err);

/* Reads a whole (small) file into a NUL-terminated buffer; *len excludes the NUL. */
/* The index of the first NaN or infinity among x[0, n), or n when all are finite. */
size_t mt_first_nonfinite(const float *x, size_t n);

/* Strict UTF-8 (no overlongs, no surrogates, at most U+10FFFF): the offset of the first
 * byte that starts no valid character, or n when all of s is valid. */
size_t mt_utf8_bad_at(const unsigned char *s, size_t n);

/* What kind of JSON value v is, for errors that say what was found ("an integer"). */
struct json_t;
const char *mt_json_kind(const struct json_t *v);

mt_status mt_read_file(const char *path, char **out, size_t *len, mt_error *err);

/* Joins dir and name with one '/', into a fresh allocation. */
char *mt_path_join(const char *dir, const char *name, mt_error *err);

/* Writes `bytes` to path atomically: a temporary file in the same directory,
 * fsync, rename over path, fsync of the directory. */
mt_status mt_write_file_atomic(const char *path, const void *data, size_t bytes, mt_error *err);

/* Whether a path names a GGUF file (by its .gguf suffix). */
int mt_path_is_gguf(const char *path);

/* Monotonic wall-clock seconds. */
double mt_now_seconds(void);

#endif /* MT_CORE_INTERNAL_H */
