/* generate.c — an incremental decoder with a key/value cache, sampling, generation.
 *
 * One feed of n new tokens at positions p0 .. p0+n-1, in the notation of model.c:
 *   x = embed[tokens]
 *   per layer: ln = rmsnorm(x); q,k,v = rope(q_proj(ln)), rope(k_proj(ln)), v_proj(ln)
 *              cache[l][p0..p0+n) = k, v
 *              att = softmax(q · cache_k^T * scale, causal) · cache_v   (grouped heads)
 *              x += o_proj(att); ln = rmsnorm(x); x += down_proj(silu(gate_proj(ln)) * up_proj(ln))
 *   logits = lm_head(rmsnorm(x[last]))
 * Projections, norms, rotary embedding and SwiGLU run on the model's backend; the
 * cache lives in host memory and attention over it runs on the host (for the CPU
 * backend the "transfers" are the same memory). */
#include "generate.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

struct mt_kv_decoder {
    mt_model *m;
    int capacity, max_rows, length;
    int cpu; /* backend memory is host memory */
    /* backend memory, one allocation; R = max_rows */
    void *dev_memory;
    float *x;                  /* (R,C) residual stream */
    float *ln;                 /* (R,C) */
    float *rstd;               /* (R) */
    float *q;                  /* (R,H*D) */
    float *k, *v;              /* (R,KVH*D) */
    float *att;                /* (R,H*D) */
    float *proj;               /* (R,C) o_proj / down_proj output */
    float *gate, *up, *act;    /* (R,F) */
    float *logits;             /* (V) */
    float *rope_cos, *rope_sin; /* (capacity, D/2) */
    int32_t *tokens, *positions; /* (R) */
    /* host memory */
    float *k_cache, *v_cache;  /* (L, capacity, KVH*D) */
    float *hq, *hatt;          /* (R,H*D) host copies (NULL on the CPU backend) */
    int32_t *hpos;             /* (R) */
    float *scores;             /* (threads, capacity) */
    int threads;
};

static void carve_decoder(mt_kv_decoder *d, mt_carver *cv) {
    const mt_model_config *c = &d->m->cfg;
    const size_t R = (size_t)d->max_rows, C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size;
    const size_t QD = (size_t)c->num_heads * c->head_dim, KVD = (size_t)c->num_kv_heads * c->head_dim;
    const size_t f = sizeof(float);
    d->x = mt_carve(cv, R * C, f);
    d->ln = mt_carve(cv, R * C, f);
    d->rstd = mt_carve(cv, R, f);
    d->q = mt_carve(cv, R * QD, f);
    d->k = mt_carve(cv, R * KVD, f);
    d->v = mt_carve(cv, R * KVD, f);
    d->att = mt_carve(cv, R * QD, f);
    d->proj = mt_carve(cv, R * C, f);
    d->gate = mt_carve(cv, R * F, f);
    d->up = mt_carve(cv, R * F, f);
    d->act = mt_carve(cv, R * F, f);
    d->logits = mt_carve(cv, (size_t)c->vocab_size, f);
    d->rope_cos = mt_carve(cv, (size_t)d->capacity * c->head_dim / 2, f);
    d->rope_sin = mt_carve(cv, (size_t)d->capacity * c->head_dim / 2, f);
    d->tokens = mt_carve(cv, R, sizeof(int32_t));
    d->positions = mt_carve(cv, R, sizeof(int32_t));
}

void mt_kv_decoder_free(mt_kv_decoder *d) {
    if (!d) return;
    if (d->dev_memory) d->m->be->ops->free(d->m->be, d->dev_memory);
    free(d->k_cache);
    free(d->v_cache);
    free(d->hq);
    free(d->hatt);
    free(d->hpos);
    free(d->scores);
    free(d);
}

