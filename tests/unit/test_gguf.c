/* test_gguf.c — the GGUF reader: a fixture written by gguf-py (metadata of
 * every type, tensors of every dequantizable type, compared bit for bit with
 * gguf-py's dequantizer), the SmolLM2-135M Q4_1 file when present, and one
 * crafted bad file per validation rule. */
#define _POSIX_C_SOURCE 200809L
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "formats/gguf.h"
#include "formats/safetensors.h"

#ifndef MT_FIXTURE_DIR
#define MT_FIXTURE_DIR "tests/fixtures"
#endif

#define GGUF_DIR MT_FIXTURE_DIR "/gguf"

/* ---- helpers --------------------------------------------------------------
 */

static mt_gguf *open_ok(const char *path) {
    mt_error err = {MT_OK, ""};
    mt_gguf *g = NULL;
    mt_status s = mt_gguf_open(path, &g, &err);
    if (s != MT_OK) fail_msg("mt_gguf_open(%s): %s", path, err.msg);
    assert_non_null(g);
    return g;
}

static void expect_msg_has(const mt_error *err, const char *want) {
    if (want && !strstr(err->msg, want)) fail_msg("message \"%s\" lacks \"%s\"", err->msg, want);
}

/* A byte builder for crafted files. */
typedef struct bytes {
    unsigned char *p;
    size_t n, cap;
} bytes;

static void put(bytes *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    if (n) memcpy(b->p + b->n, src, n);
    b->n += n;
}
static void put_u8(bytes *b, uint8_t v) { put(b, &v, 1); }
static void put_le(bytes *b, uint64_t v, int n) {
    for (int i = 0; i < n; i++) put_u8(b, (uint8_t)(v >> (8 * i)));
}
static void put_u32(bytes *b, uint32_t v) { put_le(b, v, 4); }
static void put_u64(bytes *b, uint64_t v) { put_le(b, v, 8); }
static void put_str(bytes *b, const char *s) {
    put_u64(b, strlen(s));
    put(b, s, strlen(s));
}
static void put_zeros(bytes *b, size_t n) {
    for (size_t i = 0; i < n; i++) put_u8(b, 0);
}
static void pad_to(bytes *b, size_t align) {
    while (b->n % align) put_u8(b, 0);
}
static void header(bytes *b, uint32_t version, uint64_t ntensors, uint64_t nkv) {
    put(b, "GGUF", 4);
    put_u32(b, version);
    put_u64(b, ntensors);
    put_u64(b, nkv);
}
static void kv_u32(bytes *b, const char *key, uint32_t v) {
    put_str(b, key);
    put_u32(b, MT_GGUF_UINT32);
    put_u32(b, v);
}
static void kv_str(bytes *b, const char *key, const char *v) {
    put_str(b, key);
    put_u32(b, MT_GGUF_STRING);
    put_str(b, v);
}
static void tinfo(bytes *b, const char *name, uint32_t n_dims, const uint64_t *ne, uint32_t type,
                  uint64_t offset) {
    put_str(b, name);
    put_u32(b, n_dims);
    for (uint32_t i = 0; i < n_dims; i++) put_u64(b, ne[i]);
    put_u32(b, type);
    put_u64(b, offset);
}

/* A well-formed file: two kvs, tensors "w" (F32 [4, 2]) and "v" (F32 [8]). */
static void good_file(bytes *b) {
    header(b, 3, 2, 2);
    kv_str(b, "general.architecture", "llama");
    kv_u32(b, "llama.block_count", 2);
    uint64_t ne_w[2] = {4, 2}, ne_v[1] = {8};
    tinfo(b, "w", 2, ne_w, MT_GGML_F32, 0);
    tinfo(b, "v", 1, ne_v, MT_GGML_F32, 32);
    pad_to(b, 32);
    for (int i = 0; i < 16; i++) {
        float f = (float)i - 4.0f;
        put(b, &f, 4);
    }
}

typedef struct crafted {
    char *dir, *path;
} crafted;

static crafted write_crafted(const bytes *b, const char *tag) {
    crafted c;
    c.dir = mt_test_tmpdir(tag);
    size_t n = strlen(c.dir) + 16;
    c.path = malloc(n);
    assert_non_null(c.path);
    snprintf(c.path, n, "%s/bad.gguf", c.dir);
    static const unsigned char none[1] = {0};
    mt_test_write_file(c.path, b->p ? b->p : none, b->n);
    return c;
}

