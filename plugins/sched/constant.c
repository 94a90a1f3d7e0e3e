/* constant.c — a constant learning rate after a linear warmup, as transformers'
 * get_constant_schedule_with_warmup:
 *
 *     lambda(step) = step / max(1, warmup)   for step < warmup
 *                    1                       afterwards
 *
 * lr = base_lr * lambda(step), step counted from 0. The warmup is warmup_steps, or when
 * that is 0, ceil(total_steps * warmup_ratio) as TrainingArguments.get_warmup_steps. */
#include <stdint.h>

#include <moontune/plugin.h>

#define NAME "constant"

static const mt_host *host;

#include "sched_common.h"

/* ---- options: the defaults, in one place ---- */

static const mt_option_spec options[] = {
    SCHED_WARMUP_OPTIONS, /* warmup_steps, warmup_ratio */
};

typedef struct constant {
    sched_span warmup; /* warmup_steps, warmup_ratio */
} constant;

static double sched_lr(void *state, int64_t step, int64_t total, double base_lr) {
    const constant *st = state;
    const int64_t warmup = sched_span_of(st->warmup, total);
    if (step < warmup) return base_lr * sched_warmup_lambda(step, warmup);
    return base_lr * 1.0;
}

/* ---- the vtable ---- */

static mt_status sched_create(const mt_host *h, const mt_options *opts, void **out, mt_error *err) {
    constant *st = sched_alloc(h, sizeof *st, err);
    if (!st) return MT_ERR_NOMEM;
    st->warmup = sched_span_read(h, opts, "warmup_steps", "warmup_ratio");
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
                     "constant learning rate after a linear warmup (transformers' constant_with_warmup)",
                 .options = options,
                 .n_options = sizeof options / sizeof options[0],
                 .vtable = &vtable)
