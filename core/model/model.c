/* model.c — the Llama-family decoder: parameters, planning, forward, backward.
 *
 * One layer, in the notation of model.h (BT = B*T rows):
 *   ln1 = rmsnorm(res_in);  q,k,v = rope(q_proj(ln1)), rope(k_proj(ln1)), v_proj(ln1)
 *   att = attention(q,k,v); res_mid = res_in + o_proj(att)
 *   ln2 = rmsnorm(res_mid); act = silu(gate_proj(ln2)) * up_proj(ln2)
 *   res_out = res_mid + down_proj(act)
 * and after the last layer: lnf = rmsnorm(res_out); logits = lm_head(lnf). */
/* madvise(MADV_DONTNEED) releases the pages of a weight QLoRA no longer needs */
#define _DEFAULT_SOURCE
#include "model/model.h"
#include "model/device.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sys/mman.h>
#include <unistd.h>

#include "base/internal.h"
#include "plugin/registry.h"
#include "moontune/plugin.h"
#include "formats/safetensors.h"

#define IGNORE_INDEX (-100)

static const char *const module_names[MT_MOD_COUNT] = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"};

const char *mt_module_name(mt_module module) {
    return (unsigned)module < MT_MOD_COUNT ? module_names[module] : "?";
}

/* ---- the frozen/full linear layer -------------------------------------- */

void mt_model_share_input(mt_model *m, const float *x, int N) {
    if (m->shared_int8) m->be->ops->int8_rows_free(m->be, m->shared_int8);
    m->shared_int8 = NULL;
    m->shared_input = x;
    m->shared_rows = N;
}

/* y = x · Wᵀ through the int8 copy, with x's rows quantised once for the projections
 * that share it (mt_model_share_input); nonzero when it could not run. */
static int base_forward_int8(mt_linear *lin, float *y, const float *x, int N) {
    mt_backend *be = lin->be;
    mt_model *m = lin->model;
    if (m && m->shared_input == x && m->shared_rows == N && be->ops->matmul_int8_rows) {
        if (!m->shared_int8) m->shared_int8 = be->ops->int8_rows_create(be, x, N, lin->in);
        if (m->shared_int8 && !be->ops->matmul_int8_rows(be, y, m->shared_int8, lin->weight_int8, 0))
            return 0;
    }
    return be->ops->matmul_int8(be, y, x, lin->weight_int8, N, 0, 0);
}

void mt_linear_base_forward(mt_linear *lin, float *y, const float *x, int N) {
    mt_backend *be = lin->be;
    if (!lin->weight_int8 || base_forward_int8(lin, y, x, N))
        be->ops->matmul(be, y, x, lin->weight, N, lin->out, lin->in, 0, 1, 1.0f, 0.0f);
    if (lin->bias) be->ops->bias_forward(be, y, lin->bias, N, lin->out);
}

void mt_linear_base_backward(mt_linear *lin, float *dx, const float *dy, const float *x, int N) {
    mt_backend *be = lin->be;
    /* dx (N,in) += dy (N,out) · W (out,in) */
    /* the gradient's rows rounded stochastically: to nearest, its values below half a
     * step of their group's largest would all be lost, in every row alike */
    if (!lin->weight_int8_t ||
        be->ops->matmul_int8(be, dx, dy, lin->weight_int8_t, N, 1, ++lin->model->int8_round_seed))
        be->ops->matmul(be, dx, dy, lin->weight, N, lin->in, lin->out, 0, 0, 1.0f, 1.0f);
    /* dW (out,in) += dy^T (out,N) · x (N,in) */
    if (lin->grad_weight)
        be->ops->matmul(be, lin->grad_weight, dy, x, lin->out, lin->in, N, 1, 0, 1.0f, 1.0f);
    if (lin->grad_bias) be->ops->bias_backward(be, lin->grad_bias, dy, N, lin->out);
}

/* An (N, cols) activation of this projection as the tensor an adapter receives. */
static mt_tensor activation(const mt_linear *lin, const float *data, int N, int cols) {
    return (mt_tensor){.dtype = MT_F32, .device = lin->be->device, .ndim = 2,
                       .shape = {N, cols}, .data = (void *)data};
}

void mt_linear_forward(mt_linear *lin, float *y, const float *x, int N) {
    if (!lin->impl) {
        mt_linear_base_forward(lin, y, x, N);
        return;
    }
    mt_tensor ty = activation(lin, y, N, lin->out), tx = activation(lin, x, N, lin->in);
    lin->impl->forward(lin->impl_self, &ty, &tx);
}

void mt_linear_backward(mt_linear *lin, float *dx, const float *dy, const float *x, int N) {
    if (!lin->impl) {
        mt_linear_base_backward(lin, dx, dy, x, N);
        return;
    }
    mt_tensor tdx = activation(lin, dx, N, lin->in), tdy = activation(lin, dy, N, lin->out),
              tx = activation(lin, x, N, lin->in);
    lin->impl->backward(lin->impl_self, &tdx, &tdy, &tx);
}

/* Projections of one input, at most the three of q, k, v, in one call of their impl:
 * the impl when one with `member` wraps every one of them, else NULL. */
enum { SHARED_MAX = 3 };
static const mt_linear_impl *shared_impl(mt_linear *const *lins, int n, size_t member) {
    const mt_linear_impl *impl = lins[0]->impl;
    if (n < 2 || n > SHARED_MAX || !impl || impl->size < member + sizeof(void (*)(void)))
        return NULL;
    for (int i = 1; i < n; i++)
        if (lins[i]->impl != impl) return NULL;
    return impl;
}

void mt_linears_forward_shared(mt_model *m, mt_linear *const *lins, float *const *ys, int n,
                               const float *x, int N) {
    mt_model_share_input(m, x, N);
    const mt_linear_impl *impl =
        shared_impl(lins, n, offsetof(mt_linear_impl, forward_shared));
    if (impl && impl->forward_shared) {
        void *selves[SHARED_MAX];
        mt_tensor y[SHARED_MAX], *yp[SHARED_MAX];
        for (int i = 0; i < n; i++) {
            selves[i] = lins[i]->impl_self;
            y[i] = activation(lins[i], ys[i], N, lins[i]->out);
            yp[i] = &y[i];
        }
        mt_tensor tx = activation(lins[0], x, N, lins[0]->in);
        impl->forward_shared(selves, n, yp, &tx);
    } else {
        for (int i = 0; i < n; i++) mt_linear_forward(lins[i], ys[i], x, N);
    }
    mt_model_share_input(m, NULL, 0);
}

void mt_linears_backward_shared(mt_linear *const *lins, float *dx, float *const *dys, int n,
                                const float *x, int N) {
    const mt_linear_impl *impl =
        shared_impl(lins, n, offsetof(mt_linear_impl, backward_shared));
    if (!impl || !impl->backward_shared) {
        for (int i = 0; i < n; i++) mt_linear_backward(lins[i], dx, dys[i], x, N);
        return;
    }
    void *selves[SHARED_MAX];
    mt_tensor dy[SHARED_MAX];
    const mt_tensor *dyp[SHARED_MAX];
    for (int i = 0; i < n; i++) {
        selves[i] = lins[i]->impl_self;
        dy[i] = activation(lins[i], dys[i], N, lins[i]->out);
        dyp[i] = &dy[i];
    }
    mt_tensor tdx = activation(lins[0], dx, N, lins[0]->in), tx = activation(lins[0], x, N, lins[0]->in);
    impl->backward_shared(selves, n, &tdx, dyp, &tx);
}

/* Pages of a released weight go back to the system; the whole pages inside the
 * weight only, since its neighbours share the boundary pages. */
void mt_linear_release_weight(mt_linear *lin) {
    if (!lin->weight) return;
    if (lin->model) mt_model_int8_drop(lin->model);
    if (lin->be->device == MT_DEVICE_CPU) {
        uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
        uintptr_t begin = ((uintptr_t)lin->weight + page - 1) & ~(page - 1);
        uintptr_t end = ((uintptr_t)(lin->weight + (size_t)lin->out * lin->in)) & ~(page - 1);
        if (end > begin) madvise((void *)begin, end - begin, MADV_DONTNEED);
    }
    lin->weight = NULL;
}

