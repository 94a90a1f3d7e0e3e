/* test_grpo.c — the grpo loss plugin (MT_BUILD_DIR/plugins/grpo.so, through dlopen) on
 * tests/fixtures/tiny_gqa with a LoRA adapter (r=4, alpha=8, all-linear, the values of
 * tests/fixtures/lora/reference.safetensors), on a rollout batch of four completions and
 * a padding row:
 * - parity with TRL's GRPOTrainer loss formulas computed in float64 by PyTorch + PEFT
 *   (tests/fixtures/grpo/reference.safetensors, made by
 *   tests/parity/make_grpo_reference.py): for grpo (beta 0.04), dapo (beta 0.04,
 *   epsilon_high 0.28), dr_grpo (beta 0, max_completion_length 10) and dapo (beta 0),
 *   all at temperature 0.7, the loss (1e-5 relative), the KL and clip-ratio metrics and
 *   every lora_A / lora_B gradient (1e-4 relative to the tensor's largest value);
 * - the per-token log-probabilities at the temperature, of the policy (adapters on) and
 *   of the reference (adapters off), against the fixture's;
 * - the items (`count`) of each normalisation, and accumulation: rows 0-1 and 2-4 as two
 *   micro-batches of a step of the whole batch's items sum to the loss and gradients of
 *   the whole batch (and, for dapo, to its metrics); a batch of padding alone is empty;
 * - refusals: a batch that is not a rollout, a non-finite advantage or sampling
 *   log-probability on a target, a target outside the vocabulary, a step smaller than
 *   the batch, a non-finite loss, dr_grpo without max_completion_length, a negative
 *   epsilon_high other than -1, and beta > 0 where the base is not frozen (a trainable
 *   norm, full fine-tuning), which beta = 0 accepts. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "formats/safetensors.h"
#include "model/model.h"
#include "plugin/registry.h"
#include "testutil.h"

#define GQA_DIR MT_FIXTURE_DIR "/tiny_gqa"
#define LORA_REF MT_FIXTURE_DIR "/lora/reference.safetensors"
#define GRPO_REF MT_FIXTURE_DIR "/grpo/reference.safetensors"
#define MAX_ROWS 8
#define MAX_T 16
#define TEMPERATURE 0.7

/* The fixture's cases, as make_grpo_reference.py writes them. */
typedef struct grpo_case {
    const char *name, *loss_type;
    double beta, epsilon, epsilon_high;
    int max_completion_length;
} grpo_case;

static const grpo_case cases[] = {
    {"grpo", "grpo", 0.04, 0.2, 0.2, 0},
    {"dapo", "dapo", 0.04, 0.2, 0.28, 0},
    {"dr_grpo", "dr_grpo", 0.0, 0.2, 0.2, 10},
    {"dapo_beta0", "dapo", 0.0, 0.2, 0.2, 0},
};

static const char *const metric_names[] = {"clip_ratio/low_mean", "clip_ratio/high_mean",
                                           "clip_ratio/region_mean", "kl"};

static const mt_host *H(void) { return mt_host_table(); }

typedef struct fixture {
    mt_safetensors *ref, *lora_ref;
    mt_backend be;
    mt_model *model;
    mt_plugin *lora, *grpo;
    mt_plugin_instance *lora_inst;
    int B, T, V;
    int32_t tokens[MAX_ROWS * MAX_T], targets[MAX_ROWS * MAX_T];
    float advantages[MAX_ROWS], old_logps[MAX_ROWS * MAX_T];
} fixture;

/* tiny_gqa, with a LoRA adapter holding the reference's values when with_lora. */
static mt_model *load_model(fixture *f, int with_lora) {
    mt_error err = {0};
    mt_model *m = NULL;
    if (mt_model_load_hf(GQA_DIR, &f->be, &m, &err)) fail_msg("%s", err.msg);
    if (with_lora) f->lora_inst = mt_test_attach_reference_lora(m, f->lora, f->lora_ref);
    /* chunks of 5 rows: they straddle rows, and two hold only the padding row */
    if (mt_model_plan(m, f->B, f->T, 5, &err)) fail_msg("%s", err.msg);
    return m;
}

