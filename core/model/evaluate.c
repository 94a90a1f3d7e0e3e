/* evaluate.c — held-out loss and perplexity. */
#include "model/evaluate.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h"

mt_status mt_evaluate(mt_model *m, const mt_example_set *examples, int B, int T,
                      mt_eval_result *result, mt_error *err) {
    *result = (mt_eval_result){0};
    if (examples->n == 0) {
        /* name the file and say why: every example was dropped, or there were none */
        char from[600], too_long[96] = "", no_target[96] = "", why[200] = "";
        const char *src = mt_example_set_source(examples, from, sizeof from);
        const long long n_long = examples->n_dropped_too_long, n_none = examples->n_dropped_no_target;
        if (n_long > 0)
            snprintf(too_long, sizeof too_long, "%lld example%s longer than seq_len %d dropped by "
                     "truncation \"drop\"", n_long, n_long == 1 ? "" : "s", examples->opt.seq_len);
        if (n_none > 0)
            snprintf(no_target, sizeof no_target, "%lld example%s with nothing to train on", n_none,
                     n_none == 1 ? "" : "s");
        if (n_long > 0 || n_none > 0)
            snprintf(why, sizeof why, " (%s%s%s)", too_long, n_long > 0 && n_none > 0 ? "; " : "",
                     no_target);
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s%sevaluation: the held-out set is empty%s",
                            src ? src : "", src ? ": " : "", why);
    }
    mt_batcher *batcher = NULL;
    mt_status st = mt_batcher_create(examples, B, T, 1, 0, 0, &batcher, err);
    if (st) return st;
    size_t n = (size_t)B * T;
    int32_t *buf = mt_malloc(4 * n * sizeof(int32_t), "evaluation batch", err);
    if (!buf) {
        mt_batcher_free(batcher);
        return MT_ERR_NOMEM;
    }
    int32_t *tokens = buf, *positions = buf + n, *segments = buf + 2 * n, *targets = buf + 3 * n;
    double t0 = mt_now_seconds(), weighted = 0.0;
    int64_t seen_tokens = 0;
    mt_model_set_training(m, 0);
    for (;;) {
        mt_batch_info info;
        float loss;
        int64_t count;
        if ((st = mt_batcher_next(batcher, tokens, positions, segments, targets, &info, err)) ||
            (st = mt_model_forward(m, tokens, positions, segments, B, T, err)) ||
            (st = mt_model_cross_entropy(m, targets, 0, &loss, &count, err)))
            break;
        weighted += (double)loss * (double)count; /* token-weighted, not batch-weighted */
        result->tokens += count;
        result->examples += info.examples;
        seen_tokens += info.tokens;
        if (info.epoch_end) break;
    }
    mt_model_set_training(m, 1);
    free(buf);
    mt_batcher_free(batcher);
    if (st) return st;
    result->seconds = mt_now_seconds() - t0;
    result->loss = result->tokens ? weighted / (double)result->tokens : 0.0;
    result->perplexity = exp(result->loss);
    result->tokens_per_second = result->seconds > 0 ? (double)seen_tokens / result->seconds : 0.0;
    return MT_OK;
}
