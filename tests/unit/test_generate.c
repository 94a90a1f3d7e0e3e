/* test_generate.c — the GGUF model loader, the KV-cache decoder, sampling and generation.
 *
 * Against tests/fixtures/generate/reference.json (tests/parity/make_generate_reference.py:
 * transformers on the SmolLM2-135M-Instruct Q4_1 GGUF): the rendered prompt ids, the
 * first-step top-5 logits and 40 greedy tokens per prompt. The decoder is also checked
 * against the training forward (mt_model_forward) on SmolLM2 and on tiny_gqa. */
#include <jansson.h>
#include <lauxlib.h>
#include <lua.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/generate.h"
#include "cpu/cpu_kernels.h" /* cpu_int8_supported */
#include "base/internal.h"
#include "lua/lua_state.h"
#include "model/model.h"
#include "lua/chat_render.h"
#include "testutil.h"

#define REFERENCE MT_FIXTURE_DIR "/generate/reference.json"
#define GQA_DIR MT_FIXTURE_DIR "/tiny_gqa"

/* MOONTUNE_GENERATE_TOKENS lowers the 40 greedy tokens per prompt (sanitizer builds). */
static int new_tokens(int reference) {
    const char *s = getenv("MOONTUNE_GENERATE_TOKENS");
    int n = s ? atoi(s) : reference;
    return n > 0 && n < reference ? n : reference;
}

/* The chat template (auto-detected) renders messages with add_generation_prompt. */
static char *render(const mt_tokenizer *tok, json_t *messages) {
    mt_error err = {0};
    lua_State *L = mt_lua_open(&err);
    if (!L) fail_msg("%s", err.msg);
    const char *resolved = NULL;
    if (mt_chat_template_push(L, tok, "auto", &resolved, &err)) fail_msg("%s", err.msg);
    lua_newtable(L);
    for (size_t i = 0; i < json_array_size(messages); i++) {
        json_t *msg = json_array_get(messages, i);
        lua_createtable(L, 0, 2);
        lua_pushstring(L, json_string_value(json_object_get(msg, "role")));
        lua_setfield(L, -2, "role");
        lua_pushstring(L, json_string_value(json_object_get(msg, "content")));
        lua_setfield(L, -2, "content");
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    lua_newtable(L);
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "add_generation_prompt");
    if (mt_lua_pcall(L, 2, 2, &err)) fail_msg("%s", err.msg);
    char *text = strdup(lua_tostring(L, -2));
    lua_close(L);
    return text;
}

static int32_t *json_ids(json_t *arr, int *n) {
    *n = (int)json_array_size(arr);
    int32_t *ids = malloc((size_t)*n * sizeof *ids);
    for (int i = 0; i < *n; i++) ids[i] = (int32_t)json_integer_value(json_array_get(arr, (size_t)i));
    return ids;
}

/* Logits of every row of one full forward over ids (n), as mt_model_forward computes them. */
static float *full_logits(mt_model *m, const int32_t *ids, int n) {
    mt_error err = {0};
    if (mt_model_plan(m, 1, n, 0, &err) || mt_model_forward(m, ids, NULL, NULL, 1, n, &err))
        fail_msg("%s", err.msg);
    float *logits = malloc((size_t)n * m->cfg.vocab_size * sizeof(float));
    if (mt_model_logits(m, 0, n, logits, &err)) fail_msg("%s", err.msg);
    return logits;
}

typedef struct streamed {
    char buf[4096];
    size_t len;
    int calls;
} streamed;

static int collect(void *user, const char *piece, size_t len) {
    streamed *s = user;
    assert_true(s->len + len < sizeof s->buf);
    memcpy(s->buf + s->len, piece, len);
    s->len += len;
    s->buf[s->len] = '\0';
    s->calls++;
    return 0;
}

