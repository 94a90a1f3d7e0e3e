/* heavy_ball.c — an out-of-tree optimizer plugin: SGD with heavy-ball momentum and
 * decoupled weight decay, written against the installed moontune/plugin.h alone.
 *
 * For every parameter p with gradient g at learning rate lr:
 *
 *     b  = momentum * b + g            state "momentum_buffer/<param>", zeros at first
 *     p *= 1 - lr * weight_decay       skipped for parameters marked no_decay
 *     p -= lr * b
 *
 * What it shows (plugin ABI 2):
 * - the device rule: the parameters may live on a GPU, so the plugin never touches
 *   their memory. Its buffers are tensors from host->tensor_alloc on the parameters'
 *   device, and the update is host operations (axpby: y = alpha x + beta y);
 * - the struct-size rule: parameter views are walked with mt_param_at, the vtable
 *   carries its size;
 * - checkpoint state slots: state_get hands out the device tensor (the host downloads
 *   it), state_set receives a tensor in host memory. A checkpoint may be restored before
 *   the first step, when the device is not known yet: the values wait in host memory
 *   until the first step uploads them.
 *
 * Build it against an installed moontune:
 *   cc -std=c11 -shared -fPIC -fvisibility=hidden $(pkg-config --cflags moontune) \
 *      heavy_ball.c -o ~/moontune-plugins/heavy_ball.so
 * and use it in a recipe as optimizer = {name = "heavy_ball", momentum = 0.9}. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <moontune/plugin.h>

#define NAME "heavy_ball"

static const mt_host *host;

static const mt_option_spec options[] = {
    {"momentum", MT_OPT_FLOAT, "0.9", 0.0, 1.0, NULL, "decay of the momentum buffer, in [0, 1]"},
    {"weight_decay", MT_OPT_FLOAT, "0", 0.0, 1e300, NULL,
     "decoupled weight decay (0 for no_decay parameters)"},
};

typedef struct slot {
    char name[256];  /* "momentum_buffer/<param>" */
    mt_tensor buf;   /* on the parameter's device; data NULL until the first step */
    float *restored; /* state_set before the first step: host memory, numel floats */
    int ndim;
    int64_t shape[MT_MAX_DIMS];
} slot;

typedef struct heavy_ball {
    double momentum, weight_decay;
    slot *slots;
    size_t n_slots, cap;
} heavy_ball;

static const char *const PREFIX = "momentum_buffer/";

static mt_status create(const mt_host *h, const mt_options *opts, void **state, mt_error *err) {
    heavy_ball *hb = h->alloc(sizeof *hb);
    if (!hb) return h->error(err, MT_ERR_NOMEM, NAME ": out of memory");
    hb->momentum = h->opt_float(opts, "momentum");
    hb->weight_decay = h->opt_float(opts, "weight_decay");
    *state = hb;
    return MT_OK;
}

static void destroy(void *state) {
    heavy_ball *hb = state;
    if (!hb) return;
    for (size_t i = 0; i < hb->n_slots; i++) {
        host->tensor_free(&hb->slots[i].buf);
        host->free(hb->slots[i].restored);
    }
    host->free(hb->slots);
    host->free(hb);
}

static int same_shape(const slot *s, const mt_tensor *t) {
    if (s->ndim != t->ndim) return 0;
    for (int i = 0; i < t->ndim; i++)
        if (s->shape[i] != t->shape[i]) return 0;
    return 1;
}

/* The slot of a checkpoint name, or NULL. */
static slot *find(heavy_ball *hb, const char *name) {
    for (size_t i = 0; i < hb->n_slots; i++)
        if (!strcmp(hb->slots[i].name, name)) return &hb->slots[i];
    return NULL;
}

/* A new slot for parameter `param` of t's shape, without memory yet. */
static slot *add(heavy_ball *hb, const char *param, const mt_tensor *t, mt_error *err) {
    if (strlen(PREFIX) + strlen(param) >= sizeof hb->slots[0].name) {
        host->error(err, MT_ERR_INVALID_ARG, NAME ": parameter name too long: %s", param);
        return NULL;
    }
    if (hb->n_slots == hb->cap) {
        size_t cap = hb->cap ? 2 * hb->cap : 16;
        slot *grown = host->alloc(cap * sizeof *grown); /* zero-filled */
        if (!grown) {
            host->error(err, MT_ERR_NOMEM, NAME ": out of memory for %zu parameters", cap);
            return NULL;
        }
        if (hb->n_slots) memcpy(grown, hb->slots, hb->n_slots * sizeof *grown);
        host->free(hb->slots);
        hb->slots = grown;
        hb->cap = cap;
    }
    slot *s = &hb->slots[hb->n_slots++];
    memset(s, 0, sizeof *s);
    strcpy(s->name, PREFIX);
    strcat(s->name, param);
    s->ndim = t->ndim;
    memcpy(s->shape, t->shape, sizeof s->shape);
    return s;
}

