/* lora_peft.h — LoRA as a PEFT adapter directory: the vtable's save, import_options and
 * load (plugin ABI 2), for lora.c and qlora.c, which include this file after their state
 * and helpers (it uses struct lora, lora_layer, lora_modules and the global host).
 *
 * The host writes and reads the files (adapter_config.json, adapter_model.safetensors
 * with PEFT's "base_model.model." prefix, which it adds and strips); this file says what
 * is in them for LoRA, as PEFT's LoraConfig and save_pretrained write it:
 *
 *   config  peft_type "LORA", r, lora_alpha, lora_dropout, target_modules (the modules
 *           that got a branch, in lora_modules' order), use_rslora, and LoraConfig's
 *           other keys at the values this plugin implements (bias "none", no DoRA, no
 *           patterns, fan_in_fan_out false, init_lora_weights true, ...). The host adds
 *           base_model_name_or_path, task_type, inference_mode, auto_mapping, revision.
 *   tensors "<projection>.lora_A.weight" (r,in) and "<projection>.lora_B.weight" (out,r),
 *           F32, the names the adapter registers its parameters under.
 *
 * import_options reads a directory's config (PEFT's own save_pretrained output or ours)
 * and refuses, naming the key, what this plugin cannot apply: peft_type other than
 * "LORA", bias other than "none", and any of the keys in lora_refused_keys set to
 * something (not null, false, 0, "", [] or {}); target_modules must be a list of module
 * names or paths whose last component is a projection LoRA targets (PEFT saves
 * "all-linear" expanded to full paths), or the string "all-linear" or one such name
 * (PEFT reads any other string as a regular expression). It also checks the tensors'
 * names against the targets, since that needs no model. Keys PEFT added that change
 * nothing at inference are ignored. The instance gets r, alpha, use_rslora and
 * target_modules from the file, and dropout 0 (loading is for inference).
 *
 * load (after attach) reads every branch's A and B, F32 (the host converts F16 and
 * BF16), checks every shape before it writes any weight, and uploads them. */

#include <stdlib.h>

/* Keys whose presence (anything but null, false, 0, "", [] or {}) asks for something
 * this plugin cannot do, and why. */
