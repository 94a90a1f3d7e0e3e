/* inverse_sqrt.c — an out-of-tree scheduler plugin: linear warmup, then decay with
 * the inverse square root of the step (transformers' get_inverse_sqrt_schedule).
 *
 * A scheduler computes one number per step on the CPU, so it needs nothing of plugin
 * ABI 2's device rules beyond the sizes of its structs.
 *
 * Build it against an installed moontune, with nothing but the public header:
 *   cc -std=c11 -shared -fPIC -fvisibility=hidden $(pkg-config --cflags moontune) \
 *      inverse_sqrt.c -o ~/moontune-plugins/inverse_sqrt.so -lm
 * and make it visible:
 *   MOONTUNE_PLUGIN_PATH=~/moontune-plugins moontune plugins --describe inverse_sqrt */
#include <math.h>
#include <moontune/plugin.h>

static const mt_host *host;

typedef struct schedule {
    int64_t warmup_steps, timescale;
} schedule;

static const mt_option_spec options[] = {
    {"warmup_steps", MT_OPT_INT, "0", 0, 1e12, NULL, "steps of linear warmup from 0"},
    {"timescale", MT_OPT_INT, "0", 0, 1e12, NULL,
     "decay time scale; 0 means warmup_steps, or 10000 without warmup"},
};

static mt_status create(const mt_host *h, const mt_options *opts, void **state, mt_error *err) {
    schedule *s = h->alloc(sizeof *s);
    if (!s) return h->error(err, MT_ERR_NOMEM, "inverse_sqrt: out of memory");
    s->warmup_steps = h->opt_int(opts, "warmup_steps");
    s->timescale = h->opt_int(opts, "timescale");
    if (s->timescale == 0) s->timescale = s->warmup_steps ? s->warmup_steps : 10000;
    *state = s;
    return MT_OK;
}

static void destroy(void *state) { host->free(state); }

static double lr(void *state, int64_t step, int64_t total_steps, double base_lr) {
    const schedule *s = state;
    (void)total_steps; /* this schedule does not depend on the run's length */
    if (step < s->warmup_steps) return base_lr * (double)step / (double)s->warmup_steps;
    double shift = (double)(s->timescale - s->warmup_steps);
    return base_lr / sqrt(((double)step + shift) / (double)s->timescale);
}

/* Every struct exchanged with the host starts with its size (plugin ABI 2). */
static const mt_scheduler_vtable vtable = {
    MT_VTABLE_SIZE(mt_scheduler_vtable),
    .create = create,
    .destroy = destroy,
    .lr = lr,
};

/* The descriptor (ABI version, sizes, kind, name, options, vtable) and the entry point
 * that hands it to the host and keeps the host table in `host`. */
MT_PLUGIN_DEFINE(host,
                 .kind = MT_PLUGIN_SCHEDULER,
                 .name = "inverse_sqrt",
                 .version = "0.2.0",
                 .description = "linear warmup, then decay by the inverse square root of the step",
                 .options = options,
                 .n_options = sizeof options / sizeof options[0],
                 .vtable = &vtable)
