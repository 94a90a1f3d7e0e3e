/* cross_entropy.c — mean token cross-entropy over unmasked targets, with optional
 * label smoothing and z-loss, computed chunk by chunk over the rows so that the
 * (tokens x vocabulary) logits are never held at once.
 *
 * Per unmasked row with logits x, lse = log sum_j exp x_j and target t:
 *   nll     = lse - x_t
 *   smooth  = lse - mean_j x_j                      (= mean_j -log p_j)
 *   loss    = (1 - eps) * nll + eps * smooth + z * lse^2
 * averaged over the unmasked rows: torch's cross_entropy(label_smoothing=eps) plus
 * the z-loss of PaLM. d loss / d x_j = p_j - (1-eps)[j=t] - eps/V + 2 z lse p_j. */
#include <math.h>
#include <moontune/plugin.h>
#include <string.h>

static const mt_host *host;

typedef struct ce_state {
    double label_smoothing, z_loss;
    int ignore_index;
    float *logits;     /* (chunk,V), allocated on first use and kept */
    size_t logits_cap; /* floats */
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
    host->free(s->logits);
    host->free(s);
}

static int is_target(const ce_state *s, int32_t t) { return t >= 0 && t != s->ignore_index; }

/* Loss terms of rows [0, n) of logits (n,V); with backward, overwrites them with
 * dloss * d(loss_row)/d(logits). Returns sums of nll and z terms through out. */
static void chunk_rows(ce_state *s, float *logits, const int32_t *targets, int n, int V,
                       int backward, double dloss, double *sum_loss, double *sum_nll,
                       double *sum_z) {
    const double eps = s->label_smoothing, z = s->z_loss;
    double total = 0.0, total_nll = 0.0, total_z = 0.0;
#pragma omp parallel for reduction(+ : total, total_nll, total_z) schedule(static)
    for (int r = 0; r < n; r++) {
        float *x = logits + (size_t)r * V;
        if (!is_target(s, targets[r])) {
            if (backward) memset(x, 0, (size_t)V * sizeof(float));
            continue;
        }
        float mx = x[0];
        for (int j = 1; j < V; j++) mx = x[j] > mx ? x[j] : mx;
        double sum = 0.0, sum_x = 0.0;
        for (int j = 0; j < V; j++) {
            sum += exp((double)x[j] - mx);
            sum_x += x[j];
        }
        double lse = mx + log(sum);
        double nll = lse - x[targets[r]];
        double smooth = lse - sum_x / V;
        total += (1.0 - eps) * nll + eps * smooth + z * lse * lse;
        total_nll += nll;
        total_z += lse * lse;
        if (backward) {
            double coef = dloss * (1.0 + 2.0 * z * lse), uniform = dloss * eps / V;
            for (int j = 0; j < V; j++) x[j] = (float)(coef * exp((double)x[j] - lse) - uniform);
            x[targets[r]] -= (float)(dloss * (1.0 - eps));
        }
    }
    *sum_loss += total;
    *sum_nll += total_nll;
    *sum_z += total_z;
}

static mt_status ce_compute(void *state, mt_model_handle *model, const mt_batch *batch,
                            int backward, mt_loss_result *result, mt_error *err) {
    ce_state *s = state;
    if (!batch->targets)
        return host->error(err, MT_ERR_INVALID_ARG, "cross_entropy: the batch has no targets");
    const int V = host->model_vocab_size(model), rows = batch->B * batch->T;
    int64_t count = 0;
    for (int i = 0; i < rows; i++) {
        if (batch->targets[i] >= V)
            return host->error(err, MT_ERR_INVALID_ARG,
                               "cross_entropy: target %d at row %d, position %d is outside the "
                               "vocabulary (%d)",
                               batch->targets[i], i / batch->T, i % batch->T, V);
        count += is_target(s, batch->targets[i]);
    }
    mt_status st = host->model_forward(model, batch, 1, err);
    if (st) return st;
    const int chunk = host->model_chunk_rows(model);
    if ((size_t)chunk * V > s->logits_cap) { /* first use, or a larger plan */
        host->free(s->logits);
        s->logits = host->alloc((size_t)chunk * V * sizeof(float));
        if (!s->logits) {
            s->logits_cap = 0;
            return host->error(err, MT_ERR_NOMEM, "cross_entropy: out of memory for %d x %d logits",
                               chunk, V);
        }
        s->logits_cap = (size_t)chunk * V;
    }
    const double dloss = count ? 1.0 / (double)count : 0.0;
    double sum_loss = 0.0, sum_nll = 0.0, sum_z = 0.0;
    for (int r0 = 0; r0 < rows && count; r0 += chunk) {
        int n = rows - r0 < chunk ? rows - r0 : chunk;
        int any = 0;
        for (int i = r0; i < r0 + n && !any; i++) any = is_target(s, batch->targets[i]);
        if (!any) continue; /* a masked prompt needs no logits */
        if ((st = host->model_logits(model, r0, n, s->logits, err))) return st;
        chunk_rows(s, s->logits, batch->targets + r0, n, V, backward, dloss, &sum_loss, &sum_nll,
                   &sum_z);
        if (backward && (st = host->model_backward_logits(model, r0, n, s->logits, err)))
            return st;
    }
    if (backward && (st = host->model_backward(model, err))) return st;
    memset(result, 0, sizeof *result);
    result->loss = count ? sum_loss / (double)count : 0.0;
    result->n_tokens = count;
    result->n_metrics = 2;
    result->metric_names[0] = "nll";
    result->metrics[0] = count ? sum_nll / (double)count : 0.0;
    result->metric_names[1] = "lse_squared";
    result->metrics[1] = count ? sum_z / (double)count : 0.0;
    if (!isfinite(result->loss))
        return host->error(err, MT_ERR_NUMERIC, "cross_entropy: the loss is not finite (%g)",
                           result->loss);
    return MT_OK;
}

static const mt_loss_vtable vtable = {
    .create = ce_create,
    .destroy = ce_destroy,
    .compute = ce_compute,
};

MT_PLUGIN_DEFINE(host,
                 .kind = MT_PLUGIN_LOSS,
                 .name = "cross_entropy",
                 .version = "1.0.0",
                 .description = "mean token cross-entropy over unmasked targets, chunked over rows; "
                 "optional label smoothing and z-loss",
                 .options = options,
                 .n_options = sizeof options / sizeof options[0],
                 .vtable = &vtable)