static mt_status step(void *state, mt_param_view *params, size_t count, double lr, int64_t t,
                      mt_error *err) {
    heavy_ball *hb = state;
    (void)t; /* the update does not depend on the step count */
    if (count && params[0].size < sizeof(mt_param_view))
        return host->error(err, MT_ERR_INVALID_ARG, NAME ": parameter views of %u bytes",
                           (unsigned)params[0].size);
    /* First every check and allocation, so that a refusal leaves the parameters alone. */
    for (size_t i = 0; i < count; i++) {
        const mt_param_view *p = mt_param_at(params, i);
        if (p->value.dtype != MT_F32 || p->grad.dtype != MT_F32 ||
            mt_tensor_numel(&p->value) != mt_tensor_numel(&p->grad))
            return host->error(err, MT_ERR_INVALID_ARG,
                               NAME ": parameter '%s': value and gradient must be F32 tensors "
                                    "of one size",
                               p->name);
        char name[sizeof hb->slots[0].name];
        snprintf(name, sizeof name, "%s%s", PREFIX, p->name);
        slot *s = find(hb, name);
        if (!s && !(s = add(hb, p->name, &p->value, err))) return err->status;
        if (!same_shape(s, &p->value))
            return host->error(err, MT_ERR_INVALID_ARG,
                               NAME ": parameter '%s' does not have the shape of its state",
                               p->name);
        if (s->buf.data) continue;
        mt_status st = host->tensor_alloc(p->value.device, MT_F32, s->ndim, s->shape, &s->buf,
                                          err);
        if (!st && s->restored) st = host->tensor_upload(&s->buf, s->restored, err);
        if (st) return st;
        host->free(s->restored);
        s->restored = NULL;
    }
    if (hb->n_slots != count)
        return host->error(err, MT_ERR_INVALID_ARG,
                           NAME ": %zu restored or earlier parameters, %zu now: the checkpoint "
                                "does not match the trainable parameters",
                           hb->n_slots, count);
    /* Then the updates, queued on the parameters' device. */
    for (size_t i = 0; i < count; i++) {
        mt_param_view *p = mt_param_at(params, i);
        char name[sizeof hb->slots[0].name];
        snprintf(name, sizeof name, "%s%s", PREFIX, p->name);
        slot *s = find(hb, name);
        host->axpby(&s->buf, 1.0f, &p->grad, (float)hb->momentum); /* b = g + momentum b */
        if (!p->no_decay && hb->weight_decay != 0.0)
            host->axpby(&p->value, (float)(1.0 - lr * hb->weight_decay), &p->value, 0.0f);
        host->axpby(&p->value, (float)-lr, &s->buf, 1.0f); /* p = p - lr b */
    }
    return host->check(err); /* a failure of the queued operations is this step's */
}

static size_t state_count(void *state) { return ((heavy_ball *)state)->n_slots; }

static mt_status state_get(void *state, size_t index, const char **name, mt_tensor *tensor,
                           mt_error *err) {
    heavy_ball *hb = state;
    if (index >= hb->n_slots)
        return host->error(err, MT_ERR_INVALID_ARG, NAME ": state index %zu out of range", index);
    slot *s = &hb->slots[index];
    *name = s->name;
    if (s->buf.data) { /* on the parameters' device: the host downloads it */
        *tensor = s->buf;
        return MT_OK;
    }
    memset(tensor, 0, sizeof *tensor); /* restored, not stepped yet: still in host memory */
    tensor->dtype = MT_F32;
    tensor->device = MT_DEVICE_CPU;
    tensor->ndim = s->ndim;
    memcpy(tensor->shape, s->shape, sizeof tensor->shape);
    tensor->data = s->restored;
    return MT_OK;
}

static mt_status state_set(void *state, const char *name, const mt_tensor *tensor,
                           mt_error *err) {
    heavy_ball *hb = state;
    if (strncmp(name, PREFIX, strlen(PREFIX)))
        return host->error(err, MT_ERR_INVALID_ARG,
                           NAME ": unknown state '%s': expected momentum_buffer/<param>", name);
    if (tensor->dtype != MT_F32 || tensor->device != MT_DEVICE_CPU)
        return host->error(err, MT_ERR_INVALID_ARG,
                           NAME ": state '%s' must be an F32 tensor in host memory", name);
    slot *s = find(hb, name);
    if (!s && !(s = add(hb, name + strlen(PREFIX), tensor, err))) return err->status;
    if (!same_shape(s, tensor))
        return host->error(err, MT_ERR_INVALID_ARG, NAME ": state '%s' has another shape", name);
    if (s->buf.data) return host->tensor_upload(&s->buf, tensor->data, err);
    const size_t bytes = mt_tensor_nbytes(tensor);
    if (!s->restored && !(s->restored = host->alloc(bytes ? bytes : 1)))
        return host->error(err, MT_ERR_NOMEM, NAME ": out of memory for state '%s'", name);
    memcpy(s->restored, tensor->data, bytes);
    return MT_OK;
}

static const mt_optimizer_vtable vtable = {
    MT_VTABLE_SIZE(mt_optimizer_vtable),
    .create = create,
    .destroy = destroy,
    .step = step,
    .state_count = state_count,
    .state_get = state_get,
    .state_set = state_set,
};

MT_PLUGIN_DEFINE(host,
                 .kind = MT_PLUGIN_OPTIMIZER,
                 .name = NAME,
                 .version = "0.1.0",
                 .description = "SGD with heavy-ball momentum and decoupled weight decay "
                                "(an example)",
                 .options = options,
                 .n_options = sizeof options / sizeof options[0],
                 .vtable = &vtable)
