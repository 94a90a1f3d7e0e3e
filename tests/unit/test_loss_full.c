/* test_loss_full.c — the cross_entropy loss plugin and the full adapter, loaded
 * through dlopen, against the PyTorch references: plain cross-entropy against
 * tests/fixtures/tiny_gqa/reference.safetensors, label smoothing + z-loss against
 * tests/fixtures/loss/reference.safetensors (tests/parity/make_loss_reference.py).
 * Plugin ABI 2: the loss' count, and normalisation by the step's items
 * (batch.step_items) instead of the batch's own. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/device.h"
#include "model/model.h"
#include "plugin/registry.h"
#include "formats/safetensors.h"
#include "testutil.h"

#define GQA_DIR MT_FIXTURE_DIR "/tiny_gqa"

typedef struct fixture {
    mt_backend be;
    mt_model *model;
    mt_plugin *loss_plugin, *adapter_plugin;
    mt_plugin_instance *loss, *adapter;
    mt_safetensors *ref;
    int32_t tokens[64], targets[64];
    int B, T;
} fixture;

static void read_batch(fixture *f, const char *ref_path) {
    mt_error err = {0};
    if (mt_st_open(ref_path, &f->ref, &err)) fail_msg("%s", err.msg);
    const mt_st_tensor *tok = mt_st_find(f->ref, "tokens"), *tgt = mt_st_find(f->ref, "targets");
    assert_non_null(tok);
    assert_non_null(tgt);
    f->B = (int)tok->shape[0];
    f->T = (int)tok->shape[1];
    assert_true(tok->nbytes <= sizeof f->tokens);
    memcpy(f->tokens, tok->data, tok->nbytes);
    memcpy(f->targets, tgt->data, tgt->nbytes);
}

static void setup(fixture *f, const char *ref_path, const mt_kv *loss_kv, size_t n_loss,
                  const mt_kv *adapter_kv, size_t n_adapter) {
    memset(f, 0, sizeof *f);
    mt_error err = {0};
    assert_int_equal(mt_backend_cpu_init(&f->be, 0, &err), MT_OK);
    if (mt_model_load_hf(GQA_DIR, &f->be, &f->model, &err)) fail_msg("%s", err.msg);
    read_batch(f, ref_path);
    f->loss_plugin = mt_test_load_plugin("cross_entropy");
    f->adapter_plugin = mt_test_load_plugin("full");
    if (mt_plugin_instantiate(f->loss_plugin, loss_kv, n_loss, &f->loss, &err) ||
        mt_plugin_instantiate(f->adapter_plugin, adapter_kv, n_adapter, &f->adapter, &err))
        fail_msg("%s", err.msg);
    if (mt_model_attach_adapter(f->model, f->adapter->desc->vtable, f->adapter->state, &err))
        fail_msg("%s", err.msg);
    if (mt_model_plan(f->model, f->B, f->T, 5, &err)) fail_msg("%s", err.msg);
}

static void teardown(fixture *f) {
    mt_plugin_instance_free(f->loss);
    mt_plugin_instance_free(f->adapter);
    mt_plugin_unload(f->loss_plugin);
    mt_plugin_unload(f->adapter_plugin);
    mt_st_close(f->ref);
    mt_model_free(f->model);
    mt_backend_cpu_shutdown(&f->be);
}

/* The loss of one batch normalised by step_items (0: by its own count). */
static mt_loss_result run_loss_items(fixture *f, const int32_t *targets, int backward,
                                     int64_t step_items) {
    const mt_loss_vtable *vt = f->loss->desc->vtable;
    mt_batch batch = {.size = sizeof(mt_batch), .B = f->B, .T = f->T, .tokens = f->tokens,
                      .targets = targets, .step_items = step_items};
    mt_loss_result r = {.size = sizeof r};
    mt_error err = {0};
    mt_model_zero_grad(f->model);
    if (vt->compute(f->loss->state, (mt_model_handle *)f->model, &batch, backward, &r, &err) ||
        mt_host_check("cross_entropy", &err))
        fail_msg("%s", err.msg);
    assert_int_equal(r.size, sizeof r);
    return r;
}

static mt_loss_result run_loss(fixture *f, const int32_t *targets, int backward) {
    return run_loss_items(f, targets, backward, 0);
}

