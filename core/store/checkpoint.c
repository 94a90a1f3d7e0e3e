/* checkpoint.c — training checkpoints (layout and guarantees in checkpoint.h).
 *
 * Save: the trainable tensors and the optimizer state go to two safetensors files, the
 * recipe text to recipe.lua, all inside <run_dir>/checkpoints/.tmp-step-N/; each file is
 * fsync'd as it is written (mt_st_write and mt_write_file_atomic do that), then hashed
 * from disk. state.json records the scalar state and each file's size and SHA-256;
 * state.json.sha256 records state.json's own. The directory is fsync'd, renamed to
 * step-N, and the parent fsync'd: the rename is the commit point.
 *
 * Load: state.json.sha256 first, then state.json (format, version, keys and types),
 * then every file's size and checksum, then the safetensors headers against the model's
 * trainable parameters. Only when all of that holds does anything get written: the
 * optimizer state first (a plugin's refusal then leaves the model untouched), then the
 * weights. */
#include "store/checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/internal.h"
#include "dist/dist.h"
#include "plugin/options.h"
#include "formats/safetensors.h"
#include "model/device.h"
#include "model/train.h"

#define WEIGHTS_FILE "weights.safetensors"
#define OPTIMIZER_FILE "optimizer.safetensors"
#define PLUGIN_STATE_FILE "plugin_state.safetensors"
#define RECIPE_FILE "recipe.lua"
#define STATE_FILE "state.json"
#define STATE_SUM_FILE "state.json.sha256"
#define CKPT_SUBDIR "checkpoints"
#define TMP_PREFIX ".tmp-"

static const char *const data_files[] = {WEIGHTS_FILE, OPTIMIZER_FILE, RECIPE_FILE,
                                         PLUGIN_STATE_FILE};
enum { N_DATA_FILES = 4 };
/* The data files a checkpoint of a format version has: plugin_state came with 4. */
static int data_files_of(int64_t format_version) { return format_version >= 4 ? 4 : 3; }

/* ---- the scalar state -------------------------------------------------------- */

void mt_ckpt_state_clear(mt_ckpt_state *s) {
    if (!s) return;
    free((void *)s->recipe); /* only load allocates: a caller's own struct is never cleared */
    free((void *)s->run);
    free((void *)s->trainer);
    for (int i = 0; i < s->n_plugins && i < MT_CKPT_MAX_PLUGINS; i++) free(s->plugins[i].options);
    memset(s, 0, sizeof *s);
}

mt_status mt_ckpt_state_set_metric(mt_ckpt_state *s, const char *name, double value,
                                   mt_error *err) {
    if (!name || !*name || strlen(name) >= sizeof s->metrics[0].name)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "checkpoint metric name '%s' must have 1 to %zu characters",
                            name ? name : "(null)", sizeof s->metrics[0].name - 1);
    for (int i = 0; i < s->n_metrics; i++)
        if (!strcmp(s->metrics[i].name, name)) {
            s->metrics[i].value = value;
            return MT_OK;
        }
    if (s->n_metrics >= MT_CKPT_MAX_METRICS)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "checkpoint metric '%s': at most %d metrics are kept", name,
                            MT_CKPT_MAX_METRICS);
    mt_ckpt_metric *m = &s->metrics[s->n_metrics++];
    snprintf(m->name, sizeof m->name, "%s", name);
    m->value = value;
    return MT_OK;
}

int mt_ckpt_state_get_metric(const mt_ckpt_state *s, const char *name, double *value) {
    for (int i = 0; i < s->n_metrics; i++)
        if (!strcmp(s->metrics[i].name, name)) {
            *value = s->metrics[i].value;
            return 1;
        }
    return 0;
}

static mt_status put_plugin(mt_ckpt_state *s, const char *kind, const char *name,
                            const char *version, mt_error *err) {
    mt_ckpt_plugin tmp;
    if (!kind || !name || !version || strlen(kind) >= sizeof tmp.kind ||
        strlen(name) >= sizeof tmp.name || strlen(version) >= sizeof tmp.version || !*kind)
        return mt_error_set(
            err, MT_ERR_INVALID_ARG, "checkpoint plugin entry '%s' '%s' '%s': empty or too long",
            kind ? kind : "(null)", name ? name : "(null)", version ? version : "(null)");
    int i = 0;
    while (i < s->n_plugins && strcmp(s->plugins[i].kind, kind))
        i++;
    if (i == s->n_plugins) {
        if (s->n_plugins >= MT_CKPT_MAX_PLUGINS)
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "checkpoint: at most %d plugins are recorded", MT_CKPT_MAX_PLUGINS);
        s->n_plugins++;
    }
    snprintf(s->plugins[i].kind, sizeof s->plugins[i].kind, "%s", kind);
    snprintf(s->plugins[i].name, sizeof s->plugins[i].name, "%s", name);
    snprintf(s->plugins[i].version, sizeof s->plugins[i].version, "%s", version);
    return MT_OK;
}

mt_status mt_ckpt_state_add_plugin(mt_ckpt_state *s, const mt_plugin_instance *inst,
                                   mt_error *err) {
    if (!inst || !inst->desc)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "checkpoint: plugin instance is NULL");
    const char *kind = mt_plugin_kind_name(inst->desc->kind);
    mt_status st = put_plugin(s, kind ? kind : "", inst->desc->name, inst->desc->version, err);
    if (st) return st;
    for (int i = 0; i < s->n_plugins; i++)
        if (!strcmp(s->plugins[i].kind, kind ? kind : "")) s->plugins[i].instance = inst;
    return MT_OK;
}

/* ---- files and directories ------------------------------------------------------- */

static mt_status fsync_dir(const char *dir, mt_error *err) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0)
        return mt_error_set(err, MT_ERR_IO, "%s: cannot open directory: %s", dir, strerror(errno));
    int rc = fsync(fd);
    int e = errno;
    close(fd);
    /* some file systems refuse fsync on a directory; that is no failure of ours */
    if (rc != 0 && e != EINVAL && e != EROFS)
        return mt_error_set(err, MT_ERR_IO, "%s: fsync failed: %s", dir, strerror(e));
    return MT_OK;
}

static mt_status make_dir(const char *dir, mt_error *err) {
    struct stat sb;
    if (mkdir(dir, 0755) == 0) return MT_OK;
    if (errno == EEXIST && stat(dir, &sb) == 0 && S_ISDIR(sb.st_mode)) return MT_OK;
    return mt_error_set(err, MT_ERR_IO, "%s: cannot create directory: %s", dir,
                        strerror(errno == EEXIST ? ENOTDIR : errno));
}

/* rm -r without following symbolic links */
static mt_status remove_tree(const char *path, mt_error *err) {
    struct stat sb;
    if (lstat(path, &sb) != 0) {
        if (errno == ENOENT) return MT_OK;
        return mt_error_set(err, MT_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    }
    if (S_ISDIR(sb.st_mode)) {
        DIR *d = opendir(path);
        if (!d)
            return mt_error_set(err, MT_ERR_IO, "%s: cannot open directory: %s", path,
                                strerror(errno));
        struct dirent *e;
        mt_status st = MT_OK;
        while (st == MT_OK && (e = readdir(d)) != NULL) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            char *child = mt_path_join(path, e->d_name, err);
            if (!child) {
                st = MT_ERR_NOMEM;
                break;
            }
            st = remove_tree(child, err);
            free(child);
        }
        closedir(d);
        if (st) return st;
        if (rmdir(path) != 0)
            return mt_error_set(err, MT_ERR_IO, "%s: cannot remove directory: %s", path,
                                strerror(errno));
        return MT_OK;
    }
    if (unlink(path) != 0)
        return mt_error_set(err, MT_ERR_IO, "%s: cannot remove: %s", path, strerror(errno));
    return MT_OK;
}

/* "step-<digits>" -> step; -1 for any other name */
static int64_t parse_step_name(const char *name) {
    if (strncmp(name, "step-", 5) != 0) return -1;
    const char *p = name + 5;
    size_t n = strlen(p);
    if (n == 0 || n > 18) return -1;
    int64_t v = 0;
    for (; *p; p++) {
        if (*p < '0' || *p > '9') return -1;
        v = v * 10 + (*p - '0');
    }
    return v;
}

typedef struct ckpt_entry {
    int64_t step;
    char *path;
} ckpt_entry;

static int cmp_entry(const void *a, const void *b) {
    const ckpt_entry *x = a, *y = b;
    return x->step < y->step ? -1 : x->step > y->step;
}

static void free_entries(ckpt_entry *v, size_t n) {
    for (size_t i = 0; i < n; i++)
        free(v[i].path);
    free(v);
}

