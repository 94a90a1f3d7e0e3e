/* test_train_step.c — one optimizer step through the plugins: a tiny model learns,
 * gradient accumulation equals the large batch, clipping bounds the norm, and a
 * non-finite loss skips the update. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "plugin/registry.h"
#include "testutil.h"
#include "model/train.h"

#define GQA_DIR MT_FIXTURE_DIR "/tiny_gqa"
#define ROWS 2
#define LEN 12

typedef struct rig {
    mt_backend be;
    mt_model *model;
    mt_plugin *plugins[3];
    mt_plugin_instance *loss, *opt, *adapter;
    int32_t tokens[ROWS * LEN], targets[ROWS * LEN];
} rig;

static mt_plugin *load_plugin(const char *name) {
    char path[512];
    snprintf(path, sizeof path, "%s/plugins/%s.so", MT_BUILD_DIR, name);
    mt_plugin *p = NULL;
    mt_error err = {0};
    if (mt_plugin_load(path, &p, &err)) fail_msg("%s", err.msg);
    return p;
}

static void rig_up(rig *r, const char *optimizer, const mt_kv *opt_kv, size_t n_opt) {
    memset(r, 0, sizeof *r);
    mt_error err = {0};
    assert_int_equal(mt_backend_cpu_init(&r->be, 0, &err), MT_OK);
    if (mt_model_load_hf(GQA_DIR, &r->be, &r->model, &err)) fail_msg("%s", err.msg);
    r->plugins[0] = load_plugin("cross_entropy");
    r->plugins[1] = load_plugin(optimizer);
    r->plugins[2] = load_plugin("full");
    if (mt_plugin_instantiate(r->plugins[0], NULL, 0, &r->loss, &err) ||
        mt_plugin_instantiate(r->plugins[1], opt_kv, n_opt, &r->opt, &err) ||
        mt_plugin_instantiate(r->plugins[2], NULL, 0, &r->adapter, &err) ||
        mt_model_attach_adapter(r->model, r->adapter->desc->vtable, r->adapter->state, &err) ||
        mt_model_plan(r->model, ROWS, LEN, 0, &err))
        fail_msg("%s", err.msg);
    /* every row has the same number of targets (8), so the mean over micro-batches
     * equals the mean over the whole batch */
    for (int i = 0; i < ROWS * LEN; i++) {
        r->tokens[i] = (i * 29 + 3) % r->model->cfg.vocab_size;
        r->targets[i] = i % LEN < 3 || i % LEN == LEN - 1 ? -100 : (i * 17 + 5) % r->model->cfg.vocab_size;
    }
}

static void rig_down(rig *r) {
    mt_plugin_instance_free(r->loss);
    mt_plugin_instance_free(r->opt);
    mt_plugin_instance_free(r->adapter);
    for (int i = 0; i < 3; i++) mt_plugin_unload(r->plugins[i]);
    mt_model_free(r->model);
    mt_backend_cpu_shutdown(&r->be);
}

static mt_step_result step(rig *r, const mt_batch *batches, int n, double lr, int64_t k,
                           double clip) {
    mt_step_result res;
    mt_error err = {0};
    if (mt_train_step(r->model, r->loss, r->opt, batches, n, lr, k, clip, &res, &err))
        fail_msg("%s", err.msg);
    return res;
}

static void test_tiny_model_learns_with_adamw(void **state) {
    (void)state;
    rig r;
    rig_up(&r, "adamw", NULL, 0);
    mt_batch batch = {.B = ROWS, .T = LEN, .tokens = r.tokens, .targets = r.targets};
    double first = 0, last = 0;
    for (int k = 1; k <= 30; k++) {
        mt_step_result res = step(&r, &batch, 1, 1e-2, k, 1.0);
        assert_false(res.skipped);
        assert_int_equal(res.n_tokens, 16);
        if (k == 1) first = res.loss;
        last = res.loss;
    }
    printf("loss %.4f -> %.4f after 30 AdamW steps\n", first, last);
    assert_true(last < 0.25 * first); /* memorising one batch: the loss must collapse */
    rig_down(&r);
}

