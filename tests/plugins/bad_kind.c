/* bad_kind.c — a descriptor with kind 42, which is none of the four kinds. */
#include "testplug.h"

static const mt_plugin_descriptor desc = {
    .abi_version = MT_PLUGIN_ABI_VERSION,
    .size = sizeof(mt_plugin_descriptor),
    .option_size = sizeof(mt_option_spec),
    .kind = (mt_plugin_kind)42,
    .name = "bad_kind",
    .version = "1.0.0",
    .description = "an invalid kind",
    .vtable = &tp_sched_vtable,
};

MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entry(const mt_host *host) {
    (void)host;
    return &desc;
}
