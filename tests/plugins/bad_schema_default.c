/* bad_schema_default.c — a scheduler whose int option 'steps' defaults to "fast". */
#include "testplug.h"

static const mt_option_spec options[] = {
    {"steps", MT_OPT_INT, "fast", 0, 1e6, NULL, "a default of the wrong type"},
};

static const mt_plugin_descriptor desc = {
    .abi_version = MT_PLUGIN_ABI_VERSION,
    .size = sizeof(mt_plugin_descriptor),
    .option_size = sizeof(mt_option_spec),
    .kind = MT_PLUGIN_SCHEDULER,
    .name = "bad_schema_default",
    .version = "1.0.0",
    .description = "a default that is not an integer",
    .options = options,
    .n_options = sizeof options / sizeof options[0],
    .vtable = &tp_sched_vtable,
};

MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entry(const mt_host *host) {
    (void)host;
    return &desc;
}
