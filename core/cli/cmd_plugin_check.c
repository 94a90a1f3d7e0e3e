/* cmd_plugin_check.c — `moontune plugin check FILE.so`: loads one plugin and checks it
 * does what its kind promises, on built-in fixtures, before anyone trains with it.
 *
 *   loss       on the "tiny" model shape (random weights, every parameter trainable): the
 *              derivative along the gradient, along the gradient plus a random direction
 *              (twice), and along each tensor's own gradient alone, against central
 *              finite differences of the loss; a batch without targets
 *              gives loss 0 and no gradient; doubling step_items halves loss and gradient.
 *              A loss that refuses a trainable base (it compares the model with its
 *              adapters disabled, as DPO does) is checked on a frozen base with a check
 *              adapter attached instead, and the output says so.
 *   optimizer  on the quadratic ½|p|² (gradient p) with two parameters of odd shapes: 20
 *              steps lower it and keep it finite; the state saved after 3 steps and
 *              restored into a fresh instance continues bit for bit like the original.
 *   scheduler  finite, non-negative learning rates over a run of 100 steps.
 *   adapter    attached to the tiny model with its parameters perturbed: the gradient check
 *              above through the model's own cross-entropy, and, when it merges, the same
 *              logits merged and unmerged.
 *
 * Directional derivatives, not single coordinates: the change of the loss along a unit
 * direction is large against fp32 rounding, so a tolerance of 2% (plus a few ulps of the
 * loss over the step) separates a correct gradient from one that is scaled, negated or
 * missing a term; the per-tensor directions catch a tensor whose gradient is missing,
 * which the whole-model ones cannot see when the others dominate. */
#include "cli/cmd_plugin_check.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h"
#include "cli/cli_args.h"
#include "model/device.h"
#include "model/model.h"
#include "model/train.h"
#include "plugin/registry.h"

#define CHECK_B 2
#define CHECK_T 7
#define FD_STEP 1e-2
#define FD_TOLERANCE 2e-2

/* One projection of the check adapter (see "the check adapter" below). */
typedef struct check_delta {
    mt_linear_handle *lin;
    const int *enabled;
    mt_tensor delta, grad; /* (out, in) */
    char name[160];
} check_delta;

typedef struct check_adapter_state {
    int enabled, n;
    check_delta *deltas;
} check_adapter_state;

typedef struct checker {
    mt_backend be;
    mt_model *model;
    int32_t tokens[CHECK_B * CHECK_T], targets[CHECK_B * CHECK_T];
    int failures;
    check_adapter_state check_adapter; /* for losses that need a frozen base */
    double fd_step; /* the central differences' step: FD_STEP, smaller for rollouts */
} checker;

static void report(checker *c, int ok, const char *fmt, ...) MT_PRINTF(3, 4);

static void report(checker *c, int ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("  %s  ", ok ? "pass" : "FAIL");
    vprintf(fmt, ap);
    putchar('\n');
    va_end(ap);
    if (!ok) c->failures++;
}

static mt_status tiny_model(checker *c, mt_error *err) {
    mt_model_config cfg;
    mt_status st = mt_config_preset("tiny", &cfg, err);
    if (!st) st = mt_backend_cpu_init(&c->be, 0, err);
    if (!st) st = mt_model_create(&cfg, &c->be, &c->model, err);
    if (!st) st = mt_model_init_random(c->model, 7, 0.2f, err);
    if (!st) st = mt_model_plan(c->model, CHECK_B, CHECK_T, 0, err);
    uint64_t rng = 12345;
    for (int i = 0; i < CHECK_B * CHECK_T; i++) {
        c->tokens[i] = (int32_t)(mt_splitmix64(&rng) % (uint64_t)cfg.vocab_size);
        /* targets: the first three positions of each row are a masked prompt */
        c->targets[i] = i % CHECK_T < 3 ? -100 : (int32_t)(mt_splitmix64(&rng) % (uint64_t)cfg.vocab_size);
    }
    return st;
}

/* ---- gradients against finite differences -------------------------------------------- */

typedef double (*loss_fn)(checker *c, void *ctx, int backward, mt_error *err);

/* Adds t·dir to every trainable parameter (dir is one flat vector over them). */
static void shift_params(mt_param_view *p, size_t n, const double *dir, double t) {
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        float *v = p[i].value.data;
        for (int64_t j = 0; j < mt_tensor_numel(&p[i].value); j++) v[j] += (float)(t * dir[k++]);
    }
}

/* The derivative of f along the unit vector dir by central differences, and the part of
 * it that is fp32 noise: a few ulps of the loss over the step are noise, not error.
 * The parameters are back where they were afterwards. -1 when f fails. */
