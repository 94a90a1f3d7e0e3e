/* export_hf.c — PEFT adapter directories and merged transformers model directories
 * (see export_hf.h). */
#include "store/export_hf.h"

#include <errno.h>
#include <stddef.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "base/internal.h"
#include "formats/safetensors.h"
#include "store/adapter_dir.h"

#define MT_EXPORT_SHARD_BYTES ((size_t)2 << 30)

/* mkdir -p */
static mt_status export_mkdirs(const char *dir, mt_error *err) {
    char *p = mt_strdup(dir, "export directory", err);
    if (!p) return MT_ERR_NOMEM;
    mt_status st = MT_OK;
    for (char *s = p + 1;; s++) {
        if (*s != '/' && *s != '\0') continue;
        char c = *s;
        *s = '\0';
        struct stat sb;
        if (mkdir(p, 0755) != 0 && !(errno == EEXIST && stat(p, &sb) == 0 && S_ISDIR(sb.st_mode))) {
            st = mt_error_set(err, MT_ERR_IO, "%s: cannot create directory: %s", p, strerror(errno));
            break;
        }
        *s = c;
        if (!c) break;
    }
    free(p);
    return st;
}

static mt_status export_write_json(json_t *root, const char *dir, const char *name, mt_error *err) {
    char *path = mt_path_join(dir, name, err);
    if (!path) {
        json_decref(root);
        return MT_ERR_NOMEM;
    }
    char *text = root ? json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : NULL;
    json_decref(root);
    mt_status st;
    if (!text) {
        st = mt_error_set(err, MT_ERR_NOMEM, "%s: cannot build the JSON", path);
    } else {
        size_t n = strlen(text);
        char *buf = realloc(text, n + 2);
        if (buf) {
            text = buf;
            text[n++] = '\n';
            text[n] = '\0';
        }
        st = mt_write_file_atomic(path, text, n, err);
    }
    free(text);
    free(path);
    return st;
}

/* A float written as its shortest decimal that reads back to the same float. */
static json_t *export_real_f(float x) {
    char buf[32];
    for (int prec = 6; prec <= 9; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, (double)x);
        if (strtof(buf, NULL) == x) break;
    }
    return json_real(strtod(buf, NULL));
}

static json_t *export_id(int32_t id) { return id >= 0 ? json_integer(id) : json_null(); }

/* ---- PEFT -------------------------------------------------------------------------- */

mt_status mt_export_peft(mt_model *model, const mt_plugin_instance *adapter,
                         const char *base_model_name_or_path, const char *out_dir, mt_error *err) {
    if (!adapter || adapter->desc->kind != MT_PLUGIN_ADAPTER)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "export peft: %s is not an adapter",
                            adapter ? adapter->desc->name : "(none)");
    const char *name = adapter->desc->name;
    int attached = 0;
    for (size_t i = 0; i < model->num_adapters && !attached; i++)
        attached = model->adapters[i].state == adapter->state;
    if (!attached)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "export peft: adapter %s is not attached to this model", name);
    const mt_adapter_vtable *vt = adapter->desc->vtable;
    if (!MT_ADAPTER_VT_HAS(vt, save))
        return mt_error_set(err, MT_ERR_UNSUPPORTED,
                            "export peft: adapter %s cannot be saved as an adapter directory; "
                            "export the merged model instead", name);
    if (!MT_ADAPTER_VT_HAS(vt, format) || strcmp(vt->format, "peft") != 0)
        return mt_error_set(err, MT_ERR_UNSUPPORTED,
                            "export peft: adapter %s saves the format \"%s\", not a PEFT adapter "
                            "directory", name, MT_ADAPTER_VT_HAS(vt, format) ? vt->format : "");
    mt_adapter_dir *d = NULL;
    mt_status st = mt_adapter_dir_create(out_dir, base_model_name_or_path, &d, err);
    if (st) return st;
    st = vt->save(adapter->state, mt_adapter_dir_io(d), err);
    /* a failure the plugin's queued device operations recorded */
    const mt_host *h = mt_host_table();
    if (!st && h->size >= offsetof(mt_host, check) + sizeof h->check && h->check) st = h->check(err);
    if (!st) st = export_mkdirs(out_dir, err);
    if (!st) st = mt_adapter_dir_commit(d, err);
    mt_adapter_dir_close(d);
    return st;
}

