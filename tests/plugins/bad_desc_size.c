/* bad_desc_size.c — an ABI 2 descriptor whose size says it ends before its vtable (a
 * descriptor written by hand that forgot or miscounted .size): refused, since the host
 * must not read fields the plugin does not have. */
#include "testplug.h"

static const mt_plugin_descriptor desc = {
    .abi_version = MT_PLUGIN_ABI_VERSION,
    .size = offsetof(mt_plugin_descriptor, vtable),
    .option_size = sizeof(mt_option_spec),
    .kind = MT_PLUGIN_SCHEDULER,
    .name = "bad_desc_size",
    .version = "1.0.0",
    .description = "a descriptor smaller than ABI 2's",
    .vtable = &tp_sched_vtable,
};

MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entry(const mt_host *host) {
    (void)host;
    return &desc;
}
