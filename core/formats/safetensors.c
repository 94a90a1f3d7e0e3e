/* safetensors.c — memory-mapped safetensors reader, streaming atomic writer,
 * single files and sharded checkpoints (model.safetensors.index.json).
 *
 * Layout of a file: an 8-byte little-endian u64 N, N bytes of UTF-8 JSON (an
 * object: tensor name -> {"dtype", "shape", "data_offsets"}, plus an optional
 * "__metadata__" string-to-string object), then the data buffer. Offsets are
 * relative to the data buffer; the tensors must tile it exactly.
 *
 * Reading: map the file, bound and parse the header, validate every entry, sort
 * by offset to check the tiling, then sort by name for mt_st_at / mt_st_find.
 * Tensor names and metadata strings stay inside the parsed header (json_t),
 * which lives as long as the mapping. */
#define _POSIX_C_SOURCE 200809L
#include "formats/safetensors.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/internal.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.c assumes a little-endian host (safetensors data is little-endian)"
#endif

#define ST_INDEX_NAME "model.safetensors.index.json"
#define ST_SINGLE_NAME "model.safetensors"

/* ---- dtypes ------------------------------------------------------------- */

static const struct {
    const char *name;
    size_t size;
} st_dtypes[MT_ST_DTYPE_COUNT] = {
    [MT_ST_BOOL] = {"BOOL", 1},       [MT_ST_U8] = {"U8", 1},           [MT_ST_I8] = {"I8", 1},
    [MT_ST_F8_E5M2] = {"F8_E5M2", 1}, [MT_ST_F8_E4M3] = {"F8_E4M3", 1}, [MT_ST_I16] = {"I16", 2},
    [MT_ST_U16] = {"U16", 2},         [MT_ST_F16] = {"F16", 2},         [MT_ST_BF16] = {"BF16", 2},
    [MT_ST_I32] = {"I32", 4},         [MT_ST_U32] = {"U32", 4},         [MT_ST_F32] = {"F32", 4},
    [MT_ST_F64] = {"F64", 8},         [MT_ST_I64] = {"I64", 8},         [MT_ST_U64] = {"U64", 8},
};

const char *mt_st_dtype_name(mt_st_dtype dtype) {
    return (unsigned)dtype < MT_ST_DTYPE_COUNT ? st_dtypes[dtype].name : NULL;
}

size_t mt_st_dtype_size(mt_st_dtype dtype) {
    return (unsigned)dtype < MT_ST_DTYPE_COUNT ? st_dtypes[dtype].size : 0;
}

static int dtype_from_name(const char *name, mt_st_dtype *out) {
    for (int i = 0; i < MT_ST_DTYPE_COUNT; i++) {
        if (strcmp(st_dtypes[i].name, name) == 0) {
            *out = (mt_st_dtype)i;
            return 1;
        }
    }
    return 0;
}

static const char *dtype_label(mt_st_dtype dtype) {
    const char *n = mt_st_dtype_name(dtype);
    return n ? n : "(invalid dtype)";
}

/* ---- small helpers for messages ------------------------------------------ */

/* What a JSON value is, for "expected X, found Y": the number itself when it is one. */
static const char *json_found(const json_t *v, char *buf, size_t cap) {
    if (json_is_integer(v)) {
        snprintf(buf, cap, "%lld", (long long)json_integer_value(v));
        return buf;
    }
    if (json_is_real(v)) {
        snprintf(buf, cap, "the real number %g", json_real_value(v));
        return buf;
    }
    return mt_json_kind(v);
}

/* 1 when s[0, n) is valid UTF-8, else 0 with *bad at the bad byte. */
static int utf8_valid(const unsigned char *s, size_t n, size_t *bad) {
    *bad = mt_utf8_bad_at(s, n);
    return *bad == n;
}

/* ---- reading one file ------------------------------------------------------ */

typedef struct st_file {
    char *path;
    const unsigned char *map;
    size_t map_len;
    json_t *header;   /* owns the tensor names and the metadata strings */
    json_t *metadata; /* borrowed from header: "__metadata__" or NULL */
} st_file;

struct mt_safetensors {
    st_file *files;
    size_t nfiles;
    mt_st_tensor *tensors; /* sorted by name */
    size_t count;
};

/* A tensor during validation: the public view plus its byte range in the data buffer. */
typedef struct st_work {
    mt_st_tensor t;
    size_t begin, end;
} st_work;

static void st_file_release(st_file *f) {
    mt_unmap_file(f->map, f->map_len);
    json_decref(f->header);
    free(f->path);
    memset(f, 0, sizeof *f);
}

static mt_status map_file(st_file *f, mt_error *err) {
    mt_status st = mt_map_file(f->path, "safetensors", &f->map, &f->map_len, err);
    if (st == MT_OK && f->map_len < 8) {
        st = mt_error_set(err, MT_ERR_FORMAT,
                          "%s: file is %zu bytes, shorter than the 8-byte header length that "
                          "starts every safetensors file",
                          f->path, f->map_len);
        mt_unmap_file(f->map, f->map_len);
        f->map = NULL;
        f->map_len = 0;
    }
    return st;
}

/* Reads a JSON integer >= 0 (the only thing a shape entry or an offset may be). */
static int json_nonneg(const json_t *v, uint64_t *out) {
    if (!json_is_integer(v) || json_integer_value(v) < 0) return 0;
    *out = (uint64_t)json_integer_value(v);
    return 1;
}

