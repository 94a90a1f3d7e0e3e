/* test_export_hf.c — PEFT adapter and merged transformers exports (core/store/export_hf.c)
 * and writing tokenizer.json (mt_tokenizer_save_json).
 *
 * On tests/fixtures/tiny_gqa (llama, tied, GQA, llama3 rope) and tiny_bias (qwen2,
 * untied, q/k/v biases), with lora.so r=4 alpha=8 all-linear and random non-zero A, B:
 * - the merged directory reloads with mt_model_load_hf and gives the adapted model's
 *   logits within 1e-5; the in-memory model is unchanged by the export (unmerged);
 * - config.json parses back with mt_config_load to the same configuration;
 * - adapter_model.safetensors holds PEFT's names "base_model.model.<proj>.lora_A.weight"
 *   (r,in) / ".lora_B.weight" (out,r), F32, with the adapter's values; adapter_config.json
 *   has PEFT's keys;
 * - the tokenizer: the SmolLM2 fixture tokenizer and the SmolLM2 GGUF tokenizer, saved
 *   as tokenizer.json + tokenizer_config.json and loaded back, encode every corpus line
 *   to the same ids (with and without special tokens) and decode the same.
 *
 * MT_EXPORT_KEEP=<dir> keeps the exports there, with logits.safetensors (tokens and
 * the adapted model's logits) for tests/parity/check_exports_hf.py. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "store/export_hf.h"
#include "base/internal.h"
#include "model/model.h"
#include "plugin/registry.h"
#include "formats/safetensors.h"
#include "testutil.h"
#include "text/tokenizer.h"

#define GQA_DIR MT_FIXTURE_DIR "/tiny_gqa"
#define BIAS_DIR MT_FIXTURE_DIR "/tiny_bias"
#define TOK_DIR MT_FIXTURE_DIR "/tokenizer"

enum { B = 2, T = 7 };

static char *join(const char *a, const char *b) {
    size_t n = strlen(a) + strlen(b) + 2;
    char *s = malloc(n);
    assert_non_null(s);
    snprintf(s, n, "%s/%s", a, b);
    return s;
}

/* The output root: $MT_EXPORT_KEEP (kept) or a fresh temporary directory. */
static char *out_root(int *keep) {
    const char *k = getenv("MT_EXPORT_KEEP");
    *keep = k && *k;
    if (*keep) {
        mkdir(k, 0755);
        char *s = strdup(k);
        assert_non_null(s);
        return s;
    }
    return mt_test_tmpdir("export_hf");
}

static float *forward_logits(mt_model *m, const int32_t *tokens) {
    mt_error err = {0};
    if (mt_model_forward(m, tokens, NULL, NULL, B, T, &err)) fail_msg("%s", err.msg);
    size_t n = (size_t)B * T * m->cfg.vocab_size;
    float *logits = malloc(n * sizeof(float));
    assert_non_null(logits);
    if (mt_model_logits(m, 0, B * T, logits, &err)) fail_msg("%s", err.msg);
    return logits;
}

static void check_close(const char *what, const float *a, const float *ref, size_t n, double tol) {
    double e = mt_test_rel_err(a, ref, n);
    printf("  %-44s rel err %.3g\n", what, e);
    if (!(e <= tol)) fail_msg("%s: rel err %.3g > %.3g", what, e, tol);
}

static void check_config_equal(const mt_model_config *a, const mt_model_config *b) {
    assert_string_equal(a->model_type, b->model_type);
    assert_int_equal(a->hidden_size, b->hidden_size);
    assert_int_equal(a->intermediate_size, b->intermediate_size);
    assert_int_equal(a->num_layers, b->num_layers);
    assert_int_equal(a->num_heads, b->num_heads);
    assert_int_equal(a->num_kv_heads, b->num_kv_heads);
    assert_int_equal(a->head_dim, b->head_dim);
    assert_int_equal(a->vocab_size, b->vocab_size);
    assert_int_equal(a->max_position_embeddings, b->max_position_embeddings);
    assert_true(a->rms_norm_eps == b->rms_norm_eps);
    assert_true(a->rope_theta == b->rope_theta);
    assert_int_equal(a->rope_type, b->rope_type);
    assert_true(a->rope_factor == b->rope_factor);
    assert_true(a->rope_low_freq_factor == b->rope_low_freq_factor);
    assert_true(a->rope_high_freq_factor == b->rope_high_freq_factor);
    assert_int_equal(a->rope_original_max_position_embeddings,
                     b->rope_original_max_position_embeddings);
    assert_int_equal(a->tie_word_embeddings, b->tie_word_embeddings);
    assert_int_equal(a->qkv_bias, b->qkv_bias);
    assert_int_equal(a->o_bias, b->o_bias);
    assert_int_equal(a->mlp_bias, b->mlp_bias);
}

