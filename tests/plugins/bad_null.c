/* bad_null.c — an entry that returns NULL instead of a descriptor. */
#include "testplug.h"

MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entry(const mt_host *host) {
    (void)host;
    return NULL;
}
