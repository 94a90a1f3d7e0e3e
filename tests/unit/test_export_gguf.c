/* test_export_gguf.c — mt_export_gguf: HF model -> GGUF -> moontune's GGUF loader.
 *
 * Tiny fixtures (tiny_gqa: llama, GQA, tied; tiny_bias: qwen2, biases, untied) are
 * exported without a tokenizer (their vocabulary of 96 matches no fixture tokenizer;
 * tokenizer NULL writes no tokenizer.* keys). F32 must give bit-identical parameters and
 * logits; F16 the fp16-rounded parameters exactly and logits within 1e-2 relative
 * (weights are rounded to 11 significant bits, 2^-11 ~ 4.9e-4 relative each; through two
 * layers and the head the logits move by O(1e-3); a layout error moves them by O(1)).
 * SmolLM2-135M-Instruct (Q4_1 GGUF): exported F16 with its tokenizer, reloaded, the
 * tokenizer encodes the corpus identically and greedy generation agrees.
 *
 * MT_EXPORT_KEEP=<dir> keeps the exported files and the logits there for
 * tests/parity/check_export_gguf.py: <name>.gguf and <name>.logits.f32 (6 rows x V
 * float32 of a full forward over ids 3 9 27 81 50 2). */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store/export_gguf.h"
#include "store/export_hf.h"
#include "model/generate.h"
#include "formats/gguf.h"
#include "base/internal.h"
#include "model/model.h"
#include "testutil.h"
#include "text/tokenizer.h"

static const int32_t IDS[6] = {3, 9, 27, 81, 50, 2};

static float *full_logits(mt_model *m, const int32_t *ids, int n) {
    mt_error err = {0};
    if (mt_model_plan(m, 1, n, 0, &err) || mt_model_forward(m, ids, NULL, NULL, 1, n, &err))
        fail_msg("%s", err.msg);
    float *logits = malloc((size_t)n * m->cfg.vocab_size * sizeof(float));
    if (mt_model_logits(m, 0, n, logits, &err)) fail_msg("%s", err.msg);
    return logits;
}

/* The directory exports go to: MT_EXPORT_KEEP, else a fresh temporary one. */
static char *out_dir(int *keep) {
    const char *k = getenv("MT_EXPORT_KEEP");
    *keep = k && *k;
    return *keep ? strdup(k) : mt_test_tmpdir("export");
}

static int64_t meta_int(const mt_gguf *g, const char *key) {
    mt_error err = {0};
    int64_t v;
    if (mt_gguf_get_int(g, key, &v, &err)) fail_msg("%s", err.msg);
    return v;
}

/* The export types under test, with general.file_type (llama_ftype) as llama.cpp numbers it. */
static const struct {
    const char *name;
    mt_ggml_type type;
    int64_t file_type;
} TYPES[] = {{"f32", MT_GGML_F32, 0}, {"f16", MT_GGML_F16, 1}, {"bf16", MT_GGML_BF16, 32},
             {"q8_0", MT_GGML_Q8_0, 7}};

/* The type a 2-D weight with ne0 columns is written in (Q8_0 needs whole blocks of 32). */
static mt_ggml_type weight_type(mt_ggml_type type, uint64_t ne0) {
    return type == MT_GGML_Q8_0 && ne0 % 32 ? MT_GGML_F16 : type;
}

