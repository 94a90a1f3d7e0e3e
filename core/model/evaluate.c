/* evaluate.c — held-out loss and perplexity. */
#include "model/evaluate.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h"
#include "dist/dist.h"
#include "model/train.h"

/* An empty set's error: names the file and says why (every example dropped, or none). */
static mt_status empty_set_error(const mt_example_set *examples, mt_error *err) {
    char from[600], too_long[96] = "", no_target[96] = "", why[200] = "";
    const char *src = mt_example_set_source(examples, from, sizeof from);
    const long long n_long = examples->n_dropped_too_long, n_none = examples->n_dropped_no_target;
    const char *what = examples->paired ? "pair" : "example";
    if (n_long > 0)
        snprintf(too_long, sizeof too_long, "%lld %s%s longer than seq_len %d dropped by "
                 "truncation \"drop\"", n_long, what, n_long == 1 ? "" : "s", examples->opt.seq_len);
    if (n_none > 0)
        snprintf(no_target, sizeof no_target, "%lld %s%s with nothing to train on", n_none, what,
                 n_none == 1 ? "" : "s");
    if (n_long > 0 || n_none > 0)
        snprintf(why, sizeof why, " (%s%s%s)", too_long, n_long > 0 && n_none > 0 ? "; " : "",
                 no_target);
    return mt_error_set(err, MT_ERR_INVALID_ARG, "%s%sevaluation: the held-out set is empty%s",
                        src ? src : "", src ? ": " : "", why);
}

/* The frozen projections through the int8 copies of training's forward for one pass,
 * made for it when int8 training is off (then *made_here, and int8_end frees them):
 * how many projections multiply in int8. */
static int int8_begin(mt_model *m, int *made_here) {
    *made_here = m->int8_training == MT_INT8_OFF;
    if (*made_here) mt_model_set_int8_training(m, MT_INT8_FORWARD);
    return mt_model_int8_attach(m);
}

static void int8_end(mt_model *m, int made_here) {
    mt_model_int8_detach(m);
    if (made_here) mt_model_set_int8_training(m, MT_INT8_OFF);
}

/* One pass over every example in order, without gradients or dropout: batches of B x T
 * (pairs unpacked in rows 2i, 2i+1; single examples packed), each handed to visit. In a
 * data-parallel job rank r visits batches r, r + N, r + 2N, ... of the same sequence;
 * the callers sum what the ranks found (reduce_sums). */
typedef mt_status (*batch_visit)(void *ctx, mt_model *m, const mt_batch *batch,
                                 const mt_batch_info *info, size_t first_item, mt_error *err);

static mt_status run_batches(mt_model *m, const mt_example_set *examples, int B, int T,
                             batch_visit visit, void *ctx, double *seconds,
                             int64_t *seen_tokens, mt_error *err) {
    if (examples->n == 0) return empty_set_error(examples, err);
    if (examples->paired) B = B >= 4 ? B - B % 2 : 2;
    mt_batcher *batcher = NULL;
    mt_status st = mt_batcher_create(examples, B, T, !examples->paired, 0, 0, &batcher, err);
    if (st) return st;
    size_t n = (size_t)B * T;
    int32_t *buf = mt_malloc(4 * n * sizeof(int32_t), "evaluation batch", err);
    double *ref = mt_malloc((size_t)B * sizeof *ref, "evaluation batch", err);
    if (!buf || !ref) {
        free(buf);
        free(ref);
        mt_batcher_free(batcher);
        return MT_ERR_NOMEM;
    }
    int32_t *tokens = buf, *positions = buf + n, *segments = buf + 2 * n, *targets = buf + 3 * n;
    double t0 = mt_now_seconds();
    *seen_tokens = 0;
    mt_model_set_training(m, 0);
    for (int64_t index = 0;; index++) {
        mt_batch_info info;
        const size_t first = (size_t)mt_batcher_get_cursor(batcher).position;
        if ((st = mt_batcher_next(batcher, tokens, positions, segments, targets, ref, &info, err)))
            break;
        if (index % mt_dist_size() != mt_dist_rank()) { /* another rank's batch */
            if (info.epoch_end) break;
            continue;
        }
        /* columns past the longest row are padding: a causal model does not need them */
        int rows = B, width = mt_batch_narrow(tokens, positions, segments, targets, B, T,
                                              info.longest);
        /* a prompt prefix the examples share runs once (the same losses), in one row:
         * without a backward, more rows would keep no thread busier */
        if (!examples->paired &&
            (st = mt_batch_share_prefix(tokens, positions, segments, targets, B, width, 1, &rows,
                                        &width, err)))
            break;
        mt_batch batch = {.size = sizeof batch, .B = rows, .T = width, .tokens = tokens,
                          .positions = positions, .segments = segments, .targets = targets,
                          .pairs = examples->paired,
                          .ref_logps = examples->has_ref_logps ? ref : NULL};
        if ((st = visit(ctx, m, &batch, &info, first, err))) break;
        *seen_tokens += info.tokens;
        if (info.epoch_end) break;
    }
    mt_model_set_training(m, 1);
    free(buf);
    free(ref);
    mt_batcher_free(batcher);
    *seconds = mt_now_seconds() - t0;
    return st;
}

