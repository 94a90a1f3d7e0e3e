/* generate.c — an incremental decoder with a key/value cache, sampling, generation.
 *
 * One chunk of n rows, row i being token tokens[i] of slot slot[i] at position pos[i],
 * in the notation of model.c:
 *   x = embed[tokens]
 *   per layer: ln = rmsnorm(x); q,k,v = rope(q_proj(ln)), rope(k_proj(ln)), v_proj(ln)
 *              cache[l][slot[i]][pos[i]] = k[i], v[i]      (every row first)
 *              att[i] = softmax(q[i] · cache_k[l][slot[i]][0..pos[i]]^T * scale)
 *                       · cache_v[l][slot[i]][0..pos[i]]     (grouped heads)
 *              x += o_proj(att); ln = rmsnorm(x); x += down_proj(silu(gate_proj(ln)) * up_proj(ln))
 *   logits = lm_head(rmsnorm(x[rows wanted]))
 * A prefill is rows of one slot at consecutive positions (causal: a row sees the rows
 * before it, written just before); a decode step is rows of distinct slots, each at
 * its own length; mt_kv_decoder_append mixes both in one chunk. Projections, norms, rotary embedding and SwiGLU run on the
 * model's backend; the cache lives in host memory and attention over it runs on the
 * host (for the CPU backend the "transfers" are the same memory). */
#include "model/generate.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h"
#include "plugin/registry.h"

/* Positions of a block of the key cache: one AVX-512 vector of fp32 scores. */
#define KV_BLOCK 16

struct mt_kv_decoder {
    mt_model *m;
    int slots, capacity, max_rows, logit_rows;
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
    float *logits;             /* (logit_rows,V), logit_rows = min(slots, R) */
    float *rope_cos, *rope_sin; /* (capacity, D/2) */
    int32_t *tokens, *positions; /* (R) */
    /* host memory */
    /* per layer, slot and key/value head: keys in blocks of KV_BLOCK positions, each
     * (D, KV_BLOCK), so that a query's scores for a block are KV_BLOCK independent sums
     * (no sum across a vector's lanes); values (blocks * KV_BLOCK, D) */
    float *k_cache, *v_cache;  /* (L, slots, KVH, blocks * KV_BLOCK * D) */
    int blocks;                /* ceil(capacity / KV_BLOCK) */
    int *length;               /* (slots) positions cached per slot */
    float *hq, *hatt;          /* (R,H*D) host copies (NULL on the CPU backend) */
    float *hk, *hv;            /* (R,KVH*D) host copies (NULL on the CPU backend) */
    int32_t *hpos;             /* (R) position of each row of a chunk */
    int *hslot;                /* (R) slot of each row of a chunk */
    unsigned char *hwant;      /* (R) whether a row's logits are wanted */
    int *next;                 /* (slots) next position while rows are placed */
    unsigned char *seen;       /* (slots) for a step's check of distinct slots */
    float *scores;             /* (threads, blocks * KV_BLOCK) */
    int threads;
    /* the backend's int8 copies of the projections' weights (mt_kv_decoder_use_int8),
     * indexed as mt_model_linear numbers them; NULL entries stay fp32 */
    void **weight_int8;
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
    d->logits = mt_carve(cv, (size_t)d->logit_rows * c->vocab_size, f);
    d->rope_cos = mt_carve(cv, (size_t)d->capacity * c->head_dim / 2, f);
    d->rope_sin = mt_carve(cv, (size_t)d->capacity * c->head_dim / 2, f);
    d->tokens = mt_carve(cv, R, sizeof(int32_t));
    d->positions = mt_carve(cv, R, sizeof(int32_t));
}

static void free_weight_int8(mt_kv_decoder *d) {
    if (!d->weight_int8) return;
    mt_backend *be = d->m->be;
    for (int i = 0; i < mt_model_linear_count(d->m); i++)
        if (d->weight_int8[i]) be->ops->weight_int8_free(be, d->weight_int8[i]);
    free(d->weight_int8);
    d->weight_int8 = NULL;
}

int mt_kv_decoder_use_int8(mt_kv_decoder *d) {
    mt_backend *be = d->m->be;
    const int n = mt_model_linear_count(d->m);
    free_weight_int8(d);
    if (!be->ops->weight_int8_create || !be->ops->matmul_int8 ||
        !(d->weight_int8 = calloc((size_t)n, sizeof *d->weight_int8)))
        return 0;
    int made = 0;
    for (int i = 0; i < n; i++) {
        const mt_linear *lin = mt_model_linear(d->m, i);
        /* a released weight (QLoRA's) is the adapter's to multiply */
        if (lin->weight &&
            (d->weight_int8[i] = be->ops->weight_int8_create(be, lin->weight, lin->out, lin->in, 0,
                                                               MT_INT8_USE_DECODING)))
            made++;
    }
    if (!made) free_weight_int8(d);
    return made;
}

void mt_kv_decoder_free(mt_kv_decoder *d) {
    if (!d) return;
    free_weight_int8(d);
    if (d->dev_memory) d->m->be->ops->free(d->m->be, d->dev_memory);
    free(d->k_cache);
    free(d->v_cache);
    free(d->length);
    free(d->hq);
    free(d->hatt);
    free(d->hk);
    free(d->hv);
    free(d->hpos);
    free(d->hslot);
    free(d->hwant);
    free(d->next);
    free(d->seen);
    free(d->scores);
    free(d);
}