mt_status mt_kv_decoder_create(mt_model *m, int capacity, int max_rows, mt_kv_decoder **out,
                               mt_error *err) {
    const mt_model_config *c = &m->cfg;
    mt_backend *be = m->be;
    if (capacity <= 0 || capacity > c->max_position_embeddings)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "a cache of %d positions: must be in [1, %d] (the model's context "
                            "length)",
                            capacity, c->max_position_embeddings);
    if (max_rows <= 0) max_rows = 64;
    if (max_rows > capacity) max_rows = capacity;
    mt_kv_decoder *d = mt_calloc(1, sizeof *d, "decoder", err);
    if (!d) return MT_ERR_NOMEM;
    d->m = m;
    d->capacity = capacity;
    d->max_rows = max_rows;
    d->cpu = be->device == MT_DEVICE_CPU;
    d->threads = omp_get_max_threads();
    if (d->threads < 1) d->threads = 1;
    const size_t QD = (size_t)c->num_heads * c->head_dim;
    const size_t cache = (size_t)c->num_layers * capacity * c->num_kv_heads * c->head_dim;
    mt_carver size = {0};
    carve_decoder(d, &size);
    d->k_cache = malloc(cache * sizeof(float));
    d->v_cache = malloc(cache * sizeof(float));
    d->hpos = malloc((size_t)max_rows * sizeof(int32_t));
    d->scores = malloc((size_t)d->threads * capacity * sizeof(float));
    if (!d->cpu) {
        d->hq = malloc((size_t)max_rows * QD * sizeof(float));
        d->hatt = malloc((size_t)max_rows * QD * sizeof(float));
    }
    d->dev_memory = be->ops->alloc(be, size.offset);
    if (!d->k_cache || !d->v_cache || !d->hpos || !d->scores || !d->dev_memory ||
        (!d->cpu && (!d->hq || !d->hatt))) {
        mt_kv_decoder_free(d);
        return mt_error_set(err, MT_ERR_NOMEM,
                            "out of memory for a key/value cache of %d positions (%zu MB) and "
                            "%zu bytes of %s scratch",
                            capacity, 2 * cache * sizeof(float) >> 20, size.offset, be->name);
    }
    mt_carver fill = {.base = d->dev_memory};
    carve_decoder(d, &fill);

    /* rotary tables (capacity, D/2), computed exactly as mt_model_plan does */
    const int half = c->head_dim / 2;
    float *inv_freq = malloc((size_t)half * sizeof(float));
    float *table = malloc((size_t)capacity * half * 2 * sizeof(float));
    mt_status st = MT_OK;
    if (!inv_freq || !table) {
        st = mt_error_set(err, MT_ERR_NOMEM, "out of memory for rotary tables");
    } else {
        mt_rope_inv_freq(c, inv_freq);
        float *cs = table, *sn = table + (size_t)capacity * half;
        for (int p = 0; p < capacity; p++)
            for (int i = 0; i < half; i++) {
                float angle = (float)p * inv_freq[i];
                cs[(size_t)p * half + i] = cosf(angle);
                sn[(size_t)p * half + i] = sinf(angle);
            }
        size_t bytes = (size_t)capacity * half * sizeof(float);
        if ((st = be->ops->upload(be, d->rope_cos, cs, bytes)) ||
            (st = be->ops->upload(be, d->rope_sin, sn, bytes)))
            st = mt_error_set(err, st, "uploading rotary tables failed");
    }
    free(inv_freq);
    free(table);
    if (st) {
        mt_kv_decoder_free(d);
        return st;
    }
    *out = d;
    return MT_OK;
}

void mt_kv_decoder_reset(mt_kv_decoder *d) { d->length = 0; }

int mt_kv_decoder_length(const mt_kv_decoder *d) { return d->length; }

/* att (n,H,D) for queries q (n,H,D) at positions p0 .. p0+n-1 over the cached keys and
 * values kc, vc (p0+n, KVH, D) of one layer. */
