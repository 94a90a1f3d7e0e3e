/* loss_chunk.h — the chunk buffers and row statistics that the in-tree losses share
 * (cross_entropy.c, dpo.c, grpo.c). A loss works over the batch's rows chunk by chunk, so that
 * the (rows x vocabulary) logits are never held at once; per chunk it asks the model for
 * the logits as a device tensor, uploads the rows' targets (-1 for none), lets
 * host->softmax_stats reduce each row to lse, the target's logit and (when asked) the
 * mean logit, and downloads those n-row vectors. Backward is three coefficients per row
 * for host->softmax_backward. The tensors live on the model's device and are kept while
 * they fit. Header-only, so each plugin stays one shared object built from its folder.
 *
 * A chunk is rows [row0, row0+n) of the batch, or, with by_rows set, the n rows listed
 * in h_rows (host->model_logits_rows, where the host has it): a loss that lists the rows
 * with a target runs the output layer for those only. */
#ifndef MT_PLUGINS_LOSS_CHUNK_H
#define MT_PLUGINS_LOSS_CHUNK_H

#include <moontune/plugin.h>
#include <stddef.h>

typedef struct loss_chunk {
    /* tensors on `device`, for up to cap rows of V logits (cap 0: none yet) */
    mt_device device;
    int cap, V;
    mt_tensor logits;                        /* (cap,V) F32 */
    mt_tensor targets;                       /* (cap) I32: the target, or -1 for none */
    mt_tensor lse, target_logit, mean_logit; /* (cap) F32 */
    mt_tensor coefs;                         /* (cap,3) F32 */
    /* host copies of one chunk's per-row vectors */
    int32_t *h_rows; /* (cap) the chunk's batch rows when by_rows */
    int by_rows;
    int32_t *h_targets;
    float *h_lse, *h_target_logit, *h_mean_logit, *h_coefs;
} loss_chunk;

/* Whether the host can run the output layer for listed rows (model_logits_rows). */
static inline int loss_host_has_rows(const mt_host *host) {
    return host->size >= offsetof(mt_host, model_backward_logits_rows) +
                             sizeof host->model_backward_logits_rows;
}

static inline void loss_chunk_free(const mt_host *host, loss_chunk *c) {
    host->tensor_free(&c->logits);
    host->tensor_free(&c->targets);
    host->tensor_free(&c->lse);
    host->tensor_free(&c->target_logit);
    host->tensor_free(&c->mean_logit);
    host->tensor_free(&c->coefs);
    host->free(c->h_rows);
    host->free(c->h_targets);
    host->free(c->h_lse);
    host->free(c->h_target_logit);
    host->free(c->h_mean_logit);
    host->free(c->h_coefs);
    c->h_targets = c->h_rows = NULL;
    c->h_lse = c->h_target_logit = c->h_mean_logit = c->h_coefs = NULL;
    c->cap = 0;
}

/* The chunk for `rows` rows of V logits on `device`: kept from the last call when it
 * fits, else made anew (first use, a larger plan, another model). `who` names the loss
 * in the out-of-memory message. */
static inline mt_status loss_chunk_reserve(const mt_host *host, loss_chunk *c, mt_device device,
                                           int rows, int V, const char *who, mt_error *err) {
    c->by_rows = loss_host_has_rows(host);
    if (c->cap >= rows && c->V == V && c->device == device) return MT_OK;
    loss_chunk_free(host, c);
    const int64_t shape_logits[2] = {rows, V}, shape_rows[1] = {rows}, shape_coefs[2] = {rows, 3};
    mt_status st = host->tensor_alloc(device, MT_F32, 2, shape_logits, &c->logits, err);
    if (!st) st = host->tensor_alloc(device, MT_I32, 1, shape_rows, &c->targets, err);
    if (!st) st = host->tensor_alloc(device, MT_F32, 1, shape_rows, &c->lse, err);
    if (!st) st = host->tensor_alloc(device, MT_F32, 1, shape_rows, &c->target_logit, err);
    if (!st) st = host->tensor_alloc(device, MT_F32, 1, shape_rows, &c->mean_logit, err);
    if (!st) st = host->tensor_alloc(device, MT_F32, 2, shape_coefs, &c->coefs, err);
    if (st) {
        loss_chunk_free(host, c);
        return st;
    }
    c->h_rows = host->alloc((size_t)rows * sizeof(int32_t));
    c->h_targets = host->alloc((size_t)rows * sizeof(int32_t));
    c->h_lse = host->alloc((size_t)rows * sizeof(float));
    c->h_target_logit = host->alloc((size_t)rows * sizeof(float));
    c->h_mean_logit = host->alloc((size_t)rows * sizeof(float));
    c->h_coefs = host->alloc((size_t)rows * 3 * sizeof(float));
    if (!c->h_rows || !c->h_targets || !c->h_lse || !c->h_target_logit || !c->h_mean_logit || !c->h_coefs) {
        loss_chunk_free(host, c);
        return host->error(err, MT_ERR_NOMEM, "%s: out of memory for %d rows", who, rows);
    }
    c->cap = rows;
    c->V = V;
    c->device = device;
    return MT_OK;
}

