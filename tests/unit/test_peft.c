/* test_peft.c — loading PEFT LoRA adapter directories (core/store/peft.c).
 *
 * - PEFT's own save_pretrained output (tests/fixtures/peft_adapter: r=4 alpha=8 on
 *   q/v/down_proj; peft_adapter_rslora: all-linear with use_rslora, saved as full module
 *   paths), made by tests/parity/make_peft_fixture.py, on tiny_gqa gives PEFT's logits
 *   (peft_adapter_reference.safetensors) within 1e-4 (max|diff| / max|ref|);
 * - round trip: lora with random non-zero A, B -> mt_export_peft -> a fresh model +
 *   mt_peft_attach gives the same logits bit for bit;
 * - bad directories are refused with the file and the key or tensor named, and the
 *   model is left without an adapter: peft_type PROMPT_TUNING, bias "all", malformed
 *   JSON, no adapter_model.safetensors, an extra tensor, a target outside the
 *   projections, a layer the model lacks; a missing tensor and a wrong shape are found
 *   by the adapter's load, after the attach (ABI 2 has no detach): the instance comes
 *   back with no weight of the file written;
 * - QLoRA saves PEFT's LoRA format: read back through "lora" its A and B are equal bit
 *   for bit, and through "qlora" by name the logits are;
 * - the adapter is chosen by name or, unnamed, by the plugins that can load the format:
 *   "full" (no import_options) is refused by name. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "store/export_hf.h"
#include "base/internal.h"
#include "model/model.h"
#include "store/peft.h"
#include "plugin/registry.h"
#include "formats/safetensors.h"
#include "testutil.h"

#define GQA_DIR MT_FIXTURE_DIR "/tiny_gqa"
#define PEFT_DIR MT_FIXTURE_DIR "/peft_adapter"
#define PEFT_RS_DIR MT_FIXTURE_DIR "/peft_adapter_rslora"
#define PEFT_REF MT_FIXTURE_DIR "/peft_adapter_reference.safetensors"

static mt_backend be;
static mt_registry *reg;

static int setup(void **state) {
    (void)state;
    mt_error err = {0};
    const char *extra[] = {MT_BUILD_DIR "/plugins"};
    if (mt_backend_cpu_init(&be, 0, &err)) return -1;
    if (mt_registry_open(extra, 1, &reg, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return -1;
    }
    return 0;
}

static int teardown(void **state) {
    (void)state;
    mt_registry_close(reg);
    mt_backend_cpu_shutdown(&be);
    return 0;
}

static char *join(const char *dir, const char *name) {
    char *path = mt_path_join(dir, name, NULL);
    assert_non_null(path);
    return path;
}

static mt_model *load_gqa(void) {
    mt_error err = {0};
    mt_model *m = NULL;
    if (mt_model_load_hf(GQA_DIR, &be, &m, &err)) fail_msg("%s", err.msg);
    return m;
}

/* logits (B*T*V floats, caller frees) */
static float *logits_of(mt_model *m, const int32_t *tokens, int B, int T) {
    mt_error err = {0};
    if (mt_model_plan(m, B, T, 0, &err) || mt_model_forward(m, tokens, NULL, NULL, B, T, &err))
        fail_msg("%s", err.msg);
    float *out = malloc((size_t)B * T * m->cfg.vocab_size * sizeof(float));
    assert_non_null(out);
    if (mt_model_logits(m, 0, B * T, out, &err)) fail_msg("%s", err.msg);
    return out;
}

