/* registry.c — the core side of the plugin ABI: loading one plugin file (dlopen,
 * the entry symbol, the ABI and descriptor checks), the registry of every plugin on
 * the search path, lookup by kind and name, and instances with validated options.
 *
 * Every refusal names the file, says what was expected and what was found, and closes
 * the library again, so that a refused plugin leaves nothing behind in the process. */
#define _GNU_SOURCE /* dladdr */
#include "plugin/registry.h"

#include <dirent.h>
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/internal.h"

#ifndef MT_PLUGIN_DIR
#define MT_PLUGIN_DIR "/usr/local/lib/moontune/plugins"
#endif

#define MT_PLUGIN_NAME_MAX 64
#define MT_PLUGIN_OPTIONS_MAX 256

struct mt_plugin {
    char *path;                       /* as found: directory joined with the file name */
    void *handle;                     /* dlopen handle */
    const mt_plugin_descriptor *desc; /* static data inside the library */
};

/* ---- kinds ------------------------------------------------------------------ */

const char *mt_plugin_kind_name(mt_plugin_kind kind) {
    switch (kind) {
    case MT_PLUGIN_OPTIMIZER: return "optimizer";
    case MT_PLUGIN_LOSS: return "loss";
    case MT_PLUGIN_ADAPTER: return "adapter";
    case MT_PLUGIN_SCHEDULER: return "scheduler";
    }
    return NULL;
}

mt_plugin_kind mt_plugin_kind_parse(const char *name) {
    static const struct {
        const char *name;
        mt_plugin_kind kind;
    } names[] = {
        {"optimizer", MT_PLUGIN_OPTIMIZER}, {"optim", MT_PLUGIN_OPTIMIZER},
        {"loss", MT_PLUGIN_LOSS},           {"adapter", MT_PLUGIN_ADAPTER},
        {"scheduler", MT_PLUGIN_SCHEDULER}, {"sched", MT_PLUGIN_SCHEDULER},
    };
    for (size_t i = 0; name && i < sizeof names / sizeof names[0]; i++)
        if (!strcmp(name, names[i].name)) return names[i].kind;
    return (mt_plugin_kind)0;
}

/* "an optimizer", "a loss", ... */
static const char *kind_article(mt_plugin_kind kind) {
    return kind == MT_PLUGIN_OPTIMIZER || kind == MT_PLUGIN_ADAPTER ? "an" : "a";
}

const mt_plugin_descriptor *mt_plugin_desc(const mt_plugin *p) { return p ? p->desc : NULL; }
const char *mt_plugin_path(const mt_plugin *p) { return p ? p->path : NULL; }

/* ---- the kinds' vtables -------------------------------------------------------- */

typedef mt_status (*create_fn)(const mt_host *host, const mt_options *opts, void **state,
                               mt_error *err);
typedef void (*destroy_fn)(void *state);

/* create and destroy of any kind (each vtable is read through its own type). */
static void lifecycle_slots(const mt_plugin_descriptor *d, create_fn *create, destroy_fn *destroy) {
    *create = NULL;
    *destroy = NULL;
    switch (d->kind) {
    case MT_PLUGIN_OPTIMIZER: {
        const mt_optimizer_vtable *v = d->vtable;
        *create = v->create;
        *destroy = v->destroy;
        break;
    }
    case MT_PLUGIN_LOSS: {
        const mt_loss_vtable *v = d->vtable;
        *create = v->create;
        *destroy = v->destroy;
        break;
    }
    case MT_PLUGIN_ADAPTER: {
        const mt_adapter_vtable *v = d->vtable;
        *create = v->create;
        *destroy = v->destroy;
        break;
    }
    case MT_PLUGIN_SCHEDULER: {
        const mt_scheduler_vtable *v = d->vtable;
        *create = v->create;
        *destroy = v->destroy;
        break;
    }
    }
}

/* Bytes of a kind's vtable up to the end of its last mandatory slot: a vtable must reach
 * that far; optional slots past it are read only when its size reaches them
 * (MT_VTABLE_HAS). */
#define SLOT_END(type, slot) (offsetof(type, slot) + sizeof(((type *)0)->slot))
static size_t vtable_min_size(mt_plugin_kind kind) {
    switch (kind) {
    case MT_PLUGIN_OPTIMIZER: return SLOT_END(mt_optimizer_vtable, state_set);
    case MT_PLUGIN_SCHEDULER: return SLOT_END(mt_scheduler_vtable, lr);
    case MT_PLUGIN_LOSS: return SLOT_END(mt_loss_vtable, compute);
    case MT_PLUGIN_ADAPTER: return SLOT_END(mt_adapter_vtable, attach);
    }
    return 0;
}
#undef SLOT_END