/* The complete checkpoints in dir (step-N directories holding state.json), sorted by
 * step. A missing dir gives none. */
static mt_status list_checkpoints(const char *dir, ckpt_entry **out, size_t *count, mt_error *err) {
    *out = NULL;
    *count = 0;
    DIR *d = opendir(dir);
    if (!d) {
        if (errno == ENOENT) return MT_OK;
        return mt_error_set(err, MT_ERR_IO, "%s: cannot open directory: %s", dir, strerror(errno));
    }
    ckpt_entry *v = NULL;
    size_t n = 0, cap = 0;
    mt_status st = MT_OK;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        int64_t step = parse_step_name(e->d_name);
        if (step < 0) continue;
        char *path = mt_path_join(dir, e->d_name, err);
        char *state = path ? mt_path_join(path, STATE_FILE, err) : NULL;
        if (!state) {
            free(path);
            st = MT_ERR_NOMEM;
            break;
        }
        struct stat sb;
        int complete = stat(state, &sb) == 0 && S_ISREG(sb.st_mode);
        free(state);
        if (!complete) {
            free(path);
            continue;
        }
        if (n == cap) {
            size_t ncap = cap ? 2 * cap : 16;
            ckpt_entry *grown = realloc(v, ncap * sizeof *grown);
            if (!grown) {
                free(path);
                st = mt_error_set(err, MT_ERR_NOMEM, "out of memory listing %s", dir);
                break;
            }
            v = grown;
            cap = ncap;
        }
        v[n].step = step;
        v[n].path = path;
        n++;
    }
    closedir(d);
    if (st) {
        free_entries(v, n);
        return st;
    }
    if (n > 1) qsort(v, n, sizeof *v, cmp_entry);
    *out = v;
    *count = n;
    return MT_OK;
}

/* Removes every .tmp-* entry of the checkpoints directory: the remains of an
 * interrupted save or prune. */
static mt_status remove_leftovers(const char *dir, mt_error *err) {
    DIR *d = opendir(dir);
    if (!d)
        return mt_error_set(err, MT_ERR_IO, "%s: cannot open directory: %s", dir, strerror(errno));
    mt_status st = MT_OK;
    struct dirent *e;
    while (st == MT_OK && (e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, TMP_PREFIX, strlen(TMP_PREFIX)) != 0) continue;
        char *path = mt_path_join(dir, e->d_name, err);
        if (!path) {
            st = MT_ERR_NOMEM;
            break;
        }
        st = remove_tree(path, err);
        free(path);
    }
    closedir(d);
    return st;
}

/* ---- JSON helpers ------------------------------------------------------------------ */

/* A double as JSON: a number when finite, else "nan", "inf" or "-inf". */
static json_t *json_double(double v) {
    if (isfinite(v)) return json_real(v);
    return json_string(isnan(v) ? "nan" : v > 0 ? "inf" : "-inf");
}

static int json_get_double(const json_t *j, double *v) {
    if (json_is_number(j)) {
        *v = json_number_value(j);
        return 1;
    }
    const char *s = json_string_value(j);
    if (!s) return 0;
    if (!strcmp(s, "nan"))
        *v = NAN;
    else if (!strcmp(s, "inf"))
        *v = INFINITY;
    else if (!strcmp(s, "-inf"))
        *v = -INFINITY;
    else
        return 0;
    return 1;
}

static json_t *json_u64_string(uint64_t v) {
    char buf[32];
    snprintf(buf, sizeof buf, "%" PRIu64, v);
    return json_string(buf);
}

static int parse_u64(const char *s, uint64_t *v) {
    if (!s || !*s) return 0;
    uint64_t x = 0;
    for (const char *p = s; *p; p++) {
        if (*p < '0' || *p > '9') return 0;
        unsigned d = (unsigned)(*p - '0');
        if (x > (UINT64_MAX - d) / 10) return 0;
        x = x * 10 + d;
    }
    *v = x;
    return 1;
}

static int is_hex64(const char *s) {
    if (!s || strlen(s) != 64) return 0;
    for (const char *p = s; *p; p++)
        if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f'))) return 0;
    return 1;
}

/* ---- save ----------------------------------------------------------------------------- */

typedef struct file_sum {
    uint64_t bytes;
    char sha256[MT_SHA256_HEX];
} file_sum;

/* Host copies of tensors that live on a device; freed after writing. */
typedef struct host_copies {
    void **ptr;
    size_t n;
} host_copies;

static void host_copies_free(host_copies *h) {
    for (size_t i = 0; i < h->n; i++)
        free(h->ptr[i]);
    free(h->ptr);
}

static mt_status check_shape(const char *what, const char *name, const mt_tensor *t,
                             mt_error *err) {
    if (t->dtype != MT_F32 || !t->data || t->ndim < 0 || t->ndim > MT_MAX_DIMS)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "checkpoint: %s '%s' must be an F32 tensor with data", what, name);
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] < 0)
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "checkpoint: %s '%s' has a negative dimension", what, name);
    return MT_OK;
}

static mt_status write_weights(const char *path, mt_model *model, mt_error *err) {
    mt_param_view *params = NULL;
    size_t n = 0;
    mt_status st = mt_model_trainable_params(model, &params, &n, err);
    if (st) return st;
    mt_st_entry *entries = mt_calloc(n ? n : 1, sizeof *entries, "checkpoint weight list", err);
    host_copies copies = {mt_calloc(n ? n : 1, sizeof(void *), "checkpoint host copies", err), 0};
    if (!entries || !copies.ptr) {
        st = MT_ERR_NOMEM;
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        const mt_tensor *t = &params[i].value;
        if ((st = check_shape("parameter", params[i].name, t, err))) goto done;
        entries[i].name = params[i].name;
        entries[i].dtype = MT_ST_F32;
        entries[i].ndim = t->ndim;
        memcpy(entries[i].shape, t->shape, sizeof entries[i].shape);
        entries[i].data = t->data;
        if (t->device != MT_DEVICE_CPU) { /* parameters on a device: through the backend */
            size_t bytes = mt_tensor_nbytes(t);
            void *h = mt_malloc(bytes, params[i].name, err);
            if (!h) {
                st = MT_ERR_NOMEM;
                goto done;
            }
            copies.ptr[copies.n++] = h;
            if ((st = model->be->ops->download(model->be, h, t->data, bytes))) {
                mt_error_set(err, st, "checkpoint: cannot copy parameter '%s' from the device",
                             params[i].name);
                goto done;
            }
            entries[i].data = h;
        }
    }
    {
        const char *const meta[] = {"format", MT_CKPT_FORMAT, "content", "weights", NULL};
        st = mt_st_write(path, entries, n, meta, err);
    }
done:
    host_copies_free(&copies);
    free(entries);
    free(params);
    return st;
}

/* The state tensors of the attached adapters ("adapter<i>/<name>", i in attach order)
 * and of the loss ("loss/<name>"), in host memory: what makes a resumed run draw the same
 * random numbers (LoRA's dropout passes). */
typedef struct plugin_states {
    mt_st_entry *entries;
    char **names;
    host_copies copies;
    size_t n, cap;
} plugin_states;

static void plugin_states_free(plugin_states *ps) {
    for (size_t i = 0; i < ps->n; i++) free(ps->names[i]);
    free(ps->names);
    free(ps->entries);
    host_copies_free(&ps->copies);
}

