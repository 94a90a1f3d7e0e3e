/* export_gguf.c — a model and its tokenizer as a GGUF v3 file (see export_gguf.h).
 *
 * Layout: header (magic, version 3, tensor count, metadata count), the metadata, the
 * tensor directory (name, dims with ne[0] the contiguous input dimension, type, offset
 * relative to the data section), padding to general.alignment (32), then each tensor's
 * data at a multiple of 32. The header and directory are built in memory; tensor data
 * streams to the file one parameter at a time.
 *
 * For "llama" the rows of attn_q / attn_k are permuted as llama.cpp's converter does,
 * so that ggml's adjacent-pair rotary embedding computes what transformers' rotate_half
 * does (core/model/model_gguf.c undoes it when loading):
 *
 *     GGUF row h*D + 2*i + j  =  HF row h*D + j*D/2 + i     (j in {0,1}, i < D/2)  */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif
#include "store/export_gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "formats/gguf.h"
#include "base/internal.h"
#include "store/export_hf.h"

#define ALIGN 32

/* ---- an in-memory byte buffer ---------------------------------------------------- */

typedef mt_bytebuf gbuf;
static void put(gbuf *b, const void *data, size_t n) { mt_bytebuf_put(b, data, n); }
static void put_u32(gbuf *b, uint32_t v) { put(b, &v, 4); }
static void put_u64(gbuf *b, uint64_t v) { put(b, &v, 8); }
static void put_strn(gbuf *b, const char *s, size_t n) {
    put_u64(b, n);
    put(b, s, n);
}
static void put_str(gbuf *b, const char *s) { put_strn(b, s, strlen(s)); }

/* metadata entries; *count counts them */
static void kv_key(gbuf *b, size_t *count, const char *key, mt_gguf_type type) {
    put_str(b, key);
    put_u32(b, (uint32_t)type);
    (*count)++;
}
static void kv_u32(gbuf *b, size_t *c, const char *key, uint32_t v) {
    kv_key(b, c, key, MT_GGUF_UINT32);
    put_u32(b, v);
}
static void kv_f32(gbuf *b, size_t *c, const char *key, float v) {
    kv_key(b, c, key, MT_GGUF_FLOAT32);
    put(b, &v, 4);
}
static void kv_bool(gbuf *b, size_t *c, const char *key, int v) {
    kv_key(b, c, key, MT_GGUF_BOOL);
    unsigned char x = v ? 1 : 0;
    put(b, &x, 1);
}
static void kv_str(gbuf *b, size_t *c, const char *key, const char *v) {
    kv_key(b, c, key, MT_GGUF_STRING);
    put_str(b, v);
}
static void kv_arr(gbuf *b, size_t *c, const char *key, mt_gguf_type elem, uint64_t n) {
    kv_key(b, c, key, MT_GGUF_ARRAY);
    put_u32(b, (uint32_t)elem);
    put_u64(b, n);
}
static void kv_arch_u32(gbuf *b, size_t *c, const char *arch, const char *key, uint32_t v) {
    char full[128];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    kv_u32(b, c, full, v);
}
static void kv_arch_f32(gbuf *b, size_t *c, const char *arch, const char *key, float v) {
    char full[128];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    kv_f32(b, c, full, v);
}

/* ---- tensors ----------------------------------------------------------------------- */

typedef struct out_tensor {
    char name[128];
    const mt_param *param; /* NULL for rope_freqs.weight */
    int n_dims;
    uint64_t ne[2];
    uint32_t type;
    int n_head; /* > 0: permute rows (llama q/k) */
    size_t numel, nbytes;
    uint64_t offset;
} out_tensor;

/* Llama 3.1's per-frequency rope factors, as llama.cpp's converter computes them. */
static void llama3_rope_factors(const mt_model_config *c, float *out) {
    const int half = c->head_dim / 2;
    const double old_ctx = c->rope_original_max_position_embeddings;
    const double lo = c->rope_low_freq_factor, hi = c->rope_high_freq_factor;
    const double low_wavelen = old_ctx / lo, high_wavelen = old_ctx / hi;
    for (int i = 0; i < half; i++) {
        double freq = 1.0 / pow(c->rope_theta, (double)(2 * i) / c->head_dim);
        double wavelen = 2.0 * 3.14159265358979323846 / freq;
        double f;
        if (wavelen < high_wavelen) {
            f = 1.0;
        } else if (wavelen > low_wavelen) {
            f = c->rope_factor;
        } else {
            double smooth = (old_ctx / wavelen - lo) / (hi - lo);
            f = 1.0 / ((1.0 - smooth) / c->rope_factor + smooth);
        }
        out[i] = (float)f;
    }
}

