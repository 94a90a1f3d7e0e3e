/* test_data_pipeline.c — the batcher's packed rows through the model: every
 * example's loss in a packed batch equals its loss run alone (positions restart,
 * attention stays inside the example, targets never cross examples). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_kernels.h" /* cpu_int8_supported */
#include "text/dataset.h"
#include "model/evaluate.h"
#include "model/model.h"
#include "testutil.h"

#define B 2
#define T 24
#define N_EXAMPLES 7

/* The tiny GQA model on the CPU backend and an empty example set of rows of T. */
static mt_model *tiny_model_and_set(mt_backend *be, mt_example_set *set) {
    mt_error err = {0};
    assert_int_equal(mt_backend_cpu_init(be, 0, &err), MT_OK);
    mt_model *m = NULL;
    if (mt_model_load_hf(MT_FIXTURE_DIR "/tiny_gqa", be, &m, &err)) fail_msg("%s", err.msg);
    mt_example_options opt = {.seq_len = T, .truncation = MT_TRUNCATE_LEFT};
    assert_int_equal(mt_example_set_init(set, &opt, &err), MT_OK);
    return m;
}

static void tiny_down(mt_model *m, mt_backend *be, mt_example_set *set) {
    mt_example_set_free(set);
    mt_model_free(m);
    mt_backend_cpu_shutdown(be);
}

static void test_packed_loss_equals_alone(void **state) {
    (void)state;
    mt_error err = {0};
    mt_backend be;
    mt_example_set set;
    mt_model *m = tiny_model_and_set(&be, &set);
    const int V = m->cfg.vocab_size;
    uint64_t seed = 7;
    const int lens[N_EXAMPLES] = {5, 9, 4, 11, 6, 3, 8};
    for (int e = 0; e < N_EXAMPLES; e++) {
        int32_t ids[T];
        uint8_t trainable[T];
        for (int i = 0; i < lens[e]; i++) {
            ids[i] = (int32_t)(mt_test_rand_u64(&seed) % (uint64_t)V);
            trainable[i] = i >= lens[e] / 2; /* a "prompt" half and a "response" half */
        }
        assert_int_equal(mt_example_set_add(&set, ids, trainable, (size_t)lens[e], 0, e + 1, &err), MT_OK);
    }
    mt_batcher *batcher;
    assert_int_equal(mt_batcher_create(&set, B, T, 1, 3, 1, &batcher, &err), MT_OK);
    assert_int_equal(mt_model_plan(m, B, T, 0, &err), MT_OK);

    int32_t tokens[B * T], positions[B * T], segments[B * T], targets[B * T], masked[B * T];
    int seen = 0, packed_rows_with_two = 0;
    for (;;) {
        mt_batch_info info;
        assert_int_equal(mt_batcher_next(batcher, tokens, positions, segments, targets, NULL, &info, &err), MT_OK);
        assert_int_equal(mt_model_forward(m, tokens, positions, segments, B, T, &err), MT_OK);
        /* each (row, segment) holding a real example */
        for (int r = 0; r < B; r++) {
            int segs_in_row = 0;
            for (int t = 0; t < T; t++) {
                int i = r * T + t;
                if (positions[i] != 0 || (t > 0 && segments[i] == segments[i - 1])) continue;
                /* segment starting at t: its extent */
                int end = t;
                while (end < T && segments[r * T + end] == segments[i] &&
                       (end == t || positions[r * T + end] == positions[r * T + end - 1] + 1))
                    end++;
                int len = end - t;
                /* which example is it? (the ids identify it) */
                int match = -1;
                for (size_t e = 0; e < set.n && match < 0; e++)
                    if (set.ex[e].n == len && !memcmp(set.ex[e].ids, tokens + i, (size_t)len * 4))
                        match = (int)e;
                if (match < 0) continue; /* padding */
                segs_in_row++;
                for (int k = 0; k < B * T; k++) masked[k] = -100;
                memcpy(masked + i, targets + i, (size_t)len * sizeof(int32_t));
                float packed_loss, alone_loss;
                int64_t n_packed, n_alone;
                assert_int_equal(mt_model_cross_entropy(m, masked, 0, &packed_loss, &n_packed, &err), MT_OK);
                int32_t alone_targets[T];
                mt_example_targets(&set.ex[match], alone_targets);
                /* the example alone, then back to the packed batch for the next segment */
                assert_int_equal(mt_model_forward(m, set.ex[match].ids, NULL, NULL, 1, len, &err), MT_OK);
                assert_int_equal(mt_model_cross_entropy(m, alone_targets, 0, &alone_loss, &n_alone, &err), MT_OK);
                assert_int_equal(mt_model_forward(m, tokens, positions, segments, B, T, &err), MT_OK);
                assert_int_equal(n_packed, n_alone);
                double rel = fabs((double)packed_loss - alone_loss) / fabs((double)alone_loss);
                printf("example %d (line %lld, %d tokens, %lld targets): packed %.7f alone %.7f rel %.2g\n",
                       match, (long long)set.ex[match].line, len, (long long)n_alone, packed_loss,
                       alone_loss, rel);
                assert_true(rel < 1e-5);
                seen++;
            }
            packed_rows_with_two += segs_in_row >= 2;
        }
        if (info.epoch_end) break;
    }
    assert_int_equal(seen, N_EXAMPLES); /* every example exactly once in the epoch */
    assert_true(packed_rows_with_two > 0); /* the test did exercise packing */
    mt_batcher_free(batcher);
    tiny_down(m, &be, &set);
}

