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

#include "base/numparse.h"
#include "moontune/moontune.h"
#include "plugin/options.h"

/* A numeric option that mt_cli_next parses itself, through the shared parser and its
 * limits (base/numparse.h), into *out: an int, a float or a double within `limit`
 * (an mt_int_limit or an mt_real_limit), or a uint64_t seed (no limit). */
typedef enum { MT_CLI_INT, MT_CLI_FLOAT, MT_CLI_DOUBLE, MT_CLI_SEED } mt_cli_number_type;
typedef struct mt_cli_number {
    int val; /* the option's val in the table */
    mt_cli_number_type type;
    const void *limit;
    void *out;
} mt_cli_number;

/* The option table of one command, and how to name it in messages. */
typedef struct mt_cli {
    const char *command;          /* "moontune data" */
    const struct option *options; /* getopt_long's table, {0} terminated, with
                                   {"help", no_argument, NULL, MT_CLI_HELP} */
    void (*usage)(FILE *out);
    const mt_cli_number *numbers; /* options parsed here; NULL-able */
    size_t n_numbers;
} mt_cli;

/* --device cpu|cuda, the same on every command that computes (run, eval, generate,
 * bench): with MT_CLI_DEVICE_OPTION in the table, mt_cli_next checks the name
 * (model/device_select.h: cpu or cuda; a wrong one is refused naming the choices) before
 * it returns MT_CLI_DEVICE with the name in *value. Whether the device starts is known
 * only when its backend does (store/session.h). Commands number their own options from
 * 256; this val stays clear of them. */
#define MT_CLI_DEVICE 0x1000
#define MT_CLI_DEVICE_OPTION {"device", required_argument, NULL, MT_CLI_DEVICE}
/* Checks a --device value as mt_cli_next does: MT_OK, or err says
 * "--device: expected cpu or cuda, got \"...\"". */
mt_status mt_cli_check_device(const char *flag, const char *value, mt_error *err);

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
 * MT_CLI_POSITIONAL with the word in *value; -1 after the last argument. Options of
 * cli->numbers are parsed into their targets and not returned. An unknown option, a
 * missing value, a value given to a flag or a number refused by its limit prints
 * "<command>: ..." (and the usage for the first three) to stderr and returns
 * MT_CLI_REFUSED. --help and -h print the usage to stdout and return MT_CLI_HELP.
 * *name receives the option's name as "--seq" (for messages; it lives in a static
 * buffer until the next call). */
int mt_cli_next(const mt_cli *cli, int argc, char **argv, const char **value, const char **name);

/* The value of an adapter option given as `--adapter-option KEY=VALUE` (bench,
 * export): "true"/"false" a boolean, a value strtod reads whole a number, anything else
 * a string (kv->string points into value). The plugin's schema checks it afterwards. */
void mt_cli_typed_kv(const char *value, mt_kv *kv);

/* The --adapter-option values of one command: up to MT_CLI_MAX_ADAPTER_OPTIONS typed
 * key/values, their keys held here. */
#define MT_CLI_MAX_ADAPTER_OPTIONS 32
typedef struct mt_cli_adapter_options {
    char keys[MT_CLI_MAX_ADAPTER_OPTIONS][64];
    mt_kv kv[MT_CLI_MAX_ADAPTER_OPTIONS];
    size_t n;
} mt_cli_adapter_options;
/* Adds one `--adapter-option KEY=VALUE` (flag names it in messages): split by
 * mt_split_kv, typed by mt_cli_typed_kv. MT_ERR_INVALID_ARG past the limit or for a
 * value that is not KEY=VALUE. */
mt_status mt_cli_adapter_option(mt_cli_adapter_options *o, const char *flag, const char *arg,
                                mt_error *err);

#endif /* MT_CLI_ARGS_H */