static int setup(void **state) {
    fixture *f = calloc(1, sizeof *f);
    assert_non_null(f);
    mt_error err = {0};
    if (mt_st_open(GRPO_REF, &f->ref, &err)) fail_msg("%s", err.msg);
    if (mt_st_open(LORA_REF, &f->lora_ref, &err)) fail_msg("%s", err.msg);
    const mt_st_tensor *tok = mt_st_find(f->ref, "tokens"), *tgt = mt_st_find(f->ref, "targets");
    assert_non_null(tok);
    assert_non_null(tgt);
    assert_int_equal(tok->dtype, MT_ST_I32);
    assert_int_equal(tgt->dtype, MT_ST_I32);
    f->B = (int)tok->shape[0];
    f->T = (int)tok->shape[1];
    assert_true(f->B == 5 && f->T <= MAX_T);
    memcpy(f->tokens, tok->data, tok->nbytes);
    memcpy(f->targets, tgt->data, tgt->nbytes);
    size_t n;
    float *adv = mt_test_read_f32(f->ref, "advantages", &n);
    assert_int_equal(n, (size_t)f->B);
    memcpy(f->advantages, adv, n * sizeof(float));
    free(adv);
    float *old = mt_test_read_f32(f->ref, "old_logps", &n);
    assert_int_equal(n, (size_t)f->B * f->T);
    memcpy(f->old_logps, old, n * sizeof(float));
    free(old);
    assert_true(isnan(f->advantages[4])); /* the padding row */
    for (int t = 0; t < f->T; t++) assert_true(f->targets[4 * f->T + t] < 0);
    assert_int_equal(mt_backend_cpu_init(&f->be, 0, &err), MT_OK);
    f->lora = mt_test_load_plugin("lora");
    f->grpo = mt_test_load_plugin("grpo");
    f->model = load_model(f, 1);
    f->V = f->model->cfg.vocab_size;
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fixture *f = *state;
    mt_model_free(f->model);
    mt_plugin_instance_free(f->lora_inst);
    mt_plugin_unload(f->lora);
    mt_plugin_unload(f->grpo);
    mt_backend_cpu_shutdown(&f->be);
    mt_st_close(f->ref);
    mt_st_close(f->lora_ref);
    free(f);
    return 0;
}

/* An instance for a case; epsilon_high and max_completion_length are given only where
 * they differ from their defaults (the same as epsilon, none), so those are tested too. */
static mt_status grpo_try_instance(fixture *f, const grpo_case *c, mt_plugin_instance **inst,
                                   mt_error *err) {
    mt_kv kv[6] = {{.key = "beta", .type = MT_KV_NUMBER, .number = c->beta},
                   {.key = "loss_type", .type = MT_KV_STRING, .string = c->loss_type},
                   {.key = "epsilon", .type = MT_KV_NUMBER, .number = c->epsilon},
                   {.key = "temperature", .type = MT_KV_NUMBER, .number = TEMPERATURE}};
    size_t n = 4;
    if (c->epsilon_high != c->epsilon)
        kv[n++] = (mt_kv){.key = "epsilon_high", .type = MT_KV_NUMBER, .number = c->epsilon_high};
    if (c->max_completion_length)
        kv[n++] = (mt_kv){.key = "max_completion_length", .type = MT_KV_NUMBER,
                          .number = c->max_completion_length};
    *inst = NULL;
    return mt_plugin_instantiate(f->grpo, kv, n, inst, err);
}

static mt_plugin_instance *grpo_instance(fixture *f, const grpo_case *c) {
    mt_plugin_instance *inst = NULL;
    mt_error err = {0};
    if (grpo_try_instance(f, c, &inst, &err)) fail_msg("%s", err.msg);
    return inst;
}

