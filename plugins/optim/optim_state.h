/* optim_state.h — the per-parameter state that the optimizer plugins (adamw.c, sgd.c,
 * lion.c) share, compiled into each of them: every function here is static.
 *
 * An optimizer keeps, for every parameter, up to OPTIM_MAX_KINDS fp32 buffers of the
 * parameter's shape ("kinds": adamw's exp_avg and exp_avg_sq, sgd's momentum_buffer, ...),
 * named "<kind>/<param>" in a checkpoint. The buffers are device tensors
 * (host->tensor_alloc) on the parameter's device, and the updates are host operations on
 * them (plugin ABI 2): the plugin never reads or writes their memory itself, so the same
 * code runs on the CPU and on a GPU.
 *
 * The state is created lazily (zeros, the shape of the parameter, on its device) on the
 * first step that sees a parameter, or by state_set when a checkpoint is restored.
 *
 * Restoring: state_set receives tensors in host memory. After a step the state exists on
 * the parameter's device and the tensor is uploaded into it. Before the first step the
 * optimizer does not know the device yet (create gets no model), so the values wait in
 * host memory ("pending") and the first step uploads them. The first step after a restore
 * checks that every parameter got all of its state and that every restored tensor belongs
 * to a parameter of the same shape, and refuses otherwise.
 *
 * How to use it: define NAME (the plugin's name, which starts every message) and
 * `static const mt_host *host;` (set by moontune_plugin_entry), then include this file.
 * The plugin's state struct begins with an optim_state, whose spec names the kinds and
 * the update of one parameter; optim_destroy, optim_step, optim_state_count and
 * optim_state_get go into the vtable as they are, and the plugin's state_set, which
 * words its own refusals of unknown names, ends in optim_restore. A plugin whose update
 * needs a temporary tensor sets optim_state.needs_scratch in create. */
#ifndef MT_PLUGIN_OPTIM_STATE_H
#define MT_PLUGIN_OPTIM_STATE_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <moontune/plugin.h>

#ifndef NAME
#error "define NAME, the plugin's name, before including optim_state.h"
#endif

#define OPTIM_MAX_KINDS 4 /* buffers per parameter, at most */

typedef struct optim_slot {       /* the state of one parameter */
    char *param;                  /* the parameter's name */
    char *names[OPTIM_MAX_KINDS]; /* "<kind>/<param>": the checkpoint names */
    /* On the parameter's device, the parameter's shape; data NULL until a step has seen
     * the parameter (then all n_kinds exist). */
    mt_tensor buf[OPTIM_MAX_KINDS];
    /* Restored before the first step: numel floats each in host memory (all n_kinds, zeros
     * where nothing was restored), or NULL; uploaded and freed by the first step. */
    float *pending[OPTIM_MAX_KINDS];
    int ndim;
    int64_t shape[MT_MAX_DIMS];
    int64_t numel;
    int started;       /* the buffers hold values from a step or a restore, not zeros */
    unsigned restored; /* bit k: buf[k] came from state_set since the last step */
    uint64_t seen;     /* the step pass that last matched it to a parameter */
} optim_slot;

/* What an optimizer tells the shared code. */
typedef struct optim_spec {
    const char *const *kind_names; /* max_kinds names: "exp_avg", ... */
    int max_kinds;                 /* <= OPTIM_MAX_KINDS */
    /* Queues the update of parameter p (gradient g, both on one device) with its state s
     * (s->buf on that device) as host operations. `self` is the plugin's state; wd is its
     * weight_decay, or 0 for parameters marked no_decay; scratch is a tensor of p's shape
     * on p's device that the update may overwrite, or NULL unless needs_scratch is set. */
    void (*update)(const void *self, optim_slot *s, mt_tensor *p, const mt_tensor *g,
                   mt_tensor *scratch, double wd, double lr, int64_t step);
} optim_spec;

typedef struct optim_state { /* the first member of an optimizer's state */
    const optim_spec *spec;
    int n_kinds;         /* the kinds in use: the first n_kinds of spec->kind_names */
    int needs_scratch;   /* the update needs a temporary tensor (set by create) */
    double weight_decay; /* for parameters not marked no_decay; the update applies it */
    optim_slot *slots;   /* after a step, slots[i] belongs to params[i] */
    size_t n_slots, cap;
    mt_tensor scratch;   /* 1-D, as large as the largest parameter seen; data NULL: none */
    int restoring;       /* state_set was called since the last step */
    uint64_t pass;       /* counts calls of step */
} optim_state;

