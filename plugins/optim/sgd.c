/* sgd.c — torch.optim.SGD as a moontune optimizer plugin.
 *
 * For every parameter p with gradient g at learning rate lr, as torch's single-tensor
 * path does it, in fp32 and in its order of operations:
 *
 *     d  = g + wd * p              L2 weight decay added to the gradient (skipped when
 *                                  wd is 0); wd is 0 for parameters marked no_decay
 *     b  = d                       on a parameter's first step (torch clones the gradient)
 *     b  = momentum * b + (1 - dampening) * d
 *                                  on later steps (state "momentum_buffer/<param>")
 *     d  = d + momentum * b        with nesterov, else d = b
 *     p -= lr * d
 *
 * Parameters must be F32. The update is a sequence of host operations (plugin ABI 2), with
 * one scratch tensor as large as the largest parameter when weight decay or Nesterov
 * change d. With momentum 0 there is no buffer and no state. The buffer is created lazily on the
 * first step that sees a parameter, or by state_set when a checkpoint is restored, in
 * which case the restored buffer is used as is (no clone of the gradient).
 *
 * The step count: SGD does not use it. Restoring (optim_state.h): state_set may come
 * before or after the first step, and the first step after a restore checks that every
 * parameter got its buffer and that every restored buffer belongs to a parameter of the
 * same shape. */
#include <math.h>
#include <stdint.h>

#include <moontune/plugin.h>

#define NAME "sgd"

static const mt_host *host;

#include "optim_state.h"

/* ---- options: the defaults, in one place (torch.optim.SGD's) ---- */

static const mt_option_spec options[] = {
    {"momentum", MT_OPT_FLOAT, "0", 0.0, 1e300, NULL, "momentum factor (0: plain SGD, no state)"},
    {"dampening", MT_OPT_FLOAT, "0", 0.0, 1.0, NULL,
     "dampening of the gradient added to the momentum"},
    {"nesterov", MT_OPT_BOOL, "false", 0.0, 0.0, NULL,
     "Nesterov momentum (needs momentum > 0 and dampening 0)"},
    {"weight_decay", MT_OPT_FLOAT, "0", 0.0, 1e300, NULL,
     "L2 penalty added to the gradient (0 for no_decay parameters)"},
};

/* ---- state ---- */

enum { MOMENTUM_BUFFER, MAX_KINDS };
static const char *const kind_names[MAX_KINDS] = {"momentum_buffer"};

typedef struct sgd {
    optim_state base; /* the slots; n_kinds is 1, or 0 without momentum */
    double momentum, dampening;
    int nesterov;
} sgd;

/* ---- the update of one parameter ---- */

/* Host operations over the whole parameter (plugin ABI 2). d is the gradient itself when
 * nothing changes it, else the scratch tensor (the gradient is the host's, not ours to
 * overwrite). axpby computes alpha * x + beta * y, with the products and sums of the
 * formulas above (a multiplication by 1 is exact). s->started: the buffer holds a
 * momentum (torch: it is not None), from an earlier step or a restore. */
static void update(const void *self, optim_slot *s, mt_tensor *p, const mt_tensor *g,
                   mt_tensor *scratch, double wd, double lr, int64_t step) {
    const sgd *st = self;
    (void)step;
    const float momentum = (float)st->momentum;
    const int has_momentum = st->momentum != 0.0;
    const mt_tensor *d = g;
    if (wd != 0.0 || (has_momentum && st->nesterov)) {
        host->copy(scratch, g);
        if (wd != 0.0) host->axpby(scratch, (float)wd, p, 1.0f); /* d = g + wd p */
        d = scratch;
    }
    if (has_momentum) {
        mt_tensor *b = &s->buf[MOMENTUM_BUFFER];
        if (s->started) host->axpby(b, (float)(1.0 - st->dampening), d, momentum);
        else host->copy(b, d); /* the first step: torch clones d */
        if (st->nesterov) host->axpby(scratch, momentum, b, 1.0f); /* d = d + momentum b */
        else d = b;
    }
    host->axpby(p, (float)-lr, d, 1.0f); /* p = p - lr d */
}

static const optim_spec spec = {kind_names, MAX_KINDS, update};

/* ---- the vtable ---- */

static mt_status opt_create(const mt_host *h, const mt_options *opts, void **out, mt_error *err) {
    sgd *st = optim_alloc(h, sizeof *st, &spec, err);
    if (!st) return MT_ERR_NOMEM;
    st->momentum = h->opt_float(opts, "momentum");
    st->dampening = h->opt_float(opts, "dampening");
    st->nesterov = h->opt_bool(opts, "nesterov");
    st->base.weight_decay = h->opt_float(opts, "weight_decay");
    st->base.n_kinds = st->momentum != 0.0 ? 1 : 0;
    /* d differs from the gradient with weight decay or Nesterov: it needs its own tensor */
    st->base.needs_scratch = st->base.weight_decay != 0.0 || st->nesterov;
    if (st->nesterov && (st->momentum <= 0.0 || st->dampening != 0.0)) {
        h->free(st);
        return h->error(err, MT_ERR_INVALID_ARG,
                        NAME ": nesterov needs momentum > 0 and dampening 0, found momentum = %g, "
                             "dampening = %g",
                        h->opt_float(opts, "momentum"), h->opt_float(opts, "dampening"));
    }
    *out = st;
    return MT_OK;
}

static mt_status opt_state_set(void *state, const char *name, const mt_tensor *tensor,
                               mt_error *err) {
    const sgd *st = state;
    const int kind = optim_kind_of(&st->base, name);
    if (kind < 0)
        return host->error(err, MT_ERR_INVALID_ARG,
                           st->base.n_kinds
                               ? NAME ": unknown state '%s': expected momentum_buffer/<param>"
                               : NAME ": unknown state '%s': SGD without momentum keeps no state",
                           name ? name : "(null)");
    if (kind >= st->base.n_kinds)
        return host->error(err, MT_ERR_INVALID_ARG,
                           NAME ": state '%s': SGD without momentum keeps no state", name);
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
                 .description = "SGD with momentum, dampening, Nesterov and L2 weight decay, as torch.optim.SGD",
                 .options = options,
                 .n_options = sizeof options / sizeof options[0],
                 .vtable = &vtable)
