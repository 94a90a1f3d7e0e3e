/* dupe.c — a valid scheduler named "dupe", built twice (dup_a/dupe.so and
 * dup_b/dupe.so) to test which of two same-named plugins the search path picks. */
#include "testplug.h"

#ifndef DUPE_FROM
#define DUPE_FROM "?"
#endif

static const mt_plugin_descriptor desc = {
    .abi_version = MT_PLUGIN_ABI_VERSION,
    .size = sizeof(mt_plugin_descriptor),
    .option_size = sizeof(mt_option_spec),
    .kind = MT_PLUGIN_SCHEDULER,
    .name = "dupe",
    .version = "1.0.0-" DUPE_FROM,
    .description = "the dupe scheduler from " DUPE_FROM,
    .vtable = &tp_sched_vtable,
};

MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entry(const mt_host *host) {
    (void)host;
    return &desc;
}
