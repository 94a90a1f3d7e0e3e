/* train.c — one optimizer step over micro-batches (gradient accumulation). */
#include "model/train.h"

#include <math.h>
#include <stdlib.h>

#include "base/internal.h"

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
    mt_model_zero_grad(m);
    double loss_sum = 0.0;
    for (int i = 0; i < n_micro; i++) {
        mt_loss_result r;
        mt_status st = lv->compute(loss->state, (mt_model_handle *)m, &micro_batches[i], 1, &r, err);
        if (st == MT_ERR_NUMERIC) {
            result->skipped = 1;
            result->loss = NAN;
            return MT_OK;
        }
        if (st) return st;
        loss_sum += r.loss;
        result->n_tokens += r.n_tokens;
    }
    result->loss = loss_sum / n_micro;
    mt_param_view *params;
    size_t n_params;
    mt_status st = mt_model_trainable_params(m, &params, &n_params, err);
    if (st) return st;
    if (n_micro > 1) { /* the mean over micro-batches, as Hugging Face's Trainer does */
        for (size_t i = 0; i < n_params; i++)
            m->be->ops->axpy(m->be, params[i].grad.data, params[i].grad.data,
                             1.0f / (float)n_micro - 1.0f,
                             (size_t)mt_tensor_numel(&params[i].grad));
    }
    result->grad_norm = mt_model_clip_grad_norm(m, max_grad_norm);
    if (!isfinite(result->loss) || !isfinite(result->grad_norm)) {
        result->skipped = 1;
    } else {
        st = ov->step(optimizer->state, params, n_params, lr, step, err);
    }
    free(params);
    return st;
}

double mt_schedule_lr(mt_plugin_instance *scheduler, int64_t step, int64_t total_steps,
                      double base_lr) {
    const mt_scheduler_vtable *sv = scheduler->desc->vtable;
    return sv->lr(scheduler->state, step, total_steps, base_lr);
}
