/* model_identity.c — the base model's fingerprint.
 *
 * Hashing every weight would cost a full read of the model at every load (seconds for
 * 1B parameters, minutes for 70B); a strided sample of each tensor costs microseconds
 * and still tells two checkpoints of the same architecture apart: two trained models
 * agree in none of thousands of sampled values. The configuration is part of the hash
 * because some of it (RoPE, norm epsilon) changes the function without changing any
 * shape. */
#include "model/model_identity.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/sha256.h"

/* The sampled values of one parameter. A parameter on a device is read through the
 * backend in runs of at most FINGERPRINT_CHUNK floats, so the host holds one run at a
 * time and only the runs are moved that the samples need (every run, for a tensor with
 * more than MT_FINGERPRINT_SAMPLES values: a sample per stride). */
#define FINGERPRINT_CHUNK ((size_t)1 << 22)
static mt_status hash_param_samples(const mt_model *m, const mt_param *p, mt_sha256_ctx *ctx,
                                    float **buf, mt_error *err) {
    size_t stride = p->numel > MT_FINGERPRINT_SAMPLES ? p->numel / MT_FINGERPRINT_SAMPLES : 1;
    if (m->be->device == MT_DEVICE_CPU) {
        for (size_t j = 0; j < p->numel; j += stride) mt_sha256_update(ctx, &p->data[j], sizeof(float));
        return MT_OK;
    }
    if (!*buf && !(*buf = malloc(FINGERPRINT_CHUNK * sizeof(float))))
        return mt_error_set(err, MT_ERR_NOMEM, "model fingerprint: out of host memory");
    /* runs that start at a sample, each ending after the last sample it holds */
    size_t j = 0;
    while (j < p->numel) {
        size_t per_run = (FINGERPRINT_CHUNK - 1) / stride + 1;
        size_t last = j + (per_run - 1) * stride;
        if (last >= p->numel) last = j + (p->numel - 1 - j) / stride * stride;
        size_t len = last - j + 1;
        mt_status st = m->be->ops->download(m->be, *buf, p->data + j, len * sizeof(float));
        if (st) return mt_error_set(err, st, "model fingerprint: reading %s from the device failed", p->name);
        for (size_t k = 0; k < len; k += stride) mt_sha256_update(ctx, &(*buf)[k], sizeof(float));
        j = last + stride;
    }
    return MT_OK;
}

mt_status mt_model_fingerprint(const mt_model *m, char hex[65], mt_error *err) {
    mt_sha256_ctx ctx;
    mt_sha256_init(&ctx);
    const mt_model_config *c = &m->cfg;
    char line[512];
    int n = snprintf(line, sizeof line,
                     "moontune-model-fingerprint 1\n%s C=%d F=%d L=%d H=%d KVH=%d D=%d V=%d P=%d "
                     "eps=%.9g theta=%.17g rope=%d/%.17g/%.17g/%.17g/%d tie=%d bias=%d/%d/%d\n",
                     c->model_type, c->hidden_size, c->intermediate_size, c->num_layers, c->num_heads,
                     c->num_kv_heads, c->head_dim, c->vocab_size, c->max_position_embeddings,
                     (double)c->rms_norm_eps, c->rope_theta, (int)c->rope_type, c->rope_factor,
                     c->rope_low_freq_factor, c->rope_high_freq_factor,
                     c->rope_original_max_position_embeddings, c->tie_word_embeddings, c->qkv_bias,
                     c->o_bias, c->mlp_bias);
    mt_sha256_update(&ctx, line, (size_t)(n < (int)sizeof line ? n : (int)sizeof line - 1));
    float *buf = NULL;
    mt_status st = MT_OK;
    for (size_t i = 0; i < m->num_params && !st; i++) {
        const mt_param *p = &m->params[i];
        n = snprintf(line, sizeof line, "%s %d %lld %lld %zu\n", p->name, p->ndim,
                     (long long)p->shape[0], (long long)(p->ndim > 1 ? p->shape[1] : 0), p->numel);
        mt_sha256_update(&ctx, line, (size_t)(n < (int)sizeof line ? n : (int)sizeof line - 1));
        if (p->data && p->numel) st = hash_param_samples(m, p, &ctx, &buf, err);
    }
    free(buf);
    if (st) return st;
    uint8_t digest[MT_SHA256_BYTES];
    mt_sha256_final(&ctx, digest);
    mt_sha256_to_hex(digest, hex);
    return MT_OK;
}
