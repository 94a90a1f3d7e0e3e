/* test_safetensors.c — the safetensors reader and writer: round trips (single and
 * sharded), one crafted bad file per validation rule, and files written by the
 * reference implementation (safetensors' Python save_file, HF save_pretrained). */
#define _POSIX_C_SOURCE 200809L
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "formats/safetensors.h"

#ifndef MT_FIXTURE_DIR
#define MT_FIXTURE_DIR "tests/fixtures"
#endif

/* ---- helpers -------------------------------------------------------------- */

static char *join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    assert_non_null(p);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static int exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

/* The whole file, malloc'ed; *n its size. */
static unsigned char *read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    long size = ftell(f);
    assert_true(size >= 0);
    assert_int_equal(fseek(f, 0, SEEK_SET), 0);
    unsigned char *buf = malloc((size_t)size + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)size, f), (size_t)size);
    fclose(f);
    buf[size] = 0;
    *n = (size_t)size;
    return buf;
}

/* A file with an explicit header length n (which need not match the header),
 * header bytes and data bytes. */
static void write_raw_len(const char *path, uint64_t n, const char *header, size_t hlen,
                          const void *data, size_t dlen) {
    size_t total = 8 + hlen + dlen;
    unsigned char *buf = malloc(total);
    assert_non_null(buf);
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)(n >> (8 * i));
    if (hlen) memcpy(buf + 8, header, hlen);
    if (dlen) memcpy(buf + 8 + hlen, data, dlen);
    mt_test_write_file(path, buf, total);
    free(buf);
}

/* A well-formed frame: the header length is the header's length. */
static void write_raw(const char *path, const char *header, const void *data, size_t dlen) {
    write_raw_len(path, strlen(header), header, strlen(header), data, dlen);
}

static void expect_msg_has(const mt_error *err, const char *want) {
    if (want && !strstr(err->msg, want)) fail_msg("message \"%s\" lacks \"%s\"", err->msg, want);
}

/* Opening path fails; the message names the file and holds each of want1, want2. */
static void expect_refused(const char *path, const char *want1, const char *want2) {
    mt_error err = {MT_OK, ""};
    mt_safetensors *st = (mt_safetensors *)&err; /* must come back NULL */
    mt_status s = mt_st_open(path, &st, &err);
    assert_int_not_equal(s, MT_OK);
    assert_int_equal(err.status, s);
    assert_null(st);
    expect_msg_has(&err, path);
    expect_msg_has(&err, want1);
    expect_msg_has(&err, want2);
}

/* A path for a crafted file in a fresh directory (freed by done_dir). */
static char *fresh_file(char **dir, const char *tag) {
    *dir = mt_test_tmpdir(tag);
    return join(*dir, "bad.safetensors");
}

static void done_dir(char *dir, char *path) {
    mt_test_rmtree(dir);
    free(dir);
    free(path);
}

static mt_st_entry entry(const char *name, mt_st_dtype dtype, int ndim, const int64_t *shape,
                         const void *data) {
    mt_st_entry e;
    memset(&e, 0, sizeof e);
    e.name = name;
    e.dtype = dtype;
    e.ndim = ndim;
    for (int i = 0; i < ndim; i++) e.shape[i] = shape[i];
    e.data = data;
    return e;
}

static mt_safetensors *open_ok(const char *path) {
    mt_error err = {MT_OK, ""};
    mt_safetensors *st = NULL;
    mt_status s = mt_st_open(path, &st, &err);
    if (s != MT_OK) fail_msg("mt_st_open(%s): %s", path, err.msg);
    assert_non_null(st);
    return st;
}

/* ---- round trip ------------------------------------------------------------- */

