/* peft.c — loading a PEFT adapter directory onto a model (see peft.h).
 *
 * The core reads the format and knows the model; the adapter plugin knows its keys and
 * tensors. Everything that can be checked without the adapter attached is checked
 * first (the format, import_options, the tensors' modules), because an adapter cannot
 * be detached again. */
#include "store/peft.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h"
#include "store/adapter_dir.h"

/* "<dir>: " before an adapter's message that does not name the directory already (the
 * core's own messages name the file). */
static mt_status prefix_dir(mt_error *err, mt_status st, const char *dir) {
    if (err && st && !strstr(err->msg, dir)) {
        char msg[MT_ERROR_MSG_MAX];
        memcpy(msg, err->msg, sizeof msg);
        mt_error_set(err, st, "%s: %s", dir, msg); /* truncated when it must be */
    }
    return st;
}

/* After a plugin call: a failure its queued device operations recorded. */
static mt_status host_check(mt_status st, mt_error *err) {
    const mt_host *h = mt_host_table();
    if (st || h->size < offsetof(mt_host, check) + sizeof h->check || !h->check) return st;
    return h->check(err);
}

/* Whether the plugin can load a PEFT directory (ABI 2's import_options and load). */
static int can_load(const mt_plugin *p) {
    const mt_plugin_descriptor *desc = mt_plugin_desc(p);
    if (desc->kind != MT_PLUGIN_ADAPTER) return 0;
    const mt_adapter_vtable *vt = desc->vtable;
    return MT_ADAPTER_VT_HAS(vt, format) && !strcmp(vt->format, "peft") &&
           MT_ADAPTER_VT_HAS(vt, import_options) && MT_ADAPTER_VT_HAS(vt, load);
}

static mt_status ask_import(const mt_plugin *p, mt_adapter_dir *d, mt_error *err) {
    const mt_plugin_descriptor *desc = mt_plugin_desc(p);
    const mt_adapter_vtable *vt = desc->vtable;
    mt_adapter_dir_begin_options(d, desc);
    mt_status st = vt->import_options(mt_host_table(), mt_adapter_dir_io(d), err);
    return prefix_dir(err, host_check(st, err), mt_adapter_dir_path(d));
}

/* The plugin that loads the directory into *out, its options set in d. */
static mt_status choose(const mt_registry *reg, const char *adapter, mt_adapter_dir *d,
                        const mt_plugin **out, mt_error *err) {
    const char *dir = mt_adapter_dir_path(d);
    *out = NULL;
    if (adapter) {
        const mt_plugin *p = mt_registry_find(reg, MT_PLUGIN_ADAPTER, adapter, err);
        if (!p) return MT_ERR_INVALID_ARG;
        if (!can_load(p))
            return mt_error_set(err, MT_ERR_UNSUPPORTED,
                                "%s: adapter %s (%s) cannot load a PEFT adapter directory (its "
                                "vtable has no \"peft\" format with import_options and load)",
                                dir, adapter, mt_plugin_path(p));
        mt_status st = ask_import(p, d, err);
        if (!st) *out = p;
        return st;
    }
    /* the first that accepts; else the refusal of the first that could load, which says
     * what in the directory is not supported */
    mt_error first = {0};
    mt_status first_st = MT_OK;
    for (size_t i = 0; i < mt_registry_count(reg); i++) {
        const mt_plugin *p = mt_registry_at(reg, i);
        if (!can_load(p)) continue;
        mt_error e = {0};
        mt_status st = ask_import(p, d, &e);
        if (!st) {
            *out = p;
            return MT_OK;
        }
        if (!first_st) {
            first = e;
            first_st = st;
        }
    }
    if (first_st) {
        if (err) *err = first;
        return first_st;
    }
    return mt_error_set(err, MT_ERR_UNSUPPORTED,
                        "%s: no adapter plugin can load a PEFT adapter directory (none has the "
                        "\"peft\" format with import_options and load)", dir);
}

/* Whether some parameter name of m starts with the first len bytes of name and a '.'. */
static int is_module_path(const mt_model *m, const char *name, size_t len) {
    for (size_t i = 0; i < m->num_params; i++)
        if (!strncmp(m->params[i].name, name, len) && m->params[i].name[len] == '.') return 1;
    return 0;
}

/* PEFT keeps an adapter's tensors under the module they adapt: every tensor's name must
 * start with "<module>." for a module of this model that has a weight. */
static mt_status check_modules(mt_model *m, mt_adapter_dir *d, mt_error *err) {
    const mt_adapter_io *io = mt_adapter_dir_io(d);
    char buf[256];
    for (int i = 0;; i++) {
        const char *name = io->ops->tensor_name(io, i);
        if (!name) break;
        int found = 0;
        for (const char *dot = strchr(name, '.'); dot && !found; dot = strchr(dot + 1, '.')) {
            int len = (int)(dot - name);
            if ((size_t)len + sizeof ".weight" > sizeof buf) break;
            snprintf(buf, sizeof buf, "%.*s.weight", len, name);
            const mt_param *p = mt_model_find_param(m, buf);
            found = p && p->ndim == 2;
        }
        if (found) continue;
        /* the first component of the path this model does not have ("model.layers.9") */
        size_t len = strlen(name);
        for (const char *dot = strchr(name, '.'); dot; dot = strchr(dot + 1, '.'))
            if (!is_module_path(m, name, (size_t)(dot - name))) {
                len = (size_t)(dot - name);
                break;
            }
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s/adapter_model.safetensors: tensor " MT_PEFT_TENSOR_PREFIX
                            "%s: this model has no parameter %.*s.* (no module of this model "
                            "holds the tensor; was the adapter made for another model?)",
                            mt_adapter_dir_path(d), name, (int)len, name);
    }
    return MT_OK;
}

mt_status mt_peft_attach(mt_model *m, const mt_registry *reg, const char *adapter,
                         const char *dir, mt_plugin_instance **out_instance, mt_error *err) {
    *out_instance = NULL;
    if (m->num_adapters > 0 || m->num_extra > 0)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: the model already has an adapter attached", dir);
    mt_adapter_dir *d = NULL;
    mt_status s = mt_adapter_dir_open(dir, &d, err);
    if (s) return s;
    const mt_plugin *p = NULL;
    s = choose(reg, adapter, d, &p, err);
    if (!s) s = check_modules(m, d, err);
    mt_plugin_instance *inst = NULL;
    if (!s) {
        size_t n_kv;
        const mt_kv *kv = mt_adapter_dir_options(d, &n_kv);
        s = prefix_dir(err, mt_plugin_instantiate(p, kv, n_kv, &inst, err), dir);
    }
    if (!s) {
        s = mt_model_attach_adapter(m, inst->desc->vtable, inst->state, err);
        /* attached or not, the model may point into the instance now: hand it over */
        *out_instance = inst;
        const mt_adapter_vtable *vt = inst->desc->vtable;
        if (!s) s = host_check(vt->load(inst->state, mt_adapter_dir_io(d), err), err);
        s = prefix_dir(err, s, dir);
        if (!s) mt_model_set_training(m, 0);
    }
    mt_adapter_dir_close(d);
    return s;
}

mt_status mt_peft_load(mt_model *m, const char *dir, mt_registry **reg,
                       mt_plugin_instance **inst, mt_error *err) {
    *inst = NULL;
    mt_status s = mt_registry_open(NULL, 0, reg, err);
    return s ? s : mt_peft_attach(m, *reg, NULL, dir, inst, err);
}
