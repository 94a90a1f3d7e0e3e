/* gguf.c — memory-mapped GGUF reader (versions 2 and 3) and fp32
 * dequantization.
 *
 * Layout of a file, all little-endian:
 *   "GGUF"  u32 version  u64 tensor_count  u64 kv_count
 *   kv_count times:     string key, u32 value type, value
 *   tensor_count times: string name, u32 n_dims, u64 ne[n_dims], u32 ggml type,
 * u64 offset padding to general.alignment (default 32), then the tensor data;
 * each offset is relative to the start of the data and a multiple of the
 * alignment. A string is a u64 byte count and the bytes (no NUL); an array is a
 * u32 element type, a u64 count and the elements.
 *
 * Validation follows ggml's gguf.cpp and then some: bounded key, string and
 * array lengths, every count checked against the bytes left before anything is
 * allocated, no nested arrays, bools of 0 or 1, unique keys and tensor names in
 * well-formed UTF-8,
 * n_dims <= 4, element counts and byte sizes overflow-checked, ne[0] a multiple
 * of the block size, tensor data aligned, inside the file and not overlapping.
 * Every error names the file and the key or tensor, and says what was expected
 * and what was found.
 *
 * Tensor types: all of ggml's types are known by name and size, so their data
 * is bounds-checked; a type number ggml does not define is listed with nbytes 0
 * and refused by mt_gguf_dequantize, as is every known type outside the eight
 * that dequantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K). */
#define _POSIX_C_SOURCE 200809L
#include "formats/gguf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "base/internal.h"

#if defined(__clang__)
/* Dequantization must round like ggml's reference and gguf-py: no fused
 * multiply-add. */
#pragma STDC FP_CONTRACT OFF
#endif

#define GGUF_MAGIC "GGUF"
#define GGUF_DEFAULT_ALIGNMENT 32u
#define GGUF_MAX_KEY_BYTES 65535u
#define GGUF_MAX_STRING_BYTES (64u << 20)
#define GGUF_MAX_NAME_BYTES 63u /* ggml's GGML_MAX_NAME (64) less the NUL */
#define GGUF_MAX_DIMS 4u

/* ---- type tables ------------------------------------------------------------
 */

static const struct {
    const char *name;
    size_t size; /* 0: variable (string) or composite (array) */
} value_types[] = {
    [MT_GGUF_UINT8] = {"UINT8", 1},     [MT_GGUF_INT8] = {"INT8", 1},
    [MT_GGUF_UINT16] = {"UINT16", 2},   [MT_GGUF_INT16] = {"INT16", 2},
    [MT_GGUF_UINT32] = {"UINT32", 4},   [MT_GGUF_INT32] = {"INT32", 4},
    [MT_GGUF_FLOAT32] = {"FLOAT32", 4}, [MT_GGUF_BOOL] = {"BOOL", 1},
    [MT_GGUF_STRING] = {"STRING", 0},   [MT_GGUF_ARRAY] = {"ARRAY", 0},
    [MT_GGUF_UINT64] = {"UINT64", 8},   [MT_GGUF_INT64] = {"INT64", 8},
    [MT_GGUF_FLOAT64] = {"FLOAT64", 8},
};
#define N_VALUE_TYPES (sizeof value_types / sizeof value_types[0])

static const char *value_type_name(uint32_t t) {
    return t < N_VALUE_TYPES ? value_types[t].name : "(unknown)";
}

static int is_unsigned_type(uint32_t t) {
    return t == MT_GGUF_UINT8 || t == MT_GGUF_UINT16 || t == MT_GGUF_UINT32 || t == MT_GGUF_UINT64;
}
static int is_signed_type(uint32_t t) {
    return t == MT_GGUF_INT8 || t == MT_GGUF_INT16 || t == MT_GGUF_INT32 || t == MT_GGUF_INT64;
}

/* Every type ggml defines (ggml.h, enum ggml_type): elements per block, bytes
 * per block. Numbers ggml retired (4, 5, 31-33, 36-38) are left out and count
 * as unknown. */
static const struct {
    const char *name;
    uint32_t block;
    uint32_t size;
} ggml_types[] = {
    [0] = {"F32", 1, 4},         [1] = {"F16", 1, 2},         [2] = {"Q4_0", 32, 18},
    [3] = {"Q4_1", 32, 20},      [6] = {"Q5_0", 32, 22},      [7] = {"Q5_1", 32, 24},
    [8] = {"Q8_0", 32, 34},      [9] = {"Q8_1", 32, 40},      [10] = {"Q2_K", 256, 84},
    [11] = {"Q3_K", 256, 110},   [12] = {"Q4_K", 256, 144},   [13] = {"Q5_K", 256, 176},
    [14] = {"Q6_K", 256, 210},   [15] = {"Q8_K", 256, 292},   [16] = {"IQ2_XXS", 256, 66},
    [17] = {"IQ2_XS", 256, 74},  [18] = {"IQ3_XXS", 256, 98}, [19] = {"IQ1_S", 256, 50},
    [20] = {"IQ4_NL", 32, 18},   [21] = {"IQ3_S", 256, 110},  [22] = {"IQ2_S", 256, 82},
    [23] = {"IQ4_XS", 256, 136}, [24] = {"I8", 1, 1},         [25] = {"I16", 1, 2},
    [26] = {"I32", 1, 4},        [27] = {"I64", 1, 8},        [28] = {"F64", 1, 8},
    [29] = {"IQ1_M", 256, 56},   [30] = {"BF16", 1, 2},       [34] = {"TQ1_0", 256, 54},
    [35] = {"TQ2_0", 256, 66},   [39] = {"MXFP4", 32, 17},    [40] = {"NVFP4", 64, 36},
    [41] = {"Q1_0", 128, 18},
};
#define N_GGML_TYPES (sizeof ggml_types / sizeof ggml_types[0])

