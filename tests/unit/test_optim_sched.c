/* test_optim_sched.c — the optimizer plugins (adamw, sgd, lion) and the scheduler plugins
 * (constant, linear, cosine, wsd), loaded from the build's plugins/ directory, against
 * tests/fixtures/optim/reference.safetensors (tests/parity/make_optim_reference.py):
 *
 * - 10 steps of AdamW (with and without AMSGrad) and SGD (Nesterov; dampening) within
 *   1e-6 of torch, Lion within 1e-6 of a float64 numpy implementation: per tensor
 *   max|c - ref| / max|ref|, and element-wise |c - ref| <= 1e-6 * max(1, |ref|);
 * - every learning rate of every schedule within 1e-9 (relative) of transformers;
 * - checkpoints: 5 steps, state saved (downloaded through the host table, as the core
 *   does), a fresh instance restored, steps 6..10 bitwise equal to the uninterrupted run;
 *   wrong state names, shapes and dtypes refused;
 * - plugin ABI 2: parameter views walked by their own size (a newer host's wider views
 *   give the same numbers), too small views, non-F32 parameters and parameters on a
 *   device without a backend refused before anything changes. */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plugin/options.h"
#include "plugin/registry.h"
#include "formats/safetensors.h"
#include "testutil.h"

#ifndef MT_FIXTURE_DIR
#define MT_FIXTURE_DIR "tests/fixtures"
#endif
#ifndef MT_BUILD_DIR
#define MT_BUILD_DIR "build"
#endif

#define OPT_TOL 1e-6
#define SCHED_TOL 1e-9
#define STEPS 10
#define NP 4

#define NUM(k, v)                                                                                  \
    { .key = (k), .type = MT_KV_NUMBER, .number = (v) }
#define STR(k, v)                                                                                  \
    { .key = (k), .type = MT_KV_STRING, .string = (v) }
#define BOOL(k, v)                                                                                 \
    { .key = (k), .type = MT_KV_BOOL, .boolean = (v) }

static const char *const PARAM_NAMES[NP] = {"layer.weight", "layer.bias", "norm.weight",
                                            "embed.weight"};
static const char *const NO_DECAY = "layer.bias";

static mt_safetensors *ref; /* the reference file, open for the whole run */
static double lrs[STEPS];   /* the learning rate of each step */

/* ---- reading the reference ------------------------------------------------ */

static const mt_st_tensor *find(const char *name) {
    const mt_st_tensor *t = mt_st_find(ref, name);
    if (!t)
        fail_msg("reference tensor '%s' missing: rerun tests/parity/make_optim_reference.py", name);
    return t;
}

