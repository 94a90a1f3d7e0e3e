/* grpo.c — group relative policy optimisation (GRPO) and its DAPO and Dr. GRPO
 * normalisations, on a batch of sampled completions, as TRL's GRPOTrainer computes its
 * loss.
 *
 * Batch layout (a rollout batch: loss_batch_is_rollout). Each row is a prompt, then a
 * completion the model sampled; the targets mark the completion's tokens (pre-shifted:
 * targets[b,t] = tokens[b,t+1] where t+1 is a completion position, else < 0). Per row,
 * advantages[b] = A is the completion's advantage (its reward against its group's; NAN
 * on padding rows, which have no targets), and per target token old_logps[b,t] = old is
 * the log-probability the sampling policy gave the token, at the sampling temperature.
 *
 * Per target token t of row b, with logp = log_softmax(logits / temperature)[target]
 * (the policy: the model with its adapters on), ratio = exp(logp - old) and
 * clipped = clamp(ratio, 1 - epsilon, 1 + epsilon_high):
 *   per_token_loss = -min(ratio · A, clipped · A)                  (PPO's clipped surrogate)
 *                    + beta · (exp(ref - logp) - (ref - logp) - 1)  (k3 KL, when beta > 0)
 * where ref is the token's log-probability under the reference, the model with adapters
 * disabled (the frozen base: no second copy of the model), at the same temperature. With
 * beta = 0 no reference pass is made at all.
 *
 * Normalisation (ABI 2). The items (what `count` returns, and the host sums over an
 * optimizer step's micro-batches into N = batch->step_items; outside training N is this
 * batch's own items) and the loss, per loss_type:
 *   grpo     items: rows with a target        loss = Σ_rows (Σ_t per_token_loss / n_row) / N
 *   dapo     items: target tokens             loss = Σ_tokens per_token_loss / N
 *   dr_grpo  items: rows with a target × max_completion_length
 *                                             loss = Σ_tokens per_token_loss / N
 * (with one micro-batch: TRL's mean over sequences of the per-sequence token means, its
 * token sum over the batch's tokens, and its token sum over B · max_completion_length),
 * so a step's loss is the sum of its micro-batches' and every item weighs the same
 * whatever micro-batch it falls in.
 *
 * Metrics (TRL's names): kl (the mean per-token k3 KL, when beta > 0) and the clip
 * ratios: clip_ratio/low_mean, the fraction of tokens with ratio < 1 - epsilon and A < 0
 * (the surrogate held at its lower clip), clip_ratio/high_mean, ratio > 1 + epsilon_high
 * and A > 0, and clip_ratio/region_mean, either. Each is the mean over this batch's
 * target tokens times the batch's share of the step (its items / N), so that they sum
 * over a step's micro-batches to a step-wide average.
 *
 * Gradient. With w_t the normalisation weight of token t (1 / (n_row · N) for grpo,
 * 1 / N otherwise):
 *   d loss / d logp_t = w_t · [-A · ratio · unclipped + beta · (1 - exp(ref - logp))]
 * where the token is clipped (no surrogate gradient: the min picked the constant clamp)
 * when A > 0 and ratio > 1 + epsilon_high, or A < 0 and ratio < 1 - epsilon. With
 * z = logits / temperature, d logp / d z = onehot(t) - softmax(z), and d z / d logits =
 * 1 / temperature, so each target row gets coefficients (c0, c1, c2) = (-g/T, 0, g/T)
 * for host->softmax_backward on the scaled logits. As in dpo.c, the reference pass runs
 * first (adapters off, only when beta > 0) and the policy's last, so that the model's
 * backward follows the policy's forward; the policy's scaled logits of a chunk are
 * computed twice (once for the log-probabilities, once for the backward, when every
 * token's g is known), and every row's lse of the first pass is kept in host memory for
 * the second. Chunks without targets (prompts, padding) cost nothing. */
#include <math.h>
#include <moontune/plugin.h>
#include <stddef.h>
#include <string.h>

#include "loss_chunk.h"

static const mt_host *host;