mt_status mt_kv_decoder_create(mt_model *m, int slots, int capacity, int max_rows,
                               mt_kv_decoder **out, mt_error *err) {
    const mt_model_config *c = &m->cfg;
    mt_backend *be = m->be;
    *out = NULL;
    if (slots <= 0)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "a decoder of %d slots: must be >= 1", slots);
    if (capacity <= 0 || capacity > c->max_position_embeddings)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "a cache of %d positions: must be in [1, %d] (the model's context "
                            "length)",
                            capacity, c->max_position_embeddings);
    if (max_rows <= 0) max_rows = 64;
    /* never more rows than positions in all the caches */
    if ((int64_t)max_rows > (int64_t)slots * capacity) max_rows = slots * capacity;
    mt_kv_decoder *d = mt_calloc(1, sizeof *d, "decoder", err);
    if (!d) return MT_ERR_NOMEM;
    d->m = m;
    d->slots = slots;
    d->capacity = capacity;
    d->max_rows = max_rows;
    d->logit_rows = slots < max_rows ? slots : max_rows;
    d->cpu = be->device == MT_DEVICE_CPU;
    d->threads = omp_get_max_threads();
    if (d->threads < 1) d->threads = 1;
    const size_t QD = (size_t)c->num_heads * c->head_dim;
    const size_t KVD = (size_t)c->num_kv_heads * c->head_dim;
    d->blocks = (capacity + KV_BLOCK - 1) / KV_BLOCK;
    const size_t padded = (size_t)d->blocks * KV_BLOCK;
    const size_t cache = (size_t)c->num_layers * slots * padded * KVD;
    mt_carver size = {0};
    carve_decoder(d, &size);
    /* zeroed: a block's scores are computed for all its positions, cached or not */
    d->k_cache = calloc(cache, sizeof(float));
    d->v_cache = calloc(cache, sizeof(float));
    d->length = calloc((size_t)slots, sizeof(int));
    d->hpos = malloc((size_t)max_rows * sizeof(int32_t));
    d->hslot = malloc((size_t)max_rows * sizeof(int));
    d->hwant = malloc((size_t)max_rows);
    d->next = malloc((size_t)slots * sizeof(int));
    d->seen = calloc((size_t)slots, 1);
    d->scores = malloc((size_t)d->threads * padded * sizeof(float));
    int host_ok = d->k_cache && d->v_cache && d->length && d->hpos && d->hslot && d->hwant &&
                  d->next && d->seen && d->scores;
    if (!d->cpu) {
        d->hq = malloc((size_t)max_rows * QD * sizeof(float));
        d->hatt = malloc((size_t)max_rows * QD * sizeof(float));
        d->hk = malloc((size_t)max_rows * KVD * sizeof(float));
        d->hv = malloc((size_t)max_rows * KVD * sizeof(float));
        host_ok = host_ok && d->hq && d->hatt && d->hk && d->hv;
    }
    d->dev_memory = host_ok ? be->ops->alloc(be, size.offset) : NULL;
    if (!d->dev_memory) {
        mt_kv_decoder_free(d);
        if (!host_ok)
            return mt_error_set(err, MT_ERR_NOMEM,
                                "out of host memory for a key/value cache of %d slots x %d "
                                "positions (%zu MB) and its row buffers",
                                slots, capacity, 2 * cache * sizeof(float) >> 20);
        return mt_error_set(err, MT_ERR_NOMEM,
                            "out of %s memory for %zu bytes of decoder scratch (%d rows at a "
                            "time)",
                            be->name, size.offset, max_rows);
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

int mt_kv_decoder_slots(const mt_kv_decoder *d) { return d->slots; }

int mt_kv_decoder_capacity(const mt_kv_decoder *d) { return d->capacity; }

/* Layer l's cached keys (or values, from v_cache) of slot s and key/value head g:
 * (blocks, D, KV_BLOCK) for keys, (blocks * KV_BLOCK, D) for values. */
static float *head_cache(const mt_kv_decoder *d, float *cache, int l, int s, int g) {
    const mt_model_config *c = &d->m->cfg;
    const size_t head = (size_t)d->blocks * KV_BLOCK * c->head_dim;
    return cache + (((size_t)l * d->slots + (size_t)s) * c->num_kv_heads + (size_t)g) * head;
}

/* Row r's key and value (KVH*D each) into layer l's cache of slot s at position pos. */
static void cache_put(mt_kv_decoder *d, int l, int s, int pos, const float *k, const float *v) {
    const mt_model_config *c = &d->m->cfg;
    const int D = c->head_dim;
    for (int g = 0; g < c->num_kv_heads; g++) {
        float *kb = head_cache(d, d->k_cache, l, s, g) + (size_t)(pos / KV_BLOCK) * D * KV_BLOCK +
                    pos % KV_BLOCK;
        for (int i = 0; i < D; i++) kb[(size_t)i * KV_BLOCK] = k[(size_t)g * D + i];
        memcpy(head_cache(d, d->v_cache, l, s, g) + (size_t)pos * D, v + (size_t)g * D,
               (size_t)D * sizeof(float));
    }
}

void mt_kv_decoder_reset(mt_kv_decoder *d, int slot) {
    if (slot >= 0 && slot < d->slots) d->length[slot] = 0;
}

mt_status mt_kv_decoder_copy(mt_kv_decoder *d, int to, int from, int n, mt_error *err) {
    if (to < 0 || to >= d->slots || from < 0 || from >= d->slots || n < 0 || n > d->length[from])
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "copying %d positions from slot %d to slot %d of a decoder of %d "
                            "slots",
                            n, from, to, d->slots);
    const mt_model_config *c = &d->m->cfg;
    /* keys by whole blocks: a block's positions past n are never read as cached */
    const size_t key_bytes = (size_t)(n + KV_BLOCK - 1) / KV_BLOCK * KV_BLOCK * c->head_dim * sizeof(float);
    const size_t value_bytes = (size_t)n * c->head_dim * sizeof(float);
    for (int l = 0; l < c->num_layers && to != from; l++)
        for (int g = 0; g < c->num_kv_heads; g++) {
            memcpy(head_cache(d, d->k_cache, l, to, g), head_cache(d, d->k_cache, l, from, g), key_bytes);
            memcpy(head_cache(d, d->v_cache, l, to, g), head_cache(d, d->v_cache, l, from, g), value_bytes);
        }
    d->length[to] = n;
    return MT_OK;
}

int mt_kv_decoder_length(const mt_kv_decoder *d, int slot) {
    return slot >= 0 && slot < d->slots ? d->length[slot] : -1;
}

/* Scores s[t] = scale * q . key[t] for the positions of the blocks covering 0 .. len-1
 * of one head's keys kh (blocks, D, KV_BLOCK). Four running sums over D hide the
 * multiply-adds' latency; each is a vector of the block's positions. */
