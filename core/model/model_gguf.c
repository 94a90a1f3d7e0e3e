/* model_gguf.c — a Llama-family model from a GGUF file (llama.cpp's format).
 *
 * The configuration comes from the `<arch>.*` metadata of general.architecture
 * ("llama", which covers Mistral, or "qwen2"); every tensor is dequantized to fp32
 * straight into the model's parameter memory. ggml stores a matrix with ne[0] the
 * input dimension (contiguous) and ne[1] the output one: row-major (out,in), exactly
 * transformers' layout.
 *
 * One difference remains: for "llama", llama.cpp's converter permutes the rows of
 * attn_q and attn_k so that ggml's rotary embedding (which rotates adjacent pairs
 * 2i, 2i+1) computes what Hugging Face's rotate_half (pairs i, i + D/2) computes:
 *
 *     gguf = hf.reshape(n_head, 2, D/2, in).swapaxes(1, 2).reshape(n_head*D, in)
 *
 * i.e. GGUF row h*D + 2*i + j holds HF row h*D + j*D/2 + i (j in {0,1}, i < D/2),
 * with n_head = head_count for q and head_count_kv for k. The loader undoes it, so
 * the model computes exactly what transformers computes (which undoes it too). */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/gguf.h"
#include "base/internal.h"
#include "model/model.h"
#include "model/model_identity.h"

/* A metadata integer "<arch>.<key>"; absent keys keep *out when optional. */
static mt_status arch_int(const mt_gguf *g, const char *arch, const char *key, int required,
                          int *out, mt_error *err) {
    char full[128];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    if (!mt_gguf_get(g, full) && !required) return MT_OK;
    int64_t v;
    mt_status st = mt_gguf_get_int(g, full, &v, err);
    if (st) return st;
    if (v <= 0 || v > (1 << 30))
        return mt_error_set(err, MT_ERR_FORMAT, "%s: %s must be a positive size up to %d, found %lld",
                            mt_gguf_path(g), full, 1 << 30, (long long)v);
    *out = (int)v;
    return MT_OK;
}

static mt_status arch_float(const mt_gguf *g, const char *arch, const char *key, double *out,
                            mt_error *err) {
    char full[128];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    if (!mt_gguf_get(g, full)) return MT_OK;
    return mt_gguf_get_float(g, full, out, err);
}