/* ---- tokenizer metadata -------------------------------------------------------------- */

static mt_status write_tokenizer(gbuf *b, size_t *c, const mt_model *m, const mt_tokenizer *tok,
                                 const char *path, mt_error *err) {
    const int V = m->cfg.vocab_size, n_tok = mt_tokenizer_vocab_size(tok);
    const int spm = mt_tokenizer_get_family(tok) == MT_TOK_SENTENCEPIECE_BPE;
    if (n_tok > V)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: the tokenizer has %d tokens but the model's embedding only %d "
                            "rows; export without the tokenizer or with the model's own",
                            path, n_tok, V);
    const char *pre = NULL;
    if (!spm && !(pre = mt_tokenizer_pre_name(tok)))
        return mt_error_set(err, MT_ERR_UNSUPPORTED,
                            "%s: the tokenizer's pre-tokenizer is none llama.cpp names "
                            "(smollm, gpt-2, llama-bpe, qwen2), so tokenizer.ggml.pre cannot "
                            "be written",
                            path);
    int32_t *pairs = NULL;
    size_t n_merges = 0;
    mt_status st = mt_tokenizer_merge_list(tok, &pairs, &n_merges, err);
    if (st) return st;

    kv_str(b, c, "tokenizer.ggml.model", spm ? "llama" : "gpt2");
    if (pre) kv_str(b, c, "tokenizer.ggml.pre", pre);
    kv_arr(b, c, "tokenizer.ggml.tokens", MT_GGUF_STRING, (uint64_t)V);
    char pad[32];
    for (int i = 0; i < V; i++) {
        size_t len = 0;
        const char *t = i < n_tok ? mt_tokenizer_token_bytes(tok, i, &len) : NULL;
        if (!t) {
            snprintf(pad, sizeof pad, "[PAD%d]", i);
            t = pad;
            len = strlen(pad);
        }
        put_strn(b, t, len);
    }
    kv_arr(b, c, "tokenizer.ggml.token_type", MT_GGUF_INT32, (uint64_t)V);
    for (int i = 0; i < V; i++) {
        int32_t type = 5; /* unused (padding) */
        if (i < n_tok && mt_tokenizer_token_bytes(tok, i, NULL))
            type = mt_tokenizer_gguf_token_type(tok, i);
        put(b, &type, 4);
    }
    /* merges "a b", best first (byte-level tokens never contain a space; SentencePiece
     * ones use '▁'); llama.cpp reads them for gpt2 and moontune for both */
    kv_arr(b, c, "tokenizer.ggml.merges", MT_GGUF_STRING, (uint64_t)n_merges);
    char *cat = NULL;
    size_t cat_cap = 0;
    float *scores = NULL;
    if (spm) {
        if (!(scores = mt_malloc((size_t)V * sizeof(float), "token scores", err))) st = MT_ERR_NOMEM;
        for (int i = 0; !st && i < V; i++) scores[i] = -1e6f; /* never the result of a merge */
    }
    for (size_t k = 0; !st && k < n_merges; k++) {
        size_t la, lb;
        const char *a = mt_tokenizer_token_bytes(tok, pairs[2 * k], &la);
        const char *bb = mt_tokenizer_token_bytes(tok, pairs[2 * k + 1], &lb);
        if (!a || !bb) {
            st = mt_error_set(err, MT_ERR_INVALID_ARG, "%s: merge %zu names an unknown token", path, k);
            break;
        }
        if (la + lb + 2 > cat_cap) {
            cat_cap = 2 * (la + lb + 2);
            char *q = realloc(cat, cat_cap);
            if (!q) {
                st = mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory for merges", path);
                break;
            }
            cat = q;
        }
        memcpy(cat, a, la);
        cat[la] = ' ';
        memcpy(cat + la + 1, bb, lb);
        put_strn(b, cat, la + lb + 1);
        if (scores) { /* SentencePiece: the merged token scores -rank (higher merges first) */
            memmove(cat + la, cat + la + 1, lb);
            cat[la + lb] = '\0';
            int32_t id = mt_tokenizer_token_id(tok, cat);
            if (id >= 0 && id < V && scores[id] < -(float)k) scores[id] = -(float)k;
        }
    }
    free(cat);
    free(pairs);
    if (st) {
        free(scores);
        return st;
    }
    if (scores) {
        for (int i = 0; i < V; i++) /* single characters, bytes and specials: neutral */
            if (scores[i] == -1e6f && (i >= n_tok || mt_tokenizer_gguf_token_type(tok, i) != 1))
                scores[i] = 0.0f;
        kv_arr(b, c, "tokenizer.ggml.scores", MT_GGUF_FLOAT32, (uint64_t)V);
        put(b, scores, (size_t)V * sizeof(float));
        free(scores);
        kv_bool(b, c, "tokenizer.ggml.add_space_prefix", mt_tokenizer_adds_space_prefix(tok));
    }
    int32_t ids[4] = {mt_tokenizer_bos(tok), mt_tokenizer_eos(tok), mt_tokenizer_pad(tok),
                      mt_tokenizer_unk(tok)};
    const char *keys[4] = {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                           "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id"};
    for (int i = 0; i < 4; i++)
        if (ids[i] >= 0) kv_u32(b, c, keys[i], (uint32_t)ids[i]);
    kv_bool(b, c, "tokenizer.ggml.add_bos_token", mt_tokenizer_adds_bos(tok));
    kv_bool(b, c, "tokenizer.ggml.add_eos_token", mt_tokenizer_adds_eos(tok));
    const char *tmpl = mt_tokenizer_chat_template(tok);
    if (tmpl) kv_str(b, c, "tokenizer.chat_template", tmpl);
    return MT_OK;
}

