/* focal.c — an out-of-tree loss plugin: the focal loss of Lin et al. 2017 over a causal
 * language model's next-token targets, written against the installed moontune/plugin.h
 * alone.
 *
 * Per target row with logits x, lse = log Σ_j exp x_j, target t and q = log p_t = x_t - lse:
 *
 *     loss_row = -(1 - p_t)^gamma · q            gamma = 0 is cross-entropy
 *
 * Its gradient: with a = d loss_row / d q = gamma (1 - p_t)^(gamma-1) p_t q - (1 - p_t)^gamma
 * and d q / d x_j = [j = t] - p_j,
 *
 *     d loss_row / d x_j = -a · p_j + a · [j = t]
 *
 * which is what host->softmax_backward computes in place from three numbers per row,
 * (c0, c1, c2) = (-a, 0, a), times the loss' normalisation.
 *
 * What it shows (plugin ABI 2), the loss contract of docs/plugins.md:
 * - targets are pre-shifted (row b·T + t predicts targets[b][t]); targets < 0 are none;
 * - logits come chunk by chunk (model_chunk_rows rows) as device tensors, and a chunk
 *   without a target is never asked for;
 * - the plugin never reads logit memory: host->softmax_stats reduces each row to lse and
 *   x_t on the device, and only those two numbers per row are downloaded;
 * - normalisation: `count` tells the host how many items (target tokens) a batch has; the
 *   host sums them over the optimizer step's micro-batches into batch->step_items, and the
 *   loss and its gradient are divided by that, so every token of the step weighs the same.
 *   In evaluation step_items is 0 and the batch is normalised by its own count;
 * - a loss that is not finite returns MT_ERR_NUMERIC: the host skips the step.
 *
 * Build it against an installed moontune:
 *   cc -std=c11 -shared -fPIC -fvisibility=hidden $(pkg-config --cflags moontune) \
 *      focal.c -o ~/moontune-plugins/focal.so -lm */
#include <math.h>
#include <stddef.h>
#include <string.h>

#include <moontune/plugin.h>

#define NAME "focal"

static const mt_host *host;

static const mt_option_spec options[] = {
    {"gamma", MT_OPT_FLOAT, "2", 0.0, 10.0, NULL,
     "focusing parameter: how much well-predicted tokens are down-weighted (0: cross-entropy)"},
};

typedef struct focal {
    double gamma;
    /* one chunk's tensors on `device`, for up to cap rows of V logits (cap 0: none yet) */
    mt_device device;
    int cap, V;
    mt_tensor logits, targets, lse, target_logit, coefs;
    int32_t *h_targets; /* host copies of one chunk's per-row numbers */
    float *h_lse, *h_target_logit, *h_coefs;
} focal;

static mt_status create(const mt_host *h, const mt_options *opts, void **state, mt_error *err) {
    focal *f = h->alloc(sizeof *f);
    if (!f) return h->error(err, MT_ERR_NOMEM, NAME ": out of memory");
    f->gamma = h->opt_float(opts, "gamma");
    *state = f;
    return MT_OK;
}

static void free_chunk(focal *f) {
    host->tensor_free(&f->logits);
    host->tensor_free(&f->targets);
    host->tensor_free(&f->lse);
    host->tensor_free(&f->target_logit);
    host->tensor_free(&f->coefs);
    host->free(f->h_targets);
    host->free(f->h_lse);
    host->free(f->h_target_logit);
    host->free(f->h_coefs);
    f->h_targets = NULL;
    f->h_lse = f->h_target_logit = f->h_coefs = NULL;
    f->cap = 0;
}

static void destroy(void *state) {
    focal *f = state;
    if (!f) return;
    free_chunk(f);
    host->free(f);
}

/* The chunk's tensors, kept from the last call when they fit. */
static mt_status reserve(focal *f, mt_device device, int rows, int V, mt_error *err) {
    if (f->cap >= rows && f->V == V && f->device == device) return MT_OK;
    free_chunk(f);
    const int64_t s_logits[2] = {rows, V}, s_rows[1] = {rows}, s_coefs[2] = {rows, 3};
    mt_status st = host->tensor_alloc(device, MT_F32, 2, s_logits, &f->logits, err);
    if (!st) st = host->tensor_alloc(device, MT_I32, 1, s_rows, &f->targets, err);
    if (!st) st = host->tensor_alloc(device, MT_F32, 1, s_rows, &f->lse, err);
    if (!st) st = host->tensor_alloc(device, MT_F32, 1, s_rows, &f->target_logit, err);
    if (!st) st = host->tensor_alloc(device, MT_F32, 2, s_coefs, &f->coefs, err);
    f->h_targets = host->alloc((size_t)rows * sizeof(int32_t));
    f->h_lse = host->alloc((size_t)rows * sizeof(float));
    f->h_target_logit = host->alloc((size_t)rows * sizeof(float));
    f->h_coefs = host->alloc((size_t)rows * 3 * sizeof(float));
    if (!st && (!f->h_targets || !f->h_lse || !f->h_target_logit || !f->h_coefs))
        st = host->error(err, MT_ERR_NOMEM, NAME ": out of memory for %d rows", rows);
    if (st) {
        free_chunk(f);
        return st;
    }
    f->cap = rows;
    f->V = V;
    f->device = device;
    return MT_OK;
}

/* The items this loss normalises by: target tokens (targets >= 0). */
static int64_t count(void *state, const mt_batch *batch) {
    (void)state;
    if (!batch->targets) return 0;
    int64_t n = 0;
    for (int64_t i = 0; i < (int64_t)batch->B * batch->T; i++) n += batch->targets[i] >= 0;
    return n;
}