/* Validates one header entry and fills w (everything except the data pointer). */
static mt_status parse_entry(const char *path, const char *name, const json_t *v, size_t data_len,
                             st_work *w, mt_error *err) {
    char found[64], shp[256];
    memset(w, 0, sizeof *w);
    w->t.name = name;
    w->t.file = path;
    if (!json_is_object(v))
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: tensor '%s': expected an object with dtype, shape and "
                            "data_offsets, found %s",
                            path, name, mt_json_kind(v));

    const json_t *jd = json_object_get(v, "dtype");
    if (!jd)
        return mt_error_set(err, MT_ERR_FORMAT, "%s: tensor '%s': missing \"dtype\"", path, name);
    if (!json_is_string(jd))
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: tensor '%s': \"dtype\" must be a string, found %s", path, name,
                            mt_json_kind(jd));
    if (!dtype_from_name(json_string_value(jd), &w->t.dtype))
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: tensor '%s': unknown dtype '%s' (expected one of BOOL, U8, I8, "
                            "F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64)",
                            path, name, json_string_value(jd));

    const json_t *js = json_object_get(v, "shape");
    if (!js)
        return mt_error_set(err, MT_ERR_FORMAT, "%s: tensor '%s': missing \"shape\"", path, name);
    if (!json_is_array(js))
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: tensor '%s': \"shape\" must be an array of non-negative "
                            "integers, found %s",
                            path, name, mt_json_kind(js));
    size_t rank = json_array_size(js);
    if (rank > MT_MAX_DIMS)
        return mt_error_set(err, MT_ERR_UNSUPPORTED,
                            "%s: tensor '%s': shape has %zu dimensions, at most %d are supported",
                            path, name, rank, MT_MAX_DIMS);
    /* The element count folds left with overflow checks, as the reference does: a
     * 0 dimension after an overflowing prefix does not excuse it. */
    size_t numel = 1, nbytes = 0;
    for (size_t i = 0; i < rank; i++) {
        const json_t *e = json_array_get(js, i);
        uint64_t d;
        if (!json_nonneg(e, &d))
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: tensor '%s': shape[%zu] must be a non-negative integer, "
                                "found %s",
                                path, name, i, json_found(e, found, sizeof found));
        w->t.shape[i] = (int64_t)d;
        w->t.ndim = (int)i + 1;
        if (d > SIZE_MAX || !mt_mul_size(numel, (size_t)d, &numel))
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: tensor '%s': shape %s...: the element count overflows", path,
                                name, mt_shape_format(shp, sizeof shp, w->t.ndim, w->t.shape));
    }
    mt_shape_format(shp, sizeof shp, w->t.ndim, w->t.shape);
    if (!mt_mul_size(numel, st_dtypes[w->t.dtype].size, &nbytes))
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: tensor '%s': shape %s of %s: the byte count overflows", path, name,
                            shp, st_dtypes[w->t.dtype].name);

    const json_t *jo = json_object_get(v, "data_offsets");
    if (!jo)
        return mt_error_set(err, MT_ERR_FORMAT, "%s: tensor '%s': missing \"data_offsets\"", path,
                            name);
    if (!json_is_array(jo))
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: tensor '%s': \"data_offsets\" must be an array [begin, end], "
                            "found %s",
                            path, name, mt_json_kind(jo));
    if (json_array_size(jo) != 2)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: tensor '%s': \"data_offsets\" must hold 2 integers [begin, end], "
                            "found %zu entries",
                            path, name, json_array_size(jo));
    uint64_t off[2];
    for (size_t i = 0; i < 2; i++) {
        const json_t *e = json_array_get(jo, i);
        if (!json_nonneg(e, &off[i]))
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: tensor '%s': data_offsets[%zu] must be a non-negative "
                                "integer, found %s",
                                path, name, i, json_found(e, found, sizeof found));
    }
    if (off[0] > off[1])
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: tensor '%s': data_offsets [%llu, %llu] end before they begin",
                            path, name, (unsigned long long)off[0], (unsigned long long)off[1]);
    if (off[1] > (uint64_t)data_len)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: tensor '%s': data_offsets [%llu, %llu] run past the end of the "
                            "data buffer, which holds %zu bytes (is the file truncated?)",
                            path, name, (unsigned long long)off[0], (unsigned long long)off[1],
                            data_len);
    w->begin = (size_t)off[0];
    w->end = (size_t)off[1];
    if (w->end - w->begin != nbytes)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: tensor '%s': data_offsets [%zu, %zu] hold %zu bytes, but shape "
                            "%s of %s needs %zu bytes",
                            path, name, w->begin, w->end, w->end - w->begin, shp,
                            st_dtypes[w->t.dtype].name, nbytes);
    w->t.nbytes = nbytes;
    return MT_OK;
}

static int cmp_work_offsets(const void *a, const void *b) {
    const st_work *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return strcmp(x->t.name, y->t.name);
}

static int cmp_tensor_names(const void *a, const void *b) {
    return strcmp(((const mt_st_tensor *)a)->name, ((const mt_st_tensor *)b)->name);
}

/* Checks that the byte ranges, sorted by begin, tile [0, data_len) exactly. */
static mt_status check_tiling(const char *path, const st_work *w, size_t n, size_t data_len,
                              mt_error *err) {
    size_t pos = 0;
    for (size_t i = 0; i < n; i++) {
        if (i == 0 && w[i].begin != 0)
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: tensor '%s' begins at byte %zu of the data buffer, expected "
                                "0 (the first tensor must begin where the header ends)",
                                path, w[i].t.name, w[i].begin);
        if (i > 0 && w[i].begin > pos)
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: gap of %zu bytes between tensor '%s' (ends at byte %zu) and "
                                "tensor '%s' (begins at byte %zu); expected each tensor to begin "
                                "where the previous one ends",
                                path, w[i].begin - pos, w[i - 1].t.name, pos, w[i].t.name,
                                w[i].begin);
        if (i > 0 && w[i].begin < pos)
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: tensor '%s' (bytes [%zu, %zu)) overlaps tensor '%s' (bytes "
                                "[%zu, %zu)); expected each tensor to begin where the previous "
                                "one ends",
                                path, w[i].t.name, w[i].begin, w[i].end, w[i - 1].t.name,
                                w[i - 1].begin, w[i - 1].end);
        pos = w[i].end;
    }
    if (pos != data_len) {
        if (n == 0)
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: the header lists no tensors, but %zu bytes of data follow it",
                                path, data_len);
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: %zu trailing bytes after the last tensor '%s': tensors end at "
                            "byte %zu of the data buffer, expected them to end at its end (byte "
                            "%zu)",
                            path, data_len - pos, w[n - 1].t.name, pos, data_len);
    }
    return MT_OK;
}

