/* util.c — errors, dtypes, half-precision conversion, small file helpers. */
#define _POSIX_C_SOURCE 200809L
#include "base/internal.h"
#include "moontune/plugin.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

const char *mt_status_name(mt_status status) {
    switch (status) {
    case MT_OK: return "ok";
    case MT_ERR_IO: return "io error";
    case MT_ERR_FORMAT: return "format error";
    case MT_ERR_UNSUPPORTED: return "unsupported";
    case MT_ERR_INVALID_ARG: return "invalid argument";
    case MT_ERR_NOMEM: return "out of memory";
    case MT_ERR_BACKEND: return "backend error";
    case MT_ERR_NUMERIC: return "numeric error";
    }
    return "unknown status";
}

mt_status mt_error_setv(mt_error *err, mt_status status, const char *fmt, va_list ap) {
    if (err) {
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        err->status = status;
    }
    return status;
}

mt_status mt_error_set(mt_error *err, mt_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    mt_error_setv(err, status, fmt, ap);
    va_end(ap);
    return status;
}

void *mt_alloc_aligned(size_t bytes) {
    size_t rounded;
    if (!mt_add_size(bytes, 63, &rounded)) return NULL;
    rounded = rounded / 64 * 64;
    if (rounded == 0) rounded = 64;
    void *p = aligned_alloc(64, rounded);
    if (p) memset(p, 0, rounded);
    return p;
}

uint64_t mt_splitmix64(uint64_t *state) {
    uint64_t z = mt_mix64(*state);
    *state += 0x9E3779B97F4A7C15ull;
    return z;
}

void *mt_malloc(size_t bytes, const char *what, mt_error *err) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) mt_error_set(err, MT_ERR_NOMEM, "out of memory allocating %zu bytes for %s", bytes, what);
    return p;
}

void *mt_calloc(size_t count, size_t size, const char *what, mt_error *err) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p)
        mt_error_set(err, MT_ERR_NOMEM, "out of memory allocating %zu x %zu bytes for %s", count,
                     size, what);
    return p;
}

char *mt_strdup(const char *s, const char *what, mt_error *err) {
    size_t n = strlen(s) + 1;
    char *p = mt_malloc(n, what, err);
    if (p) memcpy(p, s, n);
    return p;
}

static const char *const dtype_names[MT_DTYPE_COUNT] = {
    [MT_F32] = "F32", [MT_F16] = "F16", [MT_BF16] = "BF16",
    [MT_I32] = "I32", [MT_I64] = "I64", [MT_U8] = "U8",
};

const char *mt_dtype_name(mt_dtype dtype) {
    return (unsigned)dtype < MT_DTYPE_COUNT ? dtype_names[dtype] : NULL;
}

/* IEEE half <-> single, exact for every half value, round-to-nearest-even on the way down. */
float mt_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            int e = -1;
            do {
                e++;
                mant <<= 1;
            } while (!(mant & 0x400u));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

uint16_t mt_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) /* inf or nan */
        return (uint16_t)(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0));
    if (absx >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to inf */
    if (absx < 0x38800000u) {                                   /* subnormal or zero in half */
        if (absx < 0x33000000u) return (uint16_t)sign;          /* below half the smallest */
        uint32_t mant = (absx & 0x7fffffu) | 0x800000u;
        int shift = 126 - (int)(absx >> 23); /* 14..24 */
        uint32_t half_mant = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1);
        uint32_t halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (half_mant & 1))) half_mant++;
        return (uint16_t)(sign | half_mant);
    }
    uint32_t bits = absx - 0x38000000u; /* rebias exponent by 112 */
    uint32_t h = bits >> 13;
    uint32_t rem = bits & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

float mt_bf16_to_f32(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

uint16_t mt_f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u); /* quiet nan */
    uint32_t lsb = (x >> 16) & 1u;
    x += 0x7fffu + lsb;
    return (uint16_t)(x >> 16);
}

/* Opens path read-only, refusing anything but a regular file (a directory opens for
 * reading on Linux): its descriptor and size. `what` names the kind expected in the
 * refusal ("GGUF"), or NULL for any file. */