float *mt_linear_restore_weight(mt_linear *lin) {
    if (!lin->weight) {
        if (lin->model) mt_model_int8_drop(lin->model);
        lin->weight = lin->weight_memory;
        lin->be->ops->zero(lin->be, lin->weight, (size_t)lin->out * lin->in * sizeof(float));
    }
    return lin->weight;
}

enum { LINEARS_PER_LAYER = 7 };

int mt_model_linear_count(const mt_model *m) {
    return m->cfg.num_layers * LINEARS_PER_LAYER + 1;
}

mt_linear *mt_model_linear(mt_model *m, int index) {
    const int n = m->cfg.num_layers * LINEARS_PER_LAYER;
    if (index < 0 || index > n) return NULL;
    if (index == n) return &m->lm_head;
    mt_layer *ly = &m->layers[index / LINEARS_PER_LAYER];
    mt_linear *lins[LINEARS_PER_LAYER] = {&ly->q, &ly->k, &ly->v, &ly->o,
                                          &ly->gate, &ly->up, &ly->down};
    return lins[index % LINEARS_PER_LAYER];
}

/* ---- int8 products for the frozen base in training ---------------------- */

void mt_model_int8_detach(mt_model *m) {
    for (int i = 0; i < mt_model_linear_count(m); i++) {
        mt_linear *lin = mt_model_linear(m, i);
        lin->weight_int8 = lin->weight_int8_t = NULL;
    }
}

void mt_model_int8_drop(mt_model *m) {
    if (!m->int8_copies) return;
    mt_model_int8_detach(m);
    for (int i = 0; i < 2 * mt_model_linear_count(m); i++)
        if (m->int8_copies[i]) m->be->ops->weight_int8_free(m->be, m->int8_copies[i]);
    free(m->int8_copies);
    m->int8_copies = NULL;
}

void mt_model_set_int8_training(mt_model *m, mt_int8_training mode) {
    if (mode != m->int8_training) mt_model_int8_drop(m); /* the copies differ by mode */
    m->int8_training = mode;
}

/* Copies of W (forward) and, with MT_INT8_ALL, Wᵀ (input gradient) of each frozen
 * projection whose weight is present (QLoRA's released weights are the adapter's to
 * multiply); a projection gets all it needs or none. */
static void make_int8_copies(mt_model *m) {
    mt_backend *be = m->be;
    const int n = mt_model_linear_count(m);
    if (!(m->int8_copies = calloc((size_t)2 * n, sizeof *m->int8_copies))) return;
    for (int i = 0; i < n; i++) {
        const mt_linear *lin = mt_model_linear(m, i);
        if (!lin->weight || lin->grad_weight) continue;
        const int transposed = m->int8_training == MT_INT8_ALL;
        void *w = be->ops->weight_int8_create(be, lin->weight, lin->out, lin->in, 0, MT_INT8_USE_TRAINING);
        void *wt = w && transposed ? be->ops->weight_int8_create(be, lin->weight, lin->in, lin->out, 1,
                                                                 MT_INT8_USE_TRAINING)
                                   : NULL;
        if (w && transposed && !wt) {
            be->ops->weight_int8_free(be, w);
            w = NULL;
        }
        if (w) {
            m->int8_copies[2 * i] = w;
            m->int8_copies[2 * i + 1] = wt;
        }
    }
}

int mt_model_int8_attach(mt_model *m) {
    mt_backend *be = m->be;
    if (m->int8_training == MT_INT8_OFF || !be->ops->weight_int8_create || !be->ops->matmul_int8)
        return 0;
    if (!m->int8_copies) make_int8_copies(m);
    if (!m->int8_copies) return 0; /* out of memory: the fp32 products */
    int attached = 0;
    for (int i = 0; i < mt_model_linear_count(m); i++) {
        mt_linear *lin = mt_model_linear(m, i);
        lin->weight_int8 = m->int8_copies[2 * i];
        lin->weight_int8_t = m->int8_copies[2 * i + 1];
        attached += lin->weight_int8 != NULL;
    }
    return attached;
}

/* ---- parameter layout --------------------------------------------------- */

/* Walks the parameters in transformers' named_parameters() order. Without fill it
 * only counts; with fill it names and shapes m->params, and with base too it hands out
 * the pointers. (Loaders fill without base first: the weights on disk are checked
 * against the names and shapes before any parameter memory exists.) */
typedef struct layout {
    mt_model *m;
    int fill;
    float *base;
    size_t offset; /* in floats; each parameter starts 64-byte aligned */
    size_t index;
} layout;

static float *lay(layout *L, int no_decay, int ndim, int64_t d0, int64_t d1, const char *fmt,
                  ...) MT_PRINTF(6, 7);

static float *lay(layout *L, int no_decay, int ndim, int64_t d0, int64_t d1, const char *fmt,
                  ...) {
    size_t numel = (size_t)d0 * (size_t)(ndim == 2 ? d1 : 1);
    float *data = NULL;
    if (L->fill) {
        mt_param *p = &L->m->params[L->index];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(p->name, sizeof p->name, fmt, ap);
        va_end(ap);
        p->ndim = ndim;
        p->shape[0] = d0;
        p->shape[1] = ndim == 2 ? d1 : 0;
        p->numel = numel;
        p->data = data = L->base ? L->base + L->offset : NULL;
        p->no_decay = no_decay;
    }
    L->index++;
    L->offset += (numel + 15) & ~(size_t)15;
    return data;
}

static void lay_linear(layout *L, mt_linear *lin, mt_module module, int layer, int in, int out,
                       int has_bias, const char *prefix) {
    lin->weight = lay(L, 0, 2, out, in, "%s.%s.weight", prefix, module_names[module]);
    lin->bias = has_bias ? lay(L, 1, 1, out, 0, "%s.%s.bias", prefix, module_names[module]) : NULL;
    if (L->fill) {
        snprintf(lin->name, sizeof lin->name, "%s.%s", prefix, module_names[module]);
        lin->module = module;
        lin->layer = layer;
        lin->in = in;
        lin->out = out;
        lin->be = L->m->be;
        lin->model = L->m;
        lin->weight_memory = lin->weight;
    }
}

static void lay_model(layout *L) {
    mt_model *m = L->m;
    const mt_model_config *c = &m->cfg;
    const int C = c->hidden_size, F = c->intermediate_size;
    const int QD = c->num_heads * c->head_dim, KVD = c->num_kv_heads * c->head_dim;
    m->embed = lay(L, 0, 2, c->vocab_size, C, "model.embed_tokens.weight");
    char prefix[48];
    for (int l = 0; l < c->num_layers; l++) {
        mt_layer *ly = &m->layers[l];
        snprintf(prefix, sizeof prefix, "model.layers.%d.self_attn", l);
        lay_linear(L, &ly->q, MT_MOD_Q, l, C, QD, c->qkv_bias, prefix);
        lay_linear(L, &ly->k, MT_MOD_K, l, C, KVD, c->qkv_bias, prefix);
        lay_linear(L, &ly->v, MT_MOD_V, l, C, KVD, c->qkv_bias, prefix);
        lay_linear(L, &ly->o, MT_MOD_O, l, QD, C, c->o_bias, prefix);
        snprintf(prefix, sizeof prefix, "model.layers.%d.mlp", l);
        lay_linear(L, &ly->gate, MT_MOD_GATE, l, C, F, c->mlp_bias, prefix);
        lay_linear(L, &ly->up, MT_MOD_UP, l, C, F, c->mlp_bias, prefix);
        lay_linear(L, &ly->down, MT_MOD_DOWN, l, F, C, c->mlp_bias, prefix);
        ly->attn_norm = lay(L, 1, 1, C, 0, "model.layers.%d.input_layernorm.weight", l);
        ly->mlp_norm = lay(L, 1, 1, C, 0, "model.layers.%d.post_attention_layernorm.weight", l);
    }
    m->final_norm = lay(L, 1, 1, C, 0, "model.norm.weight");
    if (c->tie_word_embeddings) {
        if (L->fill) {
            mt_linear *h = &m->lm_head;
            snprintf(h->name, sizeof h->name, "lm_head");
            h->module = MT_MOD_LM_HEAD;
            h->layer = -1;
            h->in = C;
            h->out = c->vocab_size;
            h->weight = h->weight_memory = m->embed;
            h->be = m->be;
            h->model = m;
        }
    } else {
        lay_linear(L, &m->lm_head, MT_MOD_LM_HEAD, -1, C, c->vocab_size, 0, "");
        if (L->fill) {
            /* lay_linear's prefix form would give ".lm_head": name it as transformers does */
            snprintf(m->lm_head.name, sizeof m->lm_head.name, "lm_head");
            snprintf(m->params[L->index - 1].name, sizeof m->params[0].name, "lm_head.weight");
        }
    }
}