/* The first mandatory slot of the kind's vtable that is NULL, or NULL when all are set.
 * Optional slots (adapter merge, unmerge, set_enabled) are not checked. */
static const char *missing_slot(const mt_plugin_descriptor *d) {
    switch (d->kind) {
    case MT_PLUGIN_OPTIMIZER: {
        const mt_optimizer_vtable *v = d->vtable;
        if (!v->create) return "create";
        if (!v->destroy) return "destroy";
        if (!v->step) return "step";
        if (!v->state_count) return "state_count";
        if (!v->state_get) return "state_get";
        if (!v->state_set) return "state_set";
        return NULL;
    }
    case MT_PLUGIN_SCHEDULER: {
        const mt_scheduler_vtable *v = d->vtable;
        if (!v->create) return "create";
        if (!v->destroy) return "destroy";
        if (!v->lr) return "lr";
        return NULL;
    }
    case MT_PLUGIN_LOSS: {
        const mt_loss_vtable *v = d->vtable;
        if (!v->create) return "create";
        if (!v->destroy) return "destroy";
        if (!v->compute) return "compute";
        return NULL;
    }
    case MT_PLUGIN_ADAPTER: {
        const mt_adapter_vtable *v = d->vtable;
        if (!v->create) return "create";
        if (!v->destroy) return "destroy";
        if (!v->attach) return "attach";
        return NULL;
    }
    }
    return NULL;
}

/* ---- the descriptor checks ------------------------------------------------------ */

static int valid_plugin_name(const char *s) {
    size_t n = 0;
    for (; s[n]; n++) {
        char c = s[n];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-')) return 0;
    }
    return n > 0 && n <= MT_PLUGIN_NAME_MAX;
}

/* Option names are Lua table keys a recipe writes as `name = value`. */
static int valid_option_name(const char *s) {
    size_t n = 0;
    for (; s[n]; n++) {
        char c = s[n];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_'))
            return 0;
    }
    return n > 0 && n <= MT_PLUGIN_NAME_MAX && !(s[0] >= '0' && s[0] <= '9');
}

/* The option schema: names present, well-formed and unique, types valid, and every
 * default valid for its own type, range and choices (checked by building the options
 * of an instance with no keys given, exactly as a recipe with no options would). */
static mt_status check_options(const char *path, const mt_plugin_descriptor *d, mt_error *err) {
#define SCHEMA_ERR(...)                                                                          \
    do {                                                                                         \
        char detail_[384];                                                                       \
        snprintf(detail_, sizeof detail_, __VA_ARGS__);                                          \
        return mt_error_set(err, MT_ERR_FORMAT, "%s: plugin '%s' has a bad option schema: %s",   \
                            path, d->name, detail_);                                             \
    } while (0)
    if (d->n_options > 0 && !d->options)
        SCHEMA_ERR("n_options is %zu but options is NULL", d->n_options);
    if (d->n_options > MT_PLUGIN_OPTIONS_MAX)
        SCHEMA_ERR("%zu options declared (at most %d)", d->n_options, MT_PLUGIN_OPTIONS_MAX);
    for (size_t i = 0; i < d->n_options; i++) {
        const mt_option_spec *s = &d->options[i];
        if (!s->name) SCHEMA_ERR("option %zu has no name (NULL)", i);
        if (!valid_option_name(s->name))
            SCHEMA_ERR("option %zu has an invalid name \"%.64s\" (expected letters, digits and "
                       "'_', not starting with a digit, at most %d characters)",
                       i, s->name, MT_PLUGIN_NAME_MAX);
        if (s->type < MT_OPT_BOOL || s->type > MT_OPT_STRING_LIST)
            SCHEMA_ERR("option '%s' has an invalid type %d (expected %d..%d: bool, int, float, "
                       "string, string list)",
                       s->name, (int)s->type, (int)MT_OPT_BOOL, (int)MT_OPT_STRING_LIST);
        for (size_t j = 0; j < i; j++)
            if (!strcmp(d->options[j].name, s->name))
                SCHEMA_ERR("option '%s' is declared twice (options %zu and %zu)", s->name, j, i);
        if (s->type == MT_OPT_BOOL && s->default_value && *s->default_value &&
            strcmp(s->default_value, "true") && strcmp(s->default_value, "false"))
            SCHEMA_ERR("option '%s': bool default \"%s\" is neither \"true\" nor \"false\"",
                       s->name, s->default_value);
    }
    mt_error oerr = {0};
    mt_options *opts = NULL;
    mt_status st = mt_options_build(d->options, d->n_options, d->name, path, NULL, 0, &opts, &oerr);
    if (st == MT_ERR_NOMEM) return mt_error_set(err, st, "%s: %s", path, oerr.msg);
    if (st) {
        /* options.c opens its message with "plugin 'NAME' (PATH): "; we already said both. */
        char prefix[PATH_MAX + 128];
        snprintf(prefix, sizeof prefix, "plugin '%s' (%s): ", d->name, path);
        const char *detail = oerr.msg;
        if (!strncmp(detail, prefix, strlen(prefix))) detail += strlen(prefix);
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: plugin '%s' has a bad option schema: a default does not "
                            "validate: %s",
                            path, d->name, detail);
    }
    mt_options_free(opts);
    return MT_OK;
