/* test_dpo.c — the dpo loss plugin (MT_BUILD_DIR/plugins/dpo.so, through dlopen) on
 * tests/fixtures/tiny_gqa with a LoRA adapter (r=4, alpha=8, all-linear, the values of
 * tests/fixtures/lora/reference.safetensors):
 * - parity with TRL's DPO formulas computed in float64 by PyTorch + PEFT
 *   (tests/fixtures/dpo/reference.safetensors, made by tests/parity/make_dpo_reference.py):
 *   for sigmoid, cDPO, robust, hinge, ipo and sigmoid+RPO, the loss (1e-5 relative),
 *   TRL's seven metrics and every lora_A / lora_B gradient (1e-4 relative);
 * - the reference pass: the model with adapters disabled gives the logits of the same
 *   model without any adapter bit for bit, and its log-probabilities are the fixture's
 *   base model's; the policy's are the fixture's PEFT model's;
 * - accumulation: the pairs split into micro-batches of unequal sizes with the step's
 *   pair count sum to the loss and gradients of the whole batch;
 * - precomputed reference log-probabilities (batch->ref_logps, as the core's
 *   mt_model_sequence_logps computes them before training) give the loss and gradients
 *   of the adapters-disabled pass, and allow a trainable base; padding pairs (no target
 *   on either row) count for nothing;
 * - refusals: an odd row count, a pair whose answer has no target, a trainable base
 *   without precomputed references, a batch not marked as pairs, a missing reference;
 *   and cross_entropy refuses a batch of pairs. */
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
#define DPO_REF MT_FIXTURE_DIR "/dpo/reference.safetensors"
#define MAX_ROWS 8
#define MAX_T 16

/* The fixture's cases, as make_dpo_reference.py writes them. */
typedef struct dpo_case {
    const char *name, *loss_type;
    double beta, label_smoothing, rpo_alpha;
} dpo_case;

static const dpo_case cases[] = {
    {"sigmoid", "sigmoid", 0.1, 0.0, 0.0}, {"cdpo", "sigmoid", 0.5, 0.2, 0.0},
    {"robust", "robust", 0.5, 0.2, 0.0},   {"hinge", "hinge", 0.5, 0.0, 0.0},
    {"ipo", "ipo", 0.5, 0.0, 0.0},         {"rpo", "sigmoid", 0.1, 0.0, 0.5},
};

static const char *const metric_names[] = {"rewards/chosen", "rewards/rejected",
                                           "rewards/accuracies", "rewards/margins",
                                           "logps/chosen", "logps/rejected", "nll_loss"};

static const mt_host *H(void) { return mt_host_table(); }

typedef struct fixture {
    mt_safetensors *ref, *lora_ref;
    mt_backend be;
    mt_model *model;
    mt_plugin *lora, *dpo;
    mt_plugin_instance *lora_inst;
    int B, T, V;
    int32_t tokens[MAX_ROWS * MAX_T], targets[MAX_ROWS * MAX_T];
} fixture;

/* tiny_gqa with a LoRA adapter holding the reference's values (adapter NULL: none). */
static mt_model *load_model(fixture *f, int with_lora) {
    mt_error err = {0};
    mt_model *m = NULL;
    if (mt_model_load_hf(GQA_DIR, &f->be, &m, &err)) fail_msg("%s", err.msg);
    if (with_lora) f->lora_inst = mt_test_attach_reference_lora(m, f->lora, f->lora_ref);
    if (mt_model_plan(m, f->B + 2, f->T, 5, &err)) fail_msg("%s", err.msg); /* + a padding pair */
    return m;
}

static int setup(void **state) {
    fixture *f = calloc(1, sizeof *f);
    assert_non_null(f);
    mt_error err = {0};
    if (mt_st_open(DPO_REF, &f->ref, &err)) fail_msg("%s", err.msg);
    if (mt_st_open(LORA_REF, &f->lora_ref, &err)) fail_msg("%s", err.msg);
    const mt_st_tensor *tok = mt_st_find(f->ref, "tokens"), *tgt = mt_st_find(f->ref, "targets");
    assert_non_null(tok);
    assert_non_null(tgt);
    assert_int_equal(tok->dtype, MT_ST_I32);
    assert_int_equal(tgt->dtype, MT_ST_I32);
    f->B = (int)tok->shape[0];
    f->T = (int)tok->shape[1];
    assert_true(f->B <= MAX_ROWS && f->T <= MAX_T && f->B % 2 == 0);
    memcpy(f->tokens, tok->data, tok->nbytes);
    memcpy(f->targets, tgt->data, tgt->nbytes);
    assert_int_equal(mt_backend_cpu_init(&f->be, 0, &err), MT_OK);
    f->lora = mt_test_load_plugin("lora");
    f->dpo = mt_test_load_plugin("dpo");
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
    mt_plugin_unload(f->dpo);
    mt_backend_cpu_shutdown(&f->be);
    mt_st_close(f->ref);
    mt_st_close(f->lora_ref);
    free(f);
    return 0;
}