/* Rows [row0, row0+n) of the model's last forward into c->logits, multiplied in place by
 * logit_scale unless it is 1 (a loss at a sampling temperature T passes 1/T). */
static inline mt_status loss_chunk_logits(const mt_host *host, loss_chunk *c, mt_model_handle *model,
                                          int row0, int n, float logit_scale, mt_error *err) {
    mt_tensor logits = mt_tensor_rows(&c->logits, 0, n);
    mt_status st = c->by_rows ? host->model_logits_rows(model, c->h_rows, n, &logits, err)
                              : host->model_logits(model, row0, n, &logits, err);
    if (!st && logit_scale != 1.0f) host->axpby(&logits, logit_scale, &logits, 0.0f);
    return st;
}

/* Rows [row0, row0+n) of the model's last forward, whose targets the caller has put in
 * c->h_targets (-1: none): their logits (times logit_scale) into c->logits, the targets
 * uploaded, and per row lse and the target's logit (and the mean logit when with_mean)
 * into the host copies. Rows without a target cost no work in softmax_stats. */
static inline mt_status loss_chunk_stats(const mt_host *host, loss_chunk *c,
                                         mt_model_handle *model, int row0, int n, int with_mean,
                                         float logit_scale, mt_error *err) {
    mt_tensor logits = mt_tensor_rows(&c->logits, 0, n), tgt = mt_tensor_rows(&c->targets, 0, n),
              lse = mt_tensor_rows(&c->lse, 0, n), tl = mt_tensor_rows(&c->target_logit, 0, n),
              ml = mt_tensor_rows(&c->mean_logit, 0, n);
    mt_status st = loss_chunk_logits(host, c, model, row0, n, logit_scale, err);
    if (!st) st = host->tensor_upload(&tgt, c->h_targets, err);
    if (st) return st;
    host->softmax_stats(&logits, &tgt, &lse, &tl, with_mean ? &ml : NULL);
    if ((st = host->check(err))) return st;
    if ((st = host->tensor_download(c->h_lse, &lse, err)) ||
        (st = host->tensor_download(c->h_target_logit, &tl, err)) ||
        (with_mean && (st = host->tensor_download(c->h_mean_logit, &ml, err))))
        return st;
    return MT_OK;
}

/* d loss / d logits of the chunk's n rows from the coefficients in c->h_coefs and the
 * logits, targets and lse already on the device (c->logits, c->targets, c->lse), into
 * the model's output gradient of rows [row0, row0+n). */
static inline mt_status loss_chunk_backward(const mt_host *host, loss_chunk *c,
                                            mt_model_handle *model, int row0, int n,
                                            mt_error *err) {
    mt_tensor logits = mt_tensor_rows(&c->logits, 0, n), tgt = mt_tensor_rows(&c->targets, 0, n),
              lse = mt_tensor_rows(&c->lse, 0, n), coefs = mt_tensor_rows(&c->coefs, 0, n);
    mt_status st = host->tensor_upload(&coefs, c->h_coefs, err);
    if (st) return st;
    host->softmax_backward(&logits, &lse, &tgt, &coefs);
    return c->by_rows ? host->model_backward_logits_rows(model, c->h_rows, n, &logits, err)
                      : host->model_backward_logits(model, row0, n, &logits, err);
}

