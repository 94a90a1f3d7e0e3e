/* dpo.c — direct preference optimisation (DPO) and its variants on preference pairs, as
 * TRL's DPOTrainer computes them.
 *
 * Batch layout: rows 2i and 2i+1 are pair i's chosen and rejected sequences (the same
 * prompt, then each answer); the targets mark the answer tokens (prompt and padding
 * < 0). Per sequence, logp = Σ over its target tokens of log p(target), the policy's
 * with adapters on and the reference's with adapters off (the frozen base: no second
 * copy of the model). With x = (logp_c - logp_r) - (ref_c - ref_r), h = beta · x and
 * eps = label_smoothing, per pair:
 *   sigmoid  -(1-eps) log σ(h) - eps log σ(-h)                 (DPO; cDPO with eps)
 *   robust   (-(1-eps) log σ(h) + eps log σ(-h)) / (1 - 2 eps)  (robust DPO)
 *   hinge    max(0, 1 - h)                                       (SLiC / RSO)
 *   ipo      (x - 1/(2 beta))²   with logp averaged over the answer's tokens (IPO)
 * plus, with rpo_alpha > 0, rpo_alpha times the mean NLL of the chosen answers' tokens
 * (RPO: an SFT term on the chosen answer).
 *
 * The reference. Its log-probabilities come from the batch when the host precomputed
 * them (batch->ref_logps: full fine-tuning, or DPO continuing an SFT adapter, where the
 * reference is the model before DPO), else from the model with adapters disabled, which
 * needs a frozen base. A pair whose two rows have no target is padding (the last batch
 * of an epoch) and counts for nothing.
 *
 * Normalisation (ABI 2). The items are pairs: the pair losses are summed and divided by
 * the pairs of the whole optimizer step (batch->step_items), or of this batch outside
 * training, so every pair weighs the same across micro-batches. The RPO term is the
 * batch's mean chosen-token NLL weighted by the batch's share of the step's pairs (with
 * one micro-batch: TRL's `loss + rpo_alpha * nll_loss`). Metrics are TRL's, averaged
 * over pairs the same way, so they sum over a step's micro-batches.
 *
 * Gradient. d loss / d logp_seq = g_seq (± dL/dx, over the answer length for ipo), and
 * d logp_seq / d logits of a target row = onehot(t) - softmax, so each target row gets
 * coefficients (c0, c1, c2) = (-g, 0, g) for host->softmax_backward. The policy's
 * logits of a chunk are computed twice (once for the log-probabilities, once for the
 * backward, after every pair's g is known) rather than held for the whole batch; the
 * row statistics (lse) of the first pass are kept in host memory for the second. */
#include <math.h>
#include <moontune/plugin.h>
#include <stddef.h>
#include <string.h>

#include "loss_chunk.h"

static const mt_host *host;

enum dpo_type { DPO_SIGMOID, DPO_ROBUST, DPO_HINGE, DPO_IPO };

