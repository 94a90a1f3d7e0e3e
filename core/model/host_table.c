/* host_table.c — the function table every plugin receives (moontune/plugin.h).
 *
 * Model handles are mt_model pointers and linear handles mt_linear pointers, cast
 * to the opaque types of the ABI. In ABI 1 all plugin-visible memory is CPU memory. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h"
#include "model/model.h"
#include "plugin/registry.h"

#define MODEL(h) ((mt_model *)(h))
#define LINEAR(h) ((mt_linear *)(h))

static void *host_alloc(size_t bytes) { return mt_alloc_aligned(bytes); }

static void host_free(void *p) { free(p); }

static void host_log(mt_log_level level, const char *plugin, const char *fmt, ...) {
    static const char *names[] = {"debug", "info", "warning", "error"};
    if (level == MT_LOG_DEBUG && !getenv("MOONTUNE_DEBUG")) return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "moontune [%s] %s: ", plugin ? plugin : "plugin",
            (unsigned)level < 4 ? names[level] : "log");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static mt_status host_error(mt_error *err, mt_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    mt_error_setv(err, status, fmt, ap);
    va_end(ap);
    return status;
}

static void host_matmul(float *c, const float *a, const float *b, int M, int N, int K, int trans_a,
                        int trans_b, float alpha, float beta) {
    mt_backend_cpu_matmul(c, a, b, M, N, K, trans_a, trans_b, alpha, beta);
}

/* The seed mixed, then mixed with the counter: a counter-based stream. */
static float host_random_uniform(uint64_t seed, uint64_t counter) {
    uint64_t x = mt_mix64(mt_mix64(seed) ^ counter);
    return (float)(x >> 40) * (1.0f / 16777216.0f); /* 24 bits: exactly representable, < 1 */
}

/* ---- the model, for losses ---- */

static mt_status host_model_forward(mt_model_handle *h, const mt_batch *b, int adapters_enabled,
                                    mt_error *err) {
    mt_model *m = MODEL(h);
    /* a pass without adapters restores whatever state the caller had set */
    int was_enabled = m->adapters_enabled;
    if (!adapters_enabled && was_enabled) mt_model_set_adapters_enabled(m, 0);
    mt_status st = mt_model_forward(m, b->tokens, b->positions, b->segments, b->B, b->T, err);
    if (!adapters_enabled && was_enabled) mt_model_set_adapters_enabled(m, 1);
    return st;
}

static int host_model_vocab_size(const mt_model_handle *h) {
    return ((const mt_model *)h)->cfg.vocab_size;
}

static int host_model_chunk_rows(const mt_model_handle *h) {
    return ((const mt_model *)h)->plan_chunk;
}

static mt_status host_model_logits(mt_model_handle *h, int row0, int nrows, float *logits,
                                   mt_error *err) {
    return mt_model_logits(MODEL(h), row0, nrows, logits, err);
}

static mt_status host_model_backward_logits(mt_model_handle *h, int row0, int nrows,
                                            const float *dlogits, mt_error *err) {
    return mt_model_backward_logits(MODEL(h), row0, nrows, dlogits, err);
}

static mt_status host_model_backward(mt_model_handle *h, mt_error *err) {
    return mt_model_backward(MODEL(h), err);
}

/* ---- the model, for adapters ---- */

enum { LINEARS_PER_LAYER = 7 };

static int host_model_linear_count(const mt_model_handle *h) {
    return ((const mt_model *)h)->cfg.num_layers * LINEARS_PER_LAYER + 1;
}

static mt_linear_handle *host_model_linear(mt_model_handle *h, int index) {
    mt_model *m = MODEL(h);
    int n = m->cfg.num_layers * LINEARS_PER_LAYER;
    if (index < 0 || index > n) return NULL;
    if (index == n) return (mt_linear_handle *)&m->lm_head;
    mt_layer *ly = &m->layers[index / LINEARS_PER_LAYER];
    mt_linear *lins[LINEARS_PER_LAYER] = {&ly->q, &ly->k, &ly->v, &ly->o,
                                          &ly->gate, &ly->up, &ly->down};
    return (mt_linear_handle *)lins[index % LINEARS_PER_LAYER];
}