static void head_scores(float *restrict s, const float *restrict q, const float *restrict kh,
                        int len, int D, float scale) {
    for (int b0 = 0; b0 < len; b0 += KV_BLOCK) {
        const float *blk = kh + (size_t)b0 * D;
        float a0[KV_BLOCK] = {0}, a1[KV_BLOCK] = {0}, a2[KV_BLOCK] = {0}, a3[KV_BLOCK] = {0};
        int i = 0;
        for (; i + 3 < D; i += 4) {
            const float *k0 = blk + (size_t)i * KV_BLOCK;
            for (int j = 0; j < KV_BLOCK; j++) {
                a0[j] += q[i] * k0[j];
                a1[j] += q[i + 1] * k0[KV_BLOCK + j];
                a2[j] += q[i + 2] * k0[2 * KV_BLOCK + j];
                a3[j] += q[i + 3] * k0[3 * KV_BLOCK + j];
            }
        }
        for (; i < D; i++)
            for (int j = 0; j < KV_BLOCK; j++) a0[j] += q[i] * blk[(size_t)i * KV_BLOCK + j];
        for (int j = 0; j < KV_BLOCK; j++) s[b0 + j] = ((a0[j] + a1[j]) + (a2[j] + a3[j])) * scale;
    }
}

/* o (D) = sum over t < len of p[t] * value[t] for one head's values vh (positions, D).
 * Per 16 outputs, four running sums over t, each a vector. */
static void head_values(float *restrict o, const float *restrict p, const float *restrict vh,
                        int len, int D) {
    int i0 = 0;
    for (; i0 + 16 <= D; i0 += 16) {
        float a0[16] = {0}, a1[16] = {0}, a2[16] = {0}, a3[16] = {0};
        int t = 0;
        for (; t + 3 < len; t += 4) {
            const float *v0 = vh + (size_t)t * D + i0;
            for (int j = 0; j < 16; j++) {
                a0[j] += p[t] * v0[j];
                a1[j] += p[t + 1] * v0[D + j];
                a2[j] += p[t + 2] * v0[2 * D + j];
                a3[j] += p[t + 3] * v0[3 * D + j];
            }
        }
        for (; t < len; t++)
            for (int j = 0; j < 16; j++) a0[j] += p[t] * vh[(size_t)t * D + i0 + j];
        for (int j = 0; j < 16; j++) o[i0 + j] = (a0[j] + a1[j]) + (a2[j] + a3[j]);
    }
    for (; i0 < D; i0++) { /* head sizes that are not a multiple of 16 */
        float acc = 0.0f;
        for (int t = 0; t < len; t++) acc += p[t] * vh[(size_t)t * D + i0];
        o[i0] = acc;
    }
}

/* att (n,H,D) for queries q (n,H,D): row r attends over layer l's cache of its slot
 * hslot[r], positions 0 .. hpos[r]. */
static void cached_attention(mt_kv_decoder *d, float *att, const float *q, int l, int n) {
    const mt_model_config *c = &d->m->cfg;
    const int H = c->num_heads, KVH = c->num_kv_heads, D = c->head_dim, group = H / KVH;
    const float scale = 1.0f / sqrtf((float)D);
    const int work = n * KVH;
    int64_t flops = 0;
    for (int r = 0; r < n; r++) flops += (int64_t)(d->hpos[r] + 1) * H * D;
    /* A task is a row and a key/value head: the heads of its group read the head's keys
     * and values one after the other, from the cache nearest the core rather than from
     * memory (reading the cache is most of a decoding step's attention). Dynamic: a
     * chunk's prompt rows attend over a few positions, its decoding rows over whole
     * caches; each task writes its own output, so the result is the same. At most
     * d->threads threads: the scores have a row for each thread the decoder was made for,
     * whatever the caller has set since. */
#pragma omp parallel for schedule(dynamic, 1) num_threads(d->threads) if (work > 1 && flops > 32768)
    for (int w = 0; w < work; w++) {
        const int r = w / KVH, g = w % KVH, len = d->hpos[r] + 1;
        const float *kh = head_cache(d, d->k_cache, l, d->hslot[r], g);
        const float *vh = head_cache(d, d->v_cache, l, d->hslot[r], g);
        float *s = d->scores + (size_t)omp_get_thread_num() * d->blocks * KV_BLOCK;
        for (int h = g * group; h < (g + 1) * group; h++) {
            head_scores(s, q + ((size_t)r * H + h) * D, kh, len, D, scale);
            float mx = -INFINITY;
            for (int t = 0; t < len; t++)
                if (s[t] > mx) mx = s[t];
            float sum = 0.0f;
            for (int t = 0; t < len; t++) {
                s[t] = expf(s[t] - mx);
                sum += s[t];
            }
            float *o = att + ((size_t)r * H + h) * D;
            head_values(o, s, vh, len, D);
            const float inv = 1.0f / sum;
            for (int i = 0; i < D; i++) o[i] *= inv;
        }
    }
}

/* One chunk of n <= max_rows rows: tokens (n), with each row's slot and position in
 * d->hslot and d->hpos (already checked). Every row's key and value joins its slot's
 * cache before any row attends. logits (wanted,V), when not NULL, receives the logits
 * of the rows marked in d->hwant, in row order. Lengths are the caller's. */