static void test_roundtrip_single(void **state) {
    (void)state;
    char *dir = mt_test_tmpdir("st-rt");
    char *path = join(dir, "m.safetensors");
    uint64_t rng = 42;

    float a[12], scalar = -3.5f;
    mt_test_fill_uniform(a, 12, &rng, -2.0f, 2.0f);
    float hsrc[5] = {0.5f, -1.25f, 65504.0f, 6.0e-8f, 0.3333f};
    uint16_t h[5];
    for (int i = 0; i < 5; i++) h[i] = mt_f32_to_f16(hsrc[i]);
    float bsrc[6];
    mt_test_fill_uniform(bsrc, 6, &rng, -100.0f, 100.0f);
    uint16_t b[6];
    for (int i = 0; i < 6; i++) b[i] = mt_f32_to_bf16(bsrc[i]);
    unsigned char odd[3] = {1, 2, 3};

    /* "0.odd" sorts first and is 3 bytes, so every tensor after it is unaligned
     * in the data buffer: mt_st_read_f32 must not assume alignment. */
    const int64_t s_a[] = {3, 4}, s_h[] = {5}, s_b[] = {2, 3, 1}, s_e[] = {0, 7}, s_o[] = {3};
    mt_st_entry es[] = {
        entry("layer.weight", MT_ST_F32, 2, s_a, a),  entry("half.vec", MT_ST_F16, 1, s_h, h),
        entry("brain.cube", MT_ST_BF16, 3, s_b, b),   entry("empty", MT_ST_F32, 2, s_e, NULL),
        entry("scalar", MT_ST_F32, 0, NULL, &scalar), entry("0.odd", MT_ST_U8, 1, s_o, odd),
    };
    const size_t n = sizeof es / sizeof es[0];
    const char *meta[] = {"format", "pt", "note", "h\xc3\xa9llo \"quoted\"\n", NULL};
    mt_error err = {MT_OK, ""};
    assert_int_equal(mt_st_write(path, es, n, meta, &err), MT_OK);

    /* The frame: the data starts 8-byte aligned, the header is a JSON object. */
    size_t fsize;
    unsigned char *raw = read_all(path, &fsize);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | raw[i];
    assert_int_equal((8 + hlen) % 8, 0);
    assert_int_equal(raw[8], '{');
    assert_int_equal(fsize, 8 + hlen + 48 + 10 + 12 + 0 + 4 + 3);
    assert_non_null(strstr((const char *)raw + 8, "\"__metadata__\""));
    free(raw);

    mt_safetensors *st = open_ok(path);
    assert_int_equal(mt_st_count(st), n);
    /* Sorted by name. */
    const char *order[] = {"0.odd", "brain.cube", "empty", "half.vec", "layer.weight", "scalar"};
    for (size_t i = 0; i < n; i++) {
        const mt_st_tensor *t = mt_st_at(st, i);
        assert_non_null(t);
        assert_string_equal(t->name, order[i]);
        assert_string_equal(t->file, path);
        assert_ptr_equal(mt_st_find(st, order[i]), t);
    }
    assert_null(mt_st_at(st, n));
    assert_null(mt_st_find(st, "missing"));
    assert_null(mt_st_find(st, ""));

    /* Every entry: dtype, shape, bytes. */
    for (size_t i = 0; i < n; i++) {
        const mt_st_tensor *t = mt_st_find(st, es[i].name);
        assert_non_null(t);
        assert_int_equal(t->dtype, es[i].dtype);
        assert_int_equal(t->ndim, es[i].ndim);
        size_t bytes = mt_st_dtype_size(es[i].dtype);
        for (int d = 0; d < t->ndim; d++) {
            assert_int_equal(t->shape[d], es[i].shape[d]);
            bytes *= (size_t)es[i].shape[d];
        }
        assert_int_equal(t->nbytes, bytes);
        if (bytes) assert_memory_equal(t->data, es[i].data, bytes);
    }

    /* Conversions to fp32. */
    float out[12];
    assert_int_equal(mt_st_read_f32(mt_st_find(st, "layer.weight"), out, &err), MT_OK);
    assert_memory_equal(out, a, sizeof a);
    assert_int_equal(mt_st_read_f32(mt_st_find(st, "half.vec"), out, &err), MT_OK);
    for (int i = 0; i < 5; i++) assert_true(out[i] == mt_f16_to_f32(h[i]));
    assert_true(out[0] == 0.5f && out[1] == -1.25f && out[2] == 65504.0f);
    assert_int_equal(mt_st_read_f32(mt_st_find(st, "brain.cube"), out, &err), MT_OK);
    for (int i = 0; i < 6; i++) {
        assert_true(out[i] == mt_bf16_to_f32(b[i]));
        assert_true(fabsf(out[i] - bsrc[i]) <= fabsf(bsrc[i]) / 128.0f);
    }
    assert_int_equal(mt_st_read_f32(mt_st_find(st, "scalar"), out, &err), MT_OK);
    assert_true(out[0] == -3.5f);
    assert_int_equal(mt_st_read_f32(mt_st_find(st, "empty"), NULL, &err), MT_OK);

    /* Other dtypes do not convert, and say which tensor. */
    assert_int_not_equal(mt_st_read_f32(mt_st_find(st, "0.odd"), out, &err), MT_OK);
    expect_msg_has(&err, path);
    expect_msg_has(&err, "0.odd");
    expect_msg_has(&err, "U8");

    /* Metadata. */
    assert_string_equal(mt_st_metadata(st, "format"), "pt");
    assert_string_equal(mt_st_metadata(st, "note"), "h\xc3\xa9llo \"quoted\"\n");
    assert_null(mt_st_metadata(st, "absent"));
    mt_st_close(st);

    /* Rewriting the same path replaces it atomically and leaves no temporary. */
    assert_int_equal(mt_st_write(path, es, 2, NULL, &err), MT_OK);
    st = open_ok(path);
    assert_int_equal(mt_st_count(st), 2);
    assert_null(mt_st_metadata(st, "format"));
    mt_st_close(st);
    raw = read_all(path, &fsize);
    assert_null(strstr((const char *)raw + 8, "__metadata__"));
    free(raw);
    done_dir(dir, path);
}

static void test_roundtrip_empty_file(void **state) {
    (void)state;
    char *dir = mt_test_tmpdir("st-empty");
    char *path = join(dir, "e.safetensors");
    mt_error err = {MT_OK, ""};
    assert_int_equal(mt_st_write(path, NULL, 0, NULL, &err), MT_OK);
    size_t fsize;
    unsigned char *raw = read_all(path, &fsize);
    assert_int_equal(fsize, 16); /* "{}" padded with spaces to 8 bytes */
    assert_memory_equal(raw + 8, "{}      ", 8);
    free(raw);
    mt_safetensors *st = open_ok(path);
    assert_int_equal(mt_st_count(st), 0);
    assert_null(mt_st_at(st, 0));
    assert_null(mt_st_find(st, "x"));
    mt_st_close(st);
    mt_st_close(NULL);
    done_dir(dir, path);
}