/* ---- helpers ---- */

/* "a/b" (or "a" when b is NULL) in host memory; NULL when out of memory. */
static char *optim_join(const char *a, const char *b) {
    size_t la = strlen(a), lb = b ? strlen(b) : 0;
    char *s = host->alloc(la + lb + 2);
    if (!s) return NULL;
    memcpy(s, a, la);
    if (b) {
        s[la] = '/';
        memcpy(s + la + 1, b, lb + 1);
    }
    return s;
}

static const char *optim_device_name(mt_device d) {
    return d == MT_DEVICE_CPU ? "cpu" : d == MT_DEVICE_CUDA ? "cuda" : "an unknown device";
}

static const char *optim_dtype_name(mt_dtype d) {
    static const char *const names[MT_DTYPE_COUNT] = {"F32", "F16", "BF16", "I32", "I64", "U8"};
    return (unsigned)d < MT_DTYPE_COUNT ? names[d] : "an invalid dtype";
}

static int optim_same_shape(const optim_slot *s, const mt_tensor *t) {
    if (s->ndim != t->ndim) return 0;
    for (int i = 0; i < s->ndim; i++)
        if (s->shape[i] != t->shape[i]) return 0;
    return 1;
}

/* An F32 tensor with a valid shape and memory (on any device). */
static int optim_valid_f32(const mt_tensor *t) {
    if (t->dtype != MT_F32 || !t->data) return 0;
    if (t->ndim < 0 || t->ndim > MT_MAX_DIMS) return 0;
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] < 0) return 0;
    return 1;
}

/* Bytes of one buffer of s in host memory (at least 1, so that a parameter without
 * elements still gets a distinct allocation). */
static size_t optim_host_bytes(const optim_slot *s) {
    return s->numel ? (size_t)s->numel * sizeof(float) : 1;
}

static void optim_slot_free(optim_slot *s) {
    host->free(s->param);
    for (int k = 0; k < OPTIM_MAX_KINDS; k++) {
        host->free(s->names[k]);
        host->free(s->pending[k]);
        host->tensor_free(&s->buf[k]);
    }
}

/* Index of the slot of parameter `name`, looking at `hint` first; -1 when none. */
static long optim_find_slot(const optim_state *st, const char *name, size_t hint) {
    if (hint < st->n_slots && !strcmp(st->slots[hint].param, name)) return (long)hint;
    for (size_t i = 0; i < st->n_slots; i++)
        if (!strcmp(st->slots[i].param, name)) return (long)i;
    return -1;
}

/* Appends the state of parameter `name` of the given shape, with names but no buffers
 * (optim_materialize makes them on the device, optim_restore in host memory); NULL (and
 * err set) when out of memory. */
static optim_slot *optim_add_slot(optim_state *st, const char *name, const mt_tensor *shape,
                                  mt_error *err) {
    if (st->n_slots == st->cap) {
        size_t cap = st->cap ? 2 * st->cap : 16;
        optim_slot *grown = host->alloc(cap * sizeof *grown);
        if (!grown) {
            host->error(err, MT_ERR_NOMEM, NAME ": out of memory for the state of %zu parameters",
                        cap);
            return NULL;
        }
        if (st->n_slots) memcpy(grown, st->slots, st->n_slots * sizeof *grown);
        host->free(st->slots);
        st->slots = grown;
        st->cap = cap;
    }
    optim_slot *s = &st->slots[st->n_slots];
    memset(s, 0, sizeof *s);
    s->ndim = shape->ndim;
    memcpy(s->shape, shape->shape, sizeof s->shape);
    s->numel = mt_tensor_numel(shape);
    int ok = (s->param = optim_join(name, NULL)) != NULL;
    for (int k = 0; ok && k < st->n_kinds; k++)
        ok = (s->names[k] = optim_join(st->spec->kind_names[k], name)) != NULL;
    if (!ok) {
        optim_slot_free(s);
        host->error(err, MT_ERR_NOMEM, NAME ": out of memory for the state of '%s'", name);
        return NULL;
    }
    st->n_slots++;
    return s;
}

/* Gives s its buffers on `device` (zeros, or the pending restored values, which are then
 * freed). Nothing to do when it has them there already. */