static int central_difference(checker *c, loss_fn f, void *ctx, mt_param_view *p, size_t n,
                              const double *dir, double *numeric, double *noise, mt_error *err) {
    const double h = c->fd_step > 0 ? c->fd_step : FD_STEP;
    shift_params(p, n, dir, h);
    double up = f(c, ctx, 0, err);
    shift_params(p, n, dir, -2 * h);
    double down = f(c, ctx, 0, err);
    shift_params(p, n, dir, h);
    if (isnan(up) || isnan(down)) return -1;
    *numeric = (up - down) / (2 * h);
    *noise = 8 * FLT_EPSILON * fmax(fabs(up), fabs(down)) / (2 * h);
    return 0;
}

static int check_gradient(checker *c, loss_fn f, void *ctx, const char *what, mt_error *err) {
    mt_param_view *p = NULL;
    size_t n = 0, total = 0;
    if (mt_model_trainable_params(c->model, &p, &n, err)) return -1;
    for (size_t i = 0; i < n; i++) total += (size_t)mt_tensor_numel(&p[i].value);
    double *grad = mt_calloc(total ? total : 1, sizeof *grad, "gradient copy", err);
    double *dir = mt_calloc(total ? total : 1, sizeof *dir, "direction", err);
    if (!grad || !dir) {
        free(grad), free(dir), free(p);
        return -1;
    }
    mt_model_zero_grad(c->model);
    double loss = f(c, ctx, 1, err);
    int rc = isnan(loss) ? -1 : 0;
    size_t k = 0;
    double norm = 0.0;
    for (size_t i = 0; !rc && i < n; i++) {
        const float *g = p[i].grad.data;
        for (int64_t j = 0; j < mt_tensor_numel(&p[i].grad); j++, k++) {
            grad[k] = g[j];
            norm += grad[k] * grad[k];
        }
    }
    norm = sqrt(norm);
    if (!rc) report(c, isfinite(loss) && norm > 0, "%s: loss %.6g, gradient norm %.6g", what, loss, norm);
    uint64_t rng = 99;
    for (int d = 0; !rc && d < 3; d++) {
        /* d = 0: along the gradient; then the gradient's direction plus a random unit
         * vector, which keeps the derivative large (about |g| / sqrt 2) against fp32
         * rounding while probing every coordinate (a random direction alone can be nearly
         * orthogonal to a gradient that lives in few parameters, as an adapter's does) */
        double rlen = 0.0, len = 0.0;
        for (size_t i = 0; i < total; i++) {
            dir[i] = d == 0 ? 0.0 : (double)(mt_splitmix64(&rng) >> 11) * 0x1p-53 - 0.5;
            rlen += dir[i] * dir[i];
        }
        rlen = sqrt(rlen);
        for (size_t i = 0; i < total; i++) {
            dir[i] = (norm > 0 ? grad[i] / norm : 0.0) + (rlen > 0 ? dir[i] / rlen : 0.0);
            len += dir[i] * dir[i];
        }
        len = sqrt(len);
        double analytic = 0.0;
        for (size_t i = 0; i < total; i++) {
            dir[i] /= len > 0 ? len : 1.0;
            analytic += grad[i] * dir[i];
        }
        double numeric, noise;
        if (central_difference(c, f, ctx, p, n, dir, &numeric, &noise, err)) {
            rc = -1;
            break;
        }
        double rel = fabs(numeric - analytic) / fmax(fabs(numeric), 1e-6);
        report(c, fabs(numeric - analytic) <= FD_TOLERANCE * fabs(numeric) + noise,
               "%s: derivative along %s: plugin %.6g, finite differences %.6g (relative error "
               "%.2g, tolerance %.0e)",
               what, d == 0 ? "the gradient" : "the gradient plus a random direction", analytic,
               numeric, rel,
               FD_TOLERANCE);
    }
    /* each tensor on its own, along its own gradient (a random direction inside it when
     * the plugin gives it none), so that a tensor whose gradient is missing or wrong
     * cannot hide behind the others in the whole-model directions */
    int bad = 0;
    double worst = 0.0;
    const char *worst_name = "";
    size_t off = 0;
    for (size_t t = 0; !rc && t < n; t++) {
        const size_t nt = (size_t)mt_tensor_numel(&p[t].value);
        double tn = 0.0, len = 0.0, analytic = 0.0;
        for (size_t i = 0; i < nt; i++) tn += grad[off + i] * grad[off + i];
        memset(dir, 0, total * sizeof *dir);
        for (size_t i = 0; i < nt; i++) {
            dir[off + i] = tn > 0 ? grad[off + i] : (double)(mt_splitmix64(&rng) >> 11) * 0x1p-53 - 0.5;
            len += dir[off + i] * dir[off + i];
        }
        len = sqrt(len);
        for (size_t i = 0; i < nt; i++) {
            dir[off + i] /= len > 0 ? len : 1.0;
            analytic += grad[off + i] * dir[off + i];
        }
        double numeric, noise;
        if (central_difference(c, f, ctx, p, n, dir, &numeric, &noise, err)) {
            rc = -1;
            break;
        }
        double miss = fabs(numeric - analytic);
        if (miss > FD_TOLERANCE * fabs(numeric) + noise) {
            bad++;
            report(c, 0, "%s of %s alone: plugin %.6g, finite differences %.6g", what,
                   p[t].name, analytic, numeric);
        }
        double rel = miss / fmax(fabs(numeric), noise + 1e-30);
        if (rel > worst) worst = rel, worst_name = p[t].name;
        off += nt;
    }
    if (!rc && !bad)
        report(c, 1, "%s of each of the %zu tensors alone (worst relative error %.2g, %s)", what,
               n, worst, worst_name);
    free(grad), free(dir), free(p);
    return rc;
}

