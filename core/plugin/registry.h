/* registry.h — finding, loading and instantiating plugins (the core side of
 * moontune/plugin.h). The core never names a concrete plugin: it finds them by
 * kind and name at run time. */
#ifndef MT_CORE_PLUGIN_HOST_H
#define MT_CORE_PLUGIN_HOST_H

#include <stddef.h>

#include "moontune/plugin.h"
#include "plugin/options.h"

/* The host function table handed to every plugin (core/model/host_table.c). */
const mt_host *mt_host_table(void);
/* The first failure of a host compute operation since the last check (then cleared),
 * with queued device work waited for, prefixed with `who` (the plugin call that made
 * it); MT_OK when none. The core checks after every plugin call that computes. */
mt_status mt_host_check(const char *who, mt_error *err);

/* Whether vtable v of type T reaches optional slot f and sets it. */
#define MT_VTABLE_HAS(T, v, f)                                                              \
    ((v)->size >= offsetof(T, f) + sizeof(((T *)0)->f) && (v)->f != NULL)

/* A loaded plugin: its file, its dlopen handle and its descriptor. */
typedef struct mt_plugin mt_plugin;

const mt_plugin_descriptor *mt_plugin_desc(const mt_plugin *p);
const char *mt_plugin_path(const mt_plugin *p);
/* "optimizer", "loss", "adapter", "scheduler"; NULL for an invalid kind. */
const char *mt_plugin_kind_name(mt_plugin_kind kind);
/* Parses a kind name; returns 0 when unknown. */
mt_plugin_kind mt_plugin_kind_parse(const char *name);

/* Loads one file: dlopen(RTLD_NOW | RTLD_LOCAL), the entry symbol, the ABI version
 * and kind checks, and a sanity check of the descriptor (name, vtable, options).
 * Refusals name the file and close it again. */
mt_status mt_plugin_load(const char *path, mt_plugin **out, mt_error *err);
void mt_plugin_unload(mt_plugin *p);

/* Every plugin found on the search path: the built-in directory (plugins/ next to the
 * running moontune binary or library in a build tree, else the installed plugin
 * directory), then each directory of MOONTUNE_PLUGIN_PATH (colon-separated), then
 * extra_dirs (directories a recipe names). A later duplicate (same kind and name) is
 * refused in favour of the earlier one, and the refusal says which file wins and why. */
typedef struct mt_registry mt_registry;

mt_status mt_registry_open(const char *const *extra_dirs, size_t n_extra, mt_registry **out,
                           mt_error *err);
void mt_registry_close(mt_registry *r);
size_t mt_registry_count(const mt_registry *r);
const mt_plugin *mt_registry_at(const mt_registry *r, size_t index);
/* NULL when absent; *err (when given) then says so and lists the names of that kind. */
const mt_plugin *mt_registry_find(const mt_registry *r, mt_plugin_kind kind, const char *name,
                                  mt_error *err);
/* Files that were refused while scanning, one message each. */
size_t mt_registry_refusal_count(const mt_registry *r);
const char *mt_registry_refusal(const mt_registry *r, size_t index);

/* An instance: validated options and the plugin's state from its create(). */
typedef struct mt_plugin_instance {
    const mt_plugin *plugin;
    const mt_plugin_descriptor *desc;
    mt_options *options;
    void *state;
    /* an optimizer whose state each rank of a data-parallel job keeps only for the
     * parameters it owns (ZeRO-1; model/train.c, store/checkpoint.c) */
    int sharded;
} mt_plugin_instance;

mt_status mt_plugin_instantiate(const mt_plugin *p, const mt_kv *kv, size_t n_kv,
                                mt_plugin_instance **out, mt_error *err);
void mt_plugin_instance_free(mt_plugin_instance *inst);

#endif