static int64_t numel_of(const mt_st_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

/* An F32 or F64 reference tensor as doubles (malloc'ed); *n its element count. */
static double *read_doubles(const char *name, int64_t *n) {
    const mt_st_tensor *t = find(name);
    int64_t count = numel_of(t);
    double *out = malloc((size_t)count * sizeof *out + 1);
    assert_non_null(out);
    for (int64_t i = 0; i < count; i++) {
        if (t->dtype == MT_ST_F64) {
            memcpy(&out[i], (const char *)t->data + 8 * i, 8);
        } else if (t->dtype == MT_ST_F32) {
            float f;
            memcpy(&f, (const char *)t->data + 4 * i, 4);
            out[i] = f;
        } else {
            fail_msg("reference tensor '%s': expected F32 or F64, found %s", name,
                     mt_st_dtype_name(t->dtype));
        }
    }
    if (n) *n = count;
    return out;
}

static int group_setup(void **state) {
    (void)state;
    mt_error err = {0};
    if (mt_st_open(MT_FIXTURE_DIR "/optim/reference.safetensors", &ref, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return -1;
    }
    int64_t n;
    double *lr = read_doubles("lr", &n);
    if (n != STEPS) return -1;
    memcpy(lrs, lr, sizeof lrs);
    free(lr);
    return 0;
}

static int group_teardown(void **state) {
    (void)state;
    mt_st_close(ref);
    return 0;
}

/* ---- plugins ---------------------------------------------------------------- */

static mt_plugin *load(const char *name, mt_plugin_kind kind) {
    char path[1024];
    snprintf(path, sizeof path, "%s/plugins/%s.so", MT_BUILD_DIR, name);
    mt_plugin *p = NULL;
    mt_error err = {0};
    if (mt_plugin_load(path, &p, &err)) fail_msg("%s", err.msg);
    assert_int_equal(mt_plugin_desc(p)->kind, kind);
    assert_string_equal(mt_plugin_desc(p)->name, name);
    return p;
}

static mt_plugin_instance *instantiate(const mt_plugin *p, const mt_kv *kv, size_t n_kv) {
    mt_plugin_instance *inst = NULL;
    mt_error err = {0};
    if (mt_plugin_instantiate(p, kv, n_kv, &inst, &err)) fail_msg("%s", err.msg);
    return inst;
}

static const mt_optimizer_vtable *ovt(const mt_plugin_instance *inst) { return inst->desc->vtable; }

/* ---- parameters: values, gradients and the views an optimizer sees -------- */

typedef struct bank {
    mt_param_view views[NP];
    float *value[NP], *grad[NP];
    float *grads[NP]; /* (STEPS, numel): the gradient of each step */
    int64_t numel[NP];
} bank;

static void bank_init(bank *b) {
    memset(b, 0, sizeof *b);
    char name[256];
    for (int i = 0; i < NP; i++) {
        snprintf(name, sizeof name, "init/%s", PARAM_NAMES[i]);
        const mt_st_tensor *init = find(name);
        int64_t n = numel_of(init);
        b->numel[i] = n;
        b->value[i] = malloc((size_t)n * sizeof(float));
        b->grad[i] = malloc((size_t)n * sizeof(float));
        b->grads[i] = malloc((size_t)(STEPS * n) * sizeof(float));
        assert_true(b->value[i] && b->grad[i] && b->grads[i]);
        mt_error err = {0};
        if (mt_st_read_f32(init, b->value[i], &err)) fail_msg("%s", err.msg);
        snprintf(name, sizeof name, "grad/%s", PARAM_NAMES[i]);
        const mt_st_tensor *g = find(name);
        assert_int_equal(numel_of(g), STEPS * n);
        if (mt_st_read_f32(g, b->grads[i], &err)) fail_msg("%s", err.msg);

        mt_param_view *v = &b->views[i];
        v->size = sizeof *v;
        v->name = PARAM_NAMES[i];
        v->no_decay = !strcmp(PARAM_NAMES[i], NO_DECAY);
        v->value = (mt_tensor){
            .dtype = MT_F32, .device = MT_DEVICE_CPU, .ndim = init->ndim, .data = b->value[i]};
        memcpy(v->value.shape, init->shape, sizeof v->value.shape);
        v->grad = v->value;
        v->grad.data = b->grad[i];
    }
}

static void bank_free(bank *b) {
    for (int i = 0; i < NP; i++) {
        free(b->value[i]);
        free(b->grad[i]);
        free(b->grads[i]);
    }
}

/* Optimizer step k (1-based): loads gradient k, then steps. */
static mt_status step(mt_plugin_instance *inst, bank *b, int k, mt_error *err) {
    for (int i = 0; i < NP; i++)
        memcpy(b->grad[i], b->grads[i] + (size_t)((k - 1) * b->numel[i]),
               (size_t)b->numel[i] * sizeof(float));
    return ovt(inst)->step(inst->state, b->views, NP, lrs[k - 1], k, err);
}

static void step_ok(mt_plugin_instance *inst, bank *b, int k) {
    mt_error err = {0};
    if (step(inst, b, k, &err)) fail_msg("step %d: %s", k, err.msg);
}

/* ---- the optimizers against the references ------------------------------- */

typedef struct optim_case {
    const char *plugin;
    const char *ref; /* reference tensors "<ref>/<param>" */
    mt_kv kv[5];
    size_t n_kv;
    size_t state_per_param;
} optim_case;

static const optim_case CASES[] = {
    {"adamw",
     "adamw",
     {NUM("beta1", 0.9), NUM("beta2", 0.95), NUM("eps", 1e-6), NUM("weight_decay", 0.1),
      BOOL("amsgrad", 0)},
     5,
     2},
    {"adamw",
     "adamw_amsgrad",
     {NUM("beta1", 0.9), NUM("beta2", 0.95), NUM("eps", 1e-6), NUM("weight_decay", 0.1),
      BOOL("amsgrad", 1)},
     5,
     3},
    {"sgd",
     "sgd_nesterov",
     {NUM("momentum", 0.9), NUM("dampening", 0.0), BOOL("nesterov", 1), NUM("weight_decay", 1e-2)},
     4,
     1},
    {"sgd",
     "sgd_dampening",
     {NUM("momentum", 0.9), NUM("dampening", 0.5), BOOL("nesterov", 0), NUM("weight_decay", 0.0)},
     4,
     1},
    {"lion",
     "lion_numpy_f64",
     {NUM("beta1", 0.9), NUM("beta2", 0.99), NUM("weight_decay", 0.1)},
     3,
     1},
};

static void check_parity(const optim_case *c) {
    mt_plugin *p = load(c->plugin, MT_PLUGIN_OPTIMIZER);
    mt_plugin_instance *inst = instantiate(p, c->kv, c->n_kv);
    bank b;
    bank_init(&b);
    double *refs[NP];
    char name[256];
    for (int i = 0; i < NP; i++) {
        snprintf(name, sizeof name, "%s/%s", c->ref, PARAM_NAMES[i]);
        int64_t n;
        refs[i] = read_doubles(name, &n);
        assert_int_equal(n, STEPS * b.numel[i]);
    }
    assert_int_equal(ovt(inst)->state_count(inst->state), 0); /* state is created lazily */
    double worst_rel = 0.0, worst_abs = 0.0;
    for (int k = 1; k <= STEPS; k++) {
        step_ok(inst, &b, k);
        for (int i = 0; i < NP; i++) {
            const double *r = refs[i] + (size_t)((k - 1) * b.numel[i]);
            double max_err = 0.0, max_ref = 0.0;
            for (int64_t j = 0; j < b.numel[i]; j++) {
                double e = fabs((double)b.value[i][j] - r[j]);
                if (!(e <= OPT_TOL * fmax(1.0, fabs(r[j]))))
                    fail_msg("%s step %d: %s[%lld] = %.9g, reference %.9g", c->ref, k,
                             PARAM_NAMES[i], (long long)j, b.value[i][j], r[j]);
                if (e > max_err) max_err = e;
                if (fabs(r[j]) > max_ref) max_ref = fabs(r[j]);
                if (e / fmax(1.0, fabs(r[j])) > worst_abs) worst_abs = e / fmax(1.0, fabs(r[j]));
            }
            double rel = max_ref > 0 ? max_err / max_ref : max_err;
            if (!(rel <= OPT_TOL))
                fail_msg("%s step %d: %s relative error %.3g", c->ref, k, PARAM_NAMES[i], rel);
            if (rel > worst_rel) worst_rel = rel;
        }
    }
    print_message("%-15s 10 steps: max per-tensor rel err %.3g, max element err %.3g\n", c->ref,
                  worst_rel, worst_abs);
    assert_int_equal(ovt(inst)->state_count(inst->state), NP * c->state_per_param);
    for (int i = 0; i < NP; i++) free(refs[i]);
    bank_free(&b);
    mt_plugin_instance_free(inst);
    mt_plugin_unload(p);
}

static void test_adamw_matches_torch(void **s) {
    (void)s;
    check_parity(&CASES[0]);
}
static void test_adamw_amsgrad_matches_torch(void **s) {
    (void)s;
    check_parity(&CASES[1]);
}
static void test_sgd_nesterov_matches_torch(void **s) {
    (void)s;
    check_parity(&CASES[2]);
}
static void test_sgd_dampening_matches_torch(void **s) {
    (void)s;
    check_parity(&CASES[3]);
}
static void test_lion_matches_numpy(void **s) {
    (void)s;
    check_parity(&CASES[4]);
}

/* ---- checkpoints ------------------------------------------------------------ */

typedef struct saved {
    size_t n;
    char **names;
    mt_tensor *tensors; /* data malloc'ed copies */
} saved;

static saved save_state(mt_plugin_instance *inst) {
    saved s = {0};
    s.n = ovt(inst)->state_count(inst->state);
    s.names = calloc(s.n + 1, sizeof *s.names);
    s.tensors = calloc(s.n + 1, sizeof *s.tensors);
    assert_true(s.names && s.tensors);
    for (size_t i = 0; i < s.n; i++) {
        const char *name = NULL;
        mt_tensor t;
        mt_error err = {0};
        if (ovt(inst)->state_get(inst->state, i, &name, &t, &err)) fail_msg("%s", err.msg);
        assert_int_equal(t.dtype, MT_F32);
        s.names[i] = strdup(name);
        size_t bytes = mt_tensor_nbytes(&t);
        s.tensors[i] = t;
        s.tensors[i].device = MT_DEVICE_CPU; /* the copy, as state_set receives it */
        s.tensors[i].data = malloc(bytes + 1);
        assert_true(s.names[i] && s.tensors[i].data);
        /* state_get's view may be device memory: the host downloads it */
        if (mt_host_table()->tensor_download(s.tensors[i].data, &t, &err))
            fail_msg("downloading %s: %s", name, err.msg);
    }
    return s;
}

static void saved_free(saved *s) {
    for (size_t i = 0; i < s->n; i++) {
        free(s->names[i]);
        free(s->tensors[i].data);
    }
    free(s->names);
    free(s->tensors);
}

static long saved_find(const saved *s, const char *name) {
    for (size_t i = 0; i < s->n; i++)
        if (!strcmp(s->names[i], name)) return (long)i;
    return -1;
}

/* 10 steps straight, against 5 steps, save, a fresh instance, restore, 5 more steps; and
 * the same restore into an instance that has stepped already (its state exists on the
 * device, and state_set uploads into it). */
static void check_resume(const optim_case *c) {
    mt_plugin *p = load(c->plugin, MT_PLUGIN_OPTIMIZER);
    bank straight, resumed, late;
    bank_init(&straight);
    bank_init(&resumed);
    bank_init(&late);
    mt_plugin_instance *d = instantiate(p, c->kv, c->n_kv);
    step_ok(d, &late, 1); /* state that the restore must replace */
    mt_plugin_instance *a = instantiate(p, c->kv, c->n_kv);
    mt_plugin_instance *b = instantiate(p, c->kv, c->n_kv);
    for (int k = 1; k <= 5; k++) {
        step_ok(a, &straight, k);
        step_ok(b, &resumed, k);
    }
    saved ckpt = save_state(b);
    assert_int_equal(ckpt.n, NP * c->state_per_param);
    char name[256];
    snprintf(name, sizeof name, "%s/layer.weight",
             !strcmp(c->plugin, "sgd") ? "momentum_buffer" : "exp_avg");
    assert_true(saved_find(&ckpt, name) >= 0);
    mt_plugin_instance_free(b);

    b = instantiate(p, c->kv, c->n_kv);
    for (size_t i = ckpt.n; i-- > 0;) { /* another order than state_get's */
        mt_error err = {0};
        if (ovt(b)->state_set(b->state, ckpt.names[i], &ckpt.tensors[i], &err))
            fail_msg("%s: state_set %s: %s", c->ref, ckpt.names[i], err.msg);
        if (ovt(d)->state_set(d->state, ckpt.names[i], &ckpt.tensors[i], &err))
            fail_msg("%s: state_set %s after a step: %s", c->ref, ckpt.names[i], err.msg);
    }
    for (int i = 0; i < NP; i++)
        memcpy(late.value[i], resumed.value[i], (size_t)late.numel[i] * sizeof(float));
    for (int k = 6; k <= STEPS; k++) {
        step_ok(a, &straight, k);
        step_ok(b, &resumed, k);
        step_ok(d, &late, k);
        for (int i = 0; i < NP; i++) {
            if (memcmp(straight.value[i], resumed.value[i],
                       (size_t)straight.numel[i] * sizeof(float)))
                fail_msg("%s: after resuming, step %d: %s differs from the uninterrupted run",
                         c->ref, k, PARAM_NAMES[i]);
            if (memcmp(straight.value[i], late.value[i],
                       (size_t)straight.numel[i] * sizeof(float)))
                fail_msg("%s: restored after a step, step %d: %s differs from the "
                         "uninterrupted run",
                         c->ref, k, PARAM_NAMES[i]);
        }
    }
    /* the states agree too, name by name */
    saved sa = save_state(a), sb = save_state(b);
    assert_int_equal(sa.n, sb.n);
    for (size_t i = 0; i < sa.n; i++) {
        long j = saved_find(&sb, sa.names[i]);
        if (j < 0) fail_msg("%s: resumed state lacks %s", c->ref, sa.names[i]);
        assert_memory_equal(sa.tensors[i].data, sb.tensors[j].data,
                            mt_tensor_nbytes(&sa.tensors[i]));
    }
    saved_free(&sa);
    saved_free(&sb);
    saved_free(&ckpt);
    mt_plugin_instance_free(a);
    mt_plugin_instance_free(b);
    mt_plugin_instance_free(d);
    bank_free(&straight);
    bank_free(&resumed);
    bank_free(&late);
    mt_plugin_unload(p);
}

static void test_resume_is_bitwise(void **s) {
    (void)s;
    for (size_t i = 0; i < sizeof CASES / sizeof CASES[0]; i++) check_resume(&CASES[i]);
}

/* A parameter large enough to be updated by several threads gives bit for bit what the
 * same numbers give as four small parameters (each updated by one thread). */
static void test_large_parameter_threads(void **s) {
    (void)s;
    enum { N = 100000, PARTS = 4, K = 3 };
    float *value = malloc(2 * N * sizeof(float)), *grads = malloc(K * N * sizeof(float));
    float *grad = malloc(2 * N * sizeof(float));
    assert_true(value && grads && grad);
    for (size_t c = 0; c < sizeof CASES / sizeof CASES[0]; c++) {
        uint64_t rng = 42;
        mt_test_fill_uniform(value, N, &rng, -1.0f, 1.0f);
        memcpy(value + N, value, N * sizeof(float));
        mt_test_fill_uniform(grads, K * N, &rng, -1.0f, 1.0f);
        mt_plugin *p = load(CASES[c].plugin, MT_PLUGIN_OPTIMIZER);
        mt_plugin_instance *whole = instantiate(p, CASES[c].kv, CASES[c].n_kv);
        mt_plugin_instance *parts = instantiate(p, CASES[c].kv, CASES[c].n_kv);
        mt_param_view one = {.size = sizeof(mt_param_view), .name = "big"}, four[PARTS];
        one.value = (mt_tensor){.dtype = MT_F32, .ndim = 1, .shape = {N}, .data = value};
        one.grad = one.value;
        one.grad.data = grad;
        static const char *const names[PARTS] = {"big.0", "big.1", "big.2", "big.3"};
        for (int i = 0; i < PARTS; i++) {
            four[i] = one;
            four[i].name = names[i];
            four[i].value.shape[0] = four[i].grad.shape[0] = N / PARTS;
            four[i].value.data = value + N + i * (N / PARTS);
            four[i].grad.data = grad + N + i * (N / PARTS);
        }
        for (int k = 1; k <= K; k++) {
            memcpy(grad, grads + (k - 1) * N, N * sizeof(float));
            memcpy(grad + N, grad, N * sizeof(float));
            mt_error err = {0};
            if (ovt(whole)->step(whole->state, &one, 1, lrs[k - 1], k, &err) ||
                ovt(parts)->step(parts->state, four, PARTS, lrs[k - 1], k, &err))
                fail_msg("%s step %d: %s", CASES[c].ref, k, err.msg);
            if (memcmp(value, value + N, N * sizeof(float)))
                fail_msg("%s step %d: one large parameter differs from four small ones",
                         CASES[c].ref, k);
        }
        mt_plugin_instance_free(whole);
        mt_plugin_instance_free(parts);
        mt_plugin_unload(p);
    }
    free(value);
    free(grads);
    free(grad);
}

/* Expects `call` to fail with a message in err that contains `needle`. */
#define REFUSED(call, needle)                                                                      \
    do {                                                                                           \
        err.msg[0] = '\0';                                                                         \
        if ((call) == MT_OK) fail_msg("%s: accepted, expected a refusal", #call);                  \
        if (!strstr(err.msg, (needle)))                                                            \
            fail_msg("%s: message \"%s\" lacks \"%s\"", #call, err.msg, (needle));                 \
    } while (0)

static void test_state_refusals(void **s) {
    (void)s;
    const optim_case *c = &CASES[0]; /* adamw, no amsgrad */
    mt_plugin *p = load("adamw", MT_PLUGIN_OPTIMIZER);
    bank b;
    bank_init(&b);
    mt_error err = {0};

    /* a run to take a checkpoint from */
    mt_plugin_instance *inst = instantiate(p, c->kv, c->n_kv);
    step_ok(inst, &b, 1);
    saved ckpt = save_state(inst);
    long w = saved_find(&ckpt, "exp_avg/layer.weight");
    assert_true(w >= 0);
    mt_tensor good = ckpt.tensors[w];
    mt_tensor transposed = good; /* (6,4) instead of (4,6) */
    transposed.shape[0] = good.shape[1];
    transposed.shape[1] = good.shape[0];
    mt_tensor half = good;
    half.dtype = MT_F16;

    const mt_optimizer_vtable *vt = ovt(inst);
    REFUSED(vt->state_set(inst->state, "bogus/layer.weight", &good, &err), "unknown state");
    REFUSED(vt->state_set(inst->state, "exp_avg", &good, &err), "unknown state");
    REFUSED(vt->state_set(inst->state, "max_exp_avg_sq/layer.weight", &good, &err), "amsgrad");
    REFUSED(vt->state_set(inst->state, "exp_avg/layer.weight", &transposed, &err),
            "expected shape [4, 6], found [6, 4]");
    REFUSED(vt->state_set(inst->state, "exp_avg/layer.weight", &half, &err), "F32");
    REFUSED(vt->state_set(inst->state, "exp_avg/ghost.weight", &good, &err), "ghost.weight");
    mt_plugin_instance_free(inst);

    /* restored before the first step, checked by it; a refused step changes nothing */
    float before[24];
    memcpy(before, b.value[0], sizeof before);
    for (int scenario = 0; scenario < 3; scenario++) {
        inst = instantiate(p, c->kv, c->n_kv);
        for (size_t i = 0; i < ckpt.n; i++) {
            int skip = scenario == 1 && !strcmp(ckpt.names[i], "exp_avg_sq/norm.weight");
            mt_tensor t = ckpt.tensors[i];
            if (scenario == 0 && strstr(ckpt.names[i], "/layer.weight")) { /* (6,4) */
                t.shape[0] = transposed.shape[0];
                t.shape[1] = transposed.shape[1];
            }
            if (!skip && vt->state_set(inst->state, ckpt.names[i], &t, &err))
                fail_msg("state_set %s: %s", ckpt.names[i], err.msg);
        }
        if (scenario == 2 && vt->state_set(inst->state, "exp_avg/ghost.weight", &good, &err))
            fail_msg("state_set exp_avg/ghost.weight before the first step: %s", err.msg);
        static const char *const needles[] = {"its optimizer state has shape [6, 4]",
                                              "no exp_avg_sq/norm.weight",
                                              "'ghost.weight' belongs to no trainable parameter"};
        REFUSED(step(inst, &b, 2, &err), needles[scenario]);
        assert_memory_equal(before, b.value[0], sizeof before);
        mt_plugin_instance_free(inst);
    }

    /* a parameter given twice, a gradient of the wrong size */
    inst = instantiate(p, c->kv, c->n_kv);
    b.views[1].name = "layer.weight";
    REFUSED(step(inst, &b, 1, &err), "given twice");
    b.views[1].name = PARAM_NAMES[1];
    b.views[0].grad.shape[0] = 3;
    REFUSED(step(inst, &b, 1, &err), "gradient [3, 6] does not match value [4, 6]");
    b.views[0].grad.shape[0] = 4;
    step_ok(inst, &b, 1);
    mt_plugin_instance_free(inst);

    /* SGD without momentum keeps no state */
    mt_plugin *sgd = load("sgd", MT_PLUGIN_OPTIMIZER);
    inst = instantiate(sgd, NULL, 0);
    step_ok(inst, &b, 1);
    assert_int_equal(ovt(inst)->state_count(inst->state), 0);
    REFUSED(ovt(inst)->state_set(inst->state, "momentum_buffer/layer.weight", &good, &err),
            "without momentum");
    mt_plugin_instance_free(inst);
    mt_plugin_unload(sgd);

    saved_free(&ckpt);
    bank_free(&b);
    mt_plugin_unload(p);
}

/* ABI 2: a host may fill parameter views larger than this header's mt_param_view (a
 * newer ABI's fields at their end); the optimizer walks them by their size
 * (mt_param_at) and computes what it computes on plain views, bit for bit. */
typedef struct wide_view {
    mt_param_view view;
    double newer_fields[3]; /* poisoned: an optimizer must not read them as a view */
} wide_view;

static void test_wide_param_views(void **s) {
    (void)s;
    for (size_t c = 0; c < sizeof CASES / sizeof CASES[0]; c++) {
        mt_plugin *p = load(CASES[c].plugin, MT_PLUGIN_OPTIMIZER);
        mt_plugin_instance *plain = instantiate(p, CASES[c].kv, CASES[c].n_kv);
        mt_plugin_instance *wide = instantiate(p, CASES[c].kv, CASES[c].n_kv);
        bank a, b;
        bank_init(&a);
        bank_init(&b);
        wide_view views[NP];
        memset(views, 0xA5, sizeof views);
        for (int i = 0; i < NP; i++) {
            views[i].view = b.views[i];
            views[i].view.size = sizeof(wide_view);
        }
        for (int k = 1; k <= 3; k++) {
            step_ok(plain, &a, k);
            for (int i = 0; i < NP; i++)
                memcpy(b.grad[i], b.grads[i] + (size_t)((k - 1) * b.numel[i]),
                       (size_t)b.numel[i] * sizeof(float));
            mt_error err = {0};
            if (ovt(wide)->step(wide->state, &views[0].view, NP, lrs[k - 1], k, &err))
                fail_msg("%s, wide views, step %d: %s", CASES[c].ref, k, err.msg);
            for (int i = 0; i < NP; i++)
                if (memcmp(a.value[i], b.value[i], (size_t)a.numel[i] * sizeof(float)))
                    fail_msg("%s step %d: %s differs between plain and wide views", CASES[c].ref,
                             k, PARAM_NAMES[i]);
        }
        bank_free(&a);
        bank_free(&b);
        mt_plugin_instance_free(plain);
        mt_plugin_instance_free(wide);
        mt_plugin_unload(p);
    }
}

/* What every optimizer refuses about its parameters, before it changes anything: views
 * smaller than mt_param_view, dtypes other than F32, tensors on two devices, a device
 * without a running backend (the state cannot be made there). */
static void test_param_refusals(void **s) {
    (void)s;
    static const char *const plugins[] = {"adamw", "sgd", "lion"};
    for (size_t c = 0; c < 3; c++) {
        mt_plugin *p = load(plugins[c], MT_PLUGIN_OPTIMIZER);
        /* sgd with momentum and weight decay, so that it keeps state and needs scratch */
        mt_kv kv[] = {NUM("momentum", 0.9), NUM("weight_decay", 0.01)};
        mt_plugin_instance *inst = instantiate(p, kv, strcmp(plugins[c], "sgd") ? 0 : 2);
        bank b;
        bank_init(&b);
        float before[NP][64];
        for (int i = 0; i < NP; i++) {
            assert_true(b.numel[i] <= 64);
            memcpy(before[i], b.value[i], (size_t)b.numel[i] * sizeof(float));
        }
        mt_error err = {0};

        b.views[0].size = (uint32_t)offsetof(mt_param_view, no_decay); /* an older, smaller view */
        REFUSED(step(inst, &b, 1, &err), "parameter views of");
        b.views[0].size = sizeof(mt_param_view);

        b.views[2].value.dtype = MT_F16;
        REFUSED(step(inst, &b, 1, &err), "'norm.weight': value and gradient must be F32");
        assert_non_null(strstr(err.msg, "found F16 and F32"));
        b.views[2].value.dtype = MT_F32;
        b.views[3].grad.dtype = MT_BF16;
        REFUSED(step(inst, &b, 1, &err), "found F32 and BF16");
        b.views[3].grad.dtype = MT_F32;

        b.views[1].grad.device = MT_DEVICE_CUDA;
        REFUSED(step(inst, &b, 1, &err), "gradient on cuda");
        b.views[1].grad.device = MT_DEVICE_CPU;

#ifndef MT_HAVE_CUDA
        /* Every tensor claims CUDA: in a build without it the state cannot be allocated
         * there, and the step says so before it updates anything. (The memory is host
         * memory: a plugin never dereferences it, so this is safe.) */
        for (int i = 0; i < NP; i++) b.views[i].value.device = b.views[i].grad.device = MT_DEVICE_CUDA;
        REFUSED(step(inst, &b, 1, &err), "on cuda");
        print_message("  %s\n", err.msg);
        for (int i = 0; i < NP; i++) b.views[i].value.device = b.views[i].grad.device = MT_DEVICE_CPU;
#endif
        for (int i = 0; i < NP; i++)
            if (memcmp(before[i], b.value[i], (size_t)b.numel[i] * sizeof(float)))
                fail_msg("%s: a refused step changed %s", plugins[c], PARAM_NAMES[i]);
        /* and it still steps once the views are right */
        step_ok(inst, &b, 1);
        bank_free(&b);
        mt_plugin_instance_free(inst);
        mt_plugin_unload(p);
    }
}

static void test_option_refusals(void **s) {
    (void)s;
    mt_error err = {0};
    mt_plugin_instance *inst = NULL;
    mt_plugin *adamw = load("adamw", MT_PLUGIN_OPTIMIZER);
    mt_kv beta[] = {NUM("beta2", 1.0)};
    REFUSED(mt_plugin_instantiate(adamw, beta, 1, &inst, &err), "[0, 1)");
    mt_kv lr[] = {NUM("lr", 1e-3)}; /* the learning rate comes from the scheduler */
    REFUSED(mt_plugin_instantiate(adamw, lr, 1, &inst, &err), "unknown option 'lr'");
    mt_plugin_unload(adamw);
    mt_plugin *sgd = load("sgd", MT_PLUGIN_OPTIMIZER);
    mt_kv nesterov[] = {BOOL("nesterov", 1)};
    REFUSED(mt_plugin_instantiate(sgd, nesterov, 1, &inst, &err), "nesterov needs momentum > 0");
    mt_kv damp[] = {BOOL("nesterov", 1), NUM("momentum", 0.9), NUM("dampening", 0.1)};
    REFUSED(mt_plugin_instantiate(sgd, damp, 3, &inst, &err), "dampening 0");
    mt_plugin_unload(sgd);
    mt_plugin *wsd = load("wsd", MT_PLUGIN_SCHEDULER);
    mt_kv shape[] = {STR("decay_type", "exponential")};
    REFUSED(mt_plugin_instantiate(wsd, shape, 1, &inst, &err), "linear|cosine|1-sqrt");
    mt_plugin_unload(wsd);
}

/* ---- schedulers ---------------------------------------------------------- */

typedef struct sched_case {
    const char *plugin;
    const char *ref; /* "sched/<ref>" */
    mt_kv kv[7];
    size_t n_kv;
} sched_case;

static const sched_case SCHEDS[] = {
    {"constant", "constant", {NUM("warmup_steps", 10)}, 1},
    {"constant", "constant", {NUM("warmup_ratio", 0.1)}, 1},
    {"linear", "linear", {NUM("warmup_steps", 10)}, 1},
    {"linear", "linear", {NUM("warmup_ratio", 0.1)}, 1},
    {"cosine", "cosine", {NUM("warmup_steps", 10)}, 1},
    {"cosine", "cosine_min_lr", {NUM("warmup_steps", 10), NUM("min_lr_ratio", 0.1)}, 2},
    {"cosine", "cosine_cycles", {NUM("warmup_steps", 10), NUM("num_cycles", 1.5)}, 2},
    {"wsd",
     "wsd_cosine",
     {NUM("warmup_steps", 10), NUM("decay_steps", 20), STR("decay_type", "cosine"),
      NUM("min_lr_ratio", 0.1)},
     4},
    {"wsd",
     "wsd_linear",
     {NUM("warmup_ratio", 0.1), NUM("decay_ratio", 0.2), STR("decay_type", "linear"),
      NUM("min_lr_ratio", 0.1)},
     4},
    {"wsd",
     "wsd_1-sqrt",
     {NUM("warmup_steps", 10), NUM("decay_steps", 20), STR("decay_type", "1-sqrt"),
      NUM("min_lr_ratio", 0.1)},
     4},
    {"wsd",
     "wsd_stable50",
     {NUM("warmup_steps", 10), NUM("decay_steps", 20), NUM("stable_steps", 50),
      STR("warmup_type", "cosine"), STR("decay_type", "cosine"), NUM("min_lr_ratio", 0.05),
      NUM("num_cycles", 0.25)},
     7},
};

#define TOTAL 100
#define BASE_LR 3e-4

static double sched_lr(const mt_plugin_instance *inst, int64_t step_, int64_t total) {
    const mt_scheduler_vtable *vt = inst->desc->vtable;
    return vt->lr(inst->state, step_, total, BASE_LR);
}

static void test_schedulers_match_transformers(void **s) {
    (void)s;
    double worst = 0.0;
    for (size_t c = 0; c < sizeof SCHEDS / sizeof SCHEDS[0]; c++) {
        const sched_case *sc = &SCHEDS[c];
        char name[128];
        snprintf(name, sizeof name, "sched/%s", sc->ref);
        int64_t n;
        double *r = read_doubles(name, &n);
        assert_int_equal(n, TOTAL);
        mt_plugin *p = load(sc->plugin, MT_PLUGIN_SCHEDULER);
        mt_plugin_instance *inst = instantiate(p, sc->kv, sc->n_kv);
        for (int64_t k = 0; k < TOTAL; k++) {
            double lr = sched_lr(inst, k, TOTAL);
            double e = fabs(lr - r[k]);
            if (!(e <= SCHED_TOL * fabs(r[k])) && !(r[k] == 0.0 && fabs(lr) <= 1e-15 * BASE_LR))
                fail_msg("%s (case %zu) step %lld: lr %.17g, transformers %.17g", sc->ref, c,
                         (long long)k, lr, r[k]);
            if (r[k] != 0.0 && e / fabs(r[k]) > worst) worst = e / fabs(r[k]);
        }
        mt_plugin_instance_free(inst);
        mt_plugin_unload(p);
        free(r);
    }
    print_message("schedules: max relative error %.3g\n", worst);
}

/* Cases the fixture does not hold, with values worked out by hand from transformers'
 * formulas. */
static void test_scheduler_edges(void **s) {
    (void)s;
    mt_plugin *constant = load("constant", MT_PLUGIN_SCHEDULER);
    mt_plugin_instance *inst = instantiate(constant, NULL, 0);
    assert_true(sched_lr(inst, 0, 10) == BASE_LR); /* no warmup by default */
    mt_plugin_instance_free(inst);
    mt_plugin_unload(constant);

    /* warmup = ceil(100 * 0.07) = ceil(7.000000000000001) = 8, as TrainingArguments */
    mt_plugin *linear = load("linear", MT_PLUGIN_SCHEDULER);
    mt_kv ratio[] = {NUM("warmup_ratio", 0.07)};
    inst = instantiate(linear, ratio, 1);
    assert_true(sched_lr(inst, 7, 100) == BASE_LR * (7.0 / 8.0));
    assert_true(sched_lr(inst, 8, 100) == BASE_LR * 1.0);
    assert_true(sched_lr(inst, 100, 100) == 0.0);
    assert_true(sched_lr(inst, 150, 100) == 0.0); /* past the end: clamped at 0 */
    mt_plugin_instance_free(inst);
    mt_plugin_unload(linear);

    /* wsd defaults: no warmup, decay_ratio 0.1 (10 of 100 steps), cosine down to 0 */
    mt_plugin *wsd = load("wsd", MT_PLUGIN_SCHEDULER);
    inst = instantiate(wsd, NULL, 0);
    assert_true(sched_lr(inst, 0, 100) == BASE_LR);
    assert_true(sched_lr(inst, 89, 100) == BASE_LR);
    assert_true(fabs(sched_lr(inst, 95, 100) - BASE_LR * 0.5) < 1e-12 * BASE_LR);
    assert_true(sched_lr(inst, 100, 100) == 0.0);
    mt_plugin_instance_free(inst);
    /* warmup starts at min_lr_ratio, not 0 */
    mt_kv warm[] = {NUM("warmup_steps", 4), NUM("min_lr_ratio", 0.2)};
    inst = instantiate(wsd, warm, 2);
    assert_true(fabs(sched_lr(inst, 0, 100) - BASE_LR * 0.2) < 1e-15);
    assert_true(fabs(sched_lr(inst, 2, 100) - BASE_LR * 0.6) < 1e-15);
    mt_plugin_instance_free(inst);
    mt_plugin_unload(wsd);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_adamw_matches_torch),
        cmocka_unit_test(test_adamw_amsgrad_matches_torch),
        cmocka_unit_test(test_sgd_nesterov_matches_torch),
        cmocka_unit_test(test_sgd_dampening_matches_torch),
        cmocka_unit_test(test_lion_matches_numpy),
        cmocka_unit_test(test_resume_is_bitwise),
        cmocka_unit_test(test_large_parameter_threads),
        cmocka_unit_test(test_state_refusals),
        cmocka_unit_test(test_wide_param_views),
        cmocka_unit_test(test_param_refusals),
        cmocka_unit_test(test_option_refusals),
        cmocka_unit_test(test_schedulers_match_transformers),
        cmocka_unit_test(test_scheduler_edges),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