/* ---- writing ------------------------------------------------------------------------ */

static mt_status write_padding(mt_atomic_file *out, uint64_t *pos, mt_error *err) {
    static const unsigned char zeros[ALIGN];
    size_t pad = (size_t)((ALIGN - *pos % ALIGN) % ALIGN);
    *pos += pad;
    return pad ? mt_atomic_write(out, zeros, pad, err) : MT_OK;
}

/* Q8_0: blocks of 32 values as an F16 scale d = amax / 127 and 32 int8 q = round(x / d),
 * which ggml and moontune's GGUF loader read back as d * q. */
#define Q8_0_BLOCK 32
#define Q8_0_BLOCK_BYTES (2 + Q8_0_BLOCK)
static void quantize_q8_0(const float *x, size_t n, unsigned char *out) {
    for (size_t b = 0; b < n / Q8_0_BLOCK; b++, x += Q8_0_BLOCK, out += Q8_0_BLOCK_BYTES) {
        float amax = 0.0f;
        for (int i = 0; i < Q8_0_BLOCK; i++)
            if (fabsf(x[i]) > amax) amax = fabsf(x[i]);
        const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
        const uint16_t dh = mt_f32_to_f16(d);
        memcpy(out, &dh, 2);
        for (int i = 0; i < Q8_0_BLOCK; i++) out[2 + i] = (unsigned char)(int8_t)roundf(x[i] * inv);
    }
}

/* One tensor's bytes: the host copy of the parameter (downloaded from the device when
 * needed), rows permuted for llama q/k, converted to the tensor's type. */
