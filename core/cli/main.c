/* main.c — the `moontune` command. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/bench.h"
#include "cli/cmd_data.h"
#include "cli/cmd_eval.h"
#include "cli/cmd_generate.h"
#include "cli/cmd_plugins.h"
#include "cli/cmd_run.h"
#include "base/numparse.h"
#include "plugin/options.h"
#include "moontune/moontune.h"

static void usage(FILE *out) {
    fprintf(out,
            "moontune %s — fine-tune Llama-family language models\n"
            "\n"
            "usage: moontune COMMAND [options]\n"
            "\n"
            "commands:\n"
            "  run       run a Lua recipe: moontune run RECIPE.lua [--set k=v] [--resume] [--unsafe]\n"
            "  validate  everything short of training: config, plugins, data statistics, memory\n"
            "  ls        list the shipped recipes;  cp NAME DEST  copy one to edit\n"
            "  bench     forward+backward throughput on random weights (tokens/s, GFLOP/s, memory)\n"
            "  plugins   list the optimizer, loss, adapter and scheduler plugins found; --describe NAME\n"
            "  data      read, template and tokenize a dataset and print its statistics\n"
            "  generate  generate text from a model (GGUF or Hugging Face directory)\n"
            "  eval      held-out loss and perplexity of a model on a dataset\n"
            "  version   print the version\n"
            "  help      this text; `moontune COMMAND --help` for a command's options\n",
            MT_VERSION_STRING);
}

static void bench_usage(FILE *out) {
    fprintf(out,
            "usage: moontune bench [--shape NAME | --config config.json] [options]\n"
            "\n"
            "Runs forward+backward steps of a Llama-family model with random weights and\n"
            "reports tokens/s, achieved GFLOP/s (matrix-product FLOPs) and peak memory.\n"
            "\n"
            "  --shape NAME     tiny | smollm2-135m | llama-1b          (default tiny)\n"
            "  --config PATH    a Hugging Face config.json instead of a named shape\n"
            "  --batch N        rows per batch                          (default 4)\n"
            "  --seq N          tokens per row                          (default 256)\n"
            "  --mode MODE      frozen (input gradients only) | full (every weight\n"
            "                   trainable) | both                       (default both)\n"
            "  --steps N        timed steps                             (default 3)\n"
            "  --warmup N       untimed steps first                     (default 1)\n"
            "  --threads N      CPU threads (default: OpenMP's, i.e. OMP_NUM_THREADS or all cores)\n"
            "  --adapter NAME   attach an adapter plugin (lora, qlora, full) instead of --mode\n"
            "  --adapter-option KEY=VALUE   an option of that adapter (repeatable), e.g.\n"
            "                   target_modules=all-linear, r=16\n");
}

/* A bench value through the shared parser and limits (core/base/numparse.c). */
static int parse_int(const char *flag, const char *value, const mt_int_limit *lim, int *out) {
    mt_error err = {0};
    if (mt_parse_int_into(flag, value, lim, out, &err)) {
        fprintf(stderr, "moontune bench: %s\n", err.msg);
        return 0;
    }
    return 1;
}

/* KEY=VALUE into a plugin option: true/false, a number, or a string. */
static int parse_kv(const char *arg, mt_kv *kv) {
    const char *eq = strchr(arg, '=');
    if (!eq || eq == arg) return 0;
    static char keys[32][64];
    static int n_keys;
    if (n_keys == 32 || (size_t)(eq - arg) >= sizeof keys[0]) return 0;
    char *key = keys[n_keys++];
    memcpy(key, arg, (size_t)(eq - arg));
    key[eq - arg] = '\0';
    const char *value = eq + 1;
    char *end;
    double num = strtod(value, &end);
    *kv = (mt_kv){.key = key};
    if (!strcmp(value, "true") || !strcmp(value, "false")) {
        kv->type = MT_KV_BOOL;
        kv->boolean = !strcmp(value, "true");
    } else if (*value && !*end) {
        kv->type = MT_KV_NUMBER;
        kv->number = num;
    } else {
        kv->type = MT_KV_STRING;
        kv->string = value;
    }
    return 1;
}