static mt_status plugin_states_add(plugin_states *ps, const char *prefix, size_t count,
                                   mt_status (*get)(void *, size_t, const char **, mt_tensor *,
                                                    mt_error *),
                                   void *state, mt_error *err) {
    for (size_t i = 0; i < count; i++) {
        if (ps->n == ps->cap) {
            size_t cap = ps->cap ? 2 * ps->cap : 8;
            mt_st_entry *e = realloc(ps->entries, cap * sizeof *e);
            if (e) ps->entries = e;
            char **nm = e ? realloc(ps->names, cap * sizeof *nm) : NULL;
            if (nm) ps->names = nm;
            void **cp = nm ? realloc(ps->copies.ptr, cap * sizeof *cp) : NULL;
            if (!cp) return mt_error_set(err, MT_ERR_NOMEM, "checkpoint: out of memory for plugin state");
            ps->copies.ptr = cp;
            ps->cap = cap;
        }
        const char *name = NULL;
        mt_tensor t;
        mt_status st = get(state, i, &name, &t, err);
        if (st) return st;
        if (!name || !*name || t.ndim < 0 || t.ndim > MT_MAX_DIMS || !mt_dtype_size(t.dtype) ||
            (!t.data && mt_tensor_numel(&t)))
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "checkpoint: %s state tensor %zu has no name, no data or an "
                                "invalid shape",
                                prefix, i);
        static const mt_st_dtype st_dtype[MT_DTYPE_COUNT] = {
            [MT_F32] = MT_ST_F32, [MT_F16] = MT_ST_F16, [MT_BF16] = MT_ST_BF16,
            [MT_I32] = MT_ST_I32, [MT_I64] = MT_ST_I64, [MT_U8] = MT_ST_U8};
        size_t len = strlen(prefix) + strlen(name) + 2, bytes = mt_tensor_nbytes(&t);
        char *full = mt_malloc(len, "plugin state name", err);
        if (!full) return MT_ERR_NOMEM;
        snprintf(full, len, "%s/%s", prefix, name);
        ps->names[ps->n] = full;
        void *host = mt_malloc(bytes ? bytes : 1, full, err); /* a snapshot: views may move */
        ps->copies.ptr[ps->copies.n++] = host;
        mt_st_entry *e = &ps->entries[ps->n++];
        memset(e, 0, sizeof *e);
        if (!host) return MT_ERR_NOMEM;
        if ((st = mt_device_download(host, &t, err))) return st;
        e->name = full;
        e->dtype = st_dtype[t.dtype];
        e->ndim = t.ndim;
        memcpy(e->shape, t.shape, sizeof e->shape);
        e->data = host;
    }
    return MT_OK;
}

static mt_status write_plugin_state(const char *path, mt_model *model, mt_plugin_instance *loss,
                                    mt_error *err) {
    plugin_states ps = {0};
    mt_status st = MT_OK;
    for (size_t i = 0; !st && i < model->num_adapters; i++) {
        const mt_adapter_vtable *vt = model->adapters[i].vtable;
        if (!MT_VTABLE_HAS(mt_adapter_vtable, vt, state_count)) continue;
        char prefix[32];
        snprintf(prefix, sizeof prefix, "adapter%zu", i);
        st = plugin_states_add(&ps, prefix, vt->state_count(model->adapters[i].state),
                               vt->state_get, model->adapters[i].state, err);
    }
    if (!st && loss) {
        const mt_loss_vtable *vt = loss->desc->vtable;
        if (MT_VTABLE_HAS(mt_loss_vtable, vt, state_count))
            st = plugin_states_add(&ps, "loss", vt->state_count(loss->state), vt->state_get,
                                   loss->state, err);
    }
    if (!st) {
        const char *const meta[] = {"format", MT_CKPT_FORMAT, "content", "plugin state", NULL};
        st = mt_st_write(path, ps.entries, ps.n, meta, err);
    }
    plugin_states_free(&ps);
    return st;
}

/* Hands each tensor of plugin_state.safetensors to the adapter or loss it came from. */
static mt_status restore_plugin_state(const char *path, mt_model *model, mt_plugin_instance *loss,
                                      mt_error *err) {
    mt_safetensors *file = NULL;
    mt_status st = mt_st_open(path, &file, err);
    for (size_t k = 0; !st && k < mt_st_count(file); k++) {
        const mt_st_tensor *t = mt_st_at(file, k);
        const char *slash = strchr(t->name, '/');
        static const mt_dtype dtypes[MT_ST_DTYPE_COUNT] = {
            [MT_ST_F32] = MT_F32, [MT_ST_F16] = MT_F16, [MT_ST_BF16] = MT_BF16,
            [MT_ST_I32] = MT_I32, [MT_ST_I64] = MT_I64, [MT_ST_U8] = MT_U8};
        mt_tensor view = {.dtype = dtypes[t->dtype], .device = MT_DEVICE_CPU, .ndim = t->ndim,
                          .data = (void *)t->data};
        memcpy(view.shape, t->shape, sizeof view.shape);
        unsigned long index = 0;
        int n = 0;
        mt_status (*set)(void *, const char *, const mt_tensor *, mt_error *) = NULL;
        void *state = NULL;
        if (slash && sscanf(t->name, "adapter%lu/%n", &index, &n) == 1 && n == slash - t->name + 1 &&
            index < model->num_adapters &&
            MT_VTABLE_HAS(mt_adapter_vtable, model->adapters[index].vtable, state_set)) {
            set = model->adapters[index].vtable->state_set;
            state = model->adapters[index].state;
        } else if (slash && loss && !strncmp(t->name, "loss/", 5) &&
                   MT_VTABLE_HAS(mt_loss_vtable, (const mt_loss_vtable *)loss->desc->vtable,
                                 state_set)) {
            set = ((const mt_loss_vtable *)loss->desc->vtable)->state_set;
            state = loss->state;
        }
        if (!set) {
            if (!strncmp(t->name, "loss/", 5) && !loss) continue; /* the caller gave no loss */
            st = mt_error_set(err, MT_ERR_FORMAT,
                              "%s: state tensor '%s' belongs to no attached adapter or loss that "
                              "keeps state: the checkpoint was written with other plugins",
                              path, t->name);
        } else if (t->dtype >= MT_ST_DTYPE_COUNT || (view.dtype == MT_F32 && t->dtype != MT_ST_F32)) {
            st = mt_error_set(err, MT_ERR_FORMAT, "%s: state tensor '%s' has an unsupported dtype",
                              path, t->name);
        } else if ((st = set(state, slash + 1, &view, err))) {
            char msg[MT_ERROR_MSG_MAX];
            snprintf(msg, sizeof msg, "%s", err ? err->msg : "");
            mt_error_set(err, st, "%s: %s", path, msg);
        }
    }
    mt_st_close(file);
    return st;
}

/* ---- a sharded optimizer's state (ZeRO-1), gathered on rank 0 --------------------------
 *
 * Each rank keeps the optimizer state of the parameters it owns. A checkpoint holds the
 * whole state, as one process would have written it: every rank serialises its tensors
 * (name, shape, F32 values; records padded to 8 bytes), rank 0 receives them in rank
 * order, which is parameter order, and writes one optimizer.safetensors. A checkpoint
 * so written resumes with any number of ranks, sharded or not. */
typedef struct gathered_state {
    void *bytes;
    size_t *sizes;
    mt_st_entry *entries;
    size_t n;
} gathered_state;

static void gathered_free(gathered_state *g) {
    free(g->bytes);
    free(g->sizes);
    free(g->entries);
    memset(g, 0, sizeof *g);
}

static size_t pad8(size_t n) { return (n + 7) & ~(size_t)7; }

/* Appends n zero bytes. */
static void put_zeros(mt_bytebuf *out, size_t n) {
    static const char zeros[8] = {0};
    while (n > 0) {
        size_t k = n < sizeof zeros ? n : sizeof zeros;
        mt_bytebuf_put(out, zeros, k);
        n -= k;
    }
}

/* The optimizer's state as safetensors entries in host memory: views of its own memory
 * on the CPU, copies (kept in *copies) of state on a device. */
static mt_status optimizer_entries(mt_plugin_instance *optimizer, mt_st_entry **out, size_t *count,
                                   host_copies *copies, mt_error *err) {
    const mt_optimizer_vtable *vt = optimizer ? optimizer->desc->vtable : NULL;
    size_t n = vt ? vt->state_count(optimizer->state) : 0;
    mt_st_entry *entries = mt_calloc(n ? n : 1, sizeof *entries, "checkpoint optimizer list", err);
    copies->ptr = mt_calloc(n ? n : 1, sizeof(void *), "checkpoint host copies", err);
    copies->n = 0;
    *out = entries;
    *count = 0;
    if (!entries || !copies->ptr) return MT_ERR_NOMEM;
    for (size_t i = 0; i < n; i++) {
        const char *name = NULL;
        mt_tensor t;
        mt_status st = vt->state_get(optimizer->state, i, &name, &t, err);
        if (st) return st;
        if (!name)
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "checkpoint: optimizer %s gave no name for state tensor %zu",
                                optimizer->desc->name, i);
        if ((st = check_shape("optimizer state", name, &t, err))) return st;
        entries[i].name = name;
        entries[i].dtype = MT_ST_F32;
        entries[i].ndim = t.ndim;
        memcpy(entries[i].shape, t.shape, sizeof entries[i].shape);
        entries[i].data = t.data;
        if (t.device != MT_DEVICE_CPU) { /* state on a device: a host copy to write */
            void *h = mt_malloc(mt_tensor_nbytes(&t) ? mt_tensor_nbytes(&t) : 1, name, err);
            if (!h) return MT_ERR_NOMEM;
            copies->ptr[copies->n++] = h;
            entries[i].data = h;
            if ((st = mt_device_download(h, &t, err))) return st;
        }
        *count = i + 1;
    }
    return MT_OK;
}