static mt_status tensor_bytes(const mt_model *m, const out_tensor *t, float *f32, float *perm,
                              void **out, const char *path, mt_error *err) {
    const float *src;
    if (!t->param) {
        llama3_rope_factors(&m->cfg, f32);
        src = f32;
    } else if (m->be->device == MT_DEVICE_CPU) {
        src = t->param->data;
    } else {
        mt_status st = m->be->ops->download(m->be, f32, t->param->data, t->numel * sizeof(float));
        if (st) return mt_error_set(err, st, "%s: downloading %s failed", path, t->param->name);
        src = f32;
    }
    if (t->n_head > 0) {
        size_t cols = t->n_dims == 2 ? (size_t)t->ne[0] : 1;
        mt_gguf_permute_qk(perm, src, t->n_head, m->cfg.head_dim, cols, 1);
        src = perm;
    }
    if (t->type == MT_GGML_F32) {
        *out = (void *)src;
        return MT_OK;
    }
    /* the converted bytes go to whichever buffer src is not (nbytes <= 4 * numel) */
    void *dst = src == perm ? (void *)f32 : (void *)perm;
    if (t->type == MT_GGML_Q8_0) {
        quantize_q8_0(src, t->numel, dst);
    } else {
        uint16_t *h = dst;
        if (t->type == MT_GGML_BF16)
            for (size_t i = 0; i < t->numel; i++) h[i] = mt_f32_to_bf16(src[i]);
        else
            for (size_t i = 0; i < t->numel; i++) h[i] = mt_f32_to_f16(src[i]);
    }
    *out = dst;
    return MT_OK;
}

int mt_export_gguf_type_parse(const char *name, mt_ggml_type *out) {
    static const struct { const char *name; mt_ggml_type type; } types[] = {
        {"f32", MT_GGML_F32}, {"f16", MT_GGML_F16}, {"bf16", MT_GGML_BF16}, {"q8_0", MT_GGML_Q8_0}};
    for (size_t i = 0; name && i < sizeof types / sizeof *types; i++)
        if (!strcmp(name, types[i].name)) {
            *out = types[i].type;
            return 0;
        }
    return -1;
}

/* The bytes of n values (a multiple of 32) of a type. */
static size_t type_bytes(mt_ggml_type type, size_t n) {
    switch (type) {
    case MT_GGML_F16:
    case MT_GGML_BF16: return 2 * n;
    case MT_GGML_Q8_0: return n / Q8_0_BLOCK * Q8_0_BLOCK_BYTES;
    default: return 4 * n;
    }
}

/* llama_ftype of a file whose 2-D weights are of this type (general.file_type) */
static uint32_t file_type_of(mt_ggml_type type) {
    switch (type) {
    case MT_GGML_F16: return 1;
    case MT_GGML_Q8_0: return 7;
    case MT_GGML_BF16: return 32;
    default: return 0;
    }
}