static void test_smollm2_matches_transformers(void **state) {
    (void)state;
    const char *path = mt_test_smollm2_gguf();
    if (!path) {
        printf("  (skipped: no SmolLM2 GGUF; set MOONTUNE_SMOLLM2_GGUF)\n");
        skip();
    }
    mt_error err = {0};
    mt_backend be;
    assert_int_equal(mt_backend_cpu_init(&be, 0, &err), MT_OK);
    mt_model *m = NULL;
    mt_tokenizer *tok = NULL;
    double t0 = mt_now_seconds();
    if (mt_model_load_gguf(path, &be, &m, &err)) fail_msg("%s", err.msg);
    if (mt_tokenizer_load_gguf(path, &tok, &err)) fail_msg("%s", err.msg);
    printf("  loaded %s in %.2f s\n", path, mt_now_seconds() - t0);
    const mt_model_config *c = &m->cfg;
    assert_int_equal(c->hidden_size, 576);
    assert_int_equal(c->num_layers, 30);
    assert_int_equal(c->num_heads, 9);
    assert_int_equal(c->num_kv_heads, 3);
    assert_int_equal(c->head_dim, 64);
    assert_int_equal(c->intermediate_size, 1536);
    assert_int_equal(c->vocab_size, 49152);
    if (cpu_int8_supported()) {
        /* the GGUF's Q4_1 projections keep their 4-bit codes in an int8 copy (the AVX2
         * kernel for small codes runs them); the Q8_0 embedding (lm_head) does not */
        int small = 0;
        for (int i = 0; i < mt_model_linear_count(m); i++) {
            const mt_linear *lin = mt_model_linear(m, i);
            void *q = be.ops->weight_int8_create(&be, lin->weight, lin->out, lin->in, 0,
                                                 MT_INT8_USE_DECODING);
            assert_non_null(q);
            small += cpu_weight_int8_small_codes(q);
            be.ops->weight_int8_free(&be, q);
        }
        printf("  %d of %d projections keep 4-bit codes in int8\n", small, mt_model_linear_count(m));
        assert_int_equal(small, 7 * c->num_layers);
    }
    assert_int_equal(c->max_position_embeddings, 8192);
    assert_true(c->tie_word_embeddings && c->rope_theta == 100000.0);
    assert_true(fabsf(c->rms_norm_eps - 1e-5f) < 1e-9f);

    json_error_t jerr;
    json_t *ref = json_load_file(REFERENCE, 0, &jerr);
    if (!ref) fail_msg("%s: %s", REFERENCE, jerr.text);
    json_t *prompts = json_object_get(ref, "prompts");
    assert_int_equal(json_array_size(prompts), 3);
    const int V = c->vocab_size;
    float *logits = malloc((size_t)V * sizeof(float));
    double tok_s_sum = 0.0;
    /* each prompt's ids and mt_generate's greedy ids, for the batched run after */
    int32_t *kept_prompt[3] = {0}, *kept_gen[3] = {0};
    int kept_n[3] = {0}, kept_gen_n[3] = {0};
    for (size_t p = 0; p < json_array_size(prompts); p++) {
        json_t *pr = json_array_get(prompts, p);
        /* template + tokenizer */
        char *text = render(tok, json_object_get(pr, "messages"));
        assert_string_equal(text, json_string_value(json_object_get(pr, "text")));
        mt_token_list list = {0};
        if (mt_tokenizer_encode(tok, text, strlen(text), 0, &list, &err)) fail_msg("%s", err.msg);
        int n_prompt, n_ref;
        int32_t *prompt = json_ids(json_object_get(pr, "prompt_ids"), &n_prompt);
        int32_t *ref_ids = json_ids(json_object_get(pr, "generated_ids"), &n_ref);
        assert_int_equal((int)list.n, n_prompt);
        assert_memory_equal(list.ids, prompt, (size_t)n_prompt * sizeof(int32_t));

        /* first step: top-5 ids and logits */
        mt_kv_decoder *d = NULL;
        if (mt_kv_decoder_create(m, 1, n_prompt + n_ref, 0, &d, &err)) fail_msg("%s", err.msg);
        if (mt_kv_decoder_feed(d, 0, prompt, n_prompt, logits, &err)) fail_msg("%s", err.msg);
        json_t *top_ids = json_object_get(pr, "top5_ids"), *top_vals = json_object_get(pr, "top5_logits");
        double worst = 0.0;
        float *scratch = malloc((size_t)V * sizeof(float));
        memcpy(scratch, logits, (size_t)V * sizeof(float));
        for (size_t k = 0; k < 5; k++) {
            int32_t id = mt_argmax(scratch, V);
            double want = json_real_value(json_array_get(top_vals, k));
            assert_int_equal(id, json_integer_value(json_array_get(top_ids, k)));
            double rel = fabs(logits[id] - want) / fabs(want);
            if (rel > worst) worst = rel;
            scratch[id] = -INFINITY;
        }
        free(scratch);
        assert_true(worst < 1e-3);

        /* the same prompt through int8 weight products (generation's default): the
         * GGUF's Q4 weights are multiplied exactly, the inputs rounded to 8 bits per
         * group of 32, so the logits move (measured: at most 2.3-5.8% of their range on
         * these prompts, about 1% RMS); the greedy token stays among fp32's top 5 */
        mt_kv_decoder *d8 = NULL;
        if (mt_kv_decoder_create(m, 1, n_prompt, 0, &d8, &err)) fail_msg("%s", err.msg);
        const int int8 = mt_kv_decoder_use_int8(d8);
        float *logits8 = malloc((size_t)V * sizeof(float));
        assert_non_null(logits8);
        if (mt_kv_decoder_feed(d8, 0, prompt, n_prompt, logits8, &err)) fail_msg("%s", err.msg);
        double err8 = 0.0, range = 0.0;
        for (int i = 0; i < V; i++) {
            err8 = fmax(err8, fabs((double)logits8[i] - logits[i]));
            range = fmax(range, fabs((double)logits[i]));
        }
        const int32_t top8 = mt_argmax(logits8, V);
        int in_top5 = 0;
        for (size_t k = 0; k < 5; k++) in_top5 |= top8 == json_integer_value(json_array_get(top_ids, k));
        printf("  prompt %zu, %d projections in int8: logits within %.2e of fp32's range, greedy id "
               "%d %s fp32's top 5\n", p, int8, err8 / range, top8, in_top5 ? "in" : "NOT in");
        if (cpu_int8_supported()) {
            assert_int_equal(int8, 7 * c->num_layers + 1);
            assert_true(err8 > 0.0 && err8 / range < 0.1);
            assert_true(in_top5);
        } else {
            assert_int_equal(int8, 0);
            assert_memory_equal(logits8, logits, (size_t)V * sizeof(float));
        }
        free(logits8);
        mt_kv_decoder_free(d8);

        /* greedy generation: 40 tokens, EOS not stopping the run (as the reference) */
        int n_gen = new_tokens(n_ref);
        mt_generate_options opt = {.max_new_tokens = n_gen, .fp32 = 1};
        mt_generation gen;
        if (mt_generate(m, NULL, prompt, n_prompt, &opt, &gen, &err)) fail_msg("%s", err.msg);
        assert_int_equal(gen.n_ids, n_gen);
        int match = 0;
        while (match < n_gen && gen.ids[match] == ref_ids[match]) match++;
        double tok_s = (gen.n_ids - 1) / gen.decode_seconds;
        tok_s_sum += tok_s;
        printf("  prompt %zu: %d prompt tokens, top-5 logits max rel err %.2e, greedy %d/%d tokens "
               "match; prefill %.0f tok/s, generation %.1f tok/s\n",
               p, n_prompt, worst, match, n_gen, n_prompt / gen.prefill_seconds, tok_s);
        assert_true(match >= (n_gen < 32 ? n_gen : 32));

        if (p == 0) {
            /* the cache against a full forward over prompt + generated tokens */
            int n_all = n_prompt + n_gen;
            int32_t *all = malloc((size_t)n_all * sizeof *all);
            memcpy(all, prompt, (size_t)n_prompt * sizeof *all);
            memcpy(all + n_prompt, gen.ids, (size_t)n_gen * sizeof *all);
            float *full = full_logits(m, all, n_all);
            double cache_err = mt_test_rel_err(logits, full + (size_t)(n_prompt - 1) * V, (size_t)V);
            for (int t = n_prompt; t < n_all - 1; t++) {
                if (mt_kv_decoder_feed(d, 0, &all[t], 1, logits, &err)) fail_msg("%s", err.msg);
                double e = mt_test_rel_err(logits, full + (size_t)t * V, (size_t)V);
                if (e > cache_err) cache_err = e;
            }
            printf("  KV cache vs full forward over %d positions: max rel err %.2e\n",
                   n_all - n_prompt, cache_err);
            assert_true(cache_err < 1e-4);
            free(full);
            free(all);

            /* streaming, EOS and stop strings on the same prompt */
            int32_t eos = mt_tokenizer_eos(tok);
            streamed s = {.len = 0};
            mt_generate_options o2 = {.max_new_tokens = 16, .stop_ids = &eos, .n_stop_ids = 1,
                                      .on_text = collect, .user = &s, .fp32 = 1};
            mt_generation g2;
            if (mt_generate(m, tok, prompt, n_prompt, &o2, &g2, &err)) fail_msg("%s", err.msg);
            printf("  streamed: \"%s\" (%d pieces)\n", s.buf, s.calls);
            assert_int_equal(g2.reason, MT_STOP_EOS);
            assert_int_equal(g2.ids[g2.n_ids - 1], eos);
            assert_string_equal(g2.text, "The capital of France is Paris.");
            assert_string_equal(s.buf, g2.text);
            mt_generation_free(&g2);
            const char *stop = "Paris";
            streamed s3 = {.len = 0};
            mt_generate_options o3 = {.max_new_tokens = 16, .stop_strings = &stop,
                                      .n_stop_strings = 1, .on_text = collect, .user = &s3,
                                      .fp32 = 1};
            if (mt_generate(m, tok, prompt, n_prompt, &o3, &g2, &err)) fail_msg("%s", err.msg);
            assert_int_equal(g2.reason, MT_STOP_STRING);
            assert_string_equal(g2.text, "The capital of France is ");
            assert_string_equal(s3.buf, g2.text);
            mt_generation_free(&g2);
        }
        kept_prompt[p] = prompt;
        kept_n[p] = n_prompt;
        kept_gen[p] = gen.ids;
        kept_gen_n[p] = gen.n_ids;
        gen.ids = NULL;
        mt_generation_free(&gen);
        mt_kv_decoder_free(d);
        free(ref_ids);
        mt_token_list_free(&list);
        free(text);
    }
    printf("  SmolLM2-135M generation: %.1f tokens/s (mean of 3 prompts, %d threads)\n",
           tok_s_sum / 3.0, be.num_threads);
    /* the 3 prompts batched in 2 slots: the same greedy ids as one by one */
    mt_generate_options bopt = {.max_new_tokens = kept_gen_n[0], .fp32 = 1};
    mt_generation batch[3];
    double t_batch = mt_now_seconds();
    if (mt_generate_batch(m, NULL, (const int32_t *const *)kept_prompt, kept_n, 3, 2, &bopt, batch,
                          &err))
        fail_msg("%s", err.msg);
    t_batch = mt_now_seconds() - t_batch;
    int new_ids = 0;
    for (int p = 0; p < 3; p++) {
        assert_int_equal(batch[p].n_ids, kept_gen_n[p]);
        assert_memory_equal(batch[p].ids, kept_gen[p], (size_t)kept_gen_n[p] * sizeof(int32_t));
        new_ids += batch[p].n_ids;
        mt_generation_free(&batch[p]);
        free(kept_prompt[p]);
        free(kept_gen[p]);
    }
    printf("  batched (3 prompts, 2 slots): the same %d greedy ids, %.1f tokens/s overall\n",
           new_ids, new_ids / t_batch);
    free(logits);
    json_decref(ref);
    mt_tokenizer_free(tok);
    mt_model_free(m);
    mt_backend_cpu_shutdown(&be);
}

static mt_model *load_tiny(mt_backend *be) {
    mt_error err = {0};
    assert_int_equal(mt_backend_cpu_init(be, 0, &err), MT_OK);
    mt_model *m = NULL;
    if (mt_model_load_hf(GQA_DIR, be, &m, &err)) fail_msg("%s", err.msg);
    return m;
}

