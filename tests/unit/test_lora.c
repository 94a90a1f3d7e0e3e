/* test_lora.c — the lora and qlora adapter plugins.
 *
 * Through dlopen (MT_BUILD_DIR/plugins/{lora,qlora}.so) on tests/fixtures/tiny_gqa:
 * - lora against PEFT (tests/fixtures/lora/reference.safetensors, made by
 *   tests/parity/make_lora_reference.py): r=4, alpha=8, all-linear, A and B set to
 *   the reference's values: logits and loss within 1e-5, every lora_A / lora_B
 *   gradient within 1e-4 (relative to the tensor's largest reference magnitude),
 *   merge gives PEFT's merged weights within 1e-6 and the unmerged logits, unmerge
 *   gives back the base, set_enabled(0) gives the base model's logits;
 * - lora's defaults: PEFT's initialisation (A uniform in ±1/sqrt(in), B zero), seeds;
 * - dropout: gradients by central differences with the masks held fixed; the
 *   checkpoint state (the dropout passes) makes a second adapter draw the masks the
 *   first one would have drawn next (what a resumed run relies on);
 * - qlora equals lora on the dequantized weights (logits within 1e-5, gradients 1e-4),
 *   on tiny_gqa and on tiny_bias (q/k/v biases, untied lm_head); merge / unmerge;
 *   the bytes per parameter of the quantized storage, measured and printed;
 * - projections of one input in one call (forward_shared, backward_shared: LoRA's
 *   down-projections of q, k, v and of gate, up as one product) against the same
 *   adapter with each projection alone: logits and gradients within 1e-5, for lora,
 *   qlora, a group with a projection between its members (qlora's k without a branch),
 *   and with dropout, whose masks differ per projection: the same bits in training.
 *
 * White-box (qlora.c is included here, so its static functions are reachable):
 * - NF4 with double quantization against bitsandbytes (tests/fixtures/nf4, made by
 *   bitsandbytes itself): packed codes, 8-bit absmax codes, state2's absmax and the
 *   dynamic map byte-identical; the offset within one ulp (the plugin takes the
 *   correctly rounded mean, bitsandbytes torch's fp32 mean: see qlora.c); dequantized
 *   values (through the plugin's device tensors and host->dequantize_4bit)
 *   bit-identical given the same offset;
 * - the tiled paths (rows of the weight and of x in tiles) against a plain double
 *   computation, with dropout, on shapes where the tiny models never tile.
 *
 * Plugin tensors live on the model's device: the tests read and write them through
 * the host's tensor_download / tensor_upload, as the core would on any device. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "plugin/registry.h"
#include "formats/safetensors.h"
#include "testutil.h"

#include "../../plugins/adapter/qlora.c"

#define GQA_DIR MT_FIXTURE_DIR "/tiny_gqa"
#define BIAS_DIR MT_FIXTURE_DIR "/tiny_bias"
#define LORA_REF MT_FIXTURE_DIR "/lora/reference.safetensors"
#define NF4_REF MT_FIXTURE_DIR "/nf4/reference.safetensors"

/* ---- helpers ---- */

static const uint8_t *read_u8(const mt_safetensors *st, const char *name, size_t *n) {
    const mt_st_tensor *t = mt_st_find(st, name);
    if (!t) fail_msg("reference tensor %s missing", name);
    assert_int_equal(t->dtype, MT_ST_U8);
    *n = t->nbytes;
    return t->data;
}

static const mt_host *H(void) { return mt_host_table(); }

/* A host copy of a tensor (F32), for comparisons; the caller frees it. */
static float *to_host(const mt_tensor *t) {
    size_t n = (size_t)mt_tensor_numel(t);
    float *out = malloc(n * sizeof(float) + 1);
    assert_non_null(out);
    mt_error err = {0};
    if (H()->tensor_download(out, t, &err)) fail_msg("%s", err.msg);
    return out;
}

static void from_host(mt_tensor *t, const float *src) {
    mt_error err = {0};
    if (H()->tensor_upload(t, src, &err)) fail_msg("%s", err.msg);
}

/* No host operation failed since the last check. */
static void ops_ok(void) {
    mt_error err = {0};
    if (H()->check(&err)) fail_msg("%s", err.msg);
}

/* A CPU tensor over memory the test owns (core internals: weights, fixtures). */
static mt_tensor cpu_f32(float *data, int64_t rows, int64_t cols) {
    return (mt_tensor){.dtype = MT_F32, .device = MT_DEVICE_CPU, .ndim = 2, .shape = {rows, cols},
                       .data = data};
}

typedef struct run {
    mt_backend be;
    mt_model *model;
    mt_plugin *plugin;
    mt_plugin_instance *inst;
    const mt_adapter_vtable *vt;
    int B, T, V;
    int32_t tokens[64], targets[64];
} run;

/* Loads a model directory and attaches adapter `name` with the given options. */
static void run_open(run *r, const char *dir, const char *name, const mt_kv *kv, size_t n_kv,
                     const mt_safetensors *batch) {
    memset(r, 0, sizeof *r);
    mt_error err = {0};
    assert_int_equal(mt_backend_cpu_init(&r->be, 0, &err), MT_OK);
    if (mt_model_load_hf(dir, &r->be, &r->model, &err)) fail_msg("%s", err.msg);
    if (name) {
        r->plugin = mt_test_load_plugin(name);
        if (mt_plugin_instantiate(r->plugin, kv, n_kv, &r->inst, &err)) fail_msg("%s", err.msg);
        r->vt = r->inst->desc->vtable;
        if (mt_model_attach_adapter(r->model, r->vt, r->inst->state, &err))
            fail_msg("%s", err.msg);
    }
    const mt_st_tensor *tok = mt_st_find(batch, "tokens"), *tgt = mt_st_find(batch, "targets");
    assert_non_null(tok);
    assert_non_null(tgt);
    r->B = (int)tok->shape[0];
    r->T = (int)tok->shape[1];
    r->V = r->model->cfg.vocab_size;
    assert_true(tok->nbytes <= sizeof r->tokens);
    memcpy(r->tokens, tok->data, tok->nbytes);
    memcpy(r->targets, tgt->data, tgt->nbytes);
    if (mt_model_plan(r->model, r->B, r->T, 5, &err)) fail_msg("%s", err.msg);
}

static void run_close(run *r) {
    mt_plugin_instance_free(r->inst);
    if (r->plugin) mt_plugin_unload(r->plugin);
    mt_model_free(r->model);
    mt_backend_cpu_shutdown(&r->be);
}

/* Forward (logits of every row into a new array), then loss and backward when asked. */
static float *run_step(run *r, int backward, float *loss) {
    mt_error err = {0};
    mt_model_zero_grad(r->model);
    if (mt_model_forward(r->model, r->tokens, NULL, NULL, r->B, r->T, &err))
        fail_msg("%s", err.msg);
    const int rows = r->B * r->T;
    float *logits = malloc((size_t)rows * r->V * sizeof(float));
    assert_non_null(logits);
    if (mt_model_logits(r->model, 0, rows, logits, &err)) fail_msg("%s", err.msg);
    float l = 0.0f;
    if (mt_model_cross_entropy(r->model, r->targets, backward, &l, NULL, &err))
        fail_msg("%s", err.msg);
    if (backward && mt_model_backward(r->model, &err)) fail_msg("%s", err.msg);
    if (loss) *loss = l;
    return logits;
}