static mt_status serialise_optimizer(mt_plugin_instance *optimizer, mt_bytebuf *out, mt_error *err) {
    mt_st_entry *entries;
    size_t n;
    host_copies copies;
    mt_status st = optimizer_entries(optimizer, &entries, &n, &copies, err);
    for (size_t i = 0; !st && i < n; i++) {
        const mt_st_entry *e = &entries[i];
        /* name length, ndim and shape (uint64 each); the name NUL-padded to 8; the values */
        uint64_t head[2 + MT_MAX_DIMS] = {strlen(e->name), (uint64_t)e->ndim};
        size_t bytes = sizeof(float);
        for (int d = 0; d < e->ndim; d++) {
            head[2 + d] = (uint64_t)e->shape[d];
            bytes *= (size_t)e->shape[d];
        }
        mt_bytebuf_put(out, head, sizeof head);
        mt_bytebuf_put(out, e->name, head[0]);
        put_zeros(out, pad8(head[0] + 1) - head[0]);
        mt_bytebuf_put(out, e->data, bytes);
        put_zeros(out, pad8(bytes) - bytes);
    }
    host_copies_free(&copies);
    free(entries);
    if (!st && out->oom)
        st = mt_error_set(err, MT_ERR_NOMEM, "checkpoint: out of memory serialising the optimizer state");
    return st;
}

/* The gathered records as entries of one safetensors file (rank 0). */
static mt_status parse_gathered(gathered_state *g, mt_error *err) {
    size_t total = 0, cap = 0;
    for (int r = 0; r < mt_dist_size(); r++) total += g->sizes[r];
    const char *p = g->bytes, *end = p + total;
    while (p < end) {
        uint64_t head[2 + MT_MAX_DIMS];
        if ((size_t)(end - p) < sizeof head) goto bad;
        memcpy(head, p, sizeof head);
        p += sizeof head;
        if (head[1] > MT_MAX_DIMS || head[0] > (uint64_t)(end - p)) goto bad;
        if (g->n == cap) {
            cap = cap ? 2 * cap : 64;
            mt_st_entry *grown = realloc(g->entries, cap * sizeof *grown);
            if (!grown) return mt_error_set(err, MT_ERR_NOMEM, "checkpoint: out of memory gathering state");
            g->entries = grown;
        }
        mt_st_entry *e = &g->entries[g->n++];
        memset(e, 0, sizeof *e);
        e->name = p; /* NUL-terminated by its padding */
        e->dtype = MT_ST_F32;
        e->ndim = (int)head[1];
        size_t numel = 1;
        for (int d = 0; d < e->ndim; d++) {
            e->shape[d] = (int64_t)head[2 + d];
            numel *= (size_t)head[2 + d];
        }
        if (pad8(head[0] + 1) > (size_t)(end - p)) goto bad;
        p += pad8(head[0] + 1);
        if (numel * sizeof(float) > (size_t)(end - p)) goto bad;
        e->data = p;
        p += pad8(numel * sizeof(float));
    }
    return MT_OK;
bad:
    return mt_error_set(err, MT_ERR_FORMAT, "checkpoint: the gathered optimizer state is malformed");
}

/* Collective: every rank's optimizer state to rank 0 (g stays empty elsewhere). Every
 * rank takes part in the gather and then in a vote, whatever happened to its own share,
 * so that a rank that could not serialise its state fails the save on all ranks instead
 * of leaving rank 0 waiting. */
static mt_status gather_optimizer(mt_plugin_instance *optimizer, gathered_state *g, mt_error *err) {
    mt_bytebuf mine = {0};
    mt_status st = serialise_optimizer(optimizer, &mine, err);
    mt_error comm_err = {0};
    mt_status cst = mt_dist_gather_bytes(mine.p, st ? 0 : mine.n, &g->bytes, &g->sizes, &comm_err);
    free(mine.p);
    unsigned char failed = st || cst;
    if (!cst) cst = mt_dist_max_u8(&failed, 1, &comm_err);
    if (!st && cst) {
        if (err) *err = comm_err;
        st = cst;
    }
    if (!st && failed)
        st = mt_error_set(err, MT_ERR_IO,
                          "checkpoint: another rank could not hand over its share of the optimizer "
                          "state (its error is above)");
    if (!st && g->bytes) st = parse_gathered(g, err);
    return st;
}

static mt_status write_optimizer(const char *path, mt_plugin_instance *optimizer,
                                 const gathered_state *gathered, mt_error *err) {
    mt_st_entry *entries = NULL, *owned = NULL;
    size_t n = 0;
    host_copies copies = {0};
    mt_status st = MT_OK;
    if (gathered && gathered->bytes) { /* a sharded state, gathered from every rank */
        entries = gathered->entries;
        n = gathered->n;
    } else {
        st = optimizer_entries(optimizer, &owned, &n, &copies, err);
        entries = owned;
    }
    const char *const meta[] = {"format",    MT_CKPT_FORMAT,
                                "content",   "optimizer",
                                "optimizer", optimizer ? optimizer->desc->name : "",
                                NULL};
    if (!st) st = mt_st_write(path, entries, n, meta, err);
    free(owned);
    host_copies_free(&copies);
    return st;
}

/* An instance's validated options as a JSON object, in declared order. */
static json_t *options_to_json(const mt_options *opts) {
    json_t *o = json_object();
    for (size_t i = 0; o && i < mt_options_count(opts); i++) {
        mt_option_type type;
        const char *name = mt_options_name_at(opts, i, &type);
        json_t *v = NULL;
        switch (type) {
        case MT_OPT_BOOL: v = json_boolean(mt_options_bool(opts, name)); break;
        case MT_OPT_INT: v = json_integer((json_int_t)mt_options_int(opts, name)); break;
        case MT_OPT_FLOAT: v = json_real(mt_options_float(opts, name)); break;
        case MT_OPT_STRING: v = json_string(mt_options_string(opts, name)); break;
        case MT_OPT_STRING_LIST:
            v = json_array();
            for (int j = 0; v && j < mt_options_list_len(opts, name); j++)
                json_array_append_new(v, json_string(mt_options_list_item(opts, name, j)));
            break;
        }
        json_object_set_new(o, name, v);
    }
    return o;
}

static json_t *state_to_json(const mt_ckpt_state *s, const char *recipe_sha,
                             const file_sum sums[N_DATA_FILES], json_t *run, json_t *trainer,
                             const char *fingerprint) {
    json_t *root = json_object();
    if (run) json_object_set(root, "run", run);
    if (trainer) json_object_set(root, "trainer", trainer);
    if (fingerprint && fingerprint[0])
        json_object_set_new(root, "model", json_pack("{s:s}", "fingerprint", fingerprint));
    json_object_set_new(root, "format", json_string(MT_CKPT_FORMAT));
    json_object_set_new(root, "format_version", json_integer(MT_CKPT_FORMAT_VERSION));
    json_object_set_new(root, "step", json_integer(s->step));
    json_object_set_new(root, "epoch", json_integer(s->epoch));
    json_t *cursor = json_object();
    json_object_set_new(cursor, "epoch", json_u64_string(s->cursor.epoch));
    json_object_set_new(cursor, "position", json_u64_string(s->cursor.position));
    json_object_set_new(root, "cursor", cursor);
    json_t *rng = json_array();
    for (int i = 0; i < s->n_rng; i++)
        json_array_append_new(rng, json_u64_string(s->rng[i]));
    json_object_set_new(root, "rng", rng);
    json_t *sched = json_object();
    json_object_set_new(sched, "step", json_integer(s->sched_step));
    json_object_set_new(sched, "total_steps", json_integer(s->total_steps));
    json_object_set_new(root, "scheduler", sched);
    json_object_set_new(root, "lr", json_double(s->lr));
    json_t *metrics = json_object();
    for (int i = 0; i < s->n_metrics; i++)
        json_object_set_new(metrics, s->metrics[i].name, json_double(s->metrics[i].value));
    json_object_set_new(root, "metrics", metrics);
    json_object_set_new(root, "recipe_sha256", json_string(recipe_sha));
    json_t *plugins = json_array();
    for (int i = 0; i < s->n_plugins; i++) {
        json_t *p = json_pack("{s:s, s:s, s:s}", "kind", s->plugins[i].kind, "name",
                              s->plugins[i].name, "version", s->plugins[i].version);
        if (p && s->plugins[i].instance)
            json_object_set_new(p, "options", options_to_json(s->plugins[i].instance->options));
        json_array_append_new(plugins, p);
    }
    json_object_set_new(root, "plugins", plugins);
    json_t *files = json_object();
    for (int i = 0; i < N_DATA_FILES; i++)
        json_object_set_new(
            files, data_files[i],
            json_pack("{s:I, s:s}", "bytes", (json_int_t)sums[i].bytes, "sha256", sums[i].sha256));
    json_object_set_new(root, "files", files);
    return root;
}

