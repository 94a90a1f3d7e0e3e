/* lion.c — the Lion optimizer (Chen et al. 2023, "Symbolic Discovery of Optimization
 * Algorithms"), as lucidrains/lion-pytorch implements it.
 *
 * For every parameter p with gradient g at learning rate lr (in fp32):
 *
 *     p *= 1 - lr * wd                        decoupled weight decay (skipped when wd is 0);
 *                                             wd is 0 for parameters marked no_decay
 *     p -= lr * sign(beta1 * m + (1 - beta1) * g)     sign(0) = 0
 *     m  = beta2 * m + (1 - beta2) * g        (state "exp_avg/<param>", zeros at first)
 *
 * The state is created lazily on the first step that sees a parameter, or by state_set
 * when a checkpoint is restored. The step count: Lion does not use it. Restoring: as in
 * adamw.c, state_set may come before or after the first step, and the first step after a
 * restore checks that every parameter got its state and that every restored tensor
 * belongs to a parameter of the same shape. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <moontune/plugin.h>

#define NAME "lion"
#define PARALLEL_MIN 32768 /* elements: smaller parameters are updated by one thread */

static const mt_host *host;

/* ---- options: the defaults, in one place (lion-pytorch's) ---- */

static const mt_option_spec options[] = {
    {"beta1", MT_OPT_FLOAT, "0.9", 0.0, 1.0, NULL,
     "interpolation of momentum and gradient for the update"},
    {"beta2", MT_OPT_FLOAT, "0.99", 0.0, 1.0, NULL, "decay of the momentum"},
    {"weight_decay", MT_OPT_FLOAT, "0", 0.0, 1e300, NULL,
     "decoupled weight decay (0 for no_decay parameters)"},
};

/* ---- state ---- */

enum { EXP_AVG, MAX_KINDS };
static const char *const kind_names[MAX_KINDS] = {"exp_avg"};

typedef struct slot {       /* the state of one parameter */
    char *param;            /* the parameter's name */
    char *names[MAX_KINDS]; /* "exp_avg/<param>": the checkpoint name */
    float *buf[MAX_KINDS];  /* numel floats */
    int ndim;
    int64_t shape[MT_MAX_DIMS];
    int64_t numel;
    unsigned restored; /* bit k: buf[k] came from state_set since the last step */
    uint64_t seen;     /* the step pass that last matched it to a parameter */
} slot;

typedef struct lion {
    double beta1, beta2, weight_decay;
    int n_kinds; /* 1 */
    slot *slots; /* after a step, slots[i] belongs to params[i] */
    size_t n_slots, cap;
    int restoring; /* state_set was called since the last step */
    uint64_t pass; /* counts calls of step */
} lion;

/* ---- the update of one parameter ---- */

static void update(const lion *st, slot *s, float *p, const float *g, double wd, double lr) {
    const int64_t n = s->numel;
    float *m = s->buf[EXP_AVG];
    const float decay = (float)(1.0 - lr * wd), neg_lr = (float)-lr;
    const float b1 = (float)st->beta1, w1 = (float)(1.0 - st->beta1);
    const float b2 = (float)st->beta2, w2 = (float)(1.0 - st->beta2);
    /* element by element, so the result does not depend on the number of threads */
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
    for (int64_t j = 0; j < n; j++) {
        if (wd != 0.0) p[j] *= decay;
        const float c = m[j] * b1 + w1 * g[j];
        const float sign = c != c ? c : (float)((c > 0.0f) - (c < 0.0f)); /* NaN propagates */
        p[j] = p[j] + neg_lr * sign;
        m[j] = m[j] * b2 + w2 * g[j];
    }
}

/* ---- helpers ---- */