static size_t logits_size(const run *r) { return (size_t)r->B * r->T * r->V; }

/* The adapter's registered parameters (the caller frees the array). */
static mt_param_view *adapter_params(run *r, size_t *n) {
    mt_param_view *all;
    size_t count;
    mt_error err = {0};
    assert_int_equal(mt_model_trainable_params(r->model, &all, &count, &err), MT_OK);
    *n = count;
    return all;
}

static mt_param_view *find_view(mt_param_view *v, size_t n, const char *name) {
    for (size_t i = 0; i < n; i++)
        if (!strcmp(v[i].name, name)) return &v[i];
    return NULL;
}

/* Sets every lora_A / lora_B of the run to the reference's init.<name>. */
static void set_from_reference(run *r, const mt_safetensors *ref, size_t expect) {
    mt_test_load_trainable(r->model, ref, "init.", expect);
}

/* Copies every adapter parameter value from run a to run b (same names). */
static void copy_adapter_values(run *a, run *b) {
    size_t na, nb;
    mt_param_view *va = adapter_params(a, &na), *vb = adapter_params(b, &nb);
    assert_int_equal(na, nb);
    for (size_t i = 0; i < na; i++) {
        mt_param_view *w = find_view(vb, nb, va[i].name);
        if (!w) fail_msg("%s missing in the second run", va[i].name);
        float *x = to_host(&va[i].value);
        from_host(&w->value, x);
        free(x);
    }
    free(va);
    free(vb);
}

static void check_rel(const char *what, const float *a, const float *ref, size_t n, double tol) {
    double e = mt_test_rel_err(a, ref, n);
    printf("  %-48s rel err %.3g\n", what, e);
    if (!(e <= tol)) fail_msg("%s: rel err %.3g > %.3g", what, e, tol);
}

static mt_linear *linear_named(mt_model *m, const char *name) {
    mt_model_handle *h = (mt_model_handle *)m;
    const mt_host *H = mt_host_table();
    for (int i = 0; i < H->model_linear_count(h); i++) {
        mt_linear *lin = (mt_linear *)H->model_linear(h, i);
        if (!strcmp(lin->name, name)) return lin;
    }
    fail_msg("no projection %s", name);
    return NULL;
}

/* ---- lora against PEFT ---- */

static void test_lora_peft_parity(void **state) {
    (void)state;
    mt_error err = {0};
    mt_safetensors *ref = NULL;
    if (mt_st_open(LORA_REF, &ref, &err)) fail_msg("%s", err.msg);
    const char *all_linear[] = {"all-linear"};
    mt_kv kv[] = {{.key = "r", .type = MT_KV_NUMBER, .number = 4},
                  {.key = "alpha", .type = MT_KV_NUMBER, .number = 8},
                  {.key = "target_modules", .type = MT_KV_LIST, .list = all_linear, .list_len = 1}};
    run base, r;
    run_open(&base, GQA_DIR, NULL, NULL, 0, ref);
    run_open(&r, GQA_DIR, "lora", kv, 3, ref);
    set_from_reference(&r, ref, 28); /* 2 layers x 7 projections x (A, B) */

    float loss;
    float *logits = run_step(&r, 1, &loss);
    float ref_loss, *ref_logits = mt_test_read_f32(ref, "logits", NULL);
    float *l1 = mt_test_read_f32(ref, "loss", NULL);
    ref_loss = l1[0];
    free(l1);
    printf("lora vs PEFT: loss %.9g reference %.9g\n", loss, ref_loss);
    assert_true(fabs(loss - ref_loss) <= 1e-5 * fabs(ref_loss));
    check_rel("logits", logits, ref_logits, logits_size(&r), 1e-5);

    size_t n;
    mt_param_view *v = adapter_params(&r, &n);
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        char name[200];
        snprintf(name, sizeof name, "grad.%s", v[i].name);
        size_t numel;
        float *g = mt_test_read_f32(ref, name, &numel);
        assert_int_equal(numel, (size_t)mt_tensor_numel(&v[i].grad));
        float *mine = to_host(&v[i].grad);
        double e = mt_test_rel_err(mine, g, numel);
        if (!(e <= 1e-4)) fail_msg("%s: gradient rel err %.3g", v[i].name, e);
        if (e > worst) worst = e;
        free(mine);
        free(g);
    }
    printf("  %zu LoRA gradients, worst rel err %.3g\n", n, worst);
    free(v);

    /* merge: PEFT's merged weights, and the same logits without the branch */
    static const char *merged[] = {
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"};
    if (r.vt->merge(r.inst->state, &err)) fail_msg("%s", err.msg);
    assert_int_equal(r.vt->merge(r.inst->state, &err), MT_OK); /* a second merge: no-op */
    for (size_t i = 0; i < sizeof merged / sizeof merged[0]; i++) {
        char name[200];
        snprintf(name, sizeof name, "merged.%s", merged[i]);
        size_t numel;
        float *w = mt_test_read_f32(ref, name, &numel);
        mt_param *p = mt_model_find_param(r.model, merged[i]);
        assert_non_null(p);
        assert_int_equal(numel, p->numel);
        check_rel(name, p->data, w, numel, 1e-6);
        free(w);
    }
    float merged_loss;
    float *merged_logits = run_step(&r, 0, &merged_loss);
    check_rel("merged logits vs unmerged", merged_logits, logits, logits_size(&r), 1e-5);

    /* unmerge: the base weights again */
    if (r.vt->unmerge(r.inst->state, &err)) fail_msg("%s", err.msg);
    double worst_w = 0;
    for (size_t i = 0; i < base.model->num_params; i++) {
        const mt_param *p = &base.model->params[i];
        const mt_param *q = mt_model_find_param(r.model, p->name);
        double e = mt_test_rel_err(q->data, p->data, p->numel);
        if (e > worst_w) worst_w = e;
    }
    printf("  unmerge: worst rel err of a base weight %.3g\n", worst_w);
    assert_true(worst_w <= 1e-6);
    float *unmerged_logits = run_step(&r, 0, NULL);
    check_rel("unmerged logits", unmerged_logits, logits, logits_size(&r), 1e-5);

    /* disabled: the base model */
    float *base_logits = run_step(&base, 0, NULL);
    r.vt->set_enabled(r.inst->state, 0);
    float *off_logits = run_step(&r, 0, NULL);
    check_rel("disabled adapter vs base model", off_logits, base_logits, logits_size(&r), 1e-6);
    r.vt->set_enabled(r.inst->state, 1);

    free(logits);
    free(ref_logits);
    free(merged_logits);
    free(unmerged_logits);
    free(base_logits);
    free(off_logits);
    run_close(&r);
    run_close(&base);
    mt_st_close(ref);
}

/* ---- lora's defaults: PEFT's initialisation ---- */