mt_status mt_model_create_table(const mt_model_config *cfg, mt_backend *be, mt_model **out,
                                mt_error *err) {
    *out = NULL;
    mt_status st = mt_config_validate(cfg, "model config", err);
    if (st) return st;
    mt_model *m = mt_calloc(1, sizeof *m, "model", err);
    if (!m) return MT_ERR_NOMEM;
    m->cfg = *cfg;
    m->be = be;
    mt_device_bind(be); /* plugins reach this backend through their tensors' device */
    m->adapters_enabled = 1;
    /* the same gradients for a third less activation memory, at no product's cost */
    m->recompute = MT_RECOMPUTE_NORMS;
    m->layers = mt_calloc((size_t)cfg->num_layers, sizeof *m->layers, "model layers", err);
    if (!m->layers) goto fail;
    layout count = {.m = m};
    lay_model(&count);
    m->num_params = count.index;
    m->total_numel = count.offset;
    m->params = mt_calloc(m->num_params, sizeof *m->params, "parameter table", err);
    if (!m->params) goto fail;
    layout names = {.m = m, .fill = 1};
    lay_model(&names);
    *out = m;
    return MT_OK;
fail:
    mt_model_free(m);
    return MT_ERR_NOMEM;
}

mt_status mt_model_alloc_params(mt_model *m, mt_error *err) {
    if (m->param_memory) return MT_OK;
    size_t bytes;
    if (!mt_mul_size(m->total_numel, sizeof(float), &bytes) ||
        !(m->param_memory = m->be->ops->alloc(m->be, bytes)))
        return mt_error_set(err, MT_ERR_NOMEM, "out of %s memory allocating %zu parameters",
                            m->be->name, m->total_numel);
    layout fill = {.m = m, .fill = 1, .base = m->param_memory};
    lay_model(&fill);
    return MT_OK;
}

mt_status mt_model_create(const mt_model_config *cfg, mt_backend *be, mt_model **out,
                          mt_error *err) {
    mt_model *m = NULL;
    mt_status st = mt_model_create_table(cfg, be, &m, err);
    if (!st) st = mt_model_alloc_params(m, err);
    if (st) {
        mt_model_free(m);
        return st;
    }
    *out = m;
    return MT_OK;
}

static void free_plan(mt_model *m) {
    if (m->act_memory) m->be->ops->free(m->be, m->act_memory);
    m->act_memory = NULL;
    free(m->acts);
    m->acts = NULL;
    free(m->host_losses);
    m->host_losses = NULL;
    free(m->host_rows);
    free(m->host_row_targets);
    m->host_rows = m->host_row_targets = NULL;
    free(m->host_positions);
    m->host_positions = NULL;
    m->plan_B = m->plan_T = 0;
    m->forward_done = 0;
}

void mt_model_free(mt_model *m) {
    if (!m) return;
    mt_model_share_input(m, NULL, 0);
    mt_model_int8_drop(m);
    free_plan(m);
    if (m->param_memory) m->be->ops->free(m->be, m->param_memory);
    for (size_t i = 0; m->params && i < m->num_params; i++)
        if (m->params[i].grad) m->be->ops->free(m->be, m->params[i].grad);
    for (size_t i = 0; i < m->num_extra; i++) free((char *)m->extra_params[i].name);
    free(m->extra_params);
    free(m->adapters);
    free(m->params);
    free(m->layers);
    free(m);
}

mt_param *mt_model_find_param(mt_model *m, const char *name) {
    for (size_t i = 0; i < m->num_params; i++)
        if (!strcmp(m->params[i].name, name)) return &m->params[i];
    return NULL;
}

/* The gradient that belongs to a parameter's data, or NULL when it is frozen. */
mt_param *mt_model_param_of(mt_model *m, const float *data) {
    for (size_t i = 0; data && i < m->num_params; i++)
        if (m->params[i].data == data) return &m->params[i];
    return NULL;
}

static float *grad_of(mt_model *m, const float *data) {
    mt_param *p = mt_model_param_of(m, data);
    return p ? p->grad : NULL;
}

/* Points every layer's gradient slots at the gradients of trainable parameters. */
static void wire_grads(mt_model *m) {
    mt_model_int8_drop(m); /* a frozen weight's copies must not outlive its freezing */
    for (int l = 0; l < m->cfg.num_layers; l++) {
        mt_layer *ly = &m->layers[l];
        mt_linear *lins[] = {&ly->q, &ly->k, &ly->v, &ly->o, &ly->gate, &ly->up, &ly->down};
        for (size_t i = 0; i < sizeof lins / sizeof lins[0]; i++) {
            lins[i]->grad_weight = grad_of(m, lins[i]->weight_memory);
            lins[i]->grad_bias = grad_of(m, lins[i]->bias);
        }
        ly->attn_norm_grad = grad_of(m, ly->attn_norm);
        ly->mlp_norm_grad = grad_of(m, ly->mlp_norm);
    }
    m->embed_grad = grad_of(m, m->embed);
    m->final_norm_grad = grad_of(m, m->final_norm);
    m->lm_head.grad_weight = grad_of(m, m->lm_head.weight_memory);
    m->lm_head.grad_bias = grad_of(m, m->lm_head.bias);
}

/* Allocates or frees one parameter's gradient; the caller rewires the layers. */
static mt_status set_trainable_unwired(mt_model *m, mt_param *p, int trainable, mt_error *err) {
    if (trainable && !p->grad) {
        p->grad = m->be->ops->alloc(m->be, p->numel * sizeof(float));
        if (!p->grad)
            return mt_error_set(err, MT_ERR_NOMEM, "out of %s memory for the gradient of %s",
                                m->be->name, p->name);
    } else if (!trainable && p->grad) {
        m->be->ops->free(m->be, p->grad);
        p->grad = NULL;
    }
    p->trainable = trainable;
    return MT_OK;
}

mt_status mt_model_set_trainable(mt_model *m, mt_param *p, int trainable, mt_error *err) {
    mt_status st = set_trainable_unwired(m, p, trainable, err);
    wire_grads(m);
    return st;
}

mt_status mt_model_set_all_trainable(mt_model *m, mt_error *err) {
    mt_status st = MT_OK;
    for (size_t i = 0; i < m->num_params && !st; i++)
        st = set_trainable_unwired(m, &m->params[i], 1, err);
    wire_grads(m);
    return st;
}

void mt_model_zero_grad(mt_model *m) {
    for (size_t i = 0; i < m->num_params; i++)
        if (m->params[i].grad)
            m->be->ops->zero(m->be, m->params[i].grad, m->params[i].numel * sizeof(float));
    for (size_t i = 0; i < m->num_extra; i++)
        m->be->ops->zero(m->be, m->extra_params[i].grad.data,
                         (size_t)mt_tensor_numel(&m->extra_params[i].grad) * sizeof(float));
}