static mt_status run_rows_with_weights(mt_kv_decoder *d, const int32_t *tokens, int n,
                                       float *logits, mt_error *err) {
    mt_model *m = d->m;
    mt_backend *be = m->be;
    const mt_model_config *c = &m->cfg;
    const int C = c->hidden_size, F = c->intermediate_size;
    const int H = c->num_heads, KVH = c->num_kv_heads, D = c->head_dim;
    const size_t QD = (size_t)H * D, KVD = (size_t)KVH * D;
    mt_status st = be->ops->upload(be, d->tokens, tokens, (size_t)n * sizeof(int32_t));
    if (!st) st = be->ops->upload(be, d->positions, d->hpos, (size_t)n * sizeof(int32_t));
    if (st) return mt_error_set(err, st, "uploading tokens failed");
    float *hq = d->cpu ? d->q : d->hq, *hatt = d->cpu ? d->att : d->hatt;
    float *hk = d->cpu ? d->k : d->hk, *hv = d->cpu ? d->v : d->hv;

    be->ops->embedding_forward(be, d->x, d->tokens, m->embed, n, C);
    for (int l = 0; l < c->num_layers; l++) {
        mt_layer *ly = &m->layers[l];
        be->ops->rmsnorm_forward(be, d->ln, d->rstd, d->x, ly->attn_norm, n, C, c->rms_norm_eps);
        mt_linears_forward_shared(m, (mt_linear *[]){&ly->q, &ly->k, &ly->v},
                                  (float *[]){d->q, d->k, d->v}, 3, d->ln, n);
        be->ops->rope_forward(be, d->q, d->rope_cos, d->rope_sin, d->positions, n, H, D);
        be->ops->rope_forward(be, d->k, d->rope_cos, d->rope_sin, d->positions, n, KVH, D);
        /* the new keys and values join their slots' caches; queries come to the host */
        if (!d->cpu &&
            ((st = be->ops->download(be, hk, d->k, (size_t)n * KVD * sizeof(float))) ||
             (st = be->ops->download(be, hv, d->v, (size_t)n * KVD * sizeof(float))) ||
             (st = be->ops->download(be, hq, d->q, (size_t)n * QD * sizeof(float)))))
            return mt_error_set(err, st, "downloading keys, values and queries failed");
        for (int r = 0; r < n; r++) cache_put(d, l, d->hslot[r], d->hpos[r], hk + r * KVD, hv + r * KVD);
        cached_attention(d, hatt, hq, l, n);
        if (!d->cpu && (st = be->ops->upload(be, d->att, hatt, (size_t)n * QD * sizeof(float))))
            return mt_error_set(err, st, "uploading attention output failed");
        mt_linear_forward(&ly->o, d->proj, d->att, n);
        be->ops->add(be, d->x, d->x, d->proj, (size_t)n * C);
        be->ops->rmsnorm_forward(be, d->ln, d->rstd, d->x, ly->mlp_norm, n, C, c->rms_norm_eps);
        mt_linears_forward_shared(m, (mt_linear *[]){&ly->gate, &ly->up},
                                  (float *[]){d->gate, d->up}, 2, d->ln, n);
        be->ops->swiglu_forward(be, d->act, d->gate, d->up, (size_t)n * F);
        mt_linear_forward(&ly->down, d->proj, d->act, n);
        be->ops->add(be, d->x, d->x, d->proj, (size_t)n * C);
    }
    /* the wanted rows, logit_rows at a time: each run of them normalised into ln */
    const size_t V = (size_t)c->vocab_size;
    for (int r = 0; logits && r < n;) {
        int g = 0;
        while (r < n && g < d->logit_rows) {
            if (!d->hwant[r]) {
                r++;
                continue;
            }
            int e = r;
            while (e < n && d->hwant[e] && g + (e - r) < d->logit_rows) e++;
            be->ops->rmsnorm_forward(be, d->ln + (size_t)g * C, d->rstd + g, d->x + (size_t)r * C,
                                     m->final_norm, e - r, C, c->rms_norm_eps);
            g += e - r;
            r = e;
        }
        if (!g) break;
        mt_linear_forward(&m->lm_head, d->logits, d->ln, g);
        if ((st = be->ops->download(be, logits, d->logits, (size_t)g * V * sizeof(float))))
            return mt_error_set(err, st, "downloading logits failed");
        logits += (size_t)g * V;
    }
    return m->num_adapters ? mt_host_check("adapter forward", err) : MT_OK;
}

/* run_rows_with_weights with the projections multiplying through this decoder's int8
 * weights where it has them, for this chunk only: the model's projections are shared
 * with training, which must never see them. */
static mt_status run_rows(mt_kv_decoder *d, const int32_t *tokens, int n, float *logits,
                          mt_error *err) {
    const int projections = mt_model_linear_count(d->m);
    for (int i = 0; d->weight_int8 && i < projections; i++)
        mt_model_linear(d->m, i)->weight_int8 = d->weight_int8[i];
    mt_status st = run_rows_with_weights(d, tokens, n, logits, err);
    if (d->weight_int8) mt_model_int8_detach(d->m);
    return st;
}

static mt_status check_tokens(const mt_kv_decoder *d, const int32_t *tokens, int n, mt_error *err) {
    const int V = d->m->cfg.vocab_size;
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= V)
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "token %d at index %d is outside the vocabulary (%d)", tokens[i],
                                i, V);
    return MT_OK;
}

mt_status mt_kv_decoder_feed(mt_kv_decoder *d, int slot, const int32_t *tokens, int n,
                             float *logits, mt_error *err) {
    if (slot < 0 || slot >= d->slots)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "slot %d of a decoder of %d slots", slot,
                            d->slots);
    if (n <= 0) return mt_error_set(err, MT_ERR_INVALID_ARG, "feeding %d tokens", n);
    if (n > d->capacity - d->length[slot])
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%d more tokens do not fit the cache of slot %d (%d of %d positions "
                            "used)",
                            n, slot, d->length[slot], d->capacity);
    mt_status st = check_tokens(d, tokens, n, err);
    for (int i = 0; i < n && !st; i += d->max_rows) {
        int rows = n - i < d->max_rows ? n - i : d->max_rows;
        for (int r = 0; r < rows; r++) {
            d->hslot[r] = slot;
            d->hpos[r] = d->length[slot] + r;
            d->hwant[r] = i + r == n - 1;
        }
        st = run_rows(d, tokens + i, rows, logits, err);
        if (!st) d->length[slot] += rows;
    }
    return st;
}

mt_status mt_kv_decoder_append(mt_kv_decoder *d, const int *slots, const int32_t *tokens, int n,
                               const unsigned char *want, float *logits, mt_error *err) {
    if (n <= 0) return mt_error_set(err, MT_ERR_INVALID_ARG, "appending %d rows", n);
    mt_status st = check_tokens(d, tokens, n, err);
    for (int i = 0; i < n && !st; i++)
        if (slots[i] < 0 || slots[i] >= d->slots)
            st = mt_error_set(err, MT_ERR_INVALID_ARG, "row %d: slot %d of a decoder of %d slots",
                              i, slots[i], d->slots);
    if (st) return st;
    for (int i = 0; i < n; i++) d->next[slots[i]] = d->length[slots[i]];
    for (int i = 0; i < n; i++)
        if (d->next[slots[i]]++ >= d->capacity)
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "row %d: the cache of slot %d is full (%d positions)", i, slots[i],
                                d->capacity);
    const size_t V = (size_t)d->m->cfg.vocab_size;
    for (int i = 0; i < n; i++) d->next[slots[i]] = d->length[slots[i]];
    for (int i0 = 0; i0 < n; i0 += d->max_rows) {
        const int rows = n - i0 < d->max_rows ? n - i0 : d->max_rows;
        int wanted = 0;
        for (int r = 0; r < rows; r++) {
            d->hslot[r] = slots[i0 + r];
            d->hpos[r] = d->next[slots[i0 + r]]++;
            d->hwant[r] = !want || want[i0 + r];
            wanted += d->hwant[r];
        }
        if ((st = run_rows(d, tokens + i0, rows, logits, err))) return st;
        for (int r = 0; r < rows; r++) d->length[d->hslot[r]]++;
        if (logits) logits += (size_t)wanted * V;
    }
    return MT_OK;
}

