/* cli_args.c — getopt_long with one set of messages for every command. */
#include "cli/cli_args.h"

#include <stdlib.h>
#include <string.h>

#include "base/internal.h"
#include "model/device_select.h"

static int past_options; /* after "--": the rest is positional */

void mt_cli_begin(void) {
    optind = 0; /* glibc: 0 also resets its internal state (a new argv) */
    opterr = 0; /* the messages are ours */
    past_options = 0;
}

static const char *option_name(const mt_cli *cli, int val) {
    for (const struct option *o = cli->options; o->name; o++)
        if (o->val == val) return o->name;
    return NULL;
}

/* Parses the value of a numeric option into its target; MT_OK or the parser's message. */
static mt_status parse_number(const mt_cli_number *n, const char *flag, const char *value,
                              mt_error *err) {
    switch (n->type) {
    case MT_CLI_INT: return mt_parse_int_into(flag, value, n->limit, n->out, err);
    case MT_CLI_FLOAT: return mt_parse_float_into(flag, value, n->limit, n->out, err);
    case MT_CLI_DOUBLE: return mt_parse_real(flag, value, n->limit, n->out, err);
    case MT_CLI_SEED: return mt_parse_u64(flag, value, n->out, err);
    }
    return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: no parser for this option", flag);
}

static int next_option(const mt_cli *cli, int argc, char **argv, const char **value,
                       const char **name) {
    static char flag[80];
    int index = -1;
    *value = NULL;
    *name = flag;
    flag[0] = '\0';
    /* "-": in order, positionals come back as 1; ":": a missing value is told apart */
    int c = past_options ? -1 : getopt_long(argc, argv, "-:h", cli->options, &index);
    if (c == -1) {
        past_options = 1;
        if (optind >= argc) return -1;
        *value = argv[optind++];
        return MT_CLI_POSITIONAL;
    }
    if (c == MT_CLI_POSITIONAL) {
        *value = optarg;
        return MT_CLI_POSITIONAL;
    }
    if (c == MT_CLI_HELP) {
        cli->usage(stdout);
        return MT_CLI_HELP;
    }
    if (c == ':' || c == '?') {
        const char *known = optopt ? option_name(cli, optopt) : NULL;
        if (c == ':' && known)
            fprintf(stderr, "%s: --%s needs a value\n", cli->command, known);
        else if (known)
            fprintf(stderr, "%s: --%s takes no value\n", cli->command, known);
        else
            fprintf(stderr, "%s: unknown option '%s'\n", cli->command, argv[optind - 1]);
        cli->usage(stderr);
        return MT_CLI_REFUSED;
    }
    const char *long_name = index >= 0 ? cli->options[index].name : option_name(cli, c);
    snprintf(flag, sizeof flag, "--%s", long_name ? long_name : "?");
    *value = optarg;
    return c;
}

mt_status mt_cli_check_device(const char *flag, const char *value, mt_error *err) {
    /* "" is the default to the backend layer, but not a value anyone types on purpose */
    if (!value || !*value)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: expected " MT_DEVICE_CHOICES ", got \"\"",
                            flag);
    return mt_device_check_name(flag, value, err);
}

int mt_cli_next(const mt_cli *cli, int argc, char **argv, const char **value, const char **name) {
    for (;;) {
        int c = next_option(cli, argc, argv, value, name);
        if (c == MT_CLI_DEVICE) {
            mt_error err = {0};
            if (mt_cli_check_device(*name, *value, &err)) {
                fprintf(stderr, "%s: %s\n", cli->command, err.msg);
                return MT_CLI_REFUSED;
            }
            return c;
        }
        const mt_cli_number *number = NULL;
        for (size_t i = 0; i < cli->n_numbers && c > MT_CLI_POSITIONAL; i++)
            if (cli->numbers[i].val == c) number = &cli->numbers[i];
        if (!number) return c;
        mt_error err = {0};
        if (parse_number(number, *name, *value, &err)) {
            fprintf(stderr, "%s: %s\n", cli->command, err.msg);
            return MT_CLI_REFUSED;
        }
    }
}

void mt_cli_typed_kv(const char *value, mt_kv *kv) {
    char *end;
    double num = strtod(value, &end);
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
}

mt_status mt_cli_adapter_option(mt_cli_adapter_options *o, const char *flag, const char *arg,
                                mt_error *err) {
    if (o->n == MT_CLI_MAX_ADAPTER_OPTIONS)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "at most %d %s", MT_CLI_MAX_ADAPTER_OPTIONS,
                            flag);
    const char *value;
    mt_status st = mt_split_kv(flag, arg, o->keys[o->n], sizeof o->keys[o->n], &value, err);
    if (st) return st;
    o->kv[o->n] = (mt_kv){.key = o->keys[o->n]};
    mt_cli_typed_kv(value, &o->kv[o->n]);
    o->n++;
    return MT_OK;
}