static void check_file(const char *path, const mt_model *m, const char *arch, int ti) {
    mt_error err = {0};
    mt_gguf *g = NULL;
    if (mt_gguf_open(path, &g, &err)) fail_msg("%s", err.msg);
    assert_int_equal(mt_gguf_version(g), 3);
    char *s = NULL, key[128];
    assert_int_equal(mt_gguf_get_string(g, "general.architecture", &s, &err), MT_OK);
    assert_string_equal(s, arch);
    free(s);
    assert_int_equal(meta_int(g, "general.file_type"), TYPES[ti].file_type);
    assert_int_equal(meta_int(g, "general.alignment"), 32);
    snprintf(key, sizeof key, "%s.block_count", arch);
    assert_int_equal(meta_int(g, key), m->cfg.num_layers);
    snprintf(key, sizeof key, "%s.attention.head_count_kv", arch);
    assert_int_equal(meta_int(g, key), m->cfg.num_kv_heads);
    snprintf(key, sizeof key, "%s.attention.value_length", arch);
    assert_int_equal(meta_int(g, key), m->cfg.head_dim);
    assert_null(mt_gguf_get(g, "tokenizer.ggml.model"));
    assert_int_equal(mt_gguf_find_tensor(g, "output.weight") != NULL, !m->cfg.tie_word_embeddings);
    for (size_t i = 0; i < mt_gguf_tensor_count(g); i++) {
        const mt_gguf_tensor *t = mt_gguf_tensor_at(g, i);
        assert_int_equal((uintptr_t)t->data % 32, 0);
        assert_int_equal(t->type, t->n_dims == 2 ? weight_type(TYPES[ti].type, t->ne[0]) : MT_GGML_F32);
    }
    const mt_gguf_tensor *q = mt_gguf_find_tensor(g, "blk.0.attn_q.weight");
    assert_non_null(q);
    assert_int_equal(q->ne[0], m->cfg.hidden_size);
    assert_int_equal(q->ne[1], m->cfg.num_heads * m->cfg.head_dim);
    mt_gguf_close(g);
}

static void write_logits(const char *dir, const char *name, const float *logits, size_t n) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s.logits.f32", dir, name);
    mt_test_write_file(path, logits, n * sizeof(float));
}