static void host_linear_info(const mt_linear_handle *h, mt_linear_info *info) {
    const mt_linear *lin = (const mt_linear *)h;
    memset(info, 0, sizeof *info);
    info->name = lin->name;
    info->module = mt_module_name(lin->module);
    info->layer = lin->layer;
    info->in = lin->in;
    info->out = lin->out;
    info->weight = (mt_tensor){.dtype = MT_F32, .device = lin->be->device, .ndim = 2,
                               .shape = {lin->out, lin->in}, .data = lin->weight};
    info->bias = (mt_tensor){.dtype = MT_F32, .device = lin->be->device, .ndim = 1,
                             .shape = {lin->out}, .data = lin->bias};
}

static mt_status host_linear_wrap(mt_linear_handle *h, const mt_linear_impl *impl, void *self,
                                  mt_error *err) {
    mt_linear *lin = LINEAR(h);
    if (impl && (!impl->forward || !impl->backward))
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: an adapter wrapper needs forward and backward",
                            lin->name);
    lin->impl = impl;
    lin->impl_self = impl ? self : NULL;
    return MT_OK;
}

static void host_linear_base_forward(mt_linear_handle *h, float *y, const float *x, int N) {
    mt_linear_base_forward(LINEAR(h), y, x, N);
}

static void host_linear_base_backward(mt_linear_handle *h, float *dx, const float *dy,
                                      const float *x, int N) {
    mt_linear_base_backward(LINEAR(h), dx, dy, x, N);
}

static mt_status host_linear_set_trainable(mt_linear_handle *h, int trainable, mt_error *err) {
    mt_linear *lin = LINEAR(h);
    if (!lin->weight)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: the base weight was released (quantized) and cannot train",
                            lin->name);
    mt_param *w = mt_model_param_of(lin->model, lin->weight_memory),
             *b = mt_model_param_of(lin->model, lin->bias);
    mt_status st = w ? mt_model_set_trainable(lin->model, w, trainable, err) : MT_OK;
    if (!st && b) st = mt_model_set_trainable(lin->model, b, trainable, err);
    return st;
}

static void host_linear_release_weight(mt_linear_handle *h) { mt_linear_release_weight(LINEAR(h)); }

static float *host_linear_restore_weight(mt_linear_handle *h, mt_error *err) {
    (void)err;
    return mt_linear_restore_weight(LINEAR(h));
}

static mt_status host_model_set_param_trainable(mt_model_handle *h, const char *name,
                                                int trainable, mt_error *err) {
    mt_model *m = MODEL(h);
    mt_param *p = mt_model_find_param(m, name);
    if (!p) return mt_error_set(err, MT_ERR_INVALID_ARG, "the model has no parameter named %s", name);
    return mt_model_set_trainable(m, p, trainable, err);
}

static int host_model_param_count(const mt_model_handle *h) {
    return (int)((const mt_model *)h)->num_params;
}

static const char *host_model_param_name(const mt_model_handle *h, int index) {
    const mt_model *m = (const mt_model *)h;
    return index >= 0 && (size_t)index < m->num_params ? m->params[index].name : NULL;
}

static mt_status host_model_add_param(mt_model_handle *h, const mt_param_view *param,
                                      mt_error *err) {
    return mt_model_add_param(MODEL(h), param, err);
}

static const mt_host host_table = {
    .abi_version = MT_PLUGIN_ABI_VERSION,
    .size = sizeof(mt_host),
    .alloc = host_alloc,
    .free = host_free,
    .log = host_log,
    .error = host_error,
    .opt_bool = mt_options_bool,
    .opt_int = mt_options_int,
    .opt_float = mt_options_float,
    .opt_string = mt_options_string,
    .opt_list_len = mt_options_list_len,
    .opt_list_item = mt_options_list_item,
    .matmul = host_matmul,
    .random_uniform = host_random_uniform,
    .model_forward = host_model_forward,
    .model_vocab_size = host_model_vocab_size,
    .model_chunk_rows = host_model_chunk_rows,
    .model_logits = host_model_logits,
    .model_backward_logits = host_model_backward_logits,
    .model_backward = host_model_backward,
    .model_linear_count = host_model_linear_count,
    .model_linear = host_model_linear,
    .linear_info = host_linear_info,
    .linear_wrap = host_linear_wrap,
    .linear_base_forward = host_linear_base_forward,
    .linear_base_backward = host_linear_base_backward,
    .linear_set_trainable = host_linear_set_trainable,
    .linear_release_weight = host_linear_release_weight,
    .linear_restore_weight = host_linear_restore_weight,
    .model_set_param_trainable = host_model_set_param_trainable,
    .model_param_count = host_model_param_count,
    .model_param_name = host_model_param_name,
    .model_add_param = host_model_add_param,
};

const mt_host *mt_host_table(void) { return &host_table; }