static void cached_attention(mt_kv_decoder *d, float *att, const float *q, const float *kc,
                             const float *vc, int p0, int n) {
    const mt_model_config *c = &d->m->cfg;
    const int H = c->num_heads, KVH = c->num_kv_heads, D = c->head_dim, group = H / KVH;
    const float scale = 1.0f / sqrtf((float)D);
    const int work = n * H;
#pragma omp parallel for schedule(static) if (work > 1 && (int64_t)work * (p0 + n) * D > 32768)
    for (int w = 0; w < work; w++) {
        const int r = w / H, h = w % H, g = h / group, len = p0 + r + 1;
        float *s = d->scores + (size_t)omp_get_thread_num() * d->capacity;
        const float *qh = q + ((size_t)r * H + h) * D;
        float mx = -INFINITY;
        for (int t = 0; t < len; t++) {
            const float *kt = kc + ((size_t)t * KVH + g) * D;
            float dot = 0.0f;
            for (int i = 0; i < D; i++) dot += qh[i] * kt[i];
            s[t] = dot * scale;
            if (s[t] > mx) mx = s[t];
        }
        float sum = 0.0f;
        for (int t = 0; t < len; t++) {
            s[t] = expf(s[t] - mx);
            sum += s[t];
        }
        const float inv = 1.0f / sum;
        float *o = att + ((size_t)r * H + h) * D;
        for (int i = 0; i < D; i++) o[i] = 0.0f;
        for (int t = 0; t < len; t++) {
            const float *vt = vc + ((size_t)t * KVH + g) * D;
            const float p = s[t] * inv;
            for (int i = 0; i < D; i++) o[i] += p * vt[i];
        }
    }
}

/* One chunk of n <= max_rows tokens. */
static mt_status feed_chunk(mt_kv_decoder *d, const int32_t *tokens, int n, float *logits,
                            mt_error *err) {
    mt_model *m = d->m;
    mt_backend *be = m->be;
    const mt_model_config *c = &m->cfg;
    const int C = c->hidden_size, F = c->intermediate_size;
    const int H = c->num_heads, KVH = c->num_kv_heads, D = c->head_dim;
    const size_t QD = (size_t)H * D, KVD = (size_t)KVH * D;
    const int p0 = d->length;
    for (int i = 0; i < n; i++) d->hpos[i] = p0 + i;
    mt_status st = be->ops->upload(be, d->tokens, tokens, (size_t)n * sizeof(int32_t));
    if (!st) st = be->ops->upload(be, d->positions, d->hpos, (size_t)n * sizeof(int32_t));
    if (st) return mt_error_set(err, st, "uploading tokens failed");
    float *hq = d->cpu ? d->q : d->hq, *hatt = d->cpu ? d->att : d->hatt;

    be->ops->embedding_forward(be, d->x, d->tokens, m->embed, n, C);
    for (int l = 0; l < c->num_layers; l++) {
        mt_layer *ly = &m->layers[l];
        float *kc = d->k_cache + (size_t)l * d->capacity * KVD;
        float *vc = d->v_cache + (size_t)l * d->capacity * KVD;
        be->ops->rmsnorm_forward(be, d->ln, d->rstd, d->x, ly->attn_norm, n, C, c->rms_norm_eps);
        mt_linear_forward(&ly->q, d->q, d->ln, n);
        mt_linear_forward(&ly->k, d->k, d->ln, n);
        mt_linear_forward(&ly->v, d->v, d->ln, n);
        be->ops->rope_forward(be, d->q, d->rope_cos, d->rope_sin, d->positions, n, H, D);
        be->ops->rope_forward(be, d->k, d->rope_cos, d->rope_sin, d->positions, n, KVH, D);
        /* the new keys and values join the cache; queries come to the host */
        if ((st = be->ops->download(be, kc + (size_t)p0 * KVD, d->k, (size_t)n * KVD * sizeof(float))) ||
            (st = be->ops->download(be, vc + (size_t)p0 * KVD, d->v, (size_t)n * KVD * sizeof(float))) ||
            (!d->cpu && (st = be->ops->download(be, hq, d->q, (size_t)n * QD * sizeof(float)))))
            return mt_error_set(err, st, "downloading keys, values and queries failed");
        cached_attention(d, hatt, hq, kc, vc, p0, n);
        if (!d->cpu && (st = be->ops->upload(be, d->att, hatt, (size_t)n * QD * sizeof(float))))
            return mt_error_set(err, st, "uploading attention output failed");
        mt_linear_forward(&ly->o, d->proj, d->att, n);
        be->ops->add(be, d->x, d->x, d->proj, (size_t)n * C);
        be->ops->rmsnorm_forward(be, d->ln, d->rstd, d->x, ly->mlp_norm, n, C, c->rms_norm_eps);
        mt_linear_forward(&ly->gate, d->gate, d->ln, n);
        mt_linear_forward(&ly->up, d->up, d->ln, n);
        be->ops->swiglu_forward(be, d->act, d->gate, d->up, (size_t)n * F);
        mt_linear_forward(&ly->down, d->proj, d->act, n);
        be->ops->add(be, d->x, d->x, d->proj, (size_t)n * C);
    }
    d->length += n;
    if (logits) {
        const float *last = d->x + (size_t)(n - 1) * C;
        be->ops->rmsnorm_forward(be, d->ln, d->rstd, last, m->final_norm, 1, C, c->rms_norm_eps);
        mt_linear_forward(&m->lm_head, d->logits, d->ln, 1);
        if ((st = be->ops->download(be, logits, d->logits, (size_t)c->vocab_size * sizeof(float))))
            return mt_error_set(err, st, "downloading logits failed");
    }
    return MT_OK;
}

