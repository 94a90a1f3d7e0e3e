/* test_model.c — configuration parsing, weight loading errors, packed rows,
 * the frozen path, and bad batch inputs. (Numerical parity with PyTorch is
 * test_parity.c.) */
#include <math.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "model.h"
#include "safetensors.h"
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
        {"\"num_hidden_layers\": -3", "key \"num_hidden_layers\": -3 is out of range"},
        {"\"vocab_size\": 4294967296", "key \"vocab_size\": 4294967296 is out of range"},
        {"\"vocab_size\": 100000000", "key \"vocab_size\": 100000000 exceeds the supported maximum 16777216"},
        {"\"hidden_size\": 2000000", "key \"hidden_size\": 2000000 exceeds the supported maximum"},
        {"\"intermediate_size\": 8000000", "key \"intermediate_size\": 8000000 exceeds"},
        {"\"num_hidden_layers\": 100000", "key \"num_hidden_layers\": 100000 exceeds the supported maximum 4096"},
        {"\"head_dim\": 7", "key \"head_dim\": must be even"},
        {"\"head_dim\": 65536", "key \"head_dim\": 65536 exceeds"},
        {"\"num_key_value_heads\": 0", "key \"num_key_value_heads\": must be positive, found 0"},
        {"\"rms_norm_eps\": 0", "key \"rms_norm_eps\": must be a positive number, found 0"},
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
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
