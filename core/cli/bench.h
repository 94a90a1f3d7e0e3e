/* bench.h — `moontune bench`: forward+backward throughput on random weights. */
#ifndef MT_CORE_BENCH_H
#define MT_CORE_BENCH_H

#include "moontune/moontune.h"

typedef enum mt_bench_mode {
    MT_BENCH_FROZEN = 1, /* every weight frozen: input gradients only */
    MT_BENCH_FULL = 2,   /* every weight trainable: full fine-tuning gradients */
    MT_BENCH_BOTH = 3,
} mt_bench_mode;

typedef struct mt_bench_options {
    const char *shape;       /* "tiny", "smollm2-135m", "llama-1b"; or NULL with config_path */
    const char *config_path; /* a config.json */
    const char *model_path;  /* a .gguf file or Hugging Face directory: its weights, not
                                random ones (overrides shape and config_path) */
    int batch, seq, steps, warmup, threads;
    int prompt; /* the first `prompt` positions of each row have no target */
    int generate; /* > 0: instead of training steps, generate this many tokens for each of
                     `batch` prompts of `seq` ids (mt_generate_batch, greedy) */
    int fp32;     /* generation: every product in fp32 instead of int8 weights */
    int int8;     /* training steps: an mt_int8_training (model/model.h), the frozen
                     projections' products in int8 (0: fp32) */
    int recompute; /* training steps: an mt_recompute (model/model.h), what backward
                      recomputes instead of keeping */
    const char *device; /* "cpu", "cuda" or NULL for the default (store/session.h) */
    mt_bench_mode mode;
    /* an adapter plugin to attach (e.g. "lora", "qlora") instead of the modes above */
    const char *adapter;
    const struct mt_kv *adapter_options;
    size_t n_adapter_options;
} mt_bench_options;

/* Runs the benchmark and prints a report to stdout. */
mt_status mt_bench_run(const mt_bench_options *opt, mt_error *err);

/* Peak resident memory of this process in bytes (VmHWM), 0 when unknown. */
size_t mt_peak_rss_bytes(void);

#endif
