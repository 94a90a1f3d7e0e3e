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
#include <string.h>

#include "base/internal.h"
#include "dist/dist.h"
#include "model/device.h"

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

/* ---- data parallel: what the ranks exchange ----------------------------------------
 *
 * On a device whose backend has a communicator (NCCL on CUDA), gradients are summed in
 * place there, all in one grouped call. Otherwise parameters travel through host memory
 * and MPI in buckets: consecutive whole tensors packed into one host buffer of about
 * BUCKET_FLOATS, one collective per bucket, so that LoRA's hundreds of small tensors cost
 * a few calls and not hundreds. A tensor larger than a bucket in host memory goes alone
 * and in place. */
#define BUCKET_FLOATS ((size_t)1 << 24) /* 64 MiB */

typedef enum { EXCHANGE_SUM_GRAD, EXCHANGE_BROADCAST_VALUE } exchange_kind;

static mt_tensor *exchanged(mt_param_view *p, exchange_kind kind) {
    return kind == EXCHANGE_SUM_GRAD ? &p->grad : &p->value;
}

/* Exchanges params[lo, hi) through the bucket (grown to `used` floats when needed). */
static mt_status flush_bucket(float **bucket, size_t *cap, size_t used, mt_param_view *params,
                              size_t lo, size_t hi, exchange_kind kind, int root, mt_error *err) {
    if (hi <= lo || used == 0) return MT_OK;
    if (used > *cap) {
        size_t want = used > BUCKET_FLOATS ? used : BUCKET_FLOATS;
        free(*bucket);
        if (!(*bucket = mt_malloc(want * sizeof **bucket, "data-parallel bucket", err))) {
            *cap = 0;
            return MT_ERR_NOMEM;
        }
        *cap = want;
    }
    float *buf = *bucket;
    const int sends = kind == EXCHANGE_SUM_GRAD || mt_dist_rank() == root;
    const int receives = kind == EXCHANGE_SUM_GRAD || mt_dist_rank() != root;
    mt_status st = MT_OK;
    size_t at = 0;
    for (size_t i = lo; sends && i < hi; i++) {
        mt_tensor *t = exchanged(mt_param_at(params, i), kind);
        if ((st = mt_device_download(buf + at, t, err))) return st;
        at += (size_t)mt_tensor_numel(t);
    }
    st = kind == EXCHANGE_SUM_GRAD ? mt_dist_sum_f32(buf, used, err)
                                   : mt_dist_broadcast(buf, used * sizeof *buf, root, err);
    at = 0;
    for (size_t i = lo; !st && receives && i < hi; i++) {
        mt_tensor *t = exchanged(mt_param_at(params, i), kind);
        st = mt_device_upload(t, buf + at, err);
        at += (size_t)mt_tensor_numel(t);
    }
    return st;
}

/* The device's own communicator (NCCL on CUDA), joined once by every rank: rank 0 draws
 * its id and sends it over MPI. NULL when the device's backend brings none (then the
 * buckets go through host memory and MPI). */
static mt_backend *device_comm(mt_device device, mt_error *err, mt_status *st) {
    static int joined[8];
    *st = MT_OK;
    if (device == MT_DEVICE_CPU || (unsigned)device >= sizeof joined / sizeof joined[0]) return NULL;
    mt_error none = {0};
    mt_backend *be = mt_device_backend(device, &none);
    if (!be || !be->ops->comm_id || !be->ops->comm_init || !be->ops->comm_sum_f32) return NULL;
    if (joined[device]) return be;
    struct {
        int32_t ok;
        unsigned char id[MT_COMM_ID_BYTES];
    } msg = {0};
    if (mt_dist_rank() == 0) msg.ok = be->ops->comm_id(be, msg.id, sizeof msg.id) == MT_OK;
    if ((*st = mt_dist_broadcast(&msg, sizeof msg, 0, err))) return NULL;
    if (!msg.ok) {
        *st = mt_error_set(err, MT_ERR_BACKEND, "data parallel: rank 0 could not create a %s "
                           "communicator id", be->name);
        return NULL;
    }
    if (be->ops->comm_init(be, msg.id, sizeof msg.id, mt_dist_rank(), mt_dist_size())) {
        *st = mt_error_set(err, MT_ERR_BACKEND, "data parallel: rank %d could not join the %s "
                           "communicator of %d ranks", mt_dist_rank(), be->name, mt_dist_size());
        return NULL;
    }
    joined[device] = 1;
    return be;
}