static void check_adapter_dir(mt_model *m, const char *dir, const char *base) {
    mt_error err = {0};
    char *path = join(dir, "adapter_model.safetensors");
    mt_safetensors *st = NULL;
    if (mt_st_open(path, &st, &err)) fail_msg("%s", err.msg);
    size_t n_lora = 0;
    for (size_t i = 0; i < m->num_extra; i++) {
        const mt_param_view *v = &m->extra_params[i];
        char name[256];
        snprintf(name, sizeof name, "base_model.model.%s", v->name);
        const mt_st_tensor *t = mt_st_find(st, name);
        if (!t) fail_msg("%s missing from %s", name, path);
        assert_int_equal(t->dtype, MT_ST_F32);
        assert_int_equal(t->ndim, 2);
        assert_int_equal(t->shape[0], v->value.shape[0]);
        assert_int_equal(t->shape[1], v->value.shape[1]);
        const int is_a = strstr(v->name, ".lora_A.weight") != NULL;
        assert_int_equal(is_a ? t->shape[0] : t->shape[1], 4); /* r */
        assert_memory_equal(t->data, v->value.data, t->nbytes);
        n_lora++;
    }
    assert_int_equal(mt_st_count(st), n_lora);
    assert_int_equal(n_lora, 2 * 7 * (size_t)m->cfg.num_layers);
    assert_string_equal(mt_st_metadata(st, "format"), "pt");
    mt_st_close(st);
    free(path);

    path = join(dir, "adapter_config.json");
    json_error_t je;
    json_t *cfg = json_load_file(path, 0, &je);
    if (!cfg) fail_msg("%s: %s", path, je.text);
    assert_string_equal(json_string_value(json_object_get(cfg, "peft_type")), "LORA");
    assert_string_equal(json_string_value(json_object_get(cfg, "task_type")), "CAUSAL_LM");
    assert_string_equal(json_string_value(json_object_get(cfg, "bias")), "none");
    assert_string_equal(json_string_value(json_object_get(cfg, "base_model_name_or_path")), base);
    assert_int_equal(json_integer_value(json_object_get(cfg, "r")), 4);
    assert_int_equal(json_integer_value(json_object_get(cfg, "lora_alpha")), 8);
    assert_true(json_number_value(json_object_get(cfg, "lora_dropout")) == 0.0);
    assert_true(json_is_false(json_object_get(cfg, "use_rslora")));
    assert_true(json_is_false(json_object_get(cfg, "fan_in_fan_out")));
    assert_true(json_is_true(json_object_get(cfg, "inference_mode")));
    assert_true(json_is_null(json_object_get(cfg, "modules_to_save")));
    json_t *tm = json_object_get(cfg, "target_modules");
    static const char *const all[] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                      "gate_proj", "up_proj", "down_proj"};
    assert_int_equal(json_array_size(tm), 7);
    for (int i = 0; i < 7; i++) assert_string_equal(json_string_value(json_array_get(tm, (size_t)i)), all[i]);
    json_decref(cfg);
    free(path);
}

static void write_logits(const char *dir, const int32_t *tokens, const float *logits, int V) {
    char *path = join(dir, "logits.safetensors");
    mt_st_entry e[2] = {
        {.name = "tokens", .dtype = MT_ST_I32, .ndim = 2, .shape = {B, T}, .data = tokens},
        {.name = "logits", .dtype = MT_ST_F32, .ndim = 3, .shape = {B, T, V}, .data = logits},
    };
    mt_error err = {0};
    if (mt_st_write(path, e, 2, NULL, &err)) fail_msg("%s", err.msg);
    free(path);
}

