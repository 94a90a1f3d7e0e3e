/* options.h — a plugin instance's options: the recipe's key/value table checked
 * against the plugin's declared schema, with defaults filled in. */
#ifndef MT_CORE_OPTIONS_H
#define MT_CORE_OPTIONS_H

#include <stddef.h>

#include "moontune/plugin.h"

/* One key/value as a recipe (or a C caller) gives it, before validation. */
typedef enum mt_kv_type { MT_KV_BOOL, MT_KV_NUMBER, MT_KV_STRING, MT_KV_LIST } mt_kv_type;

typedef struct mt_kv {
    const char *key;
    mt_kv_type type;
    int boolean;
    double number;
    const char *string;
    const char *const *list; /* MT_KV_LIST: list_len strings */
    int list_len;
} mt_kv;

/* Validates kv against the schema of plugin `name` (from `file`): unknown keys, wrong
 * types, numbers out of range, strings outside the choices are refused with a message
 * naming the plugin, its file and the key. Missing keys take their defaults. */
mt_status mt_options_build(const mt_option_spec *specs, size_t n_specs, const char *name,
                           const char *file, const mt_kv *kv, size_t n_kv, mt_options **out,
                           mt_error *err);
void mt_options_free(mt_options *opts);

/* The accessors handed to plugins through mt_host. */
int mt_options_bool(const mt_options *opts, const char *name);
int64_t mt_options_int(const mt_options *opts, const char *name);
double mt_options_float(const mt_options *opts, const char *name);
const char *mt_options_string(const mt_options *opts, const char *name);
int mt_options_list_len(const mt_options *opts, const char *name);
const char *mt_options_list_item(const mt_options *opts, const char *name, int index);

/* Walking the options in their declared order (a checkpoint records an adapter's
 * options so that `moontune export` can rebuild it): how many there are, and the i-th
 * one's name and type (NULL when i is out of range); read its value by name. */
size_t mt_options_count(const mt_options *opts);
const char *mt_options_name_at(const mt_options *opts, size_t i, mt_option_type *type);

/* "bool", "int", "float", "string", "string list" */
const char *mt_option_type_name(mt_option_type type);

#endif
