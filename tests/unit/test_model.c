/* test_model.c — configuration parsing, weight loading errors, packed rows,
 * the frozen path, and bad batch inputs. (Numerical parity with PyTorch is
 * test_parity.c.) */
#include <math.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store/export_gguf.h"
#include "base/internal.h"
#include "model/model.h"
#include "formats/safetensors.h"
#include "testutil.h"

#define GQA_DIR MT_FIXTURE_DIR "/tiny_gqa"

static mt_status parse(const char *json, mt_model_config *cfg, mt_error *err) {
    return mt_config_parse(json, strlen(json), "test/config.json", cfg, err);
}

static const char *BASE_FIELDS =
    "\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 128,"
    " \"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"vocab_size\": 100";

/* BASE_FIELDS with the keys of `extra` replaced (config.json refuses duplicate keys). */
static mt_status parse_with(const char *extra, mt_model_config *cfg, mt_error *err) {
    char text[1024];
    snprintf(text, sizeof text, "{%s}", BASE_FIELDS);
    json_t *base = json_loads(text, 0, NULL);
    snprintf(text, sizeof text, "{%s}", extra);
    json_t *more = json_loads(text, 0, NULL);
    assert_non_null(base);
    assert_non_null(more);
    json_object_update(base, more);
    char *merged = json_dumps(base, 0);
    mt_status st = parse(merged, cfg, err);
    free(merged);
    json_decref(base);
    json_decref(more);
    return st;
}

static void test_config_defaults_and_legacy_rope_scaling(void **state) {
    (void)state;
    char json[1024];
    snprintf(json, sizeof json,
             "{%s, \"rope_theta\": 500000.0, \"rope_scaling\": {\"type\": \"llama3\", \"factor\": 32.0,"
             " \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0,"
             " \"original_max_position_embeddings\": 8192}, \"attention_bias\": true}",
             BASE_FIELDS);
    mt_model_config cfg;
    mt_error err = {0};
    assert_int_equal(parse(json, &cfg, &err), MT_OK);
    assert_int_equal(cfg.num_kv_heads, 4); /* defaults to num_attention_heads */
    assert_int_equal(cfg.head_dim, 16);    /* defaults to hidden_size / heads */
    assert_int_equal(cfg.rope_type, MT_ROPE_LLAMA3);
    assert_true(cfg.rope_theta == 500000.0 && cfg.rope_factor == 32.0);
    assert_int_equal(cfg.rope_original_max_position_embeddings, 8192);
    assert_true(cfg.qkv_bias && cfg.o_bias && !cfg.mlp_bias);
    assert_true(cfg.tie_word_embeddings); /* transformers' default */
}