static void test_tiny_prefill_and_steps_match_forward(void **state) {
    (void)state;
    mt_backend be;
    mt_model *m = load_tiny(&be);
    mt_error err = {0};
    const int T = 23, V = m->cfg.vocab_size;
    int32_t ids[23];
    uint64_t rng = 11;
    for (int i = 0; i < T; i++) ids[i] = (int32_t)(mt_test_rand_u64(&rng) % (uint64_t)V);
    float *full = full_logits(m, ids, T);
    float *logits = malloc((size_t)V * sizeof(float));
    /* prefill of the whole sequence in chunks of 5 rows */
    mt_kv_decoder *d = NULL;
    assert_int_equal(mt_kv_decoder_create(m, 1, T, 5, &d, &err), MT_OK);
    assert_int_equal(mt_kv_decoder_feed(d, 0, ids, T, logits, &err), MT_OK);
    double e = mt_test_rel_err(logits, full + (size_t)(T - 1) * V, (size_t)V);
    printf("  tiny_gqa prefill vs forward: %.2e\n", e);
    assert_true(e < 1e-5);
    /* a full cache refuses more */
    assert_int_equal(mt_kv_decoder_feed(d, 0, ids, 1, logits, &err), MT_ERR_INVALID_ARG);
    /* then token by token after a 7-token prefill */
    mt_kv_decoder_reset(d, 0);
    assert_int_equal(mt_kv_decoder_feed(d, 0, ids, 7, logits, &err), MT_OK);
    double worst = mt_test_rel_err(logits, full + 6 * (size_t)V, (size_t)V);
    for (int t = 7; t < T; t++) {
        assert_int_equal(mt_kv_decoder_feed(d, 0, &ids[t], 1, logits, &err), MT_OK);
        e = mt_test_rel_err(logits, full + (size_t)t * V, (size_t)V);
        if (e > worst) worst = e;
    }
    printf("  tiny_gqa token-by-token vs forward: %.2e\n", worst);
    assert_true(worst < 1e-5);
    assert_int_equal(mt_kv_decoder_length(d, 0), T);
    int32_t bad = V;
    mt_kv_decoder_reset(d, 0);
    assert_int_equal(mt_kv_decoder_feed(d, 0, &bad, 1, logits, &err), MT_ERR_INVALID_ARG);
    mt_kv_decoder_free(d);
    free(logits);
    free(full);
    mt_model_free(m);
    mt_backend_cpu_shutdown(&be);
}

/* Int8 weight products in the decoder: used where the CPU has them (every projection),
 * close to fp32 but not its bits, only while the decoder runs (the model's projections
 * are left as training needs them), and not at all with opt.fp32. */
static void test_int8_decoding(void **state) {
    (void)state;
    mt_backend be;
    mt_model *m = load_tiny(&be);
    mt_error err = {0};
    const int T = 19, V = m->cfg.vocab_size;
    const int projections = 7 * m->cfg.num_layers + 1;
    int32_t ids[19];
    uint64_t rng = 5;
    for (int i = 0; i < T; i++) ids[i] = (int32_t)(mt_test_rand_u64(&rng) % (uint64_t)V);
    mt_kv_decoder *d32 = NULL, *d8 = NULL;
    assert_int_equal(mt_kv_decoder_create(m, 2, T, 0, &d32, &err), MT_OK);
    assert_int_equal(mt_kv_decoder_create(m, 2, T, 0, &d8, &err), MT_OK);
    const int made = mt_kv_decoder_use_int8(d8);
    float *a = malloc((size_t)V * sizeof(float)), *b = malloc((size_t)V * sizeof(float));
    assert_non_null(a);
    assert_non_null(b);
    double worst = 0.0;
    int same_bits = 1;
    for (int t = 0; t < T; t += t == 0 ? 7 : 1) { /* a prefill of 7, then one at a time */
        const int n = t == 0 ? 7 : 1;
        assert_int_equal(mt_kv_decoder_feed(d32, 0, ids + t, n, a, &err), MT_OK);
        assert_int_equal(mt_kv_decoder_feed(d8, 0, ids + t, n, b, &err), MT_OK);
        const double e = mt_test_rel_err(b, a, (size_t)V);
        worst = e > worst ? e : worst;
        same_bits = same_bits && !memcmp(a, b, (size_t)V * sizeof(float));
    }
    printf("  tiny_gqa: %d of %d projections in int8; logits within %.2e of fp32's\n", made,
           projections, worst);
    /* nothing of the decoder's stays on the model */
    for (int l = 0; l < m->cfg.num_layers; l++) {
        const mt_layer *ly = &m->layers[l];
        assert_true(!ly->q.weight_int8 && !ly->k.weight_int8 && !ly->v.weight_int8 &&
                    !ly->o.weight_int8 && !ly->gate.weight_int8 && !ly->up.weight_int8 &&
                    !ly->down.weight_int8);
    }
    assert_null(m->lm_head.weight_int8);
    const int32_t prompt[4] = {1, 17, 42, 5};
    mt_generate_options opt = {.max_new_tokens = 3};
    mt_generation g;
    assert_int_equal(mt_generate(m, NULL, prompt, 4, &opt, &g, &err), MT_OK);
    const int default_int8 = g.int8;
    mt_generation_free(&g);
    opt.fp32 = 1;
    assert_int_equal(mt_generate(m, NULL, prompt, 4, &opt, &g, &err), MT_OK);
    assert_int_equal(g.int8, 0);
    mt_generation_free(&g);
    if (cpu_int8_supported()) {
        assert_int_equal(made, projections);
        assert_int_equal(default_int8, projections);
        assert_false(same_bits);
        assert_true(worst < 0.08); /* measured 3.9e-2: random weights, not a Q4 grid */
    } else {
        printf("  (this CPU has neither AVX512-VNNI nor AVX2 + FMA: the decoder stays fp32)\n");
        assert_int_equal(made, 0);
        assert_int_equal(default_int8, 0);
        assert_true(same_bits);
    }
    free(a);
    free(b);
    mt_kv_decoder_free(d32);
    mt_kv_decoder_free(d8);
    mt_model_free(m);
    mt_backend_cpu_shutdown(&be);
}

static void gen_ids(mt_model *m, const mt_sampling *s, int32_t *out, int n) {
    mt_error err = {0};
    const int32_t prompt[4] = {1, 17, 42, 5};
    mt_generate_options opt = {.max_new_tokens = n, .sampling = *s};
    mt_generation g;
    if (mt_generate(m, NULL, prompt, 4, &opt, &g, &err)) fail_msg("%s", err.msg);
    assert_int_equal(g.n_ids, n);
    memcpy(out, g.ids, (size_t)n * sizeof *out);
    mt_generation_free(&g);
}