const char *mt_ggml_type_name(uint32_t type) {
    return type < N_GGML_TYPES ? ggml_types[type].name : NULL;
}

static const char *ggml_label(uint32_t type) {
    const char *n = mt_ggml_type_name(type);
    return n ? n : "an unknown type";
}

/* ---- the handle
 * ---------------------------------------------------------------- */

typedef struct gguf_kv {
    char *key; /* NUL-terminated copy */
    mt_gguf_value v;
    const unsigned char **strs; /* string arrays: each element's 8-byte length prefix */
} gguf_kv;

typedef struct gguf_tinfo {
    uint64_t offset; /* relative to the data section */
    size_t index;    /* position in the file, for messages */
} gguf_tinfo;

struct mt_gguf {
    char *path;
    const unsigned char *map;
    size_t map_len;
    uint32_t version;
    size_t alignment;
    size_t data_off; /* absolute offset of the data section */
    gguf_kv *kvs;    /* in file order */
    size_t nkv;
    const gguf_kv **kv_sorted; /* sorted by key */
    mt_gguf_tensor *tensors;   /* in file order; names are owned copies */
    size_t ntensors;
    const mt_gguf_tensor **t_sorted; /* sorted by name */
};

/* ---- messages
 * ------------------------------------------------------------------ */

/* A key or name fit for a message: at most ~96 bytes, non-printable bytes as
 * '?'. */
static const char *clip(const char *s, size_t n, char *buf, size_t cap) {
    size_t lim = cap - 4, o = 0;
    for (size_t i = 0; i < n && o < lim; i++) {
        unsigned char c = (unsigned char)s[i];
        buf[o++] = (c >= 0x20 && c < 0x7f) || c >= 0x80 ? (char)c : '?';
    }
    if (n > lim) {
        memcpy(buf + o, "...", 3);
        o += 3;
    }
    buf[o] = '\0';
    return buf;
}

/* ---- a bounds-checked cursor over the mapping
 * ------------------------------------ */

typedef struct cursor {
    const char *path;
    const unsigned char *p;
    size_t len, pos;
    const char *field; /* "key 'x'", "tensor 3 'y'", "header": names what is being read */
} cursor;

static mt_status need(cursor *c, size_t n, const char *what, mt_error *err) {
    if (n <= c->len - c->pos) return MT_OK;
    return mt_error_set(err, MT_ERR_FORMAT,
                        "%s: %s: truncated file: expected %zu bytes of %s at byte %zu, found %zu "
                        "(the file ends at byte %zu)",
                        c->path, c->field, n, what, c->pos, c->len - c->pos, c->len);
}

static uint64_t load_le(const unsigned char *p, size_t n) {
    uint64_t v = 0;
    for (size_t i = n; i-- > 0;) v = (v << 8) | p[i];
    return v;
}

static mt_status read_u32(cursor *c, uint32_t *out, const char *what, mt_error *err) {
    mt_status st = need(c, 4, what, err);
    if (st != MT_OK) return st;
    *out = (uint32_t)load_le(c->p + c->pos, 4);
    c->pos += 4;
    return MT_OK;
}

static mt_status read_u64(cursor *c, uint64_t *out, const char *what, mt_error *err) {
    mt_status st = need(c, 8, what, err);
    if (st != MT_OK) return st;
    *out = load_le(c->p + c->pos, 8);
    c->pos += 8;
    return MT_OK;
}

/* A string of at most max bytes: *s points into the mapping. */
static mt_status read_string(cursor *c, uint64_t max, const char **s, uint64_t *n, const char *what,
                             mt_error *err) {
    char lenwhat[96];
    snprintf(lenwhat, sizeof lenwhat, "the length of %s", what);
    uint64_t len;
    mt_status st = read_u64(c, &len, lenwhat, err);
    if (st != MT_OK) return st;
    if (len > max)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: %s: %s of %llu bytes at byte %zu exceeds the limit of %llu bytes",
                            c->path, c->field, what, (unsigned long long)len, c->pos - 8,
                            (unsigned long long)max);
    if (len > c->len - c->pos)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: %s: truncated file: %s of %llu bytes at byte %zu runs past the "
                            "end of the file (%zu bytes left)",
                            c->path, c->field, what, (unsigned long long)len, c->pos,
                            c->len - c->pos);
    *s = (const char *)(c->p + c->pos);
    *n = len;
    c->pos += (size_t)len;
    return MT_OK;
}

/* ---- metadata
 * ------------------------------------------------------------------ */

/* Widens one scalar of a numeric or bool type at p into v->num. */
static mt_status decode_scalar(cursor *c, uint32_t type, const unsigned char *p, mt_gguf_value *v,
                               mt_error *err) {
    size_t n = value_types[type].size;
    uint64_t raw = load_le(p, n);
    switch (type) {
    case MT_GGUF_UINT8:
    case MT_GGUF_UINT16:
    case MT_GGUF_UINT32:
    case MT_GGUF_UINT64: v->num.u64 = raw; break;
    case MT_GGUF_INT8: v->num.i64 = (int8_t)(uint8_t)raw; break;
    case MT_GGUF_INT16: v->num.i64 = (int16_t)(uint16_t)raw; break;
    case MT_GGUF_INT32: v->num.i64 = (int32_t)(uint32_t)raw; break;
    case MT_GGUF_INT64: v->num.i64 = (int64_t)raw; break;
    case MT_GGUF_FLOAT32: {
        uint32_t u = (uint32_t)raw;
        float f;
        memcpy(&f, &u, sizeof f);
        v->num.f64 = f;
        break;
    }
    case MT_GGUF_FLOAT64: {
        double d;
        memcpy(&d, &raw, sizeof d);
        v->num.f64 = d;
        break;
    }
    case MT_GGUF_BOOL:
        if (raw > 1)
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: %s: expected a BOOL of 0 or 1 at byte %zu, found %u", c->path,
                                c->field, (size_t)(p - c->p), (unsigned)raw);
        v->num.boolean = (int)raw;
        break;
    default: break;
    }
    return MT_OK;
}