mt_status mt_kv_decoder_feed(mt_kv_decoder *d, const int32_t *tokens, int n, float *logits,
                             mt_error *err) {
    const mt_model_config *c = &d->m->cfg;
    if (n <= 0) return mt_error_set(err, MT_ERR_INVALID_ARG, "feeding %d tokens", n);
    if (n > d->capacity - d->length)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%d more tokens do not fit the cache (%d of %d positions used)", n,
                            d->length, d->capacity);
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= c->vocab_size)
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "token %d at index %d is outside the vocabulary (%d)", tokens[i],
                                i, c->vocab_size);
    for (int i = 0; i < n; i += d->max_rows) {
        int rows = n - i < d->max_rows ? n - i : d->max_rows;
        mt_status st = feed_chunk(d, tokens + i, rows, i + rows == n ? logits : NULL, err);
        if (st) return st;
    }
    return MT_OK;
}

/* ---- sampling ------------------------------------------------------------ */

typedef struct cand {
    float logit;
    int32_t id;
} cand;

/* splitmix64: a state advanced by a constant, mixed (also seeds well from 0) */
static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double rng_uniform(uint64_t *s) { return (double)(rng_next(s) >> 11) / 9007199254740992.0; }

int32_t mt_argmax(const float *logits, int V) {
    int32_t best = 0;
    for (int i = 1; i < V; i++)
        if (logits[i] > logits[best]) best = i;
    return best;
}

size_t mt_sample_work_bytes(int V) { return (size_t)V * sizeof(cand); }