enum grpo_type { GRPO_GRPO, GRPO_DAPO, GRPO_DR_GRPO };

/* The metrics in the order they are reported (kl only when beta > 0): TRL's names. */
enum { M_CLIP_LOW, M_CLIP_HIGH, M_CLIP_REGION, M_KL, M_COUNT };
static const char *const metric_names[M_COUNT] = {
    "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl"};

typedef struct grpo_state {
    double beta, eps_low, eps_high, temperature;
    int64_t max_completion_length;
    enum grpo_type type;
    loss_chunk chunk;
    /* per batch, in host memory: per row of B·T (rows_cap) the policy's lse, the
     * policy's and the reference's log-probability of the target and d loss / d logp;
     * per batch row (seq_cap) its target count */
    int64_t rows_cap;
    float *row_lse;
    double *logp, *ref_logp, *grad;
    int seq_cap;
    int64_t *len;
} grpo_state;

static const mt_option_spec options[] = {
    {"beta", MT_OPT_FLOAT, "0", 0.0, 1e6, NULL,
     "KL coefficient to the reference, the model with adapters disabled (0: no reference "
     "pass)"},
    {"epsilon", MT_OPT_FLOAT, "0.2", 0.0, 1.0, NULL,
     "lower clip of the probability ratio: 1 - epsilon"},
    {"epsilon_high", MT_OPT_FLOAT, "-1", -1.0, 1e3, NULL,
     "upper clip of the probability ratio: 1 + epsilon_high (-1: the same as epsilon; DAPO "
     "uses 0.28)"},
    {"loss_type", MT_OPT_STRING, "dapo", 1, 0, "grpo|dapo|dr_grpo",
     "normalisation: grpo (per-sequence token means), dapo (over the step's tokens), dr_grpo "
     "(over sequences x max_completion_length)"},
    {"max_completion_length", MT_OPT_INT, "0", 0.0, 1e9, NULL,
     "the longest completion sampled (max_new_tokens); required by dr_grpo"},
    {"temperature", MT_OPT_FLOAT, "1", 1e-6, 1e6, NULL,
     "the sampling temperature: logits are divided by it before the log-softmax"},
};

static mt_status grpo_create(const mt_host *h, const mt_options *opts, void **state,
                             mt_error *err) {
    const double eps_high = h->opt_float(opts, "epsilon_high");
    if (eps_high < 0.0 && eps_high != -1.0)
        return h->error(err, MT_ERR_INVALID_ARG,
                        "grpo: epsilon_high is %g; it must be >= 0, or -1 for the same as "
                        "epsilon", eps_high);
    const char *type = h->opt_string(opts, "loss_type");
    const enum grpo_type t = !strcmp(type, "grpo")      ? GRPO_GRPO
                             : !strcmp(type, "dr_grpo") ? GRPO_DR_GRPO
                                                        : GRPO_DAPO;
    const int64_t max_len = h->opt_int(opts, "max_completion_length");
    if (t == GRPO_DR_GRPO && max_len <= 0)
        return h->error(err, MT_ERR_INVALID_ARG,
                        "grpo: loss_type \"dr_grpo\" divides by the sequences times "
                        "max_completion_length; set max_completion_length (> 0) to the "
                        "max_new_tokens the completions were sampled with");
    grpo_state *s = h->alloc(sizeof *s);
    if (!s) return h->error(err, MT_ERR_NOMEM, "grpo: out of memory");
    s->beta = h->opt_float(opts, "beta");
    s->eps_low = h->opt_float(opts, "epsilon");
    s->eps_high = eps_high < 0.0 ? s->eps_low : eps_high;
    s->temperature = h->opt_float(opts, "temperature");
    s->max_completion_length = max_len;
    s->type = t;
    *state = s;
    return MT_OK;
}