#undef SCHEMA_ERR
}

/* Everything after the entry returned: the order matters, since fields past abi_version
 * mean nothing under another ABI, and the vtable's type depends on the kind. */
static mt_status check_descriptor(const char *path, const mt_plugin_descriptor *d, mt_error *err) {
    if (!d)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: %s() returned NULL instead of a plugin descriptor", path,
                            MT_PLUGIN_ENTRY_SYMBOL);
    if (d->abi_version < MT_PLUGIN_ABI_OLDEST || d->abi_version > MT_PLUGIN_ABI_VERSION)
        return mt_error_set(
            err, MT_ERR_UNSUPPORTED,
            "%s: built for plugin ABI %u; this moontune loads ABI %d..%d%s", path,
            (unsigned)d->abi_version, MT_PLUGIN_ABI_OLDEST, MT_PLUGIN_ABI_VERSION,
            d->abi_version == 1
                ? ". ABI 1 plugins compute on host pointers and must be rebuilt against "
                  "moontune/plugin.h version 2 (docs/plugins.md)"
                : d->abi_version > MT_PLUGIN_ABI_VERSION
                      ? " (the plugin is newer than this moontune: update moontune)"
                      : " (rebuild it against this moontune's moontune/plugin.h)");
    /* From ABI 2 on every field below is read only as far as the plugin's sizes reach. */
    if (d->size < sizeof(mt_plugin_descriptor))
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: bad descriptor: its size is %u bytes, an ABI %u descriptor has "
                            "%zu (set .size = sizeof(mt_plugin_descriptor), as MT_PLUGIN_DEFINE "
                            "does)",
                            path, (unsigned)d->size, (unsigned)d->abi_version,
                            sizeof(mt_plugin_descriptor));
    if (!mt_plugin_kind_name(d->kind))
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: invalid plugin kind %d (expected 1 optimizer, 2 loss, 3 adapter "
                            "or 4 scheduler)",
                            path, (int)d->kind);
    const char *kind = mt_plugin_kind_name(d->kind);
    if (!d->name || !valid_plugin_name(d->name))
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: bad descriptor: %s plugin name %s%.64s%s is invalid (expected 1 "
                            "to %d characters of a-z, 0-9, '_' and '-')",
                            path, kind, d->name ? "\"" : "", d->name ? d->name : "NULL",
                            d->name ? "\"" : "", MT_PLUGIN_NAME_MAX);
    if (!d->version)
        return mt_error_set(err, MT_ERR_FORMAT, "%s: bad descriptor: %s '%s' has no version (NULL)",
                            path, kind, d->name);
    if (!d->description)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: bad descriptor: %s '%s' has no description (NULL)", path, kind,
                            d->name);
    if (!d->vtable)
        return mt_error_set(err, MT_ERR_FORMAT, "%s: bad descriptor: %s '%s' has no vtable (NULL)",
                            path, kind, d->name);
    size_t need = vtable_min_size(d->kind), have = *(const uint32_t *)d->vtable;
    if (have < need)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: bad descriptor: %s '%s' has a vtable size of %zu bytes, fewer "
                            "than the %zu its mandatory slots take (set .size = sizeof of the "
                            "vtable type)",
                            path, kind, d->name, have, need);
    if (d->n_options && d->option_size != sizeof(mt_option_spec))
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: bad descriptor: %s '%s' declares option specs of %u bytes; "
                            "mt_option_spec has %zu",
                            path, kind, d->name, (unsigned)d->option_size, sizeof(mt_option_spec));
    const char *slot = missing_slot(d);
    if (slot)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: bad descriptor: %s '%s' leaves the mandatory vtable slot '%s' NULL",
                            path, kind, d->name, slot);
    return check_options(path, d, err);
}

/* ---- one file --------------------------------------------------------------------- */

/* The ELF machine this build runs on, and its name. */
#if defined(__x86_64__)
#define HOST_MACHINE EM_X86_64
#define HOST_MACHINE_NAME "x86-64"
#elif defined(__aarch64__)
#define HOST_MACHINE EM_AARCH64
#define HOST_MACHINE_NAME "AArch64"
#endif

