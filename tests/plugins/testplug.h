/* testplug.h — a minimal, valid scheduler (create, destroy, lr) shared by the test
 * plugins, so that each deliberately broken plugin breaks exactly one thing. */
#ifndef MT_TESTPLUG_H
#define MT_TESTPLUG_H

#include "moontune/plugin.h"

static inline mt_status tp_create(const mt_host *host, const mt_options *opts, void **state,
                                  mt_error *err) {
    (void)host;
    (void)opts;
    (void)err;
    *state = NULL;
    return MT_OK;
}

static inline void tp_destroy(void *state) { (void)state; }

static inline double tp_lr(void *state, int64_t step, int64_t total_steps, double base_lr) {
    (void)state;
    (void)step;
    (void)total_steps;
    return base_lr;
}

static const mt_scheduler_vtable tp_sched_vtable = {
    MT_VTABLE_SIZE(mt_scheduler_vtable),
    .create = tp_create,
    .destroy = tp_destroy,
    .lr = tp_lr,
};

#endif
