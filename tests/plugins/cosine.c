/* cosine.c — a scheduler named "cosine" (in test_plugins/kind/), so that the wrong-kind
 * lookup test ("optimizer 'cosine' is a scheduler") runs whether or not the real
 * plugins/sched/cosine.so is built. Its learning rate is constant. */
#include "testplug.h"

static const mt_plugin_descriptor desc = {
    .abi_version = MT_PLUGIN_ABI_VERSION,
    .size = sizeof(mt_plugin_descriptor),
    .option_size = sizeof(mt_option_spec),
    .kind = MT_PLUGIN_SCHEDULER,
    .name = "cosine",
    .version = "0.0.0-test",
    .description = "test stand-in for the cosine scheduler (constant rate)",
    .vtable = &tp_sched_vtable,
};

MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entry(const mt_host *host) {
    (void)host;
    return &desc;
}