static mt_status parse_header(st_file *f, size_t *header_len, mt_error *err) {
    const unsigned char *m = f->map;
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | m[i];
    if (n > MT_ST_MAX_HEADER_BYTES)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: header length %llu exceeds the limit of %u bytes", f->path,
                            (unsigned long long)n, (unsigned)MT_ST_MAX_HEADER_BYTES);
    if (n > (uint64_t)(f->map_len - 8))
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: header length %llu past the end of the file: the header would "
                            "end at byte %llu, but the file is %zu bytes",
                            f->path, (unsigned long long)n, (unsigned long long)n + 8, f->map_len);
    size_t hlen = (size_t)n, bad = 0;
    if (!utf8_valid(m + 8, hlen, &bad))
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: header is not valid UTF-8 (byte 0x%02x at header offset %zu)",
                            f->path, m[8 + bad], bad);
    json_error_t jerr;
    f->header =
        json_loadb((const char *)m + 8, hlen, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
    if (!f->header)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: header is not valid JSON: %s (line %d, column %d)", f->path,
                            jerr.text, jerr.line, jerr.column);
    if (!json_is_object(f->header))
        return mt_error_set(err, MT_ERR_FORMAT, "%s: header must be a JSON object, found %s",
                            f->path, mt_json_kind(f->header));
    *header_len = hlen;
    return MT_OK;
}

/* Opens, maps and validates one .safetensors file. On success f owns the mapping
 * and *out holds *count tensors sorted by name; on failure f is released. */
static mt_status st_file_open(const char *path, st_file *f, mt_st_tensor **out, size_t *count,
                              mt_error *err) {
    memset(f, 0, sizeof *f);
    *out = NULL;
    *count = 0;
    f->path = mt_strdup(path, "safetensors path", err);
    if (!f->path) return MT_ERR_NOMEM;
    st_work *w = NULL;
    mt_st_tensor *tensors = NULL;
    size_t hlen = 0, n = 0;
    mt_status st = map_file(f, err);
    if (st == MT_OK) st = parse_header(f, &hlen, err);
    if (st != MT_OK) goto fail;

    size_t data_start = 8 + hlen, data_len = f->map_len - data_start;
    size_t entries = json_object_size(f->header);
    w = mt_calloc(entries, sizeof *w, "safetensors header entries", err);
    if (!w) {
        st = MT_ERR_NOMEM;
        goto fail;
    }
    const char *key;
    json_t *value;
    json_object_foreach(f->header, key, value) {
        if (strcmp(key, "__metadata__") == 0) {
            if (json_is_null(value)) continue;
            if (!json_is_object(value)) {
                st = mt_error_set(err, MT_ERR_FORMAT,
                                  "%s: \"__metadata__\" must be an object of strings, found %s",
                                  f->path, mt_json_kind(value));
                goto fail;
            }
            const char *mk;
            json_t *mv;
            json_object_foreach(value, mk, mv) {
                if (!json_is_string(mv)) {
                    st = mt_error_set(err, MT_ERR_FORMAT,
                                      "%s: __metadata__ value for key '%s' must be a string, "
                                      "found %s",
                                      f->path, mk, mt_json_kind(mv));
                    goto fail;
                }
            }
            f->metadata = value;
            continue;
        }
        st = parse_entry(f->path, key, value, data_len, &w[n], err);
        if (st != MT_OK) goto fail;
        n++;
    }
    qsort(w, n, sizeof *w, cmp_work_offsets);
    st = check_tiling(f->path, w, n, data_len, err);
    if (st != MT_OK) goto fail;

    tensors = mt_calloc(n, sizeof *tensors, "safetensors tensor table", err);
    if (!tensors) {
        st = MT_ERR_NOMEM;
        goto fail;
    }
    for (size_t i = 0; i < n; i++) {
        tensors[i] = w[i].t;
        tensors[i].data = f->map + data_start + w[i].begin;
    }
    qsort(tensors, n, sizeof *tensors, cmp_tensor_names);
    free(w);
    *out = tensors;
    *count = n;
    return MT_OK;

fail:
    free(w);
    free(tensors);
    st_file_release(f);
    return st;
}

/* ---- opening: single file, index, directory ---------------------------------- */

static mt_status open_single(const char *path, mt_safetensors *s, mt_error *err) {
    s->files = mt_calloc(1, sizeof *s->files, "safetensors file table", err);
    if (!s->files) return MT_ERR_NOMEM;
    mt_status st = st_file_open(path, &s->files[0], &s->tensors, &s->count, err);
    if (st == MT_OK) s->nfiles = 1;
    return st;
}