/* The loss of batch b through a loss instance, on model m. */
static mt_status loss_compute(mt_model *m, mt_plugin_instance *inst, mt_batch b, int backward,
                              mt_loss_result *r, mt_error *err) {
    *r = (mt_loss_result){.size = sizeof *r};
    const mt_loss_vtable *vt = inst->desc->vtable;
    mt_status st = vt->compute(inst->state, (mt_model_handle *)m, &b, backward, r, err);
    if (!st) st = mt_host_check(inst->desc->name, err);
    return st;
}

/* Rows [row0, row0 + rows) of the fixture's batch, as a rollout batch. */
static mt_batch rollout_batch(fixture *f, int row0, int rows, int64_t step_items) {
    return (mt_batch){.size = sizeof(mt_batch), .B = rows, .T = f->T,
                      .tokens = f->tokens + row0 * f->T, .targets = f->targets + row0 * f->T,
                      .step_items = step_items, .advantages = f->advantages + row0,
                      .old_logps = f->old_logps + row0 * f->T};
}

static mt_status grpo_compute(fixture *f, mt_plugin_instance *inst, int row0, int rows,
                              int64_t step_items, int backward, mt_loss_result *r,
                              mt_error *err) {
    return loss_compute(f->model, inst, rollout_batch(f, row0, rows, step_items), backward, r,
                        err);
}

static int64_t grpo_count(fixture *f, mt_plugin_instance *inst, int row0, int rows) {
    const mt_loss_vtable *vt = inst->desc->vtable;
    mt_batch b = rollout_batch(f, row0, rows, 0);
    return vt->count(inst->state, &b);
}

/* ---- parity with TRL's formulas ---- */

static void test_grpo_parity(void **state) {
    fixture *f = *state;
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        const grpo_case *c = &cases[k];
        printf("case %s (%s, beta %g, epsilon %g, epsilon_high %g, max_completion_length %d)\n",
               c->name, c->loss_type, c->beta, c->epsilon, c->epsilon_high,
               c->max_completion_length);
        mt_plugin_instance *inst = grpo_instance(f, c);
        /* the items: rows with a target (4), target tokens (25), rows x 10 */
        const int64_t items = grpo_count(f, inst, 0, f->B);
        const int64_t want = !strcmp(c->loss_type, "grpo")  ? 4
                             : !strcmp(c->loss_type, "dapo") ? 25
                                                             : 4 * c->max_completion_length;
        assert_int_equal(items, want);
        mt_error err = {0};
        mt_model_zero_grad(f->model);
        mt_loss_result r;
        if (grpo_compute(f, inst, 0, f->B, items, 1, &r, &err)) fail_msg("%s", err.msg);
        char name[200];
        snprintf(name, sizeof name, "%s.loss", c->name);
        const double ref_loss = mt_test_read_scalar(f->ref, name);
        const double loss_err = fabs(r.loss - ref_loss) / fabs(ref_loss);
        printf("  %-28s %.9g reference %.9g (rel error %.2g)\n", "loss", r.loss, ref_loss,
               loss_err);
        if (!(loss_err <= 1e-5)) fail_msg("%s: loss rel error %.3g", c->name, loss_err);
        assert_int_equal(r.n_tokens, items);
        assert_int_equal(r.n_metrics, c->beta > 0 ? 4 : 3);
        for (int m = 0; m < r.n_metrics; m++) {
            assert_string_equal(r.metric_names[m], metric_names[m]);
            snprintf(name, sizeof name, "%s.%s", c->name, metric_names[m]);
            mt_test_check_close(metric_names[m], r.metrics[m], mt_test_read_scalar(f->ref, name), 1e-5);
        }
        mt_param_view *v;
        size_t n;
        assert_int_equal(mt_model_trainable_params(f->model, &v, &n, &err), MT_OK);
        double worst = 0.0;
        const char *worst_name = "";
        for (size_t i = 0; i < n; i++) {
            snprintf(name, sizeof name, "%s.grad.%s", c->name, v[i].name);
            size_t numel;
            float *ref = mt_test_read_f32(f->ref, name, &numel);
            assert_int_equal(numel, (size_t)mt_tensor_numel(&v[i].grad));
            float *got = malloc(numel * sizeof(float));
            assert_non_null(got);
            if (H()->tensor_download(got, &v[i].grad, &err)) fail_msg("%s", err.msg);
            double e = mt_test_rel_err(got, ref, numel);
            if (!(e <= 1e-4)) fail_msg("%s: gradient of %s: rel err %.3g", c->name, v[i].name, e);
            if (e > worst) worst = e, worst_name = v[i].name;
            free(got);
            free(ref);
        }
        printf("  %zu LoRA gradients, worst rel err %.3g (%s)\n", n, worst, worst_name);
        free(v);
        /* outside training (step_items 0) the batch normalises by its own items: the same */
        mt_loss_result eval;
        if (grpo_compute(f, inst, 0, f->B, 0, 0, &eval, &err)) fail_msg("%s", err.msg);
        assert_true(fabs(eval.loss - r.loss) <= 1e-12 * fabs(r.loss));
        mt_plugin_instance_free(inst);
    }
}

