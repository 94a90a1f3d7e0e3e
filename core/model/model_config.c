/* model_config.c — the model configuration: Hugging Face config.json, named presets,
 * validation, and the rotary frequencies. */
#include <float.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h"
#include "model/model.h"

/* Reads an optional integer key; absent leaves *out unchanged. */
static mt_status get_int(json_t *obj, const char *key, int required, int *out, const char *source,
                         mt_error *err) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        if (required)
            return mt_error_set(err, MT_ERR_FORMAT, "%s: missing required key \"%s\"", source, key);
        return MT_OK;
    }
    if (!json_is_integer(v)) {
        if (json_is_real(v))
            return mt_error_set(err, MT_ERR_FORMAT, "%s: key \"%s\": expected an integer, found %g",
                                source, key, json_real_value(v));
        return mt_error_set(err, MT_ERR_FORMAT, "%s: key \"%s\": expected an integer, found %s", source,
                            key, mt_json_kind(v));
    }
    /* every integer key is a size, which the kernels take as int; 0 passes here so that
     * mt_config_validate says "must be positive" for it as for a size left unset */
    json_int_t x = json_integer_value(v);
    if (x < 0 || x > 0x7fffffff)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: key \"%s\": %lld is out of range (expected a positive integer up to "
                            "2147483647)",
                            source, key, (long long)x);
    *out = (int)x;
    return MT_OK;
}

static mt_status get_num(json_t *obj, const char *key, double *out, const char *source,
                         mt_error *err) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) return MT_OK;
    if (!json_is_number(v))
        return mt_error_set(err, MT_ERR_FORMAT, "%s: key \"%s\": expected a number, found %s", source,
                            key, mt_json_kind(v));
    *out = json_number_value(v);
    return MT_OK;
}

static mt_status get_bool(json_t *obj, const char *key, int *out, const char *source,
                          mt_error *err) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) return MT_OK;
    if (!json_is_boolean(v))
        return mt_error_set(err, MT_ERR_FORMAT, "%s: key \"%s\": expected true or false", source,
                            key);
    *out = json_is_true(v);
    return MT_OK;
}

/* transformers < 5 writes "rope_scaling" (with "type" or "rope_type") and a top-level
 * "rope_theta"; transformers 5 writes "rope_parameters" holding both. */
static mt_status parse_rope(json_t *root, mt_model_config *cfg, const char *source, mt_error *err) {
    mt_status st;
    if ((st = get_num(root, "rope_theta", &cfg->rope_theta, source, err))) return st;
    json_t *rope = json_object_get(root, "rope_parameters");
    const char *key = "rope_parameters";
    if (!rope || json_is_null(rope)) {
        rope = json_object_get(root, "rope_scaling");
        key = "rope_scaling";
    }
    if (!rope || json_is_null(rope)) return MT_OK;
    if (!json_is_object(rope))
        return mt_error_set(err, MT_ERR_FORMAT, "%s: key \"%s\": expected an object", source, key);
    if ((st = get_num(rope, "rope_theta", &cfg->rope_theta, source, err))) return st;
    const char *type_key = "rope_type";
    json_t *type = json_object_get(rope, type_key);
    if (!type) type = json_object_get(rope, type_key = "type");
    /* a type that is not a string would otherwise silently mean "default" */
    if (type && !json_is_null(type) && !json_is_string(type))
        return mt_error_set(err, MT_ERR_FORMAT, "%s: key \"%s.%s\": expected a string, found %s",
                            source, key, type_key, mt_json_kind(type));
    const char *name = type && json_is_string(type) ? json_string_value(type) : "default";
    if (strcmp(name, "default") == 0) {
        cfg->rope_type = MT_ROPE_DEFAULT;
        return MT_OK;
    }
    cfg->rope_factor = 1.0;
    if ((st = get_num(rope, "factor", &cfg->rope_factor, source, err))) return st;
    if (!(cfg->rope_factor >= MT_ROPE_FACTOR_MIN && cfg->rope_factor <= MT_ROPE_FACTOR_MAX))
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: key \"%s.factor\": expected a number from %g to %g, found %g", source,
                            key, MT_ROPE_FACTOR_MIN, MT_ROPE_FACTOR_MAX, cfg->rope_factor);
    if (strcmp(name, "linear") == 0) {
        cfg->rope_type = MT_ROPE_LINEAR;
        return MT_OK;
    }
    if (strcmp(name, "llama3") == 0) {
        cfg->rope_type = MT_ROPE_LLAMA3;
        cfg->rope_low_freq_factor = 1.0;
        cfg->rope_high_freq_factor = 4.0;
        if ((st = get_num(rope, "low_freq_factor", &cfg->rope_low_freq_factor, source, err)) ||
            (st = get_num(rope, "high_freq_factor", &cfg->rope_high_freq_factor, source, err)) ||
            (st = get_int(rope, "original_max_position_embeddings", 1,
                          &cfg->rope_original_max_position_embeddings, source, err)))
            return st;
        const struct {
            const char *name;
            double value;
        } freq[] = {{"low_freq_factor", cfg->rope_low_freq_factor},
                    {"high_freq_factor", cfg->rope_high_freq_factor}};
        for (int i = 0; i < 2; i++)
            if (!(freq[i].value >= MT_ROPE_FACTOR_MIN && freq[i].value <= MT_ROPE_FACTOR_MAX))
                return mt_error_set(err, MT_ERR_FORMAT,
                                    "%s: key \"%s.%s\": expected a number from %g to %g, found %g",
                                    source, key, freq[i].name, MT_ROPE_FACTOR_MIN, MT_ROPE_FACTOR_MAX,
                                    freq[i].value);
        if (cfg->rope_original_max_position_embeddings <= 0)
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: key \"%s.original_max_position_embeddings\": must be positive, "
                                "found %d",
                                source, key, cfg->rope_original_max_position_embeddings);
        if (!(cfg->rope_high_freq_factor > cfg->rope_low_freq_factor))
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: %s: high_freq_factor (%g) must exceed low_freq_factor (%g)",
                                source, key, cfg->rope_high_freq_factor, cfg->rope_low_freq_factor);
        return MT_OK;
    }
    return mt_error_set(err, MT_ERR_UNSUPPORTED,
                        "%s: %s type \"%s\" is not supported (supported: default, linear, llama3)",
                        source, key, name);
}

