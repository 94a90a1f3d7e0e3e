/* cli_args.c — getopt_long with one set of messages for every command. */
#include "cli/cli_args.h"

#include <string.h>

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

int mt_cli_next(const mt_cli *cli, int argc, char **argv, const char **value, const char **name) {
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
    if (c == MT_CLI_HELP) return MT_CLI_HELP;
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
