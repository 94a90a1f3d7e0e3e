/* linear.c — linear warmup, then linear decay to 0 at the last step, as transformers'
 * get_linear_schedule_with_warmup:
 *
 *     lambda(step) = step / max(1, warmup)                              for step < warmup
 *                    max(0, (total - step) / max(1, total - warmup))    afterwards
 *
 * lr = base_lr * lambda(step), step counted from 0. The warmup is warmup_steps, or when
 * that is 0, ceil(total_steps * warmup_ratio) as TrainingArguments.get_warmup_steps. */
#include <math.h>
#include <stdint.h>

#include <moontune/plugin.h>

#define NAME "linear"

static const mt_host *host;

/* ---- options: the defaults, in one place ---- */

static const mt_option_spec options[] = {
    {"warmup_steps", MT_OPT_INT, "0", 0.0, 1e15, NULL, "steps of linear warmup from 0"},
    {"warmup_ratio", MT_OPT_FLOAT, "0", 0.0, 1.0, NULL,
     "warmup as a fraction of the total steps (rounded up), used when warmup_steps is 0"},
};

typedef struct linear {
    int64_t warmup_steps;
    double warmup_ratio;
} linear;

static int64_t warmup_of(const linear *st, int64_t total) {
    if (st->warmup_steps > 0) return st->warmup_steps;
    return (int64_t)ceil((double)total * st->warmup_ratio);
}

static int64_t max1(int64_t x) { return x > 1 ? x : 1; }

static double sched_lr(void *state, int64_t step, int64_t total, double base_lr) {
    const linear *st = state;
    const int64_t warmup = warmup_of(st, total);
    if (step < warmup) return base_lr * ((double)step / (double)max1(warmup));
    const double lambda = (double)(total - step) / (double)max1(total - warmup);
    return base_lr * (lambda > 0.0 ? lambda : 0.0);
}

/* ---- the vtable ---- */

static mt_status sched_create(const mt_host *h, const mt_options *opts, void **out, mt_error *err) {
    linear *st = h->alloc(sizeof *st);
    if (!st) return h->error(err, MT_ERR_NOMEM, NAME ": out of memory");
    st->warmup_steps = h->opt_int(opts, "warmup_steps");
    st->warmup_ratio = h->opt_float(opts, "warmup_ratio");
    *out = st;
    return MT_OK;
}

static void sched_destroy(void *state) { host->free(state); }

static const mt_scheduler_vtable vtable = {
    .create = sched_create,
    .destroy = sched_destroy,
    .lr = sched_lr,
};

static const mt_plugin_descriptor descriptor = {
    .abi_version = MT_PLUGIN_ABI_VERSION,
    .kind = MT_PLUGIN_SCHEDULER,
    .name = NAME,
    .version = "1.0.0",
    .description = "linear warmup, then linear decay to 0 (transformers' linear schedule)",
    .options = options,
    .n_options = sizeof options / sizeof options[0],
    .vtable = &vtable,
};

MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entry(const mt_host *h) {
    host = h;
    return &descriptor;
}
