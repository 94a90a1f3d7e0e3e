/* adapter_dir.c — a PEFT adapter directory as an mt_adapter_io (see adapter_dir.h). */
#include "store/adapter_dir.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h"
#include "formats/safetensors.h"
#include "model/device.h"

#define CONFIG_FILE "adapter_config.json"
#define WEIGHTS_FILE "adapter_model.safetensors"

typedef struct dir_tensor {
    char *name;      /* with PEFT's prefix */
    mt_st_dtype dtype;
    int ndim;
    int64_t shape[MT_MAX_DIMS];
    void *data;      /* a host copy, taken when the adapter hands the tensor over */
} dir_tensor;

struct mt_adapter_dir {
    mt_adapter_io io; /* first: the host's io_* slots reach the ops through it */
    char *dir, *config_path, *weights_path;
    /* writing: the config object being collected and the tensors */
    json_t *config;
    dir_tensor *tensors;
    size_t n_tensors, cap_tensors;
    /* reading: the keys in file order and their values as compact JSON text */
    char **keys, **values;
    size_t n_keys;
    mt_safetensors *st;
    float **f32; /* per tensor (file order): the F32 host copy made on request */
    /* import_options: the plugin asked and the options it set */
    const mt_plugin_descriptor *desc;
    mt_kv *kv;
    size_t n_kv, cap_kv;
};

mt_adapter_io *mt_adapter_dir_io(mt_adapter_dir *d) { return &d->io; }
const char *mt_adapter_dir_path(const mt_adapter_dir *d) { return d->dir; }
size_t mt_adapter_dir_tensor_count(const mt_adapter_dir *d) { return d->st ? mt_st_count(d->st) : 0; }

static void free_options(mt_adapter_dir *d) {
    for (size_t i = 0; i < d->n_kv; i++) {
        free((char *)d->kv[i].key);
        free((char *)d->kv[i].string);
    }
    d->n_kv = 0;
}

void mt_adapter_dir_close(mt_adapter_dir *d) {
    if (!d) return;
    for (size_t i = 0; i < d->n_tensors; i++) {
        free(d->tensors[i].name);
        free(d->tensors[i].data);
    }
    free(d->tensors);
    json_decref(d->config);
    for (size_t i = 0; i < d->n_keys; i++) {
        free(d->keys[i]);
        free(d->values[i]);
    }
    free(d->keys);
    free(d->values);
    for (size_t i = 0; d->f32 && i < mt_st_count(d->st); i++) free(d->f32[i]);
    free(d->f32);
    mt_st_close(d->st);
    free_options(d);
    free(d->kv);
    free(d->dir);
    free(d->config_path);
    free(d->weights_path);
    free(d);
}

static mt_adapter_dir *dir_new(const char *dir, mt_error *err) {
    mt_adapter_dir *d = mt_calloc(1, sizeof *d, "adapter directory", err);
    if (!d) return NULL;
    d->dir = mt_strdup(dir, "adapter directory", err);
    d->config_path = d->dir ? mt_path_join(dir, CONFIG_FILE, err) : NULL;
    d->weights_path = d->config_path ? mt_path_join(dir, WEIGHTS_FILE, err) : NULL;
    if (!d->weights_path) {
        mt_adapter_dir_close(d);
        return NULL;
    }
    return d;
}

/* ---- writing ---------------------------------------------------------------------- */

static mt_status put_config(mt_adapter_io *io, const char *key, const char *json, mt_error *err) {
    mt_adapter_dir *d = (mt_adapter_dir *)io;
    if (!key || !*key || !json)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: a config key needs a name and a value",
                            d->config_path);
    /* the core's own keys are set before save; an adapter setting one, or one key twice,
     * would silently lose a value */
    if (json_object_get(d->config, key))
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: key %s is set twice%s", d->config_path,
                            key,
                            !strcmp(key, "base_model_name_or_path") || !strcmp(key, "task_type") ||
                                    !strcmp(key, "inference_mode") || !strcmp(key, "auto_mapping") ||
                                    !strcmp(key, "revision")
                                ? " (the host writes it)"
                                : "");
    json_error_t je;
    json_t *v = json_loads(json, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &je);
    if (!v)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: key %s: the value is not JSON (%s): %s",
                            d->config_path, key, je.text, json);
    if (json_object_set_new(d->config, key, v))
        return mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory for key %s", d->config_path, key);
    return MT_OK;
}