static void test_config_errors_name_file_and_key(void **state) {
    (void)state;
    mt_model_config cfg;
    mt_error err = {0};
    assert_int_equal(parse("{\"model_type\": \"llama\", \"hidden_size\": 64}", &cfg, &err),
                     MT_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "test/config.json"));
    assert_non_null(strstr(err.msg, "intermediate_size"));

    char json[1024];
    snprintf(json, sizeof json, "{%s, \"num_key_value_heads\": 3}", BASE_FIELDS);
    assert_int_equal(parse(json, &cfg, &err), MT_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "num_key_value_heads"));

    snprintf(json, sizeof json, "{%s, \"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4}}",
             BASE_FIELDS);
    assert_int_equal(parse(json, &cfg, &err), MT_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "yarn"));

    snprintf(json, sizeof json, "{%s, \"hidden_size\": \"64\"}", BASE_FIELDS);
    assert_int_equal(parse(json, &cfg, &err), MT_ERR_FORMAT); /* duplicate key */

    assert_int_equal(parse("[1, 2]", &cfg, &err), MT_ERR_FORMAT);
    assert_int_equal(parse("{\"model_type\": \"gpt2\"}", &cfg, &err), MT_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "gpt2"));
    assert_int_equal(parse("{\"hidden_size\": ", &cfg, &err), MT_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "line 1"));

    /* every size error names the file, the key and the value */
    struct {
        const char *extra, *want;
    } sizes[] = {
        {"\"hidden_size\": 0", "key \"hidden_size\": must be positive, found 0"},
        {"\"num_hidden_layers\": -3",
         "key \"num_hidden_layers\": -3 is out of range (expected a positive integer up to 2147483647)"},
        {"\"hidden_size\": 576.5", "key \"hidden_size\": expected an integer, found 576.5"},
        {"\"vocab_size\": \"big\"", "key \"vocab_size\": expected an integer, found a string"},
        {"\"rms_norm_eps\": [1]", "key \"rms_norm_eps\": expected a number, found an array"},
        {"\"max_position_embeddings\": 0", "key \"max_position_embeddings\": must be positive, found 0"},
        {"\"num_attention_heads\": 20000, \"head_dim\": 2",
         "key \"num_attention_heads\": 20000 exceeds the supported maximum 16384"},
        {"\"num_attention_heads\": 4096, \"head_dim\": 512",
         "key \"num_attention_heads x head_dim\": 2097152 exceeds the supported maximum 1048576"},
        /* the value as written, not as fp32 rounds it (to 0) */
        {"\"rms_norm_eps\": 1e-50", "key \"rms_norm_eps\": must be a positive number that fp32 holds"
                                    " (1.4013e-45 to 3.40282e+38), found 1e-50"},
        {"\"rope_theta\": 0.5", "key \"rope_theta\": must be a positive number from 1 to 3.40282e+38 (fp32), "
                                "found 0.5"},
        {"\"rope_theta\": 1e39", "key \"rope_theta\": must be a positive number from 1 to 3.40282e+38 (fp32), "
                                 "found 1e+39"},
        /* rope scaling: each key by its full name */
        {"\"rope_scaling\": {\"type\": 5, \"factor\": 2}",
         "key \"rope_scaling.type\": expected a string, found an integer"},
        {"\"rope_parameters\": {\"rope_type\": \"linear\", \"factor\": 0}",
         "key \"rope_parameters.factor\": expected a number from 1e-06 to 1e+06, found 0"},
        {"\"rope_scaling\": {\"rope_type\": \"linear\", \"factor\": 1e7}",
         "key \"rope_scaling.factor\": expected a number from 1e-06 to 1e+06, found 1e+07"},
        {"\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8, \"low_freq_factor\": -1,"
         " \"high_freq_factor\": 4, \"original_max_position_embeddings\": 64}",
         "key \"rope_scaling.low_freq_factor\": expected a number from 1e-06 to 1e+06, found -1"},
        {"\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8, \"original_max_position_embeddings\": 0}",
         "key \"rope_scaling.original_max_position_embeddings\": must be positive, found 0"},
        {"\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8}",
         "missing required key \"original_max_position_embeddings\""},
        {"\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8, \"low_freq_factor\": 4,"
         " \"high_freq_factor\": 4, \"original_max_position_embeddings\": 64}",
         "high_freq_factor (4) must exceed low_freq_factor (4)"},
        {"\"vocab_size\": 4294967296", "key \"vocab_size\": 4294967296 is out of range"},
        {"\"vocab_size\": 100000000", "key \"vocab_size\": 100000000 exceeds the supported maximum 16777216"},
        {"\"hidden_size\": 2000000", "key \"hidden_size\": 2000000 exceeds the supported maximum"},
        {"\"intermediate_size\": 8000000", "key \"intermediate_size\": 8000000 exceeds"},
        {"\"num_hidden_layers\": 100000", "key \"num_hidden_layers\": 100000 exceeds the supported maximum 4096"},
        {"\"head_dim\": 7", "key \"head_dim\": must be even"},
        {"\"head_dim\": 65536", "key \"head_dim\": 65536 exceeds"},
        {"\"num_key_value_heads\": 0", "key \"num_key_value_heads\": must be positive, found 0"},
        {"\"rms_norm_eps\": 0", "key \"rms_norm_eps\": must be a positive number that fp32 holds (1.4013e-45 to 3.40282e+38), found 0"},
        {"\"rope_theta\": -1", "rope_theta"},
        {"\"hidden_size\": 65536, \"intermediate_size\": 4000000, \"num_hidden_layers\": 4096",
         "parameters, more than the supported 2^40"}, /* refused before anything is planned */
    };
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        mt_status st = parse_with(sizes[i].extra, &cfg, &err);
        printf("refused: %s\n", err.msg);
        assert_int_not_equal(st, MT_OK);
        assert_non_null(strstr(err.msg, "test/config.json"));
        if (!strstr(err.msg, sizes[i].want)) fail_msg("'%s' lacks '%s'", err.msg, sizes[i].want);
    }
    /* hidden_size not a multiple of the heads, without head_dim */
    assert_int_equal(parse("{\"model_type\": \"llama\", \"hidden_size\": 65, \"intermediate_size\": 8, "
                           "\"num_hidden_layers\": 1, \"num_attention_heads\": 4, \"vocab_size\": 10, "
                           "\"max_position_embeddings\": 8}", &cfg, &err), MT_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "key \"hidden_size\": 65 is not a multiple of num_attention_heads (4)"));

    /* configs that do not come from config.json (GGUF metadata, code) meet the same
     * bounds in mt_config_validate */
    assert_int_equal(parse_with("", &cfg, &err), MT_OK);
    mt_model_config bad = cfg;
    bad.rope_type = MT_ROPE_LINEAR;
    bad.rope_factor = 0.0;
    assert_int_equal(mt_config_validate(&bad, "code", &err), MT_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "code: key \"rope_scaling.factor\": expected a number from 1e-06 to 1e+06, found 0"));
    bad = cfg;
    bad.rope_type = MT_ROPE_LLAMA3;
    bad.rope_factor = 8.0;
    bad.rope_low_freq_factor = 1.0;
    bad.rope_high_freq_factor = 4.0;
    assert_int_equal(mt_config_validate(&bad, "code", &err), MT_ERR_FORMAT); /* no original length */
    assert_non_null(strstr(err.msg, "a positive original_max_position_embeddings, found 1, 4 and 0"));
    bad.rope_original_max_position_embeddings = 64;
    assert_int_equal(mt_config_validate(&bad, "code", &err), MT_OK);
    bad.rope_type = (mt_rope_type)7;
    assert_int_equal(mt_config_validate(&bad, "code", &err), MT_ERR_INVALID_ARG);
}