/* ---- the check adapter: a frozen base for reference-model losses ------------------------- */

/* A loss that compares the model with its own adapters disabled (DPO's reference, GRPO's
 * KL) refuses a trainable base: the reference would move with every step. Such a loss
 * is checked on a frozen base with this adapter attached: every projection but lm_head
 * gets a dense trainable delta, y = base(x) + x D^T, with D small and random, so that the
 * gradient check has parameters to move and "adapters disabled" is a different model.
 * It reaches the model through the host table, as any adapter plugin does. */

static void delta_forward(void *self, mt_tensor *y, const mt_tensor *x) {
    const check_delta *d = self;
    const mt_host *H = mt_host_table();
    H->linear_base_forward(d->lin, y, x);
    if (*d->enabled) H->matmul(y, x, &d->delta, 0, 1, 1.0f, 1.0f);
}

static void delta_backward(void *self, mt_tensor *dx, const mt_tensor *dy, const mt_tensor *x) {
    check_delta *d = self;
    const mt_host *H = mt_host_table();
    H->linear_base_backward(d->lin, dx, dy, x);
    if (!*d->enabled) return;
    H->matmul(&d->grad, dy, x, 1, 0, 1.0f, 1.0f); /* dD += dy^T x */
    H->matmul(dx, dy, &d->delta, 0, 0, 1.0f, 1.0f); /* dx += dy D */
}

static const mt_linear_impl delta_impl = {
    MT_VTABLE_SIZE(mt_linear_impl),
    .forward = delta_forward,
    .backward = delta_backward,
};

static mt_status check_adapter_attach(void *state, mt_model_handle *model, mt_error *err) {
    check_adapter_state *a = state;
    const mt_host *H = mt_host_table();
    const int n = H->model_linear_count(model);
    a->deltas = mt_calloc((size_t)(n > 0 ? n : 1), sizeof *a->deltas, "check adapter", err);
    if (!a->deltas) return MT_ERR_NOMEM;
    a->enabled = 1;
    uint64_t rng = 31;
    mt_status st = MT_OK;
    for (int i = 0; i < n && !st; i++) {
        mt_linear_handle *lin = H->model_linear(model, i);
        mt_linear_info info = {.size = sizeof info};
        H->linear_info(lin, &info);
        if (!strcmp(info.module, "lm_head")) continue;
        check_delta *d = &a->deltas[a->n++];
        d->lin = lin;
        d->enabled = &a->enabled;
        snprintf(d->name, sizeof d->name, "%s.check_delta", info.name);
        const int64_t shape[2] = {info.out, info.in};
        st = H->tensor_alloc(MT_DEVICE_CPU, MT_F32, 2, shape, &d->delta, err);
        if (!st) st = H->tensor_alloc(MT_DEVICE_CPU, MT_F32, 2, shape, &d->grad, err);
        if (st) break;
        float *v = d->delta.data; /* the check's model is on the CPU */
        for (int64_t j = 0; j < mt_tensor_numel(&d->delta); j++)
            v[j] = 0.05f * ((float)(mt_splitmix64(&rng) >> 40) * 0x1p-24f - 0.5f);
        mt_param_view view = {.size = sizeof view, .name = d->name, .value = d->delta,
                              .grad = d->grad};
        st = H->model_add_param(model, &view, err);
        if (!st) st = H->linear_wrap(lin, &delta_impl, d, err);
    }
    return st;
}

static void check_adapter_set_enabled(void *state, int enabled) {
    ((check_adapter_state *)state)->enabled = enabled;
}

static const mt_adapter_vtable check_adapter_vtable = {
    MT_VTABLE_SIZE(mt_adapter_vtable),
    .attach = check_adapter_attach,
    .set_enabled = check_adapter_set_enabled,
};