static mt_plugin_instance *dpo_instance(fixture *f, const dpo_case *c) {
    mt_kv kv[] = {{.key = "beta", .type = MT_KV_NUMBER, .number = c->beta},
                  {.key = "loss_type", .type = MT_KV_STRING, .string = c->loss_type},
                  {.key = "label_smoothing", .type = MT_KV_NUMBER, .number = c->label_smoothing},
                  {.key = "rpo_alpha", .type = MT_KV_NUMBER, .number = c->rpo_alpha}};
    mt_plugin_instance *inst = NULL;
    mt_error err = {0};
    if (mt_plugin_instantiate(f->dpo, kv, 4, &inst, &err)) fail_msg("%s", err.msg);
    return inst;
}

/* The loss of batch b (size and pairs as given) through a loss instance. */
static mt_status loss_compute(fixture *f, mt_plugin_instance *inst, mt_batch b, int backward,
                              mt_loss_result *r, mt_error *err) {
    *r = (mt_loss_result){.size = sizeof *r};
    const mt_loss_vtable *vt = inst->desc->vtable;
    mt_status st = vt->compute(inst->state, (mt_model_handle *)f->model, &b, backward, r, err);
    if (!st) st = mt_host_check(inst->desc->name, err);
    return st;
}

/* The loss of rows [row0, row0 + rows) as one batch of a step of step_items pairs. */
static mt_status dpo_compute(fixture *f, mt_plugin_instance *inst, int row0, int rows,
                             int64_t step_items, int backward, mt_loss_result *r, mt_error *err) {
    mt_batch b = {.size = sizeof b, .B = rows, .T = f->T, .tokens = f->tokens + row0 * f->T,
                  .targets = f->targets + row0 * f->T, .step_items = step_items, .pairs = 1};
    return loss_compute(f, inst, b, backward, r, err);
}

/* ---- parity with TRL's formulas ---- */

static void test_dpo_parity(void **state) {
    fixture *f = *state;
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        const dpo_case *c = &cases[k];
        printf("case %s (%s, beta %g, label_smoothing %g, rpo_alpha %g)\n", c->name,
               c->loss_type, c->beta, c->label_smoothing, c->rpo_alpha);
        mt_plugin_instance *inst = dpo_instance(f, c);
        mt_error err = {0};
        mt_model_zero_grad(f->model);
        mt_loss_result r;
        if (dpo_compute(f, inst, 0, f->B, f->B / 2, 1, &r, &err)) fail_msg("%s", err.msg);
        char name[200];
        snprintf(name, sizeof name, "%s.loss", c->name);
        mt_test_check_close("loss", r.loss, mt_test_read_scalar(f->ref, name), 1e-5);
        assert_int_equal(r.n_tokens, f->B / 2);
        /* the RPO term's nll_loss is reported only where it is part of the loss */
        assert_int_equal(r.n_metrics, c->rpo_alpha > 0 ? 7 : 6);
        for (int m = 0; m < r.n_metrics; m++) {
            assert_string_equal(r.metric_names[m], metric_names[m]);
            snprintf(name, sizeof name, "%s.%s", c->name, metric_names[m]);
            mt_test_check_close(metric_names[m], r.metrics[m], mt_test_read_scalar(f->ref, name), 1e-5);
        }
        mt_param_view *v;
        size_t n;
        assert_int_equal(mt_model_trainable_params(f->model, &v, &n, &err), MT_OK);
        double worst = 0.0;
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
            if (e > worst) worst = e;
            free(got);
            free(ref);
        }
        printf("  %zu LoRA gradients, worst rel err %.3g\n", n, worst);
        free(v);
        mt_plugin_instance_free(inst);
    }
}

/* ---- the reference pass ---- */