static void check_init(run *r, int expect_params) {
    size_t n;
    mt_param_view *v = adapter_params(r, &n);
    assert_int_equal(n, (size_t)expect_params);
    for (size_t i = 0; i < n; i++) {
        size_t numel = (size_t)mt_tensor_numel(&v[i].value);
        float *x = to_host(&v[i].value);
        assert_int_equal(v[i].value.device, MT_DEVICE_CPU); /* the model's, on this backend */
        if (strstr(v[i].name, ".lora_B.weight")) {
            for (size_t k = 0; k < numel; k++) assert_true(x[k] == 0.0f);
            free(x);
            continue;
        }
        assert_non_null(strstr(v[i].name, ".lora_A.weight"));
        assert_int_equal(v[i].value.ndim, 2);
        assert_int_equal(v[i].value.shape[0], 8);
        const double bound = 1.0 / sqrt((double)v[i].value.shape[1]);
        double sum = 0, sumsq = 0;
        for (size_t k = 0; k < numel; k++) {
            assert_true(fabs(x[k]) <= bound);
            sum += x[k];
            sumsq += (double)x[k] * x[k];
        }
        /* U(-b, b): mean 0, variance b^2/3 */
        double mean = sum / numel, var = sumsq / numel - mean * mean;
        assert_true(fabs(mean) < 0.1 * bound);
        assert_true(fabs(var / (bound * bound / 3.0) - 1.0) < 0.15);
        free(x);
    }
    free(v);
}

static void test_lora_defaults(void **state) {
    (void)state;
    mt_error err = {0};
    mt_safetensors *ref = NULL;
    if (mt_st_open(LORA_REF, &ref, &err)) fail_msg("%s", err.msg);
    run base, a, b, c;
    mt_kv seed7[] = {{.key = "seed", .type = MT_KV_NUMBER, .number = 7}};
    run_open(&base, GQA_DIR, NULL, NULL, 0, ref);
    run_open(&a, GQA_DIR, "lora", NULL, 0, ref);
    run_open(&b, GQA_DIR, "lora", NULL, 0, ref);
    run_open(&c, GQA_DIR, "lora", seed7, 1, ref);
    /* defaults: r 8 on q_proj and v_proj of 2 layers */
    check_init(&a, 8);
    check_init(&c, 8);
    size_t na, nb, nc;
    mt_param_view *va = adapter_params(&a, &na), *vb = adapter_params(&b, &nb),
                  *vc = adapter_params(&c, &nc);
    assert_non_null(find_view(va, na, "model.layers.1.self_attn.v_proj.lora_A.weight"));
    assert_non_null(find_view(va, na, "model.layers.0.self_attn.q_proj.lora_B.weight"));
    int same_seed_equal = 1, other_seed_equal = 1;
    for (size_t i = 0; i < na; i++) {
        size_t bytes = (size_t)mt_tensor_numel(&va[i].value) * sizeof(float);
        float *xa = to_host(&va[i].value), *xb = to_host(&vb[i].value), *xc = to_host(&vc[i].value);
        same_seed_equal &= !memcmp(xa, xb, bytes);
        if (strstr(va[i].name, "lora_A")) other_seed_equal &= !memcmp(xa, xc, bytes);
        free(xa);
        free(xb);
        free(xc);
    }
    assert_true(same_seed_equal);
    assert_false(other_seed_equal);
    /* two projections never share their A */
    float *a0 = to_host(&va[0].value), *a2 = to_host(&va[2].value);
    assert_true(memcmp(a0, a2, 8 * 48 * sizeof(float)) != 0);
    free(a0);
    free(a2);
    /* B = 0: the adapted model starts as the base, to the bit (the adapter adds exact
     * zeros to the base's outputs; recipes/quickstart.lua measures the base before it
     * attaches the adapter on this ground) */
    float *lb = run_step(&base, 0, NULL), *la = run_step(&a, 0, NULL);
    assert_memory_equal(la, lb, logits_size(&a) * sizeof(float));
    free(lb);
    free(la);
    free(va);
    free(vb);
    free(vc);
    run_close(&a);
    run_close(&b);
    run_close(&c);
    run_close(&base);

    /* refusals */
    mt_plugin *p = mt_test_load_plugin("lora");
    mt_plugin_instance *inst = NULL;
    mt_kv bad_drop[] = {{.key = "dropout", .type = MT_KV_NUMBER, .number = 1.0}};
    assert_int_not_equal(mt_plugin_instantiate(p, bad_drop, 1, &inst, &err), MT_OK);
    printf("  dropout 1: %s\n", err.msg);
    const char *bad_list[] = {"lm_head"};
    mt_kv bad_target[] = {{.key = "target_modules", .type = MT_KV_LIST, .list = bad_list, .list_len = 1}};
    assert_int_not_equal(mt_plugin_instantiate(p, bad_target, 1, &inst, &err), MT_OK);
    printf("  target lm_head: %s\n", err.msg);
    mt_plugin_unload(p);
    mt_st_close(ref);
}

/* ---- dropout: gradients by central differences, masks held fixed ---- */

/* The dropout tests' adapter: r 4 on q_proj and down_proj, dropout 0.3, seed 11. */
static const char *const dropout_modules[] = {"q_proj", "down_proj"};
static const mt_kv dropout_kv[] = {
    {.key = "r", .type = MT_KV_NUMBER, .number = 4},
    {.key = "alpha", .type = MT_KV_NUMBER, .number = 8},
    {.key = "dropout", .type = MT_KV_NUMBER, .number = 0.3},
    {.key = "seed", .type = MT_KV_NUMBER, .number = 11},
    {.key = "target_modules", .type = MT_KV_LIST, .list = dropout_modules,
     .list_len = 2}};

static void hold_masks(run *r, uint64_t pass) {
    lora *lo = r->inst->state;
    for (int i = 0; i < lo->n_layers; i++) lo->layers[i].pass = pass;
}

static void test_lora_dropout_gradients(void **state) {
    (void)state;
    mt_error err = {0};
    mt_safetensors *ref = NULL;
    if (mt_st_open(LORA_REF, &ref, &err)) fail_msg("%s", err.msg);
    const mt_kv *kv = dropout_kv;
    run r;
    run_open(&r, GQA_DIR, "lora", kv, 5, ref);
    set_from_reference(&r, ref, 8);
    /* dropout changes the output; two passes draw different masks */
    float *la = run_step(&r, 0, NULL), *lb = run_step(&r, 0, NULL);
    assert_true(mt_test_rel_err(la, lb, logits_size(&r)) > 1e-4);
    free(la);
    free(lb);
    /* evaluation mode draws no dropout: two passes agree exactly */
    r.vt->set_training(r.inst->state, 0);
    la = run_step(&r, 0, NULL);
    lb = run_step(&r, 0, NULL);
    assert_true(mt_test_rel_err(la, lb, logits_size(&r)) == 0.0);
    free(la);
    free(lb);
    r.vt->set_training(r.inst->state, 1);

    hold_masks(&r, 41);
    float loss;
    free(run_step(&r, 1, &loss));
    size_t n;
    mt_param_view *v = adapter_params(&r, &n);
    /* the entry with the largest gradient of each tensor (run_step zeroes the gradients) */
    size_t at[8];
    float analytic_at[8];
    assert_int_equal(n, 8);
    for (size_t i = 0; i < n; i++) {
        size_t numel = (size_t)mt_tensor_numel(&v[i].grad), k = 0;
        float *g = to_host(&v[i].grad);
        for (size_t j = 1; j < numel; j++)
            if (fabsf(g[j]) > fabsf(g[k])) k = j;
        at[i] = k;
        analytic_at[i] = g[k];
        free(g);
    }
    int checked = 0;
    for (size_t i = 0; i < n; i++) {
        float *x = to_host(&v[i].value);
        const size_t k = at[i];
        const float analytic = analytic_at[i], keep = x[k], h = 1e-2f;
        float lp, lm;
        x[k] = keep + h;
        from_host(&v[i].value, x);
        hold_masks(&r, 41);
        free(run_step(&r, 0, &lp));
        x[k] = keep - h;
        from_host(&v[i].value, x);
        hold_masks(&r, 41);
        free(run_step(&r, 0, &lm));
        x[k] = keep;
        from_host(&v[i].value, x);
        free(x);
        double numeric = ((double)lp - lm) / (2.0 * h);
        double e = fabs(numeric - analytic) / fabs(analytic);
        printf("  %-48s d/dx[%zu] analytic %.6g numeric %.6g rel %.2g\n", v[i].name, k,
               analytic, numeric, e);
        assert_true(e < 5e-3);
        checked++;
    }
    assert_int_equal(checked, 8);
    free(v);
    run_close(&r);
    mt_st_close(ref);
}