/* run_batches, with int8 through training's int8 forward (mt_evaluate); *int8_used
 * counts the projections that multiplied in int8. */
static mt_status each_batch(mt_model *m, const mt_example_set *examples, int B, int T, int int8,
                            int *int8_used, batch_visit visit, void *ctx, double *seconds,
                            int64_t *seen_tokens, mt_error *err) {
    int made_here = 0;
    *int8_used = int8 ? int8_begin(m, &made_here) : 0;
    mt_status st = run_batches(m, examples, B, T, visit, ctx, seconds, seen_tokens, err);
    if (int8) int8_end(m, made_here);
    return st;
}

/* Sums the pass' counts over the ranks (a no-op for one): its weighted loss, items,
 * examples, tokens seen and the loss plugin's metrics. */
static mt_status reduce_sums(mt_eval_result *result, double *weighted, double *metrics,
                             int64_t *seen, mt_error *err) {
    double v[4] = {*weighted, (double)result->tokens, (double)result->examples, (double)*seen};
    mt_status st = mt_train_sum_over_ranks(v, 4, &result->n_metrics, result->metric_names,
                                           metrics, err);
    if (st) return st;
    *weighted = v[0];
    result->tokens = (int64_t)v[1];
    result->examples = (int64_t)v[2];
    *seen = (int64_t)v[3];
    return MT_OK;
}

static void finish(mt_eval_result *result, double seconds, int64_t seen_tokens) {
    result->seconds = seconds;
    result->tokens_per_second = seconds > 0 ? (double)seen_tokens / seconds : 0.0;
}

typedef struct ce_pass {
    mt_eval_result *result;
    double weighted;
} ce_pass;

static mt_status visit_cross_entropy(void *ctx, mt_model *m, const mt_batch *b,
                                     const mt_batch_info *info, size_t first, mt_error *err) {
    (void)first;
    ce_pass *p = ctx;
    float loss;
    int64_t count;
    mt_status st = mt_model_forward(m, b->tokens, b->positions, b->segments, b->B, b->T, err);
    if (!st) st = mt_model_cross_entropy(m, b->targets, 0, &loss, &count, err);
    if (st) return st;
    p->weighted += (double)loss * (double)count; /* token-weighted, not batch-weighted */
    p->result->tokens += count;
    p->result->examples += info->examples;
    return MT_OK;
}

mt_status mt_evaluate(mt_model *m, const mt_example_set *examples, int B, int T, int int8,
                      mt_eval_result *result, mt_error *err) {
    *result = (mt_eval_result){0};
    if (examples->paired) {
        char where[600];
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: evaluation: the set holds preference pairs, whose loss is a "
                            "preference loss's: evaluate them in a recipe with "
                            "mt.evaluate(model, pairs, {loss = mt.plugin(\"loss\", \"dpo\", {})})",
                            examples->n ? mt_example_where(examples, examples->ex[0].file,
                                                           examples->ex[0].line, where, sizeof where)
                                        : "(empty)");
    }
    ce_pass p = {result, 0.0};
    double seconds = 0.0;
    int64_t seen = 0;
    mt_status st = each_batch(m, examples, B, T, int8, &result->int8, visit_cross_entropy, &p,
                              &seconds, &seen, err);
    if (!st) st = reduce_sums(result, &p.weighted, NULL, &seen, err);
    if (st) return st;
    finish(result, seconds, seen);
    result->loss = result->tokens ? p.weighted / (double)result->tokens : 0.0;
    result->perplexity = exp(result->loss);
    return MT_OK;
}

typedef struct loss_pass {
    mt_eval_result *result;
    mt_plugin_instance *loss;
    double weighted, metrics[MT_LOSS_MAX_METRICS];
} loss_pass;