mt_status mt_kv_decoder_step(mt_kv_decoder *d, const int *slots, const int32_t *tokens, int k,
                             float *logits, mt_error *err) {
    if (k <= 0 || k > d->slots)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "a step of %d rows: must be in [1, %d] (the decoder's slots)", k,
                            d->slots);
    mt_status st = MT_OK;
    int i = 0;
    for (; i < k && !st; i++) {
        if (slots[i] >= 0 && slots[i] < d->slots && d->seen[slots[i]]++)
            st = mt_error_set(err, MT_ERR_INVALID_ARG, "row %d: slot %d appears twice in a step",
                              i, slots[i]);
    }
    for (int j = 0; j < i; j++) /* clear the marks */
        if (slots[j] >= 0 && slots[j] < d->slots) d->seen[slots[j]] = 0;
    return st ? st : mt_kv_decoder_append(d, slots, tokens, k, NULL, logits, err);
}

/* ---- sampling ------------------------------------------------------------ */

typedef struct cand {
    float logit;
    int32_t id;
} cand;

static double rng_uniform(uint64_t *s) { return (double)(mt_splitmix64(s) >> 11) / 9007199254740992.0; }

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

int32_t mt_sample(const float *logits, int V, const mt_sampling *s, uint64_t *rng, void *work) {
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
    free(g->logps);
    free(g->text);
    g->ids = NULL;
    g->logps = NULL;
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

/* ---- one sequence's generation state, shared by mt_generate and mt_generate_batch ---- */

typedef struct gen_seq {
    const mt_tokenizer *tok;
    const mt_generate_options *opt;
    mt_generation *out;
    uint64_t rng;     /* the sampler's generator */
    char *text;       /* the decoded text so far (NULL before the first token) */
    size_t text_len;
    size_t emitted;   /* bytes of text handed to on_text */
    int finished;     /* a stop id, a stop string, the callback or a mismatch ended it */
    const char *expect; /* the text it must stay able to equal, or NULL (opt.expect) */
} gen_seq;

static mt_status seq_start(gen_seq *s, const mt_tokenizer *tok, const mt_generate_options *opt,
                           uint64_t seed, int n_prompt, mt_generation *out, mt_error *err) {
    memset(s, 0, sizeof *s);
    memset(out, 0, sizeof *out);
    s->tok = tok;
    s->opt = opt;
    s->out = out;
    s->rng = seed;
    out->n_prompt = n_prompt;
    out->reason = MT_STOP_LENGTH;
    out->ids = mt_malloc(((size_t)opt->max_new_tokens + 1) * sizeof(int32_t), "generated ids", err);
    if (out->ids && opt->logps)
        out->logps = mt_malloc(((size_t)opt->max_new_tokens + 1) * sizeof(float), "generated log-probabilities", err);
    return out->ids && (out->logps || !opt->logps) ? MT_OK : MT_ERR_NOMEM;
}

/* Whether the sequence takes another token; when its slot's cache (length of
 * capacity) has no room for the last one, it ends for the context. */
static int seq_wants(gen_seq *s, int length, int capacity) {
    if (s->finished || s->out->n_ids >= s->opt->max_new_tokens) return 0;
    if (s->out->n_ids > 0 && length >= capacity) {
        s->out->reason = MT_STOP_CONTEXT;
        return 0;
    }
    return 1;
}

/* log softmax(logits / temperature)[id], in double (temperature <= 0: 1). */
static float token_logp(const float *logits, int V, float temperature, int32_t id) {
    const double inv_t = temperature > 0.0f ? 1.0 / (double)temperature : 1.0;
    double mx = -INFINITY, sum = 0.0;
    for (int i = 0; i < V; i++)
        if (logits[i] > mx) mx = logits[i];
    for (int i = 0; i < V; i++) sum += exp(((double)logits[i] - mx) * inv_t);
    return (float)(((double)logits[id] - mx) * inv_t - log(sum));
}

/* Samples the next token from logits (V; work: mt_sample_work_bytes), records its
 * log-probability and takes it: stop ids, the text, stop strings, the callback. */
static mt_status seq_take(gen_seq *s, float *logits, int V, void *work, mt_error *err) {
    const mt_generate_options *opt = s->opt;
    mt_generation *out = s->out;
    int32_t id = mt_sample(logits, V, &opt->sampling, &s->rng, work); /* reads logits only */
    if (out->logps) out->logps[out->n_ids] = token_logp(logits, V, opt->sampling.temperature, id);
    out->ids[out->n_ids++] = id;
    for (int k = 0; k < opt->n_stop_ids; k++)
        if (id == opt->stop_ids[k]) {
            out->reason = MT_STOP_EOS;
            s->finished = 1;
        }
    if (!s->tok) return MT_OK;
    /* the whole text again: decoders join tokens in context (spaces, bytes) */
    int n_text = out->n_ids - (out->reason == MT_STOP_EOS);
    char *fresh = NULL;
    size_t fresh_len = 0;
    mt_status st = mt_tokenizer_decode(s->tok, out->ids, (size_t)n_text, opt->skip_special, &fresh,
                                       &fresh_len, err);
    if (st) return st;
    free(s->text);
    s->text = fresh;
    s->text_len = fresh_len;
    size_t stop_at = find_stop(s->text, s->text_len, opt);
    if (stop_at < s->text_len) {
        s->text_len = stop_at;
        s->text[stop_at] = '\0';
        out->reason = MT_STOP_STRING;
        s->finished = 1;
    }
    size_t settled = s->finished ? s->text_len : s->text_len - unsettled_tail(s->text, s->text_len, opt);
    if (opt->on_text && settled > s->emitted &&
        opt->on_text(opt->user, s->text + s->emitted, settled - s->emitted) && !s->finished) {
        out->reason = MT_STOP_CALLBACK;
        s->finished = 1;
    }
    if (settled > s->emitted) s->emitted = settled;
    if (!s->finished && s->expect && !mt_text_may_equal(s->text, settled, s->expect)) {
        out->reason = MT_STOP_MISMATCH;
        s->finished = 1;
    }
    return MT_OK;
}

/* Lua's %s in the C locale, without the locale. */
static int is_space(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

int mt_text_may_equal(const char *text, size_t len, const char *expected) {
    size_t start = 0;
    while (start < len && is_space(text[start])) start++;
    if (start == len) return 1; /* nothing but whitespace yet */
    while (*expected && is_space(*expected)) expected++;
    size_t want = strlen(expected);
    while (want > 0 && is_space(expected[want - 1])) want--;
    const size_t have = len - start;
    if (have <= want) return !memcmp(text + start, expected, have);
    if (memcmp(text + start, expected, want)) return 0;
    for (size_t i = start + want; i < len; i++)
        if (!is_space(text[i])) return 0;
    return 1;
}

/* The sequence has ended: the rest of the text goes to the callback and the text to out. */
static mt_status seq_finish(gen_seq *s, mt_error *err) {
    const mt_generate_options *opt = s->opt;
    if (!s->tok) return MT_OK;
    if (!s->text) {
        mt_status st = mt_tokenizer_decode(s->tok, s->out->ids, 0, 0, &s->text, &s->text_len, err);
        if (st) return st;
    }
    if (opt->on_text && s->text_len > s->emitted && s->out->reason != MT_STOP_CALLBACK)
        opt->on_text(opt->user, s->text + s->emitted, s->text_len - s->emitted);
    s->out->text = s->text;
    s->out->text_len = s->text_len;
    s->text = NULL;
    return MT_OK;
}

/* The checks mt_generate and mt_generate_batch share. */
static mt_status check_request(const mt_model *m, const mt_tokenizer *tok, int n_prompt,
                               const mt_generate_options *opt, mt_error *err) {
    const int max_pos = m->cfg.max_position_embeddings;
    if (opt->expect && !tok)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "expected texts need a tokenizer (the text)");
    if (n_prompt <= 0) return mt_error_set(err, MT_ERR_INVALID_ARG, "an empty prompt");
    if (opt->max_new_tokens < 0)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "max_new_tokens is %d", opt->max_new_tokens);
    if (n_prompt >= max_pos)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "the prompt has %d tokens: no room left in the model's context of "
                            "%d",
                            n_prompt, max_pos);
    return MT_OK;
}