static void check_adapter_free(check_adapter_state *a) {
    const mt_host *H = mt_host_table();
    for (int i = 0; i < a->n; i++) {
        H->tensor_free(&a->deltas[i].delta);
        H->tensor_free(&a->deltas[i].grad);
    }
    free(a->deltas);
}

/* Every base parameter frozen, the check adapter attached: only its deltas train. */
static mt_status freeze_base_with_check_adapter(checker *c, mt_error *err) {
    for (size_t i = 0; i < c->model->num_params; i++)
        if (mt_model_set_trainable(c->model, &c->model->params[i], 0, err)) return err->status;
    return mt_model_attach_adapter(c->model, &check_adapter_vtable, &c->check_adapter, err);
}

/* The model's logits (CHECK_B·CHECK_T rows of the vocabulary) for the check tokens. */
static int logits_of(checker *c, float *out, mt_error *err) {
    mt_status st = mt_model_forward(c->model, c->tokens, NULL, NULL, CHECK_B, CHECK_T, err);
    return st || mt_model_logits(c->model, 0, CHECK_B * CHECK_T, out, err) ? -1 : 0;
}

/* ---- losses ------------------------------------------------------------------------------ */

/* The batches a loss is checked on, tried in this order until it accepts one. */
enum { BATCH_SEQUENCES, BATCH_PAIRS, BATCH_ROLLOUT, BATCH_KINDS };
static const char *const batch_kind_names[BATCH_KINDS] = {
    "single sequences", "preference pairs", "sampled completions (advantages, sampling log-probabilities)"};

typedef struct loss_ctx {
    mt_plugin_instance *inst;
    int64_t step_items; /* 0: the loss' own count */
    int no_targets;
    int kind; /* BATCH_*: pairs are rows 2i chosen, 2i+1 rejected */
    /* BATCH_ROLLOUT: each row's advantage, and each target's sampling log-probability */
    float advantages[CHECK_B], old_logps[CHECK_B * CHECK_T];
} loss_ctx;

/* A rollout for reinforcement-learning losses (GRPO): advantages of both signs, and
 * sampling log-probabilities 0.05 off the model's own, so that every probability ratio
 * is within exp(±0.05) of 1: smooth, and inside any clip the finite differences could
 * otherwise cross. */
static int rollout_fields(checker *c, loss_ctx *lc, mt_error *err) {
    const int V = c->model->cfg.vocab_size, rows = CHECK_B * CHECK_T;
    float *logits = malloc((size_t)rows * (size_t)V * sizeof *logits);
    if (!logits) return mt_error_set(err, MT_ERR_NOMEM, "plugin check: out of memory"), -1;
    if (logits_of(c, logits, err)) {
        free(logits);
        return -1;
    }
    for (int b = 0; b < CHECK_B; b++) lc->advantages[b] = b % 2 ? -1.1f : 0.8f;
    for (int r = 0; r < rows; r++) {
        lc->old_logps[r] = 0.0f;
        if (c->targets[r] < 0) continue;
        const float *x = logits + (size_t)r * V;
        double mx = -INFINITY, sum = 0.0;
        for (int j = 0; j < V; j++) mx = fmax(mx, x[j]);
        for (int j = 0; j < V; j++) sum += exp(x[j] - mx);
        lc->old_logps[r] = (float)(x[c->targets[r]] - mx - log(sum) + (r % 2 ? 0.05 : -0.05));
    }
    free(logits);
    return 0;
}

static mt_batch check_batch(checker *c, const loss_ctx *lc, const int32_t *targets) {
    mt_batch b = {.size = sizeof b, .B = CHECK_B, .T = CHECK_T, .tokens = c->tokens, .targets = targets,
                  .pairs = lc->kind == BATCH_PAIRS};
    if (lc->kind == BATCH_ROLLOUT) {
        b.advantages = lc->advantages;
        b.old_logps = lc->old_logps;
    }
    return b;
}

static double loss_value(checker *c, void *ctx, int backward, mt_error *err) {
    loss_ctx *lc = ctx;
    int32_t none[CHECK_B * CHECK_T];
    for (int i = 0; i < CHECK_B * CHECK_T; i++) none[i] = -100;
    mt_batch b = check_batch(c, lc, lc->no_targets ? none : c->targets);
    b.step_items = lc->step_items ? lc->step_items : mt_loss_count(lc->inst, &b);
    mt_loss_result r = {.size = sizeof r};
    const mt_loss_vtable *vt = lc->inst->desc->vtable;
    mt_status st = vt->compute(lc->inst->state, (mt_model_handle *)c->model, &b, backward, &r, err);
    if (!st) st = mt_host_check(lc->inst->desc->name, err);
    return st ? NAN : r.loss;
}

