/* bad_schema_dup.c — a scheduler that declares the option 'lr' twice. */
#include "testplug.h"

static const mt_option_spec options[] = {
    {"lr", MT_OPT_FLOAT, "1e-3", 0.0, 1.0, NULL, "peak learning rate"},
    {"warmup", MT_OPT_INT, "0", 0, 1e6, NULL, "warmup steps"},
    {"lr", MT_OPT_FLOAT, "1e-4", 0.0, 1.0, NULL, "the same name again"},
};

static const mt_plugin_descriptor desc = {
    .abi_version = MT_PLUGIN_ABI_VERSION,
    .size = sizeof(mt_plugin_descriptor),
    .option_size = sizeof(mt_option_spec),
    .kind = MT_PLUGIN_SCHEDULER,
    .name = "bad_schema_dup",
    .version = "1.0.0",
    .description = "an option declared twice",
    .options = options,
    .n_options = sizeof options / sizeof options[0],
    .vtable = &tp_sched_vtable,
};

MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entry(const mt_host *host) {
    (void)host;
    return &desc;
}