/* Positions a cache needs for a prompt of n_prompt tokens: at most the model's context. */
static int cache_positions(const mt_model *m, int n_prompt, const mt_generate_options *opt) {
    int64_t want = (int64_t)n_prompt + opt->max_new_tokens;
    return want > m->cfg.max_position_embeddings ? m->cfg.max_position_embeddings : (int)want;
}

int mt_chat_stop_ids(const mt_tokenizer *tok, int32_t *ids) {
    static const char *const turn_ends[] = {"<|im_end|>", "<|eot_id|>", "<|end_of_text|>",
                                            "<|endoftext|>", "</s>"};
    int n = 0;
    if (mt_tokenizer_eos(tok) >= 0) ids[n++] = mt_tokenizer_eos(tok);
    for (size_t i = 0; i < sizeof turn_ends / sizeof turn_ends[0]; i++) {
        int32_t id = mt_tokenizer_token_id(tok, turn_ends[i]);
        int dup = id < 0 || !mt_tokenizer_is_special(tok, id);
        for (int k = 0; k < n && !dup; k++) dup = ids[k] == id;
        if (!dup) ids[n++] = id;
    }
    return n;
}

mt_status mt_generate(mt_model *m, const mt_tokenizer *tok, const int32_t *prompt, int n_prompt,
                      const mt_generate_options *opt, mt_generation *out, mt_error *err) {
    memset(out, 0, sizeof *out);
    const int V = m->cfg.vocab_size;
    mt_status st = check_request(m, tok, n_prompt, opt, err);
    if (st) return st;
    const int capacity = cache_positions(m, n_prompt, opt);
    mt_kv_decoder *d = NULL;
    if ((st = mt_kv_decoder_create(m, 1, capacity, n_prompt < 128 ? n_prompt : 128, &d, err)))
        return st;
    gen_seq s;
    float *logits = mt_malloc((size_t)V * sizeof(float), "logits", err);
    void *work = mt_malloc(mt_sample_work_bytes(V), "sampling buffer", err);
    st = seq_start(&s, tok, opt, opt->sampling.seed, n_prompt, out, err);
    s.expect = opt->expect ? opt->expect[0] : NULL;
    if (!st && (!logits || !work)) st = MT_ERR_NOMEM;
    if (st) goto done;
    double t0 = mt_now_seconds();
    out->int8 = opt->fp32 ? 0 : mt_kv_decoder_use_int8(d);
    if ((st = mt_kv_decoder_feed(d, 0, prompt, n_prompt, logits, err))) goto done;
    double t1 = mt_now_seconds();
    out->prefill_seconds = t1 - t0;
    while (seq_wants(&s, d->length[0], capacity)) {
        if (out->n_ids > 0 &&
            (st = mt_kv_decoder_feed(d, 0, &out->ids[out->n_ids - 1], 1, logits, err)))
            goto done;
        if ((st = seq_take(&s, logits, V, work, err))) goto done;
    }
    st = seq_finish(&s, err);
    out->decode_seconds = mt_now_seconds() - t1;
done:
    free(s.text);
    free(logits);
    free(work);
    mt_kv_decoder_free(d);
    if (st) mt_generation_free(out);
    return st;
}

/* ---- batched generation ------------------------------------------------- */

/* Prompt rows a chunk of the batch takes besides one row per decoding slot. */
#define BATCH_PROMPT_ROWS 128
/* Shared prompt prefixes shorter than this are run by every sequence. */
#define BATCH_PREFIX_MIN 8