static void test_sampling(void **state) {
    (void)state;
    mt_backend be;
    mt_model *m = load_tiny(&be);
    enum { N = 24 };
    int32_t greedy[N], a[N], b[N], c[N];
    gen_ids(m, &(mt_sampling){.temperature = 0.0f}, greedy, N);
    /* same seed, same output */
    mt_sampling s = {.temperature = 1.3f, .top_k = 30, .top_p = 0.95f, .seed = 7};
    gen_ids(m, &s, a, N);
    gen_ids(m, &s, b, N);
    assert_memory_equal(a, b, sizeof a);
    s.seed = 8;
    gen_ids(m, &s, c, N);
    assert_true(memcmp(a, c, sizeof a) != 0); /* another seed draws otherwise (24 draws) */
    /* top_k 1 and a vanishing nucleus are greedy whatever the temperature */
    gen_ids(m, &(mt_sampling){.temperature = 2.0f, .top_k = 1, .seed = 3}, a, N);
    assert_memory_equal(a, greedy, sizeof a);
    gen_ids(m, &(mt_sampling){.temperature = 2.0f, .top_p = 1e-6f, .seed = 3}, a, N);
    assert_memory_equal(a, greedy, sizeof a);
    gen_ids(m, &(mt_sampling){.temperature = -1.0f, .top_k = 50, .seed = 3}, a, N);
    assert_memory_equal(a, greedy, sizeof a);

    /* the draw follows the distribution: p = (1/8, 3/8, 4/8) */
    float logits[3];
    void *work = malloc(mt_sample_work_bytes(3));
    int count[3] = {0};
    uint64_t rng = 5;
    for (int i = 0; i < 8000; i++) {
        logits[0] = logf(1.0f);
        logits[1] = logf(3.0f);
        logits[2] = logf(4.0f);
        count[mt_sample(logits, 3, &(mt_sampling){.temperature = 1.0f}, &rng, work)]++;
    }
    assert_true(abs(count[0] - 1000) < 150 && abs(count[1] - 3000) < 200 && abs(count[2] - 4000) < 200);
    /* top_p 0.6: tokens 2 (0.5) and 1 (the probability above it is 0.5 < 0.6) */
    count[0] = count[1] = count[2] = 0;
    for (int i = 0; i < 4000; i++) {
        logits[0] = logf(1.0f);
        logits[1] = logf(3.0f);
        logits[2] = logf(4.0f);
        count[mt_sample(logits, 3, &(mt_sampling){.temperature = 1.0f, .top_p = 0.6f}, &rng, work)]++;
    }
    assert_int_equal(count[0], 0);
    assert_true(abs(count[1] - 4000 * 3 / 7) < 200);
    /* top_k 2 the same */
    count[0] = count[1] = count[2] = 0;
    for (int i = 0; i < 4000; i++) {
        logits[0] = logf(1.0f);
        logits[1] = logf(3.0f);
        logits[2] = logf(4.0f);
        count[mt_sample(logits, 3, &(mt_sampling){.temperature = 1.0f, .top_k = 2}, &rng, work)]++;
    }
    assert_int_equal(count[0], 0);
    assert_true(abs(count[1] - 4000 * 3 / 7) < 200);
    free(work);
    mt_model_free(m);
    mt_backend_cpu_shutdown(&be);
}


/* ---- several sequences: the decoder's slots and batched generation ---- */

/* A decoder of 5 slots whose rows chunk by 4: prefills of different lengths, then
 * steps over subsets of the slots in shuffled order (a step of 5 rows runs as 4 + 1),
 * and a slot reset and refilled mid-way. Each row's logits agree with a one-slot
 * decoder fed the same tokens within a relative error of 1e-5 (the largest absolute
 * difference over the largest logit: the k-row matrix product may round otherwise
 * than the one-row product). */
static void test_decoder_step_matches_single_slot(void **state) {
    (void)state;
    mt_backend be;
    mt_model *m = load_tiny(&be);
    mt_error err = {0};
    enum { S = 5, CAP = 40, STEPS = 9 };
    const int V = m->cfg.vocab_size, len[S] = {3, 9, 1, 6, 12};
    uint64_t rng = 21;
    int32_t ids[S][CAP];
    for (int s = 0; s < S; s++)
        for (int t = 0; t < CAP; t++) ids[s][t] = (int32_t)(mt_test_rand_u64(&rng) % (uint64_t)V);
    mt_kv_decoder *d = NULL, *one[S] = {0};
    assert_int_equal(mt_kv_decoder_create(m, S, CAP, 4, &d, &err), MT_OK);
    assert_int_equal(mt_kv_decoder_slots(d), S);
    assert_int_equal(mt_kv_decoder_capacity(d), CAP);
    float *logits = malloc((size_t)S * V * sizeof(float)), *ref = malloc((size_t)V * sizeof(float));
    double worst = 0.0;
    int pos[S], rows_checked = 0;
    for (int s = 0; s < S; s++) {
        assert_int_equal(mt_kv_decoder_create(m, 1, CAP, 4, &one[s], &err), MT_OK);
        assert_int_equal(mt_kv_decoder_feed(d, s, ids[s], len[s], logits, &err), MT_OK);
        assert_int_equal(mt_kv_decoder_feed(one[s], 0, ids[s], len[s], ref, &err), MT_OK);
        double e = mt_test_rel_err(logits, ref, (size_t)V);
        if (e > worst) worst = e;
        pos[s] = len[s];
        assert_int_equal(mt_kv_decoder_length(d, s), len[s]);
    }
    /* the slots of each step, in the order given; -1 ends a list */
    static const int order[STEPS][S + 1] = {
        {4, 0, 2, -1},    {0, 1, 2, 3, 4, -1}, {3, 1, 4, 0, 2, -1}, {2, -1},       {1, 3, -1},
        {4, 3, 2, 1, 0, -1}, {0, 2, 4, -1},    {1, 0, -1},          {3, 4, 2, 0, 1, -1}};
    for (int step = 0; step < STEPS; step++) {
        if (step == 4) { /* slot 2 starts over with another prompt */
            mt_kv_decoder_reset(d, 2);
            mt_kv_decoder_reset(one[2], 0);
            assert_int_equal(mt_kv_decoder_length(d, 2), 0);
            for (int t = 0; t < CAP; t++) ids[2][t] = (int32_t)((ids[2][t] * 7 + 3) % V);
            assert_int_equal(mt_kv_decoder_feed(d, 2, ids[2], 5, logits, &err), MT_OK);
            assert_int_equal(mt_kv_decoder_feed(one[2], 0, ids[2], 5, ref, &err), MT_OK);
            double e = mt_test_rel_err(logits, ref, (size_t)V);
            if (e > worst) worst = e;
            pos[2] = 5;
        }
        int slots[S], k = 0;
        int32_t toks[S];
        for (; order[step][k] >= 0; k++) {
            slots[k] = order[step][k];
            toks[k] = ids[slots[k]][pos[slots[k]]];
        }
        assert_int_equal(mt_kv_decoder_step(d, slots, toks, k, logits, &err), MT_OK);
        for (int r = 0; r < k; r++) {
            const int s = slots[r];
            assert_int_equal(mt_kv_decoder_feed(one[s], 0, &toks[r], 1, ref, &err), MT_OK);
            double e = mt_test_rel_err(logits + (size_t)r * V, ref, (size_t)V);
            if (e > worst) worst = e;
            pos[s]++;
            rows_checked++;
            assert_int_equal(mt_kv_decoder_length(d, s), pos[s]);
        }
    }
    /* a mixed append: slot 1 takes 3 tokens, slot 0 two, slot 3 one, interleaved; the
     * logits of the rows marked, in row order (6 rows run as 4 + 2) */
    {
        const int ms[6] = {1, 3, 1, 0, 1, 0};
        const int ahead[6] = {0, 0, 1, 0, 2, 1}; /* the row's place among its slot's rows */
        const unsigned char want[6] = {0, 1, 0, 0, 1, 1};
        int32_t mt[6];
        for (int r = 0; r < 6; r++) mt[r] = ids[ms[r]][pos[ms[r]] + ahead[r]];
        assert_int_equal(mt_kv_decoder_append(d, ms, mt, 6, want, logits, &err), MT_OK);
        int w = 0;
        for (int r = 0; r < 6; r++) {
            const int s = ms[r];
            assert_int_equal(mt[r], ids[s][pos[s]]);
            assert_int_equal(mt_kv_decoder_feed(one[s], 0, &mt[r], 1, ref, &err), MT_OK);
            pos[s]++;
            if (!want[r]) continue;
            double e = mt_test_rel_err(logits + (size_t)w++ * V, ref, (size_t)V);
            if (e > worst) worst = e;
            rows_checked++;
        }
        for (int s = 0; s < S; s++) assert_int_equal(mt_kv_decoder_length(d, s), pos[s]);
    }
    printf("  5 slots, %d step rows vs one-slot decoders: max rel err %.2e\n", rows_checked, worst);
    assert_true(worst < 1e-5);

    /* refused steps change nothing */
    int32_t tok2[2] = {1, 2}, bad_tok[2] = {1, (int32_t)V};
    assert_int_equal(mt_kv_decoder_step(d, (int[]){1, 1}, tok2, 2, logits, &err), MT_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "twice"));
    assert_int_equal(mt_kv_decoder_step(d, (int[]){0, S}, tok2, 2, logits, &err), MT_ERR_INVALID_ARG);
    assert_int_equal(mt_kv_decoder_step(d, (int[]){0, -1}, tok2, 2, logits, &err), MT_ERR_INVALID_ARG);
    assert_int_equal(mt_kv_decoder_step(d, (int[]){0, 1}, bad_tok, 2, logits, &err), MT_ERR_INVALID_ARG);
    assert_int_equal(mt_kv_decoder_step(d, (int[]){0}, tok2, 0, logits, &err), MT_ERR_INVALID_ARG);
    assert_int_equal(mt_kv_decoder_step(d, (int[]){0, 1, 2, 3, 4, 0}, (int32_t[]){1, 1, 1, 1, 1, 1},
                                        S + 1, logits, &err),
                     MT_ERR_INVALID_ARG);
    assert_int_equal(mt_kv_decoder_feed(d, S, tok2, 1, logits, &err), MT_ERR_INVALID_ARG);
    for (int s = 0; s < S; s++) assert_int_equal(mt_kv_decoder_length(d, s), pos[s]);
    assert_int_equal(mt_kv_decoder_length(d, S), -1);
    /* a full slot refuses a step; the others still step (the marks were cleared) */
    int32_t fill[CAP] = {0};
    assert_int_equal(mt_kv_decoder_feed(d, 0, fill, CAP - pos[0], NULL, &err), MT_OK);
    assert_int_equal(mt_kv_decoder_step(d, (int[]){1, 0}, tok2, 2, logits, &err), MT_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "full"));
    assert_int_equal(mt_kv_decoder_step(d, (int[]){1, 3}, tok2, 2, logits, &err), MT_OK);
    assert_int_equal(mt_kv_decoder_length(d, 1), pos[1] + 1);
    mt_kv_decoder *none = NULL;
    assert_int_equal(mt_kv_decoder_create(m, 0, CAP, 4, &none, &err), MT_ERR_INVALID_ARG);
    assert_null(none);
    for (int s = 0; s < S; s++) mt_kv_decoder_free(one[s]);
    mt_kv_decoder_free(d);
    free(logits);
    free(ref);
    mt_model_free(m);
    mt_backend_cpu_shutdown(&be);
}