/* ---- dropout: the passes as checkpoint state ---- */

static void test_lora_dropout_state(void **state) {
    (void)state;
    mt_error err = {0};
    mt_safetensors *ref = NULL;
    if (mt_st_open(LORA_REF, &ref, &err)) fail_msg("%s", err.msg);
    const mt_kv *kv = dropout_kv;
    run a, b, c;
    run_open(&a, GQA_DIR, "lora", kv, 5, ref);
    run_open(&b, GQA_DIR, "lora", kv, 5, ref);
    run_open(&c, GQA_DIR, "lora", kv, 5, ref);
    set_from_reference(&a, ref, 8);
    set_from_reference(&b, ref, 8);
    set_from_reference(&c, ref, 8);
    const mt_adapter_vtable *vt = a.vt;
    assert_true(vt->size >= sizeof(mt_adapter_vtable));
    assert_non_null(vt->state_count);
    assert_int_equal(vt->state_count(a.inst->state), 1);

    /* a trains three passes; its state says so for each of its 4 projections */
    for (int i = 0; i < 3; i++) free(run_step(&a, 1, NULL));
    const char *name = NULL;
    mt_tensor t;
    assert_int_equal(vt->state_get(a.inst->state, 0, &name, &t, &err), MT_OK);
    assert_string_equal(name, "dropout_pass");
    assert_int_equal(t.dtype, MT_I64);
    assert_int_equal(t.device, MT_DEVICE_CPU);
    assert_int_equal(t.ndim, 1);
    assert_int_equal(t.shape[0], 4);
    int64_t saved[4];
    memcpy(saved, t.data, sizeof saved);
    for (int i = 0; i < 4; i++) assert_int_equal(saved[i], 3);
    assert_int_not_equal(vt->state_get(a.inst->state, 1, &name, &t, &err), MT_OK);

    /* b resumes from a's state: its next pass draws exactly a's next masks; c, fresh,
     * draws the masks of a first pass */
    mt_tensor in = {.dtype = MT_I64, .device = MT_DEVICE_CPU, .ndim = 1, .shape = {4},
                    .data = saved};
    assert_int_equal(vt->state_set(b.inst->state, "dropout_pass", &in, &err), MT_OK);
    float *la = run_step(&a, 0, NULL), *lb = run_step(&b, 0, NULL), *lc = run_step(&c, 0, NULL);
    const double resumed = mt_test_rel_err(lb, la, logits_size(&a));
    const double fresh = mt_test_rel_err(lc, la, logits_size(&a));
    printf("dropout state: resumed vs uninterrupted logits rel err %.3g, fresh %.3g\n", resumed,
           fresh);
    assert_true(resumed == 0.0);
    assert_true(fresh > 1e-4);

    /* refusals: another name, another shape, another dtype */
    assert_int_equal(vt->state_set(b.inst->state, "exp_avg", &in, &err), MT_ERR_INVALID_ARG);
    printf("  %s\n", err.msg);
    in.shape[0] = 3;
    assert_int_equal(vt->state_set(b.inst->state, "dropout_pass", &in, &err), MT_ERR_FORMAT);
    printf("  %s\n", err.msg);
    in.shape[0] = 4;
    in.dtype = MT_F32;
    assert_int_equal(vt->state_set(b.inst->state, "dropout_pass", &in, &err), MT_ERR_FORMAT);

    free(la);
    free(lb);
    free(lc);
    run_close(&a);
    run_close(&b);
    run_close(&c);
    mt_st_close(ref);
}

/* ---- qlora equals lora on the dequantized weights ---- */

static void fill_random_b(run *r, uint64_t seed) {
    size_t n;
    mt_param_view *v = adapter_params(r, &n);
    for (size_t i = 0; i < n; i++)
        if (strstr(v[i].name, "lora_B")) {
            size_t numel = (size_t)mt_tensor_numel(&v[i].value);
            float *b = malloc(numel * sizeof(float));
            assert_non_null(b);
            mt_test_fill_uniform(b, numel, &seed, -0.2f, 0.2f);
            from_host(&v[i].value, b);
            free(b);
        }
    free(v);
}