static int st_dtype_of(mt_dtype t, mt_st_dtype *out) {
    switch (t) {
    case MT_F32: *out = MT_ST_F32; return 1;
    case MT_F16: *out = MT_ST_F16; return 1;
    case MT_BF16: *out = MT_ST_BF16; return 1;
    case MT_I32: *out = MT_ST_I32; return 1;
    case MT_I64: *out = MT_ST_I64; return 1;
    case MT_U8: *out = MT_ST_U8; return 1;
    default: return 0;
    }
}

static mt_status put_tensor(mt_adapter_io *io, const char *name, const mt_tensor *t,
                            mt_error *err) {
    mt_adapter_dir *d = (mt_adapter_dir *)io;
    mt_st_dtype dt;
    if (!name || !*name || !t || !t->data)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: a tensor needs a name and data",
                            d->weights_path);
    if (!st_dtype_of(t->dtype, &dt) || t->ndim < 0 || t->ndim > MT_MAX_DIMS)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: tensor %s: dtype %d, %d dimensions",
                            d->weights_path, name, (int)t->dtype, t->ndim);
    size_t len = strlen(MT_PEFT_TENSOR_PREFIX) + strlen(name) + 1;
    char *full = mt_malloc(len, "adapter tensor name", err);
    if (!full) return MT_ERR_NOMEM;
    snprintf(full, len, MT_PEFT_TENSOR_PREFIX "%s", name);
    for (size_t i = 0; i < d->n_tensors; i++)
        if (!strcmp(d->tensors[i].name, full)) {
            free(full);
            return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: tensor %s is saved twice",
                                d->weights_path, name);
        }
    if (d->n_tensors == d->cap_tensors) {
        size_t cap = d->cap_tensors ? 2 * d->cap_tensors : 32;
        dir_tensor *grown = realloc(d->tensors, cap * sizeof *grown);
        if (!grown) {
            free(full);
            return mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory", d->weights_path);
        }
        d->tensors = grown;
        d->cap_tensors = cap;
    }
    /* a host copy now: the tensor may live on a GPU, and the adapter may change it before
     * the commit */
    size_t nbytes = mt_tensor_nbytes(t);
    void *copy = mt_malloc(nbytes ? nbytes : 1, "adapter tensor copy", err);
    if (!copy) {
        free(full);
        return MT_ERR_NOMEM;
    }
    mt_status st = nbytes ? mt_device_download(copy, t, err) : MT_OK;
    if (st) {
        free(copy);
        free(full);
        return st;
    }
    dir_tensor *e = &d->tensors[d->n_tensors++];
    *e = (dir_tensor){.name = full, .dtype = dt, .ndim = t->ndim, .data = copy};
    for (int i = 0; i < t->ndim; i++) e->shape[i] = t->shape[i];
    return MT_OK;
}

static const mt_adapter_io_ops write_ops = {
    .put_config = put_config,
    .put_tensor = put_tensor,
};

mt_status mt_adapter_dir_create(const char *dir, const char *base_model_name_or_path,
                                mt_adapter_dir **out, mt_error *err) {
    *out = NULL;
    mt_adapter_dir *d = dir_new(dir, err);
    if (!d) return MT_ERR_NOMEM;
    d->io.ops = &write_ops;
    /* PeftConfig's own keys (the adapter's config adds its type's); a causal LM */
    d->config = json_object();
    int bad = !d->config;
    if (!bad) {
        bad |= json_object_set_new(d->config, "auto_mapping", json_null());
        bad |= json_object_set_new(d->config, "base_model_name_or_path",
                                   base_model_name_or_path ? json_string(base_model_name_or_path)
                                                           : json_null());
        bad |= json_object_set_new(d->config, "inference_mode", json_true());
        bad |= json_object_set_new(d->config, "revision", json_null());
        bad |= json_object_set_new(d->config, "task_type", json_string("CAUSAL_LM"));
    }
    if (bad) {
        mt_adapter_dir_close(d);
        return mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory for the adapter config", dir);
    }
    *out = d;
    return MT_OK;
}