static void crafted_done(crafted *c, bytes *b) {
    mt_test_rmtree(c->dir);
    free(c->dir);
    free(c->path);
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* Opening the bytes fails; the message names the file and holds want1 and
 * want2. */
static void expect_refused(bytes *b, const char *tag, const char *want1, const char *want2) {
    crafted c = write_crafted(b, tag);
    mt_error err = {MT_OK, ""};
    mt_gguf *g = (mt_gguf *)&err; /* must come back NULL */
    mt_status s = mt_gguf_open(c.path, &g, &err);
    if (s == MT_OK) fail_msg("%s: expected a refusal (%s), but the file opened", tag, want1);
    assert_int_equal(err.status, s);
    assert_null(g);
    expect_msg_has(&err, c.path);
    expect_msg_has(&err, want1);
    expect_msg_has(&err, want2);
    printf("  %-18s %s\n", tag, err.msg + strlen(c.path));
    crafted_done(&c, b);
}

/* ---- the gguf-py fixture: metadata
 * ------------------------------------------------ */

static const mt_gguf_value *get_typed(const mt_gguf *g, const char *key, mt_gguf_type type) {
    const mt_gguf_value *v = mt_gguf_get(g, key);
    if (!v) fail_msg("key %s is missing", key);
    if (v->type != type) fail_msg("key %s: type %d, expected %d", key, v->type, type);
    return v;
}

static void check_string(const mt_gguf *g, const char *key, const char *want) {
    const mt_gguf_value *v = get_typed(g, key, MT_GGUF_STRING);
    assert_int_equal(v->str_len, strlen(want));
    if (strlen(want)) assert_memory_equal(v->str, want, strlen(want));
    char *s = NULL;
    mt_error err = {MT_OK, ""};
    assert_int_equal(mt_gguf_get_string(g, key, &s, &err), MT_OK);
    assert_string_equal(s, want);
    free(s);
}

static void test_fixture_metadata(void **state) {
    (void)state;
    mt_gguf *g = open_ok(GGUF_DIR "/small.gguf");
    assert_int_equal(mt_gguf_version(g), 3);
    assert_string_equal(mt_gguf_path(g), GGUF_DIR "/small.gguf");
    assert_int_equal(mt_gguf_kv_count(g), 23);
    assert_string_equal(mt_gguf_kv_key(g, 0), "general.architecture");
    assert_string_equal(mt_gguf_kv_key(g, 22), "test.arr_f64");
    assert_null(mt_gguf_kv_key(g, 23));
    for (size_t i = 0; i < mt_gguf_kv_count(g); i++)
        assert_non_null(mt_gguf_get(g, mt_gguf_kv_key(g, i)));

    check_string(g, "general.architecture", "llama");
    check_string(g, "general.name", "moontune gguf fixture");
    check_string(g, "test.str", "h\xc3\xa9llo \xe2\x9c\x93");
    check_string(g, "test.empty_str", "");

    assert_int_equal(get_typed(g, "test.u8", MT_GGUF_UINT8)->num.u64, 200);
    assert_int_equal(get_typed(g, "test.i8", MT_GGUF_INT8)->num.i64, -100);
    assert_int_equal(get_typed(g, "test.u16", MT_GGUF_UINT16)->num.u64, 60000);
    assert_int_equal(get_typed(g, "test.i16", MT_GGUF_INT16)->num.i64, -30000);
    assert_int_equal(get_typed(g, "test.u32", MT_GGUF_UINT32)->num.u64, 4000000000u);
    assert_int_equal(get_typed(g, "test.i32", MT_GGUF_INT32)->num.i64, -2000000000);
    assert_true(get_typed(g, "test.f32", MT_GGUF_FLOAT32)->num.f64 == 0.15625);
    assert_int_equal(get_typed(g, "test.bool_true", MT_GGUF_BOOL)->num.boolean, 1);
    assert_int_equal(get_typed(g, "test.bool_false", MT_GGUF_BOOL)->num.boolean, 0);
    assert_true(get_typed(g, "test.u64", MT_GGUF_UINT64)->num.u64 == (1ull << 63) + 5);
    assert_true(get_typed(g, "test.i64", MT_GGUF_INT64)->num.i64 == -(1ll << 62) - 3);
    assert_true(get_typed(g, "test.f64", MT_GGUF_FLOAT64)->num.f64 == 3.141592653589793);

    /* typed getters */
    mt_error err = {MT_OK, ""};
    int64_t i;
    double d;
    char *s = NULL;
    assert_int_equal(mt_gguf_get_int(g, "test.u8", &i, &err), MT_OK);
    assert_int_equal(i, 200);
    assert_int_equal(mt_gguf_get_int(g, "test.i16", &i, &err), MT_OK);
    assert_int_equal(i, -30000);
    assert_int_equal(mt_gguf_get_int(g, "test.u32", &i, &err), MT_OK);
    assert_int_equal(i, 4000000000ll);
    assert_int_equal(mt_gguf_get_int(g, "test.i64", &i, &err), MT_OK);
    assert_true(i == -(1ll << 62) - 3);
    assert_int_equal(mt_gguf_get_float(g, "test.f32", &d, &err), MT_OK);
    assert_true(d == 0.15625);
    assert_int_equal(mt_gguf_get_float(g, "test.f64", &d, &err), MT_OK);
    assert_true(d == 3.141592653589793);
    /* refusals name the file and the key */
    assert_int_not_equal(mt_gguf_get_int(g, "test.u64", &i, &err), MT_OK);
    expect_msg_has(&err, "small.gguf");
    expect_msg_has(&err, "test.u64");
    expect_msg_has(&err, "9223372036854775813");
    assert_int_not_equal(mt_gguf_get_int(g, "test.f32", &i, &err), MT_OK);
    expect_msg_has(&err, "'test.f32': expected an integer, found FLOAT32");
    assert_int_not_equal(mt_gguf_get_float(g, "test.u32", &d, &err), MT_OK);
    expect_msg_has(&err, "'test.u32': expected FLOAT32 or FLOAT64, found UINT32");
    assert_int_not_equal(mt_gguf_get_string(g, "test.arr_str", &s, &err), MT_OK);
    expect_msg_has(&err, "expected a STRING, found an ARRAY of STRING");
    assert_null(s);
    assert_int_not_equal(mt_gguf_get_int(g, "no.such.key", &i, &err), MT_OK);
    expect_msg_has(&err, "small.gguf: key 'no.such.key' is missing");
    assert_null(mt_gguf_get(g, "no.such.key"));

    /* arrays */
    const mt_gguf_value *v = get_typed(g, "test.arr_str", MT_GGUF_ARRAY);
    assert_int_equal(v->arr_type, MT_GGUF_STRING);
    assert_int_equal(v->arr_len, 4);
    const char *want[4] = {"a", "", "hello world", "\xc3\xbc"};
    for (uint64_t k = 0; k < 4; k++) {
        uint64_t len = 99;
        const char *e = mt_gguf_array_string(g, v, k, &len);
        assert_non_null(e);
        assert_int_equal(len, strlen(want[k]));
        assert_true(memcmp(e, want[k], len) == 0);
    }
    assert_null(mt_gguf_array_string(g, v, 4, NULL));
    assert_null(mt_gguf_array_string(g, get_typed(g, "test.arr_f32", MT_GGUF_ARRAY), 0, NULL));

    v = get_typed(g, "test.arr_f32", MT_GGUF_ARRAY);
    assert_int_equal(v->arr_type, MT_GGUF_FLOAT32);
    assert_int_equal(v->arr_len, 3);
    float f[3];
    memcpy(f, v->arr_data, sizeof f);
    assert_true(f[0] == 1.5f && f[1] == -2.25f && f[2] == 0.0f);

    v = get_typed(g, "test.arr_i32", MT_GGUF_ARRAY);
    assert_int_equal(v->arr_type, MT_GGUF_INT32);
    int32_t i32[3];
    memcpy(i32, v->arr_data, sizeof i32);
    assert_true(i32[0] == -1 && i32[1] == 0 && i32[2] == 2147483647);

    v = get_typed(g, "test.arr_u8", MT_GGUF_ARRAY);
    assert_int_equal(v->arr_type, MT_GGUF_UINT8);
    assert_memory_equal(v->arr_data, "\x00\xff\x07", 3);

    v = get_typed(g, "test.arr_bool", MT_GGUF_ARRAY);
    assert_int_equal(v->arr_type, MT_GGUF_BOOL);
    assert_memory_equal(v->arr_data, "\x01\x00\x01", 3);

    v = get_typed(g, "test.arr_i64", MT_GGUF_ARRAY);
    assert_int_equal(v->arr_type, MT_GGUF_INT64);
    int64_t i64[2];
    memcpy(i64, v->arr_data, sizeof i64);
    assert_true(i64[0] == -(1ll << 40) && i64[1] == (1ll << 40));

    v = get_typed(g, "test.arr_f64", MT_GGUF_ARRAY);
    assert_int_equal(v->arr_type, MT_GGUF_FLOAT64);
    double f64[2];
    memcpy(f64, v->arr_data, sizeof f64);
    assert_true(f64[0] == 0.1 && f64[1] == -1e300);

    mt_gguf_close(g);
}

/* ---- the gguf-py fixture: tensors
 * --------------------------------------------------- */

static uint32_t f32_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

/* Distance in units in the last place (both finite). */
static uint64_t ulp_diff(float a, float b) {
    int64_t x = (int32_t)f32_bits(a), y = (int32_t)f32_bits(b);
    if (x < 0) x = (int64_t)INT32_MIN - x;
    if (y < 0) y = (int64_t)INT32_MIN - y;
    return (uint64_t)(x > y ? x - y : y - x);
}

static void test_fixture_tensors(void **state) {
    (void)state;
    mt_gguf *g = open_ok(GGUF_DIR "/small.gguf");
    mt_safetensors *ref = NULL;
    mt_error err = {MT_OK, ""};
    if (mt_st_open(GGUF_DIR "/small_ref.safetensors", &ref, &err) != MT_OK) fail_msg("%s", err.msg);
    static const struct {
        const char *name;
        uint32_t type;
        int n_dims;
        int64_t ne[4];
    } want[] = {
        {"f32.matrix", MT_GGML_F32, 2, {5, 3, 1, 1}},
        {"f32.cube", MT_GGML_F32, 3, {4, 3, 2, 1}},
        {"f16.matrix", MT_GGML_F16, 2, {8, 4, 1, 1}},
        {"bf16.matrix", MT_GGML_BF16, 2, {16, 2, 1, 1}},
        {"q8_0.matrix", MT_GGML_Q8_0, 2, {64, 4, 1, 1}},
        {"q4_0.matrix", MT_GGML_Q4_0, 2, {64, 3, 1, 1}},
        {"q4_1.matrix", MT_GGML_Q4_1, 2, {96, 2, 1, 1}},
        {"q4_k.matrix", MT_GGML_Q4_K, 2, {512, 2, 1, 1}},
        {"q6_k.matrix", MT_GGML_Q6_K, 2, {512, 2, 1, 1}},
        {"i8.vector", 24, 1, {4, 1, 1, 1}},
    };
    const size_t nwant = sizeof want / sizeof want[0];
    assert_int_equal(mt_gguf_tensor_count(g), nwant);
    static const size_t bytes_per[] = {[0] = 4, [1] = 2, [30] = 2};
    for (size_t k = 0; k < nwant; k++) {
        const mt_gguf_tensor *t = mt_gguf_tensor_at(g, k);
        assert_non_null(t);
        assert_string_equal(t->name, want[k].name);
        assert_ptr_equal(mt_gguf_find_tensor(g, want[k].name), t);
        assert_int_equal(t->type, want[k].type);
        assert_int_equal(t->n_dims, want[k].n_dims);
        size_t numel = 1;
        for (int d = 0; d < 4; d++) {
            assert_int_equal(t->ne[d], want[k].ne[d]);
            numel *= (size_t)t->ne[d];
        }
        assert_true(((uintptr_t)t->data) % 32 == 0); /* the mapping is page aligned */
        if (t->type == MT_GGML_Q8_0) assert_int_equal(t->nbytes, numel / 32 * 34);
        if (t->type == MT_GGML_Q4_0) assert_int_equal(t->nbytes, numel / 32 * 18);
        if (t->type == MT_GGML_Q4_1) assert_int_equal(t->nbytes, numel / 32 * 20);
        if (t->type == MT_GGML_Q4_K) assert_int_equal(t->nbytes, numel / 256 * 144);
        if (t->type == MT_GGML_Q6_K) assert_int_equal(t->nbytes, numel / 256 * 210);
        if (t->type == 0 || t->type == 1 || t->type == 30)
            assert_int_equal(t->nbytes, numel * bytes_per[t->type]);

        float *out = calloc(numel, sizeof *out);
        assert_non_null(out);
        if (t->type == 24) { /* I8: listed, not dequantized */
            assert_string_equal(mt_ggml_type_name(t->type), "I8");
            assert_int_equal(t->nbytes, 4);
            assert_memory_equal(t->data, "\xfd\x00\x05\x7f", 4);
            assert_int_equal(mt_gguf_dequantize(g, t, out, &err), MT_ERR_UNSUPPORTED);
            expect_msg_has(&err,
                           "small.gguf: tensor 'i8.vector': type I8 (24) does not dequantize");
            free(out);
            continue;
        }
        if (mt_gguf_dequantize(g, t, out, &err) != MT_OK) fail_msg("%s", err.msg);
        const mt_st_tensor *r = mt_st_find(ref, t->name);
        assert_non_null(r);
        assert_int_equal(r->dtype, MT_ST_F32);
        assert_int_equal(r->ndim, t->n_dims);
        for (int d = 0; d < t->n_dims; d++) assert_int_equal(r->shape[t->n_dims - 1 - d], t->ne[d]);
        assert_int_equal(r->nbytes, numel * 4);
        const unsigned char *rp = r->data;
        uint64_t max_ulp = 0;
        size_t nonzero = 0;
        for (size_t e = 0; e < numel; e++) {
            float x;
            memcpy(&x, rp + 4 * e, 4);
            assert_true(isfinite(out[e]));
            uint64_t u = ulp_diff(out[e], x);
            if (u > max_ulp) max_ulp = u;
            nonzero += out[e] != 0.0f;
        }
        printf("  %-12s %-5s %5zu elements: max %llu ulp from gguf-py\n", t->name,
               mt_ggml_type_name(t->type), numel, (unsigned long long)max_ulp);
        assert_true(nonzero > numel / 2);
        assert_int_equal(max_ulp, 0);
        free(out);
    }
    assert_null(mt_gguf_tensor_at(g, nwant));
    assert_null(mt_gguf_find_tensor(g, "nope"));
    mt_st_close(ref);
    mt_gguf_close(g);
}

static void test_fixture_alignment64(void **state) {
    (void)state;
    mt_gguf *g = open_ok(GGUF_DIR "/align64.gguf");
    const mt_gguf_value *v = get_typed(g, "general.alignment", MT_GGUF_UINT32);
    assert_int_equal(v->num.u64, 64);
    const mt_gguf_tensor *a = mt_gguf_find_tensor(g, "a"), *b = mt_gguf_find_tensor(g, "b");
    assert_non_null(a);
    assert_non_null(b);
    assert_true((uintptr_t)a->data % 64 == 0 && (uintptr_t)b->data % 64 == 0);
    assert_int_equal((const char *)b->data - (const char *)a->data, 64);
    float x[5];
    mt_error err = {MT_OK, ""};
    assert_int_equal(mt_gguf_dequantize(g, a, x, &err), MT_OK);
    assert_true(x[0] == 0.0f && x[1] == 1.0f && x[2] == 2.0f);
    assert_int_equal(mt_gguf_dequantize(g, b, x, &err), MT_OK);
    for (int i = 0; i < 5; i++) assert_true(x[i] == (float)i - 10.0f);
    mt_gguf_close(g);
}

/* ---- the SmolLM2-135M Q4_1 file (when present)
 * ---------------------------------- */

static void test_smollm2(void **state) {
    (void)state;
    const char *smollm2 = mt_test_smollm2_gguf();
    if (!smollm2) return;
    json_error_t jerr;
    json_t *facts = json_load_file(GGUF_DIR "/smollm2_q4_1.json", 0, &jerr);
    if (!facts) fail_msg("smollm2_q4_1.json: %s", jerr.text);
    mt_gguf *g = open_ok(smollm2);
    mt_error err = {MT_OK, ""};
    assert_int_equal(mt_gguf_version(g), 3);
    assert_int_equal(mt_gguf_kv_count(g), json_integer_value(json_object_get(facts, "kv_count")));
    assert_int_equal(mt_gguf_tensor_count(g),
                     json_integer_value(json_object_get(facts, "tensor_count")));
    assert_int_equal(mt_gguf_tensor_count(g), 272);

    const char *key;
    json_t *jv;
    int64_t i;
    double d;
    json_object_foreach(json_object_get(facts, "ints"), key, jv) {
        if (mt_gguf_get_int(g, key, &i, &err) != MT_OK) fail_msg("%s", err.msg);
        assert_int_equal(i, json_integer_value(jv));
    }
    assert_int_equal(mt_gguf_get_int(g, "llama.embedding_length", &i, &err), MT_OK);
    assert_int_equal(i, 576);
    assert_int_equal(mt_gguf_get_int(g, "llama.block_count", &i, &err), MT_OK);
    assert_int_equal(i, 30);
    assert_int_equal(mt_gguf_get_int(g, "llama.attention.head_count", &i, &err), MT_OK);
    assert_int_equal(i, 9);
    assert_int_equal(mt_gguf_get_int(g, "llama.attention.head_count_kv", &i, &err), MT_OK);
    assert_int_equal(i, 3);
    json_object_foreach(json_object_get(facts, "floats"), key, jv) {
        if (mt_gguf_get_float(g, key, &d, &err) != MT_OK) fail_msg("%s", err.msg);
        assert_true(d == json_real_value(jv));
    }
    json_object_foreach(json_object_get(facts, "strings"), key, jv) {
        char *s = NULL;
        if (mt_gguf_get_string(g, key, &s, &err) != MT_OK) fail_msg("%s", err.msg);
        assert_string_equal(s, json_string_value(jv));
        free(s);
    }
    json_object_foreach(json_object_get(facts, "string_arrays"), key, jv) {
        const mt_gguf_value *v = get_typed(g, key, MT_GGUF_ARRAY);
        assert_int_equal(v->arr_type, MT_GGUF_STRING);
        uint64_t n = (uint64_t)json_integer_value(json_object_get(jv, "len"));
        assert_int_equal(v->arr_len, n);
        const char *first = json_string_value(json_object_get(jv, "first"));
        const char *last = json_string_value(json_object_get(jv, "last"));
        uint64_t len;
        const char *e = mt_gguf_array_string(g, v, 0, &len);
        assert_true(len == strlen(first) && memcmp(e, first, len) == 0);
        e = mt_gguf_array_string(g, v, n - 1, &len);
        assert_true(len == strlen(last) && memcmp(e, last, len) == 0);
        for (uint64_t k = 0; k < n; k++) assert_non_null(mt_gguf_array_string(g, v, k, &len));
    }
    const mt_gguf_value *tt = get_typed(g, "tokenizer.ggml.token_type", MT_GGUF_ARRAY);
    assert_int_equal(tt->arr_type, MT_GGUF_INT32);
    assert_int_equal(tt->arr_len, 49152);
    char *tmpl = NULL;
    assert_int_equal(mt_gguf_get_string(g, "tokenizer.chat_template", &tmpl, &err), MT_OK);
    assert_int_equal(strlen(tmpl), json_integer_value(json_object_get(facts, "chat_template_len")));
    free(tmpl);

    size_t idx;
    json_t *jt;
    json_array_foreach(json_object_get(facts, "tensors"), idx, jt) {
        const char *name = json_string_value(json_object_get(jt, "name"));
        const mt_gguf_tensor *t = mt_gguf_find_tensor(g, name);
        assert_non_null(t);
        assert_string_equal(mt_ggml_type_name(t->type),
                            json_string_value(json_object_get(jt, "type")));
        assert_int_equal(t->nbytes, json_integer_value(json_object_get(jt, "n_bytes")));
        size_t numel = 1, d2;
        json_t *jn;
        json_array_foreach(json_object_get(jt, "ne"), d2, jn) {
            assert_int_equal(t->ne[d2], json_integer_value(jn));
            numel *= (size_t)t->ne[d2];
        }
        float *out = malloc(numel * sizeof *out);
        assert_non_null(out);
        if (mt_gguf_dequantize(g, t, out, &err) != MT_OK) fail_msg("%s", err.msg);
        size_t k;
        json_t *pair;
        json_array_foreach(json_object_get(jt, "values"), k, pair) {
            size_t at = (size_t)json_integer_value(json_array_get(pair, 0));
            float want = (float)json_real_value(json_array_get(pair, 1));
            if (out[at] != want)
                fail_msg("%s[%zu] = %.9g, gguf-py has %.9g", name, at, out[at], want);
        }
        printf("  smollm2 %-20s %s: %zu values equal gguf-py's\n", name, mt_ggml_type_name(t->type),
               json_array_size(json_object_get(jt, "values")));
        free(out);
    }
    /* every tensor dequantizes */
    for (size_t k = 0; k < mt_gguf_tensor_count(g); k++) {
        const mt_gguf_tensor *t = mt_gguf_tensor_at(g, k);
        assert_non_null(mt_ggml_type_name(t->type));
    }
    mt_gguf_close(g);
    json_decref(facts);
}

/* ---- crafted files
 * ------------------------------------------------------------- */

static void test_crafted_good(void **state) {
    (void)state;
    bytes b = {0};
    good_file(&b);
    crafted c = write_crafted(&b, "gguf-good");
    mt_gguf *g = open_ok(c.path);
    assert_int_equal(mt_gguf_tensor_count(g), 2);
    float x[8];
    mt_error err = {MT_OK, ""};
    assert_int_equal(mt_gguf_dequantize(g, mt_gguf_find_tensor(g, "v"), x, &err), MT_OK);
    for (int i = 0; i < 8; i++) assert_true(x[i] == (float)i + 4.0f);
    mt_gguf_close(g);
    crafted_done(&c, &b);

    /* version 2, an empty array, a 0-element tensor and no tensor data at all */
    header(&b, 2, 1, 1);
    put_str(&b, "test.empty");
    put_u32(&b, MT_GGUF_ARRAY);
    put_u32(&b, MT_GGUF_INT32);
    put_u64(&b, 0);
    uint64_t ne[2] = {0, 3};
    tinfo(&b, "empty", 2, ne, MT_GGML_Q4_0, 0);
    pad_to(&b, 32);
    c = write_crafted(&b, "gguf-v2");
    g = open_ok(c.path);
    assert_int_equal(mt_gguf_version(g), 2);
    const mt_gguf_value *v = mt_gguf_get(g, "test.empty");
    assert_non_null(v);
    assert_int_equal(v->arr_len, 0);
    assert_null(mt_gguf_array_string(g, v, 0, NULL));
    const mt_gguf_tensor *t = mt_gguf_find_tensor(g, "empty");
    assert_int_equal(t->nbytes, 0);
    assert_int_equal(mt_gguf_dequantize(g, t, NULL, &err), MT_OK);
    mt_gguf_close(g);
    crafted_done(&c, &b);
}

static void test_bad_magic(void **state) {
    (void)state;
    bytes b = {0};
    good_file(&b);
    memcpy(b.p, "GGML", 4);
    expect_refused(&b, "bad-magic", "bad magic", "found 47 47 4d 4c");
    put(&b, "GG", 2);
    expect_refused(&b, "short-magic", "bad magic", "shorter than the magic");
    expect_refused(&b, "empty", "bad magic", "empty file");
}

static void test_bad_version(void **state) {
    (void)state;
    bytes b = {0};
    header(&b, 1, 0, 0);
    expect_refused(&b, "version-1", "version", "GGUF version 1");
    header(&b, 4, 0, 0);
    expect_refused(&b, "version-4", "version", "expected 2 or 3, found 4");
    header(&b, 3u << 24, 0, 0);
    expect_refused(&b, "big-endian", "version", "big-endian");
}

static void test_bad_truncated_kv(void **state) {
    (void)state;
    bytes b = {0};
    good_file(&b);
    b.n = 24 + 8 + 20 + 4 + 8 + 2; /* inside the value of general.architecture */
    expect_refused(&b, "trunc-kv", "key 'general.architecture'", "truncated file");
    header(&b, 3, 0, 1);
    kv_str(&b, "general.architecture", "llama");
    b.n = 24 + 8 + 10; /* inside the key */
    expect_refused(&b, "trunc-key", "kv 0 (key)", "truncated file");
    good_file(&b);
    b.n = 24 + 45 + 8 + 17 + 2; /* inside the value type of the second kv */
    expect_refused(&b, "trunc-type", "key 'llama.block_count'",
                   "expected 4 bytes of the value type");
    header(&b, 3, 0, 0);
    b.n = 20; /* inside kv_count */
    expect_refused(&b, "trunc-header", "header", "kv_count");
}

static void test_bad_truncated_data(void **state) {
    (void)state;
    bytes b = {0};
    good_file(&b);
    b.n -= 4; /* the last float of "v" */
    expect_refused(&b, "trunc-data", "tensor 'v'", "runs past the end of the file");
    good_file(&b);
    b.n = 160; /* inside ne[0] of tensor "v" */
    expect_refused(&b, "trunc-info", "tensor 'v'", "truncated file");
}

static void test_bad_huge_string(void **state) {
    (void)state;
    bytes b = {0};
    header(&b, 3, 0, 1);
    put_str(&b, "big.string");
    put_u32(&b, MT_GGUF_STRING);
    put_u64(&b, 1ull << 40);
    put_zeros(&b, 16);
    expect_refused(&b, "huge-string", "key 'big.string'", "exceeds the limit of 67108864 bytes");
    header(&b, 3, 0, 1);
    put_str(&b, "short.string");
    put_u32(&b, MT_GGUF_STRING);
    put_u64(&b, 100);
    put_zeros(&b, 16);
    expect_refused(&b, "string-past-end", "key 'short.string'", "runs past the end");
    header(&b, 3, 0, 1);
    put_u64(&b, 70000); /* a key longer than 65535 bytes */
    put_zeros(&b, 70000);
    expect_refused(&b, "huge-key", "kv 0 (key)", "exceeds the limit of 65535 bytes");
}

static void test_bad_huge_array(void **state) {
    (void)state;
    bytes b = {0};
    header(&b, 3, 0, 1);
    put_str(&b, "big.array");
    put_u32(&b, MT_GGUF_ARRAY);
    put_u32(&b, MT_GGUF_UINT64);
    put_u64(&b, 1ull << 61); /* * 8 bytes overflows 64 bits */
    put_zeros(&b, 64);
    expect_refused(&b, "huge-array", "key 'big.array'", "do not fit in the 64 bytes left");
    header(&b, 3, 0, 1);
    put_str(&b, "str.array");
    put_u32(&b, MT_GGUF_ARRAY);
    put_u32(&b, MT_GGUF_STRING);
    put_u64(&b, 3);
    put_str(&b, "ok");
    put_u64(&b, 1ull << 62);
    put_zeros(&b, 16);
    expect_refused(&b, "huge-str-elem", "key 'str.array'", "string element 1");
    header(&b, 3, 0, 1);
    put_str(&b, "nested");
    put_u32(&b, MT_GGUF_ARRAY);
    put_u32(&b, MT_GGUF_ARRAY);
    put_u64(&b, 1);
    put_zeros(&b, 16);
    expect_refused(&b, "nested-array", "key 'nested'", "nested arrays are not supported");
    header(&b, 3, 0, 1);
    put_str(&b, "bad.elem");
    put_u32(&b, MT_GGUF_ARRAY);
    put_u32(&b, 13);
    put_u64(&b, 1);
    put_zeros(&b, 16);
    expect_refused(&b, "array-elem-type", "key 'bad.elem'", "unknown array element type 13");
    header(&b, 3, 0, 1);
    put_str(&b, "bools");
    put_u32(&b, MT_GGUF_ARRAY);
    put_u32(&b, MT_GGUF_BOOL);
    put_u64(&b, 2);
    put_u8(&b, 1);
    put_u8(&b, 7);
    expect_refused(&b, "bool-array", "key 'bools'", "expected 0 or 1, found 7");
    header(&b, 3, 0, 1);
    put_str(&b, "flag");
    put_u32(&b, MT_GGUF_BOOL);
    put_u8(&b, 2);
    expect_refused(&b, "bool", "key 'flag'", "expected a BOOL of 0 or 1");
}

static void test_bad_unknown_value_type(void **state) {
    (void)state;
    bytes b = {0};
    header(&b, 3, 0, 2);
    kv_u32(&b, "fine", 1);
    put_str(&b, "odd.key");
    put_u32(&b, 13);
    put_u32(&b, 0);
    expect_refused(&b, "value-type", "key 'odd.key'", "unknown value type 13");
}

static void test_bad_n_dims(void **state) {
    (void)state;
    bytes b = {0};
    header(&b, 3, 1, 0);
    uint64_t ne[5] = {1, 1, 1, 1, 1};
    tinfo(&b, "five", 5, ne, MT_GGML_F32, 0);
    pad_to(&b, 32);
    put_zeros(&b, 4);
    expect_refused(&b, "n_dims-5", "tensor 'five'",
                   "n_dims: expected at most 4 dimensions, found 5");
}

static void test_bad_data_past_end(void **state) {
    (void)state;
    bytes b = {0};
    header(&b, 3, 1, 0);
    uint64_t ne[1] = {8};
    tinfo(&b, "far", 1, ne, MT_GGML_F32, 1u << 20);
    pad_to(&b, 32);
    put_zeros(&b, 32);
    expect_refused(&b, "past-end", "tensor 'far'", "runs past the end of the file");
    header(&b, 3, 1, 0);
    tinfo(&b, "huge.offset", 1, ne, MT_GGML_F32, 0xFFFFFFFFFFFFFFE0ull);
    pad_to(&b, 32);
    put_zeros(&b, 32);
    expect_refused(&b, "offset-overflow", "tensor 'huge.offset'", "runs past the end");
    /* the padding before the data is missing */
    header(&b, 3, 1, 0);
    tinfo(&b, "x", 1, ne, MT_GGML_F32, 0);
    expect_refused(&b, "no-data", "header", "tensor data should start at byte 64");
}

static void test_bad_unknown_tensor_type(void **state) {
    (void)state;
    bytes b = {0};
    header(&b, 3, 1, 0);
    uint64_t ne[1] = {32};
    tinfo(&b, "mystery", 1, ne, 99, 0);
    pad_to(&b, 32);
    put_zeros(&b, 32);
    crafted c = write_crafted(&b, "gguf-type99");
    mt_gguf *g = open_ok(c.path); /* listed */
    const mt_gguf_tensor *t = mt_gguf_find_tensor(g, "mystery");
    assert_non_null(t);
    assert_int_equal(t->type, 99);
    assert_null(mt_ggml_type_name(99));
    float out[32];
    mt_error err = {MT_OK, ""};
    assert_int_equal(mt_gguf_dequantize(g, t, out, &err), MT_ERR_UNSUPPORTED);
    expect_msg_has(&err, c.path);
    expect_msg_has(&err, "tensor 'mystery': unknown ggml type 99");
    printf("  %-18s %s\n", "type-99", err.msg + strlen(c.path));
    mt_gguf_close(g);
    crafted_done(&c, &b);
}

static void test_bad_alignment(void **state) {
    (void)state;
    bytes b = {0};
    header(&b, 3, 0, 1);
    kv_u32(&b, "general.alignment", 48);
    expect_refused(&b, "align-48", "general.alignment", "expected a power of two, found 48");
    header(&b, 3, 0, 1);
    kv_u32(&b, "general.alignment", 0);
    expect_refused(&b, "align-0", "general.alignment", "expected a power of two, found 0");
    header(&b, 3, 0, 1);
    kv_str(&b, "general.alignment", "32");
    expect_refused(&b, "align-type", "general.alignment", "expected type UINT32, found STRING");
}

static void test_bad_misaligned_offset(void **state) {
    (void)state;
    bytes b = {0};
    header(&b, 3, 1, 0);
    uint64_t ne[1] = {4};
    tinfo(&b, "skewed", 1, ne, MT_GGML_F32, 4);
    pad_to(&b, 32);
    put_zeros(&b, 64);
    expect_refused(&b, "misaligned", "tensor 'skewed'",
                   "offset: expected a multiple of the alignment 32, found 4");
}

static void test_bad_duplicates(void **state) {
    (void)state;
    bytes b = {0};
    header(&b, 3, 0, 3);
    kv_u32(&b, "a.key", 1);
    kv_u32(&b, "b.key", 2);
    kv_u32(&b, "a.key", 3);
    expect_refused(&b, "dup-key", "key 'a.key'", "duplicate key (kv 0 and kv 2)");
    header(&b, 3, 2, 0);
    uint64_t ne[1] = {8};
    tinfo(&b, "t", 1, ne, MT_GGML_F32, 0);
    tinfo(&b, "t", 1, ne, MT_GGML_F32, 32);
    pad_to(&b, 32);
    put_zeros(&b, 64);
    expect_refused(&b, "dup-tensor", "tensor 't'", "duplicate tensor name");
    header(&b, 3, 2, 0);
    tinfo(&b, "t1", 1, ne, MT_GGML_F32, 0);
    tinfo(&b, "t2", 1, ne, MT_GGML_F32, 0);
    pad_to(&b, 32);
    put_zeros(&b, 64);
    expect_refused(&b, "overlap", "tensor 't2'", "overlaps tensor 't1'");
}

static void test_bad_ne(void **state) {
    (void)state;
    bytes b = {0};
    header(&b, 3, 1, 0);
    uint64_t ne[3] = {1ull << 32, 1ull << 32, 4};
    tinfo(&b, "vast", 3, ne, MT_GGML_F32, 0);
    pad_to(&b, 32);
    expect_refused(&b, "ne-overflow", "tensor 'vast'", "element count overflows");
    header(&b, 3, 1, 0);
    uint64_t neg[1] = {(uint64_t)-1};
    tinfo(&b, "neg", 1, neg, MT_GGML_F32, 0);
    pad_to(&b, 32);
    expect_refused(&b, "ne-negative", "tensor 'neg'", "ne[0]: expected at most");
    header(&b, 3, 1, 0);
    uint64_t odd[2] = {48, 2};
    tinfo(&b, "ragged", 2, odd, MT_GGML_Q4_K, 0);
    pad_to(&b, 32);
    put_zeros(&b, 512);
    expect_refused(&b, "ne0-block", "tensor 'ragged'",
                   "multiple of Q4_K's block size 256, found 48");
    header(&b, 3, 1, 0);
    uint64_t big[2] = {1ull << 31, 1ull << 20}; /* fits int64, but not in the file */
    tinfo(&b, "big", 2, big, MT_GGML_F32, 0);
    pad_to(&b, 32);
    expect_refused(&b, "ne-big", "tensor 'big'", "runs past the end");
}

static void test_bad_counts_and_names(void **state) {
    (void)state;
    bytes b = {0};
    header(&b, 3, 0, 1ull << 60);
    put_zeros(&b, 32);
    expect_refused(&b, "kv-count", "header", "kv_count");
    header(&b, 3, 1ull << 60, 0);
    put_zeros(&b, 32);
    expect_refused(&b, "tensor-count", "header", "tensor_count");
    header(&b, 3, 1, 0);
    uint64_t ne[1] = {1};
    tinfo(&b, "this.tensor.name.is.much.longer.than.the.sixty.three.bytes.ggml.allows", 1, ne,
          MT_GGML_F32, 0);
    pad_to(&b, 32);
    put_zeros(&b, 32);
    expect_refused(&b, "long-name", "tensor 0", "expected a name of 1 to 63 bytes");
    header(&b, 3, 0, 1);
    kv_u32(&b, "", 1);
    expect_refused(&b, "empty-key", "kv 0", "empty key");
    header(&b, 3, 0, 1);
    put_u64(&b, 3);
    put(&b, "a\0b", 3);
    put_u32(&b, MT_GGUF_UINT8);
    put_u8(&b, 0);
    expect_refused(&b, "nul-key", "kv 0", "NUL byte");
}

/* Keys and tensor names are UTF-8 (gguf-py decodes them as such): a byte that is not
 * was accepted, and a damaged key then only surfaced as "key ... is missing". */
static void test_bad_utf8_names(void **state) {
    (void)state;
    bytes b = {0};
    header(&b, 3, 0, 1);
    kv_u32(&b, "general.\xffname", 1);
    expect_refused(&b, "utf8-key", "kv 0", "not valid UTF-8 (byte 0xff at offset 8 of the key");
    header(&b, 3, 0, 1);
    kv_u32(&b, "caf\xc3", 1); /* a truncated two-byte sequence */
    expect_refused(&b, "utf8-key-cut", "kv 0", "not valid UTF-8 (byte 0xc3 at offset 3");
    header(&b, 3, 0, 1);
    kv_u32(&b, "over\xc0\xaflong", 1); /* an overlong '/' */
    expect_refused(&b, "utf8-overlong", "kv 0", "not valid UTF-8");
    header(&b, 3, 1, 0);
    uint64_t ne[1] = {1};
    tinfo(&b, "blk.0.\xe2\x82", 1, ne, MT_GGML_F32, 0);
    pad_to(&b, 32);
    put_zeros(&b, 32);
    expect_refused(&b, "utf8-tensor", "tensor 0", "not valid UTF-8 (byte 0xe2 at offset 6");
    /* valid multi-byte names stay accepted */
    header(&b, 3, 1, 1);
    kv_u32(&b, "test.h\xc3\xa9llo.\xe2\x9c\x93", 1);
    tinfo(&b, "t\xc3\xa9", 1, ne, MT_GGML_F32, 0);
    pad_to(&b, 32);
    put_zeros(&b, 32);
    crafted c = write_crafted(&b, "utf8-good");
    mt_gguf *g = open_ok(c.path);
    assert_non_null(mt_gguf_get(g, "test.h\xc3\xa9llo.\xe2\x9c\x93"));
    mt_gguf_close(g);
    crafted_done(&c, &b);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fixture_metadata),
        cmocka_unit_test(test_fixture_tensors),
        cmocka_unit_test(test_fixture_alignment64),
        cmocka_unit_test(test_smollm2),
        cmocka_unit_test(test_crafted_good),
        cmocka_unit_test(test_bad_magic),
        cmocka_unit_test(test_bad_version),
        cmocka_unit_test(test_bad_truncated_kv),
        cmocka_unit_test(test_bad_truncated_data),
        cmocka_unit_test(test_bad_huge_string),
        cmocka_unit_test(test_bad_huge_array),
        cmocka_unit_test(test_bad_unknown_value_type),
        cmocka_unit_test(test_bad_n_dims),
        cmocka_unit_test(test_bad_data_past_end),
        cmocka_unit_test(test_bad_unknown_tensor_type),
        cmocka_unit_test(test_bad_alignment),
        cmocka_unit_test(test_bad_misaligned_offset),
        cmocka_unit_test(test_bad_duplicates),
        cmocka_unit_test(test_bad_ne),
        cmocka_unit_test(test_bad_counts_and_names),
        cmocka_unit_test(test_bad_utf8_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