static mt_status read_array(cursor *c, gguf_kv *kv, mt_error *err) {
    mt_gguf_value *v = &kv->v;
    uint32_t et;
    uint64_t count;
    mt_status st = read_u32(c, &et, "the array element type", err);
    if (st != MT_OK) return st;
    if (et == MT_GGUF_ARRAY)
        return mt_error_set(err, MT_ERR_UNSUPPORTED,
                            "%s: %s: nested arrays are not supported (expected an array of "
                            "numbers, bools or strings, found an array of arrays)",
                            c->path, c->field);
    if (et >= N_VALUE_TYPES)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: %s: unknown array element type %u (expected 0 to %zu)", c->path,
                            c->field, et, N_VALUE_TYPES - 1);
    st = read_u64(c, &count, "the array length", err);
    if (st != MT_OK) return st;
    size_t left = c->len - c->pos;
    size_t esize = et == MT_GGUF_STRING ? 8 : value_types[et].size; /* a string: >= 8 bytes */
    if (count > left / esize)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: %s: array length %llu at byte %zu: %llu %s elements of at least "
                            "%zu bytes each do not fit in the %zu bytes left in the file",
                            c->path, c->field, (unsigned long long)count, c->pos - 8,
                            (unsigned long long)count, value_types[et].name, esize, left);
    v->arr_type = (mt_gguf_type)et;
    v->arr_len = count;
    v->arr_data = c->p + c->pos;
    if (et == MT_GGUF_STRING) {
        if (count > 0) {
            kv->strs = mt_calloc((size_t)count, sizeof *kv->strs, "GGUF string array", err);
            if (!kv->strs) return MT_ERR_NOMEM;
        }
        for (uint64_t i = 0; i < count; i++) {
            char what[64];
            snprintf(what, sizeof what, "string element %llu", (unsigned long long)i);
            const char *s;
            uint64_t n;
            kv->strs[i] = c->p + c->pos;
            st = read_string(c, GGUF_MAX_STRING_BYTES, &s, &n, what, err);
            if (st != MT_OK) return st;
        }
        return MT_OK;
    }
    size_t bytes = (size_t)count * esize; /* bounded by the bytes left above */
    if (et == MT_GGUF_BOOL) {
        for (size_t i = 0; i < bytes; i++) {
            if (c->p[c->pos + i] > 1)
                return mt_error_set(err, MT_ERR_FORMAT,
                                    "%s: %s: element %zu of a BOOL array: expected 0 or 1, "
                                    "found %u",
                                    c->path, c->field, i, (unsigned)c->p[c->pos + i]);
        }
    }
    c->pos += bytes;
    return MT_OK;
}

static mt_status read_value(cursor *c, gguf_kv *kv, uint32_t type, mt_error *err) {
    mt_gguf_value *v = &kv->v;
    if (type >= N_VALUE_TYPES)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: %s: unknown value type %u at byte %zu (expected 0 to %zu)",
                            c->path, c->field, type, c->pos - 4, N_VALUE_TYPES - 1);
    v->type = (mt_gguf_type)type;
    if (type == MT_GGUF_STRING)
        return read_string(c, GGUF_MAX_STRING_BYTES, &v->str, &v->str_len, "the string value", err);
    if (type == MT_GGUF_ARRAY) return read_array(c, kv, err);
    size_t n = value_types[type].size;
    char what[48];
    snprintf(what, sizeof what, "the %s value", value_types[type].name);
    mt_status st = need(c, n, what, err);
    if (st != MT_OK) return st;
    st = decode_scalar(c, type, c->p + c->pos, v, err);
    c->pos += n;
    return st;
}

/* ---- opening
 * ------------------------------------------------------------------- */

static int cmp_kv_ptr(const void *a, const void *b) {
    const gguf_kv *x = *(const gguf_kv *const *)a, *y = *(const gguf_kv *const *)b;
    int c = strcmp(x->key, y->key);
    return c ? c : (x < y ? -1 : x > y);
}
static int cmp_tensor_ptr(const void *a, const void *b) {
    const mt_gguf_tensor *x = *(const mt_gguf_tensor *const *)a;
    const mt_gguf_tensor *y = *(const mt_gguf_tensor *const *)b;
    int c = strcmp(x->name, y->name);
    return c ? c : (x < y ? -1 : x > y);
}
static int cmp_tinfo(const void *a, const void *b) {
    const gguf_tinfo *x = a, *y = b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

static mt_status map_file(mt_gguf *g, mt_error *err) {
    return mt_map_file(g->path, "GGUF", &g->map, &g->map_len, err);
}

static mt_status parse_header(mt_gguf *g, cursor *c, uint64_t *ntensors, uint64_t *nkv,
                              mt_error *err) {
    c->field = "header";
    if (c->len < 4 || memcmp(c->p, GGUF_MAGIC, 4) != 0) {
        char found[32] = "";
        size_t n = c->len < 4 ? c->len : 4, used = 0;
        for (size_t i = 0; i < n; i++)
            used += (size_t)snprintf(found + used, sizeof found - used, "%s%02x", i ? " " : "",
                                     c->p[i]);
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: header: bad magic: expected \"GGUF\" (47 47 55 46), found %s%s",
                            c->path, n ? found : "an empty file",
                            n && n < 4 ? " (the file is shorter than the magic)" : "");
    }
    c->pos = 4;
    mt_status st = read_u32(c, &g->version, "the version", err);
    if (st != MT_OK) return st;
    if (g->version == 1)
        return mt_error_set(err, MT_ERR_UNSUPPORTED,
                            "%s: header: version: GGUF version 1 (32-bit lengths) is not "
                            "supported; expected version 2 or 3 (convert the file with a "
                            "current llama.cpp)",
                            c->path);
    if (g->version != 2 && g->version != 3) {
        if ((g->version & 0xFFFFu) == 0)
            return mt_error_set(err, MT_ERR_UNSUPPORTED,
                                "%s: header: version: expected 2 or 3, found 0x%08x, which looks "
                                "like a big-endian GGUF file (only little-endian is supported)",
                                c->path, g->version);
        return mt_error_set(err, MT_ERR_UNSUPPORTED,
                            "%s: header: version: expected 2 or 3, found %u", c->path, g->version);
    }
    st = read_u64(c, ntensors, "tensor_count", err);
    if (st == MT_OK) st = read_u64(c, nkv, "kv_count", err);
    return st;
}

