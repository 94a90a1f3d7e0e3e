/* cli_args.h — what every command shares to read its arguments: getopt_long with the
 * same messages everywhere (KEY=VALUE values go through mt_split_kv, core/base).
 *
 * Options take the GNU forms: `--seq 256`, `--seq=256`, and a unique prefix
 * (`--max-new 8`). Arguments are read in order (getopt's "-" mode: nothing is
 * permuted), so a positional argument comes back where it stands, as
 * MT_CLI_POSITIONAL, and an option may look at the word after it (argv[optind]).
 * After `--` every word is positional. */
#ifndef MT_CLI_ARGS_H
#define MT_CLI_ARGS_H

#include <getopt.h>
#include <stddef.h>
#include <stdio.h>

#include "moontune/moontune.h"

/* The option table of one command, and how to name it in messages. */
typedef struct mt_cli {
    const char *command;          /* "moontune data" */
    const struct option *options; /* getopt_long's table, {0} terminated, with
                                   {"help", no_argument, NULL, MT_CLI_HELP} */
    void (*usage)(FILE *out);
} mt_cli;

/* getopt_long's return for --help and -h. */
#define MT_CLI_HELP 'h'
/* mt_cli_next's return when the arguments are refused (the message is printed). */
#define MT_CLI_REFUSED '?'
/* mt_cli_next's return for a positional argument (in *value). */
#define MT_CLI_POSITIONAL 1

/* Starts reading argv from its second element (resets getopt's state, so a command
 * may parse more than once in a process). */
void mt_cli_begin(void);

/* The next option's `val` with its argument in *value (NULL for a flag), or
 * MT_CLI_POSITIONAL with the word in *value; -1 after the last argument. An unknown option, a missing value or a value given to a flag
 * prints "<command>: ..." and the usage to stderr and returns MT_CLI_REFUSED. --help
 * and -h return MT_CLI_HELP. *name receives the option's name as "--seq" (for
 * messages; it lives in a static buffer until the next call). */
int mt_cli_next(const mt_cli *cli, int argc, char **argv, const char **value, const char **name);

#endif /* MT_CLI_ARGS_H */