/* Config from the metadata; vocab and tying come from the tensor directory. */
static mt_status read_config(const mt_gguf *g, mt_model_config *cfg, int *permute_qk,
                             mt_error *err) {
    const char *path = mt_gguf_path(g);
    char *arch = NULL;
    mt_status st = mt_gguf_get_string(g, "general.architecture", &arch, err);
    if (st) return st;
    memset(cfg, 0, sizeof *cfg);
    if (!strcmp(arch, "llama") || !strcmp(arch, "mistral")) {
        *permute_qk = 1;
    } else if (!strcmp(arch, "qwen2")) {
        *permute_qk = 0;
        cfg->qkv_bias = 1;
    } else {
        st = mt_error_set(err, MT_ERR_UNSUPPORTED,
                          "%s: general.architecture \"%s\" is not a supported Llama-family "
                          "decoder (supported: llama, mistral, qwen2)",
                          path, arch);
        free(arch);
        return st;
    }
    snprintf(cfg->model_type, sizeof cfg->model_type, "%s", arch);
    cfg->rms_norm_eps = 1e-5f;
    cfg->rope_theta = 10000.0;
    cfg->max_position_embeddings = 2048;
    cfg->head_dim = -1;
    cfg->num_kv_heads = -1;
    double eps = cfg->rms_norm_eps, factor = 0.0;
    if ((st = arch_int(g, arch, "embedding_length", 1, &cfg->hidden_size, err)) ||
        (st = arch_int(g, arch, "feed_forward_length", 1, &cfg->intermediate_size, err)) ||
        (st = arch_int(g, arch, "block_count", 1, &cfg->num_layers, err)) ||
        (st = arch_int(g, arch, "attention.head_count", 1, &cfg->num_heads, err)) ||
        (st = arch_int(g, arch, "attention.head_count_kv", 0, &cfg->num_kv_heads, err)) ||
        (st = arch_int(g, arch, "attention.key_length", 0, &cfg->head_dim, err)) ||
        (st = arch_int(g, arch, "context_length", 0, &cfg->max_position_embeddings, err)) ||
        (st = arch_float(g, arch, "rope.freq_base", &cfg->rope_theta, err)) ||
        (st = arch_float(g, arch, "attention.layer_norm_rms_epsilon", &eps, err)))
        goto done;
    /* named by their GGUF keys here; mt_config_validate would say "rms_norm_eps" and
     * "rope_theta", which this file does not have */
    if (!(eps > 0.0) || !((float)eps > 0.0f) || !isfinite((float)eps)) {
        st = mt_error_set(err, MT_ERR_FORMAT,
                          "%s: %s.attention.layer_norm_rms_epsilon must be a positive number that fp32 "
                          "holds, found %g",
                          path, arch, eps);
        goto done;
    }
    if (!(cfg->rope_theta >= 1.0 && cfg->rope_theta <= FLT_MAX)) {
        st = mt_error_set(err, MT_ERR_FORMAT,
                          "%s: %s.rope.freq_base must be a number from 1 to %g (fp32), found %g", path,
                          arch, (double)FLT_MAX, cfg->rope_theta);
        goto done;
    }
    cfg->rms_norm_eps = (float)eps;
    if (cfg->num_kv_heads < 0) cfg->num_kv_heads = cfg->num_heads;
    if (cfg->head_dim < 0) {
        /* as config.json without head_dim: the heads must split the width evenly, or
         * the rounded-down head size would silently describe another model */
        if (cfg->hidden_size % cfg->num_heads != 0) {
            st = mt_error_set(err, MT_ERR_FORMAT,
                              "%s: %s.embedding_length (%d) is not a multiple of %s.attention.head_count "
                              "(%d), and there is no %s.attention.key_length",
                              path, arch, cfg->hidden_size, arch, cfg->num_heads, arch);
            goto done;
        }
        cfg->head_dim = cfg->hidden_size / cfg->num_heads;
    }

    /* rope scaling: none, or linear (positions divided by factor) */
    char key[128];
    snprintf(key, sizeof key, "%s.rope.scaling.type", arch);
    if (mt_gguf_get(g, key)) {
        char *type = NULL;
        if ((st = mt_gguf_get_string(g, key, &type, err))) goto done;
        if (!strcmp(type, "linear")) {
            cfg->rope_type = MT_ROPE_LINEAR;
        } else if (strcmp(type, "none")) {
            st = mt_error_set(err, MT_ERR_UNSUPPORTED,
                              "%s: %s \"%s\" is not supported (none, linear)", path, key, type);
        }
        free(type);
        if (st) goto done;
        if (cfg->rope_type == MT_ROPE_LINEAR) {
            snprintf(key, sizeof key, "%s.rope.scaling.factor", arch);
            if ((st = mt_gguf_get_float(g, key, &factor, err))) goto done;
        }
    } else {
        /* older files: "<arch>.rope.scale_linear" */
        if ((st = arch_float(g, arch, "rope.scale_linear", &factor, err))) goto done;
        if (factor > 0.0 && factor != 1.0) cfg->rope_type = MT_ROPE_LINEAR;
    }
    if (cfg->rope_type == MT_ROPE_LINEAR) {
        if (!(factor >= MT_ROPE_FACTOR_MIN && factor <= MT_ROPE_FACTOR_MAX)) {
            st = mt_error_set(err, MT_ERR_FORMAT, "%s: linear rope scaling needs a %s.rope.scaling.factor "
                              "from %g to %g, found %g", path, arch, MT_ROPE_FACTOR_MIN,
                              MT_ROPE_FACTOR_MAX, factor);
            goto done;
        }
        cfg->rope_factor = factor;
    }
    if (mt_gguf_find_tensor(g, "rope_freqs.weight")) {
        st = mt_error_set(err, MT_ERR_UNSUPPORTED,
                          "%s: tensor rope_freqs.weight (Llama 3.1-style rope frequency "
                          "scaling) is not supported when loading GGUF; load the Hugging Face "
                          "directory instead",
                          path);
        goto done;
    }

    /* vocabulary: token_embd's rows, checked against the metadata that states one */
    const mt_gguf_tensor *embd = mt_gguf_find_tensor(g, "token_embd.weight");
    if (!embd || embd->n_dims != 2) {
        st = mt_error_set(err, MT_ERR_FORMAT, "%s: tensor token_embd.weight %s", path,
                          embd ? "is not a matrix" : "is missing");
        goto done;
    }
    if (embd->ne[1] <= 0 || embd->ne[1] > (1 << 24)) {
        st = mt_error_set(err, MT_ERR_FORMAT, "%s: token_embd.weight has %lld rows", path,
                          (long long)embd->ne[1]);
        goto done;
    }
    cfg->vocab_size = (int)embd->ne[1];
    int stated = 0;
    if ((st = arch_int(g, arch, "vocab_size", 0, &stated, err))) goto done;
    if (stated && stated != cfg->vocab_size) {
        st = mt_error_set(err, MT_ERR_FORMAT,
                          "%s: %s.vocab_size is %d but token_embd.weight has %d rows", path, arch,
                          stated, cfg->vocab_size);
        goto done;
    }
    cfg->tie_word_embeddings = mt_gguf_find_tensor(g, "output.weight") == NULL;
    st = mt_config_validate(cfg, path, err);
done:
    free(arch);
    return st;
}