static mt_status parse_kvs(mt_gguf *g, cursor *c, uint64_t nkv, mt_error *err) {
    /* the smallest pair: an 8-byte length, a 1-byte key, a type, a 1-byte value */
    const size_t min_kv = 8 + 1 + 4 + 1;
    if (nkv > (c->len - c->pos) / min_kv)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: header: kv_count: %llu key-value pairs of at least %zu bytes "
                            "each do not fit in the %zu bytes that follow the header",
                            c->path, (unsigned long long)nkv, min_kv, c->len - c->pos);
    if (nkv > 0) {
        g->kvs = mt_calloc((size_t)nkv, sizeof *g->kvs, "GGUF metadata", err);
        g->kv_sorted = mt_calloc((size_t)nkv, sizeof *g->kv_sorted, "GGUF metadata index", err);
        if (!g->kvs || !g->kv_sorted) return MT_ERR_NOMEM;
    }
    char field[160], name[112];
    for (size_t i = 0; i < (size_t)nkv; i++) {
        gguf_kv *kv = &g->kvs[i];
        snprintf(field, sizeof field, "kv %zu (key)", i);
        c->field = field;
        const char *key;
        uint64_t klen;
        mt_status st = read_string(c, GGUF_MAX_KEY_BYTES, &key, &klen, "the key", err);
        if (st != MT_OK) return st;
        if (klen == 0)
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: kv %zu: expected a key of 1 to %u bytes, found an empty key",
                                c->path, i, GGUF_MAX_KEY_BYTES);
        if (memchr(key, '\0', (size_t)klen))
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: kv %zu: key '%s' holds a NUL byte (expected a plain string)",
                                c->path, i, clip(key, (size_t)klen, name, sizeof name));
        size_t bad = mt_utf8_bad_at((const unsigned char *)key, (size_t)klen);
        if (bad < (size_t)klen)
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: kv %zu: the key at byte %zu is not valid UTF-8 (byte 0x%02x at "
                                "offset %zu of the key, after '%s')",
                                c->path, i, c->pos - (size_t)klen, (unsigned)(unsigned char)key[bad],
                                bad, clip(key, bad, name, sizeof name));
        kv->key = malloc((size_t)klen + 1);
        if (!kv->key)
            return mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory copying a key", c->path);
        memcpy(kv->key, key, (size_t)klen);
        kv->key[klen] = '\0';
        g->nkv = i + 1; /* so that close frees what was read */
        snprintf(field, sizeof field, "key '%s'", clip(key, (size_t)klen, name, sizeof name));
        uint32_t type;
        st = read_u32(c, &type, "the value type", err);
        if (st == MT_OK) st = read_value(c, kv, type, err);
        if (st != MT_OK) return st;
    }
    for (size_t i = 0; i < g->nkv; i++) g->kv_sorted[i] = &g->kvs[i];
    if (g->nkv > 1) qsort(g->kv_sorted, g->nkv, sizeof *g->kv_sorted, cmp_kv_ptr);
    for (size_t i = 1; i < g->nkv; i++) {
        size_t a = (size_t)(g->kv_sorted[i - 1] - g->kvs), b = (size_t)(g->kv_sorted[i] - g->kvs);
        if (strcmp(g->kvs[a].key, g->kvs[b].key) == 0) {
            return mt_error_set(
                err, MT_ERR_FORMAT,
                "%s: key '%s': duplicate key (kv %zu and kv %zu); expected each "
                "key once",
                c->path, clip(g->kvs[a].key, strlen(g->kvs[a].key), name, sizeof name), a, b);
        }
    }
    /* the alignment of the tensor data */
    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    const mt_gguf_value *al = mt_gguf_get(g, "general.alignment");
    if (al) {
        if (al->type != MT_GGUF_UINT32)
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: key 'general.alignment': expected type UINT32, found %s",
                                c->path, value_type_name(al->type));
        uint64_t a = al->num.u64;
        if (a == 0 || (a & (a - 1)) != 0)
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: key 'general.alignment': expected a power of two, found %llu",
                                c->path, (unsigned long long)a);
        g->alignment = (size_t)a;
    }
    return MT_OK;
}

