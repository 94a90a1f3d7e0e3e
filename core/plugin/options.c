/* options.c — validation of plugin options against their declared schema. */
#include "plugin/options.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h"

typedef struct option_value {
    const mt_option_spec *spec;
    int boolean;
    int64_t integer;
    double number;
    char *string;
    char **list;
    int list_len;
} option_value;

struct mt_options {
    char *plugin;
    size_t n;
    option_value *values;
};

const char *mt_option_type_name(mt_option_type type) {
    switch (type) {
    case MT_OPT_BOOL: return "bool";
    case MT_OPT_INT: return "int";
    case MT_OPT_FLOAT: return "float";
    case MT_OPT_STRING: return "string";
    case MT_OPT_STRING_LIST: return "string list";
    }
    return "?";
}

static const char *kv_type_name(mt_kv_type t) {
    switch (t) {
    case MT_KV_BOOL: return "a boolean";
    case MT_KV_NUMBER: return "a number";
    case MT_KV_STRING: return "a string";
    case MT_KV_LIST: return "a list";
    }
    return "?";
}

void mt_options_free(mt_options *opts) {
    if (!opts) return;
    for (size_t i = 0; i < opts->n; i++) {
        option_value *v = &opts->values[i];
        free(v->string);
        for (int j = 0; j < v->list_len; j++) free(v->list[j]);
        free(v->list);
    }
    free(opts->values);
    free(opts->plugin);
    free(opts);
}

/* Splits "a, b,c" into trimmed items; an empty string gives an empty list. */
static mt_status split_list(const char *text, option_value *v, mt_error *err) {
    int cap = 1;
    for (const char *p = text; *p; p++) cap += *p == ',';
    v->list = calloc((size_t)cap, sizeof *v->list);
    if (!v->list) return mt_error_set(err, MT_ERR_NOMEM, "out of memory for an option list");
    const char *p = text;
    while (*p) {
        while (*p == ' ') p++;
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        while (len > 0 && p[len - 1] == ' ') len--;
        if (len > 0) {
            char *item = malloc(len + 1);
            if (!item) return mt_error_set(err, MT_ERR_NOMEM, "out of memory for an option list");
            memcpy(item, p, len);
            item[len] = '\0';
            v->list[v->list_len++] = item;
        }
        if (!end) break;
        p = end + 1;
    }
    return MT_OK;
}

static int in_choices(const char *choices, const char *s) {
    size_t n = strlen(s);
    for (const char *p = choices; p && *p;) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == n && !strncmp(p, s, n)) return 1;
        p = bar ? bar + 1 : NULL;
    }
    return 0;
}

#define OPT_ERR(...) mt_error_set(err, MT_ERR_INVALID_ARG, __VA_ARGS__)

/* Fills v from one key/value (or from the default text when kv is NULL). */
static mt_status set_value(option_value *v, const mt_kv *kv, const char *where, mt_error *err) {
    const mt_option_spec *s = v->spec;
    const char *text = s->default_value ? s->default_value : "";
    const char *src = kv ? "" : " (its default)";
    switch (s->type) {
    case MT_OPT_BOOL:
        if (kv && kv->type != MT_KV_BOOL)
            return OPT_ERR("%s: option '%s': expected a boolean, found %s", where, s->name,
                           kv_type_name(kv->type));
        v->boolean = kv ? kv->boolean : !strcmp(text, "true");
        return MT_OK;
    case MT_OPT_INT:
    case MT_OPT_FLOAT: {
        double x;
        if (kv) {
            if (kv->type != MT_KV_NUMBER)
                return OPT_ERR("%s: option '%s': expected %s, found %s", where, s->name,
                               s->type == MT_OPT_INT ? "an integer" : "a number",
                               kv_type_name(kv->type));
            x = kv->number;
        } else {
            char *end;
            x = strtod(text, &end);
            if (end == text || *end)
                return OPT_ERR("%s: option '%s': default \"%s\" is not a number", where, s->name,
                               text);
        }
        if (!isfinite(x))
            return OPT_ERR("%s: option '%s': expected a finite number, found %g%s", where,
                           s->name, x, src);
        if (s->type == MT_OPT_INT && (x != floor(x) || fabs(x) > 9.0e15))
            return OPT_ERR("%s: option '%s': expected an integer, found %g%s", where, s->name, x,
                           src);
        if (s->min <= s->max && (x < s->min || x > s->max))
            return OPT_ERR("%s: option '%s': %g is out of range [%g, %g]%s", where, s->name, x,
                           s->min, s->max, src);
        v->number = x;
        v->integer = (int64_t)x;
        return MT_OK;
    }
    case MT_OPT_STRING: {
        if (kv && kv->type != MT_KV_STRING)
            return OPT_ERR("%s: option '%s': expected a string, found %s", where, s->name,
                           kv_type_name(kv->type));
        const char *str = kv ? kv->string : text;
        if (s->choices && !in_choices(s->choices, str))
            return OPT_ERR("%s: option '%s': \"%s\" is not one of %s%s", where, s->name, str,
                           s->choices, src);
        v->string = mt_strdup(str, "option string", err);
        return v->string ? MT_OK : MT_ERR_NOMEM;
    }
    case MT_OPT_STRING_LIST: {
        if (kv && kv->type == MT_KV_LIST) {
            v->list = calloc((size_t)kv->list_len + 1, sizeof *v->list);
            if (!v->list) return mt_error_set(err, MT_ERR_NOMEM, "out of memory for an option list");
            for (int i = 0; i < kv->list_len; i++) {
                if (!(v->list[i] = mt_strdup(kv->list[i], "option list item", err))) return MT_ERR_NOMEM;
                v->list_len = i + 1;
            }
        } else if (kv && kv->type != MT_KV_STRING) {
            return OPT_ERR("%s: option '%s': expected a list of strings, found %s", where,
                           s->name, kv_type_name(kv->type));
        } else {
            mt_status st = split_list(kv ? kv->string : text, v, err);
            if (st) return st;
        }
        for (int i = 0; s->choices && i < v->list_len; i++)
            if (!in_choices(s->choices, v->list[i]))
                return OPT_ERR("%s: option '%s': \"%s\" is not one of %s%s", where, s->name,
                               v->list[i], s->choices, src);
        return MT_OK;
    }
    }
    return OPT_ERR("%s: option '%s' has an unknown type %d", where, s->name, (int)s->type);
}

