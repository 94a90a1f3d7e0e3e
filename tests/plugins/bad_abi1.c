/* bad_abi1.c — a scheduler as a plugin built against plugin ABI 1 looked: its descriptor
 * in ABI 1's layout (no size fields, kind right after the version) and a vtable of bare
 * function pointers. Written without moontune's headers, as an old binary would have been
 * compiled against the old plugin.h. The loader reads abi_version, which every ABI keeps
 * first, and refuses it: ABI 1 plugins compute on raw host pointers and must be rebuilt. */
#include <stddef.h>
#include <stdint.h>

/* ABI 1's descriptor, field for field (moontune/plugin.h as of ABI 1). */
typedef struct abi1_descriptor {
    uint32_t abi_version;
    int kind; /* mt_plugin_kind: 4 is a scheduler */
    const char *name;
    const char *version;
    const char *description;
    const void *options;
    size_t n_options;
    const void *vtable;
} abi1_descriptor;

/* ABI 1's scheduler vtable: create, destroy, lr, with no size in front. */
typedef struct abi1_scheduler_vtable {
    int (*create)(const void *host, const void *opts, void **state, void *err);
    void (*destroy)(void *state);
    double (*lr)(void *state, int64_t step, int64_t total_steps, double base_lr);
} abi1_scheduler_vtable;

static int create(const void *host, const void *opts, void **state, void *err) {
    (void)host;
    (void)opts;
    (void)err;
    *state = NULL;
    return 0;
}

static void destroy(void *state) { (void)state; }

static double lr(void *state, int64_t step, int64_t total_steps, double base_lr) {
    (void)state;
    (void)step;
    (void)total_steps;
    return base_lr;
}

static const abi1_scheduler_vtable vtable = {create, destroy, lr};

static const abi1_descriptor desc = {
    .abi_version = 1,
    .kind = 4,
    .name = "bad_abi1",
    .version = "1.0.0",
    .description = "a plugin built against ABI 1",
    .vtable = &vtable,
};

const abi1_descriptor *moontune_plugin_entry(const void *host);

__attribute__((visibility("default"))) const abi1_descriptor *
moontune_plugin_entry(const void *host) {
    (void)host;
    return &desc;
}