static const struct {
    const char *key, *why;
} lora_refused_keys[] = {
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

#define LORA_PEFT_CONFIG "adapter_config.json"
#define LORA_PEFT_WEIGHTS "adapter_model.safetensors"
/* PEFT's prefix of every tensor in the file: the host strips it, messages name the
 * tensor as the file stores it, so that it can be found there */
#define LORA_PEFT_PREFIX "base_model.model."
#define LORA_PEFT_MODULE_LIST "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"

/* ---- JSON values as the host gives them: compact text ---- */

static int lora_json_absent(const char *v) { return !v || !strcmp(v, "null"); }

/* Whether a value asks for something: not null, false, 0, "", [] or {}. */
static int lora_json_truthy(const char *v) {
    if (lora_json_absent(v) || !strcmp(v, "false") || !strcmp(v, "\"\"") || !strcmp(v, "[]") ||
        !strcmp(v, "{}"))
        return 0;
    if ((v[0] >= '0' && v[0] <= '9') || v[0] == '-') {
        char *end;
        double x = strtod(v, &end);
        return !(end != v && !*end && x == 0.0);
    }
    return 1;
}

/* A JSON string without escapes into buf (NUL-terminated); 0 when v is none such or
 * does not fit. *next (when given) receives the text after the closing quote. */
static int lora_json_string(const char *v, char *buf, size_t size, const char **next) {
    if (!v || *v != '"') return 0;
    size_t n = 0;
    for (v++; *v && *v != '"'; v++) {
        if (*v == '\\' || n + 1 >= size) return 0; /* no projection name has an escape */
        buf[n++] = *v;
    }
    if (*v != '"') return 0;
    buf[n] = '\0';
    if (next) *next = v + 1;
    return 1;
}

/* The index in lora_modules of a module name or path's last component, or -1. */
static int lora_module_of_path(const char *s, size_t len) {
    const char *last = s;
    for (size_t i = 0; i < len; i++)
        if (s[i] == '.') last = s + i + 1;
    size_t n = len - (size_t)(last - s);
    for (int m = 0; m < LORA_N_MODULES; m++)
        if (strlen(lora_modules[m]) == n && !strncmp(last, lora_modules[m], n)) return m;
    return -1;
}

/* A float as its shortest decimal that reads back to the same float; with a ".0" when
 * it would read as an integer, so that JSON keeps it a real (PEFT writes 0.0). */
static void lora_format_real(char *buf, size_t size, float x) {
    for (int prec = 6; prec <= 9; prec++) {
        snprintf(buf, size, "%.*g", prec, (double)x);
        if (strtof(buf, NULL) == x) break;
    }
    if (!strpbrk(buf, ".eEn")) {
        size_t n = strlen(buf);
        if (n + 3 <= size) memcpy(buf + n, ".0", 3);
    }
}

/* ---- save ---- */

static mt_status lora_put(mt_adapter_io *io, const char *key, const char *json, mt_error *err) {
    return host->io_put_config(io, key, json, err);
}

static mt_status lora_save(void *state, mt_adapter_io *io, mt_error *err) {
    lora *lo = state;
    unsigned wrapped = 0;
    mt_status st = MT_OK;
    for (int i = 0; !st && i < lo->n_layers; i++) {
        lora_layer *L = &lo->layers[i];
        if (!L->r) continue; /* qlora: a quantized projection without a branch */
        mt_linear_info info = {.size = sizeof info};
        host->linear_info(L->lin, &info);
        int m = lora_module_index(info.module);
        if (m >= 0) wrapped |= 1u << m;
        st = host->io_put_tensor(io, L->name_A, &L->A, err);
        if (!st) st = host->io_put_tensor(io, L->name_B, &L->B, err);
    }
    if (st) return st;
    if (!lo->attached || !wrapped)
        return host->error(err, MT_ERR_INVALID_ARG,
                           "%s: nothing to save: the adapter is not attached to a model",
                           lo->plugin);
    char targets[160] = "[", buf[64];
    for (int m = 0; m < LORA_N_MODULES; m++) {
        if (!((wrapped >> m) & 1)) continue;
        size_t n = strlen(targets);
        snprintf(targets + n, sizeof targets - n, "%s\"%s\"", n > 1 ? "," : "", lora_modules[m]);
    }
    strcat(targets, "]"); /* 7 names of at most 11 bytes: well within the buffer */
    /* LoraConfig's keys at the values this plugin implements: PEFT reads them back as
     * this adapter */
    static const char *const fixed[][2] = {
        {"alpha_pattern", "{}"},         {"bias", "\"none\""},
        {"fan_in_fan_out", "false"},     {"init_lora_weights", "true"},
        {"layer_replication", "null"},   {"layers_pattern", "null"},
        {"layers_to_transform", "null"}, {"loftq_config", "{}"},
        {"lora_bias", "false"},          {"megatron_config", "null"},
        {"megatron_core", "\"megatron.core\""}, {"modules_to_save", "null"},
        {"peft_type", "\"LORA\""},       {"rank_pattern", "{}"},
        {"use_dora", "false"},
    };
    for (size_t i = 0; !st && i < sizeof fixed / sizeof fixed[0]; i++)
        st = lora_put(io, fixed[i][0], fixed[i][1], err);
    /* lora_alpha: an integer when it is one (PEFT's default 8, 16, 32 are ints) */
    if (lo->alpha == floorf(lo->alpha) && fabsf(lo->alpha) < 9.0e15f)
        snprintf(buf, sizeof buf, "%.0f", (double)lo->alpha);
    else
        lora_format_real(buf, sizeof buf, lo->alpha);
    if (!st) st = lora_put(io, "lora_alpha", buf, err);
    lora_format_real(buf, sizeof buf, lo->dropout);
    if (!st) st = lora_put(io, "lora_dropout", buf, err);
    snprintf(buf, sizeof buf, "%d", lo->r);
    if (!st) st = lora_put(io, "r", buf, err);
    if (!st) st = lora_put(io, "target_modules", targets, err);
    if (!st) st = lora_put(io, "use_rslora", lo->use_rslora ? "true" : "false", err);
    return st;
}

/* ---- import_options ---- */

/* target_modules into *targets (bits of lora_modules; all of them for "all-linear"). */
static mt_status lora_parse_targets(const mt_host *h, const char *v, unsigned *targets,
                                    mt_error *err) {
    char name[256];
    *targets = 0;
    if (lora_json_absent(v))
        return h->error(err, MT_ERR_FORMAT, LORA_PEFT_CONFIG ": target_modules is missing");
    if (*v == '"') {
        /* PEFT treats a string as a regular expression matched against module paths,
         * except "all-linear"; only the plain names are taken here */
        int ok = lora_json_string(v, name, sizeof name, NULL);
        int m = ok ? lora_module_of_path(name, strlen(name)) : -1;
        if (ok && !strcmp(name, "all-linear")) *targets = (1u << LORA_N_MODULES) - 1;
        else if (m >= 0 && !strchr(name, '.')) *targets = 1u << m;
        else
            return h->error(err, MT_ERR_UNSUPPORTED,
                            LORA_PEFT_CONFIG ": target_modules: %s is not all-linear or a "
                            "projection name (regular expressions are not supported; list the "
                            "modules)", v);
        return MT_OK;
    }
    if (*v != '[' || !strcmp(v, "[]"))
        return h->error(err, MT_ERR_FORMAT,
                        LORA_PEFT_CONFIG ": target_modules must be a non-empty list of strings "
                        "or a string");
    const char *p = v + 1;
    for (int i = 0;; i++) {
        if (!lora_json_string(p, name, sizeof name, &p))
            return h->error(err, MT_ERR_FORMAT,
                            LORA_PEFT_CONFIG ": target_modules[%d] is not a module name "
                            "(a string without escapes)", i);
        int m = lora_module_of_path(name, strlen(name));
        if (m < 0)
            return h->error(err, MT_ERR_UNSUPPORTED,
                            LORA_PEFT_CONFIG ": target_modules: '%s' is not one of "
                            LORA_PEFT_MODULE_LIST, name);
        *targets |= 1u << m;
        if (*p == ']') return MT_OK;
        if (*p++ != ',')
            return h->error(err, MT_ERR_FORMAT, LORA_PEFT_CONFIG ": target_modules is malformed");
    }
}

/* The tensors' names: each is the lora_A or lora_B of a targeted projection. Their
 * shapes and whether the model has them are load's (they need the attached model). */
static mt_status lora_check_names(const mt_host *h, mt_adapter_io *io, unsigned targets,
                                  mt_error *err) {
    static const char suffix_a[] = ".lora_A.weight", suffix_b[] = ".lora_B.weight";
    const size_t sl = sizeof suffix_a - 1;
    int i = 0;
    for (const char *name; (name = h->io_tensor_name(io, i)) != NULL; i++) {
        size_t len = strlen(name);
        if (len <= sl || (strcmp(name + len - sl, suffix_a) && strcmp(name + len - sl, suffix_b)))
            return h->error(err, MT_ERR_FORMAT,
                            LORA_PEFT_WEIGHTS ": tensor " LORA_PEFT_PREFIX "%s is not a LoRA weight "
                            "(<module>.lora_A.weight or <module>.lora_B.weight)", name);
        const size_t base = len - sl;
        int m = lora_module_of_path(name, base);
        if (m < 0)
            return h->error(err, MT_ERR_FORMAT,
                            LORA_PEFT_WEIGHTS ": tensor " LORA_PEFT_PREFIX "%s: %.*s is not a projection LoRA can "
                            "target (" LORA_PEFT_MODULE_LIST ")", name, (int)base, name);
        if (!((targets >> m) & 1))
            return h->error(err, MT_ERR_FORMAT,
                            LORA_PEFT_WEIGHTS ": tensor " LORA_PEFT_PREFIX "%s: %s is not among the target_modules "
                            "of " LORA_PEFT_CONFIG, name, lora_modules[m]);
    }
    if (i == 0)
        return h->error(err, MT_ERR_FORMAT,
                        LORA_PEFT_WEIGHTS ": no tensor: every LoRA weight (<module>.lora_A.weight, "
                        ".lora_B.weight) is missing");
    return MT_OK;
}

static mt_status lora_import_options(const mt_host *h, mt_adapter_io *io, mt_error *err) {
    char type[64];
    const char *pt = h->io_get_config(io, "peft_type");
    if (!lora_json_string(pt, type, sizeof type, NULL) || strcmp(type, "LORA") != 0)
        return h->error(err, MT_ERR_UNSUPPORTED,
                        LORA_PEFT_CONFIG ": peft_type is %s, only \"LORA\" is supported",
                        pt ? pt : "missing");
    const char *r = h->io_get_config(io, "r");
    char *end = NULL;
    long long rv = r ? strtoll(r, &end, 10) : 0;
    if (!r || end == r || *end || rv < 1 || rv > 65536)
        return h->error(err, MT_ERR_FORMAT, LORA_PEFT_CONFIG ": r must be an integer in [1, 65536]");
    const char *alpha = h->io_get_config(io, "lora_alpha");
    double av = alpha ? strtod(alpha, &end) : -1.0;
    if (!alpha || end == alpha || *end || !(av >= 0.0))
        return h->error(err, MT_ERR_FORMAT,
                        LORA_PEFT_CONFIG ": lora_alpha must be a non-negative number");
    const char *bias = h->io_get_config(io, "bias");
    if (!lora_json_absent(bias) && strcmp(bias, "\"none\"") != 0)
        return h->error(err, MT_ERR_UNSUPPORTED,
                        LORA_PEFT_CONFIG ": bias must be \"none\" (trained biases are not "
                        "supported), found %s", bias);
    const char *rs = h->io_get_config(io, "use_rslora");
    if (!lora_json_absent(rs) && strcmp(rs, "true") && strcmp(rs, "false"))
        return h->error(err, MT_ERR_FORMAT, LORA_PEFT_CONFIG ": use_rslora must be true or false");
    for (size_t i = 0; i < sizeof lora_refused_keys / sizeof lora_refused_keys[0]; i++)
        if (lora_json_truthy(h->io_get_config(io, lora_refused_keys[i].key)))
            return h->error(err, MT_ERR_UNSUPPORTED,
                            LORA_PEFT_CONFIG ": %s is set (%s): not supported",
                            lora_refused_keys[i].key, lora_refused_keys[i].why);
    unsigned targets;
    mt_status st = lora_parse_targets(h, h->io_get_config(io, "target_modules"), &targets, err);
    if (!st) st = lora_check_names(h, io, targets, err);
    if (st) return st;
    /* the options an instance needs; dropout 0: a loaded adapter is for inference */
    char list[160] = "";
    for (int m = 0; m < LORA_N_MODULES; m++)
        if ((targets >> m) & 1) {
            size_t n = strlen(list);
            snprintf(list + n, sizeof list - n, "%s%s", n ? "," : "", lora_modules[m]);
        }
    st = h->io_set_option(io, "r", r, err);
    if (!st) st = h->io_set_option(io, "alpha", alpha, err);
    if (!st) st = h->io_set_option(io, "dropout", "0", err);
    if (!st) st = h->io_set_option(io, "target_modules", list, err);
    if (!st) st = h->io_set_option(io, "use_rslora", rs && !strcmp(rs, "true") ? "true" : "false",
                                   err);
    return st;
}

/* ---- load ---- */

/* The saved tensor of one of L's matrices, checked against its shape. */
static mt_status lora_saved(const lora_layer *L, mt_adapter_io *io, int is_b, mt_tensor *t,
                            mt_error *err) {
    const char *name = is_b ? L->name_B : L->name_A;
    mt_status st = host->io_get_tensor(io, name, t, err);
    if (st) return st;
    const int64_t rows = is_b ? L->out : L->r, cols = is_b ? L->r : L->in;
    if (t->dtype != MT_F32) {
        /* the host converts F16 and BF16; what is left is stored as it came */
        static const char *const dtypes[MT_DTYPE_COUNT] = {"F32", "F16", "BF16", "I32", "I64", "U8"};
        return host->error(err, MT_ERR_UNSUPPORTED,
                           "%s: " LORA_PEFT_WEIGHTS ": tensor " LORA_PEFT_PREFIX "%s is %s (F32, "
                           "F16 or BF16 expected)", L->lo->plugin, name,
                           (unsigned)t->dtype < MT_DTYPE_COUNT ? dtypes[t->dtype] : "of another dtype");
    }
    if (t->ndim != 2 || t->shape[0] != rows || t->shape[1] != cols) {
        char got[64];
        return host->error(err, MT_ERR_FORMAT,
                           "%s: " LORA_PEFT_WEIGHTS ": tensor " LORA_PEFT_PREFIX "%s has shape %s, expected "
                           "[%lld, %lld] (r = %d, the projection is %d -> %d)",
                           L->lo->plugin, name, mt_shape_format(got, sizeof got, t->ndim, t->shape),
                           (long long)rows, (long long)cols, L->r, L->in, L->out);
    }
    return MT_OK;
}

static mt_status lora_load(void *state, mt_adapter_io *io, mt_error *err) {
    lora *lo = state;
    if (!lo->attached)
        return host->error(err, MT_ERR_INVALID_ARG, "%s: load before attach", lo->plugin);
    /* every tensor checked before any is written: a refusal leaves the initial weights
     * (B = 0: the model computes as the base) */
    int expected = 0, saved = 0;
    mt_status st = MT_OK;
    mt_tensor t;
    for (int i = 0; !st && i < lo->n_layers; i++) {
        const lora_layer *L = &lo->layers[i];
        if (!L->r) continue;
        st = lora_saved(L, io, 0, &t, err);
        if (!st) st = lora_saved(L, io, 1, &t, err);
        expected += 2;
    }
    if (st) return st;
    while (host->io_tensor_name(io, saved)) saved++;
    /* each saved tensor names a targeted projection (import_options) and each branch
     * found its two: equal counts mean none is left over */
    if (saved != expected)
        return host->error(err, MT_ERR_FORMAT,
                           "%s: " LORA_PEFT_WEIGHTS ": %d tensors where the model's targeted "
                           "projections give %d", lo->plugin, saved, expected);
    for (int i = 0; !st && i < lo->n_layers; i++) {
        lora_layer *L = &lo->layers[i];
        if (!L->r) continue;
        st = lora_saved(L, io, 0, &t, err);
        if (!st) st = host->tensor_upload(&L->A, t.data, err);
        if (!st) st = lora_saved(L, io, 1, &t, err);
        if (!st) st = host->tensor_upload(&L->B, t.data, err);
    }
    return st;
}