void mt_gguf_permute_qk(float *dst, const float *src, int n_head, int D, size_t cols,
                        int to_gguf) {
    const int half = D / 2;
    for (int h = 0; h < n_head; h++)
        for (int j = 0; j < 2; j++)
            for (int i = 0; i < half; i++) {
                size_t hf = (size_t)h * D + (size_t)j * half + i, gguf = (size_t)h * D + 2 * (size_t)i + j;
                memcpy(dst + (to_gguf ? gguf : hf) * cols, src + (to_gguf ? hf : gguf) * cols,
                       cols * sizeof(float));
            }
}

int mt_gguf_param_name(const mt_model *m, const mt_param *p, char *out, size_t size, int *n_head) {
    static const struct {
        const char *hf, *gguf;
    } map[] = {
        {"self_attn.q_proj", "attn_q"},        {"self_attn.k_proj", "attn_k"},
        {"self_attn.v_proj", "attn_v"},        {"self_attn.o_proj", "attn_output"},
        {"mlp.gate_proj", "ffn_gate"},         {"mlp.up_proj", "ffn_up"},
        {"mlp.down_proj", "ffn_down"},         {"input_layernorm", "attn_norm"},
        {"post_attention_layernorm", "ffn_norm"},
    };
    *n_head = 0;
    if (!strcmp(p->name, "model.embed_tokens.weight"))
        return snprintf(out, size, "token_embd.weight") > 0;
    if (!strcmp(p->name, "model.norm.weight")) return snprintf(out, size, "output_norm.weight") > 0;
    if (!strcmp(p->name, "lm_head.weight")) return snprintf(out, size, "output.weight") > 0;
    int layer, used = 0;
    if (sscanf(p->name, "model.layers.%d.%n", &layer, &used) != 1 || !used) return 0;
    const char *rest = p->name + used;
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++) {
        size_t n = strlen(map[i].hf);
        if (strncmp(rest, map[i].hf, n) || rest[n] != '.') continue;
        if (i == 0) *n_head = m->cfg.num_heads;
        if (i == 1) *n_head = m->cfg.num_kv_heads;
        return snprintf(out, size, "blk.%d.%s.%s", layer, map[i].gguf, rest + n + 1) > 0;
    }
    return 0;
}

/* Every parameter has its tensor with the right shape, and every tensor is a parameter.
 * Needs only the parameter table, so it runs before the parameters are allocated: the
 * sizes the metadata claims must then be backed by the tensors in the file. */
static mt_status check_tensors(const mt_model *m, const mt_gguf *g, int permute_qk, mt_error *err) {
    const char *path = mt_gguf_path(g);
    for (size_t i = 0; i < m->num_params; i++) {
        const mt_param *p = &m->params[i];
        char name[128];
        int n_head = 0;
        if (!mt_gguf_param_name(m, p, name, sizeof name, &n_head))
            return mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: no GGUF tensor name for parameter %s",
                                path, p->name);
        const mt_gguf_tensor *t = mt_gguf_find_tensor(g, name);
        if (!t)
            return mt_error_set(err, MT_ERR_FORMAT, "%s: tensor %s (for %s) is missing", path, name,
                                p->name);
        /* ggml ne = (in, out) for matrices, (n) for vectors */
        int ok = t->n_dims == p->ndim &&
                 (p->ndim == 1 ? t->ne[0] == p->shape[0]
                               : t->ne[0] == p->shape[1] && t->ne[1] == p->shape[0]);
        if (!ok) {
            char found[96], expected[64];
            size_t len = (size_t)snprintf(found, sizeof found, "[");
            for (int d = 0; d < t->n_dims && len < sizeof found; d++)
                len += (size_t)snprintf(found + len, sizeof found - len, "%s%lld", d ? ", " : "",
                                        (long long)t->ne[d]);
            if (len < sizeof found) snprintf(found + len, sizeof found - len, "]");
            if (p->ndim == 2)
                snprintf(expected, sizeof expected, "[%lld, %lld]", (long long)p->shape[1],
                         (long long)p->shape[0]);
            else
                snprintf(expected, sizeof expected, "[%lld]", (long long)p->shape[0]);
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: tensor %s has ne %s; expected %s for %s from the metadata",
                                path, name, found, expected, p->name);
        }
        if (permute_qk && n_head > 0 && (int64_t)n_head * m->cfg.head_dim != p->shape[0])
            return mt_error_set(err, MT_ERR_FORMAT, "%s: tensor %s has %lld rows, not %d heads x %d",
                                path, name, (long long)p->shape[0], n_head, m->cfg.head_dim);
    }
    /* anything left over would be silently ignored weights: refuse it. Each parameter
     * found a tensor of its own (gguf.c refuses duplicate names), so equal counts mean
     * none is left over. */
    size_t n = mt_gguf_tensor_count(g);
    for (size_t i = 0; i < n && m->num_params < n; i++) {
        const char *tn = mt_gguf_tensor_at(g, i)->name;
        char want[128];
        int found = 0;
        for (size_t j = 0; j < m->num_params && !found; j++) {
            int nh;
            found = mt_gguf_param_name(m, &m->params[j], want, sizeof want, &nh) && !strcmp(want, tn);
        }
        if (!found && !(m->cfg.tie_word_embeddings && !strcmp(tn, "output.weight")))
            return mt_error_set(err, MT_ERR_UNSUPPORTED,
                                "%s: tensor %s is not a parameter of this %s model", path, tn,
                                m->cfg.model_type);
    }
    return MT_OK;
}

