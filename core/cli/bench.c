/* bench.c — forward+backward steps on random weights for a named shape or a
 * config.json, reporting tokens/s, achieved GFLOP/s and memory. Numbers are
 * reported, never asserted: timing belongs in benchmarks, not tests. */
#include "cli/bench.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h"
#include "dist/dist.h"
#include "model/generate.h"
#include "model/model.h"
#include "model/train.h"
#include "store/session.h"

size_t mt_peak_rss_bytes(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return 0;
    char line[256];
    size_t kb = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %zu kB", &kb) == 1) break;
    fclose(f);
    return kb * 1024;
}

static double mib(size_t bytes) { return (double)bytes / (1024.0 * 1024.0); }

/* Times forward + loss + backward steps with whatever is trainable now. backward_linear
 * is how many times the linear layers' FLOPs the backward costs (1: input gradients
 * only; 2: also weight gradients). In a data-parallel job (mpirun) each rank runs its
 * B rows and the step ends with the gradients' all-reduce, as in training; tokens/s
 * and GFLOP/s are the job's, over all ranks. */
static mt_status bench_steps(mt_model *m, const mt_bench_options *opt, const char *label,
                             double backward_linear, const int32_t *tokens,
                             const int32_t *targets, mt_error *err) {
    const int B = opt->batch, T = opt->seq;
    double linear, attention;
    mt_model_forward_flops(&m->cfg, B, T, &linear, &attention);
    /* backward: attention costs twice its forward */
    double step_flops = linear + attention + 2.0 * attention + backward_linear * linear;
    double t_total = 0.0, loss_sum = 0.0, t_reduce = 0.0;
    int64_t reduced = 0;
    mt_status st = MT_OK;
    /* as mt_train_step does; the copies are made in the first (warm-up) step */
    mt_model_set_int8_training(m, (mt_int8_training)opt->int8);
    for (int s = 0; s < opt->warmup + opt->steps && !st; s++) {
        double t0 = mt_now_seconds();
        float loss;
        mt_model_zero_grad(m);
        const int in_int8 = mt_model_int8_attach(m);
        if (s == 0 && opt->int8) printf("%-22s %d projections in int8\n", label, in_int8);
        if (!(st = mt_model_forward(m, tokens, NULL, NULL, B, T, err)) &&
            !(st = mt_model_cross_entropy(m, targets, 1, &loss, NULL, err)))
            st = mt_model_backward(m, err);
        mt_model_int8_detach(m);
        if (st) break;
        double t1 = mt_now_seconds();
        if (mt_dist_size() > 1 && (st = mt_train_allreduce_grads(m, &reduced, err))) return st;
        double dt = mt_now_seconds() - t0;
        if (s >= opt->warmup) {
            t_total += dt;
            t_reduce += mt_now_seconds() - t1;
            loss_sum += loss;
        }
    }
    mt_model_set_int8_training(m, MT_INT8_OFF);
    if (st) return st;
    double per_step = t_total / opt->steps, ranks = mt_dist_size();
    printf("%-22s %10.1f tokens/s %9.1f GFLOP/s %8.3f s/step  loss %.4f  peak RSS %.0f MiB\n",
           label, ranks * B * T / per_step, ranks * step_flops / per_step * 1e-9, per_step,
           loss_sum / opt->steps, mib(mt_peak_rss_bytes()));
    if (ranks > 1)
        printf("%-22s %d ranks of %d rows: all-reduce of %.2f MiB of gradients per step, %.1f ms "
               "(%.1f%% of the step)\n",
               "", mt_dist_size(), B, mib((size_t)reduced), 1e3 * t_reduce / opt->steps,
               100.0 * t_reduce / t_total);
    return MT_OK;
}

/* Greedy generation of opt->generate tokens for each of B prompts (tokens: B rows of T
 * ids), all of them at once, as an evaluation generates: the prompts' rate (prefill) and
 * the generated tokens' rate (decoding), from the time mt_generate_batch books to each. */
static mt_status bench_generate(mt_model *m, const mt_bench_options *opt, const int32_t *tokens,
                                mt_error *err) {
    const int B = opt->batch, T = opt->seq;
    const int32_t **prompts = mt_calloc((size_t)B, sizeof *prompts, "prompt list", err);
    int *lengths = mt_calloc((size_t)B, sizeof *lengths, "prompt lengths", err);
    mt_generation *out = mt_calloc((size_t)B, sizeof *out, "generations", err);
    mt_status st = prompts && lengths && out ? MT_OK : MT_ERR_NOMEM;
    for (int b = 0; !st && b < B; b++) {
        prompts[b] = tokens + (size_t)b * T;
        lengths[b] = T;
    }
    const mt_generate_options gen = {.max_new_tokens = opt->generate, .fp32 = opt->fp32};
    const double t0 = mt_now_seconds();
    if (!st) st = mt_generate_batch(m, NULL, prompts, lengths, B, B, &gen, out, err);
    const double seconds = mt_now_seconds() - t0;
    if (!st) {
        double prefill = 0.0, decode = 0.0;
        long generated = 0;
        for (int b = 0; b < B; b++) {
            prefill += out[b].prefill_seconds;
            decode += out[b].decode_seconds;
            generated += out[b].n_ids;
        }
        /* each sequence's first token comes with its prompt; the others are decoded */
        printf("generate: %d prompts of %d ids, %ld tokens in %.2f s: prompts %.1f tokens/s, "
               "decoding %.1f tokens/s (%d rows a step), %.1f generated tokens/s overall; "
               "%d projections in int8; peak RSS %.0f MiB\n",
               B, T, generated, seconds, (double)B * T / prefill,
               decode > 0.0 ? (double)(generated - B) / decode : 0.0, /* --generate 1: none */
               B, (double)generated / seconds, out[0].int8, mib(mt_peak_rss_bytes()));
    }
    for (int b = 0; out && b < B; b++) mt_generation_free(&out[b]);
    free(prompts);
    free(lengths);
    free(out);
    return st;
}