#define CHAT_DIR MT_FIXTURE_DIR "/tiny_chat"
enum { N_BATCH = 7 };

typedef struct batch_fixture {
    mt_backend be;
    mt_model *m;
    mt_tokenizer *tok;
    int32_t ids[N_BATCH][200];
    const int32_t *prompts[N_BATCH];
    int n_prompt[N_BATCH];
} batch_fixture;

/* tiny_chat (a tokenizer, so texts and stop strings) and 7 prompts of 1 .. 200 ids (the
 * longest is prefilled over two chunks of the batch, which take 128 prompt rows). */
static void batch_fixture_open(batch_fixture *f) {
    mt_error err = {0};
    assert_int_equal(mt_backend_cpu_init(&f->be, 0, &err), MT_OK);
    if (mt_model_load_hf(CHAT_DIR, &f->be, &f->m, &err)) fail_msg("%s", err.msg);
    if (mt_tokenizer_load_dir(CHAT_DIR, &f->tok, &err)) fail_msg("%s", err.msg);
    static const int lens[N_BATCH] = {5, 1, 17, 3, 200, 9, 12};
    uint64_t rng = 5;
    for (int i = 0; i < N_BATCH; i++) {
        for (int t = 0; t < lens[i]; t++)
            f->ids[i][t] = (int32_t)(3 + mt_test_rand_u64(&rng) % (uint64_t)(f->m->cfg.vocab_size - 3));
        f->prompts[i] = f->ids[i];
        f->n_prompt[i] = lens[i];
    }
}

static void batch_fixture_close(batch_fixture *f) {
    mt_tokenizer_free(f->tok);
    mt_model_free(f->m);
    mt_backend_cpu_shutdown(&f->be);
}

/* mt_generate_batch with `slots` gives what mt_generate gives per prompt (seed + i);
 * counts[reason] += the reasons seen. */
static void batch_vs_single(batch_fixture *f, const mt_generate_options *opt, int slots,
                            int counts[MT_STOP_REASONS]) {
    mt_error err = {0};
    mt_generation got[N_BATCH];
    if (mt_generate_batch(f->m, f->tok, f->prompts, f->n_prompt, N_BATCH, slots, opt, got, &err))
        fail_msg("%s", err.msg);
    for (int i = 0; i < N_BATCH; i++) {
        mt_generate_options one = *opt;
        one.sampling.seed = opt->sampling.seed + (uint64_t)i;
        one.expect = opt->expect ? &opt->expect[i] : NULL; /* mt_generate reads expect[0] */
        mt_generation want;
        if (mt_generate(f->m, f->tok, f->prompts[i], f->n_prompt[i], &one, &want, &err))
            fail_msg("%s", err.msg);
        assert_int_equal(got[i].n_prompt, f->n_prompt[i]);
        assert_int_equal(got[i].reason, want.reason);
        assert_int_equal(got[i].n_ids, want.n_ids);
        assert_memory_equal(got[i].ids, want.ids, (size_t)want.n_ids * sizeof(int32_t));
        /* log-probabilities only when asked for, the same from both */
        assert_int_equal(got[i].logps != NULL, opt->logps != 0);
        assert_int_equal(want.logps != NULL, opt->logps != 0);
        if (opt->logps) {
            assert_memory_equal(got[i].logps, want.logps, (size_t)want.n_ids * sizeof(float));
            for (int t = 0; t < want.n_ids; t++) assert_true(want.logps[t] <= 0.0f);
        }
        assert_non_null(got[i].text);
        assert_int_equal(got[i].text_len, want.text_len);
        assert_string_equal(got[i].text, want.text);
        assert_true(got[i].prefill_seconds > 0.0 && got[i].decode_seconds >= 0.0);
        counts[got[i].reason]++;
        mt_generation_free(&want);
        mt_generation_free(&got[i]);
    }
}

/* Greedy (and seeded sampling, with log-probabilities) batched output equals mt_generate's,
 * token for token, with fewer slots than prompts (slots are refilled) and every stop
 * condition. */
static void test_batch_matches_generate(void **state) {
    (void)state;
    batch_fixture f;
    batch_fixture_open(&f);
    mt_error err = {0};
    int counts[MT_STOP_REASONS] = {0};
    /* max_new_tokens only: every sequence runs to the length */
    mt_generate_options opt = {.max_new_tokens = 10, .skip_special = 1};
    batch_vs_single(&f, &opt, 3, counts);
    assert_int_equal(counts[MT_STOP_LENGTH], N_BATCH);

    /* a stop id: the third greedy token of prompt 2 ends that one early */
    mt_generation g;
    if (mt_generate(f.m, f.tok, f.prompts[2], f.n_prompt[2], &opt, &g, &err)) fail_msg("%s", err.msg);
    int32_t stop_id = g.ids[2];
    /* a stop string: two ASCII characters from the middle of the first such text */
    mt_generation_free(&g);
    char stop_str[3] = "";
    for (int p = 0; p < N_BATCH && !stop_str[0]; p++) {
        if (mt_generate(f.m, f.tok, f.prompts[p], f.n_prompt[p], &opt, &g, &err)) fail_msg("%s", err.msg);
        for (size_t j = g.text_len / 2; j + 1 < g.text_len && !stop_str[0]; j++)
            if (g.text[j] > ' ' && g.text[j] < 0x7f && g.text[j + 1] > ' ' && g.text[j + 1] < 0x7f) {
                stop_str[0] = g.text[j];
                stop_str[1] = g.text[j + 1];
                printf("  stop id %d, stop string \"%s\" (from prompt %d's \"%s\")\n", stop_id,
                       stop_str, p, g.text);
            }
        mt_generation_free(&g);
    }
    assert_true(stop_str[0] != 0);
    memset(counts, 0, sizeof counts);
    mt_generate_options stops = opt;
    stops.stop_ids = &stop_id;
    stops.n_stop_ids = 1;
    batch_vs_single(&f, &stops, 3, counts);
    assert_true(counts[MT_STOP_EOS] >= 1);
    const char *strs[1] = {stop_str};
    stops.stop_strings = strs;
    stops.n_stop_strings = 1;
    stops.max_new_tokens = 14;
    memset(counts, 0, sizeof counts);
    batch_vs_single(&f, &stops, 2, counts);
    printf("  stops: %d length, %d stop id, %d stop string\n", counts[MT_STOP_LENGTH],
           counts[MT_STOP_EOS], counts[MT_STOP_STRING]);
    assert_true(counts[MT_STOP_EOS] >= 1 && counts[MT_STOP_STRING] >= 1);

    /* one slot, the default (16 > 7 prompts), no new tokens at all */
    memset(counts, 0, sizeof counts);
    batch_vs_single(&f, &opt, 1, counts);
    batch_vs_single(&f, &opt, 0, counts);
    mt_generate_options none = {.max_new_tokens = 0};
    batch_vs_single(&f, &none, 4, counts);
    assert_int_equal(counts[MT_STOP_LENGTH], 3 * N_BATCH);

    /* seeded sampling: sequence i draws as mt_generate does with seed + i */
    mt_generate_options sample = {.max_new_tokens = 12, .sampling = {.temperature = 1.5f, .top_k = 40, .top_p = 0.9f, .seed = 99}};
    batch_vs_single(&f, &sample, 3, counts);
    sample.logps = 1;
    batch_vs_single(&f, &sample, 3, counts);
    batch_fixture_close(&f);
}

