/* main.c — the `moontune` command. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cmd_bench.h"
#include "cli/cmd_data.h"
#include "cli/cmd_eval.h"
#include "cli/cmd_export.h"
#include "cli/cmd_generate.h"
#include "cli/cmd_plugin_check.h"
#include "cli/cmd_plugins.h"
#include "cli/cmd_run.h"
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
            "  plugin    plugin check FILE.so: a plugin's gradient, steps or merge on built-in fixtures\n"
            "  data      read, template and tokenize a dataset and print its statistics\n"
            "  generate  generate text from a model (GGUF or Hugging Face directory)\n"
            "  eval      held-out loss and perplexity of a model on a dataset\n"
            "  export    a run, checkpoint or adapter as a PEFT adapter, merged model or GGUF\n"
            "  version   print the version\n"
            "  help      this text; `moontune COMMAND --help` for a command's options\n",
            MT_VERSION_STRING);
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
    if (!strcmp(cmd, "bench")) return mt_cmd_bench(argc - 1, argv + 1);
    if (!strcmp(cmd, "plugins")) return mt_cmd_plugins(argc - 1, argv + 1);
    if (!strcmp(cmd, "plugin")) return mt_cmd_plugin(argc - 1, argv + 1);
    if (!strcmp(cmd, "data")) return mt_cmd_data(argc - 1, argv + 1);
    if (!strcmp(cmd, "generate")) return mt_cmd_generate(argc - 1, argv + 1);
    if (!strcmp(cmd, "eval")) return mt_cmd_eval(argc - 1, argv + 1);
    if (!strcmp(cmd, "export")) return mt_cmd_export(argc - 1, argv + 1);
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
