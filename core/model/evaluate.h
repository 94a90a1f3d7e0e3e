/* evaluate.h — one evaluation pass: mean token cross-entropy and perplexity over a
 * held-out set (the mechanism; when to evaluate and what else to measure is the
 * recipe's policy). */
#ifndef MT_CORE_EVALUATE_H
#define MT_CORE_EVALUATE_H

#include "text/dataset.h"
#include "model/model.h"

typedef struct mt_eval_result {
    double loss;       /* mean cross-entropy per trained token */
    double perplexity; /* exp(loss) */
    int64_t tokens;    /* trained tokens evaluated */
    int64_t examples;
    double seconds;
    double tokens_per_second; /* all tokens run through the model per second */
} mt_eval_result;

/* Runs every example of `examples` once, in order, packed into rows of B x T (the
 * model must be planned for at least that), without gradients and with adapters in
 * evaluation mode (no dropout). */
mt_status mt_evaluate(mt_model *m, const mt_example_set *examples, int B, int T,
                      mt_eval_result *result, mt_error *err);

#endif