/* Every trainable gradient of the model, concatenated (the caller frees it). */
static float *all_grads(fixture *f, size_t *total) {
    mt_param_view *params;
    size_t n, numel = 0;
    mt_error err = {0};
    assert_int_equal(mt_model_trainable_params(f->model, &params, &n, &err), MT_OK);
    for (size_t i = 0; i < n; i++) numel += (size_t)mt_tensor_numel(&params[i].grad);
    float *g = malloc(numel * sizeof(float)), *at = g;
    assert_non_null(g);
    for (size_t i = 0; i < n; i++) {
        if (mt_device_download(at, &params[i].grad, &err)) fail_msg("%s", err.msg);
        at += mt_tensor_numel(&params[i].grad);
    }
    free(params);
    *total = numel;
    return g;
}

/* Compares the loss and the gradient of every trainable parameter with the reference;
 * returns the number of trainable parameters checked. */
static size_t check_against(fixture *f, const mt_loss_result *r) {
    const mt_st_tensor *loss = mt_st_find(f->ref, "loss");
    float ref_loss;
    mt_error err = {0};
    assert_int_equal(mt_st_read_f32(loss, &ref_loss, &err), MT_OK);
    double le = fabs(r->loss - ref_loss) / fabs(ref_loss);
    printf("loss %.9g reference %.9g rel err %.3g\n", r->loss, ref_loss, le);
    assert_true(le < 1e-5);
    mt_param_view *params;
    size_t n;
    assert_int_equal(mt_model_trainable_params(f->model, &params, &n, &err), MT_OK);
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        char name[160];
        snprintf(name, sizeof name, "grad.%s", params[i].name);
        const mt_st_tensor *t = mt_st_find(f->ref, name);
        if (!t) fail_msg("no reference for %s", name);
        size_t numel = (size_t)mt_tensor_numel(&params[i].grad);
        float *g = malloc(numel * sizeof(float));
        assert_non_null(g);
        assert_int_equal(mt_st_read_f32(t, g, &err), MT_OK);
        float *mine = malloc(numel * sizeof(float));
        assert_non_null(mine);
        if (mt_device_download(mine, &params[i].grad, &err)) fail_msg("%s", err.msg);
        double e = mt_test_rel_err(mine, g, numel);
        if (!(e < 1e-4)) fail_msg("%s: rel err %.3g", params[i].name, e);
        worst = e > worst ? e : worst;
        free(mine);
        free(g);
    }
    printf("%zu trainable parameters, worst gradient rel err %.3g\n", n, worst);
    free(params);
    return n;
}

static void test_plain_cross_entropy_full_model(void **state) {
    (void)state;
    fixture f;
    setup(&f, GQA_DIR "/reference.safetensors", NULL, 0, NULL, 0);
    mt_loss_result r = run_loss(&f, f.targets, 1);
    assert_int_equal(r.n_tokens, 16);
    /* defaults train everything: all 20 parameters of tiny_gqa */
    assert_int_equal(check_against(&f, &r), f.model->num_params);
    teardown(&f);
}

static void test_label_smoothing_and_z_loss(void **state) {
    (void)state;
    fixture f;
    const mt_kv kv[] = {{.key = "label_smoothing", .type = MT_KV_NUMBER, .number = 0.1},
                        {.key = "z_loss", .type = MT_KV_NUMBER, .number = 1e-3}};
    setup(&f, MT_FIXTURE_DIR "/loss/reference.safetensors", kv, 2, NULL, 0);
    mt_loss_result r = run_loss(&f, f.targets, 1);
    check_against(&f, &r);
    teardown(&f);
}

static void test_full_adapter_selected_modules(void **state) {
    (void)state;
    fixture f;
    const char *modules[] = {"q_proj", "down_proj"};
    const mt_kv kv[] = {{.key = "target_modules", .type = MT_KV_LIST, .list = modules, .list_len = 2},
                        {.key = "train_embeddings", .type = MT_KV_BOOL, .boolean = 0},
                        {.key = "train_norms", .type = MT_KV_BOOL, .boolean = 0}};
    setup(&f, GQA_DIR "/reference.safetensors", NULL, 0, kv, 3);
    mt_loss_result r = run_loss(&f, f.targets, 1);
    /* 2 layers x (q_proj, down_proj); everything else stays frozen */
    assert_int_equal(check_against(&f, &r), 4);
    for (size_t i = 0; i < f.model->num_params; i++) {
        const char *name = f.model->params[i].name;
        int expect = strstr(name, "q_proj") || strstr(name, "down_proj");
        assert_int_equal(f.model->params[i].grad != NULL, expect);
    }
    teardown(&f);
}