static mt_status parse_tensor_info(mt_gguf *g, cursor *c, size_t i, gguf_tinfo *ti, mt_error *err) {
    mt_gguf_tensor *t = &g->tensors[i];
    char field[160], nm[112];
    snprintf(field, sizeof field, "tensor %zu (name)", i);
    c->field = field;
    const char *name;
    uint64_t nlen;
    /* read any length up to the key limit so that a long name gets its own
     * message */
    mt_status st = read_string(c, GGUF_MAX_KEY_BYTES, &name, &nlen, "the tensor name", err);
    if (st != MT_OK) return st;
    if (nlen == 0 || nlen > GGUF_MAX_NAME_BYTES)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: tensor %zu '%s': expected a name of 1 to %u bytes, found %llu "
                            "bytes",
                            c->path, i, clip(name, (size_t)nlen, nm, sizeof nm),
                            GGUF_MAX_NAME_BYTES, (unsigned long long)nlen);
    if (memchr(name, '\0', (size_t)nlen))
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: tensor %zu '%s': the name holds a NUL byte (expected a plain "
                            "string)",
                            c->path, i, clip(name, (size_t)nlen, nm, sizeof nm));
    size_t bad = mt_utf8_bad_at((const unsigned char *)name, (size_t)nlen);
    if (bad < (size_t)nlen)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: tensor %zu: the name at byte %zu is not valid UTF-8 (byte 0x%02x "
                            "at offset %zu of the name, after '%s')",
                            c->path, i, c->pos - (size_t)nlen, (unsigned)(unsigned char)name[bad],
                            bad, clip(name, bad, nm, sizeof nm));
    char *copy = malloc((size_t)nlen + 1);
    if (!copy) return mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory copying a name", c->path);
    memcpy(copy, name, (size_t)nlen);
    copy[nlen] = '\0';
    t->name = copy;
    g->ntensors = i + 1; /* so that close frees the name */
    snprintf(field, sizeof field, "tensor '%s'", copy);

    uint32_t n_dims;
    st = read_u32(c, &n_dims, "n_dims", err);
    if (st != MT_OK) return st;
    if (n_dims > GGUF_MAX_DIMS)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: tensor '%s': n_dims: expected at most %u dimensions, found %u",
                            c->path, copy, GGUF_MAX_DIMS, n_dims);
    t->n_dims = (int)n_dims;
    uint64_t numel = 1;
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < n_dims; d++) {
        char what[16];
        snprintf(what, sizeof what, "ne[%u]", d);
        uint64_t ne;
        st = read_u64(c, &ne, what, err);
        if (st != MT_OK) return st;
        if (ne > (uint64_t)INT64_MAX)
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: tensor '%s': ne[%u]: expected at most %lld, found %llu",
                                c->path, copy, d, (long long)INT64_MAX, (unsigned long long)ne);
        t->ne[d] = (int64_t)ne;
        /* fold left with overflow checks, as ggml does: a later 0 does not excuse
         * it */
        if (ne != 0 && numel > (uint64_t)INT64_MAX / ne)
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: tensor '%s': ne[0..%u]: the element count overflows int64 "
                                "(expected a product of at most %lld)",
                                c->path, copy, d, (long long)INT64_MAX);
        numel *= ne;
    }
    st = read_u32(c, &t->type, "the tensor type", err);
    if (st == MT_OK) st = read_u64(c, &ti->offset, "the data offset", err);
    if (st != MT_OK) return st;
    ti->index = i;
    if (numel > SIZE_MAX)
        return mt_error_set(err, MT_ERR_UNSUPPORTED,
                            "%s: tensor '%s': %llu elements do not fit in this host's size_t",
                            c->path, copy, (unsigned long long)numel);
    const char *tn = mt_ggml_type_name(t->type);
    if (!tn) {
        t->nbytes = 0; /* unknown size: listed, refused by mt_gguf_dequantize */
        return MT_OK;
    }
    uint32_t block = ggml_types[t->type].block;
    if (t->ne[0] % block != 0)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: tensor '%s': ne[0]: expected a multiple of %s's block size %u, "
                            "found %lld",
                            c->path, copy, tn, block, (long long)t->ne[0]);
    if (!mt_mul_size((size_t)numel / block, ggml_types[t->type].size, &t->nbytes))
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: tensor '%s': %llu elements of %s: the byte count overflows",
                            c->path, copy, (unsigned long long)numel, tn);
    return MT_OK;
}