mt_status mt_config_parse(const char *text, size_t len, const char *source, mt_model_config *cfg,
                          mt_error *err) {
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return mt_error_set(err, MT_ERR_FORMAT, "%s: line %d, column %d: %s", source, jerr.line,
                            jerr.column, jerr.text);
    mt_status st = MT_OK;
    memset(cfg, 0, sizeof *cfg);
    cfg->rms_norm_eps = 1e-6f;
    cfg->rope_theta = 10000.0;
    cfg->max_position_embeddings = 2048;
    cfg->tie_word_embeddings = 1; /* transformers' PretrainedConfig default */
    if (!json_is_object(root)) {
        st = mt_error_set(err, MT_ERR_FORMAT, "%s: expected a JSON object", source);
        goto done;
    }
    json_t *mt = json_object_get(root, "model_type");
    const char *model_type = mt && json_is_string(mt) ? json_string_value(mt) : "llama";
    static const char *known[] = {"llama", "qwen2", "mistral", "smollm2", "smollm3"};
    int ok = 0;
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++) ok |= !strcmp(model_type, known[i]);
    if (!ok) {
        st = mt_error_set(err, MT_ERR_UNSUPPORTED,
                          "%s: model_type \"%s\" is not a supported Llama-family decoder "
                          "(supported: llama, qwen2, mistral)",
                          source, model_type);
        goto done;
    }
    snprintf(cfg->model_type, sizeof cfg->model_type, "%s", model_type);
    int attention_bias = 0;
    double eps = cfg->rms_norm_eps;
    cfg->num_kv_heads = -1;
    cfg->head_dim = -1;
    if ((st = get_int(root, "hidden_size", 1, &cfg->hidden_size, source, err)) ||
        (st = get_int(root, "intermediate_size", 1, &cfg->intermediate_size, source, err)) ||
        (st = get_int(root, "num_hidden_layers", 1, &cfg->num_layers, source, err)) ||
        (st = get_int(root, "num_attention_heads", 1, &cfg->num_heads, source, err)) ||
        (st = get_int(root, "num_key_value_heads", 0, &cfg->num_kv_heads, source, err)) ||
        (st = get_int(root, "head_dim", 0, &cfg->head_dim, source, err)) ||
        (st = get_int(root, "vocab_size", 1, &cfg->vocab_size, source, err)) ||
        (st = get_int(root, "max_position_embeddings", 0, &cfg->max_position_embeddings, source,
                      err)) ||
        (st = get_num(root, "rms_norm_eps", &eps, source, err)) ||
        (st = get_bool(root, "tie_word_embeddings", &cfg->tie_word_embeddings, source, err)) ||
        (st = get_bool(root, "attention_bias", &attention_bias, source, err)) ||
        (st = get_bool(root, "mlp_bias", &cfg->mlp_bias, source, err)) ||
        (st = parse_rope(root, cfg, source, err)))
        goto done;
    /* checked as written: 1e-50 would become 0 in fp32 and be reported as "found 0" */
    if (!(eps > 0.0) || !((float)eps > 0.0f) || !isfinite((float)eps)) {
        st = mt_error_set(err, MT_ERR_FORMAT,
                          "%s: key \"rms_norm_eps\": must be a positive number that fp32 holds (%g "
                          "to %g), found %g",
                          source, (double)FLT_TRUE_MIN, (double)FLT_MAX, eps);
        goto done;
    }
    cfg->rms_norm_eps = (float)eps;
    if (cfg->num_kv_heads < 0) cfg->num_kv_heads = cfg->num_heads;
    if (cfg->head_dim < 0 && cfg->num_heads > 0) {
        if (cfg->hidden_size % cfg->num_heads != 0) {
            st = mt_error_set(err, MT_ERR_FORMAT,
                              "%s: key \"hidden_size\": %d is not a multiple of num_attention_heads (%d), "
                              "and there is no head_dim",
                              source, cfg->hidden_size, cfg->num_heads);
            goto done;
        }
        cfg->head_dim = cfg->hidden_size / cfg->num_heads;
    }
    if (!strcmp(model_type, "qwen2")) {
        cfg->qkv_bias = 1; /* Qwen2 always has q/k/v biases and none on o_proj */
    } else {
        cfg->qkv_bias = attention_bias;
        cfg->o_bias = attention_bias;
    }
    json_t *hidden_act = json_object_get(root, "hidden_act");
    if (hidden_act && json_is_string(hidden_act) && strcmp(json_string_value(hidden_act), "silu")) {
        st = mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: hidden_act \"%s\" is not supported (silu)",
                          source, json_string_value(hidden_act));
        goto done;
    }
    json_t *sliding = json_object_get(root, "use_sliding_window");
    if (sliding && json_is_true(sliding)) {
        st = mt_error_set(err, MT_ERR_UNSUPPORTED,
                          "%s: use_sliding_window is true; sliding-window attention is not supported",
                          source);
        goto done;
    }
    st = mt_config_validate(cfg, source, err);