static const char *machine_name(unsigned m) {
    switch (m) {
    case EM_386: return "x86 (32-bit)";
    case EM_X86_64: return "x86-64";
    case EM_AARCH64: return "AArch64";
    case EM_ARM: return "ARM (32-bit)";
    case EM_RISCV: return "RISC-V";
    case EM_PPC64: return "POWER";
    case EM_S390: return "s390";
    default: return "another machine";
    }
}

/* The little-endian unsigned integer of n bytes at p. */
static uint64_t elf_le(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = n; i-- > 0;) v = v << 8 | p[i];
    return v;
}

/* Reads the ELF header before dlopen, whose messages for a file of another
 * architecture or kind ("No such file or directory", "invalid ELF header") mislead. */
static mt_status check_elf(const char *path, uint64_t size, mt_error *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return mt_error_set(err, MT_ERR_IO, "%s: cannot open plugin: %s", path, strerror(errno));
    unsigned char h[64];
    size_t n = fread(h, 1, sizeof h, f);
    fclose(f);
    if (n < 20 || memcmp(h, ELFMAG, SELFMAG) != 0)
        return mt_error_set(err, MT_ERR_FORMAT, "%s: not a plugin: not an ELF shared object (%s)", path,
                            n < 4 ? "the file is too short" : "no ELF magic number");
    const int is64 = h[EI_CLASS] == ELFCLASS64, little = h[EI_DATA] == ELFDATA2LSB;
    const unsigned type = little ? (unsigned)(h[16] | h[17] << 8) : (unsigned)(h[16] << 8 | h[17]);
    const unsigned machine = little ? (unsigned)(h[18] | h[19] << 8) : (unsigned)(h[18] << 8 | h[19]);
#ifdef HOST_MACHINE
    if (machine != HOST_MACHINE)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: not a plugin for this machine: it was built for %s (ELF machine %u, "
                            "%d-bit%s), this is %s: rebuild it here",
                            path, machine_name(machine), machine, is64 ? 64 : 32,
                            little ? "" : " big-endian", HOST_MACHINE_NAME);
    if (!is64 || !little) /* the right machine number in a 32-bit or big-endian file */
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: not a plugin for this machine: it is a %s%s%s ELF file (ELF machine "
                            "%u), this is 64-bit little-endian %s: rebuild it here",
                            path, is64 ? "" : "32-bit", !is64 && !little ? ", " : "",
                            little ? "" : "big-endian", machine, HOST_MACHINE_NAME);
#else
    (void)is64;
    (void)machine;
#endif
    if (type != ET_DYN)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: not a plugin: an ELF %s, not a shared object (build it with -shared)",
                            path, type == ET_EXEC ? "executable" : type == ET_REL ? "object file" : "file");
    if (is64 && little && n >= 64) {
        /* the program and section header tables lie inside the file, the section headers
         * usually at its very end: a cut-off copy shows here (dlopen: "cannot read file
         * data") */
        const uint64_t phoff = elf_le(h + 32, 8), shoff = elf_le(h + 40, 8);
        const uint64_t phentsize = elf_le(h + 54, 2), phnum = elf_le(h + 56, 2);
        const uint64_t shentsize = elf_le(h + 58, 2), shnum = elf_le(h + 60, 2);
        uint64_t need = 0;
        if (phnum && phoff <= UINT64_MAX - phnum * phentsize) need = phoff + phnum * phentsize;
        if (shnum && shoff <= UINT64_MAX - shnum * shentsize && shoff + shnum * shentsize > need)
            need = shoff + shnum * shentsize;
        if (need > size)
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: not a plugin moontune can load: the file is truncated: its ELF "
                                "header places tables up to byte %llu, but the file has %llu bytes "
                                "(an interrupted copy or build?)",
                                path, (unsigned long long)need, (unsigned long long)size);
    }
    return MT_OK;
}