/* mt_text_may_equal against Lua's trim-then-compare (tasks.exact_match). */
static void test_text_may_equal(void **state) {
    (void)state;
    static const struct {
        const char *text, *expected;
        int may;
    } cases[] = {
        {"", "{\"a\": 1}", 1},              /* nothing yet */
        {" \n\t", "{\"a\": 1}", 1},         /* whitespace only */
        {"{\"a", "{\"a\": 1}", 1},          /* a prefix */
        {"  {\"a\": 1}", "{\"a\": 1}", 1},  /* all of it, after leading whitespace */
        {"{\"a\": 1}\n \r", "{\"a\": 1}", 1}, /* and trailing whitespace */
        {"{\"a\": 1}\n x", "{\"a\": 1}", 0}, /* something after it */
        {"{\"a\": 1} ", "{\"a\": 1}2", 0},  /* whitespace where the reference goes on */
        {"{\"a\": 2", "{\"a\": 1}", 0},      /* a wrong character */
        {"{\"a\":  ", "{\"a\": 1}", 0},      /* inner whitespace counts */
        {"I'm", "{\"a\": 1}", 0},
        {"abc", "  \nabc\t ", 1},              /* the reference's whitespace is trimmed */
        {"ab", "  \nabc\t ", 1},
        {"abc\t", "  \nabc\t ", 1},
        {"x", " \n", 0},                        /* an empty reference: only whitespace */
        {"\v\f", "", 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const int got = mt_text_may_equal(cases[i].text, strlen(cases[i].text), cases[i].expected);
        if (got != cases[i].may)
            fail_msg("case %zu: \"%s\" against \"%s\": %d, want %d", i, cases[i].text,
                     cases[i].expected, got, cases[i].may);
    }
    /* len bounds the text: a NUL or anything past it is not read as text */
    assert_int_equal(mt_text_may_equal("abX", 2, "abc"), 1);
    assert_int_equal(mt_text_may_equal("abX", 3, "abc"), 0);
}

/* Expected texts end a sequence at its first token whose settled text cannot equal
 * them; batched and alone alike. A sequence expecting its own greedy answer runs as
 * without one; one expecting a text that differs from byte k on stops at the first
 * token that reaches byte k, and its text is that answer's beginning. */
static void test_batch_expected_texts(void **state) {
    (void)state;
    batch_fixture f;
    batch_fixture_open(&f);
    mt_error err = {0};
    mt_generate_options opt = {.max_new_tokens = 12, .skip_special = 1};
    mt_generation plain[N_BATCH];
    if (mt_generate_batch(f.m, f.tok, f.prompts, f.n_prompt, N_BATCH, 3, &opt, plain, &err))
        fail_msg("%s", err.msg);
    /* prompts 0, 3: their own answer (3 with whitespace around it); 1, 4, 6: the answer
     * with a byte changed in its middle; 2: the answer's first half then more; 5: none */
    char expected[N_BATCH][256];
    const char *expect[N_BATCH];
    size_t differs_at[N_BATCH];
    for (int i = 0; i < N_BATCH; i++) {
        const mt_generation *g = &plain[i];
        assert_true(g->text_len > 4 && g->text_len < 200);
        differs_at[i] = g->text_len;
        expect[i] = expected[i];
        if (i == 0) snprintf(expected[i], sizeof expected[i], "%s", g->text);
        else if (i == 3) snprintf(expected[i], sizeof expected[i], " \n%s\t", g->text);
        else if (i == 2) {
            differs_at[i] = g->text_len / 2;
            snprintf(expected[i], sizeof expected[i], "%.*s\x01tail", (int)differs_at[i], g->text);
        } else if (i == 5) expect[i] = NULL;
        else {
            differs_at[i] = g->text_len / 2;
            snprintf(expected[i], sizeof expected[i], "%s", g->text);
            expected[i][differs_at[i]] = '\x01'; /* no token of tiny_chat decodes to it */
        }
    }
    mt_generate_options with = opt;
    with.expect = expect;
    int counts[MT_STOP_REASONS] = {0};
    batch_vs_single(&f, &with, 3, counts); /* also mt_generate (expect[0] there) */
    mt_generation got[N_BATCH];
    if (mt_generate_batch(f.m, f.tok, f.prompts, f.n_prompt, N_BATCH, 2, &with, got, &err))
        fail_msg("%s", err.msg);
    for (int i = 0; i < N_BATCH; i++) {
        const mt_generation *g = &got[i], *p = &plain[i];
        if (differs_at[i] == p->text_len) { /* its own answer, or none: as without */
            assert_int_equal(g->reason, p->reason);
            assert_int_equal(g->n_ids, p->n_ids);
            assert_string_equal(g->text, p->text);
            continue;
        }
        assert_int_equal(g->reason, MT_STOP_MISMATCH);
        assert_true(g->n_ids < p->n_ids);
        assert_memory_equal(g->ids, p->ids, (size_t)g->n_ids * sizeof(int32_t));
        /* the last token crossed byte differs_at; the ones before had not */
        assert_true(g->text_len > differs_at[i]);
        assert_memory_equal(g->text, p->text, g->text_len);
        char *shorter = NULL;
        size_t shorter_len = 0;
        assert_int_equal(mt_tokenizer_decode(f.tok, g->ids, (size_t)g->n_ids - 1, 1, &shorter,
                                             &shorter_len, &err), MT_OK);
        /* judged on the settled text: a trailing U+FFFD may be bytes still being completed */
        size_t settled = shorter_len;
        if (settled >= 3 && !memcmp(shorter + settled - 3, "\xEF\xBF\xBD", 3)) settled -= 3;
        assert_true(settled <= differs_at[i]);
        assert_true(mt_text_may_equal(shorter, settled, expect[i]));
        assert_false(mt_text_may_equal(g->text, g->text_len, expect[i]));
        free(shorter);
    }
    printf("  expected texts: %d mismatches, %d run to their end\n", counts[MT_STOP_MISMATCH],
           N_BATCH - counts[MT_STOP_MISMATCH]);
    assert_int_equal(counts[MT_STOP_MISMATCH], 4);
    for (int i = 0; i < N_BATCH; i++) {
        mt_generation_free(&got[i]);
        mt_generation_free(&plain[i]);
    }
    /* expected texts need the text */
    mt_generation none;
    assert_int_equal(mt_generate(f.m, NULL, f.prompts[0], f.n_prompt[0], &with, &none, &err),
                     MT_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "tokenizer"));
    batch_fixture_close(&f);
}

/* Prompts that share their first 23 ids (a chat template's system turn): the batch
 * runs the prefix once and copies its keys and values into each slot, and still gives
 * what mt_generate gives per prompt. The copy itself: a prefix copied and continued
 * has the logits of the whole prompt fed into one slot. */