mt_status mt_model_add_param(mt_model *m, const mt_param_view *param, mt_error *err) {
    if (param->size < offsetof(mt_param_view, no_decay) + sizeof param->no_decay)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "adapter parameter: the view's size (%u bytes) is smaller than an "
                            "ABI 2 mt_param_view (set .size = sizeof(mt_param_view))",
                            (unsigned)param->size);
    if (param->value.device != m->be->device || param->grad.device != m->be->device)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "adapter parameter %s: value and gradient must live on the model's "
                            "device (%s)",
                            param->name ? param->name : "(unnamed)", m->be->name);
    if (!param->name || !param->value.data || !param->grad.data ||
        param->value.dtype != MT_F32 || param->grad.dtype != MT_F32 ||
        mt_tensor_numel(&param->value) != mt_tensor_numel(&param->grad))
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "adapter parameter %s: needs a name and F32 value and gradient of "
                            "equal size",
                            param->name ? param->name : "(unnamed)");
    for (size_t i = 0; i < m->num_extra; i++)
        if (!strcmp(m->extra_params[i].name, param->name))
            return mt_error_set(err, MT_ERR_INVALID_ARG, "adapter parameter %s registered twice",
                                param->name);
    if (mt_model_find_param(m, param->name))
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "adapter parameter %s has the name of a base parameter", param->name);
    if (m->num_extra == m->cap_extra) {
        size_t cap = m->cap_extra ? 2 * m->cap_extra : 64;
        mt_param_view *grown = realloc(m->extra_params, cap * sizeof *grown);
        if (!grown) return mt_error_set(err, MT_ERR_NOMEM, "out of memory registering %s", param->name);
        m->extra_params = grown;
        m->cap_extra = cap;
    }
    mt_param_view *v = &m->extra_params[m->num_extra];
    /* an older plugin's view may be shorter: take what it filled, the rest stays zero */
    memset(v, 0, sizeof *v);
    memcpy(v, param, param->size < sizeof *v ? param->size : sizeof *v);
    v->size = sizeof *v;
    if (!(v->name = mt_strdup(param->name, "parameter name", err))) return MT_ERR_NOMEM;
    m->num_extra++;
    return MT_OK;
}

static mt_tensor f32_tensor(float *data, int ndim, const int64_t *shape) {
    mt_tensor t = {.dtype = MT_F32, .device = MT_DEVICE_CPU, .ndim = ndim, .data = data};
    for (int d = 0; d < ndim; d++) t.shape[d] = shape[d];
    return t;
}

mt_status mt_model_trainable_params(mt_model *m, mt_param_view **out, size_t *count,
                                    mt_error *err) {
    size_t n = m->num_extra;
    for (size_t i = 0; i < m->num_params; i++) n += m->params[i].trainable;
    mt_param_view *views = mt_calloc(n ? n : 1, sizeof *views, "parameter list", err);
    if (!views) return MT_ERR_NOMEM;
    size_t k = 0;
    for (size_t i = 0; i < m->num_params; i++) {
        mt_param *p = &m->params[i];
        if (!p->trainable) continue;
        views[k].size = sizeof views[k];
        views[k].name = p->name;
        views[k].value = f32_tensor(p->data, p->ndim, p->shape);
        views[k].grad = f32_tensor(p->grad, p->ndim, p->shape);
        views[k].no_decay = p->no_decay;
        views[k].value.device = views[k].grad.device = m->be->device;
        k++;
    }
    for (size_t i = 0; i < m->num_extra; i++) views[k++] = m->extra_params[i];
    *out = views;
    *count = n;
    return MT_OK;
}

double mt_model_clip_grad_norm(mt_model *m, double max_norm) {
    mt_backend *be = m->be;
    double sumsq = 0.0;
    for (size_t i = 0; i < m->num_params; i++)
        if (m->params[i].grad) sumsq += be->ops->sum_squares(be, m->params[i].grad, m->params[i].numel);
    for (size_t i = 0; i < m->num_extra; i++)
        sumsq += be->ops->sum_squares(be, m->extra_params[i].grad.data,
                                      (size_t)mt_tensor_numel(&m->extra_params[i].grad));
    double norm = sqrt(sumsq);
    if (max_norm > 0.0 && norm > max_norm && isfinite(norm)) {
        /* torch: clip_coef = max_norm / (total_norm + 1e-6), applied when < 1 */
        float scale = (float)(max_norm / (norm + 1e-6));
        for (size_t i = 0; i < m->num_params; i++)
            if (m->params[i].grad)
                be->ops->axpy(be, m->params[i].grad, m->params[i].grad, scale - 1.0f, m->params[i].numel);
        for (size_t i = 0; i < m->num_extra; i++) {
            float *g = m->extra_params[i].grad.data;
            be->ops->axpy(be, g, g, scale - 1.0f, (size_t)mt_tensor_numel(&m->extra_params[i].grad));
        }
    }
    return norm;
}

/* How many projections an adapter's computation replaces. */
static int wrapped_count(mt_model *m) {
    int n = 0;
    for (int i = 0; i < mt_model_linear_count(m); i++) n += mt_model_linear(m, i)->impl != NULL;
    return n;
}

/* Checkpointing runs a wrapping adapter's forwards twice per pass: it must replay. */
static mt_status check_replay(const struct mt_attached_adapter *a, mt_error *err) {
    if (!a->wraps || MT_VTABLE_HAS(mt_adapter_vtable, a->vtable, set_replay)) return MT_OK;
    return mt_error_set(err, MT_ERR_UNSUPPORTED,
                        "recompute \"layers\" (gradient checkpointing) runs each layer's "
                        "forward again in backward, and an attached adapter wraps projections "
                        "without set_replay (mt_adapter_vtable), so its second forward could "
                        "differ from the first (dropout); use recompute \"norms\" or \"off\", "
                        "or rebuild the plugin with set_replay");
}

mt_status mt_model_attach_adapter(mt_model *m, const mt_adapter_vtable *vtable, void *state,
                                  mt_error *err) {
    struct mt_attached_adapter *grown =
        realloc(m->adapters, (m->num_adapters + 1) * sizeof *grown);
    if (!grown) return mt_error_set(err, MT_ERR_NOMEM, "out of memory attaching an adapter");
    m->adapters = grown;
    const int wrapped_before = wrapped_count(m);
    mt_status st = vtable->attach(state, (mt_model_handle *)m, err);
    if (!st) st = mt_host_check("adapter attach", err);
    if (st) return st;
    m->adapters[m->num_adapters++] =
        (struct mt_attached_adapter){vtable, state, wrapped_count(m) != wrapped_before};
    return MT_OK;
}

/* Checked where the mode is set and again at every forward, since adapters may be
 * attached after it. */
static mt_status check_recompute(const mt_model *m, mt_recompute mode, mt_error *err) {
    if (mode == MT_RECOMPUTE_LAYERS)
        for (size_t i = 0; i < m->num_adapters; i++) {
            mt_status st = check_replay(&m->adapters[i], err);
            if (st) return st;
        }
    return MT_OK;
}

mt_status mt_model_set_recompute(mt_model *m, mt_recompute mode, mt_error *err) {
    mt_status st = check_recompute(m, mode, err);
    if (st) return st;
    if (mode == m->recompute) return MT_OK;
    const int B = m->plan_B, T = m->plan_T, chunk = m->plan_chunk;
    m->recompute = mode;
    return B > 0 ? mt_model_plan(m, B, T, chunk, err) : MT_OK;
}

int mt_recompute_parse(const char *name, mt_recompute *mode) {
    static const char *const names[] = {"off", "norms", "layers"};
    for (int i = 0; i < 3; i++)
        if (!strcmp(name, names[i])) {
            *mode = (mt_recompute)i;
            return 1;
        }
    return 0;
}

static void set_replay(mt_model *m, int replaying) {
    for (size_t i = 0; i < m->num_adapters; i++)
        if (m->adapters[i].wraps)
            m->adapters[i].vtable->set_replay(m->adapters[i].state, replaying);
}

void mt_model_set_training(mt_model *m, int training) {
    for (size_t i = 0; i < m->num_adapters; i++)
        if (MT_VTABLE_HAS(mt_adapter_vtable, m->adapters[i].vtable, set_training))
            m->adapters[i].vtable->set_training(m->adapters[i].state, training);
}