static void export_case(const char *model_dir, const char *tag) {
    mt_error err = {0};
    mt_backend be;
    assert_int_equal(mt_backend_cpu_init(&be, 0, &err), MT_OK);
    mt_model *m = NULL;
    if (mt_model_load_hf(model_dir, &be, &m, &err)) fail_msg("%s", err.msg);
    char so[512];
    snprintf(so, sizeof so, "%s/plugins/lora.so", MT_BUILD_DIR);
    mt_plugin *plugin = NULL;
    if (mt_plugin_load(so, &plugin, &err)) fail_msg("%s", err.msg);
    const char *all_linear[] = {"all-linear"};
    mt_kv kv[] = {{.key = "r", .type = MT_KV_NUMBER, .number = 4},
                  {.key = "alpha", .type = MT_KV_NUMBER, .number = 8},
                  {.key = "target_modules", .type = MT_KV_LIST, .list = all_linear, .list_len = 1}};
    mt_plugin_instance *inst = NULL;
    if (mt_plugin_instantiate(plugin, kv, 3, &inst, &err)) fail_msg("%s", err.msg);
    if (mt_model_attach_adapter(m, inst->desc->vtable, inst->state, &err)) fail_msg("%s", err.msg);
    mt_model_set_training(m, 0);
    uint64_t seed = 0x5EED0001;
    for (size_t i = 0; i < m->num_extra; i++) {
        mt_param_view *v = &m->extra_params[i];
        mt_test_fill_uniform(v->value.data, (size_t)mt_tensor_numel(&v->value), &seed, -0.3f, 0.3f);
    }
    if (mt_model_plan(m, B, T, 0, &err)) fail_msg("%s", err.msg);
    const int V = m->cfg.vocab_size;
    int32_t tokens[B * T];
    for (int i = 0; i < B * T; i++) tokens[i] = (int32_t)((i * 37 + 5) % V);
    float *ref = forward_logits(m, tokens);
    float *base = NULL;
    {
        mt_model_set_adapters_enabled(m, 0);
        base = forward_logits(m, tokens);
        mt_model_set_adapters_enabled(m, 1);
        double diff = mt_test_rel_err(base, ref, (size_t)B * T * V);
        printf("  %s: adapter changes the logits by %.3g (relative)\n", tag, diff);
        assert_true(diff > 1e-2); /* the adapter is not a no-op */
    }

    int keep;
    char *root = out_root(&keep);
    char *dir = join(root, tag);
    mkdir(dir, 0755);
    char *merged = join(dir, "merged"), *peft = join(dir, "peft");
    if (mt_export_peft(m, inst, model_dir, peft, &err)) fail_msg("%s", err.msg);
    if (mt_export_merged_hf(m, inst, NULL, merged, &err)) fail_msg("%s", err.msg);

    /* the model in memory is unchanged (unmerged) */
    float *after = forward_logits(m, tokens);
    check_close("logits after the export (unmerged)", after, ref, (size_t)B * T * V, 1e-5);
    check_adapter_dir(m, peft, model_dir);

    /* the merged directory */
    mt_model *m2 = NULL;
    if (mt_model_load_hf(merged, &be, &m2, &err)) fail_msg("%s", err.msg);
    check_config_equal(&m2->cfg, &m->cfg);
    mt_model_config cfg2;
    char *cfg_path = join(merged, "config.json");
    if (mt_config_load(cfg_path, &cfg2, &err)) fail_msg("%s", err.msg);
    check_config_equal(&cfg2, &m->cfg);
    free(cfg_path);
    char *lm = join(merged, "model.safetensors");
    mt_safetensors *st = NULL;
    if (mt_st_open(lm, &st, &err)) fail_msg("%s", err.msg);
    assert_int_equal(mt_st_find(st, "lm_head.weight") != NULL, !m->cfg.tie_word_embeddings);
    mt_st_close(st);
    free(lm);
    if (mt_model_plan(m2, B, T, 0, &err)) fail_msg("%s", err.msg);
    float *merged_logits = forward_logits(m2, tokens);
    check_close("merged export reloaded vs adapted model", merged_logits, ref, (size_t)B * T * V, 1e-5);
    if (keep) write_logits(dir, tokens, ref, V);

    free(merged_logits);
    free(after);
    free(base);
    free(ref);
    mt_model_free(m2);
    mt_model_free(m);
    mt_plugin_instance_free(inst);
    mt_plugin_unload(plugin);
    mt_backend_cpu_shutdown(&be);
    if (!keep) mt_test_rmtree(root);
    free(merged);
    free(peft);
    free(dir);
    free(root);
}

static void test_export_tiny_gqa(void **state) {
    (void)state;
    export_case(GQA_DIR, "tiny_gqa");
}

static void test_export_tiny_bias(void **state) {
    (void)state;
    export_case(BIAS_DIR, "tiny_bias");
}

/* ---- tokenizer round trip ---- */