static void test_presets(void **state) {
    (void)state;
    mt_model_config cfg;
    mt_error err = {0};
    assert_int_equal(mt_config_preset("smollm2-135m", &cfg, &err), MT_OK);
    /* SmolLM2-135M has 134,515,008 parameters (tied embeddings) */
    assert_int_equal(mt_config_num_params(&cfg), 134515008);
    assert_int_equal(mt_config_preset("llama-1b", &cfg, &err), MT_OK);
    /* Llama 3.2 1B: 1,235,814,400 parameters */
    assert_int_equal(mt_config_num_params(&cfg), 1235814400);
    assert_int_equal(mt_config_preset("gpt-5", &cfg, &err), MT_ERR_INVALID_ARG);
}

/* Copies the tiny_gqa config and writes a model.safetensors holding the fixture's
 * tensors, with `drop` left out, `reshape` given a wrong shape, and `extra` added. */
static char *make_model_dir(const char *drop, const char *reshape, const char *extra) {
    char *dir = mt_test_tmpdir("model");
    mt_error err = {0};
    char *cfg_text;
    size_t cfg_len;
    assert_int_equal(mt_read_file(GQA_DIR "/config.json", &cfg_text, &cfg_len, &err), MT_OK);
    char path[512];
    snprintf(path, sizeof path, "%s/config.json", dir);
    mt_test_write_file(path, cfg_text, cfg_len);
    free(cfg_text);
    mt_safetensors *st;
    assert_int_equal(mt_st_open(GQA_DIR "/model.safetensors", &st, &err), MT_OK);
    size_t n = mt_st_count(st);
    mt_st_entry *entries = calloc(n + 1, sizeof *entries);
    assert_non_null(entries);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        const mt_st_tensor *t = mt_st_at(st, i);
        if (drop && !strcmp(t->name, drop)) continue;
        mt_st_entry *e = &entries[k++];
        e->name = t->name;
        e->dtype = t->dtype;
        e->ndim = t->ndim;
        memcpy(e->shape, t->shape, sizeof e->shape);
        e->data = t->data;
        if (reshape && !strcmp(t->name, reshape)) { /* same bytes, transposed shape */
            e->shape[0] = t->shape[1];
            e->shape[1] = t->shape[0];
        }
    }
    static const float extra_data[4] = {1, 2, 3, 4};
    if (extra) entries[k++] = (mt_st_entry){.name = extra, .dtype = MT_ST_F32, .ndim = 1,
                                            .shape = {4}, .data = extra_data};
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    assert_int_equal(mt_st_write(path, entries, k, NULL, &err), MT_OK);
    free(entries);
    mt_st_close(st);
    return dir;
}