/* larger logit first; equal logits by smaller id */
static int cand_cmp(const void *a, const void *b) {
    const cand *x = a, *y = b;
    if (x->logit != y->logit) return x->logit > y->logit ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

int32_t mt_sample(float *logits, int V, const mt_sampling *s, uint64_t *rng, void *work) {
    if (!(s->temperature > 0.0f) || s->top_k == 1) return mt_argmax(logits, V);
    cand *cs = work;
    int n = 0;
    const float inv_t = 1.0f / s->temperature;
    if (s->top_k > 0 && s->top_k < V) {
        /* keep the k largest in a sorted array: most logits fail the first comparison */
        const int k = s->top_k;
        for (int i = 0; i < V; i++) {
            cand c = {logits[i] * inv_t, i};
            if (n == k && !(c.logit > cs[k - 1].logit)) continue;
            int j = n < k ? n++ : k - 1;
            while (j > 0 && c.logit > cs[j - 1].logit) {
                cs[j] = cs[j - 1];
                j--;
            }
            cs[j] = c;
        }
    } else {
        for (int i = 0; i < V; i++) cs[i] = (cand){logits[i] * inv_t, i};
        n = V;
        if (s->top_p > 0.0f && s->top_p < 1.0f) qsort(cs, (size_t)n, sizeof *cs, cand_cmp);
    }
    float mx = -INFINITY;
    for (int i = 0; i < n; i++)
        if (cs[i].logit > mx) mx = cs[i].logit;
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        cs[i].logit = expf(cs[i].logit - mx); /* now an unnormalised probability */
        sum += cs[i].logit;
    }
    if (s->top_p > 0.0f && s->top_p < 1.0f) {
        /* transformers keeps a token while the probability of those above it < top_p */
        double above = 0.0;
        int keep = 0;
        while (keep < n && (keep == 0 || above < s->top_p * sum)) above += cs[keep++].logit;
        n = keep;
        sum = above;
    }
    double u = rng_uniform(rng) * sum, acc = 0.0;
    for (int i = 0; i < n; i++) {
        acc += cs[i].logit;
        if (u < acc) return cs[i].id;
    }
    return cs[n - 1].id;
}

/* ---- generation ---------------------------------------------------------- */

void mt_generation_free(mt_generation *g) {
    if (!g) return;
    free(g->ids);
    free(g->text);
    g->ids = NULL;
    g->text = NULL;
    g->n_ids = 0;
    g->text_len = 0;
}

/* Bytes at the end of text[0, len) that may not be final: an incomplete UTF-8
 * sequence, a U+FFFD a decoder wrote for one, or the beginning of a stop string. */
static size_t unsettled_tail(const char *text, size_t len, const mt_generate_options *opt) {
    size_t keep = 0;
    for (size_t back = 1; back <= 4 && back <= len; back++) {
        unsigned char ch = (unsigned char)text[len - back];
        if ((ch & 0xC0) == 0x80) continue; /* continuation byte */
        size_t need = ch >= 0xF0 ? 4 : ch >= 0xE0 ? 3 : ch >= 0xC0 ? 2 : 1;
        if (need > back) keep = back;
        break;
    }
    if (len - keep >= 3 && !memcmp(text + len - keep - 3, "\xEF\xBF\xBD", 3)) keep += 3;
    for (int i = 0; i < opt->n_stop_strings; i++) {
        const char *stop = opt->stop_strings[i];
        size_t sl = strlen(stop);
        size_t k = sl > 1 ? sl - 1 : 0;
        if (k > len) k = len;
        for (; k > keep; k--)
            if (!memcmp(text + len - k, stop, k)) {
                keep = k;
                break;
            }
    }
    return keep > len ? len : keep;
}

/* The earliest occurrence of a stop string in text, or len. */
static size_t find_stop(const char *text, size_t len, const mt_generate_options *opt) {
    size_t at = len;
    for (int i = 0; i < opt->n_stop_strings; i++) {
        const char *stop = opt->stop_strings[i];
        size_t sl = strlen(stop);
        if (!sl || sl > len) continue;
        for (size_t p = 0; p + sl <= len && p < at; p++)
            if (!memcmp(text + p, stop, sl)) {
                at = p;
                break;
            }
    }
    return at;
}