/* The JSON object text of a state field (run, trainer) as a tree; NULL text: none. */
static mt_status parse_object(const char *text, const char *field, json_t **out, mt_error *err) {
    *out = NULL;
    if (!text) return MT_OK;
    json_error_t jerr;
    json_t *j = json_loads(text, 0, &jerr);
    if (!j || !json_is_object(j)) {
        json_decref(j);
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "mt_checkpoint_save: state.%s must be a JSON object (%s)", field,
                            j ? "found another JSON value" : jerr.text);
    }
    *out = j;
    return MT_OK;
}

static mt_status validate_state(const mt_ckpt_state *s, mt_error *err) {
    if (s->step < 0)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "checkpoint: step %" PRId64 " is negative",
                            s->step);
    if (s->n_rng < 0 || s->n_rng > MT_CKPT_MAX_RNG || s->n_metrics < 0 ||
        s->n_metrics > MT_CKPT_MAX_METRICS || s->n_plugins < 0 ||
        s->n_plugins > MT_CKPT_MAX_PLUGINS)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "checkpoint: counts out of range (rng %d of %d, metrics %d of %d, "
                            "plugins %d of %d)",
                            s->n_rng, MT_CKPT_MAX_RNG, s->n_metrics, MT_CKPT_MAX_METRICS,
                            s->n_plugins, MT_CKPT_MAX_PLUGINS);
    for (int i = 0; i < s->n_metrics; i++)
        for (int j = 0; j < i; j++)
            if (!strcmp(s->metrics[i].name, s->metrics[j].name))
                return mt_error_set(err, MT_ERR_INVALID_ARG,
                                    "checkpoint: metric '%s' is given twice", s->metrics[i].name);
    return MT_OK;
}

/* The checkpoint written by this process (rank 0 of a data-parallel job). */
static mt_status save_here(const char *run_dir, mt_model *model, mt_plugin_instance *optimizer,
                           mt_plugin_instance *loss, const mt_ckpt_state *state,
                           const gathered_state *gathered, char **out_path, mt_error *err) {
    if (out_path) *out_path = NULL;
    if (!run_dir || !model || !state)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "mt_checkpoint_save: run_dir, model and state are required");
    if (optimizer && optimizer->desc->kind != MT_PLUGIN_OPTIMIZER)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "mt_checkpoint_save: plugin '%s' is not an optimizer",
                            optimizer->desc->name);
    mt_status st = validate_state(state, err);
    if (st) return st;
    json_t *run = NULL, *trainer = NULL;
    if ((st = parse_object(state->run, "run", &run, err))) return st;
    if ((st = parse_object(state->trainer, "trainer", &trainer, err))) {
        json_decref(run);
        return st;
    }

    char name[64], tmp_name[80], old_name[80];
    snprintf(name, sizeof name, "step-%08" PRId64, state->step);
    snprintf(tmp_name, sizeof tmp_name, TMP_PREFIX "%s", name);
    snprintf(old_name, sizeof old_name, TMP_PREFIX "old-%s", name);
    char *root = mt_path_join(run_dir, CKPT_SUBDIR, err);
    char *tmp = root ? mt_path_join(root, tmp_name, err) : NULL;
    char *final = tmp ? mt_path_join(root, name, err) : NULL;
    char *old = final ? mt_path_join(root, old_name, err) : NULL;
    char *paths[N_DATA_FILES] = {0};
    char *state_path = NULL, *sum_path = NULL, *json_text = NULL;
    json_t *json = NULL;
    if (!old) {
        st = MT_ERR_NOMEM;
        goto done;
    }
    if ((st = make_dir(run_dir, err)) || (st = make_dir(root, err)) ||
        (st = remove_leftovers(root, err)) || (st = make_dir(tmp, err)))
        goto done;
    for (int i = 0; i < N_DATA_FILES; i++)
        if (!(paths[i] = mt_path_join(tmp, data_files[i], err))) {
            st = MT_ERR_NOMEM;
            goto done;
        }
    if (!(state_path = mt_path_join(tmp, STATE_FILE, err)) ||
        !(sum_path = mt_path_join(tmp, STATE_SUM_FILE, err))) {
        st = MT_ERR_NOMEM;
        goto done;
    }

    /* the data files, each fsync'd by its writer, then hashed from disk */
    const char *recipe = state->recipe ? state->recipe : "";
    size_t recipe_len = state->recipe ? state->recipe_len : 0;
    if ((st = write_weights(paths[0], model, err)) ||
        (st = write_optimizer(paths[1], optimizer, gathered, err)) ||
        (st = mt_write_file_atomic(paths[2], recipe, recipe_len, err)) ||
        (st = write_plugin_state(paths[3], model, loss, err)))
        goto done;
    file_sum sums[N_DATA_FILES];
    for (int i = 0; i < N_DATA_FILES; i++)
        if ((st = mt_sha256_file(paths[i], sums[i].sha256, &sums[i].bytes, err))) goto done;
    char recipe_sha[MT_SHA256_HEX];
    mt_sha256_hex(recipe, recipe_len, recipe_sha);

    /* state.json and its checksum */
    json = state_to_json(state, recipe_sha, sums, run, trainer, model->fingerprint);
    json_text = json ? json_dumps(json, JSON_INDENT(2) | JSON_REAL_PRECISION(17)) : NULL;
    if (!json_text) {
        st = mt_error_set(err, MT_ERR_NOMEM, "%s: cannot encode the checkpoint state", state_path);
        goto done;
    }
    size_t json_len = strlen(json_text);
    char *grown = realloc(json_text, json_len + 2); /* end the file with a newline */
    if (!grown) {
        st = mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory", state_path);
        goto done;
    }
    json_text = grown;
    json_text[json_len++] = '\n';
    json_text[json_len] = '\0';
    if ((st = mt_write_file_atomic(state_path, json_text, json_len, err))) goto done;
    char state_sha[MT_SHA256_HEX], sum_line[MT_SHA256_HEX + 32];
    mt_sha256_hex(json_text, json_len, state_sha);
    int sum_len = snprintf(sum_line, sizeof sum_line, "%s  " STATE_FILE "\n", state_sha);
    if ((st = mt_write_file_atomic(sum_path, sum_line, (size_t)sum_len, err))) goto done;

    /* commit: fsync the directory, rename it into place, fsync the parent */
    if ((st = fsync_dir(tmp, err))) goto done;
    struct stat sb;
    int replacing = lstat(final, &sb) == 0;
    if (replacing && rename(final, old) != 0) {
        st = mt_error_set(err, MT_ERR_IO, "%s: cannot move the existing checkpoint aside: %s",
                          final, strerror(errno));
        goto done;
    }
    if (rename(tmp, final) != 0) {
        st = mt_error_set(err, MT_ERR_IO, "%s: cannot rename %s into place: %s", final, tmp,
                          strerror(errno));
        goto done;
    }
    if ((st = fsync_dir(root, err))) goto done;
    if (replacing && (st = remove_tree(old, err))) goto done;
    if (out_path) {
        *out_path = final;
        final = NULL;
    }
done:
    if (st && tmp) {
        mt_error keep = err ? *err : (mt_error){0};
        remove_tree(tmp, NULL);
        if (err) *err = keep;
    }
    free(json_text);
    json_decref(json);
    json_decref(run);
    json_decref(trainer);
    free(state_path);
    free(sum_path);
    for (int i = 0; i < N_DATA_FILES; i++)
        free(paths[i]);
    free(old);
    free(final);
    free(tmp);
    free(root);
    return st;
}

mt_status mt_checkpoint_save(const char *run_dir, mt_model *model, mt_plugin_instance *optimizer,
                             mt_plugin_instance *loss, const mt_ckpt_state *state,
                             char **out_path, mt_error *err) {
    if (mt_dist_size() == 1) return save_here(run_dir, model, optimizer, loss, state, NULL, out_path, err);
    /* a data-parallel job: every rank's weights are the same, the optimizer state may be
     * sharded (gathered first); rank 0 writes, the others wait for its outcome */
    gathered_state g = {0};
    char *path = NULL;
    mt_status st = MT_OK;
    if (optimizer && optimizer->sharded) st = gather_optimizer(optimizer, &g, err);
    if (!st && mt_dist_rank() == 0) st = save_here(run_dir, model, optimizer, loss, state, &g, &path, err);
    gathered_free(&g);
    st = mt_dist_share_outcome(st, err, &path);
    if (out_path) *out_path = path;
    else free(path);
    return st;
}