/* ---- config.json ------------------------------------------------------------------- */

char *mt_export_hf_config_json(const mt_model_config *c, int32_t bos, int32_t eos, mt_error *err) {
    const int qwen2 = !strcmp(c->model_type, "qwen2");
    const int mistral = !strcmp(c->model_type, "mistral");
    if (!qwen2 && (c->qkv_bias != c->o_bias)) {
        mt_error_set(err, MT_ERR_UNSUPPORTED,
                     "export: a %s model with biases on q/k/v but not o (or the reverse) has no "
                     "transformers config", c->model_type);
        return NULL;
    }
    if (qwen2 && (!c->qkv_bias || c->o_bias || c->mlp_bias)) {
        mt_error_set(err, MT_ERR_UNSUPPORTED,
                     "export: a qwen2 model must have q/k/v biases only");
        return NULL;
    }
    json_t *rope = json_object();
    json_object_set_new(rope, "rope_theta", json_real(c->rope_theta));
    switch (c->rope_type) {
    case MT_ROPE_DEFAULT: json_object_set_new(rope, "rope_type", json_string("default")); break;
    case MT_ROPE_LINEAR:
        json_object_set_new(rope, "rope_type", json_string("linear"));
        json_object_set_new(rope, "factor", json_real(c->rope_factor));
        break;
    case MT_ROPE_LLAMA3:
        json_object_set_new(rope, "rope_type", json_string("llama3"));
        json_object_set_new(rope, "factor", json_real(c->rope_factor));
        json_object_set_new(rope, "low_freq_factor", json_real(c->rope_low_freq_factor));
        json_object_set_new(rope, "high_freq_factor", json_real(c->rope_high_freq_factor));
        json_object_set_new(rope, "original_max_position_embeddings",
                            json_integer(c->rope_original_max_position_embeddings));
        break;
    }
    json_t *root = json_object();
    json_object_set_new(root, "architectures",
                        json_pack("[s]", qwen2 ? "Qwen2ForCausalLM"
                                         : mistral ? "MistralForCausalLM" : "LlamaForCausalLM"));
    json_object_set_new(root, "model_type", json_string(qwen2 ? "qwen2" : mistral ? "mistral" : "llama"));
    if (!qwen2) {
        json_object_set_new(root, "attention_bias", json_boolean(c->qkv_bias));
        if (!mistral) json_object_set_new(root, "mlp_bias", json_boolean(c->mlp_bias));
    }
    json_object_set_new(root, "attention_dropout", json_real(0.0));
    json_object_set_new(root, "bos_token_id", export_id(bos));
    json_object_set_new(root, "eos_token_id", export_id(eos));
    json_object_set_new(root, "head_dim", json_integer(c->head_dim));
    json_object_set_new(root, "hidden_act", json_string("silu"));
    json_object_set_new(root, "hidden_size", json_integer(c->hidden_size));
    json_object_set_new(root, "initializer_range", json_real(0.02));
    json_object_set_new(root, "intermediate_size", json_integer(c->intermediate_size));
    json_object_set_new(root, "max_position_embeddings", json_integer(c->max_position_embeddings));
    json_object_set_new(root, "num_attention_heads", json_integer(c->num_heads));
    json_object_set_new(root, "num_hidden_layers", json_integer(c->num_layers));
    json_object_set_new(root, "num_key_value_heads", json_integer(c->num_kv_heads));
    json_object_set_new(root, "rms_norm_eps", export_real_f(c->rms_norm_eps));
    json_object_set_new(root, "rope_parameters", rope);
    json_object_set_new(root, "rope_theta", json_real(c->rope_theta));
    json_object_set_new(root, "tie_word_embeddings", json_boolean(c->tie_word_embeddings));
    json_object_set_new(root, "torch_dtype", json_string("float32"));
    if (qwen2 || mistral) {
        json_object_set_new(root, "use_sliding_window", json_false());
        json_object_set_new(root, "sliding_window", json_null());
    }
    json_object_set_new(root, "use_cache", json_true());
    json_object_set_new(root, "vocab_size", json_integer(c->vocab_size));
    char *text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(root);
    char *nl = text ? realloc(text, strlen(text) + 2) : NULL;
    if (!nl) {
        free(text);
        mt_error_set(err, MT_ERR_NOMEM, "export: out of memory writing config.json");
        return NULL;
    }
    strcat(nl, "\n");
    return nl;
}