mt_status mt_generate(mt_model *m, const mt_tokenizer *tok, const int32_t *prompt, int n_prompt,
                      const mt_generate_options *opt, mt_generation *out, mt_error *err) {
    memset(out, 0, sizeof *out);
    const int V = m->cfg.vocab_size, max_pos = m->cfg.max_position_embeddings;
    if (n_prompt <= 0) return mt_error_set(err, MT_ERR_INVALID_ARG, "an empty prompt");
    if (opt->max_new_tokens < 0)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "max_new_tokens is %d", opt->max_new_tokens);
    if (n_prompt >= max_pos)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "the prompt has %d tokens: no room left in the model's context of "
                            "%d",
                            n_prompt, max_pos);
    int64_t want = (int64_t)n_prompt + opt->max_new_tokens;
    int capacity = want > max_pos ? max_pos : (int)want;
    mt_kv_decoder *d = NULL;
    mt_status st = mt_kv_decoder_create(m, capacity, n_prompt < 128 ? n_prompt : 128, &d, err);
    if (st) return st;
    float *logits = mt_malloc((size_t)V * sizeof(float), "logits", err);
    void *work = mt_malloc(mt_sample_work_bytes(V), "sampling buffer", err);
    out->ids = mt_malloc(((size_t)opt->max_new_tokens + 1) * sizeof(int32_t), "generated ids", err);
    out->n_prompt = n_prompt;
    char *text = NULL;
    size_t text_len = 0, emitted = 0;
    if (!logits || !work || !out->ids) {
        st = MT_ERR_NOMEM;
        goto done;
    }
    uint64_t rng = opt->sampling.seed;
    double t0 = mt_now_seconds();
    if ((st = mt_kv_decoder_feed(d, prompt, n_prompt, logits, err))) goto done;
    double t1 = mt_now_seconds();
    out->prefill_seconds = t1 - t0;
    out->reason = MT_STOP_LENGTH;
    int finished = 0;
    for (int i = 0; i < opt->max_new_tokens && !finished; i++) {
        if (i > 0) {
            if (d->length == d->capacity) {
                out->reason = MT_STOP_CONTEXT;
                break;
            }
            if ((st = mt_kv_decoder_feed(d, &out->ids[out->n_ids - 1], 1, logits, err))) goto done;
        }
        int32_t id = mt_sample(logits, V, &opt->sampling, &rng, work);
        out->ids[out->n_ids++] = id;
        for (int k = 0; k < opt->n_stop_ids; k++)
            if (id == opt->stop_ids[k]) {
                out->reason = MT_STOP_EOS;
                finished = 1;
            }
        if (!tok) continue;
        /* the whole text again: decoders join tokens in context (spaces, bytes) */
        int n_text = out->n_ids - (out->reason == MT_STOP_EOS);
        char *fresh = NULL;
        size_t fresh_len = 0;
        if ((st = mt_tokenizer_decode(tok, out->ids, (size_t)n_text, opt->skip_special, &fresh,
                                      &fresh_len, err)))
            goto done;
        free(text);
        text = fresh;
        text_len = fresh_len;
        size_t stop_at = find_stop(text, text_len, opt);
        if (stop_at < text_len) {
            text_len = stop_at;
            text[text_len] = '\0';
            out->reason = MT_STOP_STRING;
            finished = 1;
        }
        size_t settled = finished ? text_len : text_len - unsettled_tail(text, text_len, opt);
        if (opt->on_text && settled > emitted) {
            if (opt->on_text(opt->user, text + emitted, settled - emitted) && !finished) {
                out->reason = MT_STOP_CALLBACK;
                finished = 1;
            }
        }
        if (settled > emitted) emitted = settled;
    }
    if (tok && !text) {
        if ((st = mt_tokenizer_decode(tok, out->ids, 0, 0, &text, &text_len, err))) goto done;
    }
    if (tok && opt->on_text && text_len > emitted && out->reason != MT_STOP_CALLBACK)
        opt->on_text(opt->user, text + emitted, text_len - emitted);
    out->decode_seconds = mt_now_seconds() - t1;
    out->text = text;
    out->text_len = text_len;
    text = NULL;
done:
    free(text);
    free(logits);
    free(work);
    mt_kv_decoder_free(d);
    if (st) mt_generation_free(out);
    return st;
}