static mt_status parse_tensors(mt_gguf *g, cursor *c, uint64_t ntensors, mt_error *err) {
    /* the smallest info: an 8-byte length, a 1-byte name, n_dims, type, offset */
    const size_t min_info = 8 + 1 + 4 + 4 + 8;
    c->field = "header";
    if (ntensors > (c->len - c->pos) / min_info)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: header: tensor_count: %llu tensor infos of at least %zu bytes "
                            "each do not fit in the %zu bytes left in the file after the "
                            "metadata (byte %zu)",
                            c->path, (unsigned long long)ntensors, min_info, c->len - c->pos,
                            c->pos);
    if (ntensors == 0) return MT_OK;
    size_t n = (size_t)ntensors;
    gguf_tinfo *ti = mt_calloc(n, sizeof *ti, "GGUF tensor offsets", err);
    g->tensors = mt_calloc(n, sizeof *g->tensors, "GGUF tensors", err);
    g->t_sorted = mt_calloc(n, sizeof *g->t_sorted, "GGUF tensor index", err);
    mt_status st = ti && g->tensors && g->t_sorted ? MT_OK : MT_ERR_NOMEM;
    for (size_t i = 0; st == MT_OK && i < n; i++) st = parse_tensor_info(g, c, i, &ti[i], err);
    if (st != MT_OK) {
        free(ti);
        return st;
    }

    /* unique names */
    for (size_t i = 0; i < n; i++) g->t_sorted[i] = &g->tensors[i];
    qsort(g->t_sorted, n, sizeof *g->t_sorted, cmp_tensor_ptr);
    for (size_t i = 1; i < n; i++) {
        const mt_gguf_tensor *a = g->t_sorted[i - 1], *b = g->t_sorted[i];
        if (strcmp(a->name, b->name) == 0) {
            free(ti);
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: tensor '%s': duplicate tensor name (tensors %zu and %zu); "
                                "expected each name once",
                                c->path, a->name, (size_t)(a - g->tensors),
                                (size_t)(b - g->tensors));
        }
    }

    /* the data section starts at the next multiple of the alignment */
    size_t data_off = c->pos, rem = c->pos % g->alignment;
    if (rem && !mt_add_size(c->pos, g->alignment - rem, &data_off)) data_off = SIZE_MAX;
    if (data_off > c->len) {
        free(ti);
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: header: truncated file: the tensor data should start at byte %zu "
                            "(the tensor infos end at byte %zu, padded to the alignment %zu), but "
                            "the file ends at byte %zu",
                            c->path, data_off, c->pos, g->alignment, c->len);
    }
    g->data_off = data_off;
    size_t data_len = c->len - data_off;
    for (size_t i = 0; i < n; i++) {
        mt_gguf_tensor *t = &g->tensors[i];
        uint64_t off = ti[i].offset;
        if (off % g->alignment != 0) {
            free(ti);
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: tensor '%s': offset: expected a multiple of the alignment "
                                "%zu, found %llu",
                                c->path, t->name, g->alignment, (unsigned long long)off);
        }
        if (off > (uint64_t)data_len || t->nbytes > data_len - (size_t)off) {
            free(ti);
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: tensor '%s': data at offset %llu of %zu bytes (%s) runs past "
                                "the end of the file: the data section holds %zu bytes from byte "
                                "%zu (is the file truncated?)",
                                c->path, t->name, (unsigned long long)off, t->nbytes,
                                ggml_label(t->type), data_len, data_off);
        }
        t->data = g->map + data_off + (size_t)off;
    }

    /* no two tensors share bytes */
    qsort(ti, n, sizeof *ti, cmp_tinfo);
    size_t prev = SIZE_MAX;
    for (size_t i = 0; i < n; i++) {
        const mt_gguf_tensor *t = &g->tensors[ti[i].index];
        if (t->nbytes == 0) continue;
        if (prev != SIZE_MAX) {
            const mt_gguf_tensor *p = &g->tensors[ti[prev].index];
            if (ti[prev].offset + p->nbytes > ti[i].offset) {
                mt_status s2 = mt_error_set(err, MT_ERR_FORMAT,
                                            "%s: tensor '%s' (bytes [%llu, %llu) of the data) "
                                            "overlaps tensor '%s' "
                                            "(bytes [%llu, %llu)); expected disjoint tensor data",
                                            c->path, t->name, (unsigned long long)ti[i].offset,
                                            (unsigned long long)(ti[i].offset + t->nbytes), p->name,
                                            (unsigned long long)ti[prev].offset,
                                            (unsigned long long)(ti[prev].offset + p->nbytes));
                free(ti);
                return s2;
            }
        }
        prev = i;
    }
    free(ti);
    return MT_OK;
}

mt_status mt_gguf_open(const char *path, mt_gguf **out, mt_error *err) {
    if (!out) return mt_error_set(err, MT_ERR_INVALID_ARG, "mt_gguf_open: out is NULL");
    *out = NULL;
    if (!path) return mt_error_set(err, MT_ERR_INVALID_ARG, "mt_gguf_open: path is NULL");
    mt_gguf *g = mt_calloc(1, sizeof *g, "GGUF handle", err);
    if (!g) return MT_ERR_NOMEM;
    g->path = mt_strdup(path, "GGUF path", err);
    mt_status st = g->path ? map_file(g, err) : MT_ERR_NOMEM;
    cursor c = {path, g->map, g->map_len, 0, "header"};
    uint64_t ntensors = 0, nkv = 0;
    if (st == MT_OK) st = parse_header(g, &c, &ntensors, &nkv, err);
    if (st == MT_OK) st = parse_kvs(g, &c, nkv, err);
    if (st == MT_OK) st = parse_tensors(g, &c, ntensors, err);
    if (st != MT_OK) {
        mt_gguf_close(g);
        return st;
    }
    *out = g;
    return MT_OK;
}

void mt_gguf_close(mt_gguf *g) {
    if (!g) return;
    for (size_t i = 0; i < g->nkv; i++) {
        free(g->kvs[i].key);
        free(g->kvs[i].strs);
    }
    free(g->kvs);
    free(g->kv_sorted);
    for (size_t i = 0; i < g->ntensors; i++) free((char *)g->tensors[i].name);
    free(g->tensors);
    free(g->t_sorted);
    mt_unmap_file(g->map, g->map_len);
    free(g->path);
    free(g);
}

const char *mt_gguf_path(const mt_gguf *g) { return g ? g->path : NULL; }
uint32_t mt_gguf_version(const mt_gguf *g) { return g ? g->version : 0; }

/* ---- metadata access
 * ------------------------------------------------------------- */

