/* bad_vtable.c — an optimizer whose mandatory 'step' slot is NULL. */
#include "testplug.h"

static size_t state_count(void *state) {
    (void)state;
    return 0;
}

static const mt_optimizer_vtable vtable = {
    MT_VTABLE_SIZE(mt_optimizer_vtable),
    .create = tp_create,
    .destroy = tp_destroy,
    .step = NULL,
    .state_count = state_count,
};

static const mt_plugin_descriptor desc = {
    .abi_version = MT_PLUGIN_ABI_VERSION,
    .size = sizeof(mt_plugin_descriptor),
    .option_size = sizeof(mt_option_spec),
    .kind = MT_PLUGIN_OPTIMIZER,
    .name = "bad_vtable",
    .version = "1.0.0",
    .description = "an optimizer that cannot step",
    .vtable = &vtable,
};

MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entry(const mt_host *host) {
    (void)host;
    return &desc;
}
