/* cmd_bench.c — `moontune bench [--shape NAME | --config PATH | --model PATH] [options]`. */
#include "cli/cmd_bench.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h"
#include "base/numparse.h"
#include "cli/bench.h"
#include "cli/cli_args.h"
#include "model/model.h"
#include "plugin/options.h"


static void usage(FILE *out) {
    fprintf(out,
            "usage: moontune bench [--shape NAME | --config config.json | --model PATH]\n"
            "                      [options]\n"
            "\n"
            "Runs forward+backward steps of a Llama-family model with random weights (or a\n"
            "real model's) and reports tokens/s, achieved GFLOP/s (matrix-product FLOPs)\n"
            "and peak memory.\n"
            "\n"
            "  --shape NAME     tiny | smollm2-135m | llama-1b          (default tiny)\n"
            "  --config PATH    a Hugging Face config.json instead of a named shape\n"
            "  --model PATH     a model's weights instead (a .gguf file or a Hugging Face\n"
            "                   directory): a Q4 GGUF's blocks keep their 4-bit codes in\n"
            "                   int8 generation, random weights do not\n"
            "  --batch N        rows per batch, per rank under mpirun    (default 4)\n"
            "  --seq N          tokens per row                          (default 256)\n"
            "  --prompt N       the first N tokens of each row have no target, as a\n"
            "                   prompt (tokens/s still counts them)     (default 0)\n"
            "  --mode MODE      frozen (input gradients only) | full (every weight\n"
            "                   trainable) | both                       (default both)\n"
            "  --steps N        timed steps                             (default 3)\n"
            "  --warmup N       untimed steps first                     (default 1)\n"
            "  --device D       cpu | cuda (default: cuda where a CUDA device is usable, else cpu)\n"
            "  --threads N      CPU threads (default: OpenMP's, i.e. OMP_NUM_THREADS or all cores)\n"
            "  --adapter NAME   attach an adapter plugin (lora, qlora, full) instead of --mode\n"
            "  --adapter-option KEY=VALUE   an option of that adapter (repeatable), e.g.\n"
            "                   target_modules=all-linear, r=16\n"
            "  --generate N     instead of training steps: greedy generation of N tokens\n"
            "                   for each of --batch prompts of --seq random ids, all\n"
            "                   sequences together (continuous batching); reports the\n"
            "                   prompts' and the generated tokens' rates\n"
            "  --fp32           with --generate: every product in fp32 (default: the\n"
            "                   weights in int8 where the CPU has AVX512-VNNI or AVX2)\n"
            "  --int8 MODE      training steps: the frozen weights' products in int8 where\n"
            "                   the CPU has AVX512-VNNI (AVX2: a Q4 base's forward, with\n"
            "                   --model), as a recipe's train_int8: forward\n"
            "                   (the forward only) or all (input gradients too); default\n"
            "                   fp32\n"
            "  --recompute MODE training steps: what backward recomputes instead of\n"
            "                   keeping (a recipe's recompute): off | norms (the norms'\n"
            "                   outputs and SwiGLU's product) | layers (whole layers:\n"
            "                   gradient checkpointing)                 (default norms)\n");
}

enum { OPT_SHAPE = 256, OPT_CONFIG, OPT_MODEL, OPT_MODE, OPT_BATCH, OPT_SEQ, OPT_STEPS, OPT_WARMUP,
       OPT_THREADS, OPT_ADAPTER, OPT_ADAPTER_OPTION, OPT_PROMPT, OPT_GENERATE, OPT_FP32,
       OPT_INT8, OPT_RECOMPUTE };

static const struct option options[] = {
    {"help", no_argument, NULL, MT_CLI_HELP},
    {"shape", required_argument, NULL, OPT_SHAPE},
    {"config", required_argument, NULL, OPT_CONFIG},
    {"model", required_argument, NULL, OPT_MODEL},
    {"mode", required_argument, NULL, OPT_MODE},
    {"batch", required_argument, NULL, OPT_BATCH},
    {"seq", required_argument, NULL, OPT_SEQ},
    {"prompt", required_argument, NULL, OPT_PROMPT},
    {"steps", required_argument, NULL, OPT_STEPS},
    {"warmup", required_argument, NULL, OPT_WARMUP},
    {"threads", required_argument, NULL, OPT_THREADS},
    {"adapter", required_argument, NULL, OPT_ADAPTER},
    {"adapter-option", required_argument, NULL, OPT_ADAPTER_OPTION},
    {"generate", required_argument, NULL, OPT_GENERATE},
    {"fp32", no_argument, NULL, OPT_FP32},
    {"int8", required_argument, NULL, OPT_INT8},
    {"recompute", required_argument, NULL, OPT_RECOMPUTE},
    MT_CLI_DEVICE_OPTION,
    {NULL, 0, NULL, 0},
};