void mt_model_set_adapters_enabled(mt_model *m, int enabled) {
    m->adapters_enabled = enabled != 0;
    for (size_t i = 0; i < m->num_adapters; i++)
        if (MT_VTABLE_HAS(mt_adapter_vtable, m->adapters[i].vtable, set_enabled))
            m->adapters[i].vtable->set_enabled(m->adapters[i].state, enabled);
}

/* ---- weights ------------------------------------------------------------ */

static uint64_t rng_next(uint64_t *s) {
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

static float rng_normal(uint64_t *s) {
    double u1 = ((double)(rng_next(s) >> 11) + 0.5) / 9007199254740992.0;
    double u2 = (double)(rng_next(s) >> 11) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(2.0 * 3.14159265358979323846 * u2));
}

static mt_status put_param(mt_model *m, mt_param *p, const float *host, mt_error *err) {
    if (m->be->device == MT_DEVICE_CPU) {
        if (host != p->data) memcpy(p->data, host, p->numel * sizeof(float));
        return MT_OK;
    }
    mt_status st = m->be->ops->upload(m->be, p->data, host, p->numel * sizeof(float));
    if (st) return mt_error_set(err, st, "uploading parameter %s failed", p->name);
    return MT_OK;
}

mt_status mt_model_init_random(mt_model *m, uint64_t seed, float std, mt_error *err) {
    uint64_t s = seed ? seed : 1;
    size_t max_numel = 0;
    for (size_t i = 0; i < m->num_params; i++)
        if (m->params[i].numel > max_numel) max_numel = m->params[i].numel;
    float *host = mt_malloc(max_numel * sizeof(float), "random weights", err);
    if (!host) return MT_ERR_NOMEM;
    mt_status st = MT_OK;
    for (size_t i = 0; i < m->num_params && !st; i++) {
        mt_param *p = &m->params[i];
        int is_norm = p->ndim == 1 && strstr(p->name, "norm") != NULL;
        for (size_t j = 0; j < p->numel; j++)
            host[j] = p->ndim == 2 ? std * rng_normal(&s) : is_norm ? 1.0f : 0.0f;
        st = put_param(m, p, host, err);
    }
    free(host);
    return st;
}

static int is_ignorable_tensor(const mt_model *m, const char *name) {
    if (mt_ends_with(name, "rotary_emb.inv_freq")) return 1; /* a buffer older checkpoints carry */
    /* Tied models use the embedding; some checkpoints still store a copy. */
    return m->cfg.tie_word_embeddings && !strcmp(name, "lm_head.weight");
}

/* Every tensor of the file is a parameter (or one that is safe to ignore), and every
 * parameter is in the file with its exact shape. Needs only the parameter table, so
 * loaders run it before allocating: the sizes in config.json are then backed by the
 * bytes of the file, and a config that lies about them fails here, naming the tensor,
 * instead of first allocating (and zeroing) whatever it claims. */
static mt_status check_weights(mt_model *m, const mt_safetensors *st, mt_error *err) {
    size_t n = mt_st_count(st);
    for (size_t i = 0; i < n; i++) {
        const mt_st_tensor *t = mt_st_at(st, i);
        if (!mt_model_find_param(m, t->name) && !is_ignorable_tensor(m, t->name))
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: tensor \"%s\" is not a parameter of this %s model "
                                "(check config.json against the checkpoint)",
                                t->file, t->name, m->cfg.model_type);
    }
    for (size_t i = 0; i < m->num_params; i++) {
        const mt_param *p = &m->params[i];
        const mt_st_tensor *t = mt_st_find(st, p->name);
        char expected[96], found[96];
        mt_shape_format(expected, sizeof expected, p->ndim, p->shape);
        if (!t)
            return mt_error_set(err, MT_ERR_FORMAT, "%s: no tensor \"%s\" (shape %s from config.json)",
                                mt_st_source(st), p->name, expected);
        int shape_ok = t->ndim == p->ndim && t->shape[0] == p->shape[0] &&
                       (p->ndim == 1 || t->shape[1] == p->shape[1]);
        if (!shape_ok) {
            mt_shape_format(found, sizeof found, t->ndim, t->shape);
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: tensor \"%s\": expected shape %s from config.json, found %s",
                                t->file, t->name, expected, found);
        }
    }
    return MT_OK;
}

mt_status mt_model_load_weights(mt_model *m, const mt_safetensors *st, mt_error *err) {
    mt_status status = check_weights(m, st, err);
    if (status) return status;
    float *staging = NULL;
    if (m->be->device != MT_DEVICE_CPU) {
        size_t max_numel = 0;
        for (size_t i = 0; i < m->num_params; i++)
            if (m->params[i].numel > max_numel) max_numel = m->params[i].numel;
        staging = mt_malloc(max_numel * sizeof(float), "weight staging buffer", err);
        if (!staging) return MT_ERR_NOMEM;
    }
    for (size_t i = 0; i < m->num_params && !status; i++) {
        mt_param *p = &m->params[i];
        const mt_st_tensor *t = mt_st_find(st, p->name);
        float *dst = staging ? staging : p->data;
        /* refuses NaN and infinities as it converts, naming the tensor and the index */
        status = mt_st_read_f32_finite(t, dst, err);
        if (!status) status = put_param(m, p, dst, err);
    }
    free(staging);
    return status;
}

mt_status mt_check_finite(const char *file, const char *tensor, const float *x, size_t n,
                          mt_error *err) {
    const size_t bad = mt_first_nonfinite(x, n);
    if (bad == n) return MT_OK;
    size_t count = 0;
    for (size_t j = bad; j < n; j++) count += !isfinite(x[j]);
    return mt_error_set(err, MT_ERR_FORMAT,
                        "%s: tensor \"%s\": %zu non-finite value%s (the first, %g, at index %zu of %zu): "
                        "expected finite values; the weights are damaged",
                        file, tensor, count, count == 1 ? "" : "s", (double)x[bad], bad, n);
}

mt_status mt_model_load_hf(const char *dir, mt_backend *be, mt_model **out, mt_error *err) {
    char *config_path = mt_path_join(dir, "config.json", err);
    if (!config_path) return MT_ERR_NOMEM;
    mt_model_config cfg;
    mt_status st = mt_config_load(config_path, &cfg, err);
    free(config_path);
    if (st) return st;
    mt_safetensors *weights = NULL;
    if ((st = mt_st_open(dir, &weights, err))) return st;
    mt_model *m = NULL;
    /* names and shapes first, checked against the file, and only then the memory */
    if (!(st = mt_model_create_table(&cfg, be, &m, err)) && !(st = check_weights(m, weights, err)) &&
        !(st = mt_model_alloc_params(m, err)))
        st = mt_model_load_weights(m, weights, err);
    mt_st_close(weights);
    if (st) {
        mt_model_free(m);
        return st;
    }
    *out = m;
    return MT_OK;
}

/* ---- planning ----------------------------------------------------------- */

/* The activation plan: one allocation carved into the arrays of model.h. What backward
 * recomputes (m->recompute) is carved once and every layer points at it. */
