/* cmd_plugins.c — `moontune plugins`: what the loader finds on the search path, what it
 * refused and why, and one plugin's description and options. */
#include "cli/cmd_plugins.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli_args.h"
#include "plugin/registry.h"

static void usage(FILE *out) {
    fprintf(out,
            "usage: moontune plugins [--path DIR]... [--kind KIND]\n"
            "       moontune plugins [--path DIR]... --describe NAME [--kind KIND]\n"
            "\n"
            "Lists every plugin on the search path (kind, name, version, file), then the files\n"
            "that were refused and why. With --describe, prints one plugin's description and\n"
            "options (type, default, range or choices, help).\n"
            "\n"
            "Search path, in order: the built-in plugin directory, each directory of\n"
            "MOONTUNE_PLUGIN_PATH (colon-separated), each --path DIR. When two files provide\n"
            "the same kind and name, the one found first wins.\n"
            "\n"
            "  --describe NAME  describe the plugin NAME\n"
            "  --kind KIND      optimizer | loss | adapter | scheduler: only that kind\n"
            "                   (for a name that several kinds use)\n"
            "  --path DIR       search DIR too, after MOONTUNE_PLUGIN_PATH; repeatable\n"
            "  --help           this text\n");
}

/* Short decimal text that reads back as x: 0.001, not 0.0010000000000000000; integers whole. */
static void format_number(char *buf, size_t size, double x) {
    if (isinf(x)) {
        snprintf(buf, size, "%s", x < 0 ? "-inf" : "inf");
        return;
    }
    if (x == floor(x) && fabs(x) < 1e15) { /* 1000000, not 1e+06 */
        snprintf(buf, size, "%.0f", x);
        return;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, size, "%.*g", prec, x);
        if (strtod(buf, NULL) == x) return;
    }
}

/* Order of the listing: kind name, then plugin name. */
static int compare_plugins(const void *a, const void *b) {
    const mt_plugin_descriptor *da = mt_plugin_desc(*(const mt_plugin *const *)a);
    const mt_plugin_descriptor *db = mt_plugin_desc(*(const mt_plugin *const *)b);
    int c = strcmp(mt_plugin_kind_name(da->kind), mt_plugin_kind_name(db->kind));
    return c ? c : strcmp(da->name, db->name);
}

static void print_refusals(const mt_registry *r) {
    for (size_t i = 0; i < mt_registry_refusal_count(r); i++)
        fprintf(stderr, "moontune plugins: warning: %s\n", mt_registry_refusal(r, i));
}

