/* bad_abi.c — a scheduler built for ABI version 999: refused with the expected and the
 * found version. */
#include "testplug.h"

static const mt_plugin_descriptor desc = {
    .abi_version = 999,
    .size = sizeof(mt_plugin_descriptor),
    .option_size = sizeof(mt_option_spec),
    .kind = MT_PLUGIN_SCHEDULER,
    .name = "bad_abi",
    .version = "1.0.0",
    .description = "built for a future ABI",
    .vtable = &tp_sched_vtable,
};

MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entry(const mt_host *host) {
    (void)host;
    return &desc;
}
