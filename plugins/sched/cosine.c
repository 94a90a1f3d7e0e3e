/* cosine.c — linear warmup, then a cosine from base_lr down to min_lr_ratio * base_lr,
 * as transformers' get_cosine_with_min_lr_schedule_with_warmup (with min_lr_ratio 0 it
 * is get_cosine_schedule_with_warmup):
 *
 *     lambda(step) = step / max(1, warmup)                               for step < warmup
 *     progress     = (step - warmup) / max(1, total - warmup)            afterwards
 *     factor       = 0.5 * (1 + cos(pi * num_cycles * 2 * progress))
 *     lambda(step) = max(0, factor * (1 - min_lr_ratio) + min_lr_ratio)
 *
 * lr = base_lr * lambda(step), step counted from 0. num_cycles 0.5 is one half-cosine
 * down to the minimum; larger values go up and down again. The warmup is warmup_steps,
 * or when that is 0, ceil(total_steps * warmup_ratio) as TrainingArguments does. */
#include <math.h>
#include <stdint.h>

#include <moontune/plugin.h>

#define NAME "cosine"
#define PI 3.141592653589793 /* Python's math.pi */

static const mt_host *host;

#include "sched_common.h"

/* ---- options: the defaults, in one place ---- */

static const mt_option_spec options[] = {
    SCHED_WARMUP_OPTIONS, /* warmup_steps, warmup_ratio */
    {"num_cycles", MT_OPT_FLOAT, "0.5", 0.0, 1e6, NULL,
     "cosine waves after the warmup (0.5: one half-cosine down to the minimum)"},
    {"min_lr_ratio", MT_OPT_FLOAT, "0", 0.0, 1.0, NULL,
     "the lowest learning rate as a fraction of the base learning rate"},
};

typedef struct cosine {
    sched_span warmup; /* warmup_steps, warmup_ratio */
    double num_cycles, min_lr_ratio;
} cosine;

static double sched_lr(void *state, int64_t step, int64_t total, double base_lr) {
    const cosine *st = state;
    const int64_t warmup = sched_span_of(st->warmup, total);
    if (step < warmup) return base_lr * sched_warmup_lambda(step, warmup);
    const double progress = (double)(step - warmup) / (double)sched_max1(total - warmup);
    double factor = 0.5 * (1.0 + cos(PI * st->num_cycles * 2.0 * progress));
    factor = factor * (1.0 - st->min_lr_ratio) + st->min_lr_ratio;
    return base_lr * (factor > 0.0 ? factor : 0.0);
}

/* ---- the vtable ---- */

static mt_status sched_create(const mt_host *h, const mt_options *opts, void **out, mt_error *err) {
    cosine *st = sched_alloc(h, sizeof *st, err);
    if (!st) return MT_ERR_NOMEM;
    st->warmup = sched_span_read(h, opts, "warmup_steps", "warmup_ratio");
    st->num_cycles = h->opt_float(opts, "num_cycles");
    st->min_lr_ratio = h->opt_float(opts, "min_lr_ratio");
    *out = st;
    return MT_OK;
}

static const mt_scheduler_vtable vtable = {
    MT_VTABLE_SIZE(mt_scheduler_vtable),
    .create = sched_create,
    .destroy = sched_destroy,
    .lr = sched_lr,
};

MT_PLUGIN_DEFINE(host,
                 .kind = MT_PLUGIN_SCHEDULER,
                 .name = NAME,
                 .version = "1.0.0",
                 .description =
                     "linear warmup, then cosine decay to min_lr_ratio (transformers' cosine_with_min_lr)",
                 .options = options,
                 .n_options = sizeof options / sizeof options[0],
                 .vtable = &vtable)
