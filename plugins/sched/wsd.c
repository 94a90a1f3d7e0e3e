/* wsd.c — warmup, stable, decay, as transformers' get_wsd_schedule:
 *
 *   warmup  step < W:           progress = step / max(1, W), shaped by warmup_type,
 *                               lambda = max(0, f * (1 - min_lr_ratio) + min_lr_ratio)
 *   stable  step < W + S:       lambda = 1
 *   decay   step < W + S + D:   progress = (step - W - S) / max(1, D), shaped by decay_type,
 *                               lambda = max(0, f * (1 - min_lr_ratio) + min_lr_ratio)
 *   after                       lambda = min_lr_ratio
 *
 * with the shapes  linear: f = p (warmup) or 1 - p (decay);
 *                  cosine: f = 0.5 (1 - cos(pi p)) (warmup) or 0.5 (1 + cos(pi num_cycles 2 p));
 *                  1-sqrt: f = 1 - sqrt(1 - p) (warmup) or 1 - sqrt(p) (decay).
 *
 * lr = base_lr * lambda(step), step counted from 0. Note that the warmup starts at
 * min_lr_ratio * base_lr, not at 0, as in transformers.
 *
 * W is warmup_steps, or when that is 0, ceil(total_steps * warmup_ratio) (as
 * TrainingArguments.get_warmup_steps). D is decay_steps, or when that is 0,
 * ceil(total_steps * decay_ratio). S is stable_steps when it is given (>= 0), else
 * total_steps - W - D, as transformers derives num_stable_steps from num_training_steps;
 * with an explicit S, steps past W + S + D stay at min_lr_ratio. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <moontune/plugin.h>

#define NAME "wsd"
#define PI 3.141592653589793 /* Python's math.pi */

static const mt_host *host;

#include "sched_common.h"

/* ---- options: the defaults, in one place ---- */

static const mt_option_spec options[] = {
    {"warmup_steps", MT_OPT_INT, "0", 0.0, 1e15, NULL, "steps of warmup"},
    {"warmup_ratio", MT_OPT_FLOAT, "0", 0.0, 1.0, NULL,
     "warmup as a fraction of the total steps (rounded up), used when warmup_steps is 0"},
    {"decay_steps", MT_OPT_INT, "0", 0.0, 1e15, NULL, "steps of decay at the end"},
    {"decay_ratio", MT_OPT_FLOAT, "0.1", 0.0, 1.0, NULL,
     "decay as a fraction of the total steps (rounded up), used when decay_steps is 0"},
    {"stable_steps", MT_OPT_INT, "-1", -1.0, 1e15, NULL,
     "steps at the base learning rate (-1: total - warmup - decay)"},
    {"min_lr_ratio", MT_OPT_FLOAT, "0", 0.0, 1.0, NULL,
     "the learning rate at the start of the warmup and the end of the decay, as a fraction of "
     "the base learning rate"},
    {"warmup_type", MT_OPT_STRING, "linear", 1.0, 0.0, "linear|cosine|1-sqrt",
     "shape of the warmup"},
    {"decay_type", MT_OPT_STRING, "cosine", 1.0, 0.0, "linear|cosine|1-sqrt", "shape of the decay"},
    {"num_cycles", MT_OPT_FLOAT, "0.5", 0.0, 1e6, NULL,
     "cosine waves of the cosine decay (0.5: one half-cosine)"},
};

typedef enum shape { LINEAR, COSINE, ONE_MINUS_SQRT } shape;

typedef struct wsd {
    sched_span warmup, decay; /* warmup_steps, warmup_ratio; decay_steps, decay_ratio */
    int64_t stable_steps;
    double min_lr_ratio, num_cycles;
    shape warmup_type, decay_type;
} wsd;

static shape parse_shape(const char *s) {
    return !strcmp(s, "linear") ? LINEAR : !strcmp(s, "cosine") ? COSINE : ONE_MINUS_SQRT;
}

static double sched_lr(void *state, int64_t step, int64_t total, double base_lr) {
    const wsd *st = state;
    const double min = st->min_lr_ratio;
    const int64_t warmup = sched_span_of(st->warmup, total);
    const int64_t decay = sched_span_of(st->decay, total);
    const int64_t stable = st->stable_steps >= 0 ? st->stable_steps : total - warmup - decay;
    double factor;
    if (step < warmup) {
        const double progress = (double)step / (double)sched_max1(warmup);
        switch (st->warmup_type) {
        case LINEAR: factor = progress; break;
        case COSINE: factor = 0.5 * (1.0 - cos(PI * progress)); break;
        default: factor = 1.0 - sqrt(1.0 - progress); break;
        }
    } else if (step < warmup + stable) {
        return base_lr * 1.0;
    } else if (step < warmup + stable + decay) {
        const double progress = (double)(step - warmup - stable) / (double)sched_max1(decay);
        switch (st->decay_type) {
        case LINEAR: factor = 1.0 - progress; break;
        case COSINE: factor = 0.5 * (1.0 + cos(PI * st->num_cycles * 2.0 * progress)); break;
        default: factor = 1.0 - sqrt(progress); break;
        }
    } else {
        return base_lr * min;
    }
    factor = factor * (1.0 - min) + min;
    return base_lr * (factor > 0.0 ? factor : 0.0);
}

/* ---- the vtable ---- */

static mt_status sched_create(const mt_host *h, const mt_options *opts, void **out, mt_error *err) {
    wsd *st = sched_alloc(h, sizeof *st, err);
    if (!st) return MT_ERR_NOMEM;
    st->warmup = sched_span_read(h, opts, "warmup_steps", "warmup_ratio");
    st->decay = sched_span_read(h, opts, "decay_steps", "decay_ratio");
    st->stable_steps = h->opt_int(opts, "stable_steps");
    st->min_lr_ratio = h->opt_float(opts, "min_lr_ratio");
    st->warmup_type = parse_shape(h->opt_string(opts, "warmup_type"));
    st->decay_type = parse_shape(h->opt_string(opts, "decay_type"));
    st->num_cycles = h->opt_float(opts, "num_cycles");
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
                 .description = "warmup, stable, decay (transformers' get_wsd_schedule)",
                 .options = options,
                 .n_options = sizeof options / sizeof options[0],
                 .vtable = &vtable)