static int cmp_strings(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* A shard name must stay inside the index's directory. */
static int shard_name_ok(const char *name) {
    if (name[0] == '\0' || name[0] == '/') return 0;
    for (const char *p = name; *p;) {
        const char *slash = strchr(p, '/');
        size_t len = slash ? (size_t)(slash - p) : strlen(p);
        if (len == 2 && p[0] == '.' && p[1] == '.') return 0;
        if (!slash) break;
        p = slash + 1;
    }
    return 1;
}

static mt_status open_index(const char *path, mt_safetensors *s, mt_error *err) {
    char *text = NULL, *dir = NULL;
    const char **shards = NULL;
    json_t *root = NULL;
    size_t len = 0, nshards = 0;
    mt_status st = mt_read_file(path, &text, &len, err);
    if (st != MT_OK) return st;

    json_error_t jerr;
    root = json_loadb(text, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
    if (!root) {
        st = mt_error_set(err, MT_ERR_FORMAT, "%s: not valid JSON: %s (line %d, column %d)", path,
                          jerr.text, jerr.line, jerr.column);
        goto done;
    }
    if (!json_is_object(root)) {
        st = mt_error_set(err, MT_ERR_FORMAT, "%s: expected a JSON object, found %s", path,
                          mt_json_kind(root));
        goto done;
    }
    const json_t *meta = json_object_get(root, "metadata");
    if (meta && !json_is_object(meta) && !json_is_null(meta)) {
        st = mt_error_set(err, MT_ERR_FORMAT, "%s: \"metadata\" must be an object, found %s", path,
                          mt_json_kind(meta));
        goto done;
    }
    json_t *wmap = json_object_get(root, "weight_map");
    if (!wmap || !json_is_object(wmap)) {
        st = mt_error_set(err, MT_ERR_FORMAT,
                          "%s: expected a \"weight_map\" object (tensor name -> shard file), "
                          "found %s",
                          path, wmap ? mt_json_kind(wmap) : "none");
        goto done;
    }

    /* The distinct shard names, sorted. */
    shards = mt_calloc(json_object_size(wmap), sizeof *shards, "shard list", err);
    if (!shards) {
        st = MT_ERR_NOMEM;
        goto done;
    }
    const char *key;
    json_t *value;
    json_object_foreach(wmap, key, value) {
        if (!json_is_string(value)) {
            st = mt_error_set(err, MT_ERR_FORMAT,
                              "%s: weight_map entry for tensor '%s' must be a shard file name, "
                              "found %s",
                              path, key, mt_json_kind(value));
            goto done;
        }
        if (!shard_name_ok(json_string_value(value))) {
            st = mt_error_set(err, MT_ERR_FORMAT,
                              "%s: weight_map puts tensor '%s' in '%s', expected a file name "
                              "relative to the index's directory",
                              path, key, json_string_value(value));
            goto done;
        }
        shards[nshards++] = json_string_value(value);
    }
    qsort(shards, nshards, sizeof *shards, cmp_strings);
    size_t uniq = 0;
    for (size_t i = 0; i < nshards; i++)
        if (uniq == 0 || strcmp(shards[uniq - 1], shards[i]) != 0) shards[uniq++] = shards[i];
    nshards = uniq;

    const char *slash = strrchr(path, '/');
    size_t dlen = slash ? (size_t)(slash - path) + 1 : 0;
    dir = mt_malloc(dlen + 1, "index directory", err);
    if (!dir) {
        st = MT_ERR_NOMEM;
        goto done;
    }
    memcpy(dir, path, dlen);
    dir[dlen] = '\0';

    /* Open every shard; collect every tensor. */
    s->files = mt_calloc(nshards, sizeof *s->files, "safetensors file table", err);
    mt_st_tensor **per = mt_calloc(nshards, sizeof *per, "shard tensor tables", err);
    size_t *per_n = mt_calloc(nshards, sizeof *per_n, "shard tensor counts", err);
    if (!s->files || !per || !per_n) {
        free(per);
        free(per_n);
        st = MT_ERR_NOMEM;
        goto done;
    }
    size_t total = 0;
    for (size_t i = 0; i < nshards && st == MT_OK; i++) {
        char *spath = mt_path_join(dir, shards[i], err);
        if (!spath) {
            st = MT_ERR_NOMEM;
            break;
        }
        mt_error inner = {MT_OK, ""};
        st = st_file_open(spath, &s->files[i], &per[i], &per_n[i], &inner);
        free(spath);
        if (st != MT_OK) {
            st = mt_error_set(err, st, "%s: shard '%s' named by the index: %s", path, shards[i],
                              inner.msg);
            break;
        }
        s->nfiles = i + 1;
        if (!mt_add_size(total, per_n[i], &total)) {
            st = mt_error_set(err, MT_ERR_NOMEM, "%s: too many tensors", path);
            break;
        }
    }
    if (st == MT_OK) {
        s->tensors = mt_calloc(total, sizeof *s->tensors, "safetensors tensor table", err);
        if (!s->tensors) st = MT_ERR_NOMEM;
    }
    if (st == MT_OK) {
        for (size_t i = 0; i < nshards; i++) {
            if (per_n[i]) memcpy(s->tensors + s->count, per[i], per_n[i] * sizeof *per[i]);
            s->count += per_n[i];
        }
        qsort(s->tensors, s->count, sizeof *s->tensors, cmp_tensor_names);
    }
    for (size_t i = 0; i < nshards; i++) free(per[i]);
    free(per);
    free(per_n);
    if (st != MT_OK) goto done;

    /* A name in two shards; a shard tensor the weight_map does not put there. */
    for (size_t i = 0; i < s->count; i++) {
        const mt_st_tensor *t = &s->tensors[i];
        if (i > 0 && strcmp(s->tensors[i - 1].name, t->name) == 0) {
            st = mt_error_set(err, MT_ERR_FORMAT,
                              "%s: tensor '%s' appears in two shards, %s and %s; expected each "
                              "tensor in exactly one",
                              path, t->name, s->tensors[i - 1].file, t->file);
            goto done;
        }
        size_t fi = 0;
        while (s->files[fi].path != t->file) fi++;
        const json_t *mapped = json_object_get(wmap, t->name);
        if (!mapped) {
            st = mt_error_set(err, MT_ERR_FORMAT,
                              "%s: tensor '%s' is in shard %s but missing from the weight_map",
                              path, t->name, shards[fi]);
            goto done;
        }
        if (strcmp(json_string_value(mapped), shards[fi]) != 0) {
            st = mt_error_set(err, MT_ERR_FORMAT,
                              "%s: weight_map puts tensor '%s' in %s, but it is in shard %s", path,
                              t->name, json_string_value(mapped), shards[fi]);
            goto done;
        }
    }
    /* A weight_map tensor that its shard lacks. */
    json_object_foreach(wmap, key, value) {
        if (!mt_st_find(s, key)) {
            st = mt_error_set(err, MT_ERR_FORMAT,
                              "%s: weight_map puts tensor '%s' in %s, but that shard does not "
                              "hold it",
                              path, key, json_string_value(value));
            goto done;
        }
    }

done:
    free(shards);
    free(dir);
    json_decref(root);
    free(text);
    return st;
}

static int is_regular(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

static mt_status open_dir(const char *path, mt_safetensors *s, mt_error *err) {
    char *index = mt_path_join(path, ST_INDEX_NAME, err);
    char *single = index ? mt_path_join(path, ST_SINGLE_NAME, err) : NULL;
    mt_status st;
    if (!index || !single) {
        st = MT_ERR_NOMEM;
    } else {
        int has_index = is_regular(index), has_single = is_regular(single);
        if (has_index && has_single)
            st = mt_error_set(err, MT_ERR_INVALID_ARG,
                              "%s: holds both %s and %s; expected one checkpoint (open the file "
                              "you mean)",
                              path, ST_SINGLE_NAME, ST_INDEX_NAME);
        else if (has_index)
            st = open_index(index, s, err);
        else if (has_single)
            st = open_single(single, s, err);
        else
            st = mt_error_set(err, MT_ERR_IO, "%s: directory holds neither %s nor %s", path,
                              ST_SINGLE_NAME, ST_INDEX_NAME);
    }
    free(index);
    free(single);
    return st;
}

mt_status mt_st_open(const char *path, mt_safetensors **out, mt_error *err) {
    if (!out) return mt_error_set(err, MT_ERR_INVALID_ARG, "mt_st_open: out is NULL");
    *out = NULL;
    if (!path) return mt_error_set(err, MT_ERR_INVALID_ARG, "mt_st_open: path is NULL");
    mt_safetensors *s = mt_calloc(1, sizeof *s, "safetensors handle", err);
    if (!s) return MT_ERR_NOMEM;
    struct stat sb;
    mt_status st;
    if (stat(path, &sb) != 0)
        st = mt_error_set(err, MT_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    else if (S_ISDIR(sb.st_mode))
        st = open_dir(path, s, err);
    else if (mt_ends_with(path, ".json"))
        st = open_index(path, s, err);
    else
        st = open_single(path, s, err);
    if (st != MT_OK) {
        mt_st_close(s);
        return st;
    }
    *out = s;
    return MT_OK;
}

void mt_st_close(mt_safetensors *s) {
    if (!s) return;
    for (size_t i = 0; i < s->nfiles; i++) st_file_release(&s->files[i]);
    free(s->files);
    free(s->tensors);
    free(s);
}

size_t mt_st_count(const mt_safetensors *s) { return s ? s->count : 0; }

const char *mt_st_source(const mt_safetensors *st) {
    if (!st || st->nfiles == 0) return "(no file)";
    return st->nfiles == 1 ? st->files[0].path : "the sharded safetensors files";
}

const mt_st_tensor *mt_st_at(const mt_safetensors *s, size_t index) {
    return s && index < s->count ? &s->tensors[index] : NULL;
}

const mt_st_tensor *mt_st_find(const mt_safetensors *s, const char *name) {
    if (!s || !name) return NULL;
    size_t lo = 0, hi = s->count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(s->tensors[mid].name, name);
        if (c == 0) return &s->tensors[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

/* For a sharded checkpoint: the first shard (in file-name order) that has the key. */
const char *mt_st_metadata(const mt_safetensors *s, const char *key) {
    if (!s || !key) return NULL;
    for (size_t i = 0; i < s->nfiles; i++) {
        const json_t *v = s->files[i].metadata ? json_object_get(s->files[i].metadata, key) : NULL;
        if (v) return json_string_value(v);
    }
    return NULL;
}

/* Whether a float's bits are NaN or an infinity: all exponent bits set (the error path
 * counts them in the source bytes). */
static inline uint32_t f32_bits_nonfinite(uint32_t b) { return (b & 0x7F800000u) == 0x7F800000u; }

static uint32_t src_nonfinite(mt_st_dtype dtype, const unsigned char *p, size_t i) {
    if (dtype == MT_ST_F32) {
        uint32_t b;
        memcpy(&b, p + 4 * i, sizeof b);
        return f32_bits_nonfinite(b);
    }
    uint16_t h;
    memcpy(&h, p + 2 * i, sizeof h);
    return dtype == MT_ST_F16 ? (h & 0x7C00u) == 0x7C00u : (h & 0x7F80u) == 0x7F80u;
}

/* The refusal for a tensor whose value `first` is not finite: counts the others in the
 * source bytes (this runs once, on the error path) and says where the first one is. */
static mt_status nonfinite_error(const mt_st_tensor *t, size_t first, float value, size_t n,
                                 mt_error *err) {
    size_t count = 0;
    for (size_t i = first; i < n; i++) count += src_nonfinite(t->dtype, t->data, i);
    char where[160] = "";
    if (t->ndim >= 2) { /* the element's coordinates too: "[row, column]" reads faster */
        int64_t coord[MT_MAX_DIMS];
        size_t rest = first;
        for (int d = t->ndim - 1; d >= 0; d--) {
            coord[d] = t->shape[d] ? (int64_t)(rest % (size_t)t->shape[d]) : 0;
            rest = t->shape[d] ? rest / (size_t)t->shape[d] : 0;
        }
        char c[128];
        snprintf(where, sizeof where, ", element %s", mt_shape_format(c, sizeof c, t->ndim, coord));
    }
    return mt_error_set(err, MT_ERR_FORMAT,
                        "%s: tensor \"%s\": %zu non-finite value%s (the first, %g, at index %zu "
                        "of %zu%s): expected finite %s values; the weights are damaged",
                        t->file ? t->file : "(no file)", t->name ? t->name : "(no name)", count,
                        count == 1 ? "" : "s", (double)value, first, n, where,
                        dtype_label(t->dtype));
}

/* Converts in blocks of 4096 values; with `finite`, each block is checked right after
 * it is converted, while it is still in the L1 cache, so the check adds no second pass
 * over memory (a model's weights are hundreds of megabytes). */
static mt_status read_f32(const mt_st_tensor *t, float *dst, int finite, mt_error *err) {
    if (!t) return mt_error_set(err, MT_ERR_INVALID_ARG, "mt_st_read_f32: tensor is NULL");
    size_t esize = mt_st_dtype_size(t->dtype);
    if (t->dtype != MT_ST_F32 && t->dtype != MT_ST_F16 && t->dtype != MT_ST_BF16)
        return mt_error_set(err, MT_ERR_UNSUPPORTED,
                            "%s: tensor '%s': dtype %s does not convert to F32 (expected F32, "
                            "F16 or BF16)",
                            t->file ? t->file : "(no file)", t->name ? t->name : "(no name)",
                            dtype_label(t->dtype));
    size_t n = t->nbytes / esize;
    if (n == 0) return MT_OK;
    if (!dst || !t->data)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: tensor '%s': NULL data or destination",
                            t->file ? t->file : "(no file)", t->name ? t->name : "(no name)");
    const unsigned char *p = t->data;
    enum { BLOCK = 4096 };
    for (size_t i0 = 0; i0 < n; i0 += BLOCK) {
        const size_t i1 = n - i0 < BLOCK ? n : i0 + BLOCK;
        if (t->dtype == MT_ST_F32) {
            /* the mapping may leave the data unaligned */
            memcpy(dst + i0, p + 4 * i0, (i1 - i0) * sizeof *dst);
        } else if (t->dtype == MT_ST_F16) {
            for (size_t i = i0; i < i1; i++) {
                uint16_t h;
                memcpy(&h, p + 2 * i, sizeof h);
                dst[i] = mt_f16_to_f32(h);
            }
        } else {
            for (size_t i = i0; i < i1; i++) {
                uint16_t b;
                memcpy(&b, p + 2 * i, sizeof b);
                dst[i] = mt_bf16_to_f32(b);
            }
        }
        if (!finite) continue;
        const size_t bad = i0 + mt_first_nonfinite(dst + i0, i1 - i0);
        if (bad < i1) return nonfinite_error(t, bad, dst[bad], n, err);
    }
    return MT_OK;
}

mt_status mt_st_read_f32(const mt_st_tensor *t, float *dst, mt_error *err) {
    return read_f32(t, dst, 0, err);
}

mt_status mt_st_read_f32_finite(const mt_st_tensor *t, float *dst, mt_error *err) {
    return read_f32(t, dst, 1, err);
}

/* ---- writing ------------------------------------------------------------------ */

static int cmp_entry_names(const void *a, const void *b) {
    return strcmp((*(const mt_st_entry *const *)a)->name, (*(const mt_st_entry *const *)b)->name);
}

static size_t entry_nbytes(const mt_st_entry *e) {
    size_t n = 1; /* in the order check_entries checked for overflow */
    for (int d = 0; d < e->ndim; d++) n *= (size_t)e->shape[d];
    return n * st_dtypes[e->dtype].size;
}

/* Validates the entries; *sorted_out gets pointers to them sorted by name and
 * *total the sum of their byte sizes. `where` names the destination in messages. */
static mt_status check_entries(const char *where, const mt_st_entry *entries, size_t count,
                               const mt_st_entry ***sorted_out, size_t *total, mt_error *err) {
    char shp[256];
    *sorted_out = NULL;
    if (count > 0 && !entries)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: %zu entries but entries is NULL", where,
                            count);
    size_t sum = 0;
    for (size_t i = 0; i < count; i++) {
        const mt_st_entry *e = &entries[i];
        if (!e->name)
            return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: entry %zu has no name", where, i);
        size_t bad;
        if (!utf8_valid((const unsigned char *)e->name, strlen(e->name), &bad))
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "%s: entry %zu: tensor name is not valid UTF-8 (byte %zu)", where,
                                i, bad);
        if (strcmp(e->name, "__metadata__") == 0)
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "%s: entry %zu: '__metadata__' is reserved and cannot name a "
                                "tensor",
                                where, i);
        if ((unsigned)e->dtype >= MT_ST_DTYPE_COUNT)
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "%s: tensor '%s': dtype %d is not a safetensors dtype", where,
                                e->name, (int)e->dtype);
        if (e->ndim < 0 || e->ndim > MT_MAX_DIMS)
            return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: tensor '%s': ndim %d, expected 0..%d",
                                where, e->name, e->ndim, MT_MAX_DIMS);
        /* The element count folds left, then times the dtype size, as on reading, so
         * that nothing written is refused when read back. */
        size_t n = 1;
        int overflow = 0;
        for (int d = 0; d < e->ndim; d++) {
            if (e->shape[d] < 0)
                return mt_error_set(err, MT_ERR_INVALID_ARG,
                                    "%s: tensor '%s': shape %s has a negative dimension", where,
                                    e->name, mt_shape_format(shp, sizeof shp, e->ndim, e->shape));
            overflow |=
                (uint64_t)e->shape[d] > SIZE_MAX || !mt_mul_size(n, (size_t)e->shape[d], &n);
        }
        if (overflow || !mt_mul_size(n, st_dtypes[e->dtype].size, &n))
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "%s: tensor '%s': shape %s of %s: the byte count overflows", where,
                                e->name, mt_shape_format(shp, sizeof shp, e->ndim, e->shape),
                                st_dtypes[e->dtype].name);
        if (n > 0 && !e->data)
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "%s: tensor '%s': %zu bytes of %s %s but data is NULL", where,
                                e->name, n, st_dtypes[e->dtype].name,
                                mt_shape_format(shp, sizeof shp, e->ndim, e->shape));
        if (!mt_add_size(sum, n, &sum) || sum > (size_t)INT64_MAX)
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "%s: the tensors' total byte count overflows", where);
    }
    const mt_st_entry **sorted = mt_calloc(count, sizeof *sorted, "sorted entries", err);
    if (!sorted) return MT_ERR_NOMEM;
    for (size_t i = 0; i < count; i++) sorted[i] = &entries[i];
    qsort(sorted, count, sizeof *sorted, cmp_entry_names);
    for (size_t i = 1; i < count; i++) {
        if (strcmp(sorted[i - 1]->name, sorted[i]->name) == 0) {
            mt_status st = mt_error_set(err, MT_ERR_INVALID_ARG,
                                        "%s: tensor name '%s' appears twice (entries %zu and %zu); "
                                        "expected unique names",
                                        where, sorted[i]->name, (size_t)(sorted[i - 1] - entries),
                                        (size_t)(sorted[i] - entries));
            free(sorted);
            return st;
        }
    }
    *sorted_out = sorted;
    *total = sum;
    return MT_OK;
}