/* Adds random examples of the given lengths (their first two tokens a "prompt"). */
static void add_random_examples(mt_example_set *set, const int *lens, int n, int vocab,
                                uint64_t seed) {
    mt_error err = {0};
    for (int e = 0; e < n; e++) {
        int32_t ids[T];
        uint8_t trainable[T];
        for (int i = 0; i < lens[e]; i++) {
            ids[i] = (int32_t)(mt_test_rand_u64(&seed) % (uint64_t)vocab);
            trainable[i] = i >= 2;
        }
        assert_int_equal(mt_example_set_add(set, ids, trainable, (size_t)lens[e], 0, e + 1, &err), MT_OK);
    }
}

/* The token-weighted mean of each example's loss, run alone through the model as it is
 * (its projections attached to int8 copies or not); *count receives the tokens. */
static double loss_alone(mt_model *m, const mt_example_set *set, int64_t *count) {
    mt_error err = {0};
    double weighted = 0.0;
    *count = 0;
    for (size_t e = 0; e < set->n; e++) {
        int32_t targets[T];
        float loss;
        int64_t n;
        mt_example_targets(&set->ex[e], targets);
        assert_int_equal(mt_model_forward(m, set->ex[e].ids, NULL, NULL, 1, set->ex[e].n, &err), MT_OK);
        assert_int_equal(mt_model_cross_entropy(m, targets, 0, &loss, &n, &err), MT_OK);
        weighted += (double)loss * (double)n;
        *count += n;
    }
    return weighted / (double)*count;
}

/* mt_evaluate's loss is the token-weighted mean of each example's loss run alone, and
 * its perplexity the exponential of that. */
static void test_evaluate_is_token_weighted_mean(void **state) {
    (void)state;
    mt_error err = {0};
    mt_backend be;
    mt_example_set set;
    mt_model *m = tiny_model_and_set(&be, &set);
    const int lens[5] = {6, 13, 4, 9, 17};
    add_random_examples(&set, lens, 5, m->cfg.vocab_size, 11);
    assert_int_equal(mt_model_plan(m, B, T, 0, &err), MT_OK);
    int64_t total;
    const double alone = loss_alone(m, &set, &total);
    mt_eval_result r;
    assert_int_equal(mt_evaluate(m, &set, B, T, 0, &r, &err), MT_OK);
    printf("evaluate: loss %.7f over %lld tokens; token-weighted alone %.7f over %lld\n", r.loss,
           (long long)r.tokens, alone, (long long)total);
    assert_int_equal(r.tokens, total);
    assert_int_equal(r.examples, 5);
    assert_int_equal(r.int8, 0);
    assert_true(fabs(r.loss - alone) < 1e-5 * r.loss);
    assert_true(fabs(r.perplexity - exp(r.loss)) < 1e-9 * r.perplexity);
    tiny_down(m, &be, &set);
}

/* Puts every weight of the model's projections on a 4-bit grid per group of 32 inputs
 * (min + d · j, j in 0..15), as a GGUF's Q4 blocks hold them: AVX2 CPUs multiply such
 * weights in int8 in training (their small codes), VNNI ones any weight. */