static void check_same_tokenizer(const mt_tokenizer *a, const mt_tokenizer *b, const char *what) {
    assert_int_equal(mt_tokenizer_vocab_size(a), mt_tokenizer_vocab_size(b));
    assert_int_equal(mt_tokenizer_get_family(a), mt_tokenizer_get_family(b));
    assert_int_equal(mt_tokenizer_bos(a), mt_tokenizer_bos(b));
    assert_int_equal(mt_tokenizer_eos(a), mt_tokenizer_eos(b));
    assert_int_equal(mt_tokenizer_pad(a), mt_tokenizer_pad(b));
    assert_int_equal(mt_tokenizer_adds_bos(a), mt_tokenizer_adds_bos(b));
    assert_int_equal(mt_tokenizer_adds_eos(a), mt_tokenizer_adds_eos(b));
    const char *ca = mt_tokenizer_chat_template(a), *cb = mt_tokenizer_chat_template(b);
    assert_int_equal(ca == NULL, cb == NULL);
    if (ca) assert_string_equal(ca, cb);
    for (int32_t id = 0; id < mt_tokenizer_vocab_size(a); id++)
        assert_int_equal(mt_tokenizer_is_special(a, id), mt_tokenizer_is_special(b, id));
    mt_test_corpus c;
    mt_test_corpus_load(&c);
    size_t total = 0;
    for (size_t k = 0; k < c.n; k++) {
        for (int special = 0; special < 2; special++) {
            mt_token_list la = {0}, lb = {0};
            mt_error err = {0};
            if (mt_tokenizer_encode(a, c.line[k], c.len[k], special, &la, &err)) fail_msg("%s", err.msg);
            if (mt_tokenizer_encode(b, c.line[k], c.len[k], special, &lb, &err)) fail_msg("%s", err.msg);
            if (la.n != lb.n || memcmp(la.ids, lb.ids, la.n * sizeof(int32_t)))
                fail_msg("%s: line %zu encodes differently after the round trip", what, k + 1);
            assert_memory_equal(la.offsets, lb.offsets, la.n * sizeof(int32_t));
            char *da, *db;
            size_t na, nb;
            if (mt_tokenizer_decode(a, la.ids, la.n, 0, &da, &na, &err)) fail_msg("%s", err.msg);
            if (mt_tokenizer_decode(b, lb.ids, lb.n, 0, &db, &nb, &err)) fail_msg("%s", err.msg);
            assert_int_equal(na, nb);
            assert_memory_equal(da, db, na);
            free(da);
            free(db);
            total += la.n;
            mt_token_list_free(&la);
            mt_token_list_free(&lb);
        }
    }
    printf("  %s: %zu corpus lines, %zu ids, identical after the round trip\n", what, c.n, total);
    mt_test_corpus_free(&c);
}

/* Saves tok, loads it back (directly, and from a merged export's directory). */
static void tokenizer_round_trip(const mt_tokenizer *tok, const char *what, const char *tag) {
    mt_error err = {0};
    int keep;
    char *root = out_root(&keep);
    char *dir = join(root, tag);
    mkdir(dir, 0755);
    char *tj = join(dir, "tokenizer.json"), *tc = join(dir, "tokenizer_config.json");
    if (mt_tokenizer_save_json(tok, tj, tc, &err)) fail_msg("%s", err.msg);
    mt_tokenizer *back = NULL;
    if (mt_tokenizer_load_json(tj, tc, &back, &err)) fail_msg("%s", err.msg);
    check_same_tokenizer(tok, back, what);
    mt_tokenizer_free(back);

    /* through a merged export (no adapter): copied or written, then loaded from the dir */
    mt_backend be;
    assert_int_equal(mt_backend_cpu_init(&be, 0, &err), MT_OK);
    mt_model *m = NULL;
    if (mt_model_load_hf(GQA_DIR, &be, &m, &err)) fail_msg("%s", err.msg);
    char *merged = join(dir, "merged");
    if (mt_export_merged_hf(m, NULL, tok, merged, &err)) fail_msg("%s", err.msg);
    if (mt_tokenizer_load_dir(merged, &back, &err)) fail_msg("%s", err.msg);
    check_same_tokenizer(tok, back, what);
    mt_tokenizer_free(back);
    char *gen = join(merged, "generation_config.json");
    json_error_t je;
    json_t *g = json_load_file(gen, 0, &je);
    assert_non_null(g);
    assert_int_equal(json_integer_value(json_object_get(g, "eos_token_id")), mt_tokenizer_eos(tok));
    json_decref(g);
    free(gen);
    mt_model_free(m);
    mt_backend_cpu_shutdown(&be);
    if (!keep) mt_test_rmtree(root);
    free(merged);
    free(tj);
    free(tc);
    free(dir);
    free(root);
}

static void test_tokenizer_fixture_round_trip(void **state) {
    (void)state;
    mt_error err = {0};
    mt_tokenizer *tok = NULL;
    if (mt_tokenizer_load_dir(TOK_DIR "/smollm2", &tok, &err)) fail_msg("%s", err.msg);
    tokenizer_round_trip(tok, "smollm2 tokenizer.json", "tok_smollm2");
    mt_tokenizer_free(tok);
}

static void test_tokenizer_gguf_round_trip(void **state) {
    (void)state;
    const char *gguf = mt_test_smollm2_gguf();
    if (!gguf) {
        printf("  SmolLM2 GGUF absent: skipped\n");
        skip();
    }
    mt_error err = {0};
    mt_tokenizer *tok = NULL;
    if (mt_tokenizer_load_gguf(gguf, &tok, &err)) fail_msg("%s", err.msg);
    tokenizer_round_trip(tok, "smollm2 GGUF", "tok_gguf");
    mt_tokenizer_free(tok);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_export_tiny_gqa),
        cmocka_unit_test(test_export_tiny_bias),
        cmocka_unit_test(test_tokenizer_fixture_round_trip),
        cmocka_unit_test(test_tokenizer_gguf_round_trip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
