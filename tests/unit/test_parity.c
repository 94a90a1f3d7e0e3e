/* test_parity.c — the C model against the PyTorch/transformers reference
 * (tests/parity/make_reference.py): logits and mean masked loss within 1e-5,
 * every parameter gradient within 1e-4, relative to the tensor's largest
 * reference magnitude (max|c - ref| / max|ref|). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "formats/safetensors.h"
#include "testutil.h"

#define LOGITS_RTOL 1e-5
#define GRAD_RTOL 1e-4

static int32_t *read_i32(const mt_safetensors *st, const char *name, int64_t *rows,
                         int64_t *cols) {
    const mt_st_tensor *t = mt_st_find(st, name);
    if (!t) fail_msg("reference tensor %s missing", name);
    assert_int_equal(t->dtype, MT_ST_I32);
    assert_int_equal(t->ndim, 2);
    int32_t *out = malloc(t->nbytes);
    assert_non_null(out);
    memcpy(out, t->data, t->nbytes);
    *rows = t->shape[0];
    *cols = t->shape[1];
    return out;
}

static void check_model(const char *fixture) {
    char dir[512], ref_path[600];
    snprintf(dir, sizeof dir, "%s/%s", MT_FIXTURE_DIR, fixture);
    snprintf(ref_path, sizeof ref_path, "%s/reference.safetensors", dir);
    mt_error err = {0};
    mt_backend be;
    assert_int_equal(mt_backend_cpu_init(&be, 0, &err), MT_OK);
    mt_model *m = NULL;
    if (mt_model_load_hf(dir, &be, &m, &err)) fail_msg("%s", err.msg);
    mt_safetensors *ref = NULL;
    if (mt_st_open(ref_path, &ref, &err)) fail_msg("%s", err.msg);

    /* rotary frequencies, including the llama3 bands */
    size_t n_inv;
    float *ref_inv = mt_test_read_f32(ref, "rope_inv_freq", &n_inv);
    assert_int_equal(n_inv, (size_t)m->cfg.head_dim / 2);
    float inv[256];
    mt_rope_inv_freq(&m->cfg, inv);
    for (size_t i = 0; i < n_inv; i++)
        if (fabsf(inv[i] - ref_inv[i]) > 1e-6f * fabsf(ref_inv[i]))
            fail_msg("%s: inv_freq[%zu] = %.9g, reference %.9g", fixture, i, inv[i], ref_inv[i]);
    free(ref_inv);

    int64_t B, T, B2, T2;
    int32_t *tokens = read_i32(ref, "tokens", &B, &T);
    int32_t *targets = read_i32(ref, "targets", &B2, &T2);
    assert_true(B == B2 && T == T2);
    const int V = m->cfg.vocab_size;
    assert_int_equal(mt_model_set_all_trainable(m, &err), MT_OK);
    mt_model_zero_grad(m);
    /* a small logits chunk so that the chunked loss path is exercised */
    if (mt_model_plan(m, (int)B, (int)T, 5, &err)) fail_msg("%s", err.msg);
    if (mt_model_forward(m, tokens, NULL, NULL, (int)B, (int)T, &err)) fail_msg("%s", err.msg);

    size_t n_logits;
    float *ref_logits = mt_test_read_f32(ref, "logits", &n_logits);
    assert_int_equal(n_logits, (size_t)(B * T * V));
    float *logits = malloc(n_logits * sizeof(float));
    assert_non_null(logits);
    assert_int_equal(mt_model_logits(m, 0, (int)(B * T), logits, &err), MT_OK);
    double e = mt_test_rel_err(logits, ref_logits, n_logits);
    printf("%s: logits rel err %.3g\n", fixture, e);
    if (!(e <= LOGITS_RTOL)) fail_msg("%s: logits rel err %.3g > %.0e", fixture, e, LOGITS_RTOL);

    float loss;
    int64_t n_targets;
    if (mt_model_cross_entropy(m, targets, 1, &loss, &n_targets, &err)) fail_msg("%s", err.msg);
    if (mt_model_backward(m, &err)) fail_msg("%s", err.msg);
    float *ref_loss = mt_test_read_f32(ref, "loss", NULL);
    double le = fabs((double)loss - ref_loss[0]) / fabs(ref_loss[0]);
    printf("%s: loss %.9g reference %.9g rel err %.3g over %lld targets\n", fixture, loss,
           ref_loss[0], le, (long long)n_targets);
    if (!(le <= LOGITS_RTOL)) fail_msg("%s: loss rel err %.3g", fixture, le);

    double worst = 0.0;
    const char *worst_name = "";
    for (size_t i = 0; i < m->num_params; i++) {
        mt_param *p = &m->params[i];
        char name[128];
        snprintf(name, sizeof name, "grad.%s", p->name);
        size_t n;
        float *g = mt_test_read_f32(ref, name, &n);
        assert_int_equal(n, p->numel);
        double ge = mt_test_rel_err(p->grad, g, n);
        if (!(ge <= GRAD_RTOL)) fail_msg("%s: %s rel err %.3g > %.0e", fixture, name, ge, GRAD_RTOL);
        if (ge > worst) {
            worst = ge;
            worst_name = p->name;
        }
        free(g);
    }
    printf("%s: %zu parameter gradients, worst rel err %.3g (%s)\n", fixture, m->num_params, worst,
           worst_name);
    /* every reference gradient has a parameter: nothing is silently untrained */
    size_t n_ref_grads = 0;
    for (size_t i = 0; i < mt_st_count(ref); i++)
        n_ref_grads += strncmp(mt_st_at(ref, i)->name, "grad.", 5) == 0;
    assert_int_equal(n_ref_grads, m->num_params);

    free(ref_loss);
    free(logits);
    free(ref_logits);
    free(tokens);
    free(targets);
    mt_st_close(ref);
    mt_model_free(m);
    mt_backend_cpu_shutdown(&be);
}

static void test_tiny_gqa_tied_llama3_rope(void **state) {
    (void)state;
    check_model("tiny_gqa");
}

static void test_tiny_bias_untied_qwen2(void **state) {
    (void)state;
    check_model("tiny_bias");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiny_gqa_tied_llama3_rope),
        cmocka_unit_test(test_tiny_bias_untied_qwen2),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