mt_status mt_adapter_dir_commit(mt_adapter_dir *d, mt_error *err) {
    if (d->io.ops != &write_ops)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: not an adapter directory being written",
                            d->dir);
    if (!json_object_get(d->config, "peft_type"))
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: the adapter set no peft_type: PEFT cannot load it", d->config_path);
    if (d->n_tensors == 0)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: the adapter saved no tensor",
                            d->weights_path);
    mt_st_entry *entries = mt_calloc(d->n_tensors, sizeof *entries, "adapter entries", err);
    if (!entries) return MT_ERR_NOMEM;
    for (size_t i = 0; i < d->n_tensors; i++) {
        const dir_tensor *t = &d->tensors[i];
        entries[i] = (mt_st_entry){.name = t->name, .dtype = t->dtype, .ndim = t->ndim,
                                   .data = t->data};
        memcpy(entries[i].shape, t->shape, sizeof t->shape);
    }
    static const char *const meta[] = {"format", "pt", NULL};
    mt_status st = mt_st_write(d->weights_path, entries, d->n_tensors, meta, err);
    free(entries);
    if (st) return st;
    /* sorted keys and two-space indent: what save_pretrained writes */
    char *text = json_dumps(d->config, JSON_INDENT(2) | JSON_SORT_KEYS);
    size_t n = text ? strlen(text) : 0;
    char *nl = text ? realloc(text, n + 2) : NULL;
    if (!nl) {
        free(text);
        return mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory", d->config_path);
    }
    nl[n++] = '\n';
    nl[n] = '\0';
    st = mt_write_file_atomic(d->config_path, nl, n, err);
    free(nl);
    return st;
}

/* ---- reading ---------------------------------------------------------------------- */

static const char *get_config(const mt_adapter_io *io, const char *key) {
    const mt_adapter_dir *d = (const mt_adapter_dir *)io;
    for (size_t i = 0; key && i < d->n_keys; i++)
        if (!strcmp(d->keys[i], key)) return d->values[i];
    return NULL;
}

static const char *config_key(const mt_adapter_io *io, int index) {
    const mt_adapter_dir *d = (const mt_adapter_dir *)io;
    return index >= 0 && (size_t)index < d->n_keys ? d->keys[index] : NULL;
}

static const char *tensor_name(const mt_adapter_io *io, int index) {
    const mt_adapter_dir *d = (const mt_adapter_dir *)io;
    if (index < 0 || (size_t)index >= mt_st_count(d->st)) return NULL;
    return mt_st_at(d->st, (size_t)index)->name + strlen(MT_PEFT_TENSOR_PREFIX);
}

static int is_float(mt_st_dtype t) { return t == MT_ST_F32 || t == MT_ST_F16 || t == MT_ST_BF16; }

static mt_status get_tensor(mt_adapter_io *io, const char *name, mt_tensor *out, mt_error *err) {
    mt_adapter_dir *d = (mt_adapter_dir *)io;
    size_t n = mt_st_count(d->st), i;
    for (i = 0; name && i < n; i++)
        if (!strcmp(tensor_name(io, (int)i), name)) break;
    if (!name || i == n)
        return mt_error_set(err, MT_ERR_FORMAT, "%s: tensor " MT_PEFT_TENSOR_PREFIX "%s is missing",
                            d->weights_path, name ? name : "(null)");
    const mt_st_tensor *t = mt_st_at(d->st, i);
    memset(out, 0, sizeof *out);
    out->device = MT_DEVICE_CPU;
    out->ndim = t->ndim;
    for (int k = 0; k < t->ndim; k++) out->shape[k] = t->shape[k];
    if (is_float(t->dtype)) {
        /* F32 is copied too: the mapping gives no alignment promise for floats */
        size_t numel = t->nbytes / mt_st_dtype_size(t->dtype);
        if (!d->f32[i]) {
            float *buf = mt_malloc(numel ? numel * sizeof(float) : 1, "adapter tensor", err);
            if (!buf) return MT_ERR_NOMEM;
            mt_status st = mt_st_read_f32(t, buf, err);
            if (st) {
                free(buf);
                return st;
            }
            d->f32[i] = buf;
        }
        out->dtype = MT_F32;
        out->data = d->f32[i];
        return MT_OK;
    }
    /* other dtypes as stored (an adapter with integer tensors reads their bytes) */
    static const struct {
        mt_st_dtype st;
        mt_dtype dt;
    } raw[] = {{MT_ST_I32, MT_I32}, {MT_ST_I64, MT_I64}, {MT_ST_U8, MT_U8}};
    for (size_t k = 0; k < sizeof raw / sizeof raw[0]; k++)
        if (raw[k].st == t->dtype) {
            out->dtype = raw[k].dt;
            out->data = (void *)t->data;
            return MT_OK;
        }
    return mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: tensor %s is %s, which moontune does not read",
                        d->weights_path, t->name, mt_st_dtype_name(t->dtype));
}

