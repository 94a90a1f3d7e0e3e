/* bad_no_entry.c — a shared object without moontune_plugin_entry (a misspelled one):
 * the loader refuses it as "not a moontune plugin". */
#include "moontune/plugin.h"

MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entri(const mt_host *host);

MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entri(const mt_host *host) {
    (void)host;
    return NULL;
}