/* Per row, the sum over its targets of log softmax(logits)[target], in double. */
static void row_logps(const fixture *f, const float *logits, double *logp) {
    for (int b = 0; b < f->B; b++) {
        logp[b] = 0.0;
        for (int t = 0; t < f->T; t++) {
            const int32_t target = f->targets[b * f->T + t];
            if (target < 0) continue;
            const float *row = logits + (size_t)(b * f->T + t) * f->V;
            double mx = row[0], sum = 0.0;
            for (int j = 1; j < f->V; j++) mx = fmax(mx, row[j]);
            for (int j = 0; j < f->V; j++) sum += exp(row[j] - mx);
            logp[b] += row[target] - mx - log(sum);
        }
    }
}

static float *forward_logits(fixture *f, mt_model *m, int adapters_enabled) {
    mt_batch b = {.size = sizeof b, .B = f->B, .T = f->T, .tokens = f->tokens,
                  .targets = f->targets};
    mt_error err = {0};
    if (H()->model_forward((mt_model_handle *)m, &b, adapters_enabled, &err))
        fail_msg("%s", err.msg);
    const size_t n = (size_t)f->B * f->T * f->V;
    float *out = malloc(n * sizeof(float));
    assert_non_null(out);
    if (mt_model_logits(m, 0, f->B * f->T, out, &err)) fail_msg("%s", err.msg);
    return out;
}

static void test_reference_pass(void **state) {
    fixture *f = *state;
    mt_model *plain = load_model(f, 0);
    const size_t n = (size_t)f->B * f->T * f->V;
    float *base = forward_logits(f, plain, 1), *disabled = forward_logits(f, f->model, 0),
          *policy = forward_logits(f, f->model, 1);
    /* adapters disabled is the base model, bit for bit; the policy differs from it */
    assert_memory_equal(disabled, base, n * sizeof(float));
    assert_true(mt_test_rel_err(policy, base, n) > 1e-3);
    assert_true(f->model->adapters_enabled); /* the pass restored the adapters */
    double got[MAX_ROWS], ref[MAX_ROWS];
    const char *names[] = {"base_logps", "ref_logps", "policy_logps"};
    float *logits[] = {base, disabled, policy};
    for (int k = 0; k < 3; k++) {
        float *want = mt_test_read_f32(f->ref, names[k], NULL);
        row_logps(f, logits[k], got);
        for (int b = 0; b < f->B; b++) ref[b] = want[b];
        double e = mt_test_rel_err_d(got, ref, (size_t)f->B);
        printf("  %-13s rel err %.3g\n", names[k], e);
        assert_true(e <= 1e-5);
        free(want);
    }
    free(base), free(disabled), free(policy);
    mt_model_free(plain);
}

/* ---- accumulation over unequal micro-batches ---- */

static void test_accumulation(void **state) {
    fixture *f = *state;
    const int pairs = f->B / 2;
    assert_true(pairs >= 3);
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        mt_plugin_instance *inst = dpo_instance(f, &cases[k]);
        mt_error err = {0};
        mt_loss_result whole, part;
        mt_model_zero_grad(f->model);
        if (dpo_compute(f, inst, 0, f->B, pairs, 1, &whole, &err)) fail_msg("%s", err.msg);
        size_t n;
        float *g_whole = mt_test_all_grads(f->model, &n);
        /* one pair, then the rest, each normalised by the step's pairs */
        mt_model_zero_grad(f->model);
        double sum = 0.0, metrics[8] = {0};
        const int splits[2][2] = {{0, 2}, {2, f->B - 2}};
        for (int s = 0; s < 2; s++) {
            if (dpo_compute(f, inst, splits[s][0], splits[s][1], pairs, 1, &part, &err))
                fail_msg("%s", err.msg);
            sum += part.loss;
            for (int m = 0; m < part.n_metrics; m++) metrics[m] += part.metrics[m];
        }
        float *g_parts = mt_test_all_grads(f->model, &n);
        double e = mt_test_rel_err(g_parts, g_whole, n);
        printf("%s: loss %.9g as micro-batches %.9g, gradient rel err %.3g\n", cases[k].name,
               whole.loss, sum, e);
        /* The RPO term is each micro-batch's mean chosen-token NLL weighted by its share of
         * the step's pairs (TRL, too, takes the NLL per micro-batch), so with unequal
         * micro-batches only the preference part adds up to the whole batch's: compare
         * that part, with the reported nll_loss taken out of both sides. */
        const double alpha = cases[k].rpo_alpha;
        const double nll_whole = alpha > 0 ? whole.metrics[6] : 0.0,
                     nll_parts = alpha > 0 ? metrics[6] : 0.0;
        const double pref_whole = whole.loss - alpha * nll_whole,
                     pref_parts = sum - alpha * nll_parts;
        assert_true(fabs(pref_parts - pref_whole) <= 1e-6 * fmax(fabs(pref_whole), 1e-3));
        if (alpha == 0) assert_true(e <= 1e-5);
        for (int m = 0; m < 6; m++)
            assert_true(fabs(metrics[m] - whole.metrics[m]) <= 1e-6 * fmax(fabs(whole.metrics[m]), 1));
        free(g_whole), free(g_parts);
        mt_plugin_instance_free(inst);
    }
}