static void expect_load_error(const char *drop, const char *reshape, const char *extra,
                              const char *needle) {
    char *dir = make_model_dir(drop, reshape, extra);
    mt_backend be;
    mt_error err = {0};
    assert_int_equal(mt_backend_cpu_init(&be, 0, &err), MT_OK);
    mt_model *m = NULL;
    assert_int_equal(mt_model_load_hf(dir, &be, &m, &err), MT_ERR_FORMAT);
    assert_null(m);
    if (!strstr(err.msg, needle)) fail_msg("message \"%s\" lacks \"%s\"", err.msg, needle);
    mt_backend_cpu_shutdown(&be);
    mt_test_rmtree(dir);
    free(dir);
}

static void test_load_errors_name_the_tensor(void **state) {
    (void)state;
    expect_load_error("model.layers.1.mlp.up_proj.weight", NULL, NULL,
                      "model.layers.1.mlp.up_proj.weight");
    expect_load_error(NULL, "model.layers.0.self_attn.k_proj.weight", NULL, "expected shape [32, 48]");
    expect_load_error(NULL, NULL, "model.layers.0.self_attn.q_norm.weight", "not a parameter");
    /* a rotary buffer that older checkpoints carry is ignored, not refused */
    char *dir = make_model_dir(NULL, NULL, "model.layers.0.self_attn.rotary_emb.inv_freq");
    mt_backend be;
    mt_error err = {0};
    assert_int_equal(mt_backend_cpu_init(&be, 0, &err), MT_OK);
    mt_model *m = NULL;
    if (mt_model_load_hf(dir, &be, &m, &err)) fail_msg("%s", err.msg);
    mt_model_free(m);
    mt_backend_cpu_shutdown(&be);
    mt_test_rmtree(dir);
    free(dir);
}

/* A copy of a fixture model in a fresh directory: config.json with the keys of
 * `cfg_edits` (JSON object text, or NULL) replaced, and model.safetensors with `value`
 * written at index `at` of tensor `poke` (NULL: the weights as they are). */
static char *copy_fixture(const char *fixture, const char *cfg_edits, const char *poke, size_t at,
                          float value) {
    char *dir = mt_test_tmpdir("model-copy"), path[1024];
    mt_error err = {0};
    snprintf(path, sizeof path, "%s/config.json", fixture);
    json_t *cfg = json_load_file(path, 0, NULL);
    assert_non_null(cfg);
    if (cfg_edits) {
        json_t *edits = json_loads(cfg_edits, 0, NULL);
        assert_non_null(edits);
        json_object_update(cfg, edits);
        json_decref(edits);
    }
    snprintf(path, sizeof path, "%s/config.json", dir);
    assert_int_equal(json_dump_file(cfg, path, JSON_INDENT(2)), 0);
    json_decref(cfg);
    snprintf(path, sizeof path, "%s/model.safetensors", fixture);
    mt_safetensors *st;
    if (mt_st_open(path, &st, &err)) fail_msg("%s", err.msg);
    size_t n = mt_st_count(st);
    mt_st_entry *entries = calloc(n, sizeof *entries);
    assert_non_null(entries);
    float *poked = NULL;
    for (size_t i = 0; i < n; i++) {
        const mt_st_tensor *t = mt_st_at(st, i);
        entries[i] = (mt_st_entry){.name = t->name, .dtype = t->dtype, .ndim = t->ndim, .data = t->data};
        memcpy(entries[i].shape, t->shape, sizeof entries[i].shape);
        if (poke && !strcmp(t->name, poke)) {
            assert_int_equal(t->dtype, MT_ST_F32);
            assert_true(at < t->nbytes / 4);
            assert_non_null(poked = malloc(t->nbytes));
            memcpy(poked, t->data, t->nbytes);
            poked[at] = value;
            entries[i].data = poked;
        }
    }
    assert_true(!poke || poked);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (mt_st_write(path, entries, n, NULL, &err)) fail_msg("%s", err.msg);
    free(poked);
    free(entries);
    mt_st_close(st);
    return dir;
}