int mt_cmd_bench(int argc, char **argv) {
    mt_bench_options opt = {.shape = "tiny", .batch = 4, .seq = 256, .steps = 3, .warmup = 1,
                            .mode = MT_BENCH_BOTH, .recompute = MT_RECOMPUTE_NORMS};
    const mt_cli_number numbers[] = {
        {OPT_BATCH, MT_CLI_INT, &MT_LIMIT_BATCH, &opt.batch},
        {OPT_SEQ, MT_CLI_INT, &MT_LIMIT_SEQ_LEN, &opt.seq},
        {OPT_PROMPT, MT_CLI_INT, &MT_LIMIT_PROMPT_TOKENS, &opt.prompt},
        {OPT_STEPS, MT_CLI_INT, &MT_LIMIT_BENCH_STEPS, &opt.steps},
        {OPT_WARMUP, MT_CLI_INT, &MT_LIMIT_BENCH_WARMUP, &opt.warmup},
        {OPT_THREADS, MT_CLI_INT, &MT_LIMIT_THREADS, &opt.threads},
        {OPT_GENERATE, MT_CLI_INT, &MT_LIMIT_MAX_NEW_TOKENS, &opt.generate},
    };
    const mt_cli cli = {"moontune bench", options, usage, numbers, sizeof numbers / sizeof *numbers};
    static mt_cli_adapter_options adapter_options; /* static: 2.5 KiB, off the stack */
    adapter_options.n = 0;
    mt_error err = {0};
    const char *v, *flag;
    int c;
    mt_cli_begin();
    while ((c = mt_cli_next(&cli, argc, argv, &v, &flag)) != -1) {
        switch (c) {
        case MT_CLI_HELP: return 0;
        case MT_CLI_REFUSED: return 2;
        case MT_CLI_POSITIONAL:
            fprintf(stderr, "moontune bench: unexpected argument '%s'\n", v);
            usage(stderr);
            return 2;
        case OPT_SHAPE:
            opt.shape = v;
            opt.config_path = opt.model_path = NULL;
            break;
        case OPT_CONFIG:
            opt.config_path = v;
            opt.model_path = NULL;
            break;
        case OPT_MODEL:
            opt.model_path = v;
            opt.config_path = NULL;
            break;
        case OPT_MODE:
            if (!strcmp(v, "frozen")) opt.mode = MT_BENCH_FROZEN;
            else if (!strcmp(v, "full")) opt.mode = MT_BENCH_FULL;
            else if (!strcmp(v, "both")) opt.mode = MT_BENCH_BOTH;
            else {
                fprintf(stderr, "moontune bench: --mode expects frozen, full or both, got \"%s\"\n", v);
                return 2;
            }
            break;
        case OPT_ADAPTER: opt.adapter = v; break;
        case OPT_FP32: opt.fp32 = 1; break;
        case OPT_INT8:
            if (!strcmp(v, "forward")) opt.int8 = MT_INT8_FORWARD;
            else if (!strcmp(v, "all")) opt.int8 = MT_INT8_ALL;
            else {
                fprintf(stderr, "moontune bench: --int8 expects forward or all, got \"%s\"\n", v);
                return 2;
            }
            break;
        case OPT_RECOMPUTE: {
            mt_recompute mode;
            if (!mt_recompute_parse(v, &mode)) {
                fprintf(stderr, "moontune bench: --recompute expects off, norms or layers, got \"%s\"\n", v);
                return 2;
            }
            opt.recompute = mode;
            break;
        }
        case MT_CLI_DEVICE: opt.device = v; break;
        case OPT_ADAPTER_OPTION:
            if (mt_cli_adapter_option(&adapter_options, flag, v, &err)) goto refused;
            break;
        }
    }
    opt.adapter_options = adapter_options.kv;
    opt.n_adapter_options = adapter_options.n;
    if (mt_bench_run(&opt, &err)) {
        fprintf(stderr, "moontune bench: %s\n", err.msg);
        return 1;
    }
    return 0;
refused:
    fprintf(stderr, "moontune bench: %s\n", err.msg);
    return 2;
}