/* The metrics in the order they are reported: TRL's names. */
enum {
    M_REWARD_CHOSEN,
    M_REWARD_REJECTED,
    M_ACCURACY,
    M_MARGIN,
    M_LOGP_CHOSEN,
    M_LOGP_REJECTED,
    M_NLL,
    M_COUNT
};
static const char *const metric_names[M_COUNT] = {
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen",   "logps/rejected",   "nll_loss"};

typedef struct dpo_state {
    double beta, label_smoothing, rpo_alpha;
    enum dpo_type type;
    loss_chunk chunk;
    /* per batch, in host memory: the policy's lse of every row (rows_cap), the
     * sequences' log-probabilities, reference log-probabilities, target counts and
     * gradients (seq_cap) */
    int64_t rows_cap;
    float *row_lse;
    int seq_cap;
    double *logp, *ref_logp, *grad;
    int64_t *len;
} dpo_state;

static const mt_option_spec options[] = {
    {"beta", MT_OPT_FLOAT, "0.1", 1e-6, 1e6, NULL,
     "strength of the tie to the reference model (the KL coefficient)"},
    {"loss_type", MT_OPT_STRING, "sigmoid", 1, 0, "sigmoid|ipo|hinge|robust",
     "sigmoid (DPO, cDPO with label_smoothing), ipo, hinge (SLiC), robust (robust DPO)"},
    {"label_smoothing", MT_OPT_FLOAT, "0", 0.0, 0.499,
     NULL, "probability that a pair's preference is flipped (sigmoid and robust)"},
    {"rpo_alpha", MT_OPT_FLOAT, "0", 0.0, 1e3, NULL,
     "weight of the NLL of the chosen answers added to the loss (RPO; 0: none)"},
};

static mt_status dpo_create(const mt_host *h, const mt_options *opts, void **state,
                            mt_error *err) {
    dpo_state *s = h->alloc(sizeof *s);
    if (!s) return h->error(err, MT_ERR_NOMEM, "dpo: out of memory");
    s->beta = h->opt_float(opts, "beta");
    s->label_smoothing = h->opt_float(opts, "label_smoothing");
    s->rpo_alpha = h->opt_float(opts, "rpo_alpha");
    const char *type = h->opt_string(opts, "loss_type");
    s->type = !strcmp(type, "ipo")      ? DPO_IPO
              : !strcmp(type, "hinge")  ? DPO_HINGE
              : !strcmp(type, "robust") ? DPO_ROBUST
                                        : DPO_SIGMOID;
    *state = s;
    return MT_OK;
}

static void dpo_free_batch(dpo_state *s) {
    host->free(s->row_lse);
    host->free(s->logp);
    host->free(s->ref_logp);
    host->free(s->grad);
    host->free(s->len);
    s->row_lse = NULL;
    s->logp = s->ref_logp = s->grad = NULL;
    s->len = NULL;
    s->rows_cap = 0;
    s->seq_cap = 0;
}

static void dpo_destroy(void *state) {
    dpo_state *s = state;
    if (!s) return;
    loss_chunk_free(host, &s->chunk);
    dpo_free_batch(s);
    host->free(s);
}

/* Host arrays for a batch of `rows` rows and `seqs` sequences, kept when they fit. */
static mt_status dpo_reserve_batch(dpo_state *s, int64_t rows, int seqs, mt_error *err) {
    if (s->rows_cap >= rows && s->seq_cap >= seqs) return MT_OK;
    dpo_free_batch(s);
    s->row_lse = host->alloc((size_t)rows * sizeof(float));
    s->logp = host->alloc((size_t)seqs * sizeof(double));
    s->ref_logp = host->alloc((size_t)seqs * sizeof(double));
    s->grad = host->alloc((size_t)seqs * sizeof(double));
    s->len = host->alloc((size_t)seqs * sizeof(int64_t));
    if (!s->row_lse || !s->logp || !s->ref_logp || !s->grad || !s->len) {
        dpo_free_batch(s);
        return host->error(err, MT_ERR_NOMEM, "dpo: out of memory for a batch of %lld rows",
                           (long long)rows);
    }
    s->rows_cap = rows;
    s->seq_cap = seqs;
    return MT_OK;
}

/* Whether any row of the batch has a target: a batch without any is empty (loss 0). */
static int batch_has_target(const mt_batch *batch) {
    if (!batch->targets) return 0;
    for (int64_t i = 0; i < (int64_t)batch->B * batch->T; i++)
        if (batch->targets[i] >= 0) return 1;
    return 0;
}

static int row_has_target(const mt_batch *batch, int b) {
    for (int t = 0; t < batch->T; t++)
        if (batch->targets[(size_t)b * batch->T + t] >= 0) return 1;
    return 0;
}

/* The items of a batch: its pairs (rows 2i, 2i+1) with targets; padding pairs (no
 * target on either row) do not count. compute refuses a malformed batch. */
static int64_t dpo_count(void *state, const mt_batch *batch) {
    (void)state;
    if (!batch->targets) return 0;
    int64_t n = 0;
    for (int b = 0; b + 1 < batch->B; b += 2)
        n += row_has_target(batch, b) || row_has_target(batch, b + 1);
    return n;
}

/* Each row's target count into s->len, after checking the pairs' layout; *present
 * receives the pairs that are not padding. */
static mt_status dpo_check_batch(dpo_state *s, const mt_batch *batch, int V, int *present,
                                 mt_error *err) {
    if (loss_batch_knows_pairs(batch) && !batch->pairs)
        return host->error(err, MT_ERR_INVALID_ARG,
                           "dpo: the batch does not hold preference pairs; load records with "
                           "prompt, chosen and rejected (mt.examples makes rows 2i and 2i+1 of "
                           "each pair)");
    if (batch->B % 2)
        return host->error(err, MT_ERR_INVALID_ARG,
                           "dpo: a batch holds preference pairs as rows 2i (chosen) and 2i+1 "
                           "(rejected), but it has %d rows", batch->B);
    *present = 0;
    for (int b = 0; b < batch->B; b++) {
        int64_t n = 0;
        for (int t = 0; t < batch->T; t++) {
            const int32_t target = batch->targets[(size_t)b * batch->T + t];
            if (target >= V)
                return host->error(err, MT_ERR_INVALID_ARG,
                                   "dpo: target %d at row %d, position %d is outside the "
                                   "vocabulary (%d)", target, b, t, V);
            n += target >= 0;
        }
        s->len[b] = n;
    }
    for (int i = 0; i < batch->B / 2; i++) {
        const int64_t nc = s->len[2 * i], nr = s->len[2 * i + 1];
        if (!nc && !nr) continue; /* padding */
        if (!nc || !nr)
            return host->error(err, MT_ERR_INVALID_ARG,
                               "dpo: the %s answer of pair %d (row %d) has no target tokens "
                               "(truncated away, or masked as prompt)",
                               nc ? "rejected" : "chosen", i, nc ? 2 * i + 1 : 2 * i);
        ++*present;
    }
    return MT_OK;
}

/* Runs the model (adapters on or off) and sums each sequence's target log-probabilities
 * into logp (B); the policy's pass (keep_lse) also keeps every row's lse. */
static mt_status dpo_logps(dpo_state *s, mt_model_handle *model, const mt_batch *batch,
                           int adapters_enabled, double *logp, int keep_lse, mt_error *err) {
    mt_status st = host->model_forward(model, batch, adapters_enabled, err);
    if (st) return st;
    const int rows = batch->B * batch->T, chunk = host->model_chunk_rows(model);
    for (int b = 0; b < batch->B; b++) logp[b] = 0.0;
    loss_chunk *ch = &s->chunk;
    int pos = 0, r0, n;
    while ((n = loss_chunk_next(ch, batch->targets, -1, rows, chunk, &pos, &r0)) > 0) {
        loss_chunk_load_targets(ch, batch->targets, -1, r0, n);
        if ((st = loss_chunk_stats(host, ch, model, r0, n, 0, 1.0f, err))) return st;
        for (int r = 0; r < n; r++) {
            const int row = loss_chunk_row(ch, r0, r);
            if (ch->h_targets[r] < 0) continue;
            logp[row / batch->T] += (double)ch->h_target_logit[r] - (double)ch->h_lse[r];
            if (keep_lse) s->row_lse[row] = ch->h_lse[r];
        }
    }
    return MT_OK;
}

static double log_sigmoid(double z) { return z >= 0 ? -log1p(exp(-z)) : z - log1p(exp(z)); }
static double sigmoid(double z) { return z >= 0 ? 1.0 / (1.0 + exp(-z)) : exp(z) / (1.0 + exp(z)); }

/* One pair's loss and its derivative by x = (logp_c - logp_r) - (ref_c - ref_r). */
static double pair_loss(const dpo_state *s, double x, double *dloss_dx) {
    const double beta = s->beta, eps = s->label_smoothing, h = beta * x;
    switch (s->type) {
    case DPO_IPO: {
        const double d = x - 1.0 / (2.0 * beta);
        *dloss_dx = 2.0 * d;
        return d * d;
    }
    case DPO_HINGE:
        *dloss_dx = h < 1.0 ? -beta : 0.0;
        return h < 1.0 ? 1.0 - h : 0.0;
    case DPO_ROBUST:
        *dloss_dx = beta * (-(1.0 - eps) * sigmoid(-h) - eps * sigmoid(h)) / (1.0 - 2.0 * eps);
        return (-(1.0 - eps) * log_sigmoid(h) + eps * log_sigmoid(-h)) / (1.0 - 2.0 * eps);
    case DPO_SIGMOID:
    default:
        *dloss_dx = beta * (-(1.0 - eps) * sigmoid(-h) + eps * sigmoid(h));
        return -(1.0 - eps) * log_sigmoid(h) - eps * log_sigmoid(-h);
    }
}

/* d loss / d logits of the policy's last forward into the model, chunk by chunk: each
 * target row of sequence b gets (c0, c1, c2) = (-g, 0, g) with g = s->grad[b], plus the
 * RPO term's -nll_coef on chosen rows. */
static mt_status dpo_backward(dpo_state *s, mt_model_handle *model, const mt_batch *batch,
                              double nll_coef, mt_error *err) {
    const int rows = batch->B * batch->T, chunk = host->model_chunk_rows(model);
    mt_status st = MT_OK;
    loss_chunk *ch = &s->chunk;
    int pos = 0, r0, n;
    while ((n = loss_chunk_next(ch, batch->targets, -1, rows, chunk, &pos, &r0)) > 0) {
        loss_chunk_load_targets(ch, batch->targets, -1, r0, n);
        for (int r = 0; r < n; r++) {
            const int row = loss_chunk_row(ch, r0, r), b = row / batch->T;
            float *c = ch->h_coefs + (size_t)r * 3;
            ch->h_lse[r] = s->row_lse[row];
            const double g = ch->h_targets[r] < 0 ? 0.0 : s->grad[b] - (b % 2 ? 0.0 : nll_coef);
            c[0] = (float)-g;
            c[1] = 0.0f;
            c[2] = (float)g;
        }
        /* the chunk's logits again, with the policy pass' targets and lse */
        if ((st = loss_chunk_backward_again(host, ch, model, r0, n, ch->h_lse, 1.0f, err)))
            return st;
    }
    return host->model_backward(model, err);
}

static mt_status dpo_compute(void *state, mt_model_handle *model, const mt_batch *batch,
                             int backward, mt_loss_result *result, mt_error *err) {
    dpo_state *s = state;
    if (result->size < sizeof *result)
        return host->error(err, MT_ERR_INVALID_ARG,
                           "dpo: the host's loss result has %u bytes, fewer than the %zu of "
                           "this plugin's ABI", (unsigned)result->size, sizeof *result);
    const double *given_ref = loss_batch_ref_logps(batch);
    if (!given_ref &&
        (host->size < offsetof(mt_host, model_base_frozen) + sizeof host->model_base_frozen ||
         !host->model_base_frozen(model)))
        return host->error(err, MT_ERR_INVALID_ARG,
                           "dpo: without precomputed reference log-probabilities the reference "
                           "is the base model with the adapters disabled, so the base must stay "
                           "frozen; this model trains base parameters (full fine-tuning, or "
                           "trainable embeddings or norms): precompute the reference "
                           "(reference = \"precomputed\") or train a LoRA or QLoRA adapter");
    if (!batch_has_target(batch)) { /* nothing to learn, as a chunk without targets */
        const uint32_t size = result->size;
        memset(result, 0, sizeof *result);
        result->size = size;
        return MT_OK;
    }
    const int V = host->model_vocab_size(model);
    const int64_t rows = (int64_t)batch->B * batch->T;
    int pairs = 0;
    mt_status st = dpo_reserve_batch(s, rows, batch->B, err);
    if (!st) st = dpo_check_batch(s, batch, V, &pairs, err);
    if (!st) st = loss_chunk_reserve(host, &s->chunk, host->model_device(model),
                                     host->model_chunk_rows(model), V, "dpo", err);
    if (st) return st;
    const int64_t step_items = loss_batch_step_items(batch);
    if (step_items > 0 && step_items < pairs)
        return host->error(err, MT_ERR_INVALID_ARG,
                           "dpo: the step has %lld pairs but this batch alone has %d",
                           (long long)step_items, pairs);
    const double norm = step_items > 0 ? (double)step_items : (double)pairs;
    /* the reference first: the policy's forward must be the last one for backward */
    if (given_ref) {
        for (int b = 0; b < batch->B; b++) {
            if (s->len[b] && !isfinite(given_ref[b]))
                return host->error(err, MT_ERR_INVALID_ARG,
                                   "dpo: the precomputed reference log-probability of row %d "
                                   "is %g", b, given_ref[b]);
            s->ref_logp[b] = given_ref[b];
        }
    } else if ((st = dpo_logps(s, model, batch, 0, s->ref_logp, 0, err))) {
        return st;
    }
    if ((st = dpo_logps(s, model, batch, 1, s->logp, 1, err))) return st;
    double sums[M_COUNT] = {0}, loss = 0.0;
    int64_t chosen_tokens = 0;
    for (int i = 0; i < batch->B / 2; i++) {
        const int c = 2 * i, r = 2 * i + 1;
        if (!s->len[c]) { /* padding: no gradient */
            s->grad[c] = s->grad[r] = 0.0;
            continue;
        }
        chosen_tokens += s->len[c];
        sums[M_NLL] -= s->logp[c];
        /* IPO compares the answers' mean token log-probabilities */
        const double wc = s->type == DPO_IPO ? 1.0 / (double)s->len[c] : 1.0,
                     wr = s->type == DPO_IPO ? 1.0 / (double)s->len[r] : 1.0;
        const double pc = s->logp[c] * wc, pr = s->logp[r] * wr, rc = s->ref_logp[c] * wc,
                     rr = s->ref_logp[r] * wr;
        double dx;
        loss += pair_loss(s, (pc - pr) - (rc - rr), &dx);
        s->grad[c] = dx * wc / norm;
        s->grad[r] = -dx * wr / norm;
        const double reward_c = s->beta * (pc - rc), reward_r = s->beta * (pr - rr);
        sums[M_REWARD_CHOSEN] += reward_c;
        sums[M_REWARD_REJECTED] += reward_r;
        sums[M_ACCURACY] += reward_c > reward_r;
        sums[M_MARGIN] += reward_c - reward_r;
        sums[M_LOGP_CHOSEN] += pc;
        sums[M_LOGP_REJECTED] += pr;
    }
    /* the RPO term: the chosen tokens' mean NLL, weighted by this batch's share of pairs */
    const double share = (double)pairs / norm;
    const double nll = sums[M_NLL] / (double)chosen_tokens * share;
    const double nll_coef = s->rpo_alpha * share / (double)chosen_tokens;
    loss = loss / norm + s->rpo_alpha * nll;
    if (!isfinite(loss))
        return host->error(err, MT_ERR_NUMERIC, "dpo: the loss is not finite (%g)", loss);
    if (backward && (st = dpo_backward(s, model, batch, nll_coef, err))) return st;
    const uint32_t size = result->size;
    memset(result, 0, sizeof *result);
    result->size = size;
    result->loss = loss;
    result->n_tokens = pairs;
    result->n_metrics = s->rpo_alpha > 0 ? M_COUNT : M_NLL;
    for (int m = 0; m < result->n_metrics; m++) {
        result->metric_names[m] = metric_names[m];
        result->metrics[m] = m == M_NLL ? nll : sums[m] / norm;
    }
    return MT_OK;
}

static const mt_loss_vtable vtable = {
    MT_VTABLE_SIZE(mt_loss_vtable),
    .create = dpo_create,
    .destroy = dpo_destroy,
    .compute = dpo_compute,
    .count = dpo_count,
};

MT_PLUGIN_DEFINE(host,
                 .kind = MT_PLUGIN_LOSS,
                 .name = "dpo",
                 .version = "1.0.0",
                 .description = "direct preference optimisation on pairs (rows 2i chosen, 2i+1 "
                 "rejected) against the base model with adapters disabled: sigmoid, ipo, hinge, "
                 "robust; label smoothing and an RPO term",
                 .options = options,
                 .n_options = sizeof options / sizeof options[0],
                 .vtable = &vtable)