static void test_writer_refuses_bad_entries(void **state) {
    (void)state;
    char *dir = mt_test_tmpdir("st-wbad");
    char *path = join(dir, "w.safetensors");
    float x[4] = {0};
    const int64_t s4[] = {4}, neg[] = {2, -2}, huge[] = {INT64_MAX, INT64_MAX};
    mt_error err = {MT_OK, ""};

    mt_st_entry dup[] = {entry("w", MT_ST_F32, 1, s4, x), entry("v", MT_ST_F32, 1, s4, x),
                         entry("w", MT_ST_F32, 1, s4, x)};
    assert_int_equal(mt_st_write(path, dup, 3, NULL, &err), MT_ERR_INVALID_ARG);
    expect_msg_has(&err, "'w' appears twice");

    mt_st_entry bad_shape = entry("n", MT_ST_F32, 2, neg, x);
    assert_int_equal(mt_st_write(path, &bad_shape, 1, NULL, &err), MT_ERR_INVALID_ARG);
    expect_msg_has(&err, "'n'");

    mt_st_entry overflow = entry("o", MT_ST_F32, 2, huge, x);
    assert_int_equal(mt_st_write(path, &overflow, 1, NULL, &err), MT_ERR_INVALID_ARG);
    expect_msg_has(&err, "overflows");

    mt_st_entry no_data = entry("d", MT_ST_F32, 1, s4, NULL);
    assert_int_equal(mt_st_write(path, &no_data, 1, NULL, &err), MT_ERR_INVALID_ARG);
    expect_msg_has(&err, "'d'");

    mt_st_entry reserved = entry("__metadata__", MT_ST_F32, 1, s4, x);
    assert_int_equal(mt_st_write(path, &reserved, 1, NULL, &err), MT_ERR_INVALID_ARG);

    mt_st_entry bad_dtype = entry("t", MT_ST_DTYPE_COUNT, 1, s4, x);
    assert_int_equal(mt_st_write(path, &bad_dtype, 1, NULL, &err), MT_ERR_INVALID_ARG);

    mt_st_entry bad_ndim = entry("t", MT_ST_F32, 1, s4, x);
    bad_ndim.ndim = MT_MAX_DIMS + 1;
    assert_int_equal(mt_st_write(path, &bad_ndim, 1, NULL, &err), MT_ERR_INVALID_ARG);

    mt_st_entry ok = entry("t", MT_ST_F32, 1, s4, x);
    const char *odd_meta[] = {"key", NULL, NULL};
    assert_int_equal(mt_st_write(path, &ok, 1, odd_meta, &err), MT_ERR_INVALID_ARG);
    expect_msg_has(&err, "'key' has no value");
    const char *dup_meta[] = {"k", "1", "k", "2", NULL};
    assert_int_equal(mt_st_write(path, &ok, 1, dup_meta, &err), MT_ERR_INVALID_ARG);
    expect_msg_has(&err, "'k' appears twice");
    const char *bad_utf8[] = {"k", "\xff", NULL};
    assert_int_equal(mt_st_write(path, &ok, 1, bad_utf8, &err), MT_ERR_INVALID_ARG);

    assert_false(exists(path)); /* nothing was written by any refused call */
    assert_int_equal(mt_st_write_sharded(dir, &ok, 1, NULL, 0, &err), MT_ERR_INVALID_ARG);
    done_dir(dir, path);
}

/* ---- sharded checkpoints ------------------------------------------------------ */

/* Five F32 [16] tensors (64 bytes each) "t0".."t4" with value i*100 + j. */
static float shard_data[5][16];
static mt_st_entry shard_entries[5];
static const char *shard_names[5] = {"t0", "t1", "t2", "t3", "t4"};

static void make_shard_entries(void) {
    const int64_t s16[] = {16};
    for (int i = 0; i < 5; i++) {
        for (int j = 0; j < 16; j++) shard_data[i][j] = (float)(i * 100 + j);
        shard_entries[i] = entry(shard_names[i], MT_ST_F32, 1, s16, shard_data[i]);
    }
}

static void write_three_shards(const char *dir) {
    make_shard_entries();
    const char *meta[] = {"format", "pt", NULL};
    mt_error err = {MT_OK, ""};
    /* 130 bytes: t0+t1 (128) fit, t2 would not -> [t0 t1] [t2 t3] [t4]. */
    mt_status s = mt_st_write_sharded(dir, shard_entries, 5, meta, 130, &err);
    if (s != MT_OK) fail_msg("mt_st_write_sharded: %s", err.msg);
}

static void test_sharded_roundtrip(void **state) {
    (void)state;
    char *dir = mt_test_tmpdir("st-shard");
    write_three_shards(dir);
    char *index = join(dir, "model.safetensors.index.json");
    char *single = join(dir, "model.safetensors");
    char *shard[3] = {join(dir, "model-00001-of-00003.safetensors"),
                      join(dir, "model-00002-of-00003.safetensors"),
                      join(dir, "model-00003-of-00003.safetensors")};
    assert_true(exists(index));
    assert_false(exists(single));
    for (int i = 0; i < 3; i++) assert_true(exists(shard[i]));

    /* The index: total_size and the weight_map. */
    json_error_t jerr;
    json_t *root = json_load_file(index, JSON_REJECT_DUPLICATES, &jerr);
    assert_non_null(root);
    assert_int_equal(
        json_integer_value(json_object_get(json_object_get(root, "metadata"), "total_size")),
        5 * 64);
    json_t *wmap = json_object_get(root, "weight_map");
    assert_int_equal(json_object_size(wmap), 5);
    const int expect_shard[5] = {0, 0, 1, 1, 2};
    for (int i = 0; i < 5; i++) {
        const char *f = json_string_value(json_object_get(wmap, shard_names[i]));
        assert_non_null(f);
        assert_non_null(strstr(shard[expect_shard[i]], f));
    }
    json_decref(root);

    /* Open through the directory and through the index path. */
    const char *how[2] = {dir, index};
    for (int k = 0; k < 2; k++) {
        mt_safetensors *st = open_ok(how[k]);
        assert_int_equal(mt_st_count(st), 5);
        for (int i = 0; i < 5; i++) {
            const mt_st_tensor *t = mt_st_at(st, (size_t)i);
            assert_string_equal(t->name, shard_names[i]);
            assert_string_equal(t->file, shard[expect_shard[i]]);
            float out[16];
            mt_error err = {MT_OK, ""};
            assert_int_equal(mt_st_read_f32(t, out, &err), MT_OK);
            assert_memory_equal(out, shard_data[i], sizeof out);
        }
        assert_string_equal(mt_st_metadata(st, "format"), "pt");
        mt_st_close(st);
    }

    /* A shard on its own is a valid file with just its tensors. */
    mt_safetensors *one = open_ok(shard[2]);
    assert_int_equal(mt_st_count(one), 1);
    assert_string_equal(mt_st_at(one, 0)->name, "t4");
    mt_st_close(one);

    /* A tensor larger than max_shard_bytes gets a shard of its own. */
    char *dir2 = mt_test_tmpdir("st-big");
    mt_error err = {MT_OK, ""};
    assert_int_equal(mt_st_write_sharded(dir2, shard_entries, 5, NULL, 10, &err), MT_OK);
    char *fifth = join(dir2, "model-00005-of-00005.safetensors");
    assert_true(exists(fifth));
    mt_safetensors *st = open_ok(dir2);
    assert_int_equal(mt_st_count(st), 5);
    mt_st_close(st);

    /* Everything fitting in one shard: model.safetensors, and the stale index goes. */
    assert_int_equal(mt_st_write_sharded(dir2, shard_entries, 5, NULL, 1u << 20, &err), MT_OK);
    char *index2 = join(dir2, "model.safetensors.index.json");
    char *single2 = join(dir2, "model.safetensors");
    assert_false(exists(index2));
    assert_true(exists(single2));
    st = open_ok(dir2);
    assert_int_equal(mt_st_count(st), 5);
    mt_st_close(st);

    /* Into a directory that does not exist yet (created, with parents). */
    char *nested = join(dir2, "a/b/c");
    assert_int_equal(mt_st_write_sharded(nested, shard_entries, 5, NULL, 130, &err), MT_OK);
    st = open_ok(nested);
    assert_int_equal(mt_st_count(st), 5);
    mt_st_close(st);

    free(nested);
    free(index2);
    free(single2);
    free(fifth);
    mt_test_rmtree(dir2);
    free(dir2);
    for (int i = 0; i < 3; i++) free(shard[i]);
    free(index);
    free(single);
    mt_test_rmtree(dir);
    free(dir);
}