/* The batch's working state: sequence seq[i] for prompt i; slot s holds sequence
 * in_slot[s] (-1: free), whose first fed[s] prompt ids are in its cache. */
typedef struct gen_batch {
    mt_model *m;
    const mt_tokenizer *tok;
    const mt_generate_options *opt;
    const int32_t *const *prompts;
    const int *n_prompt;
    int n, next;             /* prompts, the next waiting one */
    int slots, max_rows;
    int prefix;              /* ids every prompt starts with, cached once in slot `slots` */
    double prefix_seconds;   /* its time / n: each sequence's share of it */
    mt_kv_decoder *d;
    gen_seq *seq;            /* (n) */
    int *in_slot, *fed;      /* (slots) */
    int *row_slot, *row_seq; /* (max_rows) the rows of a chunk: slot, sequence */
    int32_t *row_token;      /* (max_rows) */
    int decode_rows;         /* the chunk's first rows: generated tokens; then prompt ids */
    unsigned char *row_want; /* (max_rows) a generated token's row or a prompt's last */
    int *take_row, *take_logits; /* (slots) the rows whose sequences take a token, and
                                    the row of logits each reads */
    float *logits;           /* (slots,V): one wanted row per slot at the most */
    void *work;              /* (threads) mt_sample_work_bytes(V) each */
    int threads;
} gen_batch;

/* Waiting prompts take the free slots. */
static mt_status batch_fill(gen_batch *b, mt_error *err) {
    for (int s = 0; s < b->slots && b->next < b->n; s++) {
        if (b->in_slot[s] >= 0) continue;
        const int i = b->next++;
        /* sequence i draws as mt_generate does with seed + i */
        mt_status st = seq_start(&b->seq[i], b->tok, b->opt, b->opt->sampling.seed + (uint64_t)i,
                                 b->n_prompt[i], b->seq[i].out, err);
        if (st) return st;
        b->seq[i].expect = b->opt->expect ? b->opt->expect[i] : NULL;
        if (b->prefix) { /* the shared prefix's keys and values, run once */
            if ((st = mt_kv_decoder_copy(b->d, s, b->slots, b->prefix, err))) return st;
            b->seq[i].out->prefill_seconds = b->prefix_seconds;
        } else {
            mt_kv_decoder_reset(b->d, s);
        }
        b->in_slot[s] = i;
        b->fed[s] = b->prefix;
    }
    return MT_OK;
}

/* The rows of the next chunk: the last token of every slot that is generating, then
 * prompt ids of slots still in their prefill, up to max_rows in all. */
static int batch_rows(gen_batch *b) {
    int rows = 0;
    for (int s = 0; s < b->slots; s++) {
        const int i = b->in_slot[s];
        if (i < 0 || b->fed[s] < b->n_prompt[i]) continue;
        const mt_generation *g = b->seq[i].out;
        b->row_slot[rows] = s;
        b->row_seq[rows] = i;
        b->row_token[rows] = g->ids[g->n_ids - 1];
        b->row_want[rows++] = 1;
    }
    b->decode_rows = rows;
    for (int s = 0; s < b->slots && rows < b->max_rows; s++) {
        const int i = b->in_slot[s];
        if (i < 0 || b->fed[s] >= b->n_prompt[i]) continue;
        int take = b->n_prompt[i] - b->fed[s];
        if (take > b->max_rows - rows) take = b->max_rows - rows;
        for (int t = 0; t < take; t++) {
            b->row_slot[rows] = s;
            b->row_seq[rows] = i;
            b->row_token[rows] = b->prompts[i][b->fed[s] + t];
            b->row_want[rows++] = b->fed[s] + t == b->n_prompt[i] - 1;
        }
        b->fed[s] += take;
    }
    return rows;
}

/* One chunk; every wanted row's sequence takes a token (after its prompt only when it
 * wants one), and a sequence that ends gives up its slot. Each row costs the chunk's
 * time / rows: prompt rows to prefill_seconds, the others to decode_seconds. */
static mt_status batch_chunk(gen_batch *b, int rows, mt_error *err) {
    const int V = b->m->cfg.vocab_size, capacity = mt_kv_decoder_capacity(b->d);
    const double t0 = mt_now_seconds();
    mt_status st = mt_kv_decoder_append(b->d, b->row_slot, b->row_token, rows, b->row_want,
                                        b->logits, err);
    int takes = 0;
    for (int r = 0, w = 0; r < rows && !st; r++) {
        if (!b->row_want[r]) continue;
        if (r < b->decode_rows || b->opt->max_new_tokens > 0) {
            b->take_row[takes] = r;
            b->take_logits[takes++] = w;
        }
        w++;
    }
    /* Each sequence takes its token on its own (its generator, ids and text; batches
     * stream no text), so the takes share the threads: drawing from and summing over
     * the vocabulary and decoding the text would otherwise leave all threads but one
     * waiting. The first failing row's error is the chunk's. */
    const size_t work_bytes = mt_sample_work_bytes(V);
    int failed_row = rows;
#pragma omp parallel for schedule(dynamic, 1) num_threads(b->threads) if (takes > 1)
    for (int k = 0; k < takes; k++) {
        const int r = b->take_row[k];
        mt_error row_err = {0};
        mt_status row_st = seq_take(&b->seq[b->row_seq[r]], b->logits + (size_t)b->take_logits[k] * V,
                                    V, (char *)b->work + (size_t)omp_get_thread_num() * work_bytes,
                                    &row_err);
        if (row_st) {
#pragma omp critical(batch_take_error)
            if (r < failed_row) {
                failed_row = r;
                st = row_st;
                if (err) *err = row_err;
            }
        }
    }
    for (int r = 0; r < rows && !st; r++) {
        if (!b->row_want[r]) continue;
        const int s = b->row_slot[r];
        gen_seq *q = &b->seq[b->row_seq[r]];
        if (!seq_wants(q, mt_kv_decoder_length(b->d, s), capacity)) {
            b->in_slot[s] = -1;
            st = seq_finish(q, err);
        }
    }
    const double share = (mt_now_seconds() - t0) / rows;
    for (int r = 0; r < rows; r++) {
        mt_generation *g = b->seq[b->row_seq[r]].out;
        if (r < b->decode_rows) g->decode_seconds += share;
        else g->prefill_seconds += share;
    }
    return st;
}