const mt_gguf_value *mt_gguf_get(const mt_gguf *g, const char *key) {
    if (!g || !key) return NULL;
    size_t lo = 0, hi = g->nkv;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const gguf_kv *kv = g->kv_sorted[mid];
        int c = strcmp(kv->key, key);
        if (c == 0) return &kv->v;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

size_t mt_gguf_kv_count(const mt_gguf *g) { return g ? g->nkv : 0; }

const char *mt_gguf_kv_key(const mt_gguf *g, size_t index) {
    return g && index < g->nkv ? g->kvs[index].key : NULL;
}

const char *mt_gguf_array_string(const mt_gguf *g, const mt_gguf_value *v, uint64_t i,
                                 uint64_t *len) {
    if (len) *len = 0;
    if (!g || !v || g->nkv == 0) return NULL;
    /* v must be one of this handle's values */
    uintptr_t first = (uintptr_t)&g->kvs[0].v, p = (uintptr_t)v;
    if (p < first || (p - first) % sizeof(gguf_kv) != 0 || (p - first) / sizeof(gguf_kv) >= g->nkv)
        return NULL;
    const gguf_kv *kv = &g->kvs[(p - first) / sizeof(gguf_kv)];
    if (kv->v.type != MT_GGUF_ARRAY || kv->v.arr_type != MT_GGUF_STRING || i >= kv->v.arr_len)
        return NULL;
    if (len) *len = load_le(kv->strs[i], 8);
    return (const char *)kv->strs[i] + 8;
}

static mt_status lookup(const mt_gguf *g, const char *key, const mt_gguf_value **v, const char *fn,
                        mt_error *err) {
    if (!g || !key) return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: NULL handle or key", fn);
    *v = mt_gguf_get(g, key);
    if (!*v) return mt_error_set(err, MT_ERR_FORMAT, "%s: key '%s' is missing", g->path, key);
    return MT_OK;
}

static const char *found_type(const mt_gguf_value *v, char *buf, size_t cap) {
    if (v->type == MT_GGUF_ARRAY)
        snprintf(buf, cap, "an ARRAY of %s", value_type_name(v->arr_type));
    else
        snprintf(buf, cap, "%s", value_type_name(v->type));
    return buf;
}

mt_status mt_gguf_get_int(const mt_gguf *g, const char *key, int64_t *out, mt_error *err) {
    const mt_gguf_value *v;
    mt_status st = lookup(g, key, &v, "mt_gguf_get_int", err);
    if (st != MT_OK) return st;
    char buf[48];
    if (is_signed_type(v->type)) {
        if (out) *out = v->num.i64;
        return MT_OK;
    }
    if (!is_unsigned_type(v->type))
        return mt_error_set(err, MT_ERR_FORMAT, "%s: key '%s': expected an integer, found %s",
                            g->path, key, found_type(v, buf, sizeof buf));
    if (v->num.u64 > (uint64_t)INT64_MAX)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: key '%s': expected an integer of at most %lld, found %llu (%s)",
                            g->path, key, (long long)INT64_MAX, (unsigned long long)v->num.u64,
                            value_type_name(v->type));
    if (out) *out = (int64_t)v->num.u64;
    return MT_OK;
}

mt_status mt_gguf_get_float(const mt_gguf *g, const char *key, double *out, mt_error *err) {
    const mt_gguf_value *v;
    mt_status st = lookup(g, key, &v, "mt_gguf_get_float", err);
    if (st != MT_OK) return st;
    char buf[48];
    if (v->type != MT_GGUF_FLOAT32 && v->type != MT_GGUF_FLOAT64)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: key '%s': expected FLOAT32 or FLOAT64, found %s", g->path, key,
                            found_type(v, buf, sizeof buf));
    if (out) *out = v->num.f64;
    return MT_OK;
}

mt_status mt_gguf_get_string(const mt_gguf *g, const char *key, char **out, mt_error *err) {
    if (out) *out = NULL;
    const mt_gguf_value *v;
    mt_status st = lookup(g, key, &v, "mt_gguf_get_string", err);
    if (st != MT_OK) return st;
    char buf[48];
    if (!out) return mt_error_set(err, MT_ERR_INVALID_ARG, "mt_gguf_get_string: out is NULL");
    if (v->type != MT_GGUF_STRING)
        return mt_error_set(err, MT_ERR_FORMAT, "%s: key '%s': expected a STRING, found %s",
                            g->path, key, found_type(v, buf, sizeof buf));
    size_t n = (size_t)v->str_len;
    if (memchr(v->str, '\0', n))
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: key '%s': expected a string without NUL bytes, found one at "
                            "byte %zu",
                            g->path, key, (size_t)((const char *)memchr(v->str, '\0', n) - v->str));
    char *s = malloc(n + 1);
    if (!s) return mt_error_set(err, MT_ERR_NOMEM, "%s: key '%s': out of memory", g->path, key);
    if (n) memcpy(s, v->str, n);
    s[n] = '\0';
    *out = s;
    return MT_OK;
}

/* ---- tensors
 * --------------------------------------------------------------------- */

size_t mt_gguf_tensor_count(const mt_gguf *g) { return g ? g->ntensors : 0; }

const mt_gguf_tensor *mt_gguf_tensor_at(const mt_gguf *g, size_t index) {
    return g && index < g->ntensors ? &g->tensors[index] : NULL;
}