/* ---- the per-token log-probabilities at the temperature ---- */

static void test_token_logps(void **state) {
    fixture *f = *state;
    mt_batch b = rollout_batch(f, 0, f->B, 0);
    const size_t n = (size_t)f->B * f->T * f->V;
    float *logits = malloc(n * sizeof(float));
    assert_non_null(logits);
    const char *names[] = {"ref_logps", "policy_logps"};
    for (int enabled = 0; enabled < 2; enabled++) {
        mt_error err = {0};
        if (H()->model_forward((mt_model_handle *)f->model, &b, enabled, &err) ||
            mt_model_logits(f->model, 0, f->B * f->T, logits, &err))
            fail_msg("%s", err.msg);
        float *want = mt_test_read_f32(f->ref, names[enabled], NULL);
        double got[MAX_ROWS * MAX_T], ref[MAX_ROWS * MAX_T];
        size_t m = 0;
        for (int i = 0; i < f->B * f->T; i++) {
            const int32_t target = f->targets[i];
            if (target < 0) continue;
            const float *row = logits + (size_t)i * f->V;
            double mx = row[0] / TEMPERATURE, sum = 0.0;
            for (int j = 1; j < f->V; j++) mx = fmax(mx, row[j] / TEMPERATURE);
            for (int j = 0; j < f->V; j++) sum += exp(row[j] / TEMPERATURE - mx);
            got[m] = row[target] / TEMPERATURE - mx - log(sum);
            ref[m++] = want[i];
        }
        assert_int_equal(m, 25);
        double e = mt_test_rel_err_d(got, ref, m);
        printf("  %-13s %zu tokens, rel err %.3g\n", names[enabled], m, e);
        assert_true(e <= 1e-5);
        free(want);
    }
    free(logits);
}

/* ---- accumulation over unequal micro-batches ---- */