static void test_ignore_index_option(void **state) {
    (void)state;
    fixture f;
    const mt_kv kv[] = {{.key = "ignore_index", .type = MT_KV_NUMBER, .number = 7}};
    setup(&f, GQA_DIR "/reference.safetensors", kv, 1, NULL, 0);
    int32_t custom[64], masked[64];
    int n = f.B * f.T, n7 = 0;
    for (int i = 0; i < n; i++) {
        custom[i] = f.targets[i] >= 0 ? (i % 3 == 0 ? 7 : f.targets[i]) : -100;
        masked[i] = custom[i] == 7 ? -100 : custom[i];
        n7 += custom[i] == 7;
    }
    assert_true(n7 > 0);
    mt_loss_result a = run_loss(&f, custom, 0), b = run_loss(&f, masked, 0);
    assert_true(a.loss == b.loss && a.n_tokens == b.n_tokens);
    /* the count the host sums over a step is the same as compute's */
    const mt_loss_vtable *cvt = f.loss->desc->vtable;
    assert_true(cvt->size >= sizeof(mt_loss_vtable) && cvt->count);
    mt_batch cb = {.size = sizeof(mt_batch), .B = f.B, .T = f.T, .tokens = f.tokens,
                   .targets = custom};
    assert_int_equal(cvt->count(f.loss->state, &cb), a.n_tokens);
    int n_on = 0;
    for (int i = 0; i < n; i++) n_on += custom[i] >= 0 && custom[i] != 7;
    assert_int_equal(a.n_tokens, n_on);
    /* and a target past the vocabulary is refused, naming row and position */
    custom[3] = f.model->cfg.vocab_size;
    const mt_loss_vtable *vt = f.loss->desc->vtable;
    mt_batch batch = {.size = sizeof(mt_batch), .B = f.B, .T = f.T, .tokens = f.tokens,
                      .targets = custom};
    mt_loss_result r = {.size = sizeof r};
    mt_error err = {0};
    assert_int_equal(vt->compute(f.loss->state, (mt_model_handle *)f.model, &batch, 0, &r, &err),
                     MT_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "position 3"));
    teardown(&f);
}

/* ABI 2: with step_items set, the batch is normalised by the step's items (here as if it
 * were a quarter of a step of 4 x 16 targets): loss, metrics and gradient are a quarter
 * of the batch's own mean (a power of two: no rounding beyond run-to-run noise), which
 * itself matches torch. A step smaller than its own batch is refused. */
static void test_step_items_normalisation(void **state) {
    (void)state;
    fixture f;
    setup(&f, GQA_DIR "/reference.safetensors", NULL, 0, NULL, 0);
    const mt_loss_vtable *vt = f.loss->desc->vtable;
    mt_batch cb = {.size = sizeof(mt_batch), .B = f.B, .T = f.T, .tokens = f.tokens,
                   .targets = f.targets};
    assert_int_equal(vt->count(f.loss->state, &cb), 16);
    mt_loss_result own = run_loss_items(&f, f.targets, 1, 0);
    check_against(&f, &own);
    size_t n;
    float *g_own = all_grads(&f, &n);
    mt_loss_result step = run_loss_items(&f, f.targets, 1, 64);
    float *g_step = all_grads(&f, &n);
    printf("step_items 64: loss %.9g, own mean %.9g\n", step.loss, own.loss);
    assert_int_equal(step.n_tokens, 16);
    assert_true(fabs(4 * step.loss - own.loss) <= 1e-12 * own.loss);
    assert_string_equal(step.metric_names[0], "nll");
    assert_true(fabs(4 * step.metrics[0] - own.metrics[0]) <= 1e-12 * own.metrics[0]);
    assert_true(fabs(4 * step.metrics[1] - own.metrics[1]) <= 1e-12 * own.metrics[1]);
    for (size_t i = 0; i < n; i++) g_step[i] *= 4.0f;
    const double e = mt_test_rel_err(g_step, g_own, n);
    printf("  gradient x 4 vs the batch's own: rel err %.3g\n", e);
    assert_true(e <= 1e-6);

    mt_batch small = cb;
    small.step_items = 15;
    mt_loss_result r = {.size = sizeof r};
    mt_error err = {0};
    assert_int_equal(vt->compute(f.loss->state, (mt_model_handle *)f.model, &small, 0, &r, &err),
                     MT_ERR_INVALID_ARG);
    printf("  %s\n", err.msg);
    free(g_own);
    free(g_step);
    teardown(&f);
}

