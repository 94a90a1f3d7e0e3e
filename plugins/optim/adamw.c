/* adamw.c — torch.optim.AdamW as a moontune optimizer plugin.
 *
 * For every parameter p with gradient g, at optimizer step t (from 1) and learning rate lr,
 * as torch's single-tensor path does it, in fp32 and in its order of operations (results
 * agree with torch to about 1e-8, not bit for bit: torch's vector kernels fuse some
 * multiply-adds):
 *
 *     p  *= 1 - lr * wd                  decoupled weight decay (skipped when wd is 0);
 *                                        wd is 0 for parameters marked no_decay
 *     m   = lerp(m, g, 1 - beta1)        first moment   (state "exp_avg/<param>")
 *     v   = v * beta2 + (1 - beta2) g^2  second moment  (state "exp_avg_sq/<param>")
 *     vm  = max(vm, v)                   amsgrad only   (state "max_exp_avg_sq/<param>")
 *     denom = sqrt(v or vm) / sqrt(1 - beta2^t) + eps
 *     p  -= lr / (1 - beta1^t) * m / denom
 *
 * Parameters must be F32.
 *
 * State is created lazily (zeros, the shape of the parameter, on its device) on the first
 * step that sees a parameter, or by state_set when a checkpoint is restored. The update
 * is a sequence of host operations (plugin ABI 2), so it runs wherever the model does.
 *
 * The step count: torch keeps a `step` per parameter; here the host's step argument is
 * the one step count. The trainer saves it with its own state in a checkpoint and passes
 * it again on resume, so the optimizer saves no "step" tensor. Every parameter is
 * updated at every step, so the per-parameter counts torch keeps would all be equal.
 *
 * Restoring: state_set may come before the first step (state is created from the
 * tensor's name and shape) or after it (the state must already exist). The first step
 * after a restore checks that every parameter got all of its state and that every
 * restored tensor belongs to a parameter of the same shape, and refuses otherwise.
 * That bookkeeping, shared with sgd.c and lion.c, is in optim_state.h. */
#include <math.h>
#include <stdint.h>

#include <moontune/plugin.h>

#define NAME "adamw"

static const mt_host *host;

#include "optim_state.h"

/* ---- options: the defaults, in one place (torch.optim.AdamW's) ---- */

static const mt_option_spec options[] = {
    {"beta1", MT_OPT_FLOAT, "0.9", 0.0, 1.0, NULL, "decay of the first moment, in [0, 1)"},
    {"beta2", MT_OPT_FLOAT, "0.999", 0.0, 1.0, NULL, "decay of the second moment, in [0, 1)"},
    {"eps", MT_OPT_FLOAT, "1e-8", 0.0, 1e300, NULL, "added to the denominator"},
    {"weight_decay", MT_OPT_FLOAT, "0.01", 0.0, 1e300, NULL,
     "decoupled weight decay (0 for no_decay parameters)"},
    {"amsgrad", MT_OPT_BOOL, "false", 0.0, 0.0, NULL,
     "normalise by the running maximum of the second moment (AMSGrad)"},
};

/* ---- state ---- */

enum { EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, MAX_KINDS };
static const char *const kind_names[MAX_KINDS] = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};

typedef struct adamw {
    optim_state base; /* the slots; n_kinds is 2, or 3 with amsgrad */
    double beta1, beta2, eps;
    int amsgrad;
} adamw;

/* ---- the update of one parameter ---- */

/* Each line of the formula above is one host operation over the whole parameter, in
 * torch's order and with its fp32 arithmetic (plugin.h states each operation's formula):
 * the results do not depend on the device's thread count, since every element is
 * computed on its own. */
static void update(const void *self, optim_slot *s, mt_tensor *p, const mt_tensor *g,
                   mt_tensor *scratch, double wd, double lr, int64_t step) {
    const adamw *st = self;
    (void)scratch;
    mt_tensor *m = &s->buf[EXP_AVG], *v = &s->buf[EXP_AVG_SQ], *vmax = &s->buf[MAX_EXP_AVG_SQ];
    const double bias_correction1 = 1.0 - pow(st->beta1, (double)step);
    const double bias_correction2 = 1.0 - pow(st->beta2, (double)step);
    /* p = decay * p: axpby with beta 0 overwrites, so this is exactly p * decay */
    if (wd != 0.0) host->axpby(p, (float)(1.0 - lr * wd), p, 0.0f);
    host->lerp(m, g, (float)(1.0 - st->beta1));
    host->addcmul(v, (float)st->beta2, (float)(1.0 - st->beta2), g, g);
    const mt_tensor *second = v;
    if (st->amsgrad) {
        host->maximum(vmax, v); /* NaN propagates, as torch.maximum */
        second = vmax;
    }
    host->addcdiv_sqrt(p, (float)-(lr / bias_correction1), m, second,
                       (float)pow(bias_correction2, 0.5), (float)st->eps);
}

static const optim_spec spec = {kind_names, MAX_KINDS, update};

/* ---- the vtable ---- */

static mt_status opt_create(const mt_host *h, const mt_options *opts, void **out, mt_error *err) {
    adamw *st = optim_alloc(h, sizeof *st, &spec, err);
    if (!st) return MT_ERR_NOMEM;
    st->beta1 = h->opt_float(opts, "beta1");
    st->beta2 = h->opt_float(opts, "beta2");
    st->eps = h->opt_float(opts, "eps");
    st->base.weight_decay = h->opt_float(opts, "weight_decay");
    st->amsgrad = h->opt_bool(opts, "amsgrad");
    st->base.n_kinds = st->amsgrad ? 3 : 2;
    if (!(st->beta1 < 1.0) || !(st->beta2 < 1.0)) {
        h->free(st);
        return h->error(err, MT_ERR_INVALID_ARG,
                        NAME ": beta1 and beta2 must be in [0, 1), found beta1 = %g, beta2 = %g",
                        h->opt_float(opts, "beta1"), h->opt_float(opts, "beta2"));
    }
    *out = st;
    return MT_OK;
}

static mt_status opt_state_set(void *state, const char *name, const mt_tensor *tensor,
                               mt_error *err) {
    const adamw *st = state;
    const int kind = optim_kind_of(&st->base, name);
    if (kind < 0)
        return host->error(err, MT_ERR_INVALID_ARG,
                           NAME
                           ": unknown state '%s': expected exp_avg/<param>, exp_avg_sq/<param>%s",
                           name ? name : "(null)", st->amsgrad ? " or max_exp_avg_sq/<param>" : "");
    if (kind >= st->base.n_kinds)
        return host->error(
            err, MT_ERR_INVALID_ARG,
            NAME
            ": state '%s' is kept only with amsgrad = true, and this optimizer has amsgrad = false",
            name);
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
                 .description = "AdamW with decoupled weight decay and optional AMSGrad, as torch.optim.AdamW",
                 .options = options,
                 .n_options = sizeof options / sizeof options[0],
                 .vtable = &vtable)