static void test_accumulation(void **state) {
    fixture *f = *state;
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        const grpo_case *c = &cases[k];
        mt_plugin_instance *inst = grpo_instance(f, c);
        const int64_t items = grpo_count(f, inst, 0, f->B);
        assert_int_equal(grpo_count(f, inst, 0, 2) + grpo_count(f, inst, 2, f->B - 2), items);
        mt_error err = {0};
        mt_loss_result whole, part;
        mt_model_zero_grad(f->model);
        if (grpo_compute(f, inst, 0, f->B, items, 1, &whole, &err)) fail_msg("%s", err.msg);
        size_t n;
        float *g_whole = mt_test_all_grads(f->model, &n);
        /* rows 0-1, then 2-4 (with the padding row), each normalised by the step's items */
        mt_model_zero_grad(f->model);
        double sum = 0.0, metrics[MT_LOSS_MAX_METRICS] = {0};
        int64_t part_items = 0;
        const int splits[2][2] = {{0, 2}, {2, f->B - 2}};
        for (int s = 0; s < 2; s++) {
            if (grpo_compute(f, inst, splits[s][0], splits[s][1], items, 1, &part, &err))
                fail_msg("%s", err.msg);
            sum += part.loss;
            part_items += part.n_tokens;
            assert_int_equal(part.n_metrics, whole.n_metrics);
            for (int m = 0; m < part.n_metrics; m++) metrics[m] += part.metrics[m];
        }
        float *g_parts = mt_test_all_grads(f->model, &n);
        double e = mt_test_rel_err(g_parts, g_whole, n);
        printf("%s: loss %.9g as micro-batches %.9g, gradient rel err %.3g\n", c->name,
               whole.loss, sum, e);
        assert_int_equal(part_items, items);
        /* fp32 products of 2 rows and of the whole batch are blocked differently (with
         * OpenBLAS' AVX-512 kernels: 1.06e-6 here); the PyTorch parity bound is 1e-5 */
        assert_true(fabs(sum - whole.loss) <= 4e-6 * fabs(whole.loss));
        assert_true(e <= 1e-5);
        /* dapo's metrics are token means over the step, so they add up exactly; grpo's and
         * dr_grpo's weigh each micro-batch's token means by its share of the step's rows */
        if (!strcmp(c->loss_type, "dapo"))
            for (int m = 0; m < whole.n_metrics; m++)
                assert_true(fabs(metrics[m] - whole.metrics[m]) <=
                            1e-6 * fmax(fabs(whole.metrics[m]), 1));
        free(g_whole), free(g_parts);

        /* a micro-batch of padding alone: no items, loss 0, no gradient */
        assert_int_equal(grpo_count(f, inst, f->B - 1, 1), 0);
        mt_model_zero_grad(f->model);
        if (grpo_compute(f, inst, f->B - 1, 1, items, 1, &part, &err)) fail_msg("%s", err.msg);
        assert_true(part.loss == 0.0);
        assert_int_equal(part.n_tokens, 0);
        float *g_pad = mt_test_all_grads(f->model, &n);
        for (size_t i = 0; i < n; i++) assert_true(g_pad[i] == 0.0f);
        free(g_pad);
        mt_plugin_instance_free(inst);
    }
}

/* ---- refusals ---- */

static void expect_refusal(mt_model *m, mt_plugin_instance *inst, mt_batch b, mt_status want,
                           const char *needle) {
    mt_error err = {0};
    mt_loss_result r;
    mt_status st = loss_compute(m, inst, b, 1, &r, &err);
    printf("  refused: %s\n", err.msg);
    assert_int_not_equal(st, MT_OK);
    if (want) assert_int_equal(st, want);
    if (!strstr(err.msg, needle)) fail_msg("expected \"%s\" in: %s", needle, err.msg);
}