mt_status mt_plugin_load(const char *path, mt_plugin **out, mt_error *err) {
    *out = NULL;
    if (!path || !*path) return mt_error_set(err, MT_ERR_INVALID_ARG, "plugin path is empty");
    struct stat sb;
    if (stat(path, &sb) != 0)
        return mt_error_set(err, MT_ERR_IO, "%s: cannot open plugin: %s", path, strerror(errno));
    if (!S_ISREG(sb.st_mode))
        return mt_error_set(err, MT_ERR_FORMAT, "%s: not a shared object (not a regular file)", path);
    mt_status est = check_elf(path, (uint64_t)sb.st_size, err);
    if (est) return est;

    mt_plugin *p = mt_calloc(1, sizeof *p, "plugin", err);
    if (!p) return MT_ERR_NOMEM;
    /* A name without '/' would make dlopen search the library path instead of the file. */
    p->path = strchr(path, '/') ? mt_strdup(path, "plugin path", err)
                                : mt_path_join(".", path, err);
    if (!p->path) {
        free(p);
        return MT_ERR_NOMEM;
    }

    dlerror();
    p->handle = dlopen(p->path, RTLD_NOW | RTLD_LOCAL);
    if (!p->handle) {
        const char *why = dlerror();
        if (!why) why = "unknown dlopen error";
        /* glibc prefixes the file name; ours already opens the message. */
        size_t plen = strlen(p->path);
        if (!strncmp(why, p->path, plen) && !strncmp(why + plen, ": ", 2)) why += plen + 2;
        mt_error_set(err, MT_ERR_FORMAT, "%s: not a shared object moontune can load: %s", path,
                     why);
        mt_plugin_unload(p);
        return MT_ERR_FORMAT;
    }

    void *sym = dlsym(p->handle, MT_PLUGIN_ENTRY_SYMBOL);
    if (!sym) {
        mt_error_set(err, MT_ERR_FORMAT,
                     "%s: not a moontune plugin: it does not export the entry symbol '%s' "
                     "(expected MT_PLUGIN_EXPORT const mt_plugin_descriptor *%s(const mt_host *))",
                     path, MT_PLUGIN_ENTRY_SYMBOL, MT_PLUGIN_ENTRY_SYMBOL);
        mt_plugin_unload(p);
        return MT_ERR_FORMAT;
    }
    mt_plugin_entry_fn entry;
    memcpy(&entry, &sym, sizeof entry); /* POSIX: dlsym's object pointer is the function */

    p->desc = entry(mt_host_table());
    mt_status st = check_descriptor(path, p->desc, err);
    if (st) {
        mt_plugin_unload(p);
        return st;
    }
    *out = p;
    return MT_OK;
}

void mt_plugin_unload(mt_plugin *p) {
    if (!p) return;
    if (p->handle) dlclose(p->handle);
    free(p->path);
    free(p);
}

/* ---- the registry ------------------------------------------------------------------ */

struct mt_registry {
    mt_plugin **plugins; /* in the order found: search path order, sorted within a directory */
    size_t n, cap;
    char **refusals;
    size_t n_refusals, cap_refusals;
    char **dirs; /* canonical directories already scanned (each is scanned once) */
    size_t n_dirs, cap_dirs;
    char **searched; /* the directories as given, for messages */
    size_t n_searched, cap_searched;
};

/* Appends item to a growing array of pointers. */
static int push(void ***items, size_t *n, size_t *cap, void *item) {
    if (*n == *cap) {
        size_t c = *cap ? *cap * 2 : 8;
        void **grown = realloc(*items, c * sizeof *grown);
        if (!grown) return 0;
        *items = grown;
        *cap = c;
    }
    (*items)[(*n)++] = item;
    return 1;
}

static char *format_alloc(const char *fmt, va_list ap) MT_PRINTF(1, 0);
static char *format_alloc(const char *fmt, va_list ap) {
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    if (n < 0) return NULL;
    char *s = malloc((size_t)n + 1);
    if (s) vsnprintf(s, (size_t)n + 1, fmt, ap);
    return s;
}

static mt_status add_refusal(mt_registry *r, mt_error *err, const char *fmt, ...) MT_PRINTF(3, 4);
static mt_status add_refusal(mt_registry *r, mt_error *err, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *msg = format_alloc(fmt, ap);
    va_end(ap);
    if (!msg || !push((void ***)&r->refusals, &r->n_refusals, &r->cap_refusals, msg)) {
        free(msg);
        return mt_error_set(err, MT_ERR_NOMEM, "out of memory recording a plugin refusal");
    }
    return MT_OK;
}