static void carve_plan(mt_model *m, mt_carver *cv) {
    const mt_model_config *c = &m->cfg;
    const size_t BT = (size_t)m->plan_B * m->plan_T, C = c->hidden_size, F = c->intermediate_size;
    const size_t QD = (size_t)c->num_heads * c->head_dim, KVD = (size_t)c->num_kv_heads * c->head_dim;
    const size_t f = sizeof(float);
    const int layers = m->recompute == MT_RECOMPUTE_LAYERS;
    const int norms = m->recompute != MT_RECOMPUTE_OFF;
    float *shared_ln = norms ? mt_carve(cv, BT * C, f) : NULL;
    float *shared_act = norms ? mt_carve(cv, BT * F, f) : NULL;
    for (int l = 0; l < c->num_layers; l++) {
        mt_layer_acts *a = &m->acts[l];
        a->res_in = mt_carve(cv, BT * C, f);
        if (layers && l > 0) { /* all but res_in: layer 0's */
            float *res_in = a->res_in;
            *a = m->acts[0];
            a->res_in = res_in;
            continue;
        }
        a->ln1 = norms ? shared_ln : mt_carve(cv, BT * C, f);
        a->ln1_rstd = mt_carve(cv, BT, f);
        a->q = mt_carve(cv, BT * QD, f);
        a->k = mt_carve(cv, BT * KVD, f);
        a->v = mt_carve(cv, BT * KVD, f);
        a->att = mt_carve(cv, BT * QD, f);
        a->lse = mt_carve(cv, BT * (size_t)c->num_heads, f);
        a->res_mid = mt_carve(cv, BT * C, f);
        a->ln2 = norms ? shared_ln : mt_carve(cv, BT * C, f);
        a->ln2_rstd = mt_carve(cv, BT, f);
        a->gate = mt_carve(cv, BT * F, f);
        a->up = mt_carve(cv, BT * F, f);
        a->act = norms ? shared_act : mt_carve(cv, BT * F, f);
    }
    m->rstd_work = mt_carve(cv, BT, f);
    m->res_out = mt_carve(cv, BT * C, f);
    m->lnf = mt_carve(cv, BT * C, f);
    m->lnf_rstd = mt_carve(cv, BT, f);
    m->rope_cos = mt_carve(cv, (size_t)m->plan_T * c->head_dim / 2, f);
    m->rope_sin = mt_carve(cv, (size_t)m->plan_T * c->head_dim / 2, f);
    m->tokens = mt_carve(cv, BT, sizeof(int32_t));
    m->positions = mt_carve(cv, BT, sizeof(int32_t));
    m->segments = mt_carve(cv, BT, sizeof(int32_t));
    m->targets = mt_carve(cv, BT, sizeof(int32_t));
    m->logits_chunk = mt_carve(cv, (size_t)m->plan_chunk * c->vocab_size, f);
    m->chunk_losses = mt_carve(cv, (size_t)m->plan_chunk, f);
    m->row_index = mt_carve(cv, (size_t)m->plan_chunk, sizeof(int32_t));
    m->rows_lnf = mt_carve(cv, (size_t)m->plan_chunk * C, f);
    m->rows_d_lnf = mt_carve(cv, (size_t)m->plan_chunk * C, f);
    m->d_res = mt_carve(cv, BT * C, f);
    m->d_ln = mt_carve(cv, BT * C, f);
    m->d_att = mt_carve(cv, BT * QD, f);
    m->d_q = mt_carve(cv, BT * QD, f);
    m->d_k = mt_carve(cv, BT * KVD, f);
    m->d_v = mt_carve(cv, BT * KVD, f);
    m->d_act = mt_carve(cv, BT * F, f);
    m->d_gate = mt_carve(cv, BT * F, f);
    m->d_up = mt_carve(cv, BT * F, f);
    /* a batch may be one row as wide as the plan's tokens (shared prompt prefixes) */
    const size_t att_rows = m->be->ops->attention_work_bytes(m->be, m->plan_B, m->plan_T,
                                                             c->num_heads, c->num_kv_heads,
                                                             c->head_dim);
    const size_t att_wide = m->be->ops->attention_work_bytes(m->be, 1, (int)BT, c->num_heads,
                                                             c->num_kv_heads, c->head_dim);
    m->att_work = mt_carve(cv, att_rows > att_wide ? att_rows : att_wide, 1);
}

mt_status mt_model_plan(mt_model *m, int B, int T, int chunk, mt_error *err) {
    const mt_model_config *c = &m->cfg;
    if (B <= 0 || T <= 0)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "batch %d x sequence %d: both must be positive",
                            B, T);
    if (T > c->max_position_embeddings)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "sequence length %d exceeds max_position_embeddings %d", T,
                            c->max_position_embeddings);
    if ((int64_t)B * T > (1 << 24))
        return mt_error_set(err, MT_ERR_INVALID_ARG, "batch %d x sequence %d is too large", B, T);
    free_plan(m);
    int BT = B * T;
    if (chunk <= 0) {
        /* hold about 32 MB of logits at once, in a multiple of 16 rows: sgemm's kernels
         * work in tiles of rows, and the output layer's products of a ragged count ran
         * slower (OpenBLAS on a Zen 2: 170 rows 130 GFLOP/s, 176 rows 157; docs/speed.md) */
        int64_t rows = (32ll << 20) / ((int64_t)c->vocab_size * 4);
        if (rows >= 16) rows = (rows + 8) / 16 * 16;
        chunk = rows < 1 ? 1 : (int)(rows > BT ? BT : rows);
    }
    if (chunk > BT) chunk = BT;
    m->plan_B = B;
    m->plan_T = T;
    m->plan_chunk = chunk;
    m->acts = mt_calloc((size_t)c->num_layers, sizeof *m->acts, "activation table", err);
    m->host_losses = mt_malloc((size_t)chunk * sizeof(float), "loss buffer", err);
    m->host_rows = mt_malloc((size_t)chunk * sizeof(int32_t), "row buffer", err);
    m->host_row_targets = mt_malloc((size_t)chunk * sizeof(int32_t), "row buffer", err);
    m->host_positions = mt_malloc((size_t)BT * sizeof(int32_t), "position buffer", err);
    if (!m->acts || !m->host_losses || !m->host_positions || !m->host_rows || !m->host_row_targets) {
        free_plan(m);
        return MT_ERR_NOMEM;
    }
    mt_carver size = {0};
    carve_plan(m, &size);
    m->act_bytes = size.offset;
    m->act_memory = m->be->ops->alloc(m->be, m->act_bytes);
    if (!m->act_memory) {
        size_t bytes = m->act_bytes;
        free_plan(m);
        return mt_error_set(err, MT_ERR_NOMEM,
                            "out of %s memory planning activations for batch %d x sequence %d "
                            "(%zu bytes)",
                            m->be->name, B, T, bytes);
    }
    mt_carver fill = {.base = m->act_memory};
    carve_plan(m, &fill);

    /* rotary tables cos/sin (T, D/2), computed as transformers does in fp32 */
    const int half = c->head_dim / 2;
    float *inv_freq = malloc((size_t)half * sizeof(float));
    float *table = malloc((size_t)T * half * 2 * sizeof(float));
    if (!inv_freq || !table) {
        free(inv_freq);
        free(table);
        free_plan(m);
        return mt_error_set(err, MT_ERR_NOMEM, "out of memory for rotary tables");
    }
    mt_rope_inv_freq(c, inv_freq);
    for (int p = 0; p < T; p++)
        for (int i = 0; i < half; i++) {
            float angle = (float)p * inv_freq[i];
            table[(size_t)p * half + i] = cosf(angle);
            table[(size_t)T * half + (size_t)p * half + i] = sinf(angle);
        }
    mt_status st = m->be->ops->upload(m->be, m->rope_cos, table, (size_t)T * half * sizeof(float));
    if (!st)
        st = m->be->ops->upload(m->be, m->rope_sin, table + (size_t)T * half,
                                (size_t)T * half * sizeof(float));
    free(inv_freq);
    free(table);
    if (st) {
        free_plan(m);
        return mt_error_set(err, st, "uploading rotary tables failed");
    }
    return MT_OK;
}

size_t mt_model_plan_bytes(const mt_model *m) { return m->act_bytes; }

/* ---- forward ------------------------------------------------------------ */

/* Layer l's forward from its input acts[l].res_in. With `next`, its output (the down
 * projection plus the residual) goes there; without, it stops after SwiGLU's product,
 * which is all backward needs again (gradient checkpointing). */