/* ---- verification and load ---------------------------------------------------------------- */

/* A verified checkpoint: its parsed state.json and state. */
typedef struct verified {
    json_t *json;
    mt_ckpt_state state;
    int n_files; /* data files of its format version */
} verified;

static mt_status bad_key(mt_error *err, const char *path, const char *key, const char *expected) {
    return mt_error_set(err, MT_ERR_FORMAT, "%s: key '%s': expected %s", path, key, expected);
}

/* The object under `key` of state.json as compact text in *out (allocated); absent: NULL. */
static mt_status object_text(const json_t *root, const char *key, const char *path, const char **out,
                             mt_error *err) {
    const json_t *v = json_object_get(root, key);
    if (!v) return MT_OK;
    if (!json_is_object(v)) return bad_key(err, path, key, "an object");
    char *text = json_dumps(v, JSON_COMPACT | JSON_SORT_KEYS | JSON_REAL_PRECISION(17));
    if (!text) return mt_error_set(err, MT_ERR_NOMEM, "%s: key '%s': out of memory", path, key);
    *out = text;
    return MT_OK;
}

static mt_status get_int(const json_t *obj, const char *key, const char *path, const char *shown,
                         int64_t *v, mt_error *err) {
    const json_t *j = json_object_get(obj, key);
    if (!json_is_integer(j)) return bad_key(err, path, shown, "an integer");
    *v = (int64_t)json_integer_value(j);
    return MT_OK;
}

static mt_status get_u64(const json_t *obj, const char *key, const char *path, const char *shown,
                         uint64_t *v, mt_error *err) {
    if (!parse_u64(json_string_value(json_object_get(obj, key)), v))
        return bad_key(err, path, shown, "an unsigned 64-bit integer as a decimal string");
    return MT_OK;
}

/* Fills s from state.json; recipe is left for the caller. */
static mt_status parse_state(const json_t *root, const char *path, mt_ckpt_state *s,
                             mt_error *err) {
    mt_status st;
    if ((st = get_int(root, "step", path, "step", &s->step, err)) ||
        (st = get_int(root, "epoch", path, "epoch", &s->epoch, err)))
        return st;
    if (s->step < 0) return bad_key(err, path, "step", "a step >= 0");
    const json_t *cursor = json_object_get(root, "cursor");
    if (!json_is_object(cursor)) return bad_key(err, path, "cursor", "an object");
    if ((st = get_u64(cursor, "epoch", path, "cursor.epoch", &s->cursor.epoch, err)) ||
        (st = get_u64(cursor, "position", path, "cursor.position", &s->cursor.position, err)))
        return st;
    const json_t *rng = json_object_get(root, "rng");
    if (!json_is_array(rng) || json_array_size(rng) > MT_CKPT_MAX_RNG)
        return bad_key(err, path, "rng", "an array of at most 8 decimal strings");
    s->n_rng = (int)json_array_size(rng);
    for (int i = 0; i < s->n_rng; i++)
        if (!parse_u64(json_string_value(json_array_get(rng, (size_t)i)), &s->rng[i]))
            return bad_key(err, path, "rng", "unsigned 64-bit integers as decimal strings");
    const json_t *sched = json_object_get(root, "scheduler");
    if (!json_is_object(sched)) return bad_key(err, path, "scheduler", "an object");
    if ((st = get_int(sched, "step", path, "scheduler.step", &s->sched_step, err)) ||
        (st = get_int(sched, "total_steps", path, "scheduler.total_steps", &s->total_steps, err)))
        return st;
    if (!json_get_double(json_object_get(root, "lr"), &s->lr))
        return bad_key(err, path, "lr", "a number");
    const json_t *metrics = json_object_get(root, "metrics");
    if (!json_is_object(metrics) || json_object_size(metrics) > MT_CKPT_MAX_METRICS)
        return bad_key(err, path, "metrics", "an object of at most 16 numbers");
    const char *key;
    const json_t *value;
    json_object_foreach ((json_t *)metrics, key, value) {
        double v;
        if (!json_get_double(value, &v)) return bad_key(err, path, "metrics", "numbers");
        if ((st = mt_ckpt_state_set_metric(s, key, v, err))) return st;
    }
    const char *sha = json_string_value(json_object_get(root, "recipe_sha256"));
    if (!is_hex64(sha)) return bad_key(err, path, "recipe_sha256", "64 lowercase hex digits");
    memcpy(s->recipe_sha256, sha, MT_SHA256_HEX);
    const json_t *plugins = json_object_get(root, "plugins");
    if (!json_is_array(plugins) || json_array_size(plugins) > MT_CKPT_MAX_PLUGINS)
        return bad_key(err, path, "plugins", "an array of at most 8 {kind, name, version}");
    for (size_t i = 0; i < json_array_size(plugins); i++) {
        const json_t *p = json_array_get(plugins, i);
        const char *k = json_string_value(json_object_get(p, "kind"));
        const char *n = json_string_value(json_object_get(p, "name"));
        const char *v = json_string_value(json_object_get(p, "version"));
        if (!k || !n || !v)
            return bad_key(err, path, "plugins", "objects {kind, name, version} of strings");
        mt_error perr = {0};
        if (put_plugin(s, k, n, v, &perr))
            return mt_error_set(err, MT_ERR_FORMAT, "%s: key 'plugins': %s", path, perr.msg);
        const json_t *options = json_object_get(p, "options");
        if (options) {
            if (!json_is_object(options))
                return bad_key(err, path, "plugins", "options as a JSON object");
            for (int j = 0; j < s->n_plugins; j++) {
                if (strcmp(s->plugins[j].kind, k)) continue;
                free(s->plugins[j].options);
                if (!(s->plugins[j].options = json_dumps(options, JSON_COMPACT)))
                    return mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory", path);
            }
        }
    }
    const json_t *model = json_object_get(root, "model");
    if (model) {
        const char *fp = json_string_value(json_object_get(model, "fingerprint"));
        if (!json_is_object(model) || !is_hex64(fp))
            return bad_key(err, path, "model", "{\"fingerprint\": 64 lowercase hex digits}");
        memcpy(s->model_fingerprint, fp, MT_SHA256_HEX);
    }
    if ((st = object_text(root, "run", path, &s->run, err))) return st;
    return object_text(root, "trainer", path, &s->trainer, err);
}

/* Size and checksum of one file against its "files" entry. */
static mt_status check_file(const char *dir, const char *name, const json_t *files,
                            const char *state_path, mt_error *err) {
    const json_t *entry = json_object_get(files, name);
    const json_t *jbytes = json_object_get(entry, "bytes");
    const char *sha = json_string_value(json_object_get(entry, "sha256"));
    if (!json_is_integer(jbytes) || json_integer_value(jbytes) < 0 || !is_hex64(sha))
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: key 'files.%s': expected {\"bytes\": integer, \"sha256\": 64 hex "
                            "digits}",
                            state_path, name);
    char *path = mt_path_join(dir, name, err);
    if (!path) return MT_ERR_NOMEM;
    mt_status st = MT_OK;
    struct stat sb;
    uint64_t want = (uint64_t)json_integer_value(jbytes);
    if (stat(path, &sb) != 0) {
        st = mt_error_set(err, MT_ERR_FORMAT, "%s: missing from the checkpoint (%s)", path,
                          strerror(errno));
    } else if (!S_ISREG(sb.st_mode)) {
        st = mt_error_set(err, MT_ERR_FORMAT, "%s: not a regular file", path);
    } else if ((uint64_t)sb.st_size != want) {
        st = mt_error_set(err, MT_ERR_FORMAT,
                          "%s: size mismatch: expected %" PRIu64 " bytes, found %lld", path, want,
                          (long long)sb.st_size);
    } else {
        char found[MT_SHA256_HEX];
        uint64_t bytes = 0;
        st = mt_sha256_file(path, found, &bytes, err);
        if (st == MT_OK && bytes != want)
            st = mt_error_set(err, MT_ERR_FORMAT,
                              "%s: size mismatch: expected %" PRIu64 " bytes, read %" PRIu64, path,
                              want, bytes);
        else if (st == MT_OK && strcmp(found, sha) != 0)
            st = mt_error_set(err, MT_ERR_FORMAT, "%s: SHA-256 mismatch: expected %s, found %s",
                              path, sha, found);
    }
    free(path);
    return st;
}

