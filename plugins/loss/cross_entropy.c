/* cross_entropy.c — token cross-entropy over unmasked targets, with optional label
 * smoothing and z-loss, computed chunk by chunk over the rows so that the
 * (tokens x vocabulary) logits are never held at once.
 *
 * Per unmasked row with logits x, lse = log sum_j exp x_j and target t:
 *   nll     = lse - x_t
 *   smooth  = lse - mean_j x_j                      (= mean_j -log p_j)
 *   loss    = (1 - eps) * nll + eps * smooth + z * lse^2
 * torch's cross_entropy(label_smoothing=eps) plus the z-loss of PaLM.
 * d loss_row / d x_j = (1 + 2 z lse) p_j - eps/V - (1-eps)[j=t].
 *
 * Normalisation (ABI 2). The sum over rows is divided by the target tokens of the whole
 * optimizer step (batch->step_items, which the host sums over the micro-batches through
 * `count` below), so the step's loss is the sum of its micro-batches' losses and every
 * token weighs the same whatever micro-batch it falls in: transformers'
 * num_items_in_batch since 4.46. Outside training (step_items 0) the batch is
 * normalised by its own count. The metrics nll and lse_squared are normalised the same
 * way, so they too sum over a step.
 *
 * Devices. The plugin never reads logit memory: per chunk it asks the model for the
 * logits as a device tensor, uploads the chunk's targets (ignored ones as -1, which
 * the host's softmax operations treat as "no target"), lets host->softmax_stats
 * reduce every row to lse, x_t and mean_j x_j, and downloads those three n-row
 * vectors to form the sums in double here. Backward is then three numbers per row,
 * (c0, c1, c2) = dloss * ((1 + 2 z lse), -eps/V, -(1-eps)), zero for rows without a
 * target, uploaded as an (n,3) tensor; host->softmax_backward turns the logits in
 * place into d loss / d logits, which go back to the model. The chunk tensors are
 * allocated on the model's device on first use and grown when a plan needs more rows.
 *
 * Only rows with a target reach the output layer: the chunks are lists of such rows
 * (host->model_logits_rows), so prompt tokens, often more than half of an SFT batch,
 * cost no logits forward or backward. A host without that slot gets contiguous chunks,
 * of which fully masked ones are skipped. */
#include <math.h>
#include <moontune/plugin.h>
#include <stddef.h>
#include <string.h>

#include "loss_chunk.h"

static const mt_host *host;

typedef struct ce_state {
    double label_smoothing, z_loss;
    int ignore_index;
    loss_chunk chunk;
} ce_state;

static const mt_option_spec options[] = {
    {"label_smoothing", MT_OPT_FLOAT, "0", 0.0, 0.999, NULL,
     "mix the one-hot target with the uniform distribution (torch's label_smoothing)"},
    {"z_loss", MT_OPT_FLOAT, "0", 0.0, 1.0, NULL,
     "coefficient of the squared log-partition penalty (PaLM's z-loss, e.g. 1e-4)"},
    {"ignore_index", MT_OPT_INT, "-100", -1e9, 1e9, NULL,
     "target value that is not trained on (negative targets are always ignored)"},
};

static mt_status ce_create(const mt_host *h, const mt_options *opts, void **state, mt_error *err) {
    ce_state *s = h->alloc(sizeof *s);
    if (!s) return h->error(err, MT_ERR_NOMEM, "cross_entropy: out of memory");
    s->label_smoothing = h->opt_float(opts, "label_smoothing");
    s->z_loss = h->opt_float(opts, "z_loss");
    s->ignore_index = (int)h->opt_int(opts, "ignore_index");
    *state = s;
    return MT_OK;
}

static void ce_destroy(void *state) {
    ce_state *s = state;
    if (!s) return;
    loss_chunk_free(host, &s->chunk);
    host->free(s);
}

static int is_target(const ce_state *s, int32_t t) { return t >= 0 && t != s->ignore_index; }

/* The items of a batch: targets the loss trains on. Targets past the vocabulary count
 * here too; compute refuses them before it uses any count. */
static int64_t ce_count(void *state, const mt_batch *batch) {
    const ce_state *s = state;
    if (!batch->targets) return 0;
    const int64_t rows = (int64_t)batch->B * batch->T;
    int64_t count = 0;
    for (int64_t i = 0; i < rows; i++) count += is_target(s, batch->targets[i]);
    return count;
}

typedef struct ce_sums {
    double loss, nll, z;
} ce_sums;

/* One chunk of n rows (from row0, or ch->h_rows when by_rows) of the batch's targets:
 * logits, the row statistics, the sums and, with backward, d loss / d logits into the
 * model. */