/* Loading `path` fails with `status`, no model, and a message holding each `want`. */
static void expect_model_refused(const char *path, mt_status status, const char *want1,
                                 const char *want2) {
    mt_backend be;
    mt_error err = {0};
    assert_int_equal(mt_backend_cpu_init(&be, 0, &err), MT_OK);
    mt_model *m = (mt_model *)&err; /* must come back untouched or NULL */
    mt_model *none = NULL;
    mt_status st = mt_model_load(path, &be, &none, &err);
    (void)m;
    printf("refused: %s\n", err.msg);
    if (st != status) fail_msg("status %d, expected %d: %s", st, status, err.msg);
    assert_null(none);
    if (!strstr(err.msg, want1)) fail_msg("message \"%s\" lacks \"%s\"", err.msg, want1);
    if (want2 && !strstr(err.msg, want2)) fail_msg("message \"%s\" lacks \"%s\"", err.msg, want2);
    mt_backend_cpu_shutdown(&be);
}

/* Weights holding NaN or an infinity are refused on load, from safetensors (checked as
 * they are converted) and from GGUF (after dequantization), naming the file, the tensor,
 * the count and the index of the first. */
static void test_nonfinite_weights_refused(void **state) {
    (void)state;
    /* k_proj is [32, 48]: index 100 is row 2, column 4 */
    char *dir = copy_fixture(GQA_DIR, NULL, "model.layers.1.self_attn.k_proj.weight", 100, NAN);
    expect_model_refused(dir, MT_ERR_FORMAT,
                         "model.safetensors: tensor \"model.layers.1.self_attn.k_proj.weight\": 1 "
                         "non-finite value (the first, nan, at index 100 of 1536, element [2, 4])",
                         "expected finite F32 values");
    mt_test_rmtree(dir);
    free(dir);
    dir = copy_fixture(GQA_DIR, NULL, "model.norm.weight", 47, -INFINITY);
    expect_model_refused(dir, MT_ERR_FORMAT, "tensor \"model.norm.weight\": 1 non-finite value",
                         "(the first, -inf, at index 47 of 48)");
    mt_test_rmtree(dir);
    free(dir);

    /* GGUF: a model exported with an infinity in one tensor */
    mt_backend be;
    mt_error err = {0};
    assert_int_equal(mt_backend_cpu_init(&be, 0, &err), MT_OK);
    mt_model *m = NULL;
    if (mt_model_load_hf(MT_FIXTURE_DIR "/tiny_bias", &be, &m, &err)) fail_msg("%s", err.msg);
    mt_param *p = mt_model_find_param(m, "model.layers.0.mlp.down_proj.weight");
    assert_non_null(p);
    p->data[3] = INFINITY;
    p->data[4000] = NAN;
    dir = mt_test_tmpdir("nonfinite-gguf");
    char path[1024];
    snprintf(path, sizeof path, "%s/inf.gguf", dir);
    if (mt_export_gguf(m, NULL, path, MT_GGML_F32, "inf", &err)) fail_msg("%s", err.msg);
    mt_model_free(m);
    mt_backend_cpu_shutdown(&be);
    expect_model_refused(path, MT_ERR_FORMAT,
                         "inf.gguf: tensor \"blk.0.ffn_down.weight\": 2 non-finite values",
                         "(the first, inf, at index 3 of 4608)");
    mt_test_rmtree(dir);
    free(dir);
}

/* Reads the GGUF file at path and finds metadata key `key`: *at is the offset of its
 * u32 type, which the value follows. The caller frees *buf. */
static void find_gguf_key(const char *path, const char *key, char **buf, size_t *n, size_t *at,
                          uint32_t *type) {
    mt_error err = {0};
    assert_int_equal(mt_read_file(path, buf, n, &err), MT_OK);
    const size_t klen = strlen(key);
    *at = 0;
    for (size_t i = 8; i + klen + 8 <= *n && !*at; i++) {
        uint64_t len;
        memcpy(&len, *buf + i - 8, 8);
        if (len == klen && !memcmp(*buf + i, key, klen)) *at = i + klen;
    }
    if (!*at) fail_msg("%s: no key %s", path, key);
    memcpy(type, *buf + *at, 4);
}

/* Sets the integer value of GGUF metadata key `key` in the file at path, in place. */
static void patch_gguf_int(const char *path, const char *key, uint64_t value) {
    char *buf;
    size_t n, at;
    uint32_t type;
    find_gguf_key(path, key, &buf, &n, &at, &type);
    if (type == 4 || type == 5) { /* UINT32, INT32 */
        uint32_t v = (uint32_t)value;
        memcpy(buf + at + 4, &v, 4);
    } else if (type == 10 || type == 11) { /* UINT64, INT64 */
        memcpy(buf + at + 4, &value, 8);
    } else {
        fail_msg("%s: key %s has type %u", path, key, type);
    }
    mt_test_write_file(path, buf, n);
    free(buf);
}