/* ---- precomputed reference log-probabilities, padding pairs ---- */

static void test_precomputed_reference(void **state) {
    fixture *f = *state;
    mt_error err = {0};
    /* the core's per-sequence log-probabilities of the model without an adapter: the
     * reference as the trainer precomputes it, against PyTorch's base_logps */
    mt_model *plain = load_model(f, 0);
    double ref[MAX_ROWS + 2], want_d[MAX_ROWS];
    if (mt_model_forward(plain, f->tokens, NULL, NULL, f->B, f->T, &err) ||
        mt_model_sequence_logps(plain, f->targets, ref, &err))
        fail_msg("%s", err.msg);
    float *want = mt_test_read_f32(f->ref, "base_logps", NULL);
    for (int b = 0; b < f->B; b++) want_d[b] = want[b];
    free(want);
    double e = mt_test_rel_err_d(ref, want_d, (size_t)f->B);
    printf("  mt_model_sequence_logps against PyTorch: rel err %.3g\n", e);
    assert_true(e <= 1e-5);
    mt_model_free(plain);

    /* two padding rows (a padding pair) after the real ones */
    int32_t tokens[(MAX_ROWS + 2) * MAX_T], targets[(MAX_ROWS + 2) * MAX_T];
    const size_t real = (size_t)f->B * f->T;
    memcpy(tokens, f->tokens, real * sizeof *tokens);
    memcpy(targets, f->targets, real * sizeof *targets);
    for (size_t i = real; i < real + 2 * (size_t)f->T; i++) tokens[i] = 0, targets[i] = -100;
    ref[f->B] = ref[f->B + 1] = NAN;
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        mt_plugin_instance *inst = dpo_instance(f, &cases[k]);
        mt_loss_result plain_r, given_r;
        mt_model_zero_grad(f->model);
        if (dpo_compute(f, inst, 0, f->B, 0, 1, &plain_r, &err)) fail_msg("%s", err.msg);
        size_t n;
        float *g_plain = mt_test_all_grads(f->model, &n);
        mt_batch b = {.size = sizeof b, .B = f->B + 2, .T = f->T, .tokens = tokens,
                      .targets = targets, .pairs = 1, .ref_logps = ref};
        const mt_loss_vtable *vt = inst->desc->vtable;
        assert_int_equal(vt->count(inst->state, &b), f->B / 2); /* the padding pair: none */
        mt_model_zero_grad(f->model);
        if (loss_compute(f, inst, b, 1, &given_r, &err)) fail_msg("%s", err.msg);
        float *g_given = mt_test_all_grads(f->model, &n);
        double ge = mt_test_rel_err(g_given, g_plain, n);
        printf("%s: loss %.9g, with precomputed references %.9g, gradient rel err %.3g\n",
               cases[k].name, plain_r.loss, given_r.loss, ge);
        assert_int_equal(given_r.n_tokens, f->B / 2);
        assert_true(fabs(given_r.loss - plain_r.loss) <= 1e-5 * fmax(fabs(plain_r.loss), 1e-3));
        for (int m = 0; m < plain_r.n_metrics; m++)
            assert_true(fabs(given_r.metrics[m] - plain_r.metrics[m]) <=
                        1e-5 * fmax(fabs(plain_r.metrics[m]), 1));
        assert_true(ge <= 1e-4);
        free(g_plain), free(g_given);
        mt_plugin_instance_free(inst);
    }
    /* with the references given, a trainable base is accepted (full fine-tuning) */
    mt_plugin_instance *inst = dpo_instance(f, &cases[0]);
    mt_param *norm = NULL;
    for (size_t i = 0; i < f->model->num_params; i++)
        if (strstr(f->model->params[i].name, "norm")) norm = &f->model->params[i];
    assert_non_null(norm);
    assert_int_equal(mt_model_set_trainable(f->model, norm, 1, &err), MT_OK);
    mt_batch b = {.size = sizeof b, .B = f->B, .T = f->T, .tokens = f->tokens,
                  .targets = f->targets, .pairs = 1, .ref_logps = ref};
    mt_loss_result r;
    assert_int_equal(loss_compute(f, inst, b, 0, &r, &err), MT_OK);
    assert_int_equal(mt_model_set_trainable(f->model, norm, 0, &err), MT_OK);
    /* a real pair without its reference */
    ref[1] = NAN;
    assert_int_not_equal(loss_compute(f, inst, b, 0, &r, &err), MT_OK);
    printf("  refused: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "precomputed reference log-probability of row 1"));
    mt_plugin_instance_free(inst);
}