static int compare_strings(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* dir + rel when that is a directory (canonical, so messages show no "/../"), else NULL. */
static char *existing_dir(const char *dir, size_t dir_len, const char *rel) {
    size_t r = strlen(rel);
    char *path = malloc(dir_len + r + 1);
    if (!path) return NULL;
    memcpy(path, dir, dir_len);
    memcpy(path + dir_len, rel, r + 1);
    char *canon = mt_is_dir(path) ? realpath(path, NULL) : NULL;
    free(path);
    return canon;
}

/* The plugin directory of an installed tree that lives under another prefix than the
 * configured one (cmake --install --prefix, a moved package): <prefix>/bin/moontune
 * and <prefix>/<libdir>/moontune/plugins, where <libdir> is the last one, two or three
 * components of the configured libdir ("lib", "lib/x86_64-linux-gnu", ...). */
static char *relocated_install_dir(const char *exe_dir, size_t exe_dir_len) {
    static const char configured[] = MT_PLUGIN_DIR, suffix[] = "/moontune/plugins";
    size_t n = strlen(configured), s = strlen(suffix);
    if (n <= s || strcmp(configured + n - s, suffix)) return NULL;
    const char *tail = configured + n - s; /* "/<libdir tail>/moontune/plugins" */
    for (int k = 0; k < 3 && tail > configured; k++) {
        const char *p = tail - 1;
        while (p > configured && *p != '/') p--;
        if (*p != '/') break;
        tail = p;
        char rel[sizeof configured + 4];
        snprintf(rel, sizeof rel, "/..%s", tail);
        char *dir = existing_dir(exe_dir, exe_dir_len, rel);
        if (dir) return dir;
    }
    return NULL;
}

/* The built-in directory, the first that exists of:
 * - plugins/ next to the running executable: the build tree (build/moontune and
 *   build/plugins/);
 * - the installed plugin directory relative to the executable (a relocated install);
 * - plugins/ or moontune/plugins/ next to the library holding this code (a program
 *   embedding libmoontune.so from a build tree or an install);
 * - the configured MT_PLUGIN_DIR (which is also what is returned when none exists). */
static char *builtin_dir(mt_error *err) {
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = '\0';
        const char *slash = strrchr(exe, '/');
        if (slash) {
            size_t len = (size_t)(slash - exe);
            char *dir = existing_dir(exe, len, "/plugins");
            if (!dir) dir = relocated_install_dir(exe, len);
            if (dir) return dir;
        }
    }
    Dl_info info;
    void *self;
    mt_status (*fn)(const char *const *, size_t, mt_registry **, mt_error *) = mt_registry_open;
    memcpy(&self, &fn, sizeof self);
    if (dladdr(self, &info) && info.dli_fname && info.dli_fname[0] == '/') {
        const char *slash = strrchr(info.dli_fname, '/');
        size_t len = (size_t)(slash - info.dli_fname);
        char *dir = existing_dir(info.dli_fname, len, "/plugins");
        if (!dir) dir = existing_dir(info.dli_fname, len, "/moontune/plugins");
        if (dir) return dir;
    }
    return mt_strdup(MT_PLUGIN_DIR, "plugin directory", err);
}

/* Loads a newly found plugin into the registry, or refuses it as a duplicate. */
static mt_status admit(mt_registry *r, mt_plugin *p, mt_error *err) {
    const mt_plugin_descriptor *d = p->desc;
    for (size_t i = 0; i < r->n; i++) {
        const mt_plugin *q = r->plugins[i];
        if (q->desc->kind != d->kind || strcmp(q->desc->name, d->name)) continue;
        const char *qs = strrchr(q->path, '/'), *ps = strrchr(p->path, '/');
        int same_dir = qs && ps && qs - q->path == ps - p->path &&
                       !strncmp(q->path, p->path, (size_t)(qs - q->path));
        mt_status st =
            add_refusal(r, err, "%s: %s '%s' is also provided by %s, which wins because %s", p->path,
                        mt_plugin_kind_name(d->kind), d->name, q->path,
                        same_dir ? "its file name sorts first in the same directory"
                                 : "it comes earlier on the search path (built-in directory, then "
                                   "MOONTUNE_PLUGIN_PATH, then recipe directories)");
        mt_plugin_unload(p);
        return st;
    }
    if (!push((void ***)&r->plugins, &r->n, &r->cap, p)) {
        mt_plugin_unload(p);
        return mt_error_set(err, MT_ERR_NOMEM, "out of memory registering a plugin");
    }
    return MT_OK;
}

/* Scans one directory: every *.so file in sorted order. Only running out of memory is
 * fatal; an unreadable directory or a refused file becomes a refusal message. */
