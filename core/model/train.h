/* train.h — one optimizer step: the mechanism the Lua workflow drives (policy —
 * when to evaluate, stop or save — lives in Lua). */
#ifndef MT_CORE_TRAIN_H
#define MT_CORE_TRAIN_H

#include "model/model.h"
#include "plugin/registry.h"

typedef struct mt_step_result {
    double loss;      /* the step's loss: every item of every micro-batch weighs the same */
    double grad_norm; /* global L2 norm before clipping */
    double lr;        /* the learning rate applied */
    int64_t n_tokens; /* trained tokens over all micro-batches */
    int skipped;      /* 1 when the loss or gradient was not finite: no update was made */
    int int8;         /* projections whose frozen products ran in int8 (0: all fp32) */
    /* the loss plugin's metrics, summed over the micro-batches (each is normalised by
     * step_items like the loss, so the sum is the step's value) */
    int n_metrics;
    char metric_names[MT_LOSS_MAX_METRICS][64];
    double metrics[MT_LOSS_MAX_METRICS];
} mt_step_result;

/* Zeroes the gradients; counts the loss' items of all n_micro batches (step_items);
 * for each batch runs the loss plugin (forward and backward), which normalises by
 * step_items, so the gradients add up to the whole step's; clips the
 * global norm to max_grad_norm (when > 0); and unless the loss or the norm is not
 * finite, lets the optimizer update every trainable parameter at learning rate lr.
 * In a data-parallel job (dist/dist.h) each rank passes its rows of the global batch:
 * step_items, the loss, the metrics and the gradients are summed over the ranks before
 * clipping, so every rank makes the same update; with optimizer->sharded (ZeRO-1) each
 * rank updates the parameters it owns and the ranks exchange the new values.
 * With mt_model_set_int8_training on, the frozen projections multiply in int8 during
 * the step (mt_model_int8_attach) and in fp32 again after it.
 * step counts optimizer steps from 1. A non-finite loss or gradient is not an
 * error here: result->skipped says so and the caller's policy decides. */
mt_status mt_train_step(mt_model *m, mt_plugin_instance *loss, mt_plugin_instance *optimizer,
                        const mt_batch *micro_batches, int n_micro, double lr, int64_t step,
                        double max_grad_norm, mt_step_result *result, mt_error *err);

/* Data parallel (dist/dist.h): sums the trainable parameters' gradients over the ranks
 * (what mt_train_step does after its micro-batches); *bytes (may be NULL) receives the
 * bytes each rank sends. A no-op for one rank. */
mt_status mt_train_allreduce_grads(mt_model *m, int64_t *bytes, mt_error *err);

/* Data parallel: sums extra[0, n_extra) (at most 4 numbers) and a loss plugin's named
 * metrics over the ranks in one call, the names by maximum (a rank whose rows held no
 * item reports none, the others the same names). A no-op for one rank. */
mt_status mt_train_sum_over_ranks(double *extra, int n_extra, int *n_metrics,
                                  char (*names)[64], double *metrics, mt_error *err);

/* ZeRO-1's owner rank of each of params[0, n) (mt_model_trainable_params order): the
 * same cut in the step and in checkpoints. NULL when out of memory; free() it. */
int *mt_train_param_owners(const mt_param_view *params, size_t n, mt_error *err);

/* The items a loss normalises a batch by: its count slot, or the targets >= 0. */
int64_t mt_loss_count(const mt_plugin_instance *loss, const mt_batch *batch);

/* The scheduler's learning rate for 0-based step `step` of total_steps. */
double mt_schedule_lr(mt_plugin_instance *scheduler, int64_t step, int64_t total_steps,
                      double base_lr);

#endif