/* Sets the FLOAT32 value of GGUF metadata key `key` in the file at path, in place. */
static void patch_gguf_f32(const char *path, const char *key, float value) {
    char *buf;
    size_t n, at;
    uint32_t type;
    find_gguf_key(path, key, &buf, &n, &at, &type);
    if (type != 6) fail_msg("%s: key %s has type %u, not FLOAT32", path, key, type);
    memcpy(buf + at + 4, &value, 4);
    mt_test_write_file(path, buf, n);
    free(buf);
}

/* Replaces the bytes `from` with `to` (of the same length) once in the file at path. */
static void patch_bytes(const char *path, const char *from, const char *to) {
    mt_error err = {0};
    char *buf;
    size_t n;
    assert_int_equal(mt_read_file(path, &buf, &n, &err), MT_OK);
    size_t k = strlen(from);
    assert_int_equal(strlen(to), k);
    size_t i = 0;
    while (i + k <= n && memcmp(buf + i, from, k)) i++;
    if (i + k > n) fail_msg("%s: no \"%s\"", path, from);
    memcpy(buf + i, to, k);
    mt_test_write_file(path, buf, n);
    free(buf);
}

/* A config.json (or GGUF header) that claims sizes its weights do not have is refused
 * naming the first tensor that disagrees, before the parameters are allocated: here the
 * claim is 1024 layers with intermediate_size 4,000,000 (2.4 TB of fp32 parameters, under
 * the 2^40-parameter bound), which would otherwise fail as out of memory at best, or be
 * allocated and zeroed when it fits. */
static void test_lying_config_refused_before_allocation(void **state) {
    (void)state;
    char *dir = copy_fixture(GQA_DIR, "{\"intermediate_size\": 4000000, \"num_hidden_layers\": 1024}",
                             NULL, 0, 0);
    expect_model_refused(dir, MT_ERR_FORMAT,
                         "model.safetensors: tensor \"model.layers.0.mlp.gate_proj.weight\": expected "
                         "shape [4000000, 48] from config.json, found [96, 48]",
                         NULL);
    mt_test_rmtree(dir);
    free(dir);
    /* a vocabulary that is not there */
    dir = copy_fixture(GQA_DIR, "{\"vocab_size\": 16000000}", NULL, 0, 0);
    expect_model_refused(dir, MT_ERR_FORMAT,
                         "tensor \"model.embed_tokens.weight\": expected shape [16000000, 48] from "
                         "config.json, found [96, 48]",
                         NULL);
    mt_test_rmtree(dir);
    free(dir);

    /* the same lie in a GGUF header */
    mt_backend be;
    mt_error err = {0};
    assert_int_equal(mt_backend_cpu_init(&be, 0, &err), MT_OK);
    mt_model *m = NULL;
    if (mt_model_load_hf(MT_FIXTURE_DIR "/tiny_bias", &be, &m, &err)) fail_msg("%s", err.msg);
    dir = mt_test_tmpdir("lying-gguf");
    char path[1024];
    snprintf(path, sizeof path, "%s/lie.gguf", dir);
    if (mt_export_gguf(m, NULL, path, MT_GGML_F32, "lie", &err)) fail_msg("%s", err.msg);
    char path2[1024];
    snprintf(path2, sizeof path2, "%s/heads.gguf", dir);
    if (mt_export_gguf(m, NULL, path2, MT_GGML_F32, "heads", &err)) fail_msg("%s", err.msg);
    mt_model_free(m);
    mt_backend_cpu_shutdown(&be);
    patch_gguf_int(path, "qwen2.feed_forward_length", 4000000);
    patch_gguf_int(path, "qwen2.block_count", 1024);
    expect_model_refused(path, MT_ERR_FORMAT,
                         "lie.gguf: tensor blk.0.ffn_gate.weight has ne [48, 96]; expected [48, 4000000]",
                         NULL);
    /* float settings are named by their GGUF keys, not config.json's */
    char path3[1024];
    snprintf(path3, sizeof path3, "%s/eps.gguf", dir);
    {
        char *bytes;
        size_t len;
        assert_int_equal(mt_read_file(path2, &bytes, &len, &err), MT_OK);
        mt_test_write_file(path3, bytes, len);
        free(bytes);
    }
    patch_gguf_f32(path3, "qwen2.attention.layer_norm_rms_epsilon", NAN);
    expect_model_refused(path3, MT_ERR_FORMAT,
                         "eps.gguf: qwen2.attention.layer_norm_rms_epsilon must be a positive number", "found nan");
    patch_gguf_f32(path3, "qwen2.attention.layer_norm_rms_epsilon", 1e-6f);
    patch_gguf_f32(path3, "qwen2.rope.freq_base", -1.0f);
    expect_model_refused(path3, MT_ERR_FORMAT, "eps.gguf: qwen2.rope.freq_base must be a number from 1",
                         "found -1");
    /* heads that do not split the width, with no key_length to say the head size */
    patch_bytes(path2, "qwen2.attention.key_length", "qwen2.attention.xey_length");
    patch_gguf_int(path2, "qwen2.attention.head_count", 5);
    expect_model_refused(path2, MT_ERR_FORMAT,
                         "heads.gguf: qwen2.embedding_length (48) is not a multiple of "
                         "qwen2.attention.head_count (5), and there is no qwen2.attention.key_length",
                         NULL);
    mt_test_rmtree(dir);
    free(dir);
}

