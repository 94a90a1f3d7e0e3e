/* bad_vtable_size.c — a scheduler whose vtable leaves .size 0 (MT_VTABLE_SIZE
 * forgotten): every slot is set, but the host may read none of them, so the loader
 * refuses it. */
#include "testplug.h"

static const mt_scheduler_vtable vtable = {
    .size = 0,
    .create = tp_create,
    .destroy = tp_destroy,
    .lr = tp_lr,
};

static const mt_plugin_descriptor desc = {
    .abi_version = MT_PLUGIN_ABI_VERSION,
    .size = sizeof(mt_plugin_descriptor),
    .option_size = sizeof(mt_option_spec),
    .kind = MT_PLUGIN_SCHEDULER,
    .name = "bad_vtable_size",
    .version = "1.0.0",
    .description = "a vtable of size 0",
    .vtable = &vtable,
};

MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entry(const mt_host *host) {
    (void)host;
    return &desc;
}