static void grpo_free_batch(grpo_state *s) {
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

static void grpo_destroy(void *state) {
    grpo_state *s = state;
    if (!s) return;
    loss_chunk_free(host, &s->chunk);
    grpo_free_batch(s);
    host->free(s);
}

/* Host arrays for a batch of B rows of T tokens, kept when they fit. */
static mt_status grpo_reserve_batch(grpo_state *s, int64_t rows, int seqs, mt_error *err) {
    if (s->rows_cap >= rows && s->seq_cap >= seqs) return MT_OK;
    grpo_free_batch(s);
    s->row_lse = host->alloc((size_t)rows * sizeof(float));
    s->logp = host->alloc((size_t)rows * sizeof(double));
    s->ref_logp = host->alloc((size_t)rows * sizeof(double));
    s->grad = host->alloc((size_t)rows * sizeof(double));
    s->len = host->alloc((size_t)seqs * sizeof(int64_t));
    if (!s->row_lse || !s->logp || !s->ref_logp || !s->grad || !s->len) {
        grpo_free_batch(s);
        return host->error(err, MT_ERR_NOMEM, "grpo: out of memory for a batch of %lld rows",
                           (long long)rows);
    }
    s->rows_cap = rows;
    s->seq_cap = seqs;
    return MT_OK;
}

static int64_t row_targets(const mt_batch *batch, int b) {
    int64_t n = 0;
    for (int t = 0; t < batch->T; t++) n += batch->targets[(size_t)b * batch->T + t] >= 0;
    return n;
}

/* The items of a batch by loss_type (see the header); compute refuses a malformed
 * batch. */
static int64_t grpo_count(void *state, const mt_batch *batch) {
    const grpo_state *s = state;
    if (!batch->targets) return 0;
    int64_t n = 0;
    for (int b = 0; b < batch->B; b++) {
        const int64_t len = row_targets(batch, b);
        n += s->type == GRPO_DAPO ? len : len > 0;
    }
    return s->type == GRPO_DR_GRPO ? n * s->max_completion_length : n;
}

/* Each row's target count into s->len, after checking the targets, advantages and
 * sampling log-probabilities; *rows_out and *tokens_out receive the rows with a target
 * and the target tokens. */
static mt_status grpo_check_batch(grpo_state *s, const mt_batch *batch, int V, int64_t *rows_out,
                                  int64_t *tokens_out, mt_error *err) {
    int64_t rows = 0, tokens = 0;
    for (int b = 0; b < batch->B; b++) {
        int64_t n = 0;
        for (int t = 0; t < batch->T; t++) {
            const size_t i = (size_t)b * batch->T + t;
            const int32_t target = batch->targets[i];
            if (target < 0) continue;
            if (target >= V)
                return host->error(err, MT_ERR_INVALID_ARG,
                                   "grpo: target %d at row %d, position %d is outside the "
                                   "vocabulary (%d)", target, b, t, V);
            if (!isfinite(batch->advantages[b]))
                return host->error(err, MT_ERR_INVALID_ARG,
                                   "grpo: the advantage of row %d is %g, but the row has a "
                                   "target at position %d (a completion needs a finite "
                                   "advantage)", b, (double)batch->advantages[b], t);
            if (!isfinite(batch->old_logps[i]))
                return host->error(err, MT_ERR_INVALID_ARG,
                                   "grpo: the sampling log-probability (old_logps) of row %d, "
                                   "position %d is %g", b, t, (double)batch->old_logps[i]);
            n++;
        }
        s->len[b] = n;
        rows += n > 0;
        tokens += n;
    }
    *rows_out = rows;
    *tokens_out = tokens;
    return MT_OK;
}

/* The logits' factor: 1 / temperature (exactly 1 at temperature 1: no scaling pass). */
static float logit_scale(const grpo_state *s) {
    return s->temperature != 1.0 ? (float)(1.0 / s->temperature) : 1.0f;
}

/* Runs the model (adapters on or off) and puts each target's log-probability at the
 * temperature into logp (B·T, aligned with the targets); the policy's pass (keep_lse)
 * also keeps every target row's lse. */
static mt_status grpo_logps(grpo_state *s, mt_model_handle *model, const mt_batch *batch,
                            int adapters_enabled, double *logp, int keep_lse, mt_error *err) {
    mt_status st = host->model_forward(model, batch, adapters_enabled, err);
    if (st) return st;
    const int rows = batch->B * batch->T, chunk = host->model_chunk_rows(model);
    loss_chunk *ch = &s->chunk;
    int pos = 0, r0, n;
    while ((n = loss_chunk_next(ch, batch->targets, -1, rows, chunk, &pos, &r0)) > 0) {
        loss_chunk_load_targets(ch, batch->targets, -1, r0, n);
        if ((st = loss_chunk_stats(host, ch, model, r0, n, 0, logit_scale(s), err))) return st;
        for (int r = 0; r < n; r++) {
            const int row = loss_chunk_row(ch, r0, r);
            if (ch->h_targets[r] < 0) continue;
            logp[row] = (double)ch->h_target_logit[r] - (double)ch->h_lse[r];
            if (keep_lse) s->row_lse[row] = ch->h_lse[r];
        }
    }
    return MT_OK;
}

/* d loss / d logits of the policy's last forward into the model, chunk by chunk: each
 * target row gets (c0, c1, c2) = (-g/T, 0, g/T) with g = s->grad of its token, on the
 * logits scaled by 1/T again. */
static mt_status grpo_backward(grpo_state *s, mt_model_handle *model, const mt_batch *batch,
                               mt_error *err) {
    const int rows = batch->B * batch->T, chunk = host->model_chunk_rows(model);
    const double inv_t = 1.0 / s->temperature;
    loss_chunk *ch = &s->chunk;
    mt_status st = MT_OK;
    int pos = 0, r0, n;
    while ((n = loss_chunk_next(ch, batch->targets, -1, rows, chunk, &pos, &r0)) > 0) {
        loss_chunk_load_targets(ch, batch->targets, -1, r0, n);
        for (int r = 0; r < n; r++) {
            const int row = loss_chunk_row(ch, r0, r);
            float *c = ch->h_coefs + (size_t)r * 3;
            ch->h_lse[r] = s->row_lse[row];
            const double g = ch->h_targets[r] >= 0 ? s->grad[row] * inv_t : 0.0;
            c[0] = (float)-g;
            c[1] = 0.0f;
            c[2] = (float)g;
        }
        /* the chunk's scaled logits again, with the policy pass' targets and lse */
        if ((st = loss_chunk_backward_again(host, ch, model, r0, n, ch->h_lse, logit_scale(s), err)))
            return st;
    }
    return host->model_backward(model, err);
}

static mt_status grpo_compute(void *state, mt_model_handle *model, const mt_batch *batch,
                              int backward, mt_loss_result *result, mt_error *err) {
    grpo_state *s = state;
    if (result->size < sizeof *result)
        return host->error(err, MT_ERR_INVALID_ARG,
                           "grpo: the host's loss result has %u bytes, fewer than the %zu of "
                           "this plugin's ABI", (unsigned)result->size, sizeof *result);
    if (!loss_batch_is_rollout(batch))
        return host->error(err, MT_ERR_INVALID_ARG,
                           "grpo: the batch is not a batch of sampled completions: it carries "
                           "no advantages and sampling log-probabilities (old_logps); GRPO "
                           "trains on rollouts (moontune.grpo's batcher), not on a dataset");
    if (s->beta > 0 &&
        (host->size < offsetof(mt_host, model_base_frozen) + sizeof host->model_base_frozen ||
         !host->model_base_frozen(model)))
        return host->error(err, MT_ERR_INVALID_ARG,
                           "grpo: with beta > 0 the KL term's reference is the base model with "
                           "the adapters disabled, so the base must stay frozen; this model "
                           "trains base parameters (full fine-tuning, or trainable embeddings "
                           "or norms): train a LoRA or QLoRA adapter, or set beta = 0");
    const uint32_t size = result->size;
    memset(result, 0, sizeof *result);
    result->size = size;
    if (!batch->targets) return MT_OK; /* nothing to learn */
    const int V = host->model_vocab_size(model);
    const int64_t rows = (int64_t)batch->B * batch->T;
    int64_t seqs = 0, tokens = 0;
    mt_status st = grpo_reserve_batch(s, rows, batch->B, err);
    if (!st) st = grpo_check_batch(s, batch, V, &seqs, &tokens, err);
    if (st) return st;
    if (!tokens) return MT_OK; /* a batch of padding: loss 0, no gradient */
    if ((st = loss_chunk_reserve(host, &s->chunk, host->model_device(model),
                                 host->model_chunk_rows(model), V, "grpo", err)))
        return st;
    const int64_t items = s->type == GRPO_DAPO      ? tokens
                          : s->type == GRPO_DR_GRPO ? seqs * s->max_completion_length
                                                    : seqs;
    const int64_t step_items = loss_batch_step_items(batch);
    if (step_items > 0 && step_items < items)
        return host->error(err, MT_ERR_INVALID_ARG,
                           "grpo: the step has %lld items but this batch alone has %lld",
                           (long long)step_items, (long long)items);
    const double norm = step_items > 0 ? (double)step_items : (double)items;
    /* the reference first: the policy's forward must be the last one for backward */
    if (s->beta > 0 && (st = grpo_logps(s, model, batch, 0, s->ref_logp, 0, err))) return st;
    if ((st = grpo_logps(s, model, batch, 1, s->logp, 1, err))) return st;
    double loss = 0.0, sums[M_COUNT] = {0};
    for (int b = 0; b < batch->B; b++) {
        if (!s->len[b]) continue;
        const double A = batch->advantages[b];
        const double w = s->type == GRPO_GRPO ? 1.0 / ((double)s->len[b] * norm) : 1.0 / norm;
        for (int t = 0; t < batch->T; t++) {
            const size_t i = (size_t)b * batch->T + t;
            if (batch->targets[i] < 0) continue;
            const double logp = s->logp[i], ratio = exp(logp - (double)batch->old_logps[i]);
            const double clipped = fmin(fmax(ratio, 1.0 - s->eps_low), 1.0 + s->eps_high);
            const int low = ratio < 1.0 - s->eps_low && A < 0,
                      high = ratio > 1.0 + s->eps_high && A > 0;
            double token_loss = -fmin(ratio * A, clipped * A);
            double g = low || high ? 0.0 : -A * ratio;
            if (s->beta > 0) {
                const double d = s->ref_logp[i] - logp, e = exp(d), kl = e - d - 1.0;
                token_loss += s->beta * kl;
                g += s->beta * (1.0 - e);
                sums[M_KL] += kl;
            }
            loss += w * token_loss;
            s->grad[i] = w * g;
            sums[M_CLIP_LOW] += low;
            sums[M_CLIP_HIGH] += high;
            sums[M_CLIP_REGION] += low || high;
        }
    }
    if (!isfinite(loss))
        return host->error(err, MT_ERR_NUMERIC, "grpo: the loss is not finite (%g)", loss);
    if (backward && (st = grpo_backward(s, model, batch, err))) return st;
    /* token means within the batch, weighted by the batch's share of the step's items */
    const double share = (double)items / norm;
    result->loss = loss;
    result->n_tokens = items;
    result->n_metrics = s->beta > 0 ? M_COUNT : M_KL;
    for (int m = 0; m < result->n_metrics; m++) {
        result->metric_names[m] = metric_names[m];
        result->metrics[m] = sums[m] / (double)tokens * share;
    }
    return MT_OK;
}

static const mt_loss_vtable vtable = {
    MT_VTABLE_SIZE(mt_loss_vtable),
    .create = grpo_create,
    .destroy = grpo_destroy,
    .compute = grpo_compute,
    .count = grpo_count,
};

MT_PLUGIN_DEFINE(host,
                 .kind = MT_PLUGIN_LOSS,
                 .name = "grpo",
                 .version = "1.0.0",
                 .description = "group relative policy optimisation on sampled completions "
                 "(advantages, sampling log-probabilities): the clipped surrogate with a k3 KL "
                 "to the base model with adapters disabled; grpo, dapo and dr_grpo "
                 "normalisations",
                 .options = options,
                 .n_options = sizeof options / sizeof options[0],
                 .vtable = &vtable)
