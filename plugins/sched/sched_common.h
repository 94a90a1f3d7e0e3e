/* sched_common.h — what the scheduler plugins (constant.c, linear.c, cosine.c, wsd.c)
 * share, compiled into each of them: every function here is static.
 *
 * How to use it: define NAME (the plugin's name, which starts every message) and
 * `static const mt_host *host;` (set by moontune_plugin_entry), then include this file.
 * A scheduler's state is a plain struct of its options, made by sched_alloc and freed by
 * sched_destroy, which goes into the vtable as it is. The helpers are static inline, so
 * that a scheduler which does not use one is not warned about it. */
#ifndef MT_PLUGIN_SCHED_COMMON_H
#define MT_PLUGIN_SCHED_COMMON_H

#include <math.h>
#include <stdint.h>

#include <moontune/plugin.h>

#ifndef NAME
#error "define NAME, the plugin's name, before including sched_common.h"
#endif

/* The option rows warmup_steps and warmup_ratio, for the schedulers that warm up
 * linearly from 0 (read them with sched_span_read). */
#define SCHED_WARMUP_OPTIONS                                                                       \
    {"warmup_steps", MT_OPT_INT, "0", 0.0, 1e15, NULL, "steps of linear warmup from 0"},           \
    {"warmup_ratio", MT_OPT_FLOAT, "0", 0.0, 1.0, NULL,                                            \
     "warmup as a fraction of the total steps (rounded up), used when warmup_steps is 0"}

/* A number of steps given as two options, such as warmup_steps and warmup_ratio: the
 * steps when they are > 0, else ceil(total_steps * ratio), as
 * TrainingArguments.get_warmup_steps. */
typedef struct sched_span {
    int64_t steps;
    double ratio;
} sched_span;

static inline sched_span sched_span_read(const mt_host *h, const mt_options *opts,
                                         const char *steps, const char *ratio) {
    sched_span s = {h->opt_int(opts, steps), h->opt_float(opts, ratio)};
    return s;
}

static inline int64_t sched_span_of(sched_span s, int64_t total) {
    if (s.steps > 0) return s.steps;
    return (int64_t)ceil((double)total * s.ratio);
}

static inline int64_t sched_max1(int64_t x) { return x > 1 ? x : 1; }

/* The linear warmup from 0: step / max(1, warmup). */
static inline double sched_warmup_lambda(int64_t step, int64_t warmup) {
    return (double)step / (double)sched_max1(warmup);
}

/* A zero-filled scheduler state of `size` bytes; NULL (and err set) when out of memory. */
static inline void *sched_alloc(const mt_host *h, size_t size, mt_error *err) {
    void *st = h->alloc(size);
    if (!st) h->error(err, MT_ERR_NOMEM, NAME ": out of memory");
    return st;
}

static void sched_destroy(void *state) { host->free(state); }

#endif