static mt_status optim_materialize(const optim_state *st, optim_slot *s, mt_device device,
                                   mt_error *err) {
    if (st->n_kinds == 0) return MT_OK;
    if (s->buf[0].data) {
        if (s->buf[0].device == device) return MT_OK;
        return host->error(err, MT_ERR_INVALID_ARG,
                           NAME ": parameter '%s' is on %s, its optimizer state on %s", s->param,
                           optim_device_name(device), optim_device_name(s->buf[0].device));
    }
    for (int k = 0; k < st->n_kinds; k++) {
        mt_error e = {0};
        if (host->tensor_alloc(device, MT_F32, s->ndim, s->shape, &s->buf[k], &e) ||
            (s->pending[k] && host->tensor_upload(&s->buf[k], s->pending[k], &e))) {
            for (int j = 0; j <= k; j++) host->tensor_free(&s->buf[j]);
            return host->error(err, e.status ? e.status : MT_ERR_BACKEND,
                               NAME ": state %s (%lld floats on %s): %s", s->names[k],
                               (long long)s->numel, optim_device_name(device), e.msg);
        }
    }
    for (int k = 0; k < st->n_kinds; k++) {
        host->free(s->pending[k]);
        s->pending[k] = NULL;
    }
    return MT_OK;
}

/* Makes st->scratch hold at least n floats on `device`. */
static mt_status optim_scratch_reserve(optim_state *st, int64_t n, mt_device device,
                                       mt_error *err) {
    if (st->scratch.data && st->scratch.device == device && st->scratch.shape[0] >= n)
        return MT_OK;
    host->tensor_free(&st->scratch);
    const int64_t shape[1] = {n};
    mt_error e = {0};
    if (host->tensor_alloc(device, MT_F32, 1, shape, &st->scratch, &e))
        return host->error(err, e.status ? e.status : MT_ERR_NOMEM,
                           NAME ": scratch tensor of %lld floats on %s: %s", (long long)n,
                           optim_device_name(device), e.msg);
    return MT_OK;
}

/* ---- for the plugin's create and state_set ---- */

/* A zero-filled optimizer state of `size` bytes (an optim_state first, with `spec`);
 * NULL (and err set) when out of memory. */
static void *optim_alloc(const mt_host *h, size_t size, const optim_spec *spec, mt_error *err) {
    optim_state *st = h->alloc(size);
    if (!st) {
        h->error(err, MT_ERR_NOMEM, NAME ": out of memory");
        return NULL;
    }
    st->spec = spec;
    return st;
}

/* The kind of checkpoint name "<kind>/<param>" among all of spec's kinds; -1 when none. */
static int optim_kind_of(const optim_state *st, const char *name) {
    const char *slash = name ? strchr(name, '/') : NULL;
    int kind = -1;
    for (int k = 0; slash && k < st->spec->max_kinds; k++)
        if ((size_t)(slash - name) == strlen(st->spec->kind_names[k]) &&
            !strncmp(name, st->spec->kind_names[k], (size_t)(slash - name)))
            kind = k;
    return kind;
}

/* The rest of state_set, once the plugin has accepted `kind` (from optim_kind_of, and in
 * use): copies the tensor (host memory) into the state of its parameter, creating that
 * before the first step. */
static mt_status optim_restore(void *state, const char *name, int kind, const mt_tensor *tensor,
                               mt_error *err) {
    optim_state *st = state;
    char a[96], b[96];
    if (!tensor || !optim_valid_f32(tensor) || tensor->device != MT_DEVICE_CPU)
        return host->error(
            err, MT_ERR_INVALID_ARG,
            NAME ": state '%s' must be an F32 tensor in CPU memory, found %s on %s", name,
            tensor ? optim_dtype_name(tensor->dtype) : "NULL",
            tensor ? optim_device_name(tensor->device) : "no device");
    const char *param = strchr(name, '/') + 1;
    long k = optim_find_slot(st, param, 0);
    if (k < 0 && st->pass > 0)
        return host->error(err, MT_ERR_INVALID_ARG,
                           NAME ": state '%s': there is no trainable parameter named '%s'", name,
                           param);
    optim_slot *s = k >= 0 ? &st->slots[k] : optim_add_slot(st, param, tensor, err);
    if (!s) return MT_ERR_NOMEM;
    if (!optim_same_shape(s, tensor))
        return host->error(err, MT_ERR_INVALID_ARG,
                           NAME ": state '%s': expected shape %s, found %s", name,
                           mt_shape_format(a, sizeof a, s->ndim, s->shape),
                           mt_shape_format(b, sizeof b, tensor->ndim, tensor->shape));
    if (s->buf[kind].data) { /* a step has made the state on its device: upload into it */
        mt_error e = {0};
        if (host->tensor_upload(&s->buf[kind], tensor->data, &e))
            return host->error(err, e.status ? e.status : MT_ERR_BACKEND,
                               NAME ": state '%s': %s", name, e.msg);
    } else { /* the device is not known before the first step: keep it in host memory */
        for (int j = 0; j < st->n_kinds; j++)
            if (!s->pending[j] && !(s->pending[j] = host->alloc(optim_host_bytes(s))))
                return host->error(err, MT_ERR_NOMEM,
                                   NAME ": out of memory for the restored state '%s' (%lld floats)",
                                   name, (long long)s->numel);
        memcpy(s->pending[kind], tensor->data, (size_t)s->numel * sizeof(float));
    }
    s->started = 1;
    s->restored |= 1u << kind;
    st->restoring = 1;
    return MT_OK;
}