/* check_files 0: state.json (against its checksum) and the recipe only, for a caller
 * that loads the checkpoint later, which checks the data files then. */
static mt_status verify_dir(const char *dir, int check_files, verified *out, mt_error *err) {
    memset(out, 0, sizeof *out);
    char *state_path = mt_path_join(dir, STATE_FILE, err);
    char *sum_path = state_path ? mt_path_join(dir, STATE_SUM_FILE, err) : NULL;
    char *recipe_path = sum_path ? mt_path_join(dir, RECIPE_FILE, err) : NULL;
    char *text = NULL, *sum_text = NULL;
    size_t len = 0, sum_len = 0;
    mt_status st = MT_OK;
    if (!recipe_path) {
        st = MT_ERR_NOMEM;
        goto done;
    }
    struct stat sb;
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode)) {
        st = mt_error_set(err, MT_ERR_IO, "%s: not a checkpoint directory", dir);
        goto done;
    }
    /* state.json's own checksum */
    if ((st = mt_read_file(sum_path, &sum_text, &sum_len, err)) ||
        (st = mt_read_file(state_path, &text, &len, err)))
        goto done;
    char want[MT_SHA256_HEX] = {0}, found[MT_SHA256_HEX];
    if (sum_len >= 64) memcpy(want, sum_text, 64);
    if (!is_hex64(want) || strncmp(sum_text + 64, "  " STATE_FILE, strlen("  " STATE_FILE)) != 0) {
        st = mt_error_set(err, MT_ERR_FORMAT, "%s: expected \"<64 hex digits>  " STATE_FILE "\"",
                          sum_path);
        goto done;
    }
    mt_sha256_hex(text, len, found);
    if (strcmp(want, found) != 0) {
        st = mt_error_set(err, MT_ERR_FORMAT,
                          "%s: SHA-256 mismatch: expected %s (from %s), found %s", state_path, want,
                          STATE_SUM_FILE, found);
        goto done;
    }
    /* state.json */
    json_error_t jerr;
    out->json = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!out->json || !json_is_object(out->json)) {
        st = mt_error_set(err, MT_ERR_FORMAT, "%s:%d: %s", state_path, jerr.line,
                          out->json ? "expected a JSON object" : jerr.text);
        goto done;
    }
    const char *format = json_string_value(json_object_get(out->json, "format"));
    if (!format || strcmp(format, MT_CKPT_FORMAT) != 0) {
        st = mt_error_set(
            err, MT_ERR_FORMAT, "%s: key 'format': expected \"" MT_CKPT_FORMAT "\", found %s%s%s",
            state_path, format ? "\"" : "", format ? format : "none", format ? "\"" : "");
        goto done;
    }
    const json_t *version = json_object_get(out->json, "format_version");
    if (!json_is_integer(version) || json_integer_value(version) < 1 ||
        json_integer_value(version) > MT_CKPT_FORMAT_VERSION) {
        if (json_is_integer(version))
            st = mt_error_set(err, MT_ERR_UNSUPPORTED,
                              "%s: checkpoint format version %" JSON_INTEGER_FORMAT
                              " is not supported: expected 1 to %d",
                              state_path, json_integer_value(version), MT_CKPT_FORMAT_VERSION);
        else
            st = bad_key(err, state_path, "format_version", "an integer");
        goto done;
    }
    out->n_files = data_files_of(json_integer_value(version));
    if ((st = parse_state(out->json, state_path, &out->state, err))) goto done;
    /* every file */
    const json_t *files = json_object_get(out->json, "files");
    if (!json_is_object(files)) {
        st = bad_key(err, state_path, "files", "an object");
        goto done;
    }
    const char *key;
    const json_t *value;
    json_object_foreach ((json_t *)files, key, value) {
        int known = 0;
        for (int i = 0; i < N_DATA_FILES; i++)
            known |= !strcmp(key, data_files[i]);
        if (!known) {
            st = mt_error_set(err, MT_ERR_FORMAT, "%s: key 'files': unknown file '%s'", state_path,
                              key);
            goto done;
        }
    }
    /* a file newer than the format is checked when it is listed (and used then) */
    if (json_object_get(files, PLUGIN_STATE_FILE)) out->n_files = N_DATA_FILES;
    for (int i = 0; check_files && i < out->n_files; i++)
        if ((st = check_file(dir, data_files[i], files, state_path, err))) goto done;
    /* the recipe text */
    char *recipe = NULL;
    size_t recipe_len = 0;
    if ((st = mt_read_file(recipe_path, &recipe, &recipe_len, err))) goto done;
    out->state.recipe = recipe;
    out->state.recipe_len = recipe_len;
    mt_sha256_hex(recipe, recipe_len, found);
    if (strcmp(found, out->state.recipe_sha256) != 0)
        st = mt_error_set(err, MT_ERR_FORMAT,
                          "%s: SHA-256 mismatch: expected %s (recipe_sha256), found %s",
                          recipe_path, out->state.recipe_sha256, found);
done:
    if (st) {
        json_decref(out->json);
        mt_ckpt_state_clear(&out->state);
        memset(out, 0, sizeof *out);
    }
    free(text);
    free(sum_text);
    free(state_path);
    free(sum_path);
    free(recipe_path);
    return st;
}

mt_status mt_checkpoint_verify(const char *dir, mt_error *err) {
    verified v;
    mt_status st = verify_dir(dir, 1, &v, err);
    if (st) return st;
    json_decref(v.json);
    mt_ckpt_state_clear(&v.state);
    return MT_OK;
}

mt_status mt_checkpoint_read_state(const char *dir, mt_ckpt_state *state, mt_error *err) {
    verified v;
    mt_status st = verify_dir(dir, 0, &v, err);
    if (st) return st;
    json_decref(v.json);
    *state = v.state;
    return MT_OK;
}

static int same_shape(const mt_st_tensor *t, const mt_tensor *v) {
    if (t->ndim != v->ndim) return 0;
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] != v->shape[i]) return 0;
    return 1;
}

static mt_status all_f32(const mt_safetensors *st, const char *path, size_t *max_numel,
                         mt_error *err) {
    *max_numel = 0;
    for (size_t i = 0; i < mt_st_count(st); i++) {
        const mt_st_tensor *t = mt_st_at(st, i);
        if (t->dtype != MT_ST_F32)
            return mt_error_set(err, MT_ERR_FORMAT, "%s: tensor '%s': expected dtype F32, found %s",
                                path, t->name, mt_st_dtype_name(t->dtype));
        if (t->nbytes / 4 > *max_numel) *max_numel = t->nbytes / 4;
    }
    return MT_OK;
}

/* Is optimizer state "<kind>/<parameter>" this rank's? (Unknown names are kept: the
 * optimizer's own check refuses them.) */
static int owned_here(const char *state_name, const mt_param_view *params, size_t n, const int *owner) {
    const char *slash = strchr(state_name, '/');
    if (!slash) return 1;
    for (size_t i = 0; i < n; i++)
        if (!strcmp(params[i].name, slash + 1)) return owner[i] == mt_dist_rank();
    return 1;
}