/* Dequantizes every tensor into its parameter; check_tensors has passed. */
static mt_status load_tensors(mt_model *m, const mt_gguf *g, int permute_qk, mt_error *err) {
    const char *path = mt_gguf_path(g);
    mt_backend *be = m->be;
    const int cpu = be->device == MT_DEVICE_CPU;
    /* dequantized data lands in place on the CPU; it is staged for permuting q/k and
     * for uploading to another device */
    size_t max_numel = 0;
    for (size_t i = 0; i < m->num_params; i++) {
        int n_head = 0;
        char name[128];
        if (!mt_gguf_param_name(m, &m->params[i], name, sizeof name, &n_head)) continue;
        int staged = !cpu || (permute_qk && n_head > 0);
        if (staged && m->params[i].numel > max_numel) max_numel = m->params[i].numel;
    }
    float *stage = NULL, *perm = NULL;
    mt_status st = MT_OK;
    if (max_numel && !(stage = mt_malloc(max_numel * sizeof(float), "GGUF staging buffer", err)))
        return MT_ERR_NOMEM;
    if (!cpu && permute_qk &&
        !(perm = mt_malloc(max_numel * sizeof(float), "GGUF staging buffer", err))) {
        st = MT_ERR_NOMEM;
        goto done;
    }
    for (size_t i = 0; i < m->num_params && !st; i++) {
        mt_param *p = &m->params[i];
        char name[128];
        int n_head = 0;
        (void)mt_gguf_param_name(m, p, name, sizeof name, &n_head);
        const mt_gguf_tensor *t = mt_gguf_find_tensor(g, name);
        int permute = permute_qk && n_head > 0;
        float *dst = !permute && cpu ? p->data : stage;
        if ((st = mt_gguf_dequantize(g, t, dst, err))) break;
        /* gguf.c dequantizes whole tensors, so this is a second pass over each; it is a
         * bit test per value on data still mostly in cache (measured: see mt_check_finite) */
        if ((st = mt_check_finite(path, name, dst, p->numel, err))) break;
        if (permute) {
            float *out = cpu ? p->data : perm;
            mt_gguf_permute_qk(out, stage, n_head, m->cfg.head_dim,
                               p->ndim == 2 ? (size_t)p->shape[1] : 1, 0);
            dst = out;
        }
        if (!cpu && (st = be->ops->upload(be, p->data, dst, p->numel * sizeof(float))))
            st = mt_error_set(err, st, "%s: uploading %s failed", path, name);
    }
done:
    free(stage);
    free(perm);
    return st;
}

mt_status mt_model_load_gguf(const char *path, mt_backend *be, mt_model **out, mt_error *err) {
    mt_gguf *g = NULL;
    mt_status st = mt_gguf_open(path, &g, err);
    if (st) return st;
    mt_model_config cfg;
    int permute_qk = 0;
    mt_model *m = NULL;
    /* the parameter table first, checked against the tensors, and only then the memory */
    if (!(st = read_config(g, &cfg, &permute_qk, err)) &&
        !(st = mt_model_create_table(&cfg, be, &m, err)) &&
        !(st = check_tensors(m, g, permute_qk, err)) && !(st = mt_model_alloc_params(m, err)))
        st = load_tensors(m, g, permute_qk, err);
    mt_gguf_close(g);
    if (st) {
        mt_model_free(m);
        return st;
    }
    *out = m;
    return MT_OK;
}

mt_status mt_model_load(const char *path, mt_backend *be, mt_model **out, mt_error *err) {
    mt_status st = mt_path_is_gguf(path) ? mt_model_load_gguf(path, be, out, err)
                                         : mt_model_load_hf(path, be, out, err);
    if (st == MT_OK && (st = mt_model_fingerprint(*out, (*out)->fingerprint, err))) {
        mt_model_free(*out);
        *out = NULL;
    }
    return st;
}