mt_status mt_export_gguf(const mt_model *m, const mt_tokenizer *tok, const char *path,
                         mt_ggml_type type, const char *name, mt_error *err) {
    const mt_model_config *cfg = &m->cfg;
    if (type != MT_GGML_F32 && type != MT_GGML_F16 && type != MT_GGML_BF16 &&
        type != MT_GGML_Q8_0)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: GGUF export writes F32, F16, BF16 or Q8_0, not ggml type %d",
                            path, (int)type);
    const char *arch;
    int permute;
    if (!strcmp(cfg->model_type, "llama") || !strcmp(cfg->model_type, "mistral")) {
        arch = "llama";
        permute = 1;
        if (cfg->qkv_bias || cfg->o_bias || cfg->mlp_bias)
            return mt_error_set(err, MT_ERR_UNSUPPORTED,
                                "%s: a %s model with attention or MLP biases cannot be exported "
                                "(moontune's GGUF loader reads no biases for llama)",
                                path, cfg->model_type);
    } else if (!strcmp(cfg->model_type, "qwen2")) {
        arch = "qwen2";
        permute = 0;
        if (!cfg->qkv_bias || cfg->o_bias || cfg->mlp_bias)
            return mt_error_set(err, MT_ERR_UNSUPPORTED,
                                "%s: a qwen2 model exports with q/k/v biases only", path);
    } else {
        return mt_error_set(err, MT_ERR_UNSUPPORTED,
                            "%s: model_type \"%s\" has no GGUF export (llama, mistral, qwen2)",
                            path, cfg->model_type);
    }
    if (cfg->rope_type != MT_ROPE_DEFAULT && cfg->rope_type != MT_ROPE_LINEAR &&
        cfg->rope_type != MT_ROPE_LLAMA3)
        return mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: unsupported rope scaling", path);

    /* the tensor directory */
    size_t n_t = 0;
    out_tensor *ts = mt_calloc(m->num_params + 1, sizeof *ts, "GGUF tensor directory", err);
    if (!ts) return MT_ERR_NOMEM;
    size_t max_numel = 0;
    uint64_t offset = 0;
    mt_status st = MT_OK;
    for (size_t i = 0; i <= m->num_params; i++) {
        out_tensor *t = &ts[n_t];
        if (i == m->num_params) { /* Llama 3.1 rope factors, as llama.cpp stores them */
            if (cfg->rope_type != MT_ROPE_LLAMA3) break;
            snprintf(t->name, sizeof t->name, "rope_freqs.weight");
            t->n_dims = 1;
            t->ne[0] = (uint64_t)(cfg->head_dim / 2);
        } else {
            const mt_param *p = &m->params[i];
            if (cfg->tie_word_embeddings && !strcmp(p->name, "lm_head.weight")) continue;
            if (!mt_gguf_param_name(m, p, t->name, sizeof t->name, &t->n_head)) {
                st = mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: no GGUF tensor name for parameter %s",
                                  path, p->name);
                break;
            }
            if (!permute) t->n_head = 0;
            t->param = p;
            t->n_dims = p->ndim;
            t->ne[0] = (uint64_t)(p->ndim == 2 ? p->shape[1] : p->shape[0]);
            t->ne[1] = p->ndim == 2 ? (uint64_t)p->shape[0] : 1;
            if (!p->data) {
                st = mt_error_set(err, MT_ERR_INVALID_ARG, "%s: parameter %s has no data", path,
                                  p->name);
                break;
            }
            if (t->n_head > 0 && (int64_t)t->n_head * cfg->head_dim != p->shape[0]) {
                st = mt_error_set(err, MT_ERR_INVALID_ARG, "%s: %s has %lld rows, not %d x %d",
                                  path, p->name, (long long)p->shape[0], t->n_head, cfg->head_dim);
                break;
            }
        }
        t->numel = (size_t)t->ne[0] * (size_t)(t->n_dims == 2 ? t->ne[1] : 1);
        t->type = t->n_dims == 2 ? type : MT_GGML_F32;
        if (t->type == MT_GGML_Q8_0 && t->ne[0] % Q8_0_BLOCK) t->type = MT_GGML_F16;
        t->nbytes = type_bytes((mt_ggml_type)t->type, t->numel);
        t->offset = offset;
        offset += (t->nbytes + ALIGN - 1) / ALIGN * ALIGN;
        if (t->numel > max_numel) max_numel = t->numel;
        n_t++;
    }

    /* metadata and directory */
    gbuf kv = {0}, hdr = {0};
    size_t n_kv = 0;
    char key[160];
    if (!st) {
        kv_str(&kv, &n_kv, "general.architecture", arch);
        kv_str(&kv, &n_kv, "general.name", name ? name : cfg->model_type);
        kv_u32(&kv, &n_kv, "general.file_type", file_type_of(type));
        kv_u32(&kv, &n_kv, "general.alignment", ALIGN);
        kv_arch_u32(&kv, &n_kv, arch, "context_length", (uint32_t)cfg->max_position_embeddings);
        kv_arch_u32(&kv, &n_kv, arch, "embedding_length", (uint32_t)cfg->hidden_size);
        kv_arch_u32(&kv, &n_kv, arch, "block_count", (uint32_t)cfg->num_layers);
        kv_arch_u32(&kv, &n_kv, arch, "feed_forward_length", (uint32_t)cfg->intermediate_size);
        kv_arch_u32(&kv, &n_kv, arch, "attention.head_count", (uint32_t)cfg->num_heads);
        kv_arch_u32(&kv, &n_kv, arch, "attention.head_count_kv", (uint32_t)cfg->num_kv_heads);
        kv_arch_u32(&kv, &n_kv, arch, "attention.key_length", (uint32_t)cfg->head_dim);
        kv_arch_u32(&kv, &n_kv, arch, "attention.value_length", (uint32_t)cfg->head_dim);
        kv_arch_u32(&kv, &n_kv, arch, "rope.dimension_count", (uint32_t)cfg->head_dim);
        kv_arch_f32(&kv, &n_kv, arch, "rope.freq_base", (float)cfg->rope_theta);
        kv_arch_f32(&kv, &n_kv, arch, "attention.layer_norm_rms_epsilon", cfg->rms_norm_eps);
        kv_arch_u32(&kv, &n_kv, arch, "vocab_size", (uint32_t)cfg->vocab_size);
        if (cfg->rope_type == MT_ROPE_LINEAR) {
            snprintf(key, sizeof key, "%s.rope.scaling.type", arch);
            kv_str(&kv, &n_kv, key, "linear");
            kv_arch_f32(&kv, &n_kv, arch, "rope.scaling.factor", (float)cfg->rope_factor);
        }
        if (tok) st = write_tokenizer(&kv, &n_kv, m, tok, path, err);
    }
    if (!st) {
        put(&hdr, "GGUF", 4);
        put_u32(&hdr, 3);
        put_u64(&hdr, (uint64_t)n_t);
        put_u64(&hdr, (uint64_t)n_kv);
        if (!kv.oom) put(&hdr, kv.p, kv.n);
        for (size_t i = 0; i < n_t; i++) {
            put_str(&hdr, ts[i].name);
            put_u32(&hdr, (uint32_t)ts[i].n_dims);
            for (int d = 0; d < ts[i].n_dims; d++) put_u64(&hdr, ts[i].ne[d]);
            put_u32(&hdr, ts[i].type);
            put_u64(&hdr, ts[i].offset);
        }
        if (kv.oom || hdr.oom)
            st = mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory building the GGUF header", path);
    }
    free(kv.p);

    /* stream through an atomic file (temporary file, fsync, rename) */
    float *f32 = NULL, *perm = NULL;
    mt_atomic_file out;
    int opened = 0;
    if (!st && (!(f32 = mt_malloc((max_numel ? max_numel : 1) * sizeof(float), "export buffer", err)) ||
                !(perm = mt_malloc((max_numel ? max_numel : 1) * sizeof(float), "export buffer", err))))
        st = MT_ERR_NOMEM;
    if (!st) opened = (st = mt_atomic_open(&out, path, err)) == MT_OK;
    uint64_t pos = 0;
    if (!st && !(st = mt_atomic_write(&out, hdr.p, hdr.n, err))) {
        pos = hdr.n;
        st = write_padding(&out, &pos, err);
    }
    const uint64_t data_start = pos;
    for (size_t i = 0; !st && i < n_t; i++) {
        void *bytes = NULL;
        if (pos - data_start != ts[i].offset) {
            st = mt_error_set(err, MT_ERR_IO, "%s: internal error: tensor %s lands at %llu, not %llu",
                              path, ts[i].name, (unsigned long long)(pos - data_start),
                              (unsigned long long)ts[i].offset);
            break;
        }
        if ((st = tensor_bytes(m, &ts[i], f32, perm, &bytes, path, err)) ||
            (st = mt_atomic_write(&out, bytes, ts[i].nbytes, err)))
            break;
        pos += ts[i].nbytes;
        st = write_padding(&out, &pos, err);
    }
    if (opened) {
        if (st) mt_atomic_abort(&out);
        else st = mt_atomic_commit(&out, err);
    }
    free(f32);
    free(perm);
    free(hdr.p);
    free(ts);
    return st;
}

typedef struct gguf_job {
    const mt_model *m;
    const mt_tokenizer *tok;
    const char *path, *name;
    mt_ggml_type type;
} gguf_job;

static mt_status write_gguf_job(void *ctx, mt_error *err) {
    const gguf_job *job = ctx;
    return mt_export_gguf(job->m, job->tok, job->path, job->type, job->name, err);
}

mt_status mt_export_gguf_merged(const mt_model *m, const mt_plugin_instance *adapter,
                                const mt_tokenizer *tok, const char *path, mt_ggml_type type,
                                const char *name, mt_error *err) {
    gguf_job job = {.m = m, .tok = tok, .path = path, .name = name, .type = type};
    return mt_with_merged_adapter(adapter, write_gguf_job, &job, err);
}