/* ---- vtable functions ---- */

static void optim_destroy(void *state) {
    optim_state *st = state;
    if (!st) return;
    for (size_t i = 0; i < st->n_slots; i++) optim_slot_free(&st->slots[i]);
    host->tensor_free(&st->scratch);
    host->free(st->slots);
    host->free(st);
}

/* Checks every parameter, finds or creates its state and moves it to slots[i]; then
 * makes the state on the parameters' device and queues the updates. Nothing is updated
 * when any check fails. */
static mt_status optim_step(void *state, mt_param_view *params, size_t count, double lr,
                            int64_t step, mt_error *err) {
    optim_state *st = state;
    char a[96], b[96];
    if (step < 1)
        return host->error(err, MT_ERR_INVALID_ARG, NAME ": step %lld: steps count from 1",
                           (long long)step);
    if (!isfinite(lr))
        return host->error(err, MT_ERR_NUMERIC, NAME ": step %lld: learning rate %g is not finite",
                           (long long)step, lr);
    if (count && (!params || params[0].size < sizeof(mt_param_view)))
        return host->error(err, MT_ERR_INVALID_ARG,
                           NAME ": parameter views of %u bytes, this optimizer needs %zu",
                           params ? (unsigned)params[0].size : 0u, sizeof(mt_param_view));
    st->pass++;
    int64_t largest = 0;
    for (size_t i = 0; i < count; i++) {
        const mt_param_view *p = mt_param_at(params, i);
        const char *name = p->name ? p->name : "";
        if (!optim_valid_f32(&p->value) || !optim_valid_f32(&p->grad))
            return host->error(err, MT_ERR_INVALID_ARG,
                               NAME ": parameter '%s': value and gradient must be F32 tensors "
                                    "with memory, found %s and %s",
                               name, optim_dtype_name(p->value.dtype),
                               optim_dtype_name(p->grad.dtype));
        /* one device for the whole step: the state and the scratch tensor live there */
        const mt_device device = mt_param_at(params, 0)->value.device;
        if (p->value.device != device || p->grad.device != device)
            return host->error(err, MT_ERR_INVALID_ARG,
                               NAME ": parameter '%s': value on %s and gradient on %s, the "
                                    "first parameter on %s (one device per step)",
                               name, optim_device_name(p->value.device),
                               optim_device_name(p->grad.device), optim_device_name(device));
        if (mt_tensor_numel(&p->grad) != mt_tensor_numel(&p->value))
            return host->error(err, MT_ERR_INVALID_ARG,
                               NAME ": parameter '%s': gradient %s does not match value %s", name,
                               mt_shape_format(a, sizeof a, p->grad.ndim, p->grad.shape),
                               mt_shape_format(b, sizeof b, p->value.ndim, p->value.shape));
        if (mt_tensor_numel(&p->value) > largest) largest = mt_tensor_numel(&p->value);
        long k = optim_find_slot(st, name, i);
        if (k < 0) {
            if (st->restoring)
                return host->error(err, MT_ERR_INVALID_ARG,
                                   NAME ": the restored optimizer state has no %s/%s: the "
                                        "checkpoint does not match the trainable parameters",
                                   st->spec->kind_names[0], name);
            if (!optim_add_slot(st, name, &p->value, err)) return MT_ERR_NOMEM;
            k = (long)st->n_slots - 1;
        }
        optim_slot *s = &st->slots[k];
        if (s->seen == st->pass)
            return host->error(err, MT_ERR_INVALID_ARG, NAME ": parameter '%s' is given twice",
                               name);
        s->seen = st->pass;
        if (!optim_same_shape(s, &p->value))
            return host->error(
                err, MT_ERR_INVALID_ARG,
                NAME ": parameter '%s': its optimizer state has shape %s, the parameter %s", name,
                mt_shape_format(a, sizeof a, s->ndim, s->shape),
                mt_shape_format(b, sizeof b, p->value.ndim, p->value.shape));
        if (st->restoring)
            for (int kind = 0; kind < st->n_kinds; kind++)
                if (!(s->restored & (1u << kind)))
                    return host->error(err, MT_ERR_INVALID_ARG,
                                       NAME ": the restored optimizer state has no %s",
                                       s->names[kind]);
        if ((size_t)k != i) { /* keep slots in parameter order: the next lookup is direct */
            optim_slot tmp = st->slots[i];
            st->slots[i] = st->slots[k];
            st->slots[k] = tmp;
        }
    }
    if (st->restoring)
        for (size_t i = 0; i < st->n_slots; i++)
            if (st->slots[i].seen != st->pass)
                return host->error(err, MT_ERR_INVALID_ARG,
                                   NAME
                                   ": restored state for '%s' belongs to no trainable parameter",
                                   st->slots[i].param);
    if (!count) return MT_OK;
    /* Every allocation and upload before the first update, so that a failure leaves the
     * parameters as they were. */
    const mt_device device = mt_param_at(params, 0)->value.device;
    for (size_t i = 0; i < count; i++) {
        mt_status ms = optim_materialize(st, &st->slots[i], device, err);
        if (ms) return ms;
    }
    if (st->needs_scratch) {
        mt_status ms = optim_scratch_reserve(st, largest ? largest : 1, device, err);
        if (ms) return ms;
    }
    for (size_t i = 0; i < count; i++) {
        mt_param_view *p = mt_param_at(params, i);
        optim_slot *s = &st->slots[i];
        const double wd = p->no_decay ? 0.0 : st->weight_decay;
        mt_tensor scratch = st->scratch; /* viewed in the parameter's shape */
        if (st->needs_scratch) {
            scratch.ndim = p->value.ndim;
            memcpy(scratch.shape, p->value.shape, sizeof scratch.shape);
        }
        st->spec->update(st, s, &p->value, &p->grad, st->needs_scratch ? &scratch : NULL, wd,
                         lr, step);
        s->started = 1;
        s->restored = 0;
    }
    st->restoring = 0;
    /* the queued operations' first failure (a device error) is this step's */
    mt_error e = {0};
    if (host->check(&e))
        return host->error(err, e.status, NAME ": step %lld: %s", (long long)step, e.msg);
    return MT_OK;
}