/* ---- refusals ---- */

static void expect_error(fixture *f, mt_plugin_instance *inst, int rows, const char *needle) {
    mt_error err = {0};
    mt_loss_result r;
    mt_status st = dpo_compute(f, inst, 0, rows, 0, 1, &r, &err);
    printf("  refused: %s\n", err.msg);
    assert_int_not_equal(st, MT_OK);
    if (!strstr(err.msg, needle)) fail_msg("expected \"%s\" in: %s", needle, err.msg);
}

static void test_refusals(void **state) {
    fixture *f = *state;
    mt_plugin_instance *inst = dpo_instance(f, &cases[0]);
    expect_error(f, inst, f->B - 1, "rows 2i (chosen) and 2i+1 (rejected)");
    /* the rejected answer of pair 1 masked away entirely */
    int32_t saved[MAX_T];
    memcpy(saved, f->targets + 3 * f->T, sizeof(int32_t) * (size_t)f->T);
    for (int t = 0; t < f->T; t++) f->targets[3 * f->T + t] = -100;
    expect_error(f, inst, f->B, "rejected answer of pair 1");
    memcpy(f->targets + 3 * f->T, saved, sizeof(int32_t) * (size_t)f->T);
    /* a trainable base norm: the reference would move with the policy */
    mt_error err = {0};
    mt_param *norm = NULL;
    for (size_t i = 0; i < f->model->num_params; i++)
        if (strstr(f->model->params[i].name, "norm")) norm = &f->model->params[i];
    assert_non_null(norm);
    assert_int_equal(mt_model_set_trainable(f->model, norm, 1, &err), MT_OK);
    expect_error(f, inst, f->B, "the base must stay frozen");
    assert_int_equal(mt_model_set_trainable(f->model, norm, 0, &err), MT_OK);
    /* and the same batch is accepted again */
    mt_loss_result r;
    assert_int_equal(dpo_compute(f, inst, 0, f->B, 0, 0, &r, &err), MT_OK);
    /* a batch that does not say it holds pairs */
    mt_batch single = {.size = sizeof single, .B = f->B, .T = f->T, .tokens = f->tokens,
                       .targets = f->targets};
    assert_int_not_equal(loss_compute(f, inst, single, 0, &r, &err), MT_OK);
    printf("  refused: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "does not hold preference pairs"));
    mt_plugin_instance_free(inst);
    /* cross-entropy refuses pairs: it would train on the rejected replies */
    mt_plugin *ce = mt_test_load_plugin("cross_entropy");
    mt_plugin_instance *ce_inst = NULL;
    if (mt_plugin_instantiate(ce, NULL, 0, &ce_inst, &err)) fail_msg("%s", err.msg);
    single.pairs = 1;
    assert_int_not_equal(loss_compute(f, ce_inst, single, 0, &r, &err), MT_OK);
    printf("  refused: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "preference pairs"));
    single.pairs = 0;
    assert_int_equal(loss_compute(f, ce_inst, single, 0, &r, &err), MT_OK);
    mt_plugin_instance_free(ce_inst);
    mt_plugin_unload(ce);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dpo_parity),
        cmocka_unit_test(test_reference_pass),
        cmocka_unit_test(test_accumulation),
        cmocka_unit_test(test_precomputed_reference),
        cmocka_unit_test(test_refusals),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
