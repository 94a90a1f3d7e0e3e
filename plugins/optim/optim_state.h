/* optim_state.h — the per-parameter state that the optimizer plugins (adamw.c, sgd.c,
 * lion.c) share, compiled into each of them: every function here is static.
 *
 * An optimizer keeps, for every parameter, up to OPTIM_MAX_KINDS fp32 buffers of the
 * parameter's shape ("kinds": adamw's exp_avg and exp_avg_sq, sgd's momentum_buffer, ...),
 * named "<kind>/<param>" in a checkpoint. The state is created lazily (zeros, the shape
 * of the parameter) on the first step that sees a parameter, or by state_set when a
 * checkpoint is restored.
 *
 * Restoring: state_set may come before the first step (state is created from the
 * tensor's name and shape) or after it (the state must already exist). The first step
 * after a restore checks that every parameter got all of its state and that every
 * restored tensor belongs to a parameter of the same shape, and refuses otherwise.
 *
 * How to use it: define NAME (the plugin's name, which starts every message) and
 * `static const mt_host *host;` (set by moontune_plugin_entry), then include this file.
 * The plugin's state struct begins with an optim_state, whose spec names the kinds and
 * the update of one parameter; optim_destroy, optim_step, optim_state_count and
 * optim_state_get go into the vtable as they are, and the plugin's state_set, which
 * words its own refusals of unknown names, ends in optim_restore. */
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
    float *buf[OPTIM_MAX_KINDS];  /* numel floats each */
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
    /* Updates parameter p (gradient g, numel s->numel) with its state s. `self` is the
     * plugin's state; wd is its weight_decay, or 0 for parameters marked no_decay. */
    void (*update)(const void *self, optim_slot *s, float *p, const float *g, double wd,
                   double lr, int64_t step);
} optim_spec;

typedef struct optim_state { /* the first member of an optimizer's state */
    const optim_spec *spec;
    int n_kinds;         /* the kinds in use: the first n_kinds of spec->kind_names */
    double weight_decay; /* for parameters not marked no_decay; the update applies it */
    optim_slot *slots;   /* after a step, slots[i] belongs to params[i] */
    size_t n_slots, cap;
    int restoring; /* state_set was called since the last step */
    uint64_t pass; /* counts calls of step */
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

static int optim_same_shape(const optim_slot *s, const mt_tensor *t) {
    if (s->ndim != t->ndim) return 0;
    for (int i = 0; i < s->ndim; i++)
        if (s->shape[i] != t->shape[i]) return 0;
    return 1;
}

static int64_t optim_numel(const mt_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

static int optim_valid_f32(const mt_tensor *t) {
    if (t->dtype != MT_F32 || t->device != MT_DEVICE_CPU || !t->data) return 0;
    if (t->ndim < 0 || t->ndim > MT_MAX_DIMS) return 0;
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] < 0) return 0;
    return 1;
}

static void optim_slot_free(optim_slot *s) {
    host->free(s->param);
    for (int k = 0; k < OPTIM_MAX_KINDS; k++) {
        host->free(s->names[k]);
        host->free(s->buf[k]);
    }
}

/* Index of the slot of parameter `name`, looking at `hint` first; -1 when none. */
static long optim_find_slot(const optim_state *st, const char *name, size_t hint) {
    if (hint < st->n_slots && !strcmp(st->slots[hint].param, name)) return (long)hint;
    for (size_t i = 0; i < st->n_slots; i++)
        if (!strcmp(st->slots[i].param, name)) return (long)i;
    return -1;
}

/* Appends zero-filled state for parameter `name` of the given shape; NULL (and err set)
 * when out of memory. */
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
    s->numel = optim_numel(shape);
    int ok = (s->param = optim_join(name, NULL)) != NULL;
    for (int k = 0; ok && k < st->n_kinds; k++) {
        s->names[k] = optim_join(st->spec->kind_names[k], name);
        s->buf[k] = host->alloc((size_t)(s->numel ? s->numel : 1) * sizeof(float));
        ok = s->names[k] && s->buf[k];
    }
    if (!ok) {
        optim_slot_free(s);
        host->error(err, MT_ERR_NOMEM, NAME ": out of memory for the state of '%s' (%lld floats)",
                    name, (long long)s->numel);
        return NULL;
    }
    st->n_slots++;
    return s;
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
 * use): copies the tensor into the state of its parameter, creating that before the first
 * step. */
static mt_status optim_restore(void *state, const char *name, int kind, const mt_tensor *tensor,
                               mt_error *err) {
    optim_state *st = state;
    char a[96], b[96];
    if (!optim_valid_f32(tensor))
        return host->error(err, MT_ERR_INVALID_ARG,
                           NAME ": state '%s' must be an F32 tensor in CPU memory", name);
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
    memcpy(s->buf[kind], tensor->data, (size_t)s->numel * sizeof(float));
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
    host->free(st->slots);
    host->free(st);
}

/* Checks every parameter, finds or creates its state and moves it to slots[i]; then
 * updates. Nothing is updated when any check fails. */
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
    st->pass++;
    for (size_t i = 0; i < count; i++) {
        const mt_param_view *p = &params[i];
        const char *name = p->name ? p->name : "";
        if (!optim_valid_f32(&p->value) || !optim_valid_f32(&p->grad))
            return host->error(
                err, MT_ERR_INVALID_ARG,
                NAME ": parameter '%s': value and gradient must be F32 tensors in CPU memory",
                name);
        if (optim_numel(&p->grad) != optim_numel(&p->value))
            return host->error(err, MT_ERR_INVALID_ARG,
                               NAME ": parameter '%s': gradient %s does not match value %s", name,
                               mt_shape_format(a, sizeof a, p->grad.ndim, p->grad.shape),
                               mt_shape_format(b, sizeof b, p->value.ndim, p->value.shape));
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
    for (size_t i = 0; i < count; i++) {
        optim_slot *s = &st->slots[i];
        const double wd = params[i].no_decay ? 0.0 : st->weight_decay;
        st->spec->update(st, s, params[i].value.data, params[i].grad.data, wd, lr, step);
        s->started = 1;
        s->restored = 0;
    }
    st->restoring = 0;
    return MT_OK;
}

static size_t optim_state_count(void *state) {
    const optim_state *st = state;
    return st->n_slots * (size_t)st->n_kinds;
}

/* The tensor is a view of this optimizer's own memory: valid until the next step,
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
    memset(tensor, 0, sizeof *tensor);
    tensor->dtype = MT_F32;
    tensor->device = MT_DEVICE_CPU;
    tensor->ndim = s->ndim;
    memcpy(tensor->shape, s->shape, sizeof tensor->shape);
    tensor->data = s->buf[kind];
    return MT_OK;
}

#endif