static int list_plugins(const mt_registry *r, mt_plugin_kind kind) {
    size_t n = mt_registry_count(r), m = 0;
    const mt_plugin **ps = calloc(n ? n : 1, sizeof *ps);
    if (!ps) {
        fprintf(stderr, "moontune plugins: out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < n; i++) {
        const mt_plugin *p = mt_registry_at(r, i);
        if (!kind || mt_plugin_desc(p)->kind == kind) ps[m++] = p;
    }
    qsort(ps, m, sizeof *ps, compare_plugins);
    int wk = (int)strlen("KIND"), wn = (int)strlen("NAME"), wv = (int)strlen("VERSION");
    for (size_t i = 0; i < m; i++) {
        const mt_plugin_descriptor *d = mt_plugin_desc(ps[i]);
        int k = (int)strlen(mt_plugin_kind_name(d->kind)), nl = (int)strlen(d->name),
            v = (int)strlen(d->version);
        if (k > wk) wk = k;
        if (nl > wn) wn = nl;
        if (v > wv) wv = v;
    }
    if (m == 0) {
        fprintf(stderr, "moontune plugins: no %s%splugins found on the search path\n",
                kind ? mt_plugin_kind_name(kind) : "", kind ? " " : "");
    } else {
        printf("%-*s  %-*s  %-*s  %s\n", wk, "KIND", wn, "NAME", wv, "VERSION", "FILE");
        for (size_t i = 0; i < m; i++) {
            const mt_plugin_descriptor *d = mt_plugin_desc(ps[i]);
            printf("%-*s  %-*s  %-*s  %s\n", wk, mt_plugin_kind_name(d->kind), wn, d->name, wv,
                   d->version, mt_plugin_path(ps[i]));
        }
    }
    free(ps);
    fflush(stdout);
    print_refusals(r);
    return 0;
}

static void describe_option(const mt_option_spec *s) {
    char lo[32], hi[32];
    const char *def = s->default_value ? s->default_value : "";
    printf("  %s (%s, default ", s->name, mt_option_type_name(s->type));
    if (s->type == MT_OPT_STRING || s->type == MT_OPT_STRING_LIST) printf("\"%s\"", def);
    else printf("%s", *def ? def : (s->type == MT_OPT_BOOL ? "false" : "?"));
    if ((s->type == MT_OPT_INT || s->type == MT_OPT_FLOAT) && s->min <= s->max) {
        format_number(lo, sizeof lo, s->min);
        format_number(hi, sizeof hi, s->max);
        printf(", range [%s, %s]", lo, hi);
    }
    if ((s->type == MT_OPT_STRING || s->type == MT_OPT_STRING_LIST) && s->choices) {
        printf(", %s ", s->type == MT_OPT_STRING ? "one of" : "each one of");
        for (const char *c = s->choices; *c; c++) {
            if (*c == '|') printf(", ");
            else putchar(*c);
        }
    }
    printf(")\n");
    if (s->help && *s->help) printf("      %s\n", s->help);
}

static void describe(const mt_plugin *p) {
    const mt_plugin_descriptor *d = mt_plugin_desc(p);
    printf("kind:        %s\n", mt_plugin_kind_name(d->kind));
    printf("name:        %s\n", d->name);
    printf("version:     %s\n", d->version);
    printf("file:        %s\n", mt_plugin_path(p));
    printf("description: %s\n", d->description);
    if (d->n_options == 0) {
        printf("options:     none\n");
        return;
    }
    printf("options:\n");
    for (size_t i = 0; i < d->n_options; i++) describe_option(&d->options[i]);
}

static int describe_plugins(const mt_registry *r, const char *name, mt_plugin_kind kind) {
    size_t found = 0;
    for (size_t i = 0; i < mt_registry_count(r); i++) {
        const mt_plugin *p = mt_registry_at(r, i);
        const mt_plugin_descriptor *d = mt_plugin_desc(p);
        if (strcmp(d->name, name) || (kind && d->kind != kind)) continue;
        if (found++) printf("\n");
        describe(p);
    }
    fflush(stdout);
    if (found) return 0;
    if (kind) {
        mt_error err = {0};
        mt_registry_find(r, kind, name, &err);
        fprintf(stderr, "moontune plugins: %s\n", err.msg);
    } else {
        size_t n = mt_registry_count(r);
        const mt_plugin **ps = calloc(n ? n : 1, sizeof *ps);
        for (size_t i = 0; ps && i < n; i++) ps[i] = mt_registry_at(r, i);
        if (ps) qsort(ps, n, sizeof *ps, compare_plugins);
        fprintf(stderr, "moontune plugins: no plugin named '%s' (available:", name);
        for (size_t i = 0; ps && i < n; i++) {
            const mt_plugin_descriptor *d = mt_plugin_desc(ps[i]);
            fprintf(stderr, "%s %s %s", i ? "," : "", mt_plugin_kind_name(d->kind), d->name);
        }
        fprintf(stderr, "%s)\n", n ? "" : " none");
        free(ps);
    }
    print_refusals(r);
    return 1;
}

/* "--flag VALUE" or "--flag=VALUE": the value, advancing *i past it; NULL when absent. */
enum { OPT_DESCRIBE = 256, OPT_KIND, OPT_PATH };

static const struct option options[] = {
    {"help", no_argument, NULL, MT_CLI_HELP},
    {"describe", required_argument, NULL, OPT_DESCRIBE},
    {"kind", required_argument, NULL, OPT_KIND},
    {"path", required_argument, NULL, OPT_PATH},
    {NULL, 0, NULL, 0},
};

int mt_cmd_plugins(int argc, char **argv) {
    static const mt_cli cli = {"moontune plugins", options, usage, NULL, 0};
    const char *describe_name = NULL;
    mt_plugin_kind kind = (mt_plugin_kind)0;
    const char **dirs = calloc(argc > 0 ? (size_t)argc : 1, sizeof *dirs);
    size_t n_dirs = 0;
    if (!dirs) {
        fprintf(stderr, "moontune plugins: out of memory\n");
        return 1;
    }
    int status = -1;
    const char *v, *flag;
    int c;
    mt_cli_begin();
    while (status < 0 && (c = mt_cli_next(&cli, argc, argv, &v, &flag)) != -1) {
        switch (c) {
        case MT_CLI_HELP: status = 0; break;
        case MT_CLI_REFUSED: status = 2; break;
        case MT_CLI_POSITIONAL:
            fprintf(stderr, "moontune plugins: unexpected argument '%s' (see moontune plugins --help)\n", v);
            status = 2;
            break;
        case OPT_DESCRIBE:
            if (!*v) {
                fprintf(stderr, "moontune plugins: --describe expects a plugin name\n");
                status = 2;
            }
            describe_name = v;
            break;
        case OPT_KIND:
            if (!mt_plugin_kind_parse(v)) {
                fprintf(stderr,
                        "moontune plugins: --kind expects optimizer, loss, adapter or scheduler, "
                        "got \"%s\"\n",
                        v);
                status = 2;
            }
            kind = mt_plugin_kind_parse(v);
            break;
        case OPT_PATH:
            if (!*v) {
                fprintf(stderr, "moontune plugins: --path expects a directory\n");
                status = 2;
            }
            dirs[n_dirs++] = v;
            break;
        }
    }
    if (status >= 0) {
        free(dirs);
        return status;
    }

    mt_registry *r = NULL;
    mt_error err = {0};
    if (mt_registry_open(dirs, n_dirs, &r, &err) != MT_OK) {
        fprintf(stderr, "moontune plugins: %s\n", err.msg);
        free(dirs);
        return 1;
    }
    status = describe_name ? describe_plugins(r, describe_name, kind) : list_plugins(r, kind);
    mt_registry_close(r);
    free(dirs);
    return status;
}