static int check_loss(checker *c, mt_plugin_instance *inst, mt_error *err) {
    if (mt_model_set_all_trainable(c->model, err)) return -1;
    loss_ctx lc = {.inst = inst};
    /* a loss may refuse single sequences (it wants preference pairs, or sampled
     * completions) and a trainable base (see the check adapter); it is then checked on
     * the batch it takes, or on a frozen base, and says so */
    int found = 0;
    for (int frozen = 0; frozen < 2 && !found; frozen++) {
        for (lc.kind = 0; lc.kind < BATCH_KINDS && !found; lc.kind++) {
            if (lc.kind == BATCH_ROLLOUT && rollout_fields(c, &lc, err)) return -1;
            if (!isnan(loss_value(c, &lc, 0, err))) {
                found = 1;
                break;
            }
            printf("  note  on %s%s: %s\n", batch_kind_names[lc.kind],
                   frozen ? " and a frozen base" : " and a trainable base",
                   err->msg[0] ? err->msg : "the loss is not a number");
            *err = (mt_error){0};
        }
        if (found) break;
        if (!frozen) {
            printf("        checking on a frozen base with a dense delta on every projection\n");
            if (freeze_base_with_check_adapter(c, err)) return -1;
        }
    }
    if (!found) {
        mt_error_set(err, MT_ERR_INVALID_ARG, "%s refuses every check batch", inst->desc->name);
        return -1;
    }
    if (lc.kind == BATCH_PAIRS) printf("  note  checked on preference pairs (rows 2i chosen, 2i+1 rejected)\n");
    if (lc.kind == BATCH_ROLLOUT) {
        /* a clipped surrogate is flat beyond its clip: a step of FD_STEP moves the
         * log-probabilities by tenths and the ratios across a clip of 0.2, so the central
         * differences take a tenth of it, keeping every ratio within about exp(±0.1) */
        c->fd_step = FD_STEP / 10;
        printf("  note  checked on %s, central differences of step %g\n", batch_kind_names[BATCH_ROLLOUT],
               c->fd_step);
    }
    if (check_gradient(c, loss_value, &lc, "gradient", err)) return -1;
    /* no targets: nothing to learn */
    lc.no_targets = 1;
    mt_model_zero_grad(c->model);
    double empty = loss_value(c, &lc, 1, err);
    if (isnan(empty)) return -1;
    mt_param_view *p = NULL;
    size_t n = 0;
    if (mt_model_trainable_params(c->model, &p, &n, err)) return -1;
    double sum = 0.0;
    for (size_t i = 0; i < n; i++) sum += c->be.ops->sum_squares(&c->be, p[i].grad.data, (size_t)mt_tensor_numel(&p[i].grad));
    free(p);
    report(c, empty == 0.0 && sum == 0.0,
           "a batch without targets: loss %g, gradient norm %g (both must be 0)", empty, sqrt(sum));
    /* step_items: twice the items, half the loss */
    lc.no_targets = 0;
    mt_batch b = check_batch(c, &lc, c->targets);
    int64_t items = mt_loss_count(inst, &b);
    double one = loss_value(c, &lc, 0, err);
    lc.step_items = 2 * items;
    double half = loss_value(c, &lc, 0, err);
    if (isnan(one) || isnan(half)) return -1;
    report(c, items > 0 && fabs(half * 2 - one) <= 1e-6 * fabs(one),
           "normalised by step_items: %lld items give %.8g, twice as many %.8g", (long long)items,
           one, half);
    return 0;
}

/* ---- adapters ---------------------------------------------------------------------------- */

static double model_ce(checker *c, void *ctx, int backward, mt_error *err) {
    (void)ctx;
    float loss;
    mt_status st = mt_model_forward(c->model, c->tokens, NULL, NULL, CHECK_B, CHECK_T, err);
    if (!st) st = mt_model_cross_entropy(c->model, c->targets, backward, &loss, NULL, err);
    if (!st && backward) st = mt_model_backward(c->model, err);
    return st ? NAN : loss;
}

/* Every trainable gradient of the model, concatenated, into a new array of *total. */
static float *copy_grads(checker *c, size_t *total, mt_error *err) {
    mt_param_view *p = NULL;
    size_t n = 0, len = 0;
    if (mt_model_trainable_params(c->model, &p, &n, err)) return NULL;
    for (size_t i = 0; i < n; i++) len += (size_t)mt_tensor_numel(&p[i].grad);
    float *out = mt_calloc(len ? len : 1, sizeof *out, "gradient copy", err);
    for (size_t i = 0, k = 0; out && i < n; k += (size_t)mt_tensor_numel(&p[i].grad), i++)
        memcpy(out + k, p[i].grad.data, (size_t)mt_tensor_numel(&p[i].grad) * sizeof *out);
    free(p);
    *total = len;
    return out;
}