static void parity_case(const char *dir, const char *logits_name) {
    mt_error err = {0};
    mt_safetensors *ref = NULL;
    if (mt_st_open(PEFT_REF, &ref, &err)) fail_msg("%s", err.msg);
    const mt_st_tensor *tok = mt_st_find(ref, "tokens"), *lg = mt_st_find(ref, logits_name);
    assert_non_null(tok);
    assert_non_null(lg);
    const int B = (int)tok->shape[0], T = (int)tok->shape[1];
    mt_model *m = load_gqa();
    mt_plugin_instance *inst = NULL;
    if (mt_peft_attach(m, reg, NULL, dir, &inst, &err)) fail_msg("%s", err.msg);
    assert_non_null(inst);
    float *got = logits_of(m, tok->data, B, T);
    size_t n = (size_t)B * T * m->cfg.vocab_size;
    assert_int_equal(lg->nbytes, n * sizeof(float));
    double e = mt_test_rel_err(got, lg->data, n);
    mt_model_set_adapters_enabled(m, 0);
    float *base = logits_of(m, tok->data, B, T);
    double d = mt_test_rel_err(base, lg->data, n);
    printf("  %s: rel err vs PEFT %.3g (the base model differs by %.3g)\n", dir, e, d);
    assert_true(e <= 1e-4);
    assert_true(d > 1e-2); /* the adapter matters */
    free(base);
    free(got);
    mt_model_free(m);
    mt_plugin_instance_free(inst);
    mt_st_close(ref);
}

static void test_peft_parity(void **state) {
    (void)state;
    parity_case(PEFT_DIR, "logits");
    parity_case(PEFT_RS_DIR, "logits_rslora");
}

/* The GQA model with adapter `name` attached (options kv), in evaluation mode, its
 * parameters drawn uniformly from seed: an adapter with something in it to save. */
static mt_model *with_random_adapter(const char *name, const mt_kv *kv, size_t n_kv,
                                     uint64_t seed, mt_plugin_instance **inst) {
    mt_error err = {0};
    mt_model *m = load_gqa();
    const mt_plugin *p = mt_registry_find(reg, MT_PLUGIN_ADAPTER, name, &err);
    if (!p) fail_msg("%s", err.msg);
    if (mt_plugin_instantiate(p, kv, n_kv, inst, &err) ||
        mt_model_attach_adapter(m, (*inst)->desc->vtable, (*inst)->state, &err))
        fail_msg("%s", err.msg);
    mt_model_set_training(m, 0);
    for (size_t i = 0; i < m->num_extra; i++) {
        mt_param_view *v = &m->extra_params[i];
        mt_test_fill_uniform(v->value.data, (size_t)mt_tensor_numel(&v->value), &seed, -0.3f, 0.3f);
    }
    return m;
}

/* m's adapter exported as PEFT into <new temporary directory>/adapter (returned; *tmp
 * is the temporary directory, for mt_test_rmtree). */
static char *export_to_tmp(mt_model *m, mt_plugin_instance *inst, const char *tag, char **tmp) {
    mt_error err = {0};
    *tmp = mt_test_tmpdir(tag);
    char *dir = join(*tmp, "adapter");
    if (mt_export_peft(m, inst, NULL, dir, &err)) fail_msg("%s", err.msg);
    return dir;
}

/* A fresh tiny_gqa with the PEFT directory `dir` attached through the adapter `as`. */
static mt_model *attach_to_fresh(const char *dir, const char *as, mt_plugin_instance **inst) {
    mt_error err = {0};
    mt_model *m = load_gqa();
    if (mt_peft_attach(m, reg, as, dir, inst, &err)) fail_msg("%s", err.msg);
    assert_string_equal((*inst)->desc->name, as);
    return m;
}