/* Sums gradients that live on a device with its own communicator, in place (one grouped
 * call); *done says whether it applied. */
static mt_status device_sum(mt_param_view *params, size_t lo, size_t hi, int *done, mt_error *err) {
    *done = 0;
    const mt_device device = mt_param_at(params, lo)->grad.device;
    for (size_t i = lo; i < hi; i++)
        if (mt_param_at(params, i)->grad.device != device) return MT_OK;
    mt_status st;
    mt_backend *be = device_comm(device, err, &st);
    if (!be) return st;
    float **bufs = mt_calloc(hi - lo, sizeof *bufs, "gradient list", err);
    size_t *counts = mt_calloc(hi - lo, sizeof *counts, "gradient list", err);
    st = bufs && counts ? MT_OK : MT_ERR_NOMEM;
    for (size_t i = lo; !st && i < hi; i++) {
        bufs[i - lo] = mt_param_at(params, i)->grad.data;
        counts[i - lo] = (size_t)mt_tensor_numel(&mt_param_at(params, i)->grad);
    }
    if (!st && be->ops->comm_sum_f32(be, bufs, counts, hi - lo))
        st = mt_error_set(err, MT_ERR_BACKEND, "data parallel: the %s all-reduce of %zu gradients "
                          "failed on rank %d", be->name, hi - lo, mt_dist_rank());
    free(bufs);
    free(counts);
    *done = !st;
    return st;
}

/* Sums every rank's gradients of params[lo, hi) (EXCHANGE_SUM_GRAD), or gives every
 * rank root's values of them (EXCHANGE_BROADCAST_VALUE). */
static mt_status exchange(mt_param_view *params, size_t lo, size_t hi, exchange_kind kind,
                          int root, mt_error *err) {
    if (mt_dist_size() == 1 || hi <= lo) return MT_OK;
    if (kind == EXCHANGE_SUM_GRAD) {
        int done = 0;
        mt_status st = device_sum(params, lo, hi, &done, err);
        if (st || done) return st;
    }
    float *bucket = NULL;
    size_t cap = 0, first = lo, used = 0;
    mt_status st = MT_OK;
    for (size_t i = lo; !st && i < hi; i++) {
        mt_tensor *t = exchanged(mt_param_at(params, i), kind);
        const size_t n = (size_t)mt_tensor_numel(t);
        const int in_place = t->device == MT_DEVICE_CPU && n >= BUCKET_FLOATS;
        if (in_place || used + n > BUCKET_FLOATS) { /* close the open bucket first */
            st = flush_bucket(&bucket, &cap, used, params, first, i, kind, root, err);
            first = i;
            used = 0;
        }
        if (!st && in_place) { /* large and in host memory: no copy */
            st = kind == EXCHANGE_SUM_GRAD ? mt_dist_sum_f32(t->data, n, err)
                                           : mt_dist_broadcast(t->data, n * sizeof(float), root, err);
            first = i + 1;
            continue;
        }
        used += n;
    }
    if (!st) st = flush_bucket(&bucket, &cap, used, params, first, hi, kind, root, err);
    free(bucket);
    return st;
}

mt_status mt_train_allreduce_grads(mt_model *m, int64_t *bytes, mt_error *err) {
    mt_param_view *params;
    size_t n;
    mt_status st = mt_model_trainable_params(m, &params, &n, err);
    if (st) return st;
    if (bytes) {
        *bytes = 0;
        for (size_t i = 0; i < n; i++) *bytes += (int64_t)mt_tensor_nbytes(&params[i].grad);
    }
    st = exchange(params, 0, n, EXCHANGE_SUM_GRAD, 0, err);
    free(params);
    return st;
}