static void weights_on_q4_grid(mt_model *m) {
    for (int i = 0; i < mt_model_linear_count(m); i++) {
        mt_linear *lin = mt_model_linear(m, i);
        for (int o = 0; o < lin->out; o++)
            for (int k0 = 0; k0 < lin->in; k0 += 32) {
                float *w = lin->weight + (size_t)o * lin->in + k0;
                const int n = lin->in - k0 < 32 ? lin->in - k0 : 32;
                float lo = w[0], hi = w[0];
                for (int k = 1; k < n; k++) {
                    lo = w[k] < lo ? w[k] : lo;
                    hi = w[k] > hi ? w[k] : hi;
                }
                const float d = (hi - lo) / 15.0f;
                for (int k = 0; d > 0.0f && k < n; k++) w[k] = lo + d * rintf((w[k] - lo) / d);
            }
    }
}

/* With int8, mt_evaluate multiplies the frozen base as a training step's int8 forward
 * does: its loss is each example's loss run alone through the int8 copies (as
 * mt_train_step attaches them), not the fp32 loss; with int8 training off the copies
 * are made for the pass and freed after it, with it on they are the model's and stay. */
static void test_evaluate_int8_is_training_forward(void **state) {
    (void)state;
    mt_error err = {0};
    mt_backend be;
    mt_example_set set;
    mt_model *m = tiny_model_and_set(&be, &set);
    weights_on_q4_grid(m);
    const int lens[6] = {7, 12, 5, 16, 9, 21};
    add_random_examples(&set, lens, 6, m->cfg.vocab_size, 23);
    assert_int_equal(mt_model_plan(m, B, T, 0, &err), MT_OK);
    const int projections = mt_model_linear_count(m);
    for (int i = 0; i < projections; i++) assert_null(mt_model_linear(m, i)->grad_weight);

    mt_eval_result fp, q8, kept;
    assert_int_equal(mt_evaluate(m, &set, B, T, 0, &fp, &err), MT_OK);
    assert_int_equal(fp.int8, 0);
    assert_int_equal(mt_evaluate(m, &set, B, T, 1, &q8, &err), MT_OK);
    assert_null(m->int8_copies); /* made for the pass, freed after it */
    assert_int_equal(m->int8_training, MT_INT8_OFF);
    if (!cpu_int8_supported()) {
        printf("  evaluate int8: this CPU has no int8 products; the pass stays fp32\n");
        assert_int_equal(q8.int8, 0);
        assert_true(q8.loss == fp.loss);
    } else {
        assert_int_equal(q8.int8, projections);
        /* the reference: each example alone through the copies a training step attaches */
        mt_model_set_int8_training(m, MT_INT8_FORWARD);
        assert_int_equal(mt_model_int8_attach(m), projections);
        int64_t count;
        const double alone = loss_alone(m, &set, &count);
        mt_model_int8_detach(m);
        assert_int_equal(q8.tokens, count);
        const double err_alone = fabs(q8.loss - alone) / alone;
        const double off_fp32 = fabs(q8.loss - fp.loss) / fp.loss;
        printf("  evaluate int8: loss %.7f, alone through the int8 copies %.7f (rel %.1e), "
               "fp32 %.7f (rel %.1e)\n", q8.loss, alone, err_alone, fp.loss, off_fp32);
        /* packed rows against one example a row: fp32's last bits (1e-5 in the fp32 test
         * above); the int8 rounding of the activations moves the loss far more */
        assert_true(err_alone < 1e-5);
        assert_true(off_fp32 > 20 * err_alone && off_fp32 > 1e-5);
        /* with int8 training on, the model's own copies: the same loss, and they stay */
        assert_non_null(m->int8_copies);
        assert_int_equal(mt_evaluate(m, &set, B, T, 1, &kept, &err), MT_OK);
        assert_int_equal(kept.int8, projections);
        assert_true(kept.loss == q8.loss);
        assert_non_null(m->int8_copies);
        assert_int_equal(m->int8_training, MT_INT8_FORWARD);
        for (int i = 0; i < projections; i++) assert_null(mt_model_linear(m, i)->weight_int8);
        /* and without int8 the same model evaluates in fp32 again */
        assert_int_equal(mt_evaluate(m, &set, B, T, 0, &kept, &err), MT_OK);
        assert_true(kept.loss == fp.loss && kept.int8 == 0);
        mt_model_set_int8_training(m, MT_INT8_OFF);
    }
    tiny_down(m, &be, &set);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_packed_loss_equals_alone),
                                       cmocka_unit_test(test_evaluate_is_token_weighted_mean),
                                       cmocka_unit_test(test_evaluate_int8_is_training_forward)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