/* Builds the "__metadata__" object from key, value, ..., NULL; NULL result with
 * *st set on error, NULL with MT_OK when there is no metadata. */
static json_t *build_metadata(const char *where, const char *const *metadata, mt_status *st,
                              mt_error *err) {
    *st = MT_OK;
    if (!metadata) return NULL;
    json_t *obj = json_object();
    if (!obj) {
        *st = mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory building metadata", where);
        return NULL;
    }
    for (size_t i = 0; metadata[i]; i += 2) {
        const char *k = metadata[i], *v = metadata[i + 1];
        size_t bad;
        if (!v) {
            *st = mt_error_set(
                err, MT_ERR_INVALID_ARG,
                "%s: metadata key '%s' has no value (expected key, value, ..., NULL)", where, k);
        } else if (json_object_get(obj, k)) {
            *st = mt_error_set(err, MT_ERR_INVALID_ARG, "%s: metadata key '%s' appears twice",
                               where, k);
        } else if (!utf8_valid((const unsigned char *)k, strlen(k), &bad) ||
                   !utf8_valid((const unsigned char *)v, strlen(v), &bad)) {
            *st = mt_error_set(err, MT_ERR_INVALID_ARG,
                               "%s: metadata key '%s' or its value is not valid UTF-8", where, k);
        } else if (json_object_set_new(obj, k, json_string(v)) != 0) {
            *st = mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory building metadata", where);
        }
        if (*st != MT_OK) {
            json_decref(obj);
            return NULL;
        }
    }
    return obj;
}

