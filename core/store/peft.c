/* peft.c — loading a PEFT LoRA adapter directory onto a model (see peft.h).
 *
 * The lora plugin has no detach (ABI 1), so the directory is checked against the
 * model's base parameters before anything is attached: the names and shapes of the
 * tensors follow from the base projection they belong to, which the model knows
 * without the adapter. The copy after the attach checks again, by the parameters the
 * plugin actually registered. */
#include "store/peft.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store/export_hf.h"
#include "base/internal.h"
#include "formats/safetensors.h"

#define PEFT_PREFIX "base_model.model."

/* Keys whose presence (anything but null, false, 0, "" or an empty list/object) asks
 * for something the lora plugin cannot do, and why. */
static const struct {
    const char *key, *why;
} refused_keys[] = {
    {"fan_in_fan_out", "weights stored transposed (Conv1D layers)"},
    {"modules_to_save", "fully trained extra modules"},
    {"rank_pattern", "per-module ranks"},
    {"alpha_pattern", "per-module alphas"},
    {"layers_to_transform", "some layers only"},
    {"use_dora", "DoRA"},
    {"lora_bias", "a bias on lora_B"},
    {"layer_replication", "replicated layers"},
    {"trainable_token_indices", "trainable token embeddings"},
    {"target_parameters", "targeted parameters"},
    {"exclude_modules", "excluded modules"},
    {"alora_invocation_tokens", "activated LoRA"},
    {"use_qalora", "QA-LoRA"},
    {"use_bdlora", "block-diagonal LoRA"},
    {"megatron_config", "Megatron layers"},
};

static int json_truthy(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_NULL:
    case JSON_FALSE: return 0;
    case JSON_STRING: return json_string_length(v) > 0;
    case JSON_INTEGER: return json_integer_value(v) != 0;
    case JSON_REAL: return json_real_value(v) != 0.0;
    case JSON_ARRAY: return json_array_size(v) > 0;
    case JSON_OBJECT: return json_object_size(v) > 0;
    default: return 1;
    }
}

/* The index in mt_peft_modules of a module name or path ("q_proj",
 * "model.layers.0.self_attn.q_proj"; len bytes of s), or -1. */
static int module_index(const char *s, size_t len) {
    const char *last = s;
    for (size_t i = 0; i < len; i++)
        if (s[i] == '.') last = s + i + 1;
    size_t n = len - (size_t)(last - s);
    for (int k = 0; k < MT_PEFT_NUM_MODULES; k++)
        if (strlen(mt_peft_modules[k]) == n && !strncmp(last, mt_peft_modules[k], n)) return k;
    return -1;
}

typedef struct peft_config {
    int r;
    double alpha;
    int use_rslora;
    int all_linear;
    int target[MT_PEFT_NUM_MODULES];
} peft_config;

static mt_status parse_targets(const json_t *tm, const char *path, peft_config *c, mt_error *err) {
    if (json_is_string(tm)) {
        /* PEFT treats a string as a regular expression matched against module paths,
         * except "all-linear"; only the plain names are taken here */
        const char *s = json_string_value(tm);
        int k = module_index(s, strlen(s));
        if (!strcmp(s, "all-linear")) c->all_linear = 1;
        else if (k >= 0 && !strchr(s, '.')) c->target[k] = 1;
        else
            return mt_error_set(err, MT_ERR_UNSUPPORTED,
                                "%s: target_modules: '%s' is not all-linear or a projection name "
                                "(regular expressions are not supported; list the modules)", path, s);
        return MT_OK;
    }
    if (!json_is_array(tm) || json_array_size(tm) == 0)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: target_modules must be a non-empty list of strings or a string",
                            path);
    size_t i;
    json_t *v;
    json_array_foreach(tm, i, v) {
        const char *s = json_string_value(v);
        if (!s)
            return mt_error_set(err, MT_ERR_FORMAT, "%s: target_modules[%zu] is not a string",
                                path, i);
        int k = module_index(s, strlen(s));
        if (k < 0)
            return mt_error_set(err, MT_ERR_UNSUPPORTED,
                                "%s: target_modules: '%s' is not one of q_proj, k_proj, v_proj, "
                                "o_proj, gate_proj, up_proj, down_proj", path, s);
        c->target[k] = 1;
    }
    return MT_OK;
}