static void qlora_vs_lora(const char *dir, const mt_safetensors *ref_values,
                          const mt_safetensors *batch) {
    mt_error err = {0};
    const char *all_linear[] = {"all-linear"};
    mt_kv kv[] = {{.key = "r", .type = MT_KV_NUMBER, .number = 4},
                  {.key = "alpha", .type = MT_KV_NUMBER, .number = 8},
                  {.key = "target_modules", .type = MT_KV_LIST, .list = all_linear, .list_len = 1}};
    run q, l;
    run_open(&q, dir, "qlora", kv, 3, batch);
    lora *lo = q.inst->state;
    qlora_extra *qx = lo->extra;
    const double bpp = (double)qx->n_bytes / (double)qx->n_params;
    printf("qlora on %s: %d projections, %lld parameters in %zu bytes: %.5f bytes/parameter\n",
           dir, lo->n_layers, (long long)qx->n_params, qx->n_bytes, bpp);
    assert_int_equal(lo->n_layers, 2 * 7);
    assert_true(bpp > 0.5 && bpp < 0.53);
    /* the fp32 weights are gone, lm_head's stays */
    for (int i = 0; i < lo->n_layers; i++) assert_null(((mt_linear *)lo->layers[i].lin)->weight);
    assert_non_null(q.model->lm_head.weight);

    /* the lora run: its projection weights are the dequantized NF4 ones */
    run_open(&l, dir, NULL, NULL, 0, batch);
    for (int i = 0; i < lo->n_layers; i++) {
        const lora_layer *L = &lo->layers[i];
        mt_linear *lin = linear_named(l.model, ((mt_linear *)L->lin)->name);
        mt_tensor w = cpu_f32(lin->weight, L->out, L->in);
        qlora_dequantize(qx, L->base, &w, 0);
    }
    ops_ok();
    mt_plugin *lp = mt_test_load_plugin("lora");
    mt_plugin_instance *li = NULL;
    if (mt_plugin_instantiate(lp, kv, 3, &li, &err)) fail_msg("%s", err.msg);
    if (mt_model_attach_adapter(l.model, li->desc->vtable, li->state, &err)) fail_msg("%s", err.msg);

    if (ref_values) set_from_reference(&q, ref_values, 28);
    else fill_random_b(&q, 99);
    copy_adapter_values(&q, &l);

    float loss_q, loss_l;
    float *lq = run_step(&q, 1, &loss_q), *ll = run_step(&l, 1, &loss_l);
    printf("  loss qlora %.9g, lora on the dequantized base %.9g\n", loss_q, loss_l);
    assert_true(fabs(loss_q - loss_l) <= 1e-5 * fabs(loss_l));
    check_rel("logits", lq, ll, logits_size(&q), 1e-5);
    size_t nq, nl;
    mt_param_view *vq = adapter_params(&q, &nq), *vl = adapter_params(&l, &nl);
    double worst = 0;
    for (size_t i = 0; i < nq; i++) {
        mt_param_view *w = find_view(vl, nl, vq[i].name);
        assert_non_null(w);
        float *gq = to_host(&vq[i].grad), *gl = to_host(&w->grad);
        double e = mt_test_rel_err(gq, gl, (size_t)mt_tensor_numel(&w->grad));
        free(gq);
        free(gl);
        if (!(e <= 1e-4)) fail_msg("%s: qlora gradient rel err %.3g", vq[i].name, e);
        if (e > worst) worst = e;
    }
    printf("  %zu LoRA gradients, worst rel err %.3g\n", nq, worst);
    free(vq);
    free(vl);

    /* merge: dequant(W) + s·B·A, as lora's merge of the dequantized base */
    const mt_adapter_vtable *lvt = li->desc->vtable;
    if (q.vt->merge(q.inst->state, &err)) fail_msg("%s", err.msg);
    if (lvt->merge(li->state, &err)) fail_msg("%s", err.msg);
    for (int i = 0; i < lo->n_layers; i++) {
        const mt_linear *a = (const mt_linear *)lo->layers[i].lin;
        const mt_linear *b = linear_named(l.model, a->name);
        assert_non_null(a->weight);
        double e = mt_test_rel_err(a->weight, b->weight, (size_t)a->in * a->out);
        if (!(e <= 1e-6)) fail_msg("%s: merged weight rel err %.3g", a->name, e);
    }
    float *lq_merged = run_step(&q, 0, NULL);
    check_rel("merged logits vs unmerged", lq_merged, lq, logits_size(&q), 1e-5);
    if (q.vt->unmerge(q.inst->state, &err)) fail_msg("%s", err.msg);
    for (int i = 0; i < lo->n_layers; i++) assert_null(((mt_linear *)lo->layers[i].lin)->weight);
    float *lq_again = run_step(&q, 0, NULL);
    assert_true(mt_test_rel_err(lq_again, lq, logits_size(&q)) == 0.0);

    /* disabled: the dequantized base alone */
    q.vt->set_enabled(q.inst->state, 0);
    if (lvt->unmerge(li->state, &err)) fail_msg("%s", err.msg);
    lvt->set_enabled(li->state, 0);
    float *off_q = run_step(&q, 0, NULL), *off_l = run_step(&l, 0, NULL);
    check_rel("disabled: qlora vs the dequantized base", off_q, off_l, logits_size(&q), 1e-5);

    free(lq);
    free(ll);
    free(lq_merged);
    free(lq_again);
    free(off_q);
    free(off_l);
    mt_plugin_instance_free(li);
    mt_plugin_unload(lp);
    run_close(&q);
    run_close(&l);
}

static void test_qlora_vs_lora(void **state) {
    (void)state;
    mt_error err = {0};
    mt_safetensors *ref = NULL, *bias_ref = NULL;
    if (mt_st_open(LORA_REF, &ref, &err)) fail_msg("%s", err.msg);
    if (mt_st_open(BIAS_DIR "/reference.safetensors", &bias_ref, &err)) fail_msg("%s", err.msg);
    qlora_vs_lora(GQA_DIR, ref, ref);
    qlora_vs_lora(BIAS_DIR, NULL, bias_ref);
    mt_st_close(ref);
    mt_st_close(bias_ref);
}

/* ---- projections of one input in one call (forward_shared, backward_shared) ---- */

/* The adapter's own impl with the shared calls counted, and one without them (the
 * host then runs each projection alone): the same adapter both ways. */
static const mt_linear_impl *shared_impl_orig;
static int shared_forwards, shared_backwards;

static void counted_forward_shared(void *const *selves, int n, mt_tensor *const *ys,
                                   const mt_tensor *x) {
    shared_forwards++;
    shared_impl_orig->forward_shared(selves, n, ys, x);
}

static void counted_backward_shared(void *const *selves, int n, mt_tensor *dx,
                                    const mt_tensor *const *dys, const mt_tensor *x) {
    shared_backwards++;
    shared_impl_orig->backward_shared(selves, n, dx, dys, x);
}

static void rewrap(mt_model *m, const mt_linear_impl *impl) {
    mt_model_handle *h = (mt_model_handle *)m;
    for (int i = 0; i < mt_host_table()->model_linear_count(h); i++) {
        mt_linear *lin = (mt_linear *)mt_host_table()->model_linear(h, i);
        if (lin->impl) lin->impl = impl;
    }
}

/* plugin with target_modules (and dropout) on tiny_gqa, in training or evaluation: the
 * shared calls against each projection alone, logits and every LoRA gradient; with
 * dropout in training each projection draws its own mask, so the shared calls must
 * fall back to the projections alone and give their bits. */