static void tiny(const char *fixture, const char *arch) {
    mt_error err = {0};
    mt_backend be;
    assert_int_equal(mt_backend_cpu_init(&be, 0, &err), MT_OK);
    char src[512];
    snprintf(src, sizeof src, "%s/%s", MT_FIXTURE_DIR, fixture);
    mt_model *hf = NULL;
    if (mt_model_load_hf(src, &be, &hf, &err)) fail_msg("%s", err.msg);
    int keep;
    char *dir = out_dir(&keep), path[1024];

    if (hf->cfg.rope_type == MT_ROPE_LLAMA3) {
        /* Llama 3.1 rope goes out as rope_freqs.weight (as llama.cpp writes it), which
         * moontune's GGUF loader refuses by name; the rest of the test uses default rope */
        snprintf(path, sizeof path, "%s/%s_llama3rope.gguf", dir, fixture);
        assert_int_equal(mt_export_gguf(hf, NULL, path, MT_GGML_F32, fixture, &err), MT_OK);
        mt_gguf *g = NULL;
        if (mt_gguf_open(path, &g, &err)) fail_msg("%s", err.msg);
        const mt_gguf_tensor *rf = mt_gguf_find_tensor(g, "rope_freqs.weight");
        assert_non_null(rf);
        assert_int_equal(rf->ne[0], hf->cfg.head_dim / 2);
        mt_gguf_close(g);
        mt_model *bad = NULL;
        assert_int_not_equal(mt_model_load_gguf(path, &be, &bad, &err), MT_OK);
        assert_non_null(strstr(err.msg, "rope_freqs"));
        if (!keep) remove(path);
        hf->cfg.rope_type = MT_ROPE_DEFAULT;
    }
    float *ref = full_logits(hf, IDS, 6);
    const size_t V = (size_t)hf->cfg.vocab_size;
    if (keep) write_logits(dir, fixture, ref, 6 * V);

    for (int ti = 0; ti < (int)(sizeof TYPES / sizeof *TYPES); ti++) {
        const char *tn = TYPES[ti].name;
        snprintf(path, sizeof path, "%s/%s_%s.gguf", dir, fixture, tn);
        if (mt_export_gguf(hf, NULL, path, TYPES[ti].type, fixture, &err)) fail_msg("%s", err.msg);
        check_file(path, hf, arch, ti);
        mt_model *gg = NULL;
        if (mt_model_load_gguf(path, &be, &gg, &err)) fail_msg("%s", err.msg);
        assert_int_equal(gg->num_params, hf->num_params);
        assert_int_equal(gg->cfg.tie_word_embeddings, hf->cfg.tie_word_embeddings);
        assert_int_equal(gg->cfg.qkv_bias, hf->cfg.qkv_bias);
        assert_true(gg->cfg.rms_norm_eps == hf->cfg.rms_norm_eps);
        assert_true(gg->cfg.rope_theta == hf->cfg.rope_theta);
        assert_int_equal(gg->cfg.max_position_embeddings, hf->cfg.max_position_embeddings);
        for (size_t i = 0; i < hf->num_params; i++) {
            const mt_param *a = &gg->params[i], *b = &hf->params[i];
            assert_string_equal(a->name, b->name);
            const int64_t cols = b->ndim == 2 ? b->shape[1] : (int64_t)b->numel;
            const mt_ggml_type wt = b->ndim == 2 ? weight_type(TYPES[ti].type, (uint64_t)cols)
                                                 : MT_GGML_F32;
            for (size_t k = 0; k < b->numel; k++) {
                const float x = b->data[k];
                if (wt == MT_GGML_Q8_0) {
                    /* every value within half a step of its block's scale amax / 127
                     * (the scale itself stored as F16: relative error 2^-11) */
                    const size_t block = k / 32 * 32;
                    float amax = 0.0f;
                    for (size_t j = block; j < block + 32; j++)
                        if (fabsf(b->data[j]) > amax) amax = fabsf(b->data[j]);
                    const double tol = amax / 127.0 * 0.5 + amax * (1.0 / 1024) + 1e-12;
                    if (fabs((double)a->data[k] - x) > tol)
                        fail_msg("%s[%zu]: %.9g after the Q8_0 round trip, expected %.9g +- %.3g",
                                 b->name, k, a->data[k], x, tol);
                    continue;
                }
                float want = wt == MT_GGML_F16    ? mt_f16_to_f32(mt_f32_to_f16(x))
                             : wt == MT_GGML_BF16 ? mt_bf16_to_f32(mt_f32_to_bf16(x))
                                                  : x;
                if (memcmp(&a->data[k], &want, sizeof want))
                    fail_msg("%s[%zu]: %.9g after the %s round trip, expected %.9g", b->name, k,
                             a->data[k], tn, want);
            }
        }
        float *logits = full_logits(gg, IDS, 6);
        double e = mt_test_rel_err(logits, ref, 6 * V);
        printf("  %s %s: logits max rel err %.3e\n", fixture, tn, e);
        if (TYPES[ti].type == MT_GGML_F32) assert_memory_equal(logits, ref, 6 * V * sizeof(float));
        else assert_true(e < (TYPES[ti].type == MT_GGML_F16 ? 1e-2 : 5e-2));
        free(logits);
        mt_model_free(gg);
    }
    /* refusals: an unsupported dtype, a tokenizer larger than the vocabulary */
    snprintf(path, sizeof path, "%s/bad.gguf", dir);
    assert_int_equal(mt_export_gguf(hf, NULL, path, MT_GGML_Q4_1, NULL, &err), MT_ERR_INVALID_ARG);
    mt_tokenizer *big = NULL;
    if (mt_tokenizer_load_dir(MT_FIXTURE_DIR "/tokenizer/smollm2", &big, &err)) fail_msg("%s", err.msg);
    assert_int_equal(mt_export_gguf(hf, big, path, MT_GGML_F32, NULL, &err), MT_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "tokens"));
    mt_tokenizer_free(big);
    FILE *f = fopen(path, "rb");
    assert_null(f); /* nothing left behind */
    free(ref);
    mt_model_free(hf);
    if (!keep) mt_test_rmtree(dir);
    free(dir);
    mt_backend_cpu_shutdown(&be);
}