/* loss_chunk_backward for a loss that ran the model more than once (a reference pass,
 * then the policy's): the chunk's logits are computed again (times logit_scale), with
 * the targets in c->h_targets and the rows' lse the policy pass kept (lse, n values). */
static inline mt_status loss_chunk_backward_again(const mt_host *host, loss_chunk *c,
                                                  mt_model_handle *model, int row0, int n,
                                                  const float *lse, float logit_scale, mt_error *err) {
    mt_tensor tgt = mt_tensor_rows(&c->targets, 0, n), lse_t = mt_tensor_rows(&c->lse, 0, n);
    mt_status st = loss_chunk_logits(host, c, model, row0, n, logit_scale, err);
    if (!st) st = host->tensor_upload(&tgt, c->h_targets, err);
    if (!st) st = host->tensor_upload(&lse_t, lse, err);
    return st ? st : loss_chunk_backward(host, c, model, row0, n, err);
}

/* Whether any of n rows' targets is one (>= 0): a chunk without any needs no logits. */
static inline int loss_rows_have_target(const int32_t *targets, int n) {
    for (int r = 0; r < n; r++)
        if (targets[r] >= 0) return 1;
    return 0;
}

/* The next chunk of a walk over a batch's rows (targets: B·T; < 0 or `ignore` = none;
 * start with *pos = 0); returns its row count, 0 at the end. With by_rows: up to `chunk`
 * rows with a target, listed in c->h_rows. Without: the next contiguous chunk from *row0
 * that holds a target. Chunk row r is batch row loss_chunk_row(c, *row0, r). */
static inline int loss_chunk_next(loss_chunk *c, const int32_t *targets, int32_t ignore, int rows,
                                  int chunk, int *pos, int *row0) {
    *row0 = 0;
    if (c->by_rows) {
        int n = 0;
        for (; *pos < rows && n < chunk; (*pos)++)
            if (targets[*pos] >= 0 && targets[*pos] != ignore) c->h_rows[n++] = *pos;
        return n;
    }
    while (*pos < rows) {
        const int r0 = *pos, n = rows - r0 < chunk ? rows - r0 : chunk;
        *pos += n;
        if (loss_rows_have_target(targets + r0, n)) {
            *row0 = r0;
            return n;
        }
    }
    return 0;
}

static inline int loss_chunk_row(const loss_chunk *c, int row0, int r) {
    return c->by_rows ? c->h_rows[r] : row0 + r;
}

/* The chunk's n targets from the batch's into c->h_targets: -1 for none (< 0 or ignore). */
static inline void loss_chunk_load_targets(loss_chunk *c, const int32_t *targets, int32_t ignore,
                                           int row0, int n) {
    for (int r = 0; r < n; r++) {
        const int32_t t = targets[loss_chunk_row(c, row0, r)];
        c->h_targets[r] = t >= 0 && t != ignore ? t : -1;
    }
}

/* The batch's ABI 2 fields that a host of an earlier ABI 2 build may not carry. */
static inline int64_t loss_batch_step_items(const mt_batch *batch) {
    return batch->size >= offsetof(mt_batch, step_items) + sizeof batch->step_items
               ? batch->step_items : 0;
}
static inline int loss_batch_knows_pairs(const mt_batch *batch) {
    return batch->size >= offsetof(mt_batch, ref_logps) + sizeof batch->ref_logps;
}
static inline int loss_batch_pairs(const mt_batch *batch) {
    return loss_batch_knows_pairs(batch) && batch->pairs;
}
static inline const double *loss_batch_ref_logps(const mt_batch *batch) {
    return loss_batch_knows_pairs(batch) ? batch->ref_logps : NULL;
}
/* A batch of sampled completions (GRPO): 1 when the host's batch carries advantages and
 * the sampling log-probabilities. */
static inline int loss_batch_is_rollout(const mt_batch *batch) {
    return batch->size >= offsetof(mt_batch, old_logps) + sizeof batch->old_logps &&
           batch->advantages && batch->old_logps;
}

#endif