static mt_status read_config(const char *path, peft_config *c, mt_error *err) {
    char *text = NULL;
    size_t len = 0;
    mt_status st = mt_read_file(path, &text, &len, err);
    if (st) return st;
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    free(text);
    if (!root)
        return mt_error_set(err, MT_ERR_FORMAT, "%s: line %d, column %d: %s", path, jerr.line,
                            jerr.column, jerr.text);
    memset(c, 0, sizeof *c);
    const char *type = json_string_value(json_object_get(root, "peft_type"));
    const json_t *r = json_object_get(root, "r"), *alpha = json_object_get(root, "lora_alpha");
    const json_t *bias = json_object_get(root, "bias"), *rs = json_object_get(root, "use_rslora");
    const json_t *task = json_object_get(root, "task_type");
    if (!json_is_object(root)) {
        st = mt_error_set(err, MT_ERR_FORMAT, "%s: not a JSON object", path);
    } else if (!type || strcmp(type, "LORA") != 0) {
        st = mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: peft_type is %s, only \"LORA\" is supported",
                          path, type ? type : "missing");
    } else if (!json_is_integer(r) || json_integer_value(r) < 1 || json_integer_value(r) > 65536) {
        st = mt_error_set(err, MT_ERR_FORMAT, "%s: r must be an integer in [1, 65536]", path);
    } else if (!json_is_number(alpha) || json_number_value(alpha) < 0) {
        st = mt_error_set(err, MT_ERR_FORMAT, "%s: lora_alpha must be a non-negative number", path);
    } else if (bias && !json_is_null(bias) &&
               (!json_is_string(bias) || strcmp(json_string_value(bias), "none") != 0)) {
        st = mt_error_set(err, MT_ERR_UNSUPPORTED,
                          "%s: bias must be \"none\" (trained biases are not supported)", path);
    } else if (rs && !json_is_boolean(rs) && !json_is_null(rs)) {
        st = mt_error_set(err, MT_ERR_FORMAT, "%s: use_rslora must be true or false", path);
    } else if (task && !json_is_null(task) &&
               (!json_is_string(task) || strcmp(json_string_value(task), "CAUSAL_LM") != 0)) {
        /* another task's adapter (SEQ_CLS, TOKEN_CLS, ...) comes with a head this model
         * does not have, and was trained for another output */
        st = json_is_string(task)
                 ? mt_error_set(err, MT_ERR_UNSUPPORTED,
                                "%s: task_type is \"%s\", only \"CAUSAL_LM\" (or none) is "
                                "supported", path, json_string_value(task))
                 : mt_error_set(err, MT_ERR_FORMAT,
                                "%s: task_type must be a string such as \"CAUSAL_LM\"", path);
    }
    for (size_t i = 0; !st && i < sizeof refused_keys / sizeof refused_keys[0]; i++) {
        const json_t *v = json_object_get(root, refused_keys[i].key);
        if (v && json_truthy(v))
            st = mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: %s is set (%s): not supported", path,
                              refused_keys[i].key, refused_keys[i].why);
    }
    if (!st) {
        c->r = (int)json_integer_value(r);
        c->alpha = json_number_value(alpha);
        c->use_rslora = json_is_true(rs);
        const json_t *tm = json_object_get(root, "target_modules");
        st = tm ? parse_targets(tm, path, c, err)
                : mt_error_set(err, MT_ERR_FORMAT, "%s: target_modules is missing", path);
    }
    json_decref(root);
    return st;
}

/* The targeted base projection weight of a model parameter name, as the index of its
 * module, or -1 ("model.layers.3.mlp.up_proj.weight" -> up_proj). */
static int targeted_weight(const peft_config *c, const char *name) {
    size_t n = strlen(name), w = strlen(".weight");
    if (n <= w || strcmp(name + n - w, ".weight") != 0) return -1;
    int k = module_index(name, n - w);
    return k >= 0 && (c->all_linear || c->target[k]) ? k : -1;
}

/* Checks the file against the base model: every tensor is the lora_A (r,in) or lora_B
 * (out,r) of a targeted projection the model has, in a float dtype, and every targeted
 * projection has both. */