done:
    json_decref(root);
    return st;
}

mt_status mt_config_load(const char *path, mt_model_config *cfg, mt_error *err) {
    char *text;
    size_t len;
    mt_status st = mt_read_file(path, &text, &len, err);
    if (st) return st;
    st = mt_config_parse(text, len, path, cfg, err);
    free(text);
    return st;
}

mt_status mt_config_validate(const mt_model_config *c, const char *source, mt_error *err) {
    struct {
        const char *key;
        int value;
    } positive[] = {{"hidden_size", c->hidden_size},
                    {"intermediate_size", c->intermediate_size},
                    {"num_hidden_layers", c->num_layers},
                    {"num_attention_heads", c->num_heads},
                    {"num_key_value_heads", c->num_kv_heads},
                    {"head_dim", c->head_dim},
                    {"vocab_size", c->vocab_size},
                    {"max_position_embeddings", c->max_position_embeddings}};
    for (size_t i = 0; i < sizeof positive / sizeof positive[0]; i++)
        if (positive[i].value <= 0)
            return mt_error_set(err, MT_ERR_FORMAT, "%s: key \"%s\": must be positive, found %d", source,
                                positive[i].key, positive[i].value);
    if (c->num_heads % c->num_kv_heads != 0)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: key \"num_key_value_heads\": %d does not divide num_attention_heads (%d)",
                            source, c->num_kv_heads, c->num_heads);
    if (c->head_dim % 2 != 0)
        return mt_error_set(err, MT_ERR_FORMAT, "%s: key \"head_dim\": must be even (rotary pairs), found %d",
                            source, c->head_dim);
    if (!(c->rms_norm_eps > 0.0f) || !isfinite(c->rms_norm_eps))
        return mt_error_set(err, MT_ERR_FORMAT, "%s: key \"rms_norm_eps\": must be a positive number, found %g",
                            source, (double)c->rms_norm_eps);
    /* the frequencies 1 / rope_theta^(2i/head_dim) are computed in fp32: a base of at
     * least 1 keeps them at most 1, and one past FLT_MAX would be an infinity */
    if (!(c->rope_theta >= 1.0 && c->rope_theta <= FLT_MAX))
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: key \"rope_theta\": must be a positive number from 1 to %g (fp32), "
                            "found %g",
                            source, (double)FLT_MAX, c->rope_theta);
    if (c->rope_type != MT_ROPE_DEFAULT && c->rope_type != MT_ROPE_LINEAR && c->rope_type != MT_ROPE_LLAMA3)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: rope type %d is not one of default, linear, llama3",
                            source, (int)c->rope_type);
    /* parse_rope reports these with their exact key; configs from GGUF metadata or built
     * in code meet the same bounds here */
    if (c->rope_type != MT_ROPE_DEFAULT &&
        !(c->rope_factor >= MT_ROPE_FACTOR_MIN && c->rope_factor <= MT_ROPE_FACTOR_MAX))
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: key \"rope_scaling.factor\": expected a number from %g to %g, found %g",
                            source, MT_ROPE_FACTOR_MIN, MT_ROPE_FACTOR_MAX, c->rope_factor);
    if (c->rope_type == MT_ROPE_LLAMA3 &&
        (!(c->rope_low_freq_factor >= MT_ROPE_FACTOR_MIN && c->rope_low_freq_factor <= MT_ROPE_FACTOR_MAX) ||
         !(c->rope_high_freq_factor > c->rope_low_freq_factor && c->rope_high_freq_factor <= MT_ROPE_FACTOR_MAX) ||
         c->rope_original_max_position_embeddings <= 0))
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: llama3 rope scaling: expected %g <= low_freq_factor < high_freq_factor <= %g "
                            "and a positive original_max_position_embeddings, found %g, %g and %d",
                            source, MT_ROPE_FACTOR_MIN, MT_ROPE_FACTOR_MAX, c->rope_low_freq_factor,
                            c->rope_high_freq_factor, c->rope_original_max_position_embeddings);
    /* Sizes the kernels take as int, and that keep a lying config from planning an
     * allocation of terabytes: each key against its bound, then the products. */
    struct {
        const char *key;
        int64_t value, max;
    } bounded[] = {{"hidden_size", c->hidden_size, 1 << 20},
                   {"intermediate_size", c->intermediate_size, 1 << 22},
                   {"vocab_size", c->vocab_size, 1 << 24},
                   {"num_hidden_layers", c->num_layers, 4096},
                   {"num_attention_heads", c->num_heads, 1 << 14},
                   {"head_dim", c->head_dim, 1 << 14},
                   {"num_attention_heads x head_dim", (int64_t)c->num_heads * c->head_dim, 1 << 20}};
    for (size_t i = 0; i < sizeof bounded / sizeof bounded[0]; i++)
        if (bounded[i].value > bounded[i].max)
            return mt_error_set(err, MT_ERR_UNSUPPORTED,
                                "%s: key \"%s\": %lld exceeds the supported maximum %lld", source,
                                bounded[i].key, (long long)bounded[i].value, (long long)bounded[i].max);
    /* parameters of one layer and of the whole model, in 64 bits: at most 2^40 values
     * (4 TiB of fp32; a 70B model has 2^36) */
    const int64_t C = c->hidden_size, F = c->intermediate_size, HD = (int64_t)c->num_heads * c->head_dim,
                  KVD = (int64_t)c->num_kv_heads * c->head_dim;
    const int64_t per_layer = C * HD + 2 * C * KVD + HD * C + 3 * C * F + 2 * C;
    const int64_t total = per_layer * c->num_layers + 2 * (int64_t)c->vocab_size * C;
    if (total > ((int64_t)1 << 40))
        return mt_error_set(err, MT_ERR_UNSUPPORTED,
                            "%s: the sizes (hidden_size %d, intermediate_size %d, num_hidden_layers %d, "
                            "vocab_size %d) make %lld parameters, more than the supported 2^40",
                            source, c->hidden_size, c->intermediate_size, c->num_layers, c->vocab_size,
                            (long long)total);
    return MT_OK;
}