static mt_status scan_dir(mt_registry *r, const char *dir, const char *origin, mt_error *err) {
    char *canon = realpath(dir, NULL);
    int resolve_errno = errno;
    for (size_t i = 0; canon && i < r->n_dirs; i++)
        if (!strcmp(r->dirs[i], canon)) { /* named twice on the path: scan it once */
            free(canon);
            return MT_OK;
        }
    if (canon && !push((void ***)&r->dirs, &r->n_dirs, &r->cap_dirs, canon)) {
        free(canon);
        return mt_error_set(err, MT_ERR_NOMEM, "out of memory scanning %s", dir);
    }
    char *shown = mt_strdup(dir, "plugin directory", err);
    if (!shown) return MT_ERR_NOMEM;
    if (!push((void ***)&r->searched, &r->n_searched, &r->cap_searched, shown)) {
        free(shown);
        return mt_error_set(err, MT_ERR_NOMEM, "out of memory scanning %s", dir);
    }
    if (!canon)
        return add_refusal(r, err, "%s: cannot read plugin directory (%s): %s", dir, origin,
                           strerror(resolve_errno));

    DIR *dh = opendir(dir);
    if (!dh)
        return add_refusal(r, err, "%s: cannot read plugin directory (%s): %s", dir, origin,
                           strerror(errno));
    char **names = NULL;
    size_t n = 0, cap = 0;
    mt_status st = MT_OK;
    struct dirent *e;
    while ((e = readdir(dh)) != NULL) {
        if (e->d_name[0] == '.' || !mt_ends_with(e->d_name, ".so")) continue;
        char *name = strdup(e->d_name);
        if (!name || !push((void ***)&names, &n, &cap, name)) {
            free(name);
            st = mt_error_set(err, MT_ERR_NOMEM, "out of memory scanning %s", dir);
            break;
        }
    }
    closedir(dh);
    if (n > 1) qsort(names, n, sizeof *names, compare_strings);
    for (size_t i = 0; i < n && st == MT_OK; i++) {
        char *path = mt_path_join(dir, names[i], err);
        if (!path) {
            st = MT_ERR_NOMEM;
            break;
        }
        mt_plugin *p = NULL;
        mt_error lerr = {0};
        mt_status ls = mt_plugin_load(path, &p, &lerr);
        if (ls == MT_ERR_NOMEM) st = mt_error_set(err, ls, "%s", lerr.msg);
        else if (ls) st = add_refusal(r, err, "%s", lerr.msg);
        else st = admit(r, p, err);
        free(path);
    }
    for (size_t i = 0; i < n; i++) free(names[i]);
    free(names);
    return st;
}

mt_status mt_registry_open(const char *const *extra_dirs, size_t n_extra, mt_registry **out,
                           mt_error *err) {
    *out = NULL;
    mt_registry *r = mt_calloc(1, sizeof *r, "plugin registry", err);
    if (!r) return MT_ERR_NOMEM;

    char *builtin = builtin_dir(err);
    if (!builtin) {
        mt_registry_close(r);
        return MT_ERR_NOMEM;
    }
    mt_status st = scan_dir(r, builtin, "built-in directory", err);
    free(builtin);

    const char *env = getenv("MOONTUNE_PLUGIN_PATH");
    if (st == MT_OK && env && *env) {
        char *copy = mt_strdup(env, "MOONTUNE_PLUGIN_PATH", err);
        if (!copy) st = MT_ERR_NOMEM;
        for (char *p = copy; st == MT_OK && p;) {
            char *colon = strchr(p, ':');
            if (colon) *colon = '\0';
            if (*p) st = scan_dir(r, p, "from MOONTUNE_PLUGIN_PATH", err);
            p = colon ? colon + 1 : NULL;
        }
        free(copy);
    }
    for (size_t i = 0; st == MT_OK && i < n_extra; i++)
        if (extra_dirs[i] && *extra_dirs[i])
            st = scan_dir(r, extra_dirs[i], "named by the recipe", err);

    if (st) {
        mt_registry_close(r);
        return st;
    }
    *out = r;
    return MT_OK;
}

void mt_registry_close(mt_registry *r) {
    if (!r) return;
    for (size_t i = 0; i < r->n; i++) mt_plugin_unload(r->plugins[i]);
    for (size_t i = 0; i < r->n_refusals; i++) free(r->refusals[i]);
    for (size_t i = 0; i < r->n_dirs; i++) free(r->dirs[i]);
    for (size_t i = 0; i < r->n_searched; i++) free(r->searched[i]);
    free(r->plugins);
    free(r->refusals);
    free(r->dirs);
    free(r->searched);
    free(r);
}

size_t mt_registry_count(const mt_registry *r) { return r ? r->n : 0; }

const mt_plugin *mt_registry_at(const mt_registry *r, size_t index) {
    return r && index < r->n ? r->plugins[index] : NULL;
}

size_t mt_registry_refusal_count(const mt_registry *r) { return r ? r->n_refusals : 0; }

const char *mt_registry_refusal(const mt_registry *r, size_t index) {
    return r && index < r->n_refusals ? r->refusals[index] : NULL;
}

/* Appends s to a fixed buffer, truncating quietly. */
static void append(char *buf, size_t size, const char *s) {
    size_t len = strlen(buf);
    if (len + 1 < size) snprintf(buf + len, size - len, "%s", s);
}

