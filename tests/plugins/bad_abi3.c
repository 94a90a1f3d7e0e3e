/* bad_abi3.c — a scheduler claiming the plugin ABI after this one (as a plugin built
 * against a newer moontune would): refused, naming the file, the version it was built
 * for and the versions this moontune loads. Only abi_version is meaningful to an older
 * host; the rest is this header's layout. */
#include "testplug.h"

static const mt_plugin_descriptor desc = {
    .abi_version = MT_PLUGIN_ABI_VERSION + 1,
    .size = sizeof(mt_plugin_descriptor),
    .option_size = sizeof(mt_option_spec),
    .kind = MT_PLUGIN_SCHEDULER,
    .name = "bad_abi3",
    .version = "1.0.0",
    .description = "built for the next ABI",
    .vtable = &tp_sched_vtable,
};

MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entry(const mt_host *host) {
    (void)host;
    return &desc;
}
