/* lion.c — the Lion optimizer (Chen et al. 2023, "Symbolic Discovery of Optimization
 * Algorithms"), as lucidrains/lion-pytorch implements it.
 *
 * For every parameter p with gradient g at learning rate lr (in fp32):
 *
 *     p *= 1 - lr * wd                        decoupled weight decay (skipped when wd is 0);
 *                                             wd is 0 for parameters marked no_decay
 *     p -= lr * sign(beta1 * m + (1 - beta1) * g)     sign(0) = 0
 *     m  = beta2 * m + (1 - beta2) * g        (state "exp_avg/<param>", zeros at first)
 *
 * Parameters must be F32. The state is created lazily (on the parameter's device) on the
 * first step that sees a parameter, or by state_set when a checkpoint is restored; the
 * update is a sequence of host operations (plugin ABI 2) with one scratch tensor as large
 * as the largest parameter. The step count: Lion does not use it. Restoring
 * (optim_state.h): state_set may come before or after the first step, and the first step
 * after a restore checks that every parameter got its state and that every restored
 * tensor belongs to a parameter of the same shape. */
#include <math.h>
#include <stdint.h>

#include <moontune/plugin.h>

#define NAME "lion"

static const mt_host *host;

#include "optim_state.h"

/* ---- options: the defaults, in one place (lion-pytorch's) ---- */

static const mt_option_spec options[] = {
    {"beta1", MT_OPT_FLOAT, "0.9", 0.0, 1.0, NULL,
     "interpolation of momentum and gradient for the update"},
    {"beta2", MT_OPT_FLOAT, "0.99", 0.0, 1.0, NULL, "decay of the momentum"},
    {"weight_decay", MT_OPT_FLOAT, "0", 0.0, 1e300, NULL,
     "decoupled weight decay (0 for no_decay parameters)"},
};

/* ---- state ---- */

enum { EXP_AVG, MAX_KINDS };
static const char *const kind_names[MAX_KINDS] = {"exp_avg"};

typedef struct lion {
    optim_state base; /* the slots; n_kinds is 1 */
    double beta1, beta2;
} lion;

/* ---- the update of one parameter ---- */

/* Host operations over the whole parameter (plugin ABI 2), each the fp32 arithmetic of
 * one line above; c is computed into the scratch tensor, since m is still needed after
 * it. axpby computes alpha * x + beta * y: the same products and sum as m * b1 + w1 * g. */
static void update(const void *self, optim_slot *s, mt_tensor *p, const mt_tensor *g,
                   mt_tensor *c, double wd, double lr, int64_t step) {
    const lion *st = self;
    (void)step;
    mt_tensor *m = &s->buf[EXP_AVG];
    const float b1 = (float)st->beta1, w1 = (float)(1.0 - st->beta1);
    const float b2 = (float)st->beta2, w2 = (float)(1.0 - st->beta2);
    /* p = decay * p: axpby with beta 0 overwrites, so this is exactly p * decay */
    if (wd != 0.0) host->axpby(p, (float)(1.0 - lr * wd), p, 0.0f);
    host->copy(c, m);
    host->axpby(c, w1, g, b1);           /* c = beta1 m + (1 - beta1) g */
    host->add_sign(p, (float)-lr, c);    /* sign(0) = 0; NaN propagates */
    host->axpby(m, w2, g, b2);           /* m = beta2 m + (1 - beta2) g */
}

static const optim_spec spec = {kind_names, MAX_KINDS, update};

/* ---- the vtable ---- */

static mt_status opt_create(const mt_host *h, const mt_options *opts, void **out, mt_error *err) {
    lion *st = optim_alloc(h, sizeof *st, &spec, err);
    if (!st) return MT_ERR_NOMEM;
    st->beta1 = h->opt_float(opts, "beta1");
    st->beta2 = h->opt_float(opts, "beta2");
    st->base.weight_decay = h->opt_float(opts, "weight_decay");
    st->base.n_kinds = 1;
    st->base.needs_scratch = 1; /* c, the interpolation whose sign is the update */
    *out = st;
    return MT_OK;
}

static mt_status opt_state_set(void *state, const char *name, const mt_tensor *tensor,
                               mt_error *err) {
    const int kind = optim_kind_of(state, name);
    if (kind < 0)
        return host->error(err, MT_ERR_INVALID_ARG,
                           NAME ": unknown state '%s': expected exp_avg/<param>",
                           name ? name : "(null)");
    return optim_restore(state, name, kind, tensor, err);
}

static const mt_optimizer_vtable vtable = {
    MT_VTABLE_SIZE(mt_optimizer_vtable),
    .create = opt_create,
    .destroy = optim_destroy,
    .step = optim_step,
    .state_count = optim_state_count,
    .state_get = optim_state_get,
    .state_set = opt_state_set,
};

MT_PLUGIN_DEFINE(host,
                 .kind = MT_PLUGIN_OPTIMIZER,
                 .name = NAME,
                 .version = "1.0.0",
                 .description =
                     "Lion: the sign of interpolated momentum, decoupled weight decay (Chen et al. 2023)",
                 .options = options,
                 .n_options = sizeof options / sizeof options[0],
                 .vtable = &vtable)