/* The JSON header for sorted entries, padded with spaces to a multiple of 8 bytes. */
static mt_status build_header(const char *path, const mt_st_entry *const *sorted, size_t count,
                              const char *const *metadata, char **out, size_t *out_len,
                              mt_error *err) {
    mt_status st = MT_OK;
    json_t *root = json_object();
    if (!root)
        return mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory building the header", path);
    json_t *meta = build_metadata(path, metadata, &st, err);
    if (st != MT_OK) {
        json_decref(root);
        return st;
    }
    int bad = meta && json_object_set_new(root, "__metadata__", meta) != 0;
    size_t offset = 0;
    for (size_t i = 0; i < count && !bad; i++) {
        const mt_st_entry *e = sorted[i];
        size_t n = entry_nbytes(e);
        json_t *shape = json_array();
        json_t *offs = json_array();
        json_t *obj = json_object();
        bad = !shape || !offs || !obj;
        for (int d = 0; d < e->ndim && !bad; d++)
            bad = json_array_append_new(shape, json_integer((json_int_t)e->shape[d])) != 0;
        if (!bad) bad = json_array_append_new(offs, json_integer((json_int_t)offset)) != 0;
        if (!bad) bad = json_array_append_new(offs, json_integer((json_int_t)(offset + n))) != 0;
        if (!bad)
            bad = json_object_set_new(obj, "dtype", json_string(st_dtypes[e->dtype].name)) != 0;
        if (!bad) {
            bad = json_object_set_new(obj, "shape", shape) != 0;
            shape = NULL;
        }
        if (!bad) {
            bad = json_object_set_new(obj, "data_offsets", offs) != 0;
            offs = NULL;
        }
        if (!bad) {
            bad = json_object_set_new(root, e->name, obj) != 0;
            obj = NULL;
        }
        json_decref(shape);
        json_decref(offs);
        json_decref(obj);
        offset += n;
    }
    char *text = bad ? NULL : json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(root);
    if (!text)
        return mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory building the header", path);
    size_t len = strlen(text), padded = len + (8 - len % 8) % 8;
    char *buf = mt_malloc(padded, "safetensors header", err);
    if (!buf) {
        free(text);
        return MT_ERR_NOMEM;
    }
    memcpy(buf, text, len);
    memset(buf + len, ' ', padded - len);
    free(text);
    *out = buf;
    *out_len = padded;
    return MT_OK;
}