/* The ids every prompt starts with (a chat template's system turn), up to one less
 * than the shortest prompt, so that each sequence still runs its last prompt id and
 * gets its logits; 0 when fewer than BATCH_PREFIX_MIN. */
static int shared_prefix(const int32_t *const *prompts, const int *n_prompt, int n) {
    int len = n_prompt[0] - 1;
    for (int i = 1; i < n && len > 0; i++) {
        if (n_prompt[i] - 1 < len) len = n_prompt[i] - 1;
        int t = 0;
        while (t < len && prompts[i][t] == prompts[0][t]) t++;
        len = t;
    }
    return n > 1 && len >= BATCH_PREFIX_MIN ? len : 0;
}

/* The shared prefix into the extra slot (its time is every sequence's prefill), then
 * chunks until every prompt has ended. */
static mt_status batch_run(gen_batch *b, mt_error *err) {
    mt_status st = MT_OK;
    int rows;
    if (b->prefix) {
        const double t0 = mt_now_seconds();
        if ((st = mt_kv_decoder_feed(b->d, b->slots, b->prompts[0], b->prefix, NULL, err)))
            return st;
        b->prefix_seconds = (mt_now_seconds() - t0) / b->n;
    }
    while (!st && !(st = batch_fill(b, err)) && (rows = batch_rows(b)) > 0)
        st = batch_chunk(b, rows, err);
    return st;
}

mt_status mt_generate_batch(mt_model *m, const mt_tokenizer *tok, const int32_t *const *prompts,
                            const int *n_prompt, int n, int slots, const mt_generate_options *opt,
                            mt_generation *out, mt_error *err) {
    if (n <= 0) return mt_error_set(err, MT_ERR_INVALID_ARG, "a batch of %d prompts", n);
    if (!prompts || !n_prompt || !out)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "a batch of %d prompts without %s", n,
                            !out ? "outputs" : "prompts");
    for (int i = 0; i < n; i++) memset(&out[i], 0, sizeof out[i]);
    if (opt->on_text)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "batched generation streams no text: on_text must be NULL (use "
                            "mt_generate for one prompt)");
    const int V = m->cfg.vocab_size;
    int longest = 0;
    for (int i = 0; i < n; i++) {
        mt_status st = check_request(m, tok, n_prompt[i], opt, err);
        if (!st && !prompts[i]) st = mt_error_set(err, MT_ERR_INVALID_ARG, "no ids");
        for (int t = 0; !st && t < n_prompt[i]; t++)
            if (prompts[i][t] < 0 || prompts[i][t] >= V)
                st = mt_error_set(err, MT_ERR_INVALID_ARG,
                                  "token %d at index %d is outside the vocabulary (%d)",
                                  prompts[i][t], t, V);
        if (st) {
            char why[sizeof err->msg];
            snprintf(why, sizeof why, "%s", err ? err->msg : "");
            return mt_error_set(err, st, "prompts[%d] (of %d): %s", i, n, why);
        }
        if (n_prompt[i] > longest) longest = n_prompt[i];
    }
    if (slots <= 0) slots = MT_GENERATE_SLOTS;
    if (slots > n) slots = n;
    gen_batch b = {.m = m, .tok = tok, .opt = opt, .prompts = prompts, .n_prompt = n_prompt,
                   .n = n, .slots = slots, .max_rows = slots + BATCH_PROMPT_ROWS,
                   .prefix = shared_prefix(prompts, n_prompt, n)};
    mt_status st = mt_kv_decoder_create(m, slots + (b.prefix > 0), cache_positions(m, longest, opt),
                                        b.max_rows, &b.d, err);
    if (st) return st;
    b.seq = mt_calloc((size_t)n, sizeof *b.seq, "sequence states", err);
    b.in_slot = mt_malloc((size_t)slots * sizeof *b.in_slot, "slot table", err);
    b.fed = mt_malloc((size_t)slots * sizeof *b.fed, "slot prompt counts", err);
    b.row_slot = mt_malloc((size_t)b.max_rows * sizeof *b.row_slot, "chunk slots", err);
    b.row_seq = mt_malloc((size_t)b.max_rows * sizeof *b.row_seq, "chunk sequences", err);
    b.row_token = mt_malloc((size_t)b.max_rows * sizeof *b.row_token, "chunk tokens", err);
    b.row_want = mt_malloc((size_t)b.max_rows, "chunk logit flags", err);
    b.take_row = mt_malloc((size_t)slots * sizeof *b.take_row, "chunk takes", err);
    b.take_logits = mt_malloc((size_t)slots * sizeof *b.take_logits, "chunk take logits", err);
    b.logits = mt_malloc((size_t)slots * V * sizeof(float), "batch logits", err);
    b.threads = omp_get_max_threads() > 0 ? omp_get_max_threads() : 1;
    b.work = mt_malloc((size_t)b.threads * mt_sample_work_bytes(V), "sampling buffers", err);
    if (!b.seq || !b.in_slot || !b.fed || !b.row_slot || !b.row_seq || !b.row_token || !b.row_want ||
        !b.take_row || !b.take_logits || !b.logits || !b.work) {
        st = MT_ERR_NOMEM;
    } else {
        for (int i = 0; i < n; i++) b.seq[i].out = &out[i];
        for (int s = 0; s < slots; s++) b.in_slot[s] = -1;
        /* the int8 copies are made once for all sequences: each is booked its share */
        const double t0 = mt_now_seconds();
        const int int8 = opt->fp32 ? 0 : mt_kv_decoder_use_int8(b.d);
        const double share = (mt_now_seconds() - t0) / n;
        st = batch_run(&b, err);
        for (int i = 0; i < n; i++) {
            out[i].int8 = int8;
            out[i].prefill_seconds += share;
        }
    }
    for (int i = 0; b.seq && i < n; i++) {
        free(b.seq[i].text);
        if (st) mt_generation_free(&out[i]);
    }
    free(b.seq);
    free(b.in_slot);
    free(b.fed);
    free(b.row_slot);
    free(b.row_seq);
    free(b.row_token);
    free(b.row_want);
    free(b.take_row);
    free(b.take_logits);
    free(b.logits);
    free(b.work);
    mt_kv_decoder_free(b.d);
    return st;
}