/* Gradient checkpointing (recompute "layers") runs the adapter's forwards a second time
 * in backward, between set_replay(1) and set_replay(0). A training step (dropout and
 * the like on) must then give the gradients of a step without it, to the bit. The
 * adapter's state slots (LoRA's dropout passes) are put back between the two steps, so
 * that both draw what one step would. */
static int check_adapter_replay(checker *c, mt_plugin_instance *inst, mt_error *err) {
    const mt_adapter_vtable *vt = inst->desc->vtable;
    const mt_model *m = c->model;
    if (!MT_VTABLE_HAS(mt_adapter_vtable, vt, set_replay)) {
        if (m->num_adapters && m->adapters[m->num_adapters - 1].wraps)
            printf("  note  %s wraps projections and has no set_replay: gradient checkpointing "
                   "(recompute \"layers\") refuses it\n", inst->desc->name);
        return 0;
    }
    const int slots = MT_VTABLE_HAS(mt_adapter_vtable, vt, state_count) &&
                      MT_VTABLE_HAS(mt_adapter_vtable, vt, state_get) &&
                      MT_VTABLE_HAS(mt_adapter_vtable, vt, state_set);
    const size_t count = slots ? vt->state_count(inst->state) : 0;
    const mt_recompute mode_before = m->recompute;
    /* the state as it is before the first step: names and host copies */
    char **names = mt_calloc(count ? count : 1, sizeof *names, "adapter state", err);
    mt_tensor *saved = mt_calloc(count ? count : 1, sizeof *saved, "adapter state", err);
    int rc = names && saved ? 0 : -1;
    for (size_t i = 0; !rc && i < count; i++) {
        const char *name;
        mt_tensor t;
        if (vt->state_get(inst->state, i, &name, &t, err)) {
            rc = -1;
            break;
        }
        const size_t bytes = (size_t)mt_tensor_numel(&t) * mt_dtype_size(t.dtype);
        saved[i] = t;
        saved[i].device = MT_DEVICE_CPU;
        saved[i].data = mt_malloc(bytes ? bytes : 1, "adapter state", err);
        names[i] = saved[i].data ? strdup(name) : NULL;
        if (!names[i] || mt_host_table()->tensor_download(saved[i].data, &t, err)) rc = -1;
    }
    float *plain = NULL, *replayed = NULL;
    size_t n_plain = 0, n_replayed = 0;
    mt_model_set_training(c->model, 1);
    if (!rc) {
        mt_model_zero_grad(c->model);
        rc = mt_model_set_recompute(c->model, MT_RECOMPUTE_OFF, err) || isnan(model_ce(c, NULL, 1, err)) ||
             !(plain = copy_grads(c, &n_plain, err)) ? -1 : 0;
    }
    for (size_t i = 0; !rc && i < count; i++)
        if (vt->state_set(inst->state, names[i], &saved[i], err)) rc = -1;
    if (!rc) {
        mt_model_zero_grad(c->model);
        rc = mt_model_set_recompute(c->model, MT_RECOMPUTE_LAYERS, err) ||
             isnan(model_ce(c, NULL, 1, err)) || !(replayed = copy_grads(c, &n_replayed, err)) ? -1 : 0;
    }
    if (!rc)
        report(c, n_plain == n_replayed && !memcmp(plain, replayed, n_plain * sizeof *plain),
               "gradient checkpointing: a training step with every layer recomputed gives the "
               "same %zu gradient values (set_replay)", n_plain);
    mt_model_set_training(c->model, 0);
    if (!rc && mt_model_set_recompute(c->model, mode_before, err)) rc = -1;
    for (size_t i = 0; i < count; i++) {
        if (names) free(names[i]);
        if (saved) free(saved[i].data);
    }
    free(names), free(saved), free(plain), free(replayed);
    return rc;
}