static void test_peft_round_trip(void **state) {
    (void)state;
    const char *targets[] = {"k_proj", "o_proj", "up_proj"};
    mt_kv kv[] = {{.key = "r", .type = MT_KV_NUMBER, .number = 3},
                  {.key = "alpha", .type = MT_KV_NUMBER, .number = 5},
                  {.key = "use_rslora", .type = MT_KV_BOOL, .boolean = 1},
                  {.key = "target_modules", .type = MT_KV_LIST, .list = targets, .list_len = 3}};
    mt_plugin_instance *inst = NULL;
    mt_model *m = with_random_adapter("lora", kv, 4, 0x9EF7, &inst);
    enum { B = 2, T = 9 };
    int32_t tokens[B * T];
    for (int i = 0; i < B * T; i++) tokens[i] = (int32_t)((i * 29 + 3) % m->cfg.vocab_size);
    float *ref = logits_of(m, tokens, B, T);
    char *tmp;
    char *dir = export_to_tmp(m, inst, "peft_rt", &tmp);
    mt_plugin_instance *inst2 = NULL;
    mt_model *m2 = attach_to_fresh(dir, "lora", &inst2);
    assert_int_equal(m2->num_extra, m->num_extra);
    float *got = logits_of(m2, tokens, B, T);
    size_t n = (size_t)B * T * m->cfg.vocab_size;
    printf("  round trip: rel err %.3g\n", mt_test_rel_err(got, ref, n));
    assert_memory_equal(got, ref, n * sizeof(float));
    free(got);
    free(ref);
    mt_model_free(m2);
    mt_plugin_instance_free(inst2);
    mt_model_free(m);
    mt_plugin_instance_free(inst);
    mt_test_rmtree(tmp);
    free(dir);
    free(tmp);
}

/* QLoRA saves PEFT's LoRA format: the files hold its A and B as they are (read back
 * through "lora", every parameter equals the QLoRA instance's bit for bit), and loaded
 * back through "qlora" by name the 4-bit model gives the same logits bit for bit. */
static void test_peft_qlora_saves_lora(void **state) {
    (void)state;
    const char *targets[] = {"q_proj", "v_proj", "down_proj"};
    mt_kv kv[] = {{.key = "r", .type = MT_KV_NUMBER, .number = 2},
                  {.key = "alpha", .type = MT_KV_NUMBER, .number = 6},
                  {.key = "target_modules", .type = MT_KV_LIST, .list = targets, .list_len = 3}};
    mt_plugin_instance *inst = NULL;
    mt_model *m = with_random_adapter("qlora", kv, 3, 0x41F7, &inst);
    enum { B = 1, T = 8 };
    int32_t tokens[B * T];
    for (int i = 0; i < B * T; i++) tokens[i] = (int32_t)((i * 31 + 7) % m->cfg.vocab_size);
    float *ref = logits_of(m, tokens, B, T);
    char *tmp;
    char *dir = export_to_tmp(m, inst, "peft_qlora", &tmp);
    mt_plugin_instance *inst2 = NULL;
    mt_model *m2 = attach_to_fresh(dir, "lora", &inst2);
    assert_int_equal(m2->num_extra, m->num_extra);
    for (size_t i = 0; i < m->num_extra; i++) {
        const mt_param_view *a = &m->extra_params[i], *b = &m2->extra_params[i];
        assert_string_equal(a->name, b->name);
        assert_int_equal(mt_tensor_nbytes(&a->value), mt_tensor_nbytes(&b->value));
        assert_memory_equal(a->value.data, b->value.data, mt_tensor_nbytes(&a->value));
    }
    mt_plugin_instance *inst3 = NULL;
    mt_model *m3 = attach_to_fresh(dir, "qlora", &inst3);
    float *got = logits_of(m3, tokens, B, T);
    size_t n = (size_t)B * T * m->cfg.vocab_size;
    printf("  qlora round trip: rel err %.3g\n", mt_test_rel_err(got, ref, n));
    assert_memory_equal(got, ref, n * sizeof(float));
    free(got);
    free(ref);
    mt_model_free(m3);
    mt_plugin_instance_free(inst3);
    mt_model_free(m2);
    mt_plugin_instance_free(inst2);
    mt_model_free(m);
    mt_plugin_instance_free(inst);
    mt_test_rmtree(tmp);
    free(dir);
    free(tmp);
}

/* ---- bad directories ---- */

/* A copy of the fixture into tmp/<tag>: adapter_config.json with `from` replaced by
 * `to` (no edit when from is NULL); the safetensors written from the fixture's tensors,
 * minus the one named `drop`, with the one named `reshape` given shape (1, numel), plus
 * `extra` (a (1,1) tensor) when given; no safetensors at all when no_weights. */