static int cmd_bench(int argc, char **argv) {
    mt_bench_options opt = {.shape = "tiny", .batch = 4, .seq = 256, .steps = 3, .warmup = 1,
                            .mode = MT_BENCH_BOTH};
    mt_kv adapter_kv[32];
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            bench_usage(stdout);
            return 0;
        } else if (!strcmp(a, "--shape") && v) {
            opt.shape = v;
            opt.config_path = NULL;
        } else if (!strcmp(a, "--config") && v) {
            opt.config_path = v;
        } else if (!strcmp(a, "--mode") && v) {
            if (!strcmp(v, "frozen")) opt.mode = MT_BENCH_FROZEN;
            else if (!strcmp(v, "full")) opt.mode = MT_BENCH_FULL;
            else if (!strcmp(v, "both")) opt.mode = MT_BENCH_BOTH;
            else {
                fprintf(stderr, "moontune bench: --mode expects frozen, full or both, got \"%s\"\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--batch") && v) {
            if (!parse_int(a, v, &MT_LIMIT_BATCH, &opt.batch)) return 2;
        } else if (!strcmp(a, "--seq") && v) {
            if (!parse_int(a, v, &MT_LIMIT_SEQ_LEN, &opt.seq)) return 2;
        } else if (!strcmp(a, "--steps") && v) {
            if (!parse_int(a, v, &MT_LIMIT_BENCH_STEPS, &opt.steps)) return 2;
        } else if (!strcmp(a, "--warmup") && v) {
            if (!parse_int(a, v, &MT_LIMIT_BENCH_WARMUP, &opt.warmup)) return 2;
        } else if (!strcmp(a, "--threads") && v) {
            if (!parse_int(a, v, &MT_LIMIT_THREADS, &opt.threads)) return 2;
        } else if (!strcmp(a, "--adapter") && v) {
            opt.adapter = v;
        } else if (!strcmp(a, "--adapter-option") && v) {
            if (opt.n_adapter_options == 32 || !parse_kv(v, &adapter_kv[opt.n_adapter_options])) {
                fprintf(stderr, "moontune bench: --adapter-option expects KEY=VALUE, got \"%s\"\n", v);
                return 2;
            }
            opt.n_adapter_options++;
        } else {
            fprintf(stderr, "moontune bench: unknown option or missing value: %s\n", a);
            bench_usage(stderr);
            return 2;
        }
        i++;
    }
    opt.adapter_options = adapter_kv;
    mt_error err = {0};
    if (mt_bench_run(&opt, &err)) {
        fprintf(stderr, "moontune bench: %s\n", err.msg);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "run") || !strcmp(cmd, "validate")) return mt_cmd_run(argc - 1, argv + 1);
    if (!strcmp(cmd, "ls")) return mt_cmd_ls(argc - 1, argv + 1);
    if (!strcmp(cmd, "cp")) return mt_cmd_cp(argc - 1, argv + 1);
    if (!strcmp(cmd, "bench")) return cmd_bench(argc - 1, argv + 1);
    if (!strcmp(cmd, "plugins")) return mt_cmd_plugins(argc - 1, argv + 1);
    if (!strcmp(cmd, "data")) return mt_cmd_data(argc - 1, argv + 1);
    if (!strcmp(cmd, "generate")) return mt_cmd_generate(argc - 1, argv + 1);
    if (!strcmp(cmd, "eval")) return mt_cmd_eval(argc - 1, argv + 1);
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version")) {
        printf("moontune %s\n", MT_VERSION_STRING);
        return 0;
    }
    if (!strcmp(cmd, "help") || !strcmp(cmd, "--help") || !strcmp(cmd, "-h")) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "moontune: unknown command \"%s\"\n\n", cmd);
    usage(stderr);
    return 2;
}