static size_t optim_state_count(void *state) {
    const optim_state *st = state;
    return st->n_slots * (size_t)st->n_kinds;
}

/* The tensor is a view of this optimizer's own memory, on the parameters' device (or in
 * host memory for state restored before the first step): valid until the next step,
 * state_set or destroy. */
static mt_status optim_state_get(void *state, size_t index, const char **name, mt_tensor *tensor,
                                 mt_error *err) {
    optim_state *st = state;
    if (index >= optim_state_count(st))
        return host->error(err, MT_ERR_INVALID_ARG,
                           NAME ": state index %zu out of range (%zu tensors)", index,
                           optim_state_count(st));
    optim_slot *s = &st->slots[index / (size_t)st->n_kinds];
    int kind = (int)(index % (size_t)st->n_kinds);
    *name = s->names[kind];
    if (s->buf[kind].data) {
        *tensor = s->buf[kind];
        return MT_OK;
    }
    /* Restored before the first step (optim_restore made every kind's host copy), or
     * created by a step that a later check refused: zeros, as the step would make them. */
    if (!s->pending[kind] && !(s->pending[kind] = host->alloc(optim_host_bytes(s))))
        return host->error(err, MT_ERR_NOMEM, NAME ": out of memory for the state '%s'",
                           s->names[kind]);
    memset(tensor, 0, sizeof *tensor);
    tensor->dtype = MT_F32;
    tensor->device = MT_DEVICE_CPU;
    tensor->ndim = s->ndim;
    memcpy(tensor->shape, s->shape, sizeof tensor->shape);
    tensor->data = s->pending[kind];
    return MT_OK;
}

#endif
