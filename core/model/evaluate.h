/* evaluate.h — one evaluation pass: mean token cross-entropy and perplexity over a
 * held-out set (the mechanism; when to evaluate and what else to measure is the
 * recipe's policy). */
#ifndef MT_CORE_EVALUATE_H
#define MT_CORE_EVALUATE_H

#include "text/dataset.h"
#include "model/model.h"
#include "plugin/registry.h"

typedef struct mt_eval_result {
    double loss;       /* mean cross-entropy per trained token */
    double perplexity; /* exp(loss) */
    int64_t tokens;    /* trained tokens evaluated */
    int64_t examples;
    double seconds;
    double tokens_per_second; /* all tokens run through the model per second */
    int int8; /* projections that multiplied in int8 (the int8 argument), 0: all fp32 */
    /* mt_evaluate_loss: the loss plugin's metrics, item-weighted means */
    int n_metrics;
    char metric_names[MT_LOSS_MAX_METRICS][64];
    double metrics[MT_LOSS_MAX_METRICS];
} mt_eval_result;

/* Runs every example of `examples` once, in order, packed into rows of B x T (the
 * model must be planned for at least that), without gradients and with adapters in
 * evaluation mode (no dropout). With int8, the frozen base's projections multiply
 * through the int8 copies a training step's forward uses (mt_model_set_int8_training;
 * with int8 training off, copies of W are made for this pass and freed after it), so the
 * loss is the function int8 training optimises; where the backend offers no copy for a
 * projection (kernels/backend.h) it stays fp32. Without int8, fp32 throughout. */
mt_status mt_evaluate(mt_model *m, const mt_example_set *examples, int B, int T, int int8,
                      mt_eval_result *result, mt_error *err);

/* The same pass through a loss plugin (no gradient): loss and metrics are the means over
 * the loss' items (its count: pairs for dpo), so a held-out set of preference pairs
 * reports the preference metrics. tokens counts the items; perplexity is exp(loss)
 * only when the loss counts target tokens (no count slot), else NAN. A paired set is
 * batched pair by pair in rows of B (rounded down to even, at least 2); int8 as for
 * mt_evaluate. */
mt_status mt_evaluate_loss(mt_model *m, mt_plugin_instance *loss, const mt_example_set *examples,
                           int B, int T, int int8, mt_eval_result *result, mt_error *err);

/* Sets every example's ref_logp to its log-probability under the model as it is now
 * (adapters on, no dropout), batch by batch in rows of B x T, and marks the set
 * has_ref_logps: the reference of preference training, computed once before it.
 * With share_prefix, a batch whose rejected rows are each a prefix of their chosen row
 * up to their last target (rejected_until = "first_difference") runs the chosen rows
 * alone and scores both replies from them: half the rows, the same values up to
 * rounding. *shared (optional) receives how many rejected sequences were scored so,
 * summed over the ranks. */
mt_status mt_examples_ref_logps(mt_model *m, mt_example_set *examples, int B, int T,
                                int share_prefix, int64_t *shared, mt_error *err);

#endif