static void test_tiny_gqa_llama_tied(void **state) {
    (void)state;
    tiny("tiny_gqa", "llama");
}
static void test_tiny_bias_qwen2_untied(void **state) {
    (void)state;
    tiny("tiny_bias", "qwen2");
}

static void encode(const mt_tokenizer *tok, const char *s, int special, mt_token_list *l) {
    mt_error err = {0};
    l->n = 0;
    if (mt_tokenizer_encode(tok, s, strlen(s), special, l, &err)) fail_msg("%s", err.msg);
}

static void test_smollm2_f16(void **state) {
    (void)state;
    const char *src = mt_test_smollm2_gguf();
    if (!src) {
        printf("  (skipped: no SmolLM2 GGUF; set MOONTUNE_SMOLLM2_GGUF)\n");
        skip();
    }
    mt_error err = {0};
    mt_backend be;
    assert_int_equal(mt_backend_cpu_init(&be, 0, &err), MT_OK);
    mt_model *m = NULL, *m2 = NULL;
    mt_tokenizer *tok = NULL, *tok2 = NULL;
    if (mt_model_load_gguf(src, &be, &m, &err)) fail_msg("%s", err.msg);
    if (mt_tokenizer_load_gguf(src, &tok, &err)) fail_msg("%s", err.msg);
    assert_string_equal(mt_tokenizer_pre_name(tok), "smollm");
    int keep;
    char *dir = out_dir(&keep), path[1024];
    snprintf(path, sizeof path, "%s/smollm2_f16.gguf", dir);
    double t0 = mt_now_seconds();
    if (mt_export_gguf(m, tok, path, MT_GGML_F16, "SmolLM2-135M-Instruct", &err)) fail_msg("%s", err.msg);
    printf("  exported SmolLM2 F16 in %.2f s\n", mt_now_seconds() - t0);
    if (mt_model_load_gguf(path, &be, &m2, &err)) fail_msg("%s", err.msg);
    if (mt_tokenizer_load_gguf(path, &tok2, &err)) fail_msg("%s", err.msg);

    /* the tokenizer: vocabulary, specials, settings, template, corpus ids */
    const int V = mt_tokenizer_vocab_size(tok);
    assert_int_equal(mt_tokenizer_vocab_size(tok2), V);
    for (int32_t i = 0; i < V; i++) {
        assert_string_equal(mt_tokenizer_token_text(tok2, i), mt_tokenizer_token_text(tok, i));
        assert_int_equal(mt_tokenizer_is_special(tok2, i), mt_tokenizer_is_special(tok, i));
    }
    assert_int_equal(mt_tokenizer_bos(tok2), mt_tokenizer_bos(tok));
    assert_int_equal(mt_tokenizer_eos(tok2), mt_tokenizer_eos(tok));
    assert_int_equal(mt_tokenizer_pad(tok2), mt_tokenizer_pad(tok));
    assert_int_equal(mt_tokenizer_adds_bos(tok2), mt_tokenizer_adds_bos(tok));
    assert_int_equal(mt_tokenizer_adds_eos(tok2), mt_tokenizer_adds_eos(tok));
    assert_non_null(mt_tokenizer_chat_template(tok));
    assert_string_equal(mt_tokenizer_chat_template(tok2), mt_tokenizer_chat_template(tok));
    mt_test_corpus corpus;
    mt_test_corpus_load(&corpus);
    size_t n_lines = corpus.n;
    char **lines = corpus.line;
    mt_token_list a = {0}, b = {0};
    size_t n_ids = 0;
    for (size_t k = 0; k < n_lines; k++) {
        for (int special = 0; special <= 1; special++) {
            encode(tok, lines[k], special, &a);
            encode(tok2, lines[k], special, &b);
            if (a.n != b.n || memcmp(a.ids, b.ids, a.n * sizeof(int32_t)))
                fail_msg("corpus line %zu encodes differently after the export", k + 1);
            n_ids += a.n;
        }
    }
    mt_test_corpus_free(&corpus);
    printf("  tokenizer: %zu corpus lines, %zu ids, identical\n", n_lines, n_ids);

    /* greedy generation for a fixed chat prompt (generate/reference.json's first) */
    json_error_t jerr;
    json_t *ref = json_load_file(MT_FIXTURE_DIR "/generate/reference.json", 0, &jerr);
    if (!ref) fail_msg("%s", jerr.text);
    const char *text = json_string_value(
        json_object_get(json_array_get(json_object_get(ref, "prompts"), 0), "text"));
    encode(tok, text, 0, &a);
    encode(tok2, text, 0, &b);
    assert_int_equal(a.n, b.n);
    assert_memory_equal(a.ids, b.ids, a.n * sizeof(int32_t));
    /* in fp32: the export is compared, not the int8 copies, which quantise the F16
     * weights on 255 steps and the Q4_1 ones on their own 16 (near ties part them) */
    mt_generate_options opt = {.max_new_tokens = 16, .fp32 = 1};
    mt_generation g1, g2;
    if (mt_generate(m, NULL, a.ids, (int)a.n, &opt, &g1, &err)) fail_msg("%s", err.msg);
    if (mt_generate(m2, NULL, b.ids, (int)b.n, &opt, &g2, &err)) fail_msg("%s", err.msg);
    int match = 0;
    while (match < 16 && g1.ids[match] == g2.ids[match]) match++;
    printf("  greedy: %d of 16 tokens match (F16 export vs dequantized Q4_1)\n", match);
    assert_true(match >= 8);
    mt_generation_free(&g1);
    mt_generation_free(&g2);
    json_decref(ref);
    mt_token_list_free(&a);
    mt_token_list_free(&b);
    mt_tokenizer_free(tok);
    mt_tokenizer_free(tok2);
    mt_model_free(m);
    mt_model_free(m2);
    if (!keep) mt_test_rmtree(dir);
    free(dir);
    mt_backend_cpu_shutdown(&be);
}