static mt_status visit_loss(void *ctx, mt_model *m, const mt_batch *b, const mt_batch_info *info,
                            size_t first, mt_error *err) {
    (void)first;
    loss_pass *p = ctx;
    const mt_loss_vtable *lv = p->loss->desc->vtable;
    const int64_t items = mt_loss_count(p->loss, b);
    if (items <= 0) return MT_OK;
    mt_loss_result r = {.size = sizeof r};
    mt_status st = lv->compute(p->loss->state, (mt_model_handle *)m, b, 0, &r, err);
    mt_error check_err;
    mt_status cst = mt_host_check(p->loss->desc->name, &check_err);
    if (!st && cst) {
        *err = check_err;
        st = cst;
    }
    if (st) return st;
    mt_eval_result *res = p->result;
    if (r.n_metrics < 0 || r.n_metrics > MT_LOSS_MAX_METRICS)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "loss %s reported %d metrics (at most %d)",
                            p->loss->desc->name, r.n_metrics, MT_LOSS_MAX_METRICS);
    if (res->examples == 0) {
        res->n_metrics = r.n_metrics;
        for (int k = 0; k < r.n_metrics; k++)
            snprintf(res->metric_names[k], sizeof res->metric_names[k], "%s",
                     r.metric_names[k] ? r.metric_names[k] : "?");
    } else if (r.n_metrics != res->n_metrics) {
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "loss %s reported %d metrics for one batch and %d for another",
                            p->loss->desc->name, res->n_metrics, r.n_metrics);
    }
    /* each batch's values are means over its items: weigh them by the items */
    p->weighted += r.loss * (double)items;
    for (int k = 0; k < r.n_metrics; k++) p->metrics[k] += r.metrics[k] * (double)items;
    res->tokens += items;
    res->examples += info->examples;
    return MT_OK;
}

mt_status mt_evaluate_loss(mt_model *m, mt_plugin_instance *loss, const mt_example_set *examples,
                           int B, int T, int int8, mt_eval_result *result, mt_error *err) {
    *result = (mt_eval_result){0};
    if (loss->desc->kind != MT_PLUGIN_LOSS)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "evaluation: %s '%s' is not a loss",
                            mt_plugin_kind_name(loss->desc->kind), loss->desc->name);
    loss_pass p = {.result = result, .loss = loss};
    double seconds = 0.0;
    int64_t seen = 0;
    mt_status st = each_batch(m, examples, B, T, int8, &result->int8, visit_loss, &p, &seconds,
                              &seen, err);
    if (!st) st = reduce_sums(result, &p.weighted, p.metrics, &seen, err);
    if (st) return st;
    finish(result, seconds, seen);
    const double items = result->tokens > 0 ? (double)result->tokens : 1.0;
    result->loss = p.weighted / items;
    for (int k = 0; k < result->n_metrics; k++) result->metrics[k] = p.metrics[k] / items;
    const mt_loss_vtable *lv = loss->desc->vtable;
    result->perplexity = MT_VTABLE_HAS(mt_loss_vtable, lv, count) ? NAN : exp(result->loss);
    return MT_OK;
}

typedef struct ref_pass {
    mt_example_set *examples;
    double *row_logp; /* B: each row's log-probability */
    int share_prefix;
    /* the chosen rows of a shared batch (at most B/2 x T each): tokens, positions,
     * segments, the chosen targets, the rejected targets */
    int32_t *half;
    double *half_logp; /* 2 x B/2: the chosen rows', then the rejected rows' */
    int64_t shared;
} ref_pass;

/* Whether pair i's rejected row (2i + 1) has its chosen row's tokens, positions and
 * segments up to its last target: a causal model then gives both rows the same hidden
 * states there, so the chosen row's forward scores the rejected reply too. A rejected
 * row without a target shares trivially (its log-probability is 0). */
static int rejected_within_chosen(const mt_batch *b, int i) {
    const int32_t *tc = b->tokens + (size_t)(2 * i) * b->T, *tr = tc + b->T;
    const int32_t *pc = b->positions + (size_t)(2 * i) * b->T, *pr = pc + b->T;
    const int32_t *sc = b->segments + (size_t)(2 * i) * b->T, *sr = sc + b->T;
    const int32_t *target = b->targets + (size_t)(2 * i + 1) * b->T;
    int last = -1;
    for (int t = 0; t < b->T; t++)
        if (target[t] >= 0) last = t;
    for (int t = 0; t <= last; t++)
        if (tr[t] != tc[t] || pr[t] != pc[t] || sr[t] != sc[t]) return 0;
    return 1;
}

/* Runs the chosen rows of the batch's n_pairs pairs alone and puts both replies'
 * log-probabilities in p->row_logp (rows 2i, 2i + 1). */