const mt_gguf_tensor *mt_gguf_find_tensor(const mt_gguf *g, const char *name) {
    if (!g || !name) return NULL;
    size_t lo = 0, hi = g->ntensors;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const mt_gguf_tensor *t = g->t_sorted[mid];
        int c = strcmp(t->name, name);
        if (c == 0) return t;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

/* ---- dequantization
 * ------------------------------------------------------------- Block layouts
 * (ggml-common.h); every multi-byte field little-endian, f16 scales: Q8_0  32
 * elements in 34 bytes: d, int8 q[32];                 y = q*d Q4_0  32
 * elements in 18 bytes: d, 16 bytes of nibbles;         y = (nibble-8)*d Q4_1
 * 32 elements in 20 bytes: d, m, 16 bytes of nibbles;      y = nibble*d + m
 *         (byte j's low nibble is element j, its high nibble element j+16)
 *   Q4_K 256 elements in 144 bytes: d, dmin, 12 bytes packing eight 6-bit
 * (scale, min) pairs, 128 bytes of nibbles; sub-block s of 32 elements: y =
 * (d*scale_s)*nibble - (dmin*min_s); chunk k of 64 elements uses bytes
 *         32k..32k+31, low nibbles for sub-block 2k, high nibbles for 2k+1
 *   Q6_K 256 elements in 210 bytes: ql[128] low 4 bits, qh[64] high 2 bits,
 * int8 scales[16] (one per 16 elements), d; y = (d*scale)*(q6 - 32) */

static float ld_f16(const unsigned char *p) { return mt_f16_to_f32((uint16_t)load_le(p, 2)); }

static void deq_q8_0(const unsigned char *b, size_t nb, float *y) {
    for (size_t i = 0; i < nb; i++, b += 34, y += 32) {
        const float d = ld_f16(b);
        for (int j = 0; j < 32; j++) y[j] = (float)(int8_t)b[2 + j] * d;
    }
}

static void deq_q4_0(const unsigned char *b, size_t nb, float *y) {
    for (size_t i = 0; i < nb; i++, b += 18, y += 32) {
        const float d = ld_f16(b);
        const unsigned char *q = b + 2;
        for (int j = 0; j < 16; j++) {
            y[j] = (float)((q[j] & 0x0F) - 8) * d;
            y[j + 16] = (float)((q[j] >> 4) - 8) * d;
        }
    }
}

static void deq_q4_1(const unsigned char *b, size_t nb, float *y) {
    for (size_t i = 0; i < nb; i++, b += 20, y += 32) {
        const float d = ld_f16(b), m = ld_f16(b + 2);
        const unsigned char *q = b + 4;
        for (int j = 0; j < 16; j++) {
            const float lo = (float)(q[j] & 0x0F) * d;
            const float hi = (float)(q[j] >> 4) * d;
            y[j] = lo + m;
            y[j + 16] = hi + m;
        }
    }
}

/* The 6-bit scale and min of sub-block j (0..7) from Q4_K's 12 packed bytes. */
static void q4k_scale_min(int j, const unsigned char *s, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

static void deq_q4_k(const unsigned char *b, size_t nb, float *y) {
    for (size_t i = 0; i < nb; i++, b += 144) {
        const float d = ld_f16(b), dmin = ld_f16(b + 2);
        const unsigned char *scales = b + 4, *q = b + 16;
        for (int k = 0; k < 4; k++, q += 32, y += 64) {
            int sc, mn;
            q4k_scale_min(2 * k, scales, &sc, &mn);
            const float d1 = d * (float)sc, m1 = dmin * (float)mn;
            q4k_scale_min(2 * k + 1, scales, &sc, &mn);
            const float d2 = d * (float)sc, m2 = dmin * (float)mn;
            for (int l = 0; l < 32; l++) {
                const float lo = d1 * (float)(q[l] & 0x0F);
                const float hi = d2 * (float)(q[l] >> 4);
                y[l] = lo - m1;
                y[l + 32] = hi - m2;
            }
        }
    }
}

static void deq_q6_k(const unsigned char *b, size_t nb, float *y) {
    for (size_t i = 0; i < nb; i++, b += 210) {
        const unsigned char *ql = b, *qh = b + 128;
        const signed char *sc = (const signed char *)(b + 192);
        const float d = ld_f16(b + 208);
        for (int h = 0; h < 2; h++, ql += 64, qh += 32, sc += 8, y += 128) {
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * (float)sc[is] * (float)q1;
                y[l + 32] = d * (float)sc[is + 2] * (float)q2;
                y[l + 64] = d * (float)sc[is + 4] * (float)q3;
                y[l + 96] = d * (float)sc[is + 6] * (float)q4;
            }
        }
    }
}

mt_status mt_gguf_dequantize(const mt_gguf *g, const mt_gguf_tensor *t, float *dst, mt_error *err) {
    if (!g || !t)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "mt_gguf_dequantize: NULL handle or tensor");
    if (g->ntensors == 0 || t < g->tensors || t >= g->tensors + g->ntensors)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: mt_gguf_dequantize: the tensor does not belong to this file",
                            g->path);
    const char *tn = mt_ggml_type_name(t->type);
    switch (t->type) {
    case MT_GGML_F32:
    case MT_GGML_F16:
    case MT_GGML_BF16:
    case MT_GGML_Q8_0:
    case MT_GGML_Q4_0:
    case MT_GGML_Q4_1:
    case MT_GGML_Q4_K:
    case MT_GGML_Q6_K: break;
    default:
        if (!tn)
            return mt_error_set(err, MT_ERR_UNSUPPORTED,
                                "%s: tensor '%s': unknown ggml type %u (expected one of F32 (0), "
                                "F16 (1), Q4_0 (2), Q4_1 (3), Q8_0 (8), Q4_K (12), Q6_K (14), "
                                "BF16 (30))",
                                g->path, t->name, t->type);
        return mt_error_set(err, MT_ERR_UNSUPPORTED,
                            "%s: tensor '%s': type %s (%u) does not dequantize (expected one of "
                            "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)",
                            g->path, t->name, tn, t->type);
    }
    size_t bsize = ggml_types[t->type].size;
    size_t nb = t->nbytes / bsize; /* open checked nbytes = numel / block * bsize */
    if (nb == 0) return MT_OK;
    if (!dst)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: tensor '%s': NULL destination", g->path,
                            t->name);
    const unsigned char *p = t->data;
    switch (t->type) {
    case MT_GGML_F32: memcpy(dst, p, nb * sizeof *dst); break; /* data may be unaligned */
    case MT_GGML_F16:
        for (size_t i = 0; i < nb; i++) dst[i] = ld_f16(p + 2 * i);
        break;
    case MT_GGML_BF16:
        for (size_t i = 0; i < nb; i++) dst[i] = mt_bf16_to_f32((uint16_t)load_le(p + 2 * i, 2));
        break;
    case MT_GGML_Q8_0: deq_q8_0(p, nb, dst); break;
    case MT_GGML_Q4_0: deq_q4_0(p, nb, dst); break;
    case MT_GGML_Q4_1: deq_q4_1(p, nb, dst); break;
    case MT_GGML_Q4_K: deq_q4_k(p, nb, dst); break;
    case MT_GGML_Q6_K: deq_q6_k(p, nb, dst); break;
    default: break;
    }
    return MT_OK;
}