mt_status mt_bench_run(const mt_bench_options *opt, mt_error *err) {
    mt_model_config cfg;
    mt_status st = opt->model_path    ? MT_OK /* the model's own, once loaded */
                   : opt->config_path ? mt_config_load(opt->config_path, &cfg, err)
                                      : mt_config_preset(opt->shape ? opt->shape : "tiny", &cfg, err);
    if (st) return st;
    if (opt->batch <= 0 || opt->seq <= 0 || opt->steps <= 0 || opt->warmup < 0)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "batch, seq and steps must be positive, warmup non-negative");
    if (opt->prompt < 0 || opt->prompt >= opt->seq)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "--prompt %d: a prompt must leave targets in a row of %d tokens",
                            opt->prompt, opt->seq);
    /* the adapter is attached after the model, to report the memory it adds */
    const mt_session_options so = {.device = opt->device, .threads = opt->threads,
                                   .model_path = opt->model_path,
                                   .config = opt->model_path ? NULL : &cfg,
                                   .random_seed = 1234, .random_std = 0.02f};
    mt_session *ses = NULL;
    if ((st = mt_session_open(&so, &ses, err))) return st;
    mt_model *m = ses->model;
    if (opt->model_path) cfg = m->cfg;
    int32_t *tokens = NULL, *targets = NULL;
    size_t rss_before_adapter = mt_peak_rss_bytes();
    if (opt->adapter && (st = mt_session_attach_adapter(ses, opt->adapter, opt->adapter_options,
                                                        opt->n_adapter_options, err)))
        goto done;
    /* training steps need the activations planned; generation brings its own decoder */
    if (!opt->generate && ((st = mt_model_set_recompute(m, (mt_recompute)opt->recompute, err)) ||
                           (st = mt_model_plan(m, opt->batch, opt->seq, 0, err))))
        goto done;
    size_t BT = (size_t)opt->batch * opt->seq;
    tokens = mt_malloc(BT * sizeof(int32_t), "tokens", err);
    targets = mt_malloc(BT * sizeof(int32_t), "targets", err);
    if (!tokens || !targets) {
        st = MT_ERR_NOMEM;
        goto done;
    }
    uint64_t s = 42;
    for (size_t i = 0; i < BT; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        tokens[i] = (int32_t)((s >> 33) % (uint64_t)cfg.vocab_size);
    }
    for (size_t i = 0; i < BT; i++)
        targets[i] = (i + 1) % (size_t)opt->seq && i % (size_t)opt->seq >= (size_t)opt->prompt
                         ? tokens[i + 1] : -100;
    double linear, attention;
    mt_model_forward_flops(&cfg, opt->batch, opt->seq, &linear, &attention);
    char threads[96] = ""; /* the thread count and BLAS kernels mean something on the CPU only */
    if (ses->be.device == MT_DEVICE_CPU)
        snprintf(threads, sizeof threads, "%d threads, OpenBLAS %s kernels ", ses->be.num_threads,
                 mt_cpu_blas_core());
    char prompt[48] = "";
    if (opt->prompt > 0) snprintf(prompt, sizeof prompt, " (prompt %d: no target)", opt->prompt);
    printf("moontune bench: %s, %zu parameters, batch %d x sequence %d%s, %s(%s backend)\n",
           opt->model_path ? opt->model_path : opt->config_path ? opt->config_path : opt->shape,
           mt_config_num_params(&cfg), opt->batch,
           opt->seq, prompt, threads, ses->device);
    if (opt->generate > 0) {
        st = bench_generate(m, opt, tokens, err);
        goto done;
    }
    static const char *const recomputed[] = {"", " (recompute norms)", " (recompute layers)"};
    printf("forward: %.2f GFLOP (linear %.2f, attention %.2f); parameters %.1f MiB, "
           "activations %.1f MiB%s\n",
           (linear + attention) * 1e-9, linear * 1e-9, attention * 1e-9,
           mib(m->total_numel * sizeof(float)), mib(mt_model_plan_bytes(m)),
           recomputed[opt->recompute]);
    if (opt->adapter) {
        char label[64];
        snprintf(label, sizeof label, "adapter %s", opt->adapter);
        /* the base's weight gradients are not computed: count the frozen step's FLOPs
         * (the adapter's own small products are not counted) */
        if ((st = bench_steps(m, opt, label, 1.0, tokens, targets, err))) goto done;
        printf("peak resident memory %.1f MiB (%.1f MiB before the adapter attached)\n",
               mib(mt_peak_rss_bytes()), mib(rss_before_adapter));
        goto done;
    }
    if ((opt->mode & MT_BENCH_FROZEN) &&
        (st = bench_steps(m, opt, "input gradients only", 1.0, tokens, targets, err)))
        goto done;
    if ((opt->mode & MT_BENCH_FULL) &&
        (!(st = mt_model_set_all_trainable(m, err))) &&
        (st = bench_steps(m, opt, "full fine-tuning", 2.0, tokens, targets, err)))
        goto done;
    if (st) goto done;
    printf("gradients %.1f MiB (full fine-tuning only); peak resident memory %.1f MiB\n",
           opt->mode & MT_BENCH_FULL ? mib(m->total_numel * sizeof(float)) : 0.0,
           mib(mt_peak_rss_bytes()));
done:
    free(tokens);
    free(targets);
    mt_session_close(ses);
    return st;
}