static char *bad_dir(const char *tmp, const char *tag, const char *from, const char *to,
                     const char *drop, const char *reshape, const char *extra, int no_weights) {
    mt_error err = {0};
    char *dir = join(tmp, tag);
    assert_int_equal(mkdir(dir, 0755), 0);
    char *cfg = NULL;
    size_t cfg_len;
    if (mt_read_file(PEFT_DIR "/adapter_config.json", &cfg, &cfg_len, &err)) fail_msg("%s", err.msg);
    if (from) {
        const char *at = strstr(cfg, from);
        assert_non_null(at);
        size_t off = (size_t)(at - cfg), n = strlen(cfg) + strlen(to) + 1;
        char *edited = malloc(n);
        assert_non_null(edited);
        snprintf(edited, n, "%.*s%s%s", (int)off, cfg, to, cfg + off + strlen(from));
        free(cfg);
        cfg = edited;
    }
    char *path = join(dir, "adapter_config.json");
    mt_test_write_file(path, cfg, strlen(cfg));
    free(path);
    free(cfg);
    if (no_weights) return dir;
    mt_safetensors *st = NULL;
    if (mt_st_open(PEFT_DIR "/adapter_model.safetensors", &st, &err)) fail_msg("%s", err.msg);
    size_t n = mt_st_count(st), k = 0;
    mt_st_entry *e = calloc(n + 1, sizeof *e);
    assert_non_null(e);
    static const float one = 1.0f;
    for (size_t i = 0; i < n; i++) {
        const mt_st_tensor *t = mt_st_at(st, i);
        if (drop && !strcmp(t->name, drop)) continue;
        e[k] = (mt_st_entry){.name = t->name, .dtype = t->dtype, .ndim = 2,
                             .shape = {t->shape[0], t->shape[1]}, .data = t->data};
        if (reshape && !strcmp(t->name, reshape))
            e[k].shape[0] = 1, e[k].shape[1] = t->shape[0] * t->shape[1];
        k++;
    }
    if (extra)
        e[k++] = (mt_st_entry){.name = extra, .dtype = MT_ST_F32, .ndim = 2, .shape = {1, 1},
                               .data = &one};
    path = join(dir, "adapter_model.safetensors");
    if (mt_st_write(path, e, k, NULL, &err)) fail_msg("%s", err.msg);
    free(path);
    free(e);
    mt_st_close(st);
    return dir;
}

/* Refused with the file and `what` named. A refusal before the attach (the format, the
 * config, the tensors' names and modules) leaves *m without an adapter; one in the
 * adapter's load (after_attach: a tensor missing or misshapen for this model) hands the
 * attached instance back, with its initial weights: B = 0, so the model computes as the
 * base; then *m is replaced by a fresh model for the next case. */
static void expect_refused_at(mt_model **m, const char *dir, const char *file, const char *what,
                              int after_attach) {
    mt_error err = {0};
    mt_plugin_instance *inst = (mt_plugin_instance *)1;
    mt_status st = mt_peft_attach(*m, reg, NULL, dir, &inst, &err);
    printf("  refused%s: %s\n", after_attach ? " (after the attach)" : "", err.msg);
    assert_int_not_equal(st, MT_OK);
    if (!strstr(err.msg, file)) fail_msg("'%s' does not name %s", err.msg, file);
    if (!strstr(err.msg, what)) fail_msg("'%s' does not name %s", err.msg, what);
    if (!after_attach) {
        assert_null(inst);
        assert_int_equal((*m)->num_adapters, 0); /* nothing attached */
        assert_int_equal((*m)->num_extra, 0);
        return;
    }
    assert_non_null(inst);
    assert_int_equal((*m)->num_adapters, 1);
    /* no weight of the file was written: every lora_B is still zero */
    for (size_t i = 0; i < (*m)->num_extra; i++) {
        const mt_param_view *v = &(*m)->extra_params[i];
        if (!strstr(v->name, ".lora_B.")) continue;
        const float *b = v->value.data;
        for (int64_t k = 0; k < mt_tensor_numel(&v->value); k++)
            if (b[k] != 0.0f) fail_msg("%s[%lld] = %g was written", v->name, (long long)k, (double)b[k]);
    }
    mt_model_free(*m);
    mt_plugin_instance_free(inst);
    *m = load_gqa();
}