static mt_status ref_shared(ref_pass *p, mt_model *m, const mt_batch *b, int n_pairs,
                            mt_error *err) {
    const size_t T = (size_t)b->T, plane = (size_t)(b->B / 2) * T;
    int32_t *tokens = p->half, *positions = tokens + plane, *segments = positions + plane;
    int32_t *chosen = segments + plane, *rejected = chosen + plane;
    for (int i = 0; i < n_pairs; i++) {
        const size_t c = (size_t)(2 * i) * T, h = (size_t)i * T;
        memcpy(tokens + h, b->tokens + c, T * sizeof *tokens);
        memcpy(positions + h, b->positions + c, T * sizeof *positions);
        memcpy(segments + h, b->segments + c, T * sizeof *segments);
        memcpy(chosen + h, b->targets + c, T * sizeof *chosen);
        memcpy(rejected + h, b->targets + c + T, T * sizeof *rejected);
    }
    double *lc = p->half_logp, *lr = lc + b->B / 2;
    mt_status st = mt_model_forward(m, tokens, positions, segments, n_pairs, b->T, err);
    if (!st) st = mt_model_sequence_logps(m, chosen, lc, err);
    if (!st) st = mt_model_sequence_logps(m, rejected, lr, err);
    if (st) return st;
    for (int i = 0; i < n_pairs; i++) {
        p->row_logp[2 * i] = lc[i];
        p->row_logp[2 * i + 1] = lr[i];
    }
    p->shared += n_pairs;
    return MT_OK;
}

static mt_status visit_ref(void *ctx, mt_model *m, const mt_batch *b, const mt_batch_info *info,
                           size_t first, mt_error *err) {
    ref_pass *p = ctx;
    /* the batch's real pairs: padding pairs (the epoch's last batch) hold no target */
    const int n_pairs = (info->examples + 1) / 2;
    int share = p->share_prefix && n_pairs > 0;
    for (int i = 0; share && i < n_pairs; i++) share = rejected_within_chosen(b, i);
    mt_status st;
    if (share) {
        st = ref_shared(p, m, b, n_pairs, err);
    } else {
        st = mt_model_forward(m, b->tokens, b->positions, b->segments, b->B, b->T, err);
        if (!st) st = mt_model_sequence_logps(m, b->targets, p->row_logp, err);
    }
    if (st) return st;
    /* unpacked and in order: row r holds example first * (1 or 2) + r */
    const size_t ex0 = p->examples->paired ? 2 * first : first;
    for (int r = 0; r < info->examples; r++) {
        if (!isfinite(p->row_logp[r]))
            return mt_error_set(err, MT_ERR_NUMERIC,
                                "reference log-probabilities: not finite for example %zu",
                                ex0 + (size_t)r);
        p->examples->ex[ex0 + (size_t)r].ref_logp = p->row_logp[r];
    }
    return MT_OK;
}

mt_status mt_examples_ref_logps(mt_model *m, mt_example_set *examples, int B, int T,
                                int share_prefix, int64_t *shared, mt_error *err) {
    if (shared) *shared = 0;
    if (!examples->paired)
        return mt_error_set(err, MT_ERR_UNSUPPORTED,
                            "reference log-probabilities are for preference pairs; this set "
                            "holds single examples");
    const size_t rows = (size_t)(B > 2 ? B : 2), half = rows / 2 * (size_t)(T > 0 ? T : 1);
    ref_pass p = {.examples = examples, .share_prefix = share_prefix,
                  .row_logp = mt_malloc(2 * rows * sizeof(double), "ref logps", err),
                  .half = share_prefix ? mt_malloc(5 * half * sizeof(int32_t), "ref logps", err) : NULL};
    if (!p.row_logp || (share_prefix && !p.half)) {
        free(p.row_logp);
        free(p.half);
        return MT_ERR_NOMEM;
    }
    p.half_logp = p.row_logp + rows;
    double seconds = 0.0;
    int64_t seen = 0;
    examples->has_ref_logps = 0;
    /* data parallel: each rank fills its batches' examples, the others stay 0, and the
     * sum over the ranks is every example's value */
    for (size_t i = 0; i < examples->n; i++) examples->ex[i].ref_logp = 0.0;
    /* pairs are batched unpacked, so that a row is one example */
    int int8_used; /* the reference stays fp32 */
    mt_status st = each_batch(m, examples, B, T, 0, &int8_used, visit_ref, &p, &seconds, &seen,
                              err);
    free(p.row_logp);
    free(p.half);
    if (!st && shared && mt_dist_size() > 1) {
        double count = (double)p.shared;
        st = mt_dist_sum_f64(&count, 1, err);
        p.shared = (int64_t)count;
    }
    if (!st && shared) *shared = p.shared;
    if (!st && mt_dist_size() > 1) {
        double *all = mt_malloc((examples->n ? examples->n : 1) * sizeof *all, "ref logps", err);
        if (!all) return MT_ERR_NOMEM;
        for (size_t i = 0; i < examples->n; i++) all[i] = examples->ex[i].ref_logp;
        st = mt_dist_sum_f64(all, examples->n, err);
        for (size_t i = 0; !st && i < examples->n; i++) examples->ex[i].ref_logp = all[i];
        free(all);
    }
    if (!st) examples->has_ref_logps = 1;
    return st;
}