static void layer_forward(mt_model *m, int l, int B, int T, float *next) {
    const mt_model_config *c = &m->cfg;
    mt_backend *be = m->be;
    const int BT = B * T, C = c->hidden_size, F = c->intermediate_size;
    const int H = c->num_heads, KVH = c->num_kv_heads, D = c->head_dim;
    const int32_t *seg = m->has_segments ? m->segments : NULL;
    mt_layer *ly = &m->layers[l];
    mt_layer_acts *a = &m->acts[l];
    be->ops->rmsnorm_forward(be, a->ln1, a->ln1_rstd, a->res_in, ly->attn_norm, BT, C,
                             c->rms_norm_eps);
    mt_linears_forward_shared(m, (mt_linear *[]){&ly->q, &ly->k, &ly->v},
                              (float *[]){a->q, a->k, a->v}, 3, a->ln1, BT);
    be->ops->rope_forward(be, a->q, m->rope_cos, m->rope_sin, m->positions, BT, H, D);
    be->ops->rope_forward(be, a->k, m->rope_cos, m->rope_sin, m->positions, BT, KVH, D);
    be->ops->attention_forward(be, a->att, a->lse, a->q, a->k, a->v, seg, B, T, H, KVH, D,
                               1.0f / sqrtf((float)D), m->att_work);
    mt_linear_forward(&ly->o, a->res_mid, a->att, BT);
    be->ops->add(be, a->res_mid, a->res_mid, a->res_in, (size_t)BT * C);
    be->ops->rmsnorm_forward(be, a->ln2, a->ln2_rstd, a->res_mid, ly->mlp_norm, BT, C,
                             c->rms_norm_eps);
    mt_linears_forward_shared(m, (mt_linear *[]){&ly->gate, &ly->up}, (float *[]){a->gate, a->up},
                              2, a->ln2, BT);
    be->ops->swiglu_forward(be, a->act, a->gate, a->up, (size_t)BT * F);
    if (!next) return;
    mt_linear_forward(&ly->down, next, a->act, BT);
    be->ops->add(be, next, next, a->res_mid, (size_t)BT * C);
}

mt_status mt_model_forward(mt_model *m, const int32_t *tokens, const int32_t *positions,
                           const int32_t *segments, int B, int T, mt_error *err) {
    const mt_model_config *c = &m->cfg;
    mt_backend *be = m->be;
    if (!m->act_memory)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "mt_model_forward before mt_model_plan");
    /* rows wider than the plan's sequence are fine when their positions stay inside
     * it (examples after a shared prompt prefix) */
    if (B <= 0 || T <= 0 || (T > m->plan_T && !positions) ||
        (int64_t)B * T > (int64_t)m->plan_B * m->plan_T)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "batch %d x sequence %d does not fit the plan (%d x %d)", B, T,
                            m->plan_B, m->plan_T);
    mt_status st = check_recompute(m, m->recompute, err);
    if (st) return st;
    const int BT = B * T, C = c->hidden_size;
    for (int i = 0; i < BT; i++) {
        if (tokens[i] < 0 || tokens[i] >= c->vocab_size)
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "token %d at row %d, position %d is outside the vocabulary (%d)",
                                tokens[i], i / T, i % T, c->vocab_size);
        if (positions && (positions[i] < 0 || positions[i] >= m->plan_T))
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "position id %d at row %d, column %d is outside [0, %d)",
                                positions[i], i / T, i % T, m->plan_T);
    }
    st = be->ops->upload(be, m->tokens, tokens, (size_t)BT * sizeof(int32_t));
    if (!st && positions)
        st = be->ops->upload(be, m->positions, positions, (size_t)BT * sizeof(int32_t));
    if (!st && segments)
        st = be->ops->upload(be, m->segments, segments, (size_t)BT * sizeof(int32_t));
    if (st) return mt_error_set(err, st, "uploading the batch failed");
    if (!positions) { /* 0..T-1 in every row */
        for (int i = 0; i < BT; i++) m->host_positions[i] = i % T;
        st = be->ops->upload(be, m->positions, m->host_positions, (size_t)BT * sizeof(int32_t));
        if (st) return mt_error_set(err, st, "uploading positions failed");
    }
    m->has_segments = segments != NULL;
    be->ops->embedding_forward(be, m->acts[0].res_in, m->tokens, m->embed, BT, C);
    for (int l = 0; l < c->num_layers; l++)
        layer_forward(m, l, B, T, l + 1 < c->num_layers ? m->acts[l + 1].res_in : m->res_out);
    be->ops->rmsnorm_forward(be, m->lnf, m->lnf_rstd, m->res_out, m->final_norm, BT, C,
                             c->rms_norm_eps);
    /* d_ln doubles as the gradient of lnf until mt_model_backward consumes it */
    be->ops->zero(be, m->d_ln, (size_t)BT * C * sizeof(float));
    m->cur_B = B;
    m->cur_T = T;
    m->forward_done = 1;
    /* an adapter's misuse of a host operation surfaces as the forward's error */
    return m->num_adapters ? mt_host_check("adapter forward", err) : MT_OK;
}

static mt_status check_rows(const mt_model *m, int row0, int nrows, mt_error *err) {
    if (!m->forward_done)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "no forward pass to read logits from");
    int BT = m->cur_B * m->cur_T;
    if (row0 < 0 || nrows < 0 || row0 > BT - nrows)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "rows [%d, %d) outside the batch of %d rows",
                            row0, row0 + nrows, BT);
    return MT_OK;
}

mt_status mt_model_logits(mt_model *m, int row0, int nrows, float *logits, mt_error *err) {
    mt_status st = check_rows(m, row0, nrows, err);
    if (st) return st;
    const int C = m->cfg.hidden_size;
    mt_linear_forward(&m->lm_head, logits, m->lnf + (size_t)row0 * C, nrows);
    return m->num_adapters ? mt_host_check("adapter forward", err) : MT_OK;
}

mt_status mt_model_backward_logits(mt_model *m, int row0, int nrows, const float *dlogits,
                                   mt_error *err) {
    mt_status st = check_rows(m, row0, nrows, err);
    if (st) return st;
    const size_t off = (size_t)row0 * m->cfg.hidden_size;
    mt_linear_backward(&m->lm_head, m->d_ln + off, dlogits, m->lnf + off, nrows);
    return m->num_adapters ? mt_host_check("adapter backward", err) : MT_OK;
}

/* rows (n <= plan_chunk, each in the last forward's batch) uploaded to m->row_index and
 * their final-norm outputs gathered into m->rows_lnf. */
static mt_status gather_rows(mt_model *m, const int32_t *rows, int nrows, mt_error *err) {
    if (!m->forward_done)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "no forward pass to read logits from");
    const int BT = m->cur_B * m->cur_T, C = m->cfg.hidden_size;
    if (nrows < 0 || nrows > m->plan_chunk)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%d rows at once, more than the plan's %d",
                            nrows, m->plan_chunk);
    for (int i = 0; i < nrows; i++)
        if (rows[i] < 0 || rows[i] >= BT)
            return mt_error_set(err, MT_ERR_INVALID_ARG, "row %d (entry %d) outside the batch of %d rows",
                                rows[i], i, BT);
    if (nrows == 0) return MT_OK;
    mt_backend *be = m->be;
    mt_status st = be->ops->upload(be, m->row_index, rows, (size_t)nrows * sizeof(int32_t));
    if (st) return mt_error_set(err, st, "uploading row indices failed");
    /* a gather of rows is an embedding lookup with the final-norm outputs as the table */
    be->ops->embedding_forward(be, m->rows_lnf, m->row_index, m->lnf, nrows, C);
    return MT_OK;
}

mt_status mt_model_logits_rows(mt_model *m, const int32_t *rows, int nrows, float *logits,
                               mt_error *err) {
    mt_status st = gather_rows(m, rows, nrows, err);
    if (st || nrows == 0) return st;
    mt_linear_forward(&m->lm_head, logits, m->rows_lnf, nrows);
    return m->num_adapters ? mt_host_check("adapter forward", err) : MT_OK;
}

mt_status mt_model_backward_logits_rows(mt_model *m, const int32_t *rows, int nrows,
                                        const float *dlogits, mt_error *err) {
    mt_status st = gather_rows(m, rows, nrows, err);
    if (st || nrows == 0) return st;
    mt_backend *be = m->be;
    const int C = m->cfg.hidden_size;
    be->ops->zero(be, m->rows_d_lnf, (size_t)nrows * C * sizeof(float));
    mt_linear_backward(&m->lm_head, m->rows_d_lnf, dlogits, m->rows_lnf, nrows);
    /* and scattered back: the embedding gradient's accumulation, into d_ln */
    be->ops->embedding_backward(be, m->d_ln, m->rows_d_lnf, m->row_index, nrows, C);
    return m->num_adapters ? mt_host_check("adapter backward", err) : MT_OK;
}