mt_status mt_options_build(const mt_option_spec *specs, size_t n_specs, const char *name,
                           const char *file, const mt_kv *kv, size_t n_kv, mt_options **out,
                           mt_error *err) {
    char where[512];
    snprintf(where, sizeof where, "plugin '%s' (%s)", name, file ? file : "built in");
    for (size_t k = 0; k < n_kv; k++) {
        int known = 0;
        for (size_t i = 0; i < n_specs && !known; i++) known = !strcmp(specs[i].name, kv[k].key);
        if (!known) {
            char names[256] = "";
            for (size_t i = 0; i < n_specs; i++) {
                size_t len = strlen(names);
                snprintf(names + len, sizeof names - len, "%s%s", i ? ", " : "", specs[i].name);
            }
            return OPT_ERR("%s: unknown option '%s' (known: %s)", where, kv[k].key,
                           n_specs ? names : "none");
        }
        for (size_t j = 0; j < k; j++)
            if (!strcmp(kv[j].key, kv[k].key))
                return OPT_ERR("%s: option '%s' given twice", where, kv[k].key);
    }
    mt_options *opts = calloc(1, sizeof *opts);
    if (!opts) return mt_error_set(err, MT_ERR_NOMEM, "out of memory for options");
    opts->n = n_specs;
    opts->values = calloc(n_specs ? n_specs : 1, sizeof *opts->values);
    opts->plugin = mt_strdup(name, "plugin name", err);
    if (!opts->values || !opts->plugin) {
        mt_options_free(opts);
        return mt_error_set(err, MT_ERR_NOMEM, "out of memory for options");
    }
    for (size_t i = 0; i < n_specs; i++) {
        opts->values[i].spec = &specs[i];
        const mt_kv *given = NULL;
        for (size_t k = 0; k < n_kv && !given; k++)
            if (!strcmp(kv[k].key, specs[i].name)) given = &kv[k];
        mt_status st = set_value(&opts->values[i], given, where, err);
        if (st) {
            mt_options_free(opts);
            return st;
        }
    }
    *out = opts;
    return MT_OK;
}

static const option_value *find(const mt_options *opts, const char *name, mt_option_type type) {
    for (size_t i = 0; opts && i < opts->n; i++)
        if (!strcmp(opts->values[i].spec->name, name)) {
            if (opts->values[i].spec->type == type) return &opts->values[i];
            break;
        }
    /* A plugin reading an option it did not declare (or with another type) is a bug in
     * the plugin: say so loudly, and give it a zero value rather than crash. */
    fprintf(stderr, "moontune: plugin '%s' read undeclared option '%s' as %s\n",
            opts ? opts->plugin : "?", name, mt_option_type_name(type));
    return NULL;
}

int mt_options_bool(const mt_options *opts, const char *name) {
    const option_value *v = find(opts, name, MT_OPT_BOOL);
    return v ? v->boolean : 0;
}
int64_t mt_options_int(const mt_options *opts, const char *name) {
    const option_value *v = find(opts, name, MT_OPT_INT);
    return v ? v->integer : 0;
}
double mt_options_float(const mt_options *opts, const char *name) {
    const option_value *v = find(opts, name, MT_OPT_FLOAT);
    return v ? v->number : 0.0;
}
const char *mt_options_string(const mt_options *opts, const char *name) {
    const option_value *v = find(opts, name, MT_OPT_STRING);
    return v ? v->string : "";
}
int mt_options_list_len(const mt_options *opts, const char *name) {
    const option_value *v = find(opts, name, MT_OPT_STRING_LIST);
    return v ? v->list_len : 0;
}
const char *mt_options_list_item(const mt_options *opts, const char *name, int index) {
    const option_value *v = find(opts, name, MT_OPT_STRING_LIST);
    return v && index >= 0 && index < v->list_len ? v->list[index] : NULL;
}

size_t mt_options_count(const mt_options *opts) { return opts ? opts->n : 0; }

const char *mt_options_name_at(const mt_options *opts, size_t i, mt_option_type *type) {
    if (!opts || i >= opts->n) return NULL;
    if (type) *type = opts->values[i].spec->type;
    return opts->values[i].spec->name;
}