static void shared_vs_alone(const char *plugin, const char *targets, const char *more_targets,
                            double dropout, int training, const mt_safetensors *batch,
                            int expect_calls) {
    const char *list[] = {targets, more_targets};
    mt_kv kv[] = {{.key = "r", .type = MT_KV_NUMBER, .number = 3},
                  {.key = "alpha", .type = MT_KV_NUMBER, .number = 5},
                  {.key = "dropout", .type = MT_KV_NUMBER, .number = dropout},
                  {.key = "seed", .type = MT_KV_NUMBER, .number = 7},
                  {.key = "target_modules", .type = MT_KV_LIST, .list = list, .list_len = more_targets ? 2 : 1}};
    run a, b;
    run_open(&a, GQA_DIR, plugin, kv, 5, batch);
    run_open(&b, GQA_DIR, plugin, kv, 5, batch);
    fill_random_b(&a, 31);
    copy_adapter_values(&a, &b);
    a.vt->set_training(a.inst->state, training);
    b.vt->set_training(b.inst->state, training);
    shared_impl_orig = ((mt_linear *)linear_named(a.model, "model.layers.0.self_attn.v_proj"))->impl;
    assert_non_null(shared_impl_orig->forward_shared);
    assert_non_null(shared_impl_orig->backward_shared);
    mt_linear_impl counted = *shared_impl_orig, alone = *shared_impl_orig;
    counted.forward_shared = counted_forward_shared;
    counted.backward_shared = counted_backward_shared;
    alone.forward_shared = NULL;
    alone.backward_shared = NULL;
    rewrap(a.model, &counted);
    rewrap(b.model, &alone);
    shared_forwards = shared_backwards = 0;
    float loss_a, loss_b;
    float *la = run_step(&a, 1, &loss_a), *lb = run_step(&b, 1, &loss_b);
    printf("%s %s%s%s, dropout %g, %s: %d shared forwards, %d shared backwards\n", plugin,
           targets, more_targets ? "," : "", more_targets ? more_targets : "", dropout, training ? "training" : "evaluation", shared_forwards, shared_backwards);
    assert_int_equal(shared_forwards, expect_calls);
    assert_int_equal(shared_backwards, expect_calls);
    const int exact = dropout > 0 && training;
    /* white-box (this file's copy of the plugin's code on the plugin's state): layer 0's
     * q, k, v as the host hands them make one group unless dropout draws in training */
    lora *lo = a.inst->state;
    void *qkv[3];
    int n_qkv = 0;
    for (int i = 0; i < lo->n_layers && n_qkv < 3; i++)
        if (lo->layers[i].layer == 0 && lora_input_class(lo->layers[i].module) == 1)
            qkv[n_qkv++] = &lo->layers[i];
    assert_int_equal(n_qkv, 3);
    assert_int_equal(lora_shared_group(qkv, 3) != NULL, !exact);
    double worst = mt_test_rel_err(la, lb, logits_size(&a));
    size_t na, nb;
    mt_param_view *va = adapter_params(&a, &na), *vb = adapter_params(&b, &nb);
    assert_int_equal(na, nb);
    for (size_t i = 0; i < na; i++) {
        mt_param_view *w = find_view(vb, nb, va[i].name);
        assert_non_null(w);
        float *ga = to_host(&va[i].grad), *gb = to_host(&w->grad);
        const size_t numel = (size_t)mt_tensor_numel(&w->grad);
        double e = mt_test_rel_err(ga, gb, numel), norm = 0;
        for (size_t j = 0; j < numel; j++) norm += (double)gb[j] * gb[j];
        assert_true(norm > 0); /* every branch gets a gradient */
        if (e > worst) worst = e;
        if (exact) assert_memory_equal(ga, gb, numel * sizeof(float));
        free(ga);
        free(gb);
    }
    printf("  logits and %zu LoRA gradients: worst rel err %.3g%s\n", na, worst,
           exact ? " (the same bits)" : "");
    if (exact) assert_memory_equal(la, lb, logits_size(&a) * sizeof(float));
    if (!(worst <= 1e-5)) fail_msg("shared against alone: rel err %.3g", worst);
    free(va);
    free(vb);
    free(la);
    free(lb);
    run_close(&a);
    run_close(&b);
}

static void test_shared_input(void **state) {
    (void)state;
    mt_error err = {0};
    mt_safetensors *batch = NULL;
    if (mt_st_open(LORA_REF, &batch, &err)) fail_msg("%s", err.msg);
    /* tiny_gqa has 2 layers: q, k, v and gate, up in each, so 4 shared calls a pass */
    shared_vs_alone("lora", "all-linear", NULL, 0, 1, batch, 4);
    shared_vs_alone("qlora", "all-linear", NULL, 0, 1, batch, 4);
    /* qlora wraps k and the MLP without a branch: q and v still share their product */
    shared_vs_alone("qlora", "q_proj", "v_proj", 0, 1, batch, 4);
    shared_vs_alone("lora", "all-linear", NULL, 0.3, 0, batch, 4);
    shared_vs_alone("lora", "all-linear", NULL, 0.3, 1, batch, 4);
    mt_st_close(batch);
}

/* ---- NF4 against bitsandbytes (white-box) ---- */

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static void nf4_alloc(nf4_tensor *q, int64_t n) {
    memset(q, 0, sizeof *q);
    q->n = n;
    q->n_blocks = (n + NF4_BLOCK - 1) / NF4_BLOCK;
    q->n_blocks2 = (q->n_blocks + DQ_BLOCK - 1) / DQ_BLOCK;
    q->codes = calloc((size_t)(n + 1) / 2, 1);
    q->absmax_q = calloc((size_t)q->n_blocks, 1);
    q->absmax2 = calloc((size_t)q->n_blocks2, sizeof(float));
    assert_true(q->codes && q->absmax_q && q->absmax2);
}

static void nf4_release(nf4_tensor *q) {
    free(q->codes);
    free(q->absmax_q);
    free(q->absmax2);
}

/* The dequantized absmax of 64-block b, as bitsandbytes computes it (fp32, this order). */
static float block_scale(const nf4_tensor *q, int64_t b) {
    float a = dyn_code[q->absmax_q[b]] * q->absmax2[b / DQ_BLOCK];
    return a + q->offset;
}

/* dst (e1 - e0) = elements [e0, e1) of q dequantized the plugin's way: q uploaded into
 * device tensors (qlora_upload), host->dequantize_4bit (qlora_dequantize), downloaded. */
static void dequant_via_host(const nf4_tensor *q, int64_t e0, int64_t e1, float *dst) {
    mt_error err = {0};
    qlora_extra qx = {0};
    qlora_weight w = {0};
    if (qlora_table_alloc(&qx, MT_DEVICE_CPU, &err) || qlora_upload(q, MT_DEVICE_CPU, &w, &err))
        fail_msg("%s", err.msg);
    const int64_t shape[1] = {e1 - e0};
    mt_tensor out;
    if (H()->tensor_alloc(MT_DEVICE_CPU, MT_F32, 1, shape, &out, &err)) fail_msg("%s", err.msg);
    qlora_dequantize(&qx, &w, &out, e0);
    ops_ok();
    if (H()->tensor_download(dst, &out, &err)) fail_msg("%s", err.msg);
    H()->tensor_free(&out);
    H()->tensor_free(&qx.table);
    H()->tensor_free(&w.codes);
    H()->tensor_free(&w.absmax_q);
    H()->tensor_free(&w.absmax2);
}