/* The cross-entropy pass; row_logp (B, optional) receives each row's Σ log p(target). */
static mt_status cross_entropy_pass(mt_model *m, const int32_t *targets, int backward, float *loss,
                                    int64_t *n_targets, double *row_logp, mt_error *err) {
    if (!m->forward_done)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "cross entropy without a forward pass");
    mt_backend *be = m->be;
    const int T = m->cur_T, BT = m->cur_B * T, V = m->cfg.vocab_size;
    int64_t count = 0;
    if (row_logp)
        for (int b = 0; b < m->cur_B; b++) row_logp[b] = 0.0;
    for (int i = 0; i < BT; i++) {
        if (targets[i] >= V)
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "target %d at row %d, position %d is outside the vocabulary (%d)",
                                targets[i], i / T, i % T, V);
        count += targets[i] >= 0;
    }
    double total = 0.0;
    const float dloss = count ? 1.0f / (float)count : 0.0f;
    /* the output layer for the rows with a target only, a chunk of them at a time: prompt
     * tokens need no logits */
    int n = 0;
    for (int i = 0; i < BT && count; i++) {
        if (targets[i] >= 0) {
            m->host_rows[n] = i;
            m->host_row_targets[n++] = targets[i];
        }
        /* a chunk goes when it is full or the batch ends */
        if (n == 0 || (n < m->plan_chunk && i < BT - 1)) continue;
        mt_status st = be->ops->upload(be, m->targets, m->host_row_targets, (size_t)n * sizeof(int32_t));
        if (st) return mt_error_set(err, st, "uploading targets failed");
        if ((st = mt_model_logits_rows(m, m->host_rows, n, m->logits_chunk, err))) return st;
        be->ops->cross_entropy_forward(be, m->chunk_losses, m->logits_chunk, m->targets, n, V,
                                       IGNORE_INDEX);
        if ((st = be->ops->download(be, m->host_losses, m->chunk_losses, (size_t)n * sizeof(float))))
            return mt_error_set(err, st, "downloading losses failed");
        for (int r = 0; r < n; r++) {
            total += m->host_losses[r];
            if (row_logp) row_logp[m->host_rows[r] / T] -= m->host_losses[r];
        }
        if (backward) {
            be->ops->cross_entropy_backward(be, m->logits_chunk, m->logits_chunk, m->targets, n, V,
                                            IGNORE_INDEX, dloss);
            if ((st = mt_model_backward_logits_rows(m, m->host_rows, n, m->logits_chunk, err)))
                return st;
        }
        n = 0;
    }
    *loss = count ? (float)(total / (double)count) : 0.0f;
    if (n_targets) *n_targets = count;
    if (!isfinite(*loss))
        return mt_error_set(err, MT_ERR_NUMERIC, "the loss is not finite (%g)", (double)*loss);
    return MT_OK;
}

mt_status mt_model_cross_entropy(mt_model *m, const int32_t *targets, int backward, float *loss,
                                 int64_t *n_targets, mt_error *err) {
    return cross_entropy_pass(m, targets, backward, loss, n_targets, NULL, err);
}

mt_status mt_model_sequence_logps(mt_model *m, const int32_t *targets, double *row_logp,
                                  mt_error *err) {
    float loss;
    return cross_entropy_pass(m, targets, 0, &loss, NULL, row_logp, err);
}

/* ---- backward ----------------------------------------------------------- */

mt_status mt_model_backward(mt_model *m, mt_error *err) {
    if (!m->forward_done)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "backward without a forward pass");
    const mt_model_config *c = &m->cfg;
    mt_backend *be = m->be;
    const int B = m->cur_B, T = m->cur_T, BT = B * T, C = c->hidden_size, F = c->intermediate_size;
    const int H = c->num_heads, KVH = c->num_kv_heads, D = c->head_dim;
    const size_t nC = (size_t)BT * C, nQ = (size_t)BT * H * D, nF = (size_t)BT * F;
    const int32_t *seg = m->has_segments ? m->segments : NULL;
    const float scale = 1.0f / sqrtf((float)D);

    be->ops->zero(be, m->d_res, nC * sizeof(float));
    be->ops->rmsnorm_backward(be, m->d_res, m->final_norm_grad, m->d_ln, m->res_out, m->final_norm,
                              m->lnf_rstd, BT, C);
    for (int l = c->num_layers - 1; l >= 0; l--) {
        mt_layer *ly = &m->layers[l];
        mt_layer_acts *a = &m->acts[l];
        /* what the plan did not keep, from what it did: the same operations on the same
         * inputs, so the same bits as the forward's */
        if (m->recompute == MT_RECOMPUTE_LAYERS) {
            set_replay(m, 1);
            layer_forward(m, l, B, T, NULL); /* leaves ln2 in the norms' shared buffer */
            set_replay(m, 0);
        } else if (m->recompute == MT_RECOMPUTE_NORMS) {
            be->ops->swiglu_forward(be, a->act, a->gate, a->up, nF);
        }
        /* d_res holds dL/d(layer output) = dL/d(res_mid) through the residual path */
        be->ops->zero(be, m->d_act, nF * sizeof(float));
        mt_linear_backward(&ly->down, m->d_act, m->d_res, a->act, BT);
        be->ops->swiglu_backward(be, m->d_gate, m->d_up, m->d_act, a->gate, a->up, nF);
        if (m->recompute == MT_RECOMPUTE_NORMS)
            be->ops->rmsnorm_forward(be, a->ln2, m->rstd_work, a->res_mid, ly->mlp_norm, BT, C,
                                     c->rms_norm_eps);
        be->ops->zero(be, m->d_ln, nC * sizeof(float));
        mt_linears_backward_shared((mt_linear *[]){&ly->gate, &ly->up}, m->d_ln,
                                   (float *[]){m->d_gate, m->d_up}, 2, a->ln2, BT);
        be->ops->rmsnorm_backward(be, m->d_res, ly->mlp_norm_grad, m->d_ln, a->res_mid,
                                  ly->mlp_norm, a->ln2_rstd, BT, C);
        /* d_res now holds dL/d(res_mid) = dL/d(res_in) through the residual path */
        be->ops->zero(be, m->d_att, nQ * sizeof(float));
        mt_linear_backward(&ly->o, m->d_att, m->d_res, a->att, BT);
        be->ops->attention_backward(be, m->d_q, m->d_k, m->d_v, m->d_att, a->att, a->lse, a->q,
                                    a->k, a->v, seg, B, T, H, KVH, D, scale, m->att_work);
        be->ops->rope_backward(be, m->d_q, m->rope_cos, m->rope_sin, m->positions, BT, H, D);
        be->ops->rope_backward(be, m->d_k, m->rope_cos, m->rope_sin, m->positions, BT, KVH, D);
        if (m->recompute != MT_RECOMPUTE_OFF) /* ln2 took the buffer */
            be->ops->rmsnorm_forward(be, a->ln1, m->rstd_work, a->res_in, ly->attn_norm, BT, C,
                                     c->rms_norm_eps);
        be->ops->zero(be, m->d_ln, nC * sizeof(float));
        mt_linears_backward_shared((mt_linear *[]){&ly->q, &ly->k, &ly->v}, m->d_ln,
                                   (float *[]){m->d_q, m->d_k, m->d_v}, 3, a->ln1, BT);
        be->ops->rmsnorm_backward(be, m->d_res, ly->attn_norm_grad, m->d_ln, a->res_in,
                                  ly->attn_norm, a->ln1_rstd, BT, C);
    }
    if (m->embed_grad) be->ops->embedding_backward(be, m->embed_grad, m->d_res, m->tokens, BT, C);
    m->forward_done = 0;
    mt_status st = be->ops->sync(be);
    if (st) return mt_error_set(err, st, "backend error during backward");
    return m->num_adapters ? mt_host_check("adapter backward", err) : MT_OK;
}