static mt_status open_regular(const char *path, const char *what, int *fd_out, size_t *size,
                              mt_error *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return mt_error_set(err, MT_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    mt_status st = MT_OK;
    if (fstat(fd, &sb) != 0)
        st = mt_error_set(err, MT_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    else if (!S_ISREG(sb.st_mode) && what)
        st = mt_error_set(err, MT_ERR_IO, "%s: expected a regular %s file, found %s", path, what,
                          S_ISDIR(sb.st_mode) ? "a directory" : "a special file");
    else if (!S_ISREG(sb.st_mode))
        st = mt_error_set(err, MT_ERR_IO, "%s: not a regular file%s", path,
                          S_ISDIR(sb.st_mode) ? " (a directory)" : "");
    else if ((uint64_t)sb.st_size >= (uint64_t)SIZE_MAX) /* only on 32-bit hosts */
        st = mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: file of %lld bytes is too large to map",
                          path, (long long)sb.st_size);
    if (st != MT_OK) {
        close(fd);
        return st;
    }
    *fd_out = fd;
    *size = (size_t)sb.st_size;
    return MT_OK;
}

mt_status mt_read_file(const char *path, char **out, size_t *len, mt_error *err) {
    int fd = -1;
    size_t size = 0;
    mt_status st = open_regular(path, NULL, &fd, &size, err);
    if (st != MT_OK) return st;
    char *buf = mt_malloc(size + 1, path, err);
    if (!buf) {
        close(fd);
        return MT_ERR_NOMEM;
    }
    size_t got = 0;
    while (got < size) {
        ssize_t r = read(fd, buf + got, size - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    close(fd);
    if (got != size) {
        free(buf);
        return mt_error_set(err, MT_ERR_IO, "%s: short read (%zu of %zu bytes)", path, got, size);
    }
    buf[size] = '\0';
    *out = buf;
    if (len) *len = size;
    return MT_OK;
}

char *mt_path_join(const char *dir, const char *name, mt_error *err) {
    size_t a = strlen(dir), b = strlen(name);
    int slash = a > 0 && dir[a - 1] != '/';
    char *p = mt_malloc(a + (size_t)slash + b + 1, "path", err);
    if (!p) return NULL;
    memcpy(p, dir, a);
    if (slash) p[a] = '/';
    memcpy(p + a + slash, name, b + 1);
    return p;
}

/* Make a rename durable: fsync the directory. Best effort: some file systems refuse
 * directory opens, which is no failure. */
static void fsync_parent_dir(const char *path) {
    char *copy = strdup(path);
    if (!copy) return;
    int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    free(copy);
    if (fd < 0) return;
    (void)fsync(fd);
    close(fd);
}

/* A temporary file is named <final name>.tmp.<pid>. */
#define ATOMIC_TMP_INFIX ".tmp."

int mt_atomic_is_tmp_of(const char *name, const char *final_name) {
    size_t n = strlen(final_name);
    return !strncmp(name, final_name, n) && !strncmp(name + n, ATOMIC_TMP_INFIX, strlen(ATOMIC_TMP_INFIX));
}

mt_status mt_atomic_open(mt_atomic_file *f, const char *path, mt_error *err) {
    memset(f, 0, sizeof *f);
    f->fd = -1;
    size_t n = strlen(path) + 32;
    if (!(f->path = mt_strdup(path, "path", err)) || !(f->tmp = mt_malloc(n, "temporary path", err))) {
        mt_atomic_abort(f);
        return MT_ERR_NOMEM;
    }
    snprintf(f->tmp, n, "%s" ATOMIC_TMP_INFIX "%ld", path, (long)getpid());
    f->fd = open(f->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (f->fd < 0) {
        mt_status st = mt_error_set(err, MT_ERR_IO, "%s: cannot create: %s", f->tmp, strerror(errno));
        mt_atomic_abort(f);
        return st;
    }
    return MT_OK;
}

mt_status mt_atomic_write(mt_atomic_file *f, const void *data, size_t bytes, mt_error *err) {
    const unsigned char *p = data;
    while (bytes > 0) {
        /* at most 1 GiB a call: Linux writes no more than about 2 GiB at once */
        size_t chunk = bytes > ((size_t)1 << 30) ? ((size_t)1 << 30) : bytes;
        ssize_t w = write(f->fd, p, chunk);
        if (w < 0) {
            if (errno == EINTR) continue;
            return mt_error_set(err, MT_ERR_IO, "%s: write failed: %s", f->tmp, strerror(errno));
        }
        p += w;
        bytes -= (size_t)w;
    }
    return MT_OK;
}

mt_status mt_atomic_commit(mt_atomic_file *f, mt_error *err) {
    mt_status st = MT_OK;
    if (fsync(f->fd) != 0)
        st = mt_error_set(err, MT_ERR_IO, "%s: fsync failed: %s", f->tmp, strerror(errno));
    if (close(f->fd) != 0 && st == MT_OK)
        st = mt_error_set(err, MT_ERR_IO, "%s: close failed: %s", f->tmp, strerror(errno));
    f->fd = -1;
    if (st == MT_OK && rename(f->tmp, f->path) != 0)
        st = mt_error_set(err, MT_ERR_IO, "%s: cannot rename %s into place: %s", f->path, f->tmp,
                          strerror(errno));
    if (st != MT_OK) {
        mt_atomic_abort(f);
        return st;
    }
    fsync_parent_dir(f->path);
    free(f->tmp);
    free(f->path);
    f->tmp = f->path = NULL;
    return MT_OK;
}

void mt_atomic_abort(mt_atomic_file *f) {
    if (f->fd >= 0) close(f->fd);
    if (f->tmp) unlink(f->tmp);
    free(f->tmp);
    free(f->path);
    f->fd = -1;
    f->tmp = f->path = NULL;
}

mt_status mt_write_file_atomic(const char *path, const void *data, size_t bytes, mt_error *err) {
    mt_atomic_file f;
    mt_status st = mt_atomic_open(&f, path, err);
    if (st == MT_OK && (st = mt_atomic_write(&f, data, bytes, err)) != MT_OK) mt_atomic_abort(&f);
    return st == MT_OK ? mt_atomic_commit(&f, err) : st;
}

mt_status mt_split_kv(const char *what, const char *arg, char *key, size_t key_size,
                      const char **value, mt_error *err) {
    const char *eq = strchr(arg, '=');
    if (!eq || eq == arg)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s %s: expected key=value", what, arg);
    size_t n = (size_t)(eq - arg);
    if (n >= key_size)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s %.64s...: the key is longer than %zu bytes",
                            what, arg, key_size - 1);
    memcpy(key, arg, n);
    key[n] = '\0';
    *value = eq + 1;
    return MT_OK;
}

mt_status mt_map_file(const char *path, const char *what, const unsigned char **map, size_t *len,
                      mt_error *err) {
    *map = NULL;
    *len = 0;
    int fd = -1;
    size_t n = 0;
    mt_status st = open_regular(path, what, &fd, &n, err);
    if (st != MT_OK) return st;
    if (n == 0) { /* mmap refuses 0 bytes */
        close(fd);
        return MT_OK;
    }
    void *p = mmap(NULL, n, PROT_READ, MAP_PRIVATE, fd, 0);
    int saved = errno;
    close(fd);
    if (p == MAP_FAILED)
        return mt_error_set(err, MT_ERR_IO, "%s: cannot map %zu bytes: %s", path, n, strerror(saved));
    *map = p;
    *len = n;
    return MT_OK;
}

void mt_unmap_file(const unsigned char *map, size_t len) {
    if (map) munmap((void *)map, len);
}

int mt_ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && !memcmp(s + n - k, suffix, k);
}

int mt_is_dir(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

int mt_path_is_gguf(const char *path) {
    size_t n = strlen(path);
    return n > 5 && !strcmp(path + n - 5, ".gguf");
}

double mt_now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

const char *mt_json_kind(const json_t *v) {
    if (!v) return "nothing";
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a real number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    }
    return "an unknown value";
}

/* Strict UTF-8 (no overlongs, no surrogates, at most U+10FFFF). Returns the offset of the
 * first bad byte, or n when all is well. */
size_t mt_utf8_bad_at(const unsigned char *s, size_t n) {
    size_t i = 0;
    uint32_t cp;
    while (i < n) {
        size_t len = mt_utf8_decode(s + i, n - i, &cp);
        if (!len) return i;
        i += len;
    }
    return n;
}

size_t mt_first_nonfinite(const float *x, size_t n) {
    /* a bit test per value (NaN and infinity have every exponent bit set), branch-free
     * so it vectorizes; the exact index is looked for only in a block that has one */
    enum { BLOCK = 4096 };
    for (size_t i0 = 0; i0 < n; i0 += BLOCK) {
        const size_t i1 = n - i0 < BLOCK ? n : i0 + BLOCK;
        uint32_t any = 0;
        for (size_t i = i0; i < i1; i++) {
            uint32_t b;
            memcpy(&b, x + i, sizeof b);
            any |= (b & 0x7F800000u) == 0x7F800000u;
        }
        if (any)
            for (size_t i = i0; i < i1; i++)
                if (!isfinite(x[i])) return i;
    }
    return n;
}

void mt_bytebuf_put(mt_bytebuf *b, const void *data, size_t n) {
    if (b->oom || !n) return;
    if (n > SIZE_MAX - b->n) {
        b->oom = 1;
        return;
    }
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + n) cap = cap > SIZE_MAX / 2 ? b->n + n : cap * 2;
        unsigned char *q = realloc(b->p, cap);
        if (!q) {
            b->oom = 1;
            return;
        }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->n, data, n);
    b->n += n;
}