mt_status mt_train_sum_over_ranks(double *extra, int n_extra, int *n_metrics,
                                  char (*names)[64], double *metrics, mt_error *err) {
    if (mt_dist_size() == 1) return MT_OK;
    enum { MOST_EXTRA = 4 };
    if (n_extra < 0 || n_extra > MOST_EXTRA || *n_metrics < 0 || *n_metrics > MT_LOSS_MAX_METRICS)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "sum over ranks: %d numbers and %d metrics",
                            n_extra, *n_metrics);
    double v[MOST_EXTRA + MT_LOSS_MAX_METRICS] = {0};
    for (int k = 0; k < n_extra; k++) v[k] = extra[k];
    for (int k = 0; metrics && k < *n_metrics; k++) v[n_extra + k] = metrics[k];
    unsigned char text[1 + MT_LOSS_MAX_METRICS * 64];
    text[0] = (unsigned char)*n_metrics;
    memcpy(text + 1, names, MT_LOSS_MAX_METRICS * 64);
    mt_status st = mt_dist_sum_f64(v, (size_t)(n_extra + MT_LOSS_MAX_METRICS), err);
    if (!st) st = mt_dist_max_u8(text, sizeof text, err);
    if (st) return st;
    for (int k = 0; k < n_extra; k++) extra[k] = v[k];
    *n_metrics = text[0];
    memcpy(names, text + 1, MT_LOSS_MAX_METRICS * 64);
    for (int k = 0; metrics && k < *n_metrics; k++) metrics[k] = v[n_extra + k];
    return MT_OK;
}

/* The step's numbers every rank contributes to: the loss, tokens, a non-finite flag and
 * the loss plugin's metrics. */
static mt_status reduce_result(mt_step_result *result, int nonfinite, mt_error *err) {
    double v[3] = {result->loss, (double)result->n_tokens, nonfinite};
    mt_status st = mt_train_sum_over_ranks(v, 3, &result->n_metrics, result->metric_names,
                                           result->metrics, err);
    if (st) return st;
    result->loss = v[0];
    result->n_tokens = (int64_t)v[1];
    result->skipped = v[2] > 0;
    return MT_OK;
}

int *mt_train_param_owners(const mt_param_view *params, size_t n, mt_error *err) {
    int *owner = mt_calloc(n ? n : 1, sizeof *owner, "parameter owners", err);
    size_t *sizes = mt_calloc(n ? n : 1, sizeof *sizes, "parameter owners", err);
    if (owner && sizes) {
        for (size_t i = 0; i < n; i++) sizes[i] = (size_t)mt_tensor_numel(&params[i].value);
        mt_dist_partition(sizes, n, mt_dist_size(), owner);
    } else {
        free(owner);
        owner = NULL;
    }
    free(sizes);
    return owner;
}

/* ZeRO-1: each rank updates the parameters it owns (a contiguous run, so its optimizer
 * state covers only those), then every rank receives the others' updated values. */
static mt_status sharded_update(mt_plugin_instance *optimizer, mt_param_view *params, size_t n,
                                double lr, int64_t step, mt_error *err) {
    const mt_optimizer_vtable *ov = optimizer->desc->vtable;
    int *owner = mt_train_param_owners(params, n, err);
    mt_status st = owner ? MT_OK : MT_ERR_NOMEM;
    const int me = mt_dist_rank();
    size_t lo = 0;
    for (int r = 0; !st && r < mt_dist_size(); r++) {
        size_t hi = lo;
        while (hi < n && owner[hi] == r) hi++;
        if (r == me && hi > lo) {
            st = ov->step(optimizer->state, params + lo, hi - lo, lr, step, err);
            if (!st) st = mt_host_check(optimizer->desc->name, err);
        }
        /* every rank takes part in every broadcast, so a failed update ends the job at
         * the caller (mt_dist_abort) instead of here */
        if (!st) st = exchange(params, lo, hi, EXCHANGE_BROADCAST_VALUE, r, err);
        lo = hi;
    }
    free(owner);
    return st;
}