/* One chunk of n rows from row0: adds its rows' losses to *sum and, with backward, hands
 * d loss / d logits (scaled by dloss) to the model. */
static mt_status chunk(focal *f, mt_model_handle *model, const int32_t *targets, int row0, int n,
                       int backward, double dloss, double *sum, mt_error *err) {
    const double gamma = f->gamma;
    mt_tensor logits = mt_tensor_rows(&f->logits, 0, n), tgt = mt_tensor_rows(&f->targets, 0, n),
              lse = mt_tensor_rows(&f->lse, 0, n), tl = mt_tensor_rows(&f->target_logit, 0, n),
              coefs = mt_tensor_rows(&f->coefs, 0, n);
    for (int r = 0; r < n; r++) f->h_targets[r] = targets[r] >= 0 ? targets[r] : -1;
    mt_status st = host->model_logits(model, row0, n, &logits, err);
    if (!st) st = host->tensor_upload(&tgt, f->h_targets, err);
    if (st) return st;
    host->softmax_stats(&logits, &tgt, &lse, &tl, NULL);
    if ((st = host->tensor_download(f->h_lse, &lse, err)) ||
        (st = host->tensor_download(f->h_target_logit, &tl, err)))
        return st;
    for (int r = 0; r < n; r++) {
        float *c = f->h_coefs + (size_t)r * 3;
        c[0] = c[1] = c[2] = 0.0f; /* no target: no gradient */
        if (f->h_targets[r] < 0) continue;
        const double q = (double)f->h_target_logit[r] - (double)f->h_lse[r]; /* log p_t <= 0 */
        const double p = exp(q), one_minus_p = -expm1(q); /* 1 - p without cancellation */
        const double w = pow(one_minus_p, gamma);         /* (1 - p)^gamma */
        *sum += -w * q;
        /* gamma (1-p)^(gamma-1) p q, written as gamma p w · q/(1-p), whose last factor
         * tends to -1 as p -> 1: finite for every gamma >= 0 */
        const double q_over = one_minus_p > 0.0 ? q / one_minus_p : -1.0;
        const double a = gamma * p * w * q_over - w;
        c[0] = (float)(-a * dloss);
        c[2] = (float)(a * dloss);
    }
    if (!backward) return MT_OK;
    if ((st = host->tensor_upload(&coefs, f->h_coefs, err))) return st;
    host->softmax_backward(&logits, &lse, &tgt, &coefs);
    return host->model_backward_logits(model, row0, n, &logits, err);
}

static mt_status compute(void *state, mt_model_handle *model, const mt_batch *batch, int backward,
                         mt_loss_result *result, mt_error *err) {
    focal *f = state;
    if (!batch->targets)
        return host->error(err, MT_ERR_INVALID_ARG, NAME ": the batch has no targets");
    if (result->size < sizeof *result)
        return host->error(err, MT_ERR_INVALID_ARG, NAME ": the host's loss result is too small");
    const int V = host->model_vocab_size(model), rows = batch->B * batch->T;
    for (int i = 0; i < rows; i++)
        if (batch->targets[i] >= V)
            return host->error(err, MT_ERR_INVALID_ARG,
                               NAME ": target %d at row %d is outside the vocabulary (%d)",
                               batch->targets[i], i, V);
    const int64_t items = count(f, batch);
    /* step_items exists in batches of ABI 2 and later: read it only when the host's
     * struct reaches it */
    const int64_t step_items =
        batch->size >= offsetof(mt_batch, step_items) + sizeof batch->step_items
            ? batch->step_items
            : 0;
    const double norm = step_items > 0 ? (double)step_items : (double)items;
    mt_status st = host->model_forward(model, batch, 1, err);
    if (st) return st;
    const int rows_per_chunk = host->model_chunk_rows(model);
    if (items && (st = reserve(f, host->model_device(model), rows_per_chunk, V, err))) return st;
    double sum = 0.0;
    for (int r0 = 0; r0 < rows && items; r0 += rows_per_chunk) {
        const int n = rows - r0 < rows_per_chunk ? rows - r0 : rows_per_chunk;
        int any = 0;
        for (int i = r0; i < r0 + n && !any; i++) any = batch->targets[i] >= 0;
        if (!any) continue; /* a chunk without targets (a masked prompt) needs no logits */
        st = chunk(f, model, batch->targets + r0, r0, n, backward, 1.0 / norm, &sum, err);
        if (st) return st;
    }
    if (backward && items && (st = host->model_backward(model, err))) return st;
    const uint32_t size = result->size; /* the host's size: keep it */
    memset(result, 0, sizeof *result);
    result->size = size;
    result->loss = items ? sum / norm : 0.0;
    result->n_tokens = items;
    if (!isfinite(result->loss))
        return host->error(err, MT_ERR_NUMERIC, NAME ": the loss is not finite (%g)",
                           result->loss);
    return MT_OK;
}

static const mt_loss_vtable vtable = {
    MT_VTABLE_SIZE(mt_loss_vtable),
    .create = create,
    .destroy = destroy,
    .compute = compute,
    .count = count,
};

MT_PLUGIN_DEFINE(host,
                 .kind = MT_PLUGIN_LOSS,
                 .name = NAME,
                 .version = "0.1.0",
                 .description = "focal loss over next-token targets (Lin et al. 2017), "
                                "normalised by the step's target tokens (an example)",
                 .options = options,
                 .n_options = sizeof options / sizeof options[0],
                 .vtable = &vtable)