/* ---- merged model ------------------------------------------------------------------ */

static mt_status export_copy_file(const char *src, const char *dir, const char *name, mt_error *err) {
    char *buf;
    size_t len;
    mt_status st = mt_read_file(src, &buf, &len, err);
    if (st) return st;
    char *dst = mt_path_join(dir, name, err);
    st = dst ? mt_write_file_atomic(dst, buf, len, err) : MT_ERR_NOMEM;
    free(dst);
    free(buf);
    return st;
}

static int export_file_exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

static mt_status export_tokenizer(const mt_tokenizer *tok, const char *dir, mt_error *err) {
    const char *src = mt_tokenizer_source(tok);
    if (src && mt_ends_with(src, "tokenizer.json") && export_file_exists(src)) {
        /* loaded from a Hugging Face directory: copy its files as they are */
        size_t dl = strlen(src) - strlen("tokenizer.json");
        static const char *const files[] = {"tokenizer.json", "tokenizer_config.json",
                                            "special_tokens_map.json"};
        mt_status st = MT_OK;
        int have_config = 0;
        for (size_t i = 0; !st && i < sizeof files / sizeof files[0]; i++) {
            size_t len = dl + strlen(files[i]) + 1;
            char *p = mt_malloc(len, "export path", err);
            if (!p) return MT_ERR_NOMEM;
            snprintf(p, len, "%.*s%s", (int)dl, src, files[i]);
            if (export_file_exists(p)) {
                st = export_copy_file(p, dir, files[i], err);
                if (i == 1) have_config = 1;
            }
            free(p);
        }
        if (st || have_config) return st;
        /* no tokenizer_config.json next to it: write one (and tokenizer.json again) */
    }
    char *tj = mt_path_join(dir, "tokenizer.json", err);
    char *tc = mt_path_join(dir, "tokenizer_config.json", err);
    mt_status st = (tj && tc) ? mt_tokenizer_save_json(tok, tj, tc, err) : MT_ERR_NOMEM;
    free(tj);
    free(tc);
    return st;
}

static mt_status export_weights(mt_model *m, const char *dir, mt_error *err) {
    mt_st_entry *entries = mt_calloc(m->num_params ? m->num_params : 1, sizeof *entries,
                                     "export entries", err);
    if (!entries) return MT_ERR_NOMEM;
    const int on_host = m->be->device == MT_DEVICE_CPU;
    float **copies = on_host ? NULL : mt_calloc(m->num_params + 1, sizeof *copies, "export", err);
    mt_status st = (on_host || copies) ? MT_OK : MT_ERR_NOMEM;
    size_t n = 0;
    for (size_t i = 0; !st && i < m->num_params; i++) {
        const mt_param *p = &m->params[i];
        if (m->cfg.tie_word_embeddings && !strcmp(p->name, "lm_head.weight")) continue;
        const void *data = p->data;
        if (!on_host) {
            copies[i] = mt_malloc(p->numel * sizeof(float) + 1, "export host copy", err);
            if (!copies[i]) {
                st = MT_ERR_NOMEM;
                break;
            }
            if ((st = m->be->ops->download(m->be, copies[i], p->data, p->numel * sizeof(float))))
                break;
            data = copies[i];
        }
        entries[n] = (mt_st_entry){.name = p->name, .dtype = MT_ST_F32, .ndim = p->ndim, .data = data};
        for (int d = 0; d < p->ndim; d++) entries[n].shape[d] = p->shape[d];
        n++;
    }
    static const char *const meta[] = {"format", "pt", NULL};
    if (!st) st = mt_st_write_sharded(dir, entries, n, meta, MT_EXPORT_SHARD_BYTES, err);
    for (size_t i = 0; copies && i < m->num_params; i++) free(copies[i]);
    free(copies);
    free(entries);
    return st;
}