static void test_batch_shared_prefix(void **state) {
    (void)state;
    batch_fixture f;
    batch_fixture_open(&f);
    enum { PREFIX = 23 };
    for (int i = 0; i < N_BATCH; i++) {
        for (int t = f.n_prompt[i]; t < PREFIX + 1 + i; t++) /* long enough: new ids */
            f.ids[i][t] = (int32_t)(3 + (t * 31 + i * 7) % (f.m->cfg.vocab_size - 3));
        if (f.n_prompt[i] < PREFIX + 1) f.n_prompt[i] = PREFIX + 1 + i;
        memcpy(f.ids[i], f.ids[4], PREFIX * sizeof(int32_t)); /* prompt 4 has 200 ids */
    }
    f.ids[3][PREFIX] = f.ids[4][PREFIX]; /* one prompt shares one more id */
    int counts[MT_STOP_REASONS] = {0};
    mt_generate_options greedy = {.max_new_tokens = 9, .skip_special = 1};
    batch_vs_single(&f, &greedy, 3, counts);
    mt_generate_options sample = {.max_new_tokens = 9, .sampling = {.temperature = 1.2f, .seed = 7}};
    batch_vs_single(&f, &sample, 2, counts);
    assert_int_equal(counts[MT_STOP_LENGTH], 2 * N_BATCH);

    mt_error err = {0};
    const int V = f.m->cfg.vocab_size, n = f.n_prompt[2];
    mt_kv_decoder *d = NULL;
    assert_int_equal(mt_kv_decoder_create(f.m, 3, 64, 16, &d, &err), MT_OK);
    float *got = malloc((size_t)V * sizeof(float)), *want = malloc((size_t)V * sizeof(float));
    assert_non_null(got);
    assert_non_null(want);
    assert_int_equal(mt_kv_decoder_feed(d, 0, f.ids[2], PREFIX, NULL, &err), MT_OK);
    assert_int_equal(mt_kv_decoder_feed(d, 1, f.ids[0], 5, NULL, &err), MT_OK); /* overwritten */
    assert_int_equal(mt_kv_decoder_copy(d, 1, 0, PREFIX, &err), MT_OK);
    assert_int_equal(mt_kv_decoder_length(d, 1), PREFIX);
    assert_int_equal(mt_kv_decoder_feed(d, 1, f.ids[2] + PREFIX, n - PREFIX, got, &err), MT_OK);
    assert_int_equal(mt_kv_decoder_feed(d, 2, f.ids[2], n, want, &err), MT_OK);
    const double e = mt_test_rel_err(got, want, (size_t)V);
    printf("  prefix copied and continued against the whole prompt: rel err %.2e\n", e);
    assert_true(e < 1e-6);
    assert_int_equal(mt_kv_decoder_copy(d, 1, 0, PREFIX + 1, &err), MT_ERR_INVALID_ARG);
    assert_int_equal(mt_kv_decoder_copy(d, 3, 0, 1, &err), MT_ERR_INVALID_ARG);
    assert_int_equal(mt_kv_decoder_copy(d, 0, -1, 0, &err), MT_ERR_INVALID_ARG);
    free(got);
    free(want);
    mt_kv_decoder_free(d);
    batch_fixture_close(&f);
}

static int never(void *user, const char *piece, size_t len) {
    (void)user, (void)piece, (void)len;
    return 0;
}

static void test_batch_refuses_bad_arguments(void **state) {
    (void)state;
    batch_fixture f;
    batch_fixture_open(&f);
    mt_error err = {0};
    mt_generation out[N_BATCH];
    mt_generate_options opt = {.max_new_tokens = 4};
    assert_int_equal(mt_generate_batch(f.m, f.tok, f.prompts, f.n_prompt, 0, 2, &opt, out, &err),
                     MT_ERR_INVALID_ARG);
    assert_int_equal(mt_generate_batch(f.m, f.tok, f.prompts, f.n_prompt, -3, 2, &opt, out, &err),
                     MT_ERR_INVALID_ARG);
    /* an empty prompt, one too long, an id outside the vocabulary: the error names it */
    int n_prompt[N_BATCH];
    memcpy(n_prompt, f.n_prompt, sizeof n_prompt);
    n_prompt[3] = 0;
    assert_int_equal(mt_generate_batch(f.m, f.tok, f.prompts, n_prompt, N_BATCH, 2, &opt, out, &err),
                     MT_ERR_INVALID_ARG);
    printf("  %s\n", err.msg);
    assert_non_null(strstr(err.msg, "prompts[3]"));
    assert_non_null(strstr(err.msg, "empty"));
    n_prompt[3] = f.m->cfg.max_position_embeddings;
    assert_int_equal(mt_generate_batch(f.m, f.tok, f.prompts, n_prompt, N_BATCH, 2, &opt, out, &err),
                     MT_ERR_INVALID_ARG);
    int32_t bad[2] = {1, (int32_t)f.m->cfg.vocab_size};
    const int32_t *prompts[N_BATCH];
    memcpy(prompts, f.prompts, sizeof prompts);
    prompts[5] = bad;
    n_prompt[3] = f.n_prompt[3];
    n_prompt[5] = 2;
    assert_int_equal(mt_generate_batch(f.m, f.tok, prompts, n_prompt, N_BATCH, 2, &opt, out, &err),
                     MT_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "prompts[5]"));
    assert_non_null(strstr(err.msg, "vocabulary"));
    /* streaming is refused */
    opt.on_text = never;
    assert_int_equal(mt_generate_batch(f.m, f.tok, f.prompts, f.n_prompt, N_BATCH, 2, &opt, out, &err),
                     MT_ERR_INVALID_ARG);
    printf("  %s\n", err.msg);
    assert_non_null(strstr(err.msg, "on_text"));
    for (int i = 0; i < N_BATCH; i++) assert_null(out[i].ids);
    opt.on_text = NULL;
    opt.max_new_tokens = -1;
    assert_int_equal(mt_generate_batch(f.m, f.tok, f.prompts, f.n_prompt, N_BATCH, 2, &opt, out, &err),
                     MT_ERR_INVALID_ARG);
    batch_fixture_close(&f);
}


/* ---- a GGUF writer for round trips: F32 tensors, llama.cpp's names and q/k order ---- */

typedef struct buf {
    unsigned char *p;
    size_t n, cap;
} buf;

static void put(buf *b, const void *data, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2;
        b->p = realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, data, n);
    b->n += n;
}
static void put_u32(buf *b, uint32_t v) { put(b, &v, 4); }
static void put_u64(buf *b, uint64_t v) { put(b, &v, 8); }
static void put_str(buf *b, const char *s) {
    put_u64(b, strlen(s));
    put(b, s, strlen(s));
}
static void kv_u32(buf *b, const char *arch, const char *key, uint32_t v) {
    char full[96];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    put_str(b, full);
    put_u32(b, 4); /* UINT32 */
    put_u32(b, v);
}
static void kv_f32(buf *b, const char *arch, const char *key, float v) {
    char full[96];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    put_str(b, full);
    put_u32(b, 6); /* FLOAT32 */
    put(b, &v, 4);
}

/* llama.cpp's tensor name of a Hugging Face parameter name */
static void gguf_name_of(const char *hf, char *out, size_t size) {
    static const char *map[][2] = {
        {"self_attn.q_proj", "attn_q"},   {"self_attn.k_proj", "attn_k"},
        {"self_attn.v_proj", "attn_v"},   {"self_attn.o_proj", "attn_output"},
        {"mlp.gate_proj", "ffn_gate"},    {"mlp.up_proj", "ffn_up"},
        {"mlp.down_proj", "ffn_down"},    {"input_layernorm", "attn_norm"},
        {"post_attention_layernorm", "ffn_norm"}};
    int layer, used = 0;
    if (!strcmp(hf, "model.embed_tokens.weight")) snprintf(out, size, "token_embd.weight");
    else if (!strcmp(hf, "model.norm.weight")) snprintf(out, size, "output_norm.weight");
    else if (!strcmp(hf, "lm_head.weight")) snprintf(out, size, "output.weight");
    else if (sscanf(hf, "model.layers.%d.%n", &layer, &used) == 1 && used) {
        for (size_t i = 0; i < sizeof map / sizeof map[0]; i++) {
            size_t n = strlen(map[i][0]);
            if (!strncmp(hf + used, map[i][0], n))
                snprintf(out, size, "blk.%d.%s.%s", layer, map[i][1], hf + used + n + 1);
        }
    }
}