/* "a/b" (or "a" when b is NULL) in host memory; NULL when out of memory. */
static char *join(const char *a, const char *b) {
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

static const char *shape_str(char *buf, size_t size, int ndim, const int64_t *shape) {
    size_t len = 0;
    len += (size_t)snprintf(buf, size, "[");
    for (int i = 0; i < ndim && len < size; i++)
        len +=
            (size_t)snprintf(buf + len, size - len, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (len < size) snprintf(buf + len, size - len, "]");
    return buf;
}

static int same_shape(const slot *s, const mt_tensor *t) {
    if (s->ndim != t->ndim) return 0;
    for (int i = 0; i < s->ndim; i++)
        if (s->shape[i] != t->shape[i]) return 0;
    return 1;
}

static int64_t numel_of(const mt_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

static int valid_f32(const mt_tensor *t) {
    if (t->dtype != MT_F32 || t->device != MT_DEVICE_CPU || !t->data) return 0;
    if (t->ndim < 0 || t->ndim > MT_MAX_DIMS) return 0;
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] < 0) return 0;
    return 1;
}

static void slot_free(slot *s) {
    host->free(s->param);
    for (int k = 0; k < MAX_KINDS; k++) {
        host->free(s->names[k]);
        host->free(s->buf[k]);
    }
}

/* Index of the slot of parameter `name`, looking at `hint` first; -1 when none. */
static long find_slot(const lion *st, const char *name, size_t hint) {
    if (hint < st->n_slots && !strcmp(st->slots[hint].param, name)) return (long)hint;
    for (size_t i = 0; i < st->n_slots; i++)
        if (!strcmp(st->slots[i].param, name)) return (long)i;
    return -1;
}

/* Appends zero-filled state for parameter `name` of the given shape; NULL (and err set)
 * when out of memory. */
static slot *add_slot(lion *st, const char *name, const mt_tensor *shape, mt_error *err) {
    if (st->n_slots == st->cap) {
        size_t cap = st->cap ? 2 * st->cap : 16;
        slot *grown = host->alloc(cap * sizeof *grown);
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
    slot *s = &st->slots[st->n_slots];
    memset(s, 0, sizeof *s);
    s->ndim = shape->ndim;
    memcpy(s->shape, shape->shape, sizeof s->shape);
    s->numel = numel_of(shape);
    int ok = (s->param = join(name, NULL)) != NULL;
    for (int k = 0; ok && k < st->n_kinds; k++) {
        s->names[k] = join(kind_names[k], name);
        s->buf[k] = host->alloc((size_t)(s->numel ? s->numel : 1) * sizeof(float));
        ok = s->names[k] && s->buf[k];
    }
    if (!ok) {
        slot_free(s);
        host->error(err, MT_ERR_NOMEM, NAME ": out of memory for the state of '%s' (%lld floats)",
                    name, (long long)s->numel);
        return NULL;
    }
    st->n_slots++;
    return s;
}

/* ---- the vtable ---- */

static mt_status opt_create(const mt_host *h, const mt_options *opts, void **out, mt_error *err) {
    lion *st = h->alloc(sizeof *st);
    if (!st) return h->error(err, MT_ERR_NOMEM, NAME ": out of memory");
    st->beta1 = h->opt_float(opts, "beta1");
    st->beta2 = h->opt_float(opts, "beta2");
    st->weight_decay = h->opt_float(opts, "weight_decay");
    st->n_kinds = 1;
    *out = st;
    return MT_OK;
}

static void opt_destroy(void *state) {
    lion *st = state;
    if (!st) return;
    for (size_t i = 0; i < st->n_slots; i++) slot_free(&st->slots[i]);
    host->free(st->slots);
    host->free(st);
}

/* Checks every parameter, finds or creates its state and moves it to slots[i]; then
 * updates. Nothing is updated when any check fails. */
static mt_status opt_step(void *state, mt_param_view *params, size_t count, double lr, int64_t step,
                          mt_error *err) {
    lion *st = state;
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
        if (!valid_f32(&p->value) || !valid_f32(&p->grad))
            return host->error(
                err, MT_ERR_INVALID_ARG,
                NAME ": parameter '%s': value and gradient must be F32 tensors in CPU memory",
                name);
        if (numel_of(&p->grad) != numel_of(&p->value))
            return host->error(err, MT_ERR_INVALID_ARG,
                               NAME ": parameter '%s': gradient %s does not match value %s", name,
                               shape_str(a, sizeof a, p->grad.ndim, p->grad.shape),
                               shape_str(b, sizeof b, p->value.ndim, p->value.shape));
        long k = find_slot(st, name, i);
        if (k < 0) {
            if (st->restoring)
                return host->error(err, MT_ERR_INVALID_ARG,
                                   NAME ": the restored optimizer state has no %s/%s: the "
                                        "checkpoint does not match the trainable parameters",
                                   kind_names[0], name);
            if (!add_slot(st, name, &p->value, err)) return MT_ERR_NOMEM;
            k = (long)st->n_slots - 1;
        }
        slot *s = &st->slots[k];
        if (s->seen == st->pass)
            return host->error(err, MT_ERR_INVALID_ARG, NAME ": parameter '%s' is given twice",
                               name);
        s->seen = st->pass;
        if (!same_shape(s, &p->value))
            return host->error(
                err, MT_ERR_INVALID_ARG,
                NAME ": parameter '%s': its optimizer state has shape %s, the parameter %s", name,
                shape_str(a, sizeof a, s->ndim, s->shape),
                shape_str(b, sizeof b, p->value.ndim, p->value.shape));
        if (st->restoring)
            for (int kind = 0; kind < st->n_kinds; kind++)
                if (!(s->restored & (1u << kind)))
                    return host->error(err, MT_ERR_INVALID_ARG,
                                       NAME ": the restored optimizer state has no %s",
                                       s->names[kind]);
        if ((size_t)k != i) { /* keep slots in parameter order: the next lookup is direct */
            slot tmp = st->slots[i];
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
        const double wd = params[i].no_decay ? 0.0 : st->weight_decay;
        update(st, &st->slots[i], params[i].value.data, params[i].grad.data, wd, lr);
        st->slots[i].restored = 0;
    }
    st->restoring = 0;
    return MT_OK;
}

static size_t opt_state_count(void *state) {
    const lion *st = state;
    return st->n_slots * (size_t)st->n_kinds;
}

/* The tensor is a view of this optimizer's own memory: valid until the next step,
 * state_set or destroy. */
static mt_status opt_state_get(void *state, size_t index, const char **name, mt_tensor *tensor,
                               mt_error *err) {
    lion *st = state;
    if (index >= opt_state_count(st))
        return host->error(err, MT_ERR_INVALID_ARG,
                           NAME ": state index %zu out of range (%zu tensors)", index,
                           opt_state_count(st));
    slot *s = &st->slots[index / (size_t)st->n_kinds];
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

static mt_status opt_state_set(void *state, const char *name, const mt_tensor *tensor,
                               mt_error *err) {
    lion *st = state;
    char a[96], b[96];
    const char *slash = name ? strchr(name, '/') : NULL;
    int kind = -1;
    for (int k = 0; slash && k < MAX_KINDS; k++)
        if ((size_t)(slash - name) == strlen(kind_names[k]) &&
            !strncmp(name, kind_names[k], (size_t)(slash - name)))
            kind = k;
    if (kind < 0)
        return host->error(err, MT_ERR_INVALID_ARG,
                           NAME ": unknown state '%s': expected exp_avg/<param>",
                           name ? name : "(null)");
    if (!valid_f32(tensor))
        return host->error(err, MT_ERR_INVALID_ARG,
                           NAME ": state '%s' must be an F32 tensor in CPU memory", name);
    const char *param = slash + 1;
    long k = find_slot(st, param, 0);
    if (k < 0 && st->pass > 0)
        return host->error(err, MT_ERR_INVALID_ARG,
                           NAME ": state '%s': there is no trainable parameter named '%s'", name,
                           param);
    slot *s = k >= 0 ? &st->slots[k] : add_slot(st, param, tensor, err);
    if (!s) return MT_ERR_NOMEM;
    if (!same_shape(s, tensor))
        return host->error(err, MT_ERR_INVALID_ARG,
                           NAME ": state '%s': expected shape %s, found %s", name,
                           shape_str(a, sizeof a, s->ndim, s->shape),
                           shape_str(b, sizeof b, tensor->ndim, tensor->shape));
    memcpy(s->buf[kind], tensor->data, (size_t)s->numel * sizeof(float));
    s->restored |= 1u << kind;
    st->restoring = 1;
    return MT_OK;
}

static const mt_optimizer_vtable vtable = {
    .create = opt_create,
    .destroy = opt_destroy,
    .step = opt_step,
    .state_count = opt_state_count,
    .state_get = opt_state_get,
    .state_set = opt_state_set,
};

static const mt_plugin_descriptor descriptor = {
    .abi_version = MT_PLUGIN_ABI_VERSION,
    .kind = MT_PLUGIN_OPTIMIZER,
    .name = NAME,
    .version = "1.0.0",
    .description =
        "Lion: the sign of interpolated momentum, decoupled weight decay (Chen et al. 2023)",
    .options = options,
    .n_options = sizeof options / sizeof options[0],
    .vtable = &vtable,
};

MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entry(const mt_host *h) {
    host = h;
    return &descriptor;
}