mt_status mt_config_preset(const char *name, mt_model_config *cfg, mt_error *err) {
    memset(cfg, 0, sizeof *cfg);
    snprintf(cfg->model_type, sizeof cfg->model_type, "llama");
    cfg->rms_norm_eps = 1e-5f;
    cfg->rope_theta = 10000.0;
    if (!strcmp(name, "tiny")) {
        *cfg = (mt_model_config){.hidden_size = 64, .intermediate_size = 172, .num_layers = 2,
                                 .num_heads = 4, .num_kv_heads = 2, .head_dim = 16,
                                 .vocab_size = 512, .max_position_embeddings = 512,
                                 .rms_norm_eps = 1e-5f, .rope_theta = 10000.0,
                                 .tie_word_embeddings = 1};
    } else if (!strcmp(name, "smollm2-135m")) {
        /* HuggingFaceTB/SmolLM2-135M(-Instruct) config.json */
        *cfg = (mt_model_config){.hidden_size = 576, .intermediate_size = 1536, .num_layers = 30,
                                 .num_heads = 9, .num_kv_heads = 3, .head_dim = 64,
                                 .vocab_size = 49152, .max_position_embeddings = 8192,
                                 .rms_norm_eps = 1e-5f, .rope_theta = 100000.0,
                                 .tie_word_embeddings = 1};
    } else if (!strcmp(name, "llama-1b")) {
        /* meta-llama/Llama-3.2-1B config.json */
        *cfg = (mt_model_config){.hidden_size = 2048, .intermediate_size = 8192, .num_layers = 16,
                                 .num_heads = 32, .num_kv_heads = 8, .head_dim = 64,
                                 .vocab_size = 128256, .max_position_embeddings = 131072,
                                 .rms_norm_eps = 1e-5f, .rope_theta = 500000.0,
                                 .rope_type = MT_ROPE_LLAMA3, .rope_factor = 32.0,
                                 .rope_low_freq_factor = 1.0, .rope_high_freq_factor = 4.0,
                                 .rope_original_max_position_embeddings = 8192,
                                 .tie_word_embeddings = 1};
    } else {
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "unknown model shape \"%s\" (known: tiny, smollm2-135m, llama-1b)", name);
    }
    snprintf(cfg->model_type, sizeof cfg->model_type, "llama");
    return MT_OK;
}