const mt_plugin *mt_registry_find(const mt_registry *r, mt_plugin_kind kind, const char *name,
                                  mt_error *err) {
    const char *kname = mt_plugin_kind_name(kind);
    if (!r || !name || !kname) {
        mt_error_set(err, MT_ERR_INVALID_ARG, "plugin lookup: %s",
                     !kname ? "invalid plugin kind" : "no registry or no name");
        return NULL;
    }
    for (size_t i = 0; i < r->n; i++)
        if (r->plugins[i]->desc->kind == kind && !strcmp(r->plugins[i]->desc->name, name))
            return r->plugins[i];
    if (!err) return NULL;

    /* The names of this kind, sorted, for the message. */
    const char **names = calloc(r->n ? r->n : 1, sizeof *names);
    size_t n = 0;
    for (size_t i = 0; names && i < r->n; i++)
        if (r->plugins[i]->desc->kind == kind) names[n++] = r->plugins[i]->desc->name;
    if (n > 1) qsort(names, n, sizeof *names, compare_strings);
    char available[MT_ERROR_MSG_MAX] = "";
    for (size_t i = 0; i < n; i++) {
        if (i) append(available, sizeof available, ", ");
        append(available, sizeof available, names[i]);
    }
    free(names);
    if (n == 0) {
        append(available, sizeof available, "none; searched ");
        for (size_t i = 0; i < r->n_searched; i++) {
            if (i) append(available, sizeof available, ", ");
            append(available, sizeof available, r->searched[i]);
        }
        if (r->n_searched == 0) append(available, sizeof available, "no readable directory");
    }

    const mt_plugin *other = NULL;
    for (size_t i = 0; i < r->n && !other; i++)
        if (!strcmp(r->plugins[i]->desc->name, name)) other = r->plugins[i];
    if (other) {
        mt_plugin_kind ok = other->desc->kind;
        mt_error_set(err, MT_ERR_INVALID_ARG,
                     "no %s plugin named '%s': '%s' is %s %s (%s), not %s %s (available %s "
                     "plugins: %s)",
                     kname, name, name, kind_article(ok), mt_plugin_kind_name(ok), other->path,
                     kind_article(kind), kname, kname, available);
        return NULL;
    }
    /* A file named after the plugin that was refused is most likely the reason. */
    const char *refused = NULL;
    char needle[MT_PLUGIN_NAME_MAX + 16];
    snprintf(needle, sizeof needle, "/%s.so: ", name);
    for (size_t i = 0; i < r->n_refusals && !refused; i++)
        if (strstr(r->refusals[i], needle)) refused = r->refusals[i];
    if (refused) {
        mt_error_set(err, MT_ERR_INVALID_ARG,
                     "no %s plugin named '%s' (available: %s); a file of that name was refused: %s",
                     kname, name, available, refused);
        return NULL;
    }
    mt_error_set(err, MT_ERR_INVALID_ARG, "no %s plugin named '%s' (available: %s)", kname, name,
                 available);
    return NULL;
}

/* ---- instances ------------------------------------------------------------------------ */

mt_status mt_plugin_instantiate(const mt_plugin *p, const mt_kv *kv, size_t n_kv,
                                mt_plugin_instance **out, mt_error *err) {
    *out = NULL;
    if (!p) return mt_error_set(err, MT_ERR_INVALID_ARG, "plugin instance: no plugin given");
    const mt_plugin_descriptor *d = p->desc;
    mt_plugin_instance *inst = mt_calloc(1, sizeof *inst, "plugin instance", err);
    if (!inst) return MT_ERR_NOMEM;
    inst->plugin = p;
    inst->desc = d;
    mt_status st = mt_options_build(d->options, d->n_options, d->name, p->path, kv, n_kv,
                                    &inst->options, err);
    if (st) {
        free(inst);
        return st;
    }
    create_fn create;
    destroy_fn destroy;
    lifecycle_slots(d, &create, &destroy);
    mt_error perr = {0};
    /* A create that fails owns whatever it allocated: the state is not destroyed. */
    st = create(mt_host_table(), inst->options, &inst->state, &perr);
    if (st) {
        char quoted[MT_PLUGIN_NAME_MAX + 3];
        snprintf(quoted, sizeof quoted, "'%s'", d->name);
        if (!perr.msg[0])
            mt_error_set(err, st, "plugin '%s' (%s): create failed (%s) without a message",
                         d->name, p->path, mt_status_name(st));
        else if (strstr(perr.msg, quoted))
            mt_error_set(err, st, "%s", perr.msg);
        else
            mt_error_set(err, st, "plugin '%s' (%s): %s", d->name, p->path, perr.msg);
        mt_options_free(inst->options);
        free(inst);
        return st;
    }
    *out = inst;
    return MT_OK;
}

void mt_plugin_instance_free(mt_plugin_instance *inst) {
    if (!inst) return;
    if (inst->state) {
        create_fn create;
        destroy_fn destroy;
        lifecycle_slots(inst->desc, &create, &destroy);
        destroy(inst->state);
    }
    mt_options_free(inst->options);
    free(inst);
}