static mt_status train_step(mt_model *m, mt_plugin_instance *loss, mt_plugin_instance *optimizer,
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
    /* every item of the global batch weighs the same, whichever rank holds it */
    mt_status st = mt_dist_sum_i64(&step_items, 1, err);
    if (st) return st;
    mt_model_zero_grad(m);
    int nonfinite = 0;
    double loss_sum = 0.0;
    for (int i = 0; i < n_micro; i++) {
        mt_batch mb = micro_batches[i];
        mb.size = sizeof mb;
        mb.step_items = step_items;
        mt_loss_result r = {.size = sizeof r};
        st = lv->compute(loss->state, (mt_model_handle *)m, &mb, 1, &r, err);
        mt_error check_err;
        mt_status cst = mt_host_check(loss->desc->name, &check_err);
        if (!st && cst) {
            *err = check_err;
            st = cst;
        }
        if (st == MT_ERR_NUMERIC) { /* skipped, after the other ranks hear of it */
            nonfinite = 1;
            st = MT_OK;
            break;
        }
        if (st) return st;
        loss_sum += r.loss;
        result->n_tokens += r.n_tokens;
        if ((st = add_metrics(loss, &r, i, result, err))) return st;
    }
    /* each micro-batch's loss is its share of the step's: their sum is the step's loss
     * (over the ranks too: each normalised by the global step_items) */
    result->loss = loss_sum;
    if ((st = reduce_result(result, nonfinite, err))) return st;
    if (nonfinite || result->skipped) {
        result->skipped = 1;
        result->loss = NAN;
        return MT_OK;
    }
    mt_param_view *params;
    size_t n_params;
    if ((st = mt_model_trainable_params(m, &params, &n_params, err))) return st;
    /* the ranks' gradients summed: every rank then holds the global batch's gradient,
     * clips by the same global norm and makes the same update */
    st = exchange(params, 0, n_params, EXCHANGE_SUM_GRAD, 0, err);
    if (!st) {
        result->grad_norm = mt_model_clip_grad_norm(m, max_grad_norm);
        if (!isfinite(result->loss) || !isfinite(result->grad_norm)) {
            result->skipped = 1;
        } else if (optimizer->sharded && mt_dist_size() > 1) {
            st = sharded_update(optimizer, params, n_params, lr, step, err);
        } else {
            st = ov->step(optimizer->state, params, n_params, lr, step, err);
            if (!st) st = mt_host_check(optimizer->desc->name, err);
        }
    }
    free(params);
    return st;
}

double mt_schedule_lr(mt_plugin_instance *scheduler, int64_t step, int64_t total_steps,
                      double base_lr) {
    const mt_scheduler_vtable *sv = scheduler->desc->vtable;
    return sv->lr(scheduler->state, step, total_steps, base_lr);
}

/* The frozen projections multiply in int8 for this step only when the model asks
 * (mt_model_set_int8_training): between steps they are fp32 again, and generation and
 * evaluation attach int8 copies only when their caller asks (mt_evaluate's int8). */
mt_status mt_train_step(mt_model *m, mt_plugin_instance *loss, mt_plugin_instance *optimizer,
                        const mt_batch *micro_batches, int n_micro, double lr, int64_t step,
                        double max_grad_norm, mt_step_result *result, mt_error *err) {
    const int int8 = mt_model_int8_attach(m);
    mt_status st = train_step(m, loss, optimizer, micro_batches, n_micro, lr, step,
                              max_grad_norm, result, err);
    mt_model_int8_detach(m);
    result->int8 = int8;
    return st;
}