static int check_adapter(checker *c, mt_plugin_instance *inst, mt_error *err) {
    const mt_adapter_vtable *vt = inst->desc->vtable;
    if (mt_model_attach_adapter(c->model, vt, inst->state, err)) return -1;
    mt_model_set_training(c->model, 0); /* no dropout: the loss must be a function */
    mt_param_view *p = NULL;
    size_t n = 0;
    if (mt_model_trainable_params(c->model, &p, &n, err)) return -1;
    report(c, n > 0, "attach: %zu trainable tensors", n);
    uint64_t rng = 5; /* adapters start as the identity (LoRA's B = 0): move them off it */
    for (size_t i = 0; i < n; i++) {
        float *v = p[i].value.data;
        for (int64_t j = 0; j < mt_tensor_numel(&p[i].value); j++)
            v[j] += 0.05f * (float)((double)(mt_splitmix64(&rng) >> 11) * 0x1p-53 - 0.5);
    }
    free(p);
    if (n && check_gradient(c, model_ce, NULL, "gradient", err)) return -1;
    if (n && check_adapter_replay(c, inst, err)) return -1;
    if (!MT_VTABLE_HAS(mt_adapter_vtable, vt, merge) || !MT_VTABLE_HAS(mt_adapter_vtable, vt, unmerge)) {
        printf("  note  %s does not merge: merge check not run\n", inst->desc->name);
        return 0;
    }
    const size_t nl = (size_t)CHECK_B * CHECK_T * (size_t)c->model->cfg.vocab_size;
    float *before = mt_calloc(3 * nl, sizeof *before, "logits", err);
    if (!before) return -1;
    float *merged = before + nl, *after = merged + nl;
    int rc = logits_of(c, before, err);
    if (!rc) rc = vt->merge(inst->state, err) || mt_host_check("merge", err) ? -1 : 0;
    if (!rc) rc = logits_of(c, merged, err);
    if (!rc) rc = vt->unmerge(inst->state, err) || mt_host_check("unmerge", err) ? -1 : 0;
    if (!rc) rc = logits_of(c, after, err);
    double d1 = 0, d2 = 0;
    for (size_t i = 0; !rc && i < nl; i++) {
        d1 = fmax(d1, fabs((double)merged[i] - before[i]));
        d2 = fmax(d2, fabs((double)after[i] - before[i]));
    }
    if (!rc) {
        report(c, d1 <= 1e-4, "merged logits equal the adapted ones (max difference %.2g)", d1);
        report(c, d2 <= 1e-4, "unmerged logits equal them again (max difference %.2g)", d2);
    }
    free(before);
    return rc;
}

/* ---- optimizers and schedulers --------------------------------------------------------- */

enum { OPT_PARAMS = 2 };

typedef struct opt_fixture {
    float value[OPT_PARAMS][12], grad[OPT_PARAMS][12];
    mt_param_view views[OPT_PARAMS];
} opt_fixture;

static void fixture_init(opt_fixture *f) {
    static const int64_t shapes[OPT_PARAMS][2] = {{5, 1}, {3, 4}};
    static const char *names[OPT_PARAMS] = {"check.bias", "check.weight"};
    memset(f, 0, sizeof *f);
    for (int i = 0; i < OPT_PARAMS; i++) {
        int64_t n = shapes[i][0] * shapes[i][1];
        for (int64_t j = 0; j < n; j++) f->value[i][j] = (float)sin(1.0 + 3.0 * i + j) + 0.25f;
        f->views[i] = (mt_param_view){
            .size = sizeof(mt_param_view), .name = names[i], .no_decay = i == 0,
            .value = {.dtype = MT_F32, .device = MT_DEVICE_CPU, .ndim = i ? 2 : 1,
                      .shape = {shapes[i][0], i ? shapes[i][1] : 0}, .data = f->value[i]},
            .grad = {.dtype = MT_F32, .device = MT_DEVICE_CPU, .ndim = i ? 2 : 1,
                     .shape = {shapes[i][0], i ? shapes[i][1] : 0}, .data = f->grad[i]}};
    }
}

static double fixture_step(opt_fixture *f, mt_plugin_instance *inst, int64_t step, mt_error *err) {
    double q = 0.0;
    for (int i = 0; i < OPT_PARAMS; i++)
        for (int j = 0; j < 12; j++) {
            f->grad[i][j] = f->value[i][j]; /* d/dp ½p² */
            q += 0.5 * (double)f->value[i][j] * f->value[i][j];
        }
    const mt_optimizer_vtable *vt = inst->desc->vtable;
    if (vt->step(inst->state, f->views, OPT_PARAMS, 1e-2, step, err) ||
        mt_host_check(inst->desc->name, err))
        return NAN;
    return q;
}