static mt_model *load_gqa(mt_backend *be) {
    mt_error err = {0};
    assert_int_equal(mt_backend_cpu_init(be, 0, &err), MT_OK);
    mt_model *m = NULL;
    if (mt_model_load_hf(GQA_DIR, be, &m, &err)) fail_msg("%s", err.msg);
    return m;
}

/* Two examples packed into one row (positions restart, segment ids differ) give the
 * same logits as each example run alone. */
static void test_packed_row_equals_separate_rows(void **state) {
    (void)state;
    mt_backend be;
    mt_model *m = load_gqa(&be);
    mt_error err = {0};
    const int LA = 5, LB = 7, T = LA + LB, V = m->cfg.vocab_size;
    int32_t tokens[12], positions[12], segments[12];
    for (int i = 0; i < T; i++) {
        tokens[i] = (i * 37 + 11) % V;
        positions[i] = i < LA ? i : i - LA;
        segments[i] = i < LA ? 0 : 1;
    }
    assert_int_equal(mt_model_plan(m, 1, T, 0, &err), MT_OK);
    float *packed = malloc((size_t)T * V * sizeof(float));
    float *alone = malloc((size_t)T * V * sizeof(float));
    assert_non_null(packed);
    assert_non_null(alone);
    assert_int_equal(mt_model_forward(m, tokens, positions, segments, 1, T, &err), MT_OK);
    assert_int_equal(mt_model_logits(m, 0, T, packed, &err), MT_OK);
    assert_int_equal(mt_model_forward(m, tokens, NULL, NULL, 1, LA, &err), MT_OK);
    assert_int_equal(mt_model_logits(m, 0, LA, alone, &err), MT_OK);
    assert_int_equal(mt_model_forward(m, tokens + LA, NULL, NULL, 1, LB, &err), MT_OK);
    assert_int_equal(mt_model_logits(m, 0, LB, alone + (size_t)LA * V, &err), MT_OK);
    double e = mt_test_rel_err(packed, alone, (size_t)T * V);
    printf("packed vs separate: rel err %.3g\n", e);
    assert_true(e < 1e-6);
    /* and without segment ids the second example would see the first: different logits */
    assert_int_equal(mt_model_forward(m, tokens, positions, NULL, 1, T, &err), MT_OK);
    assert_int_equal(mt_model_logits(m, 0, T, packed, &err), MT_OK);
    assert_true(mt_test_rel_err(packed, alone, (size_t)T * V) > 1e-3);
    free(packed);
    free(alone);
    mt_model_free(m);
    mt_backend_cpu_shutdown(&be);
}

/* The frozen path (no parameter trainable) allocates no gradients and gives the
 * same input gradient as the full path. */