/* Rewrites the index with fn applied to its weight_map. */
static void edit_index(const char *dir, void (*fn)(json_t *wmap)) {
    char *index = join(dir, "model.safetensors.index.json");
    json_error_t jerr;
    json_t *root = json_load_file(index, 0, &jerr);
    assert_non_null(root);
    fn(json_object_get(root, "weight_map"));
    assert_int_equal(json_dump_file(root, index, JSON_INDENT(2)), 0);
    json_decref(root);
    free(index);
}

static void add_ghost(json_t *wmap) {
    json_object_set_new(wmap, "ghost", json_string("model-00002-of-00003.safetensors"));
}
static void add_missing_shard(json_t *wmap) {
    json_object_set_new(wmap, "t9", json_string("model-00009-of-00009.safetensors"));
}
static void drop_t3(json_t *wmap) { json_object_del(wmap, "t3"); }
static void move_t0(json_t *wmap) {
    json_object_set_new(wmap, "t0", json_string("model-00002-of-00003.safetensors"));
}
static void escape_dir(json_t *wmap) {
    json_object_set_new(wmap, "t0", json_string("../model-00001-of-00003.safetensors"));
}

static void test_sharded_refusals(void **state) {
    (void)state;
    struct {
        void (*fn)(json_t *);
        const char *want1, *want2;
    } cases[] = {
        {add_ghost, "'ghost'", "model-00002-of-00003.safetensors"},
        {add_missing_shard, "model-00009-of-00009.safetensors", "cannot open"},
        {drop_t3, "'t3'", "missing from the weight_map"},
        {move_t0, "'t0'", "model-00001-of-00003.safetensors"},
        {escape_dir, "'t0'", "relative"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        char *dir = mt_test_tmpdir("st-shbad");
        write_three_shards(dir);
        edit_index(dir, cases[c].fn);
        char *index = join(dir, "model.safetensors.index.json");
        expect_refused(index, cases[c].want1, cases[c].want2);
        expect_refused(dir, cases[c].want1, cases[c].want2);
        free(index);
        mt_test_rmtree(dir);
        free(dir);
    }
}

static void test_sharded_tensor_in_two_shards(void **state) {
    (void)state;
    char *dir = mt_test_tmpdir("st-dup");
    make_shard_entries();
    char *s1 = join(dir, "s1.safetensors"), *s2 = join(dir, "s2.safetensors");
    mt_error err = {MT_OK, ""};
    assert_int_equal(mt_st_write(s1, shard_entries, 2, NULL, &err), MT_OK);     /* t0 t1 */
    assert_int_equal(mt_st_write(s2, shard_entries + 1, 2, NULL, &err), MT_OK); /* t1 t2 */
    char *index = join(dir, "model.safetensors.index.json");
    const char *text = "{\"metadata\": {\"total_size\": 256}, \"weight_map\": {"
                       "\"t0\": \"s1.safetensors\", \"t1\": \"s1.safetensors\", "
                       "\"t2\": \"s2.safetensors\"}}";
    mt_test_write_file(index, text, strlen(text));
    expect_refused(index, "'t1' appears in two shards", "s2.safetensors");

    /* Duplicate keys in the index itself. */
    const char *dup = "{\"weight_map\": {\"t0\": \"s1.safetensors\", \"t0\": \"s1.safetensors\"}}";
    mt_test_write_file(index, dup, strlen(dup));
    expect_refused(index, "duplicate", NULL);

    /* No weight_map at all. */
    const char *none = "{\"metadata\": {}}";
    mt_test_write_file(index, none, strlen(none));
    expect_refused(index, "weight_map", NULL);

    /* A directory with both forms is ambiguous. */
    char *single = join(dir, "model.safetensors");
    assert_int_equal(mt_st_write(single, shard_entries, 1, NULL, &err), MT_OK);
    expect_refused(dir, "model.safetensors.index.json", "both");
    /* A directory with neither. */
    char *empty = join(dir, "nothing");
    assert_int_equal(mkdir(empty, 0755), 0);
    expect_refused(empty, "neither", NULL);
    expect_refused("/nonexistent/x.safetensors", "cannot open", NULL);

    free(empty);
    free(single);
    free(index);
    free(s1);
    free(s2);
    mt_test_rmtree(dir);
    free(dir);
}

/* ---- one test per bad file ------------------------------------------------------ */

static const unsigned char zeros[64];

static void test_bad_truncated(void **state) {
    (void)state;
    char *dir, *path = fresh_file(&dir, "st-trunc");
    /* 16 bytes declared, 10 present. */
    write_raw(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", zeros, 10);
    expect_refused(path, "'w'", "past the end of the data buffer");
    done_dir(dir, path);
}

static void test_bad_header_past_end(void **state) {
    (void)state;
    char *dir, *path = fresh_file(&dir, "st-hpast");
    const char *h = "{}";
    write_raw_len(path, 1000, h, strlen(h), NULL, 0);
    expect_refused(path, "header length 1000 past the end of the file", NULL);
    /* At exactly the limit, the length is judged against the file, not the limit. */
    write_raw_len(path, MT_ST_MAX_HEADER_BYTES, h, strlen(h), NULL, 0);
    expect_refused(path, "past the end of the file", NULL);
    /* A header length near 2^64 must not wrap around. */
    write_raw_len(path, UINT64_MAX - 4, h, strlen(h), NULL, 0);
    expect_refused(path, "exceeds the limit", NULL);
    done_dir(dir, path);
}

static void test_bad_header_too_large(void **state) {
    (void)state;
    char *dir, *path = fresh_file(&dir, "st-hbig");
    const char *h = "{}";
    write_raw_len(path, (uint64_t)MT_ST_MAX_HEADER_BYTES + 1, h, strlen(h), NULL, 0);
    expect_refused(path, "header length 100000001 exceeds the limit", NULL);
    done_dir(dir, path);
}

static void test_bad_overlap(void **state) {
    (void)state;
    char *dir, *path = fresh_file(&dir, "st-overlap");
    write_raw(path,
              "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
              "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}",
              zeros, 24);
    expect_refused(path, "'b' (bytes [8, 24)) overlaps tensor 'a'", NULL);
    /* Two tensors over the same bytes. */
    write_raw(path,
              "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
              "\"b\":{\"dtype\":\"I32\",\"shape\":[4],\"data_offsets\":[0,16]}}",
              zeros, 16);
    expect_refused(path, "'b'", "overlaps tensor 'a'");
    done_dir(dir, path);
}

static void test_bad_gap(void **state) {
    (void)state;
    char *dir, *path = fresh_file(&dir, "st-gap");
    write_raw(path,
              "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
              "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]}}",
              zeros, 20);
    expect_refused(path, "gap of 4 bytes between tensor 'a'", "tensor 'b'");
    /* The first tensor must begin at 0. */
    write_raw(path, "{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[2,4]}}", zeros, 4);
    expect_refused(path, "'a' begins at byte 2", "expected 0");
    done_dir(dir, path);
}

static void test_bad_byte_length(void **state) {
    (void)state;
    char *dir, *path = fresh_file(&dir, "st-len");
    write_raw(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", zeros, 8);
    expect_refused(path, "'w'", "hold 8 bytes, but shape [3] of F32 needs 12 bytes");
    done_dir(dir, path);
}

static void test_bad_unknown_dtype(void **state) {
    (void)state;
    char *dir, *path = fresh_file(&dir, "st-dtype");
    write_raw(path, "{\"w\":{\"dtype\":\"F33\",\"shape\":[1],\"data_offsets\":[0,4]}}", zeros, 4);
    expect_refused(path, "'w'", "unknown dtype 'F33'");
    done_dir(dir, path);
}

static void test_bad_not_json(void **state) {
    (void)state;
    char *dir, *path = fresh_file(&dir, "st-nojson");
    write_raw(path, "{\"w\": {\"dtype\": ", NULL, 0);
    expect_refused(path, "not valid JSON", NULL);
    write_raw_len(path, 0, "", 0, NULL, 0); /* an empty header */
    expect_refused(path, "not valid JSON", NULL);
    done_dir(dir, path);
}

static void test_bad_json_array(void **state) {
    (void)state;
    char *dir, *path = fresh_file(&dir, "st-array");
    write_raw(path, "[1, 2, 3]", NULL, 0);
    expect_refused(path, "must be a JSON object, found an array", NULL);
    write_raw(path, "\"str\"", NULL, 0);
    expect_refused(path, "must be a JSON object, found a string", NULL);
    done_dir(dir, path);
}

static void test_bad_negative_shape(void **state) {
    (void)state;
    char *dir, *path = fresh_file(&dir, "st-neg");
    write_raw(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,-1],\"data_offsets\":[0,8]}}", zeros,
              8);
    expect_refused(path, "'w'", "shape[1] must be a non-negative integer, found -1");
    write_raw(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}", zeros, 8);
    expect_refused(path, "'w'", "shape[0] must be a non-negative integer, found the real number 2");
    done_dir(dir, path);
}

static void test_bad_offsets_overflow(void **state) {
    (void)state;
    char *dir, *path = fresh_file(&dir, "st-ovf");
    /* 2^63 does not fit a JSON integer in any 64-bit signed reader. */
    write_raw(path,
              "{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,9223372036854775808]}}",
              zeros, 1);
    expect_refused(path, "not valid JSON", NULL);
    /* 2^63 - 1 fits but runs far past the file. */
    write_raw(path,
              "{\"w\":{\"dtype\":\"U8\",\"shape\":[9223372036854775807],"
              "\"data_offsets\":[0,9223372036854775807]}}",
              zeros, 1);
    expect_refused(path, "'w'", "past the end of the data buffer");
    /* An element count that overflows: 2^62 * 2^62. */
    write_raw(path,
              "{\"w\":{\"dtype\":\"U8\",\"shape\":[4611686018427387904,4611686018427387904],"
              "\"data_offsets\":[0,0]}}",
              NULL, 0);
    expect_refused(path, "'w'", "element count overflows");
    /* A byte count that overflows: 2^62 elements of 8 bytes. */
    write_raw(path,
              "{\"w\":{\"dtype\":\"F64\",\"shape\":[4611686018427387904],\"data_offsets\":[0,0]}}",
              NULL, 0);
    expect_refused(path, "'w'", "byte count overflows");
    /* A negative offset; begin after end. */
    write_raw(path, "{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[-1,0]}}", zeros, 1);
    expect_refused(path, "'w'", "data_offsets[0] must be a non-negative integer, found -1");
    write_raw(path, "{\"w\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[1,0]}}", zeros, 1);
    expect_refused(path, "'w'", "end before they begin");
    done_dir(dir, path);
}

static void test_bad_trailing_bytes(void **state) {
    (void)state;
    char *dir, *path = fresh_file(&dir, "st-trail");
    write_raw(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", zeros, 12);
    expect_refused(path, "4 trailing bytes after the last tensor 'w'", NULL);
    write_raw(path, "{}", zeros, 3);
    expect_refused(path, "no tensors, but 3 bytes of data", NULL);
    done_dir(dir, path);
}

static void test_bad_short_file(void **state) {
    (void)state;
    char *dir, *path = fresh_file(&dir, "st-short");
    mt_test_write_file(path, "\x02\0\0\0\0", 5);
    expect_refused(path, "file is 5 bytes, shorter than the 8-byte header length", NULL);
    mt_test_write_file(path, "", 0);
    expect_refused(path, "file is 0 bytes", NULL);
    done_dir(dir, path);
}

static void test_bad_duplicate_keys(void **state) {
    (void)state;
    char *dir, *path = fresh_file(&dir, "st-dupkey");
    write_raw(path,
              "{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
              "\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
              zeros, 1);
    expect_refused(path, "duplicate object key", "w");
    done_dir(dir, path);
}

/* The remaining rules, one crafted header each. */
static void test_bad_misc(void **state) {
    (void)state;
    char *dir, *path = fresh_file(&dir, "st-misc");
    struct {
        const char *header;
        size_t data;
        const char *want1, *want2;
    } cases[] = {
        {"{\"w\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 1,
         "'w'", "shape has 9 dimensions, at most 8"},
        {"{\"__metadata__\":{\"k\":1}}", 0, "__metadata__ value for key 'k'", "found an integer"},
        {"{\"__metadata__\":[\"k\"]}", 0, "\"__metadata__\" must be an object", NULL},
        {"{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1,1]}}", 1, "'w'",
         "found 3 entries"},
        {"{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":\"0-1\"}}", 1, "'w'",
         "must be an array"},
        {"{\"w\":{\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "'w'", "missing \"dtype\""},
        {"{\"w\":{\"dtype\":\"U8\",\"data_offsets\":[0,1]}}", 1, "'w'", "missing \"shape\""},
        {"{\"w\":{\"dtype\":\"U8\",\"shape\":[1]}}", 1, "'w'", "missing \"data_offsets\""},
        {"{\"w\":{\"dtype\":8,\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "'w'",
         "\"dtype\" must be a string"},
        {"{\"w\":{\"dtype\":\"U8\",\"shape\":1,\"data_offsets\":[0,1]}}", 1, "'w'",
         "\"shape\" must be an array"},
        {"{\"w\":[1]}", 1, "'w'", "expected an object"},
        {"{\"w\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "'w'",
         "unknown dtype 'f32'"},
        {"{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}} x", 1, "not valid JSON",
         NULL},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        size_t hlen = strlen(cases[c].header);
        write_raw_len(path, hlen, cases[c].header, hlen, zeros, cases[c].data);
        expect_refused(path, cases[c].want1, cases[c].want2);
    }
    /* NUL padding after the JSON (valid UTF-8, not JSON whitespace). */
    const char nul_pad[] = "{}\0\0\0\0\0\0";
    write_raw_len(path, 8, nul_pad, 8, NULL, 0);
    expect_refused(path, "not valid JSON", NULL);
    /* Not UTF-8: an overlong encoding, a lone continuation byte, a surrogate. */
    const char *bad_utf8[] = {"{\"\xc0\xaf\":1}", "{\"\x80\":1}", "{\"\xed\xa0\x80\":1}",
                              "{\"\xe2\x82\":1}"};
    for (size_t c = 0; c < sizeof bad_utf8 / sizeof bad_utf8[0]; c++) {
        write_raw(path, bad_utf8[c], NULL, 0);
        expect_refused(path, "not valid UTF-8", NULL);
    }
    /* Valid: leading whitespace, padding, null metadata, unknown extra fields,
     * zero-sized tensors sharing an offset, a 4-byte UTF-8 name. */
    write_raw(
        path,
        " {\"__metadata__\":null,\"z\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[1,1]},"
        "\"\xf0\x9f\x98\x80\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"x\":1},"
        "\"y\":{\"dtype\":\"U8\",\"shape\":[0,5],\"data_offsets\":[1,1]}}   ",
        "\x07", 1);
    mt_safetensors *st = open_ok(path);
    assert_int_equal(mt_st_count(st), 3);
    assert_int_equal(*(const unsigned char *)mt_st_find(st, "\xf0\x9f\x98\x80")->data, 7);
    assert_null(mt_st_metadata(st, "x"));
    mt_st_close(st);
    /* A directory given as a file path is not a safetensors file. */
    char *sub = join(dir, "sub.safetensors");
    assert_int_equal(mkdir(sub, 0755), 0);
    expect_refused(sub, "neither", NULL);
    free(sub);
    done_dir(dir, path);
}

/* ---- files from the reference implementation ------------------------------------ */

static void test_reference_fixture(void **state) {
    (void)state;
    const char *path = MT_FIXTURE_DIR "/safetensors/reference_small.safetensors";
    if (!exists(path)) skip();
    mt_safetensors *st = open_ok(path);
    assert_int_equal(mt_st_count(st), 7);
    assert_non_null(strstr(mt_st_metadata(st, "formula"), "(i-7)*0.25"));
    assert_non_null(strstr(mt_st_metadata(st, "writer"), "save_file"));
    mt_error err = {MT_OK, ""};

    const mt_st_tensor *t = mt_st_find(st, "f32.matrix");
    assert_non_null(t);
    assert_int_equal(t->dtype, MT_ST_F32);
    assert_int_equal(t->ndim, 2);
    assert_int_equal(t->shape[0], 3);
    assert_int_equal(t->shape[1], 5);
    float f[15];
    assert_int_equal(mt_st_read_f32(t, f, &err), MT_OK);
    for (int i = 0; i < 15; i++) assert_true(f[i] == (float)(i - 7) * 0.25f);

    t = mt_st_find(st, "f16.vector");
    assert_non_null(t);
    assert_int_equal(t->dtype, MT_ST_F16);
    assert_int_equal(mt_st_read_f32(t, f, &err), MT_OK);
    for (int i = 0; i < 6; i++) assert_true(f[i] == (float)(i - 2) * 0.5f);

    t = mt_st_find(st, "f64.pair");
    assert_non_null(t);
    assert_int_equal(t->dtype, MT_ST_F64);
    assert_int_equal(t->nbytes, 16);
    for (int i = 0; i < 2; i++) {
        double d;
        memcpy(&d, (const char *)t->data + 8 * i, sizeof d);
        assert_true(d == i + 0.125);
    }
    assert_int_not_equal(mt_st_read_f32(t, f, &err), MT_OK);

    t = mt_st_find(st, "i64.ids");
    assert_non_null(t);
    assert_int_equal(t->dtype, MT_ST_I64);
    for (int i = 0; i < 4; i++) {
        int64_t v;
        memcpy(&v, (const char *)t->data + 8 * i, sizeof v);
        assert_int_equal(v, i * 1000 - 1);
    }

    t = mt_st_find(st, "u8.bytes");
    assert_non_null(t);
    assert_int_equal(t->dtype, MT_ST_U8);
    for (int i = 0; i < 3; i++) assert_int_equal(((const unsigned char *)t->data)[i], i + 1);

    t = mt_st_find(st, "scalar");
    assert_non_null(t);
    assert_int_equal(t->ndim, 0);
    assert_int_equal(mt_st_read_f32(t, f, &err), MT_OK);
    assert_true(f[0] == 42.5f);

    t = mt_st_find(st, "empty");
    assert_non_null(t);
    assert_int_equal(t->ndim, 2);
    assert_int_equal(t->shape[0], 0);
    assert_int_equal(t->shape[1], 3);
    assert_int_equal(t->nbytes, 0);
    mt_st_close(st);
}

/* The HF save_pretrained checkpoints that other tests use, when present. */
/* mt_st_read_f32_finite converts as mt_st_read_f32 does and refuses NaN and infinities
 * in every dtype, naming the file, the tensor, the count and where the first one is,
 * also past the first 4096-value block; the largest finite values pass. */
static void test_read_f32_finite(void **state) {
    (void)state;
    char *dir = mt_test_tmpdir("st-finite");
    char *path = join(dir, "w.safetensors");
    enum { R = 100, K = 100, N = R * K };
    float *f = malloc(N * sizeof *f), *out = malloc(N * sizeof *out);
    uint16_t *h = malloc(N * sizeof *h), *b = malloc(N * sizeof *b);
    assert_true(f && out && h && b);
    uint64_t rng = 7;
    mt_test_fill_uniform(f, N, &rng, -1.0f, 1.0f);
    for (int i = 0; i < N; i++) h[i] = mt_f32_to_f16(f[i]), b[i] = mt_f32_to_bf16(f[i]);
    float ok_f[2] = {3.4028235e38f, -3.4028235e38f};
    uint16_t ok_h[2] = {0x7BFF, 0xFBFF}, ok_b[2] = {0x7F7F, 0xFF7F}; /* +-max finite */
    float *bad_f = malloc(N * sizeof *bad_f);
    uint16_t *bad_h = malloc(N * sizeof *bad_h), *bad_b = malloc(N * sizeof *bad_b);
    assert_true(bad_f && bad_h && bad_b);
    memcpy(bad_f, f, N * sizeof *f);
    memcpy(bad_h, h, N * sizeof *h);
    memcpy(bad_b, b, N * sizeof *b);
    bad_f[9000] = NAN;           /* past the first block: row 90, column 0 */
    bad_f[9999] = -INFINITY;
    bad_h[4097] = 0x7C00;        /* +inf in F16 */
    bad_b[0] = 0x7FC0;           /* NaN in BF16 */
    bad_b[17] = 0xFF80;          /* -inf */
    bad_b[18] = 0x7F81;          /* a signalling NaN */
    const int64_t mat[2] = {R, K}, vec[1] = {N}, two[1] = {2};
    mt_st_entry e[] = {
        entry("bad.bf16", MT_ST_BF16, 1, vec, bad_b), entry("bad.f16", MT_ST_F16, 2, mat, bad_h),
        entry("bad.f32", MT_ST_F32, 2, mat, bad_f),   entry("good.bf16", MT_ST_BF16, 2, mat, b),
        entry("good.f16", MT_ST_F16, 2, mat, h),      entry("good.f32", MT_ST_F32, 2, mat, f),
        entry("max.bf16", MT_ST_BF16, 1, two, ok_b),  entry("max.f16", MT_ST_F16, 1, two, ok_h),
        entry("max.f32", MT_ST_F32, 1, two, ok_f),
    };
    mt_error err = {MT_OK, ""};
    if (mt_st_write(path, e, sizeof e / sizeof e[0], NULL, &err)) fail_msg("%s", err.msg);
    mt_safetensors *st = open_ok(path);
    const char *good[] = {"good.bf16", "good.f16", "good.f32", "max.bf16", "max.f16", "max.f32"};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        const mt_st_tensor *t = mt_st_find(st, good[i]);
        if (mt_st_read_f32_finite(t, out, &err)) fail_msg("%s: %s", good[i], err.msg);
    }
    assert_true(out[0] == 3.4028235e38f && out[1] == -3.4028235e38f);
    assert_int_equal(mt_st_read_f32_finite(mt_st_find(st, "good.f32"), out, &err), MT_OK);
    assert_memory_equal(out, f, N * sizeof *f);
    struct {
        const char *name, *want[3];
    } bad[] = {
        {"bad.f32", {"tensor \"bad.f32\": 2 non-finite values (the first, nan, at index 9000 of 10000, "
                     "element [90, 0])", "expected finite F32 values", NULL}},
        {"bad.f16", {"tensor \"bad.f16\": 1 non-finite value (the first, inf, at index 4097 of 10000, "
                     "element [40, 97])", "F16", NULL}},
        {"bad.bf16", {"tensor \"bad.bf16\": 3 non-finite values (the first, nan, at index 0 of 10000)",
                      "BF16", NULL}},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        const mt_st_tensor *t = mt_st_find(st, bad[i].name);
        /* the plain reader converts whatever is there; the checked one refuses */
        assert_int_equal(mt_st_read_f32(t, out, &err), MT_OK);
        assert_int_equal(mt_st_read_f32_finite(t, out, &err), MT_ERR_FORMAT);
        printf("refused: %s\n", err.msg);
        expect_msg_has(&err, path);
        for (int k = 0; k < 3; k++) expect_msg_has(&err, bad[i].want[k]);
    }
    mt_st_close(st);
    free(f), free(out), free(h), free(b), free(bad_f), free(bad_h), free(bad_b);
    done_dir(dir, path);
}

static void test_hf_fixtures(void **state) {
    (void)state;
    const struct {
        const char *open, *probe;
    } paths[] = {
        {MT_FIXTURE_DIR "/tiny_bias", MT_FIXTURE_DIR "/tiny_bias/model.safetensors"},
        {MT_FIXTURE_DIR "/tiny_gqa", MT_FIXTURE_DIR "/tiny_gqa/model.safetensors"},
        {MT_FIXTURE_DIR "/tiny_bias/reference.safetensors",
         MT_FIXTURE_DIR "/tiny_bias/reference.safetensors"},
        {MT_FIXTURE_DIR "/tiny_gqa/reference.safetensors",
         MT_FIXTURE_DIR "/tiny_gqa/reference.safetensors"},
    };
    int seen = 0;
    for (size_t p = 0; p < sizeof paths / sizeof paths[0]; p++) {
        if (!exists(paths[p].probe)) continue;
        seen++;
        mt_safetensors *st = open_ok(paths[p].open);
        assert_true(mt_st_count(st) > 0);
        for (size_t i = 0; i < mt_st_count(st); i++) {
            const mt_st_tensor *t = mt_st_at(st, i);
            if (i > 0) assert_true(strcmp(mt_st_at(st, i - 1)->name, t->name) < 0);
            if (t->dtype != MT_ST_F32 && t->dtype != MT_ST_F16 && t->dtype != MT_ST_BF16) continue;
            size_t n = t->nbytes / mt_st_dtype_size(t->dtype);
            float *buf = malloc((n ? n : 1) * sizeof *buf);
            assert_non_null(buf);
            mt_error err = {MT_OK, ""};
            assert_int_equal(mt_st_read_f32(t, buf, &err), MT_OK);
            for (size_t k = 0; k < n; k++) assert_true(isfinite(buf[k]));
            free(buf);
        }
        mt_st_close(st);
    }
    if (!seen) skip();
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_single),
        cmocka_unit_test(test_roundtrip_empty_file),
        cmocka_unit_test(test_writer_refuses_bad_entries),
        cmocka_unit_test(test_sharded_roundtrip),
        cmocka_unit_test(test_sharded_refusals),
        cmocka_unit_test(test_sharded_tensor_in_two_shards),
        cmocka_unit_test(test_bad_truncated),
        cmocka_unit_test(test_bad_header_past_end),
        cmocka_unit_test(test_bad_header_too_large),
        cmocka_unit_test(test_bad_overlap),
        cmocka_unit_test(test_bad_gap),
        cmocka_unit_test(test_bad_byte_length),
        cmocka_unit_test(test_bad_unknown_dtype),
        cmocka_unit_test(test_bad_not_json),
        cmocka_unit_test(test_bad_json_array),
        cmocka_unit_test(test_bad_negative_shape),
        cmocka_unit_test(test_bad_offsets_overflow),
        cmocka_unit_test(test_bad_trailing_bytes),
        cmocka_unit_test(test_bad_short_file),
        cmocka_unit_test(test_bad_duplicate_keys),
        cmocka_unit_test(test_bad_misc),
        cmocka_unit_test(test_reference_fixture),
        cmocka_unit_test(test_hf_fixtures),
        cmocka_unit_test(test_read_f32_finite),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