/* The options are text as the adapter sets them; they become key/values of the type the
 * plugin's schema declares, so mt_plugin_instantiate checks ranges and choices with the
 * messages a recipe's value gets. */
static mt_status set_option(mt_adapter_io *io, const char *name, const char *value,
                            mt_error *err) {
    mt_adapter_dir *d = (mt_adapter_dir *)io;
    const mt_plugin_descriptor *desc = d->desc;
    if (!desc)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: set_option outside import_options",
                            d->dir);
    if (!name || !value)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: adapter %s: set_option needs a name and "
                            "a value", d->dir, desc->name);
    const mt_option_spec *spec = NULL;
    for (size_t i = 0; i < desc->n_options && !spec; i++) {
        /* walked by the plugin's own spec size */
        const mt_option_spec *s =
            (const mt_option_spec *)((const char *)desc->options + i * desc->option_size);
        if (!strcmp(s->name, name)) spec = s;
    }
    if (!spec)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: adapter %s sets option '%s', which it does not declare", d->dir,
                            desc->name, name);
    for (size_t i = 0; i < d->n_kv; i++)
        if (!strcmp(d->kv[i].key, name))
            return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: adapter %s sets option '%s' twice",
                                d->dir, desc->name, name);
    mt_kv kv = {.key = NULL};
    switch (spec->type) {
    case MT_OPT_BOOL:
        if (strcmp(value, "true") && strcmp(value, "false"))
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "%s: adapter %s: option '%s': expected true or false, found \"%s\"",
                                d->dir, desc->name, name, value);
        kv.type = MT_KV_BOOL;
        kv.boolean = !strcmp(value, "true");
        break;
    case MT_OPT_INT:
    case MT_OPT_FLOAT: {
        char *end;
        kv.type = MT_KV_NUMBER;
        kv.number = strtod(value, &end);
        if (end == value || *end || !isfinite(kv.number))
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "%s: adapter %s: option '%s': \"%s\" is not a finite number",
                                d->dir, desc->name, name, value);
        break;
    }
    default: /* strings; a list as one comma-separated string */
        kv.type = MT_KV_STRING;
        if (!(kv.string = mt_strdup(value, "option value", err))) return MT_ERR_NOMEM;
        break;
    }
    if (d->n_kv == d->cap_kv) {
        size_t cap = d->cap_kv ? 2 * d->cap_kv : 8;
        mt_kv *grown = realloc(d->kv, cap * sizeof *grown);
        if (!grown) {
            free((char *)kv.string);
            return mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory for options", d->dir);
        }
        d->kv = grown;
        d->cap_kv = cap;
    }
    if (!(kv.key = mt_strdup(name, "option name", err))) {
        free((char *)kv.string);
        return MT_ERR_NOMEM;
    }
    d->kv[d->n_kv++] = kv;
    return MT_OK;
}

static const mt_adapter_io_ops read_ops = {
    .get_config = get_config,
    .config_key = config_key,
    .tensor_name = tensor_name,
    .get_tensor = get_tensor,
    .set_option = set_option,
};

void mt_adapter_dir_begin_options(mt_adapter_dir *d, const mt_plugin_descriptor *desc) {
    free_options(d);
    d->desc = desc;
}

const mt_kv *mt_adapter_dir_options(const mt_adapter_dir *d, size_t *count) {
    *count = d->n_kv;
    return d->kv;
}