/* An adapter instance whose vtable can merge into (and unmerge from) the base weights. */
static mt_status check_mergeable(const mt_plugin_instance *adapter, mt_error *err) {
    if (adapter->desc->kind != MT_PLUGIN_ADAPTER)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "export: %s is not an adapter",
                            adapter->desc->name);
    const mt_adapter_vtable *vt = adapter->desc->vtable;
    if (!vt->merge || !vt->unmerge)
        return mt_error_set(err, MT_ERR_UNSUPPORTED,
                            "export: adapter %s cannot merge into the base weights",
                            adapter->desc->name);
    return MT_OK;
}

mt_status mt_with_merged_adapter(const mt_plugin_instance *adapter,
                                 mt_status (*write)(void *ctx, mt_error *err), void *ctx,
                                 mt_error *err) {
    if (!adapter) return write(ctx, err);
    mt_status st = check_mergeable(adapter, err);
    if (st) return st;
    const mt_adapter_vtable *vt = adapter->desc->vtable;
    st = vt->merge(adapter->state, err);
    if (st) return st;
    st = write(ctx, err);
    mt_error uerr = {0};
    mt_status ust = vt->unmerge(adapter->state, &uerr);
    if (ust && !st) {
        if (err) *err = uerr;
        st = ust;
    }
    return st;
}

typedef struct weights_job {
    mt_model *model;
    const char *out_dir;
} weights_job;

static mt_status write_weights_job(void *ctx, mt_error *err) {
    weights_job *job = ctx;
    return export_weights(job->model, job->out_dir, err);
}

mt_status mt_export_merged_hf(mt_model *model, const mt_plugin_instance *adapter,
                              const mt_tokenizer *tokenizer, const char *out_dir, mt_error *err) {
    mt_status st = adapter ? check_mergeable(adapter, err) : MT_OK; /* before any write */
    if (st) return st;
    const int32_t bos = tokenizer ? mt_tokenizer_bos(tokenizer) : -1;
    const int32_t eos = tokenizer ? mt_tokenizer_eos(tokenizer) : -1;
    char *config = mt_export_hf_config_json(&model->cfg, bos, eos, err);
    if (!config) return MT_ERR_NOMEM;
    st = export_mkdirs(out_dir, err);
    if (!st) {
        char *path = mt_path_join(out_dir, "config.json", err);
        size_t n = strlen(config);
        st = path ? mt_write_file_atomic(path, config, n, err) : MT_ERR_NOMEM;
        free(path);
    }
    free(config);
    if (!st) {
        json_t *gen = json_object();
        json_object_set_new(gen, "_from_model_config", json_true());
        json_object_set_new(gen, "bos_token_id", export_id(bos));
        json_object_set_new(gen, "eos_token_id", export_id(eos));
        st = export_write_json(gen, out_dir, "generation_config.json", err);
    }
    if (!st && tokenizer) st = export_tokenizer(tokenizer, out_dir, err);
    if (st) return st;
    weights_job job = {model, out_dir};
    return mt_with_merged_adapter(adapter, write_weights_job, &job, err);
}