static void expect_refused(mt_model **m, const char *dir, const char *file, const char *what) {
    expect_refused_at(m, dir, file, what, 0);
}

static void test_peft_refusals(void **state) {
    (void)state;
    char *tmp = mt_test_tmpdir("peft_bad");
    mt_model *m = load_gqa();
    const char *A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    const char *B1 = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight";
    struct {
        const char *tag, *from, *to, *drop, *reshape, *extra;
        int no_weights;
        const char *file, *what;
    } cases[] = {
        {"prompt", "\"peft_type\": \"LORA\"", "\"peft_type\": \"PROMPT_TUNING\"", NULL, NULL, NULL,
         0, "adapter_config.json", "peft_type"},
        {"bias", "\"bias\": \"none\"", "\"bias\": \"all\"", NULL, NULL, NULL, 0,
         "adapter_config.json", "bias"},
        {"dora", "\"use_dora\": false", "\"use_dora\": true", NULL, NULL, NULL, 0,
         "adapter_config.json", "use_dora"},
        {"save", "\"modules_to_save\": null", "\"modules_to_save\": [\"lm_head\"]", NULL, NULL,
         NULL, 0, "adapter_config.json", "modules_to_save"},
        {"target", "\"down_proj\",", "\"lm_head\",", NULL, NULL, NULL, 0, "adapter_config.json",
         "lm_head"},
        {"json", "{", "{,", NULL, NULL, NULL, 0, "adapter_config.json", "line 1"},
        {"noweights", NULL, NULL, NULL, NULL, NULL, 1, "adapter_model.safetensors", "peft_bad"},
        {"missing", NULL, NULL, B1, NULL, NULL, 0, "adapter_model.safetensors", B1},
        {"shape", NULL, NULL, NULL, A0, NULL, 0, "adapter_model.safetensors", A0},
        {"extra", NULL, NULL, NULL, NULL, "base_model.model.model.layers.0.foo.lora_A.weight", 0,
         "adapter_model.safetensors", "model.layers.0.foo"},
        {"untargeted", NULL, NULL, NULL, NULL,
         "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", 0,
         "adapter_model.safetensors", "k_proj"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *dir = bad_dir(tmp, cases[i].tag, cases[i].from, cases[i].to, cases[i].drop,
                            cases[i].reshape, cases[i].extra, cases[i].no_weights);
        /* a missing tensor and a wrong shape need the attached adapter to be seen */
        const int after_attach = !strcmp(cases[i].tag, "missing") || !strcmp(cases[i].tag, "shape");
        expect_refused_at(&m, dir, cases[i].file, cases[i].what, after_attach);
        free(dir);
    }
    /* after all those refusals the model still takes the good adapter */
    mt_error err = {0};
    mt_plugin_instance *inst = NULL;
    if (mt_peft_attach(m, reg, NULL, PEFT_DIR, &inst, &err)) fail_msg("%s", err.msg);
    /* and refuses a second one */
    mt_plugin_instance *inst_full = NULL;
    mt_model *m3 = load_gqa();
    assert_int_not_equal(mt_peft_attach(m3, reg, "full", PEFT_DIR, &inst_full, &err), MT_OK);
    printf("  refused: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "adapter full"));
    assert_non_null(strstr(err.msg, "cannot load a PEFT adapter directory"));
    assert_null(inst_full);
    assert_int_equal(m3->num_adapters, 0);
    mt_model_free(m3);
    mt_plugin_instance *inst2 = NULL;
    assert_int_not_equal(mt_peft_attach(m, reg, NULL, PEFT_DIR, &inst2, &err), MT_OK);
    assert_null(inst2);
    mt_model_free(m);
    mt_plugin_instance_free(inst);
    mt_test_rmtree(tmp);
    free(tmp);
}

/* What the corpus found (tests/bad_input/cases/peft): a NaN in the adapter's weights
 * and another task's adapter were accepted, and a tensor for a layer the model does not
 * have, or for a projection outside target_modules, got one muddled message. */
static void test_peft_refusals_say_why(void **state) {
    (void)state;
    char *tmp = mt_test_tmpdir("peft_why");
    mt_model *m = load_gqa();
    const char *A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    struct {
        const char *tag, *from, *to, *extra, *what;
    } cases[] = {
        {"seqcls", "\"task_type\": \"CAUSAL_LM\"", "\"task_type\": \"SEQ_CLS\"", NULL,
         "task_type is \"SEQ_CLS\""},
        {"tasknum", "\"task_type\": \"CAUSAL_LM\"", "\"task_type\": 3", NULL,
         "task_type must be a string"},
        {"layer9", NULL, NULL, "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight",
         "this model has no parameter model.layers.9.*"},
        {"untargeted", NULL, NULL, "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight",
         "k_proj is not among the target_modules of adapter_config.json"},
        {"foo", NULL, NULL, "base_model.model.model.layers.0.mlp.foo.lora_B.weight",
         "model.layers.0.mlp.foo is not a projection LoRA can target"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *dir = bad_dir(tmp, cases[i].tag, cases[i].from, cases[i].to, NULL, NULL,
                            cases[i].extra, 0);
        expect_refused(&m, dir, cases[i].extra ? "adapter_model.safetensors" : "adapter_config.json",
                       cases[i].what);
        free(dir);
    }
    /* a NaN in lora_A of layer 0's q_proj: refused naming the file, tensor and index */
    mt_error err = {0};
    mt_safetensors *st = NULL;
    if (mt_st_open(PEFT_DIR "/adapter_model.safetensors", &st, &err)) fail_msg("%s", err.msg);
    size_t n = mt_st_count(st);
    mt_st_entry *e = calloc(n, sizeof *e);
    float *nan_copy = NULL;
    assert_non_null(e);
    for (size_t i = 0; i < n; i++) {
        const mt_st_tensor *t = mt_st_at(st, i);
        e[i] = (mt_st_entry){.name = t->name, .dtype = t->dtype, .ndim = 2,
                             .shape = {t->shape[0], t->shape[1]}, .data = t->data};
        if (!strcmp(t->name, A0)) {
            size_t numel = (size_t)(t->shape[0] * t->shape[1]);
            assert_int_equal(t->dtype, MT_ST_F32);
            nan_copy = malloc(numel * sizeof *nan_copy);
            assert_non_null(nan_copy);
            memcpy(nan_copy, t->data, numel * sizeof *nan_copy);
            nan_copy[5] = NAN;
            e[i].data = nan_copy;
        }
    }
    assert_non_null(nan_copy);
    char *dir = bad_dir(tmp, "nan", NULL, NULL, NULL, NULL, NULL, 1);
    char *path = join(dir, "adapter_model.safetensors");
    if (mt_st_write(path, e, n, NULL, &err)) fail_msg("%s", err.msg);
    expect_refused(&m, dir, "adapter_model.safetensors", A0);
    expect_refused(&m, dir, "adapter_model.safetensors", "non-finite value (the first, nan, at index 5");
    free(path);
    free(dir);
    free(nan_copy);
    free(e);
    mt_st_close(st);
    mt_model_free(m);
    mt_test_rmtree(tmp);
    free(tmp);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_peft_parity),
        cmocka_unit_test(test_peft_round_trip),
        cmocka_unit_test(test_peft_qlora_saves_lora),
        cmocka_unit_test(test_peft_refusals),
        cmocka_unit_test(test_peft_refusals_say_why),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