static mt_status read_config(mt_adapter_dir *d, mt_error *err) {
    char *text = NULL;
    size_t len = 0;
    mt_status st = mt_read_file(d->config_path, &text, &len, err);
    if (st) return st;
    json_error_t je;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    free(text);
    if (!root)
        return mt_error_set(err, MT_ERR_FORMAT, "%s: line %d, column %d: %s", d->config_path,
                            je.line, je.column, je.text);
    const json_t *task = json_object_get(root, "task_type");
    if (!json_is_object(root)) {
        st = mt_error_set(err, MT_ERR_FORMAT, "%s: not a JSON object", d->config_path);
    } else if (task && !json_is_null(task) &&
               (!json_is_string(task) || strcmp(json_string_value(task), "CAUSAL_LM") != 0)) {
        /* another task's adapter (SEQ_CLS, TOKEN_CLS, ...) comes with a head this model
         * does not have, and was trained for another output */
        st = json_is_string(task)
                 ? mt_error_set(err, MT_ERR_UNSUPPORTED,
                                "%s: task_type is \"%s\", only \"CAUSAL_LM\" (or none) is "
                                "supported", d->config_path, json_string_value(task))
                 : mt_error_set(err, MT_ERR_FORMAT,
                                "%s: task_type must be a string such as \"CAUSAL_LM\"",
                                d->config_path);
    }
    size_t n = st ? 0 : json_object_size(root);
    if (!st && n) {
        d->keys = mt_calloc(n, sizeof *d->keys, "adapter config keys", err);
        d->values = d->keys ? mt_calloc(n, sizeof *d->values, "adapter config values", err) : NULL;
        if (!d->values) st = MT_ERR_NOMEM;
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (st) break;
        /* compact text: "8", "true", "[\"q_proj\"]" — what io_get_config promises */
        char *text_v = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
        char *key_copy = text_v ? mt_strdup(key, "adapter config key", err) : NULL;
        if (!key_copy) {
            free(text_v);
            st = mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory", d->config_path);
            break;
        }
        d->keys[d->n_keys] = key_copy;
        d->values[d->n_keys++] = text_v;
    }
    json_decref(root);
    return st;
}

/* Every tensor under PEFT's prefix, and no NaN or infinity in the float ones: checked
 * before an adapter is chosen, so that a bad file is refused before anything attaches. */
static mt_status check_weights(mt_adapter_dir *d, mt_error *err) {
    size_t n = mt_st_count(d->st), pl = strlen(MT_PEFT_TENSOR_PREFIX), max = 0;
    for (size_t i = 0; i < n; i++) {
        const mt_st_tensor *t = mt_st_at(d->st, i);
        if (strncmp(t->name, MT_PEFT_TENSOR_PREFIX, pl) != 0 || !t->name[pl])
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: tensor %s is not named " MT_PEFT_TENSOR_PREFIX "<module>... "
                                "as PEFT saves adapter weights", d->weights_path, t->name);
        if (is_float(t->dtype) && t->nbytes / mt_st_dtype_size(t->dtype) > max)
            max = t->nbytes / mt_st_dtype_size(t->dtype);
    }
    float *buf = mt_malloc(max ? max * sizeof(float) : 1, "adapter tensor", err);
    if (!buf) return MT_ERR_NOMEM;
    mt_status st = MT_OK;
    for (size_t i = 0; !st && i < n; i++) {
        const mt_st_tensor *t = mt_st_at(d->st, i);
        if (is_float(t->dtype)) st = mt_st_read_f32_finite(t, buf, err);
    }
    free(buf);
    return st;
}

mt_status mt_adapter_dir_open(const char *dir, mt_adapter_dir **out, mt_error *err) {
    *out = NULL;
    mt_adapter_dir *d = dir_new(dir, err);
    if (!d) return MT_ERR_NOMEM;
    d->io.ops = &read_ops;
    mt_status st = read_config(d, err);
    if (!st) st = mt_st_open(d->weights_path, &d->st, err);
    if (!st) {
        size_t n = mt_st_count(d->st);
        d->f32 = mt_calloc(n ? n : 1, sizeof *d->f32, "adapter tensors", err);
        st = d->f32 ? check_weights(d, err) : MT_ERR_NOMEM;
    }
    if (st) {
        mt_adapter_dir_close(d);
        return st;
    }
    *out = d;
    return MT_OK;
}
