/* train.c — one optimizer step over micro-batches (gradient accumulation).
 *
 * Every item of the step weighs the same, whatever micro-batch it falls in: the loss
 * plugin counts the items of each micro-batch (its `count`, target tokens by default),
 * the step's total goes to every micro-batch as step_items, and each micro-batch's loss
 * and gradient are normalised by that total. The step's loss is then the sum of the
 * micro-batch losses and its gradient the sum of theirs — what one batch holding every
 * row would give (transformers' num_items_in_batch, since 4.46). Averaging per-batch
 * means instead would favour micro-batches with few targets. */
#include "model/train.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "base/internal.h"

/* Targets >= 0: what a loss without its own count normalises by. */
static int64_t count_targets(const mt_batch *b) {
    int64_t n = 0;
    if (!b->targets) return 0;
    for (int64_t i = 0; i < (int64_t)b->B * b->T; i++) n += b->targets[i] >= 0;
    return n;
}

int64_t mt_loss_count(const mt_plugin_instance *loss, const mt_batch *batch) {
    const mt_loss_vtable *lv = loss->desc->vtable;
    return MT_VTABLE_HAS(mt_loss_vtable, lv, count) ? lv->count(loss->state, batch)
                                                     : count_targets(batch);
}

/* Adds a micro-batch's metrics to the step's; every micro-batch must report the same
 * names (a batch without items reports none, and adds nothing). */
static mt_status add_metrics(const mt_plugin_instance *loss, const mt_loss_result *r, int micro,
                             mt_step_result *result, mt_error *err) {
    if (r->n_metrics < 0 || r->n_metrics > MT_LOSS_MAX_METRICS)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "loss %s reported %d metrics (at most %d)",
                            loss->desc->name, r->n_metrics, MT_LOSS_MAX_METRICS);
    if (r->n_metrics == 0) return MT_OK;
    if (result->n_metrics == 0) {
        result->n_metrics = r->n_metrics;
        for (int k = 0; k < r->n_metrics; k++)
            snprintf(result->metric_names[k], sizeof result->metric_names[k], "%s",
                     r->metric_names[k] ? r->metric_names[k] : "?");
    } else if (r->n_metrics != result->n_metrics) {
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "loss %s reported %d metrics in micro-batch %d but %d before",
                            loss->desc->name, r->n_metrics, micro + 1, result->n_metrics);
    }
    for (int k = 0; k < r->n_metrics; k++) result->metrics[k] += r->metrics[k];
    return MT_OK;
}

mt_status mt_train_step(mt_model *m, mt_plugin_instance *loss, mt_plugin_instance *optimizer,
                        const mt_batch *micro_batches, int n_micro, double lr, int64_t step,
                        double max_grad_norm, mt_step_result *result, mt_error *err) {
    if (loss->desc->kind != MT_PLUGIN_LOSS || optimizer->desc->kind != MT_PLUGIN_OPTIMIZER)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "mt_train_step needs a loss and an optimizer plugin, got %s '%s' and "
                            "%s '%s'",
                            mt_plugin_kind_name(loss->desc->kind), loss->desc->name,
                            mt_plugin_kind_name(optimizer->desc->kind), optimizer->desc->name);
    if (n_micro <= 0)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "mt_train_step: no micro-batches");
    const mt_loss_vtable *lv = loss->desc->vtable;
    const mt_optimizer_vtable *ov = optimizer->desc->vtable;
    *result = (mt_step_result){.lr = lr};
    int64_t step_items = 0;
    for (int i = 0; i < n_micro; i++) {
        int64_t n = mt_loss_count(loss, &micro_batches[i]);
        if (n < 0)
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "loss %s counted %lld items in micro-batch %d", loss->desc->name,
                                (long long)n, i + 1);
        step_items += n;
    }
    mt_model_zero_grad(m);
    double loss_sum = 0.0;
    for (int i = 0; i < n_micro; i++) {
        mt_batch mb = micro_batches[i];
        mb.size = sizeof mb;
        mb.step_items = step_items;
        mt_loss_result r = {.size = sizeof r};
        mt_status st = lv->compute(loss->state, (mt_model_handle *)m, &mb, 1, &r, err);
        mt_error check_err;
        mt_status cst = mt_host_check(loss->desc->name, &check_err);
        if (!st && cst) {
            *err = check_err;
            st = cst;
        }
        if (st == MT_ERR_NUMERIC) {
            result->skipped = 1;
            result->loss = NAN;
            return MT_OK;
        }
        if (st) return st;
        loss_sum += r.loss;
        result->n_tokens += r.n_tokens;
        if ((st = add_metrics(loss, &r, i, result, err))) return st;
    }
    /* each micro-batch's loss is its share of the step's: their sum is the step's loss */
    result->loss = loss_sum;
    mt_param_view *params;
    size_t n_params;
    mt_status st = mt_model_trainable_params(m, &params, &n_params, err);
    if (st) return st;
    result->grad_norm = mt_model_clip_grad_norm(m, max_grad_norm);
    if (!isfinite(result->loss) || !isfinite(result->grad_norm)) {
        result->skipped = 1;
    } else {
        st = ov->step(optimizer->state, params, n_params, lr, step, err);
        if (!st) st = mt_host_check(optimizer->desc->name, err);
    }
    free(params);
    return st;
}

double mt_schedule_lr(mt_plugin_instance *scheduler, int64_t step, int64_t total_steps,
                      double base_lr) {
    const mt_scheduler_vtable *sv = scheduler->desc->vtable;
    return sv->lr(scheduler->state, step, total_steps, base_lr);
}