static void test_nf4_bitsandbytes(void **state) {
    (void)state;
    moontune_plugin_entry(mt_host_table()); /* the included copy: host and tables */
    mt_error err = {0};
    mt_safetensors *ref = NULL;
    if (mt_st_open(NF4_REF, &ref, &err)) fail_msg("%s", err.msg);
    printf("nf4 fixture: %s\n", mt_st_metadata(ref, "source"));

    size_t n_code, n_nf4;
    float *code = mt_test_read_f32(ref, "code", &n_code), *nf4 = mt_test_read_f32(ref, "nf4_code", &n_nf4);
    assert_int_equal(n_code, 256);
    assert_int_equal(n_nf4, 16);
    for (int k = 0; k < 256; k++)
        if (f32_bits(code[k]) != f32_bits(dyn_code[k]))
            fail_msg("dynamic map[%d] = %.9g, bitsandbytes %.9g", k, dyn_code[k], code[k]);
    for (int k = 0; k < 16; k++) assert_true(f32_bits(nf4[k]) == f32_bits(nf4_code[k]));

    size_t n;
    float *input = mt_test_read_f32(ref, "input", &n);
    nf4_tensor q;
    nf4_alloc(&q, (int64_t)n);
    float *absmax32 = calloc((size_t)q.n_blocks, sizeof(float));
    assert_non_null(absmax32);
    nf4_quantize(input, &q, absmax32);

    size_t n_packed, n_absq;
    const uint8_t *packed = read_u8(ref, "packed", &n_packed);
    const uint8_t *absq = read_u8(ref, "absmax_q", &n_absq);
    assert_int_equal(n_packed, (n + 1) / 2);
    assert_int_equal(n_absq, (size_t)q.n_blocks);
    for (size_t i = 0; i < n_packed; i++)
        if (packed[i] != q.codes[i])
            fail_msg("packed byte %zu: 0x%02x, bitsandbytes 0x%02x", i, q.codes[i], packed[i]);
    for (size_t i = 0; i < n_absq; i++)
        if (absq[i] != q.absmax_q[i])
            fail_msg("absmax code %zu: %u, bitsandbytes %u", i, q.absmax_q[i], absq[i]);
    size_t n2;
    float *state2 = mt_test_read_f32(ref, "state2_absmax", &n2);
    assert_int_equal(n2, (size_t)q.n_blocks2);
    for (size_t i = 0; i < n2; i++) assert_true(f32_bits(state2[i]) == f32_bits(q.absmax2[i]));
    float *offset = mt_test_read_f32(ref, "offset", NULL);
    float *offset_cr = mt_test_read_f32(ref, "offset_correctly_rounded", NULL);
    int64_t ulps = (int64_t)f32_bits(q.offset) - (int64_t)f32_bits(offset[0]);
    printf("  %zu codes, %zu absmax codes, %zu state2 absmax identical; offset %.9g, "
           "bitsandbytes %.9g (%lld ulp)\n", n_packed, n_absq, n2, q.offset, offset[0],
           (long long)ulps);
    assert_true(llabs(ulps) <= 1);
    assert_true(f32_bits(q.offset) == f32_bits(offset_cr[0]));

    /* dequantization: bit-identical with bitsandbytes' offset, within 1e-6 with ours */
    float *deq = mt_test_read_f32(ref, "dequant", NULL), *mine = malloc(n * sizeof(float));
    assert_non_null(mine);
    dequant_via_host(&q, 0, (int64_t)n, mine);
    double max_abs = 0;
    for (size_t i = 0; i < n; i++) max_abs = fmax(max_abs, fabs((double)mine[i] - deq[i]));
    printf("  dequantized with our offset: max |diff| %.3g\n", max_abs);
    assert_true(max_abs <= 1e-6);
    q.offset = offset[0];
    dequant_via_host(&q, 0, (int64_t)n, mine);
    for (size_t i = 0; i < n; i++)
        if (f32_bits(mine[i]) != f32_bits(deq[i]))
            fail_msg("dequantized %zu: %.9g, bitsandbytes %.9g", i, mine[i], deq[i]);
    /* a range that starts and ends inside blocks */
    dequant_via_host(&q, 37, 4133, mine);
    assert_true(!memcmp(mine, deq + 37, (4133 - 37) * sizeof(float)));

    /* the 8-bit stage alone, where bitsandbytes' native CPU kernel is not nearest */
    size_t n8;
    float *x8 = mt_test_read_f32(ref, "dq8_input", &n8), *a8 = mt_test_read_f32(ref, "dq8_absmax", NULL);
    size_t nc8, nn8;
    const uint8_t *c8 = read_u8(ref, "dq8_codes", &nc8), *native8 = read_u8(ref, "dq8_codes_native", &nn8);
    uint8_t *mine8 = malloc(n8);
    float mine_a8[8];
    assert_true(n8 <= 8 * DQ_BLOCK);
    dq8_quantize(x8, (int64_t)n8, mine8, mine_a8);
    int differ_native = 0;
    for (size_t i = 0; i < n8; i++) {
        if (mine8[i] != c8[i])
            fail_msg("8-bit code %zu of %.9g: %u, bitsandbytes' reference %u", i, x8[i],
                     mine8[i], c8[i]);
        differ_native += mine8[i] != native8[i];
    }
    for (size_t b = 0; b < (n8 + DQ_BLOCK - 1) / DQ_BLOCK; b++)
        assert_true(f32_bits(mine_a8[b]) == f32_bits(a8[b]));
    printf("  8-bit stage: %zu codes identical to bitsandbytes' reference (its native CPU "
           "kernel differs in %d)\n", n8, differ_native);

    /* an odd count: a short last block and the pad nibble (the code of 0.0) */
    nf4_tensor odd;
    nf4_alloc(&odd, 63 + 64);
    float small[127], back[127], am[2];
    uint64_t seed = 5;
    mt_test_fill_uniform(small, 127, &seed, -2.0f, 2.0f);
    nf4_quantize(small, &odd, am);
    assert_int_equal(odd.codes[63] & 15, 7);
    dequant_via_host(&odd, 0, 127, back);
    for (int i = 0; i < 127; i++) {
        const float a = block_scale(&odd, i / 64);
        assert_true(fabsf(back[i] - small[i]) <= 0.5f * 0.33f * a + 1e-6f);
    }
    nf4_release(&odd);

    free(mine8);
    free(x8);
    free(a8);
    free(deq);
    free(mine);
    free(offset);
    free(offset_cr);
    free(state2);
    free(absmax32);
    nf4_release(&q);
    free(input);
    free(code);
    free(nf4);
    mt_st_close(ref);
}

/* ---- the tiled paths (white-box) ---- */

static mt_tensor cpu_tensor(int64_t rows, int64_t cols, const float *init) {
    mt_tensor t;
    mt_error err = {0};
    const int64_t shape[2] = {rows, cols};
    if (H()->tensor_alloc(MT_DEVICE_CPU, MT_F32, 2, shape, &t, &err)) fail_msg("%s", err.msg);
    if (init) from_host(&t, init);
    return t;
}