static void test_frozen_path_input_gradient(void **state) {
    (void)state;
    mt_backend be;
    mt_model *m = load_gqa(&be);
    mt_error err = {0};
    const int B = 2, T = 6, BT = B * T, C = m->cfg.hidden_size;
    int32_t tokens[12], targets[12];
    for (int i = 0; i < BT; i++) {
        tokens[i] = (i * 13 + 5) % m->cfg.vocab_size;
        targets[i] = i % T == T - 1 ? -100 : (i * 7 + 3) % m->cfg.vocab_size;
    }
    assert_int_equal(mt_model_plan(m, B, T, 0, &err), MT_OK);
    float loss_frozen, loss_full;
    assert_int_equal(mt_model_forward(m, tokens, NULL, NULL, B, T, &err), MT_OK);
    assert_int_equal(mt_model_cross_entropy(m, targets, 1, &loss_frozen, NULL, &err), MT_OK);
    assert_int_equal(mt_model_backward(m, &err), MT_OK);
    for (size_t i = 0; i < m->num_params; i++) assert_null(m->params[i].grad);
    assert_null(m->layers[0].q.grad_weight);
    float *d_frozen = malloc((size_t)BT * C * sizeof(float));
    assert_non_null(d_frozen);
    memcpy(d_frozen, m->d_res, (size_t)BT * C * sizeof(float));

    assert_int_equal(mt_model_set_all_trainable(m, &err), MT_OK);
    mt_model_zero_grad(m);
    assert_int_equal(mt_model_forward(m, tokens, NULL, NULL, B, T, &err), MT_OK);
    assert_int_equal(mt_model_cross_entropy(m, targets, 1, &loss_full, NULL, &err), MT_OK);
    assert_int_equal(mt_model_backward(m, &err), MT_OK);
    assert_true(loss_frozen == loss_full);
    assert_true(mt_test_rel_err(m->d_res, d_frozen, (size_t)BT * C) < 1e-6);
    free(d_frozen);
    mt_model_free(m);
    mt_backend_cpu_shutdown(&be);
}

static void test_bad_batch_inputs(void **state) {
    (void)state;
    mt_backend be;
    mt_model *m = load_gqa(&be);
    mt_error err = {0};
    int32_t tokens[8] = {1, 2, 3, 4, 5, 6, 7, 8}, positions[8] = {0}, targets[8] = {0};
    assert_int_equal(mt_model_forward(m, tokens, NULL, NULL, 1, 8, &err), MT_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "plan"));
    assert_int_equal(mt_model_plan(m, 1, 8, 0, &err), MT_OK);
    assert_int_equal(mt_model_forward(m, tokens, NULL, NULL, 1, 9, &err), MT_ERR_INVALID_ARG);
    tokens[3] = m->cfg.vocab_size;
    assert_int_equal(mt_model_forward(m, tokens, NULL, NULL, 1, 8, &err), MT_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "position 3"));
    tokens[3] = 4;
    positions[5] = 8;
    assert_int_equal(mt_model_forward(m, tokens, positions, NULL, 1, 8, &err), MT_ERR_INVALID_ARG);
    assert_int_equal(mt_model_cross_entropy(m, targets, 0, &(float){0}, NULL, &err),
                     MT_ERR_INVALID_ARG); /* no forward yet */
    assert_int_equal(mt_model_forward(m, tokens, NULL, NULL, 1, 8, &err), MT_OK);
    targets[2] = m->cfg.vocab_size + 5;
    assert_int_equal(mt_model_cross_entropy(m, targets, 0, &(float){0}, NULL, &err),
                     MT_ERR_INVALID_ARG);
    /* all targets masked: loss 0 over 0 targets, not NaN */
    for (int i = 0; i < 8; i++) targets[i] = -100;
    float loss = -1;
    int64_t n = -1;
    assert_int_equal(mt_model_cross_entropy(m, targets, 1, &loss, &n, &err), MT_OK);
    assert_true(loss == 0.0f && n == 0);
    mt_model_free(m);
    mt_backend_cpu_shutdown(&be);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_defaults_and_legacy_rope_scaling),
        cmocka_unit_test(test_config_errors_name_file_and_key),
        cmocka_unit_test(test_presets),
        cmocka_unit_test(test_load_errors_name_the_tensor),
        cmocka_unit_test(test_packed_row_equals_separate_rows),
        cmocka_unit_test(test_frozen_path_input_gradient),
        cmocka_unit_test(test_bad_batch_inputs),
        cmocka_unit_test(test_nonfinite_weights_refused),
        cmocka_unit_test(test_lying_config_refused_before_allocation),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