/* Writes model m as a GGUF of architecture arch (llama: q/k rows permuted as
 * llama.cpp's converter does: row h*D + 2i + j <- row h*D + j*D/2 + i). */
static void write_gguf(const char *path, const mt_model *m, const char *arch, int permute) {
    const mt_model_config *c = &m->cfg;
    buf b = {0}, data = {0};
    put(&b, "GGUF", 4);
    put_u32(&b, 3);
    put_u64(&b, m->num_params);
    put_u64(&b, 11);
    put_str(&b, "general.architecture");
    put_u32(&b, 8); /* STRING */
    put_str(&b, arch);
    kv_u32(&b, arch, "embedding_length", (uint32_t)c->hidden_size);
    kv_u32(&b, arch, "feed_forward_length", (uint32_t)c->intermediate_size);
    kv_u32(&b, arch, "block_count", (uint32_t)c->num_layers);
    kv_u32(&b, arch, "attention.head_count", (uint32_t)c->num_heads);
    kv_u32(&b, arch, "attention.head_count_kv", (uint32_t)c->num_kv_heads);
    kv_u32(&b, arch, "attention.key_length", (uint32_t)c->head_dim);
    kv_u32(&b, arch, "attention.value_length", (uint32_t)c->head_dim);
    kv_u32(&b, arch, "context_length", (uint32_t)c->max_position_embeddings);
    kv_f32(&b, arch, "rope.freq_base", (float)c->rope_theta);
    kv_f32(&b, arch, "attention.layer_norm_rms_epsilon", c->rms_norm_eps);
    const int D = c->head_dim, half = D / 2;
    for (size_t i = 0; i < m->num_params; i++) {
        const mt_param *p = &m->params[i];
        char name[128] = "";
        gguf_name_of(p->name, name, sizeof name);
        put_str(&b, name);
        put_u32(&b, (uint32_t)p->ndim);
        if (p->ndim == 2) {
            put_u64(&b, (uint64_t)p->shape[1]);
            put_u64(&b, (uint64_t)p->shape[0]);
        } else {
            put_u64(&b, (uint64_t)p->shape[0]);
        }
        put_u32(&b, 0); /* F32 */
        put_u64(&b, data.n);
        size_t cols = p->ndim == 2 ? (size_t)p->shape[1] : 1;
        int is_q = strstr(name, "attn_q.") != NULL, is_k = strstr(name, "attn_k.") != NULL;
        if (permute && (is_q || is_k)) {
            int heads = is_q ? c->num_heads : c->num_kv_heads;
            for (int h = 0; h < heads; h++)
                for (int r = 0; r < D; r++) /* gguf row h*D + r, r = 2i + j */
                    put(&data, p->data + ((size_t)h * D + (size_t)(r % 2) * half + r / 2) * cols,
                        cols * sizeof(float));
        } else {
            put(&data, p->data, p->numel * sizeof(float));
        }
        while (data.n % 32) put(&data, "", 1);
    }
    while (b.n % 32) put(&b, "", 1);
    put(&b, data.p, data.n);
    mt_test_write_file(path, b.p, b.n);
    free(b.p);
    free(data.p);
}

/* HF directory -> GGUF -> mt_model_load_gguf gives the same parameters, bit for bit. */
static void roundtrip(const char *dir, const char *arch, int permute, int check_logits) {
    mt_error err = {0};
    mt_backend be;
    assert_int_equal(mt_backend_cpu_init(&be, 0, &err), MT_OK);
    mt_model *hf = NULL, *gg = NULL;
    if (mt_model_load_hf(dir, &be, &hf, &err)) fail_msg("%s", err.msg);
    char *tmp = mt_test_tmpdir("gguf");
    char path[512];
    snprintf(path, sizeof path, "%s/model.gguf", tmp);
    write_gguf(path, hf, arch, permute);
    if (mt_model_load_gguf(path, &be, &gg, &err)) fail_msg("%s", err.msg);
    assert_int_equal(gg->num_params, hf->num_params);
    assert_int_equal(gg->cfg.tie_word_embeddings, hf->cfg.tie_word_embeddings);
    assert_int_equal(gg->cfg.qkv_bias, hf->cfg.qkv_bias);
    for (size_t i = 0; i < hf->num_params; i++) {
        assert_string_equal(gg->params[i].name, hf->params[i].name);
        if (memcmp(gg->params[i].data, hf->params[i].data, hf->params[i].numel * sizeof(float)))
            fail_msg("%s differs after the GGUF round trip", hf->params[i].name);
    }
    if (check_logits) { /* same config too: the same logits through the decoder */
        /* 21 ids: past the cache's first block of 16 positions (tiny_bias has heads of
         * 12, not a multiple of 16, so the decoder's value sums take their other path) */
        enum { T = 21 };
        const int V = hf->cfg.vocab_size;
        int32_t ids[T];
        for (int t = 0; t < T; t++) ids[t] = (int32_t)((3 + 37 * t) % V);
        float *full = full_logits(hf, ids, T), *logits = malloc((size_t)V * sizeof(float));
        mt_kv_decoder *d = NULL;
        assert_int_equal(mt_kv_decoder_create(gg, 1, T, 0, &d, &err), MT_OK);
        assert_int_equal(mt_kv_decoder_feed(d, 0, ids, T, logits, &err), MT_OK);
        assert_true(mt_test_rel_err(logits, full + (T - 1) * (size_t)V, (size_t)V) < 1e-5);
        mt_kv_decoder_free(d);
        free(logits);
        free(full);
    }
    mt_model_free(gg);
    mt_model_free(hf);
    mt_test_rmtree(tmp);
    free(tmp);
    mt_backend_cpu_shutdown(&be);
}

static void test_gguf_roundtrip_llama_unpermutes_qk(void **state) {
    (void)state;
    roundtrip(GQA_DIR, "llama", 1, 0); /* tiny_gqa's llama3 rope has no GGUF metadata here */
}

static void test_gguf_roundtrip_qwen2_biases_untied(void **state) {
    (void)state;
    roundtrip(MT_FIXTURE_DIR "/tiny_bias", "qwen2", 0, 1);
}

static void test_gguf_errors(void **state) {
    (void)state;
    mt_error err = {0};
    mt_backend be;
    assert_int_equal(mt_backend_cpu_init(&be, 0, &err), MT_OK);
    mt_model *m = NULL;
    /* the small GGUF fixture has no llama metadata: the error names file and key */
    assert_int_not_equal(mt_model_load_gguf(MT_FIXTURE_DIR "/gguf/small.gguf", &be, &m, &err), MT_OK);
    assert_null(m);
    assert_non_null(strstr(err.msg, "small.gguf"));
    printf("  %s\n", err.msg);
    assert_int_not_equal(mt_model_load_gguf(MT_FIXTURE_DIR "/gguf/absent.gguf", &be, &m, &err), MT_OK);
    assert_non_null(strstr(err.msg, "absent.gguf"));
    mt_backend_cpu_shutdown(&be);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiny_prefill_and_steps_match_forward),
        cmocka_unit_test(test_int8_decoding),
        cmocka_unit_test(test_sampling),
        cmocka_unit_test(test_decoder_step_matches_single_slot),
        cmocka_unit_test(test_batch_matches_generate),
        cmocka_unit_test(test_batch_shared_prefix),
        cmocka_unit_test(test_text_may_equal),
        cmocka_unit_test(test_batch_expected_texts),
        cmocka_unit_test(test_batch_refuses_bad_arguments),
        cmocka_unit_test(test_gguf_errors),
        cmocka_unit_test(test_gguf_roundtrip_llama_unpermutes_qk),
        cmocka_unit_test(test_gguf_roundtrip_qwen2_biases_untied),
        cmocka_unit_test(test_smollm2_matches_transformers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