static void copy_grads(mt_model *m, float **out, size_t *total) {
    mt_param_view *params;
    size_t n, numel = 0;
    mt_error err = {0};
    assert_int_equal(mt_model_trainable_params(m, &params, &n, &err), MT_OK);
    for (size_t i = 0; i < n; i++) numel += (size_t)mt_tensor_numel(&params[i].grad);
    float *g = malloc(numel * sizeof(float));
    assert_non_null(g);
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        size_t k = (size_t)mt_tensor_numel(&params[i].grad);
        memcpy(g + off, params[i].grad.data, k * sizeof(float));
        off += k;
    }
    free(params);
    *out = g;
    *total = numel;
}

static void test_accumulation_equals_full_batch(void **state) {
    (void)state;
    rig r;
    rig_up(&r, "sgd", NULL, 0);
    mt_batch whole = {.B = ROWS, .T = LEN, .tokens = r.tokens, .targets = r.targets};
    mt_batch halves[2] = {{.B = 1, .T = LEN, .tokens = r.tokens, .targets = r.targets},
                          {.B = 1, .T = LEN, .tokens = r.tokens + LEN, .targets = r.targets + LEN}};
    /* lr 0: no update, so both gradients come from the same weights */
    mt_step_result a = step(&r, &whole, 1, 0.0, 1, 0.0);
    float *ga;
    size_t n;
    copy_grads(r.model, &ga, &n);
    mt_step_result b = step(&r, halves, 2, 0.0, 2, 0.0);
    float *gb;
    copy_grads(r.model, &gb, &n);
    double e = mt_test_rel_err(gb, ga, n);
    printf("accumulated vs full batch: loss %.9g vs %.9g, gradient rel err %.3g\n", b.loss, a.loss, e);
    assert_true(fabs(a.loss - b.loss) < 1e-6 * fabs(a.loss));
    assert_true(e < 1e-5); /* summation order differs; wrong averaging would be O(1) */
    assert_true(fabs(a.grad_norm - b.grad_norm) < 1e-5 * a.grad_norm);
    free(ga);
    free(gb);
    rig_down(&r);
}

static void test_clipping_bounds_the_norm(void **state) {
    (void)state;
    rig r;
    rig_up(&r, "sgd", NULL, 0);
    mt_batch batch = {.B = ROWS, .T = LEN, .tokens = r.tokens, .targets = r.targets};
    mt_step_result res = step(&r, &batch, 1, 0.0, 1, 0.01);
    assert_true(res.grad_norm > 0.01);
    double after = mt_model_clip_grad_norm(r.model, 0.0); /* measures only */
    printf("norm %.6g clipped to %.6g\n", res.grad_norm, after);
    assert_true(fabs(after - 0.01) < 1e-6);
    rig_down(&r);
}

static void test_non_finite_loss_skips_the_update(void **state) {
    (void)state;
    rig r;
    rig_up(&r, "adamw", NULL, 0);
    mt_batch batch = {.B = ROWS, .T = LEN, .tokens = r.tokens, .targets = r.targets};
    mt_param *norm = mt_model_find_param(r.model, "model.norm.weight");
    assert_non_null(norm);
    norm->data[0] = NAN;
    mt_param *q = mt_model_find_param(r.model, "model.layers.0.self_attn.q_proj.weight");
    float before = q->data[5];
    mt_step_result res = step(&r, &batch, 1, 1e-2, 1, 1.0);
    assert_true(res.skipped);
    assert_true(q->data[5] == before);
    rig_down(&r);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiny_model_learns_with_adamw),
        cmocka_unit_test(test_accumulation_equals_full_batch),
        cmocka_unit_test(test_clipping_bounds_the_norm),
        cmocka_unit_test(test_non_finite_loss_skips_the_update),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