static mt_status check_tensors(mt_model *m, const peft_config *c, const mt_safetensors *st,
                               const char *path, mt_error *err) {
    char name[256];
    size_t n = mt_st_count(st), expected = 0;
    for (size_t i = 0; i < n; i++) {
        const mt_st_tensor *t = mt_st_at(st, i);
        size_t len = strlen(t->name), pl = strlen(PEFT_PREFIX), sl = strlen(".lora_A.weight");
        int is_a = len > pl + sl && !strcmp(t->name + len - sl, ".lora_A.weight");
        int is_b = len > pl + sl && !strcmp(t->name + len - sl, ".lora_B.weight");
        if (strncmp(t->name, PEFT_PREFIX, pl) != 0 || (!is_a && !is_b) ||
            len - pl - sl + sizeof ".weight" > sizeof name)
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: tensor %s is not a LoRA weight "
                                "(base_model.model.<module>.lora_A/lora_B.weight)", path, t->name);
        snprintf(name, sizeof name, "%.*s.weight", (int)(len - pl - sl), t->name + pl);
        const mt_param *base = mt_model_find_param(m, name);
        const int module = module_index(name, strlen(name) - strlen(".weight"));
        if (module < 0)
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: tensor %s: %.*s is not a projection LoRA can target (q_proj, "
                                "k_proj, v_proj, o_proj, gate_proj, up_proj or down_proj)",
                                path, t->name, (int)(strlen(name) - strlen(".weight")), name);
        if (!base || base->ndim != 2)
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: tensor %s: this model has no parameter %s (was the adapter "
                                "made for another model?)", path, t->name, name);
        if (targeted_weight(c, name) < 0)
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: tensor %s: %s is not among the target_modules of "
                                "adapter_config.json", path, t->name, mt_peft_modules[module]);
        int64_t rows = is_a ? c->r : base->shape[0], cols = is_a ? base->shape[1] : c->r;
        if (t->ndim != 2 || t->shape[0] != rows || t->shape[1] != cols) {
            char got[64] = "()";
            for (int d = 0, o = 0; d < t->ndim && o < (int)sizeof got; d++)
                o += snprintf(got + o, sizeof got - (size_t)o, "%s%lld%s", d ? ", " : "(",
                              (long long)t->shape[d], d + 1 == t->ndim ? ")" : "");
            return mt_error_set(err, MT_ERR_FORMAT, "%s: tensor %s has shape %s, expected (%lld, %lld)",
                                path, t->name, got, (long long)rows, (long long)cols);
        }
        if (t->dtype != MT_ST_F32 && t->dtype != MT_ST_F16 && t->dtype != MT_ST_BF16)
            return mt_error_set(err, MT_ERR_UNSUPPORTED,
                                "%s: tensor %s is %s (F32, F16 or BF16 expected)", path, t->name,
                                mt_st_dtype_name(t->dtype));
        /* a NaN or an infinity here would only show up later, as garbage text or NaN
         * losses; checked now, before anything is attached */
        float *values = mt_malloc((size_t)(rows * cols) * sizeof *values, "adapter tensor", err);
        if (!values) return MT_ERR_NOMEM;
        mt_status fs = mt_st_read_f32(t, values, err);
        if (!fs) fs = mt_check_finite(t->file, t->name, values, (size_t)(rows * cols), err);
        free(values);
        if (fs) return fs;
    }
    for (size_t i = 0; i < m->num_params; i++) {
        const mt_param *p = &m->params[i];
        if (targeted_weight(c, p->name) < 0) continue;
        size_t base_len = strlen(p->name) - strlen(".weight");
        for (int b = 0; b < 2; b++) {
            snprintf(name, sizeof name, PEFT_PREFIX "%.*s.lora_%c.weight", (int)base_len, p->name,
                     b ? 'B' : 'A');
            if (!mt_st_find(st, name))
                return mt_error_set(err, MT_ERR_FORMAT, "%s: tensor %s is missing", path, name);
            expected++;
        }
    }
    /* every file tensor named a targeted projection and each has its two: equal counts
     * mean none is left over */
    if (expected != n || n == 0)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: %zu tensors where the targets give %zu", path, n, expected);
    return MT_OK;
}