/* The cross-entropy of masked targets the naive way, row by row through the contiguous
 * calls (mt_model_logits of one row, log-softmax in double here, d loss / d logits back
 * through mt_model_backward_logits): the reference for the row lists. CPU backend. */
static double naive_cross_entropy(fixture *f, const int32_t *targets) {
    const int V = f->model->cfg.vocab_size, BT = f->B * f->T;
    mt_error err = {0};
    int count = 0;
    for (int i = 0; i < BT; i++) count += targets[i] >= 0;
    float *logits = malloc((size_t)V * sizeof(float));
    assert_non_null(logits);
    mt_model_zero_grad(f->model);
    if (mt_model_forward(f->model, f->tokens, NULL, NULL, f->B, f->T, &err)) fail_msg("%s", err.msg);
    double loss = 0.0;
    for (int i = 0; i < BT; i++) {
        if (targets[i] < 0) continue;
        if (mt_model_logits(f->model, i, 1, logits, &err)) fail_msg("%s", err.msg);
        double mx = logits[0], sum = 0.0;
        for (int j = 1; j < V; j++) mx = logits[j] > mx ? logits[j] : mx;
        for (int j = 0; j < V; j++) sum += exp(logits[j] - mx);
        const double lse = mx + log(sum);
        loss += lse - logits[targets[i]];
        for (int j = 0; j < V; j++)
            logits[j] = (float)((exp(logits[j] - lse) - (j == targets[i])) / count);
        if (mt_model_backward_logits(f->model, i, 1, logits, &err)) fail_msg("%s", err.msg);
    }
    if (mt_model_backward(f->model, &err)) fail_msg("%s", err.msg);
    free(logits);
    return loss / count;
}

/* The output layer runs for the rows with a target only, listed across the batch's rows
 * (host->model_logits_rows in the plugin, mt_model_logits_rows in the core's own
 * cross-entropy). A batch masked like prompts (the first 7 positions of each row, 10 of
 * the 24 positions left) with a chunk of 5 rows: both give the naive row-by-row loss and
 * the same gradient of every parameter, the tied embedding / output layer included. */
static void test_target_rows_match_naive(void **state) {
    (void)state;
    fixture f;
    setup(&f, GQA_DIR "/reference.safetensors", NULL, 0, NULL, 0);
    int32_t masked[64];
    int n_on = 0;
    for (int i = 0; i < f.B * f.T; i++) {
        masked[i] = i % f.T < 7 ? -100 : f.targets[i] >= 0 ? f.targets[i] : (i * 7) % 100;
        n_on += masked[i] >= 0;
    }
    assert_int_equal(n_on, 10);
    size_t n;
    const double naive = naive_cross_entropy(&f, masked);
    float *g_naive = all_grads(&f, &n);
    mt_loss_result r = run_loss(&f, masked, 1);
    float *g_plugin = all_grads(&f, &n);
    mt_error err = {0};
    float core_loss;
    int64_t core_count;
    mt_model_zero_grad(f.model);
    if (mt_model_forward(f.model, f.tokens, NULL, NULL, f.B, f.T, &err) ||
        mt_model_cross_entropy(f.model, masked, 1, &core_loss, &core_count, &err) ||
        mt_model_backward(f.model, &err))
        fail_msg("%s", err.msg);
    float *g_core = all_grads(&f, &n);
    const double e_plugin = mt_test_rel_err(g_plugin, g_naive, n), e_core = mt_test_rel_err(g_core, g_naive, n);
    printf("target rows: naive loss %.9g, plugin %.9g, core %.9g; gradients rel err %.3g, %.3g\n", naive,
           r.loss, core_loss, e_plugin, e_core);
    assert_int_equal(r.n_tokens, 10);
    assert_int_equal(core_count, 10);
    assert_true(fabs(r.loss - naive) <= 1e-6 * naive);
    assert_true(fabs(core_loss - naive) <= 1e-6 * naive);
    assert_true(e_plugin <= 1e-5 && e_core <= 1e-5);
    free(g_naive);
    free(g_plugin);
    free(g_core);
    teardown(&f);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plain_cross_entropy_full_model),
        cmocka_unit_test(test_label_smoothing_and_z_loss),
        cmocka_unit_test(test_full_adapter_selected_modules),
        cmocka_unit_test(test_ignore_index_option),
        cmocka_unit_test(test_step_items_normalisation),
        cmocka_unit_test(test_target_rows_match_naive),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