/* Weights holding NaN or infinity are refused on load, from a Hugging Face directory
 * and from a GGUF file, naming the file, the tensor, the count and the first index. */
static void test_nonfinite_weights_refused(void **state) {
    (void)state;
    mt_error err = {0};
    mt_backend be;
    assert_int_equal(mt_backend_cpu_init(&be, 0, &err), MT_OK);
    mt_model *m = NULL;
    if (mt_model_load_hf(MT_FIXTURE_DIR "/tiny_bias", &be, &m, &err)) fail_msg("%s", err.msg);
    mt_param *p = mt_model_find_param(m, "model.layers.1.mlp.up_proj.weight");
    assert_non_null(p);
    p->data[5] = NAN;
    p->data[7] = INFINITY;
    char *dir = mt_test_tmpdir("nonfinite"), path[1024];
    snprintf(path, sizeof path, "%s/hf", dir);
    if (mt_export_merged_hf(m, NULL, NULL, path, &err)) fail_msg("%s", err.msg);
    mt_model *bad = NULL;
    assert_int_not_equal(mt_model_load_hf(path, &be, &bad, &err), MT_OK);
    assert_null(bad);
    printf("refused: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "model.safetensors: tensor \"model.layers.1.mlp.up_proj.weight\": 2 non-finite values"));
    assert_non_null(strstr(err.msg, "at index 5"));
    snprintf(path, sizeof path, "%s/nan.gguf", dir);
    if (mt_export_gguf(m, NULL, path, MT_GGML_F32, "nan", &err)) fail_msg("%s", err.msg);
    assert_int_not_equal(mt_model_load_gguf(path, &be, &bad, &err), MT_OK);
    printf("refused: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "nan.gguf: tensor \"blk.1.ffn_up.weight\": 2 non-finite values"));
    mt_model_free(m);
    mt_test_rmtree(dir);
    free(dir);
    mt_backend_cpu_shutdown(&be);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiny_gqa_llama_tied),
        cmocka_unit_test(test_tiny_bias_qwen2_untied),
        cmocka_unit_test(test_smollm2_f16),
        cmocka_unit_test(test_nonfinite_weights_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