static mt_status instantiate(const mt_registry *reg, const peft_config *c,
                             mt_plugin_instance **out, mt_error *err) {
    const mt_plugin *p = mt_registry_find(reg, MT_PLUGIN_ADAPTER, "lora", err);
    if (!p) return MT_ERR_INVALID_ARG;
    const char *targets[MT_PEFT_NUM_MODULES];
    int n = 0;
    if (c->all_linear) targets[n++] = "all-linear";
    else
        for (int k = 0; k < MT_PEFT_NUM_MODULES; k++)
            if (c->target[k]) targets[n++] = mt_peft_modules[k];
    const mt_kv kv[] = {
        {.key = "r", .type = MT_KV_NUMBER, .number = c->r},
        {.key = "alpha", .type = MT_KV_NUMBER, .number = c->alpha},
        {.key = "dropout", .type = MT_KV_NUMBER, .number = 0.0},
        {.key = "target_modules", .type = MT_KV_LIST, .list = targets, .list_len = n},
        {.key = "use_rslora", .type = MT_KV_BOOL, .boolean = c->use_rslora},
    };
    return mt_plugin_instantiate(p, kv, sizeof kv / sizeof kv[0], out, err);
}

/* Copies the file's tensors into the parameters the plugin registered. */
static mt_status load_weights(mt_model *m, const mt_safetensors *st, const char *path,
                              mt_error *err) {
    char name[256];
    for (size_t i = 0; i < m->num_extra; i++) {
        const mt_param_view *v = &m->extra_params[i];
        snprintf(name, sizeof name, PEFT_PREFIX "%s", v->name);
        const mt_st_tensor *t = mt_st_find(st, name);
        if (!t)
            return mt_error_set(err, MT_ERR_FORMAT, "%s: tensor %s is missing", path, name);
        if (v->value.dtype != MT_F32 || v->value.device != MT_DEVICE_CPU || v->value.ndim != 2 ||
            t->ndim != 2 || t->shape[0] != v->value.shape[0] || t->shape[1] != v->value.shape[1])
            return mt_error_set(err, MT_ERR_FORMAT, "%s: tensor %s does not fit the parameter %s",
                                path, name, v->name);
        mt_status s = mt_st_read_f32(t, v->value.data, err);
        if (s) return s;
    }
    if (m->num_extra != mt_st_count(st))
        return mt_error_set(err, MT_ERR_FORMAT, "%s: %zu tensors for %zu LoRA parameters", path,
                            mt_st_count(st), m->num_extra);
    return MT_OK;
}

mt_status mt_peft_attach(mt_model *m, const mt_registry *reg, const char *dir,
                         mt_plugin_instance **out_instance, mt_error *err) {
    *out_instance = NULL;
    if (m->num_adapters > 0 || m->num_extra > 0)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: the model already has an adapter attached", dir);
    char *cfg_path = mt_path_join(dir, "adapter_config.json", err);
    char *st_path = cfg_path ? mt_path_join(dir, "adapter_model.safetensors", err) : NULL;
    mt_safetensors *st = NULL;
    mt_plugin_instance *inst = NULL;
    peft_config c;
    mt_status s = st_path ? MT_OK : MT_ERR_NOMEM;
    if (!s) s = read_config(cfg_path, &c, err);
    if (!s) s = mt_st_open(st_path, &st, err);
    if (!s) s = check_tensors(m, &c, st, st_path, err);
    if (!s) s = instantiate(reg, &c, &inst, err);
    if (!s) {
        s = mt_model_attach_adapter(m, inst->desc->vtable, inst->state, err);
        /* attached or not, the model may point into the instance now: hand it over */
        *out_instance = inst;
        if (!s) s = load_weights(m, st, st_path, err);
        if (!s) mt_model_set_training(m, 0);
    }
    mt_st_close(st);
    free(st_path);
    free(cfg_path);
    return s;
}

mt_status mt_peft_load(mt_model *m, const char *dir, mt_registry **reg,
                       mt_plugin_instance **inst, mt_error *err) {
    *inst = NULL;
    mt_status s = mt_registry_open(NULL, 0, reg, err);
    return s ? s : mt_peft_attach(m, *reg, dir, inst, err);
}