static int check_optimizer(checker *c, const mt_plugin *plugin, mt_plugin_instance *a,
                           mt_error *err) {
    opt_fixture fa, fb;
    fixture_init(&fa);
    double first = fixture_step(&fa, a, 1, err), q = first;
    for (int64_t s = 2; s <= 3 && !isnan(q); s++) q = fixture_step(&fa, a, s, err);
    if (isnan(q)) return -1;
    /* a fresh instance with the saved state continues exactly like the first */
    mt_plugin_instance *b = NULL;
    if (mt_plugin_instantiate(plugin, NULL, 0, &b, err)) return -1;
    const mt_optimizer_vtable *vt = a->desc->vtable;
    fixture_init(&fb);
    memcpy(fb.value, fa.value, sizeof fb.value);
    int rc = 0;
    size_t count = vt->state_count(a->state);
    for (size_t i = 0; !rc && i < count; i++) {
        const char *name;
        mt_tensor t;
        if (vt->state_get(a->state, i, &name, &t, err)) rc = -1;
        float *host = rc ? NULL : mt_malloc(mt_tensor_nbytes(&t) + 1, "optimizer state", err);
        if (!host || mt_device_download(host, &t, err)) rc = -1;
        mt_tensor h = t;
        h.device = MT_DEVICE_CPU;
        h.data = host;
        if (!rc && vt->state_set(b->state, name, &h, err)) rc = -1;
        free(host);
    }
    double qa = 0, qb = 0;
    for (int64_t s = 4; !rc && s <= 5; s++) {
        qa = fixture_step(&fa, a, s, err);
        qb = fixture_step(&fb, b, s, err);
        if (isnan(qa) || isnan(qb)) rc = -1;
    }
    if (!rc) {
        report(c, !memcmp(fa.value, fb.value, sizeof fa.value),
               "state: %zu tensors saved after 3 steps and restored into a new instance continue "
               "identically",
               count);
        for (int64_t s = 6; s <= 20 && !isnan(qa); s++) qa = fixture_step(&fa, a, s, err);
        report(c, isfinite(qa) && qa < first,
               "descent on ½|p|²: %.6g after 1 step, %.6g after 20", first, qa);
        if (isnan(qa)) rc = -1;
    }
    mt_plugin_instance_free(b);
    return rc;
}

static void check_scheduler(checker *c, mt_plugin_instance *inst) {
    const mt_scheduler_vtable *vt = inst->desc->vtable;
    double lo = INFINITY, hi = -INFINITY;
    int ok = 1;
    for (int64_t s = 0; s <= 100; s++) {
        double lr = vt->lr(inst->state, s, 100, 1e-3);
        ok &= isfinite(lr) && lr >= 0;
        lo = fmin(lo, lr), hi = fmax(hi, lr);
    }
    report(c, ok, "learning rates over 100 steps at base 1e-3: from %.3g to %.3g, all finite and >= 0",
           lo, hi);
}

/* ---- the command ------------------------------------------------------------------------ */

static void usage(FILE *out) {
    fprintf(out,
            "usage: moontune plugin check FILE.so\n"
            "\n"
            "Loads one plugin file and checks it on built-in fixtures: a loss's gradient against\n"
            "finite differences on a tiny random model, an optimizer's descent and state restore,\n"
            "a scheduler's learning rates, an adapter's gradient, replay and merge. Prints one\n"
            "line per check; exits 0 when every check passes, 1 when one fails or the plugin\n"
            "is refused.\n");
}

int mt_cmd_plugin(int argc, char **argv) {
    if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
        usage(stdout);
        return 0;
    }
    if (argc != 3 || strcmp(argv[1], "check") != 0) {
        usage(stderr);
        return 2;
    }
    const char *path = argv[2];
    mt_error err = {0};
    mt_plugin *plugin = NULL;
    if (mt_plugin_load(path, &plugin, &err)) {
        fprintf(stderr, "moontune plugin check: %s\n", err.msg);
        return 1;
    }
    const mt_plugin_descriptor *d = mt_plugin_desc(plugin);
    printf("%s: %s %s %s (plugin ABI %u)\n", path, mt_plugin_kind_name(d->kind), d->name,
           d->version, (unsigned)d->abi_version);
    checker c = {0};
    mt_plugin_instance *inst = NULL;
    int rc = mt_plugin_instantiate(plugin, NULL, 0, &inst, &err) ? -1 : 0;
    if (!rc && (d->kind == MT_PLUGIN_LOSS || d->kind == MT_PLUGIN_ADAPTER))
        rc = tiny_model(&c, &err) ? -1 : 0;
    if (!rc) {
        switch (d->kind) {
        case MT_PLUGIN_LOSS: rc = check_loss(&c, inst, &err); break;
        case MT_PLUGIN_ADAPTER: rc = check_adapter(&c, inst, &err); break;
        case MT_PLUGIN_OPTIMIZER: rc = check_optimizer(&c, plugin, inst, &err); break;
        case MT_PLUGIN_SCHEDULER: check_scheduler(&c, inst); break;
        }
    }
    if (rc) {
        fprintf(stderr, "moontune plugin check: %s: %s\n", path, err.msg[0] ? err.msg : "failed");
        c.failures++;
    }
    mt_model_free(c.model);
    check_adapter_free(&c.check_adapter);
    mt_plugin_instance_free(inst);
    if (c.be.ops) mt_backend_cpu_shutdown(&c.be);
    mt_plugin_unload(plugin);
    printf("%s: %s\n", path, c.failures ? "FAILED" : "all checks passed");
    return c.failures ? 1 : 0;
}