static void test_refusals(void **state) {
    fixture *f = *state;
    mt_plugin_instance *inst = grpo_instance(f, &cases[0]); /* beta 0.04 */
    mt_error err = {0};
    mt_loss_result r;
    mt_batch b = rollout_batch(f, 0, f->B, 0);
    /* not a rollout: no advantages, or a host whose batch predates the rollout fields */
    mt_batch plain = b;
    plain.advantages = NULL;
    expect_refusal(f->model, inst, plain, MT_ERR_INVALID_ARG, "not a batch of sampled completions");
    plain = b;
    plain.old_logps = NULL;
    expect_refusal(f->model, inst, plain, MT_ERR_INVALID_ARG, "not a batch of sampled completions");
    plain = b;
    plain.size = (uint32_t)offsetof(mt_batch, advantages);
    expect_refusal(f->model, inst, plain, MT_ERR_INVALID_ARG, "not a batch of sampled completions");
    /* a completion without a finite advantage; a sampling log-probability that is not */
    const float adv1 = f->advantages[1];
    f->advantages[1] = NAN;
    expect_refusal(f->model, inst, b, MT_ERR_INVALID_ARG, "advantage of row 1");
    f->advantages[1] = adv1;
    int first = 0; /* row 2's first target position */
    while (f->targets[2 * f->T + first] < 0) first++;
    const float old = f->old_logps[2 * f->T + first];
    f->old_logps[2 * f->T + first] = INFINITY;
    char needle[64];
    snprintf(needle, sizeof needle, "row 2, position %d", first);
    expect_refusal(f->model, inst, b, MT_ERR_INVALID_ARG, needle);
    /* a sampling log-probability so low that a negative advantage's ratio overflows */
    f->old_logps[2 * f->T + first] = old;
    int first1 = 0;
    while (f->targets[1 * f->T + first1] < 0) first1++;
    const float old1 = f->old_logps[1 * f->T + first1];
    f->old_logps[1 * f->T + first1] = -1e30f;
    expect_refusal(f->model, inst, b, MT_ERR_NUMERIC, "not finite");
    f->old_logps[1 * f->T + first1] = old1;
    /* a target outside the vocabulary */
    const int32_t tgt = f->targets[2 * f->T + first];
    f->targets[2 * f->T + first] = f->V;
    expect_refusal(f->model, inst, b, MT_ERR_INVALID_ARG, "outside the vocabulary");
    f->targets[2 * f->T + first] = tgt;
    /* a step smaller than the batch */
    b.step_items = 3;
    expect_refusal(f->model, inst, b, MT_ERR_INVALID_ARG, "the step has 3 items");
    b.step_items = 0;
    assert_int_equal(loss_compute(f->model, inst, b, 0, &r, &err), MT_OK);

    /* options: dr_grpo needs max_completion_length; epsilon_high is >= 0 or -1 */
    mt_plugin_instance *bad = NULL;
    grpo_case c = cases[2];
    c.max_completion_length = 0;
    assert_int_not_equal(grpo_try_instance(f, &c, &bad, &err), MT_OK);
    printf("  refused: %s\n", err.msg);
    assert_null(bad);
    assert_non_null(strstr(err.msg, "max_completion_length"));
    c = cases[0];
    c.epsilon_high = -0.5;
    assert_int_not_equal(grpo_try_instance(f, &c, &bad, &err), MT_OK);
    printf("  refused: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "epsilon_high"));

    /* a trainable base norm: the reference would move with the policy; beta 0 needs none */
    mt_plugin_instance *no_kl = grpo_instance(f, &cases[3]);
    mt_param *norm = NULL;
    for (size_t i = 0; i < f->model->num_params; i++)
        if (strstr(f->model->params[i].name, "norm")) norm = &f->model->params[i];
    assert_non_null(norm);
    assert_int_equal(mt_model_set_trainable(f->model, norm, 1, &err), MT_OK);
    expect_refusal(f->model, inst, b, MT_ERR_INVALID_ARG, "the base must stay frozen");
    assert_int_equal(loss_compute(f->model, no_kl, b, 1, &r, &err), MT_OK);
    assert_int_equal(mt_model_set_trainable(f->model, norm, 0, &err), MT_OK);
    assert_int_equal(loss_compute(f->model, inst, b, 0, &r, &err), MT_OK);

    /* full fine-tuning: no adapter to disable, so no KL; beta 0 trains */
    mt_model *full = load_model(f, 0);
    assert_int_equal(mt_model_set_all_trainable(full, &err), MT_OK);
    expect_refusal(full, inst, b, MT_ERR_INVALID_ARG, "the base must stay frozen");
    assert_int_equal(loss_compute(full, no_kl, b, 1, &r, &err), MT_OK);
    assert_true(isfinite(r.loss) && r.loss != 0.0);
    mt_model_free(full);
    mt_plugin_instance_free(no_kl);
    mt_plugin_instance_free(inst);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_grpo_parity),
        cmocka_unit_test(test_token_logps),
        cmocka_unit_test(test_accumulation),
        cmocka_unit_test(test_refusals),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