static mt_status ce_chunk(ce_state *s, mt_model_handle *model, const int32_t *targets, int row0,
                          int n, int V, int backward, double dloss, ce_sums *sums, mt_error *err) {
    const double eps = s->label_smoothing, z = s->z_loss;
    loss_chunk *ch = &s->chunk;
    loss_chunk_load_targets(ch, targets, s->ignore_index, row0, n);
    mt_status st = loss_chunk_stats(host, ch, model, row0, n, eps > 0, 1.0f, err);
    if (st) return st;
    for (int r = 0; r < n; r++) {
        float *c = ch->h_coefs + (size_t)r * 3;
        c[0] = c[1] = c[2] = 0.0f; /* no target: no gradient */
        if (ch->h_targets[r] < 0) continue;
        const double l = ch->h_lse[r], nll = l - (double)ch->h_target_logit[r];
        const double smooth = eps > 0 ? l - (double)ch->h_mean_logit[r] : 0.0;
        sums->loss += (1.0 - eps) * nll + eps * smooth + z * l * l;
        sums->nll += nll;
        sums->z += l * l;
        c[0] = (float)(dloss * (1.0 + 2.0 * z * l));
        c[1] = (float)(-dloss * eps / V);
        c[2] = (float)(-dloss * (1.0 - eps));
    }
    return backward ? loss_chunk_backward(host, ch, model, row0, n, err) : MT_OK;
}

static mt_status ce_compute(void *state, mt_model_handle *model, const mt_batch *batch,
                            int backward, mt_loss_result *result, mt_error *err) {
    ce_state *s = state;
    if (!batch->targets)
        return host->error(err, MT_ERR_INVALID_ARG, "cross_entropy: the batch has no targets");
    if (result->size < sizeof *result)
        return host->error(err, MT_ERR_INVALID_ARG,
                           "cross_entropy: the host's loss result has %u bytes, fewer than the "
                           "%zu of this plugin's ABI", (unsigned)result->size, sizeof *result);
    if (loss_batch_pairs(batch))
        return host->error(err, MT_ERR_INVALID_ARG,
                           "cross_entropy: the batch holds preference pairs (chosen and rejected "
                           "replies): cross-entropy would train on the rejected ones too; use a "
                           "preference loss such as dpo, or train on the chosen replies as "
                           "prompt/completion records");
    const int V = host->model_vocab_size(model), rows = batch->B * batch->T;
    for (int i = 0; i < rows; i++)
        if (batch->targets[i] >= V)
            return host->error(err, MT_ERR_INVALID_ARG,
                               "cross_entropy: target %d at row %d, position %d is outside the "
                               "vocabulary (%d)",
                               batch->targets[i], i / batch->T, i % batch->T, V);
    const int64_t count = ce_count(s, batch);
    /* the whole step's items when the host says them (a batch struct of ABI 2 or later) */
    const int64_t step_items = loss_batch_step_items(batch);
    if (step_items > 0 && step_items < count)
        return host->error(err, MT_ERR_INVALID_ARG,
                           "cross_entropy: the step has %lld items but this batch alone has %lld",
                           (long long)step_items, (long long)count);
    const double norm = step_items > 0 ? (double)step_items : (double)count;
    mt_status st = host->model_forward(model, batch, 1, err);
    if (st) return st;
    const int chunk = host->model_chunk_rows(model);
    if (count && (st = loss_chunk_reserve(host, &s->chunk, host->model_device(model), chunk, V,
                                          "cross_entropy", err)))
        return st;
    const double dloss = count ? 1.0 / norm : 0.0;
    ce_sums sums = {0, 0, 0};
    int pos = 0, row0, n;
    while (count && (n = loss_chunk_next(&s->chunk, batch->targets, s->ignore_index, rows, chunk, &pos, &row0)) > 0)
        if ((st = ce_chunk(s, model, batch->targets, row0, n, V, backward, dloss, &sums, err)))
            return st;
    if (backward && (st = host->model_backward(model, err))) return st;
    const uint32_t size = result->size;
    memset(result, 0, sizeof *result);
    result->size = size;
    result->loss = count ? sums.loss / norm : 0.0;
    result->n_tokens = count;
    result->n_metrics = 2;
    result->metric_names[0] = "nll";
    result->metrics[0] = count ? sums.nll / norm : 0.0;
    result->metric_names[1] = "lse_squared";
    result->metrics[1] = count ? sums.z / norm : 0.0;
    if (!isfinite(result->loss))
        return host->error(err, MT_ERR_NUMERIC, "cross_entropy: the loss is not finite (%g)",
                           result->loss);
    return MT_OK;
}

static const mt_loss_vtable vtable = {
    MT_VTABLE_SIZE(mt_loss_vtable),
    .create = ce_create,
    .destroy = ce_destroy,
    .compute = ce_compute,
    .count = ce_count,
};

MT_PLUGIN_DEFINE(host,
                 .kind = MT_PLUGIN_LOSS,
                 .name = "cross_entropy",
                 .version = "2.0.0",
                 .description = "token cross-entropy over unmasked targets, normalised by the "
                 "step's target tokens, chunked over rows; optional label smoothing and z-loss",
                 .options = options,
                 .n_options = sizeof options / sizeof options[0],
                 .vtable = &vtable)
