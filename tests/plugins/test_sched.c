/* test_sched.c — a valid scheduler with one option of every type, with ranges and
 * choices, for the option-validation tests: linear warmup, then a cosine, linear or
 * constant decay down to min_lr_ratio * base_lr. */
#include <math.h>
#include <string.h>

#include "testplug.h"

static const mt_option_spec options[] = {
    {"warmup_steps", MT_OPT_INT, "10", 0, 1e6, NULL, "steps of linear warmup from 0"},
    {"min_lr_ratio", MT_OPT_FLOAT, "0.1", 0.0, 1.0, NULL,
     "the floor of the decay, as a fraction of the base learning rate"},
    {"hold", MT_OPT_BOOL, "false", 1, 0, NULL, "stay at the base rate after warmup"},
    {"shape", MT_OPT_STRING, "cosine", 1, 0, "cosine|linear|constant", "the decay curve"},
    {"phases", MT_OPT_STRING_LIST, "warmup,decay", 1, 0, "warmup|decay|hold",
     "the phases to run, in order"},
    {"label", MT_OPT_STRING, NULL, 1, 0, NULL, "free text; \"fail\" makes create fail"},
};

typedef struct sched {
    const mt_host *host;
    int64_t warmup_steps;
    double min_lr_ratio;
    int hold;
    int shape; /* 0 cosine, 1 linear, 2 constant */
} sched;

static mt_status create(const mt_host *host, const mt_options *opts, void **state, mt_error *err) {
    if (!strcmp(host->opt_string(opts, "label"), "fail"))
        return host->error(err, MT_ERR_INVALID_ARG, "label \"fail\" asks create to fail");
    sched *s = host->alloc(sizeof *s);
    if (!s) return host->error(err, MT_ERR_NOMEM, "out of memory");
    s->host = host;
    s->warmup_steps = host->opt_int(opts, "warmup_steps");
    s->min_lr_ratio = host->opt_float(opts, "min_lr_ratio");
    s->hold = host->opt_bool(opts, "hold");
    const char *shape = host->opt_string(opts, "shape");
    s->shape = !strcmp(shape, "cosine") ? 0 : !strcmp(shape, "linear") ? 1 : 2;
    *state = s;
    return MT_OK;
}

static void destroy(void *state) {
    sched *s = state;
    s->host->free(s);
}

static double lr(void *state, int64_t step, int64_t total_steps, double base_lr) {
    const sched *s = state;
    if (step < s->warmup_steps) return base_lr * (double)step / (double)s->warmup_steps;
    if (s->hold || s->shape == 2 || total_steps <= s->warmup_steps) return base_lr;
    double t = (double)(step - s->warmup_steps) / (double)(total_steps - s->warmup_steps);
    if (t > 1.0) t = 1.0;
    double f = s->shape == 0 ? 0.5 * (1.0 + cos(3.14159265358979323846 * t)) : 1.0 - t;
    return base_lr * (s->min_lr_ratio + (1.0 - s->min_lr_ratio) * f);
}

static const mt_scheduler_vtable vtable = {
    MT_VTABLE_SIZE(mt_scheduler_vtable),
    .create = create,
    .destroy = destroy,
    .lr = lr,
};

static const mt_plugin_descriptor desc = {
    .abi_version = MT_PLUGIN_ABI_VERSION,
    .size = sizeof(mt_plugin_descriptor),
    .option_size = sizeof(mt_option_spec),
    .kind = MT_PLUGIN_SCHEDULER,
    .name = "test_sched",
    .version = "0.0.1",
    .description = "test scheduler: warmup, then cosine/linear/constant decay",
    .options = options,
    .n_options = sizeof options / sizeof options[0],
    .vtable = &vtable,
};

MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entry(const mt_host *host) {
    (void)host;
    return &desc;
}
