/* main.c — the `moontune` command. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cmd_bench.h"
#include "cli/cmd_data.h"
#include "cli/cmd_eval.h"
#include "cli/cmd_export.h"
#include "cli/cmd_generate.h"
#include "cli/cmd_plugin_check.h"
#include "cli/cmd_plugins.h"
#include "cli/cmd_run.h"
#include "dist/dist.h"
#include "backend.h"
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

/* run, validate and bench as one rank of a data-parallel job when an MPI launcher
 * started them (dist/dist.h): a rank that fails ends the whole job, so that the others
 * never wait for it. */
static int data_parallel(const char *cmd, int argc, char **argv) {
    mt_error err = {0};
    if (mt_dist_init(&err)) {
        fprintf(stderr, "moontune %s: %s\n", cmd, err.msg);
        return 1;
    }
    int rc = !strcmp(cmd, "bench") ? mt_cmd_bench(argc - 1, argv + 1) : mt_cmd_run(argc - 1, argv + 1);
    if (rc != 0 && mt_dist_size() > 1) {
        fprintf(stderr, "moontune %s: rank %d of %d failed (exit status %d): ending the job\n", cmd,
                mt_dist_rank(), mt_dist_size(), rc);
        mt_dist_abort(rc);
    }
    mt_dist_finalize();
    return rc;
}

/* OpenBLAS picks its kernels when it loads; one older than the CPU picks generic SSE3
 * ones, five times slower (kernels/cpu/cpu_blas_core.c). Then this names the right ones
 * in OPENBLAS_CORETYPE and starts the command again, once: the variable is set after. A
 * value the user or the machine set is kept. */
static void use_the_cpus_blas_kernels(char **argv) {
    if (getenv("OPENBLAS_CORETYPE")) return;
    const char *better = mt_cpu_blas_better_core();
    if (!better || setenv("OPENBLAS_CORETYPE", better, 1)) return;
    execv("/proc/self/exe", argv);
    unsetenv("OPENBLAS_CORETYPE"); /* no exec: go on with the kernels loaded */
}

int main(int argc, char **argv) {
    use_the_cpus_blas_kernels(argv);
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "run") || !strcmp(cmd, "validate") || !strcmp(cmd, "bench"))
        return data_parallel(cmd, argc, argv);
    if (!strcmp(cmd, "ls")) return mt_cmd_ls(argc - 1, argv + 1);
    if (!strcmp(cmd, "cp")) return mt_cmd_cp(argc - 1, argv + 1);
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
