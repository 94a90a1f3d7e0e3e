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
#include <string.h>

#include "formats/sha256.h"

void mt_model_fingerprint(const mt_model *m, char hex[65]) {
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
    for (size_t i = 0; i < m->num_params; i++) {
        const mt_param *p = &m->params[i];
        n = snprintf(line, sizeof line, "%s %d %lld %lld %zu\n", p->name, p->ndim,
                     (long long)p->shape[0], (long long)(p->ndim > 1 ? p->shape[1] : 0), p->numel);
        mt_sha256_update(&ctx, line, (size_t)(n < (int)sizeof line ? n : (int)sizeof line - 1));
        if (!p->data || p->numel == 0) continue;
        size_t stride = p->numel > MT_FINGERPRINT_SAMPLES ? p->numel / MT_FINGERPRINT_SAMPLES : 1;
        for (size_t j = 0; j < p->numel; j += stride) mt_sha256_update(&ctx, &p->data[j], sizeof(float));
    }
    uint8_t digest[MT_SHA256_BYTES];
    mt_sha256_final(&ctx, digest);
    mt_sha256_to_hex(digest, hex);
}
