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
mt_status mt_error_setv(mt_error *err, mt_status status, const char *fmt, va_list ap)
    MT_PRINTF(3, 0);

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
/* Zero-filled memory aligned to 64 bytes, its size rounded up to a multiple of 64 (at
 * least 64); NULL when out of memory or when the size overflows. free() releases it.
 * The CPU backend's device memory and the plugins' host->alloc both come from here. */
void *mt_alloc_aligned(size_t bytes);

/* splitmix64: a state advanced by a constant, mixed (mt_mix64); the same stream on
 * every platform, and it seeds well from 0. */
uint64_t mt_splitmix64(uint64_t *state);

/* The index of the first NaN or infinity among x[0, n), or n when all are finite. */
size_t mt_first_nonfinite(const float *x, size_t n);

/* ---- UTF-8: strict (no overlongs, no surrogates, at most U+10FFFF), as Rust's
 * str::from_utf8 and `tokenizers`; every reader and writer of UTF-8 uses these ---- */

/* Decodes the character at s[0, n) (n >= 1): its length in bytes, or 0 when s starts
 * no valid character (then *cp is untouched). */
static inline size_t mt_utf8_decode(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    if (c < 0xC2 || c > 0xF4) return 0;
    size_t len = c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    if (n < len) return 0;
    unsigned lo = 0x80, hi = 0xBF; /* the second byte's range excludes overlongs and surrogates */
    if (c == 0xE0) lo = 0xA0;
    else if (c == 0xED) hi = 0x9F;
    else if (c == 0xF0) lo = 0x90;
    else if (c == 0xF4) hi = 0x8F;
    if (s[1] < lo || s[1] > hi) return 0;
    for (size_t k = 2; k < len; k++)
        if ((s[k] & 0xC0) != 0x80) return 0;
    uint32_t v = c & (0x7Fu >> len);
    for (size_t k = 1; k < len; k++) v = v << 6 | (s[k] & 0x3F);
    *cp = v;
    return len;
}

/* Encodes cp (at most U+10FFFF) into out[0, 4): the number of bytes written. */
static inline size_t mt_utf8_encode(uint32_t cp, char *out) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | cp >> 6);
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | cp >> 12);
        out[1] = (char)(0x80 | (cp >> 6 & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | cp >> 18);
    out[1] = (char)(0x80 | (cp >> 12 & 0x3F));
    out[2] = (char)(0x80 | (cp >> 6 & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* The offset of the first byte that starts no valid character, or n when all of s is
 * valid. */
size_t mt_utf8_bad_at(const unsigned char *s, size_t n);

/* What kind of JSON value v is, for errors that say what was found ("an integer"). */
struct json_t;
const char *mt_json_kind(const struct json_t *v);

/* Maps a whole regular file read-only: *map and *len (NULL and 0 for an empty file,
 * which mmap refuses; the caller's format check reports it). Errors name the path, and
 * `what` ("GGUF", "safetensors") when the path is not a regular file. Release with
 * mt_unmap_file. */
mt_status mt_map_file(const char *path, const char *what, const unsigned char **map, size_t *len,
                      mt_error *err);
void mt_unmap_file(const unsigned char *map, size_t len);

/* Reads a whole (small) file into a NUL-terminated buffer; *len excludes the NUL. */
mt_status mt_read_file(const char *path, char **out, size_t *len, mt_error *err);

/* Joins dir and name with one '/', into a fresh allocation. */
char *mt_path_join(const char *dir, const char *name, mt_error *err);

/* A growing byte buffer for files built in memory (GGUF headers, example caches): put
 * appends, and a failed allocation sets oom, after which puts are ignored, so a writer
 * checks oom once at the end. Free p when done. */
typedef struct mt_bytebuf {
    unsigned char *p;
    size_t n, cap;
    int oom;
} mt_bytebuf;
void mt_bytebuf_put(mt_bytebuf *b, const void *data, size_t n);

/* Writes `bytes` to path atomically: a temporary file in the same directory,
 * fsync, rename over path, fsync of the directory. */
mt_status mt_write_file_atomic(const char *path, const void *data, size_t bytes, mt_error *err);

/* The same, streamed, for files too large to build in memory (safetensors, GGUF):
 * open, write as often as needed, then commit (fsync, rename, fsync of the directory)
 * or abort (the temporary file is removed). Every writer of a file goes through here.
 * A failed write leaves the file open: the caller aborts; a failed commit aborts itself. */
typedef struct mt_atomic_file {
    int fd;
    char *tmp;  /* path.tmp.PID */
    char *path; /* the final name */
} mt_atomic_file;
mt_status mt_atomic_open(mt_atomic_file *f, const char *path, mt_error *err);
mt_status mt_atomic_write(mt_atomic_file *f, const void *data, size_t bytes, mt_error *err);
mt_status mt_atomic_commit(mt_atomic_file *f, mt_error *err);
void mt_atomic_abort(mt_atomic_file *f);
/* Whether the file name `name` is a temporary file of an atomic write of `final_name`
 * (the remains of a writer killed before its rename). */
int mt_atomic_is_tmp_of(const char *name, const char *final_name);

/* Splits a command-line "key=value": the key (non-empty, shorter than key_size) into
 * key, *value at what follows the first '='. MT_ERR_INVALID_ARG with a message naming
 * `what` ("--set", "--adapter-option") otherwise. */
mt_status mt_split_kv(const char *what, const char *arg, char *key, size_t key_size,
                      const char **value, mt_error *err);

/* Whether s ends with suffix. */
int mt_ends_with(const char *s, const char *suffix);
/* Whether path names a directory (following links). */
int mt_is_dir(const char *path);

/* Whether a path names a GGUF file (by its .gguf suffix). */
int mt_path_is_gguf(const char *path);

/* Monotonic wall-clock seconds. */
double mt_now_seconds(void);

#endif /* MT_CORE_INTERNAL_H */