void mt_rope_inv_freq(const mt_model_config *cfg, float *inv_freq) {
    const int D = cfg->head_dim;
    const float theta = (float)cfg->rope_theta;
    /* transformers: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), in fp32 */
    for (int i = 0; i < D / 2; i++) {
        float exponent = (float)(2 * i) / (float)D;
        inv_freq[i] = 1.0f / powf(theta, exponent);
    }
    if (cfg->rope_type == MT_ROPE_LINEAR) {
        for (int i = 0; i < D / 2; i++) inv_freq[i] = inv_freq[i] / (float)cfg->rope_factor;
    } else if (cfg->rope_type == MT_ROPE_LLAMA3) {
        /* Llama 3.1: keep high frequencies, divide low ones by factor, and blend
         * the band between (transformers' _compute_llama3_parameters). */
        const double factor = cfg->rope_factor;
        const double low = cfg->rope_low_freq_factor, high = cfg->rope_high_freq_factor;
        const double old_len = cfg->rope_original_max_position_embeddings;
        const double low_freq_wavelen = old_len / low;
        const double high_freq_wavelen = old_len / high;
        for (int i = 0; i < D / 2; i++) {
            float f = inv_freq[i];
            float wavelen = (float)(2.0 * 3.14159265358979323846) / f;
            float scaled = wavelen > low_freq_wavelen ? f / (float)factor : f;
            if (!(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen)) {
                float smooth = ((float)old_len / wavelen - (float)low) / (float)(high - low);
                scaled = (1.0f - smooth) * scaled / (float)factor + smooth * scaled;
            }
            inv_freq[i] = scaled;
        }
    }
}

size_t mt_config_num_params(const mt_model_config *c) {
    size_t C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size;
    size_t qd = (size_t)c->num_heads * c->head_dim, kvd = (size_t)c->num_kv_heads * c->head_dim;
    size_t per_layer = 2 * C + C * qd + 2 * C * kvd + qd * C + 3 * C * F;
    if (c->qkv_bias) per_layer += qd + 2 * kvd;
    if (c->o_bias) per_layer += C;
    if (c->mlp_bias) per_layer += 2 * F + C;
    size_t n = (size_t)c->num_layers * per_layer + (size_t)c->vocab_size * C + C;
    if (!c->tie_word_embeddings) n += (size_t)c->vocab_size * C;
    return n;
}

void mt_model_forward_flops(const mt_model_config *c, int B, int T, double *linear,
                            double *attention) {
    double tokens = (double)B * T;
    double C = c->hidden_size, F = c->intermediate_size;
    double qd = (double)c->num_heads * c->head_dim, kvd = (double)c->num_kv_heads * c->head_dim;
    double per_layer = C * qd + 2 * C * kvd + qd * C + 3 * C * F;
    *linear = tokens * 2.0 * (c->num_layers * per_layer + (double)c->vocab_size * C);
    /* causal: QK^T and PV over on average (T+1)/2 keys per query */
    *attention = tokens * c->num_layers * 2.0 * 2.0 * c->num_heads * c->head_dim * ((T + 1) / 2.0);
}