mt_status mt_checkpoint_load(const char *dir, mt_model *model, mt_plugin_instance *optimizer,
                             mt_plugin_instance *loss, mt_ckpt_state *state, mt_error *err) {
    if (!dir) return mt_error_set(err, MT_ERR_INVALID_ARG, "mt_checkpoint_load: dir is NULL");
    if (optimizer && optimizer->desc->kind != MT_PLUGIN_OPTIMIZER)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "mt_checkpoint_load: plugin '%s' is not an optimizer",
                            optimizer->desc->name);
    verified v;
    mt_status st = verify_dir(dir, 1, &v, err);
    if (st) return st;
    char *wpath = mt_path_join(dir, WEIGHTS_FILE, err);
    char *opath = wpath ? mt_path_join(dir, OPTIMIZER_FILE, err) : NULL;
    mt_safetensors *wst = NULL, *ost = NULL;
    mt_param_view *params = NULL;
    size_t n_params = 0, max_w = 0, max_o = 0;
    float *scratch = NULL;
    int *owner = NULL;
    char a[96], b[96];
    if (!opath) {
        st = MT_ERR_NOMEM;
        goto done;
    }
    if ((st = mt_st_open(wpath, &wst, err)) || (st = mt_st_open(opath, &ost, err)) ||
        (st = all_f32(wst, wpath, &max_w, err)) || (st = all_f32(ost, opath, &max_o, err)))
        goto done;

    /* the base model it was trained from (checkpoints of format 1 do not say) */
    if (model && model->fingerprint[0] && v.state.model_fingerprint[0] &&
        strcmp(model->fingerprint, v.state.model_fingerprint) != 0) {
        st = mt_error_set(err, MT_ERR_FORMAT,
                          "%s/" STATE_FILE ": the checkpoint was trained from another base model "
                          "(fingerprint %.16s..., this model's is %.16s...): load the model it was "
                          "made from",
                          dir, v.state.model_fingerprint, model->fingerprint);
        goto done;
    }
    /* the weights must be exactly the model's trainable parameters */
    if (model) {
        if ((st = mt_model_trainable_params(model, &params, &n_params, err))) goto done;
        for (size_t i = 0; i < n_params; i++) {
            const mt_st_tensor *t = mt_st_find(wst, params[i].name);
            if (!t) {
                st = mt_error_set(err, MT_ERR_FORMAT,
                                  "%s: trainable parameter '%s' of the model is missing: the "
                                  "checkpoint was written for other trainable parameters",
                                  wpath, params[i].name);
                goto done;
            }
            if (!same_shape(t, &params[i].value)) {
                st = mt_error_set(
                    err, MT_ERR_FORMAT, "%s: parameter '%s': expected shape %s, found %s", wpath,
                    params[i].name,
                    mt_shape_format(a, sizeof a, params[i].value.ndim, params[i].value.shape),
                    mt_shape_format(b, sizeof b, t->ndim, t->shape));
                goto done;
            }
            if (params[i].value.dtype != MT_F32 || !params[i].value.data) {
                st = mt_error_set(err, MT_ERR_INVALID_ARG,
                                  "%s: parameter '%s' of the model is not an F32 tensor with data",
                                  wpath, params[i].name);
                goto done;
            }
        }
        if (mt_st_count(wst) != n_params) {
            for (size_t k = 0; k < mt_st_count(wst); k++) {
                const char *name = mt_st_at(wst, k)->name;
                size_t i = 0;
                while (i < n_params && strcmp(params[i].name, name))
                    i++;
                if (i == n_params) {
                    st = mt_error_set(err, MT_ERR_FORMAT,
                                      "%s: tensor '%s' is not a trainable parameter of the model: "
                                      "the checkpoint was written for other trainable parameters",
                                      wpath, name);
                    goto done;
                }
            }
            st = mt_error_set(err, MT_ERR_FORMAT, "%s: %zu tensors for %zu trainable parameters",
                              wpath, mt_st_count(wst), n_params);
            goto done;
        }
    }
    if (optimizer) {
        for (int i = 0; i < v.state.n_plugins; i++) {
            const mt_ckpt_plugin *p = &v.state.plugins[i];
            if (!strcmp(p->kind, "optimizer") && strcmp(p->name, optimizer->desc->name) != 0) {
                st = mt_error_set(
                    err, MT_ERR_INVALID_ARG,
                    "%s: the checkpoint was written with optimizer '%s' (%s); this run's "
                    "optimizer is '%s'",
                    dir, p->name, p->version, optimizer->desc->name);
                goto done;
            }
        }
    }
    size_t max_numel = max_w > max_o ? max_w : max_o;
    if (!(scratch = mt_malloc(max_numel * sizeof(float), "checkpoint scratch", err))) {
        st = MT_ERR_NOMEM;
        goto done;
    }

    /* a sharded optimizer (ZeRO-1) takes the state of its rank's parameters only */
    if (optimizer && optimizer->sharded && mt_dist_size() > 1 && params &&
        !(owner = mt_train_param_owners(params, n_params, err))) {
        st = MT_ERR_NOMEM;
        goto done;
    }
    /* restore: the optimizer first (its refusals leave the model untouched), then the weights */
    if (optimizer) {
        const mt_optimizer_vtable *vt = optimizer->desc->vtable;
        for (size_t i = 0; i < mt_st_count(ost); i++) {
            const mt_st_tensor *t = mt_st_at(ost, i);
            if (owner && !owned_here(t->name, params, n_params, owner)) continue;
            if ((st = mt_st_read_f32(t, scratch, err))) goto done;
            mt_tensor view = {
                .dtype = MT_F32, .device = MT_DEVICE_CPU, .ndim = t->ndim, .data = scratch};
            memcpy(view.shape, t->shape, sizeof view.shape);
            if ((st = vt->state_set(optimizer->state, t->name, &view, err))) {
                char msg[MT_ERROR_MSG_MAX];
                snprintf(msg, sizeof msg, "%s", err ? err->msg : "");
                mt_error_set(err, st, "%s: %s", opath, msg);
                goto done;
            }
        }
    }
    if (model && v.n_files > 3) { /* the adapters' and the loss' own state (format 4) */
        char *ppath = mt_path_join(dir, PLUGIN_STATE_FILE, err);
        st = ppath ? restore_plugin_state(ppath, model, loss, err) : MT_ERR_NOMEM;
        free(ppath);
        if (st) goto done;
    }
    for (size_t i = 0; i < n_params; i++) {
        const mt_st_tensor *t = mt_st_find(wst, params[i].name);
        mt_tensor *dst = &params[i].value;
        if (dst->device == MT_DEVICE_CPU) {
            if ((st = mt_st_read_f32(t, dst->data, err))) goto done;
        } else {
            if ((st = mt_st_read_f32(t, scratch, err))) goto done;
            if ((st = model->be->ops->upload(model->be, dst->data, scratch, t->nbytes))) {
                mt_error_set(err, st, "%s: cannot copy parameter '%s' to the device", wpath,
                             t->name);
                goto done;
            }
        }
    }
    if (state) {
        *state = v.state;
        memset(&v.state, 0, sizeof v.state);
    }
done:
    free(owner);
    free(scratch);
    free(params);
    mt_st_close(wst);
    mt_st_close(ost);
    free(wpath);
    free(opath);
    json_decref(v.json);
    mt_ckpt_state_clear(&v.state);
    return st;
}

/* ---- finding and pruning ---------------------------------------------------------------- */

mt_status mt_checkpoint_latest(const char *run_dir, char **out_path, mt_error *err) {
    *out_path = NULL;
    char *root = mt_path_join(run_dir, CKPT_SUBDIR, err);
    if (!root) return MT_ERR_NOMEM;
    ckpt_entry *v;
    size_t n;
    mt_status st = list_checkpoints(root, &v, &n, err);
    free(root);
    if (st) return st;
    if (n > 0) {
        *out_path = v[n - 1].path;
        v[n - 1].path = NULL;
    }
    free_entries(v, n);
    return MT_OK;
}

static mt_status prune_here(const char *run_dir, int keep_last, int64_t best_step, int *deleted,
                            mt_error *err);

mt_status mt_checkpoint_prune(const char *run_dir, int keep_last, int64_t best_step, int *deleted,
                              mt_error *err) {
    if (deleted) *deleted = 0;
    /* in a data-parallel job rank 0 alone touches the run directory */
    mt_status st = mt_dist_rank() == 0 ? prune_here(run_dir, keep_last, best_step, deleted, err) : MT_OK;
    return mt_dist_share_outcome(st, err, NULL);
}

static mt_status prune_here(const char *run_dir, int keep_last, int64_t best_step, int *deleted,
                            mt_error *err) {
    char *root = mt_path_join(run_dir, CKPT_SUBDIR, err);
    if (!root) return MT_ERR_NOMEM;
    /* first the remains of an interrupted save or prune (a process killed mid-way) */
    struct stat sb;
    mt_status st = MT_OK;
    if (stat(root, &sb) == 0 && S_ISDIR(sb.st_mode)) st = remove_leftovers(root, err);
    if (st || keep_last < 1) {
        free(root);
        return st;
    }
    ckpt_entry *v;
    size_t n;
    st = list_checkpoints(root, &v, &n, err);
    for (size_t i = 0; st == MT_OK && i + (size_t)keep_last < n; i++) {
        if (v[i].step == best_step) continue;
        char tmp_name[96];
        snprintf(tmp_name, sizeof tmp_name, TMP_PREFIX "del-step-%08" PRId64, v[i].step);
        char *tmp = mt_path_join(root, tmp_name, err);
        if (!tmp) {
            st = MT_ERR_NOMEM;
            break;
        }
        if (rename(v[i].path, tmp) != 0)
            st = mt_error_set(err, MT_ERR_IO, "%s: cannot move aside for deletion: %s", v[i].path,
                              strerror(errno));
        else if ((st = fsync_dir(root, err)) == MT_OK && (st = remove_tree(tmp, err)) == MT_OK &&
                 deleted)
            (*deleted)++;
        free(tmp);
    }
    if (st == MT_OK && n > 0) st = fsync_dir(root, err);
    free_entries(v, n);
    free(root);
    return st;
}