static void test_tiles(void **state) {
    (void)state;
    moontune_plugin_entry(mt_host_table());
    /* a 2^18-float weight tile: rows of the weight in bands (124, 124, 52); N > the
     * branch's tile with dropout (LORA_DROPOUT_TILE) and > QLORA_NTILE, and not a
     * multiple of it (a padded last tile of x) */
    enum { IN = 2112, OUT = 300, N = 300, R = 3 };
    uint64_t seed = 1234;
    float *w = malloc((size_t)OUT * IN * sizeof(float)), *wdq = malloc((size_t)OUT * IN * sizeof(float));
    float *x = malloc((size_t)N * IN * sizeof(float)), *dy = malloc((size_t)N * OUT * sizeof(float));
    float *bias = malloc(OUT * sizeof(float));
    assert_true(w && wdq && x && dy && bias);
    mt_test_fill_uniform(w, (size_t)OUT * IN, &seed, -0.05f, 0.05f);
    mt_test_fill_uniform(x, (size_t)N * IN, &seed, -1.0f, 1.0f);
    mt_test_fill_uniform(dy, (size_t)N * OUT, &seed, -1.0f, 1.0f);
    mt_test_fill_uniform(bias, OUT, &seed, -0.5f, 0.5f);

    lora lo = {.plugin = "test", .r = R, .alpha = 1.4f, .scaling = 0.7f, .dropout = 0.25f,
               .seed = 5, .enabled = 1, .attached = 1, .training = 1, .device = MT_DEVICE_CPU};
    qlora_extra *qx = H()->alloc(sizeof *qx);
    assert_non_null(qx);
    lo.extra = qx;
    qx->wtile_floats = 1 << 18;
    lo.base_forward = qlora_base_forward;
    lo.base_backward = qlora_base_backward;
    lora_layer L = {.lo = &lo, .index = 3, .in = IN, .out = OUT, .r = R};
    lo.layers = &L;
    lo.n_layers = 1;
    float A[R * IN], B[OUT * R];
    mt_test_fill_uniform(A, R * IN, &seed, -0.02f, 0.02f);
    mt_test_fill_uniform(B, OUT * R, &seed, -0.2f, 0.2f);
    L.A = cpu_tensor(R, IN, A);
    L.B = cpu_tensor(OUT, R, B);
    L.dA = cpu_tensor(R, IN, NULL);
    L.dB = cpu_tensor(OUT, R, NULL);
    L.bias = cpu_tensor(1, OUT, bias);
    L.bias.ndim = 1;
    L.bias.shape[0] = OUT;
    L.bias.shape[1] = 0;
    nf4_tensor q;
    nf4_alloc(&q, (int64_t)OUT * IN);
    float *am = calloc((size_t)q.n_blocks, sizeof(float));
    assert_non_null(am);
    nf4_quantize(w, &q, am);
    dequant_via_host(&q, 0, (int64_t)OUT * IN, wdq);
    mt_error err = {0};
    qlora_weight *qw = H()->alloc(sizeof *qw);
    assert_non_null(qw);
    if (qlora_upload(&q, MT_DEVICE_CPU, qw, &err)) fail_msg("%s", err.msg);
    L.base = qw;
    qx->n_params = q.n;
    qx->n_bytes = nf4_bytes(&q);
    assert_int_equal(lora_alloc_scratch(&lo, IN, &err), MT_OK);
    assert_int_equal(lo.tile, LORA_DROPOUT_TILE);
    assert_int_equal(qlora_alloc_extra(&lo, &err), MT_OK);
    assert_true(qlora_rows(qx, IN, OUT) < OUT);
    assert_true((int)N > (int)LORA_DROPOUT_TILE && (int)N > (int)QLORA_NTILE);
    assert_true(N % QLORA_NTILE != 0);

    mt_tensor tx = cpu_tensor(N, IN, x), tdy = cpu_tensor(N, OUT, dy);
    mt_tensor ty = cpu_tensor(N, OUT, NULL), tdx = cpu_tensor(N, IN, NULL);
    lora_forward(&L, &ty, &tx);
    lora_backward(&L, &tdx, &tdy, &tx);
    ops_ok();
    assert_int_equal(L.pass, 1);
    float *y = to_host(&ty), *dx = to_host(&tdx), *dA = to_host(&L.dA), *dB = to_host(&L.dB);

    /* the same in double, with the masks drawn independently of the tiling */
    const uint64_t key = lora_dropout_key(&lo, 3, 1);
    const double keep = 1.0 / (1.0 - 0.25), s = 0.7;
    double *xd = malloc((size_t)N * IN * sizeof(double)), *u = malloc((size_t)N * R * sizeof(double));
    double *g = malloc((size_t)N * R * sizeof(double));
    float *yr = malloc((size_t)N * OUT * sizeof(float)), *dxr = malloc((size_t)N * IN * sizeof(float));
    float *dAr = calloc(R * IN, sizeof(float)), *dBr = calloc(OUT * R, sizeof(float));
    assert_true(xd && u && g && yr && dxr && dAr && dBr);
    unsigned char *mask = malloc((size_t)N * IN);
    assert_non_null(mask);
    size_t dropped = 0;
    for (size_t i = 0; i < (size_t)N * IN; i++) {
        mask[i] = mt_host_table()->random_uniform(key, i) >= 0.25f;
        dropped += !mask[i];
        xd[i] = mask[i] ? x[i] * keep : 0.0;
    }
    assert_true(dropped > (size_t)N * IN / 5 && dropped < (size_t)N * IN * 3 / 10);
    for (int i = 0; i < N; i++) {
        for (int k = 0; k < R; k++) {
            double su = 0, sg = 0;
            for (int j = 0; j < IN; j++) su += xd[(size_t)i * IN + j] * A[k * IN + j];
            for (int o = 0; o < OUT; o++) sg += (double)dy[(size_t)i * OUT + o] * B[o * R + k];
            u[i * R + k] = su;
            g[i * R + k] = sg;
        }
        for (int o = 0; o < OUT; o++) {
            double acc = bias[o];
            for (int j = 0; j < IN; j++) acc += (double)x[(size_t)i * IN + j] * wdq[(size_t)o * IN + j];
            for (int k = 0; k < R; k++) acc += s * u[i * R + k] * B[o * R + k];
            yr[(size_t)i * OUT + o] = (float)acc;
        }
        for (int j = 0; j < IN; j++) {
            double acc = 0, br = 0;
            for (int o = 0; o < OUT; o++) acc += (double)dy[(size_t)i * OUT + o] * wdq[(size_t)o * IN + j];
            for (int k = 0; k < R; k++) br += g[i * R + k] * A[k * IN + j];
            if (mask[(size_t)i * IN + j]) acc += s * br * keep;
            dxr[(size_t)i * IN + j] = (float)acc;
        }
    }
    for (int k = 0; k < R; k++)
        for (int j = 0; j < IN; j++) {
            double acc = 0;
            for (int i = 0; i < N; i++) acc += g[i * R + k] * xd[(size_t)i * IN + j];
            dAr[k * IN + j] = (float)(s * acc);
        }
    for (int o = 0; o < OUT; o++)
        for (int k = 0; k < R; k++) {
            double acc = 0;
            for (int i = 0; i < N; i++) acc += (double)dy[(size_t)i * OUT + o] * u[i * R + k];
            dBr[o * R + k] = (float)(s * acc);
        }
    printf("tiled qlora + lora branch with dropout (N %d, in %d, out %d, %d weight rows per tile):\n",
           N, IN, OUT, qlora_rows(qx, IN, OUT));
    check_rel("y", y, yr, (size_t)N * OUT, 1e-5);
    check_rel("dx", dx, dxr, (size_t)N * IN, 1e-5);
    check_rel("dA", dA, dAr, R * IN, 1e-4);
    check_rel("dB", dB, dBr, OUT * R, 1e-4);

    qlora_free_extra(&lo); /* the quantized weight, the tiles and qx */
    mt_tensor *owned[] = {&L.A, &L.B, &L.dA, &L.dB, &L.bias, &lo.xd, &lo.u, &lo.g,
                          &tx, &tdy, &ty, &tdx};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++) H()->tensor_free(owned[i]);
    nf4_release(&q);
    free(am);
    free(w);
    free(wdq);
    free(x);
    free(dy);
    free(y);
    free(dx);
    free(dA);
    free(dB);
    free(bias);
    free(xd);
    free(mask);
    free(u);
    free(g);
    free(yr);
    free(dxr);
    free(dAr);
    free(dBr);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nf4_bitsandbytes),
        cmocka_unit_test(test_tiles),
        cmocka_unit_test(test_lora_peft_parity),
        cmocka_unit_test(test_lora_defaults),
        cmocka_unit_test(test_lora_dropout_gradients),
        cmocka_unit_test(test_lora_dropout_state),
        cmocka_unit_test(test_qlora_vs_lora),
        cmocka_unit_test(test_shared_input),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