/* Streams header and data through an atomic file: the data is never copied into one
 * big buffer. */
static mt_status write_sorted(const char *path, const mt_st_entry *const *sorted, size_t count,
                              const char *const *metadata, mt_error *err) {
    char *header = NULL;
    size_t hlen = 0;
    mt_status st = build_header(path, sorted, count, metadata, &header, &hlen, err);
    if (st != MT_OK) return st;
    mt_atomic_file f;
    if ((st = mt_atomic_open(&f, path, err)) != MT_OK) {
        free(header);
        return st;
    }
    unsigned char lenbytes[8];
    for (int i = 0; i < 8; i++) lenbytes[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
    st = mt_atomic_write(&f, lenbytes, sizeof lenbytes, err);
    if (st == MT_OK) st = mt_atomic_write(&f, header, hlen, err);
    for (size_t i = 0; i < count && st == MT_OK; i++)
        st = mt_atomic_write(&f, sorted[i]->data, entry_nbytes(sorted[i]), err);
    free(header);
    if (st != MT_OK) {
        mt_atomic_abort(&f);
        return st;
    }
    return mt_atomic_commit(&f, err);
}

mt_status mt_st_write(const char *path, const mt_st_entry *entries, size_t count,
                      const char *const *metadata, mt_error *err) {
    if (!path) return mt_error_set(err, MT_ERR_INVALID_ARG, "mt_st_write: path is NULL");
    const mt_st_entry **sorted = NULL;
    size_t total = 0;
    mt_status st = check_entries(path, entries, count, &sorted, &total, err);
    if (st != MT_OK) return st;
    st = write_sorted(path, sorted, count, metadata, err);
    free(sorted);
    return st;
}

/* mkdir -p */
static mt_status make_dirs(const char *dir, mt_error *err) {
    char *p = mt_strdup(dir, "directory path", err);
    if (!p) return MT_ERR_NOMEM;
    size_t n = strlen(p);
    for (size_t i = 1; i <= n; i++) {
        if (p[i] != '/' && p[i] != '\0') continue;
        char saved = p[i];
        p[i] = '\0';
        struct stat sb;
        if (mkdir(p, 0755) != 0 && !(errno == EEXIST && stat(p, &sb) == 0 && S_ISDIR(sb.st_mode))) {
            mt_status st = mt_error_set(err, MT_ERR_IO, "%s: cannot create directory %s: %s", dir,
                                        p, strerror(errno == EEXIST ? ENOTDIR : errno));
            free(p);
            return st;
        }
        p[i] = saved;
    }
    free(p);
    return MT_OK;
}

/* Removes dir/name if it exists (a checkpoint of the other form left from an
 * earlier save, which would make the directory ambiguous). */
static mt_status remove_stale(const char *dir, const char *name, mt_error *err) {
    char *p = mt_path_join(dir, name, err);
    if (!p) return MT_ERR_NOMEM;
    mt_status st = MT_OK;
    if (unlink(p) != 0 && errno != ENOENT)
        st = mt_error_set(err, MT_ERR_IO, "%s: cannot remove the stale %s: %s", p, name,
                          strerror(errno));
    free(p);
    return st;
}

mt_status mt_st_write_sharded(const char *dir, const mt_st_entry *entries, size_t count,
                              const char *const *metadata, size_t max_shard_bytes, mt_error *err) {
    if (!dir) return mt_error_set(err, MT_ERR_INVALID_ARG, "mt_st_write_sharded: dir is NULL");
    if (max_shard_bytes == 0)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: max_shard_bytes is 0, expected > 0", dir);
    const mt_st_entry **sorted = NULL;
    size_t total = 0;
    mt_status st = check_entries(dir, entries, count, &sorted, &total, err);
    if (st != MT_OK) return st;
    size_t *first = NULL; /* first[s] = index into sorted of shard s's first tensor */
    char *path = NULL;
    json_t *index = NULL;
    char *text = NULL;

    st = make_dirs(dir, err);
    if (st != MT_OK) goto done;
    first = mt_calloc(count + 1, sizeof *first, "shard table", err);
    if (!first) {
        st = MT_ERR_NOMEM;
        goto done;
    }
    size_t nshards = 0, cur = 0;
    for (size_t i = 0; i < count; i++) {
        size_t n = entry_nbytes(sorted[i]);
        /* A new shard when this tensor would overflow the current one (a tensor
         * larger than max_shard_bytes ends up alone in its shard). */
        if (nshards == 0 || (cur > 0 && (cur > max_shard_bytes || n > max_shard_bytes - cur))) {
            first[nshards++] = i;
            cur = 0;
        }
        cur += n;
    }
    if (nshards == 0) first[nshards++] = 0; /* no tensors: one empty file */
    first[nshards] = count;

    if (nshards == 1) {
        path = mt_path_join(dir, ST_SINGLE_NAME, err);
        st = path ? write_sorted(path, sorted, count, metadata, err) : MT_ERR_NOMEM;
        if (st == MT_OK) st = remove_stale(dir, ST_INDEX_NAME, err);
        goto done;
    }

    index = json_object();
    if (!index || json_object_set_new(index, "metadata", json_object()) != 0 ||
        json_object_set_new(index, "weight_map", json_object()) != 0 ||
        json_object_set_new(json_object_get(index, "metadata"), "total_size",
                            json_integer((json_int_t)total)) != 0) {
        st = mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory building the index", dir);
        goto done;
    }
    json_t *wmap = json_object_get(index, "weight_map");
    for (size_t s = 0; s < nshards && st == MT_OK; s++) {
        char name[96];
        snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, nshards);
        free(path);
        path = mt_path_join(dir, name, err);
        if (!path) {
            st = MT_ERR_NOMEM;
            break;
        }
        st = write_sorted(path, sorted + first[s], first[s + 1] - first[s], metadata, err);
        for (size_t i = first[s]; i < first[s + 1] && st == MT_OK; i++)
            if (json_object_set_new(wmap, sorted[i]->name, json_string(name)) != 0)
                st = mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory building the index", dir);
    }
    if (st != MT_OK) goto done;
    text = json_dumps(index, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    if (!text) {
        st = mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory writing the index", dir);
        goto done;
    }
    free(path);
    path = mt_path_join(dir, ST_INDEX_NAME, err);
    if (!path) {
        st = MT_ERR_NOMEM;
        goto done;
    }
    st = mt_write_file_atomic(path, text, strlen(text), err);
    if (st == MT_OK) st = remove_stale(dir, ST_SINGLE_NAME, err);

done:
    free(text);
    json_decref(index);
    free(path);
    free(first);
    free(sorted);
    return st;
}
