/* cmd_plugins.h — the `moontune plugins` command. */
#ifndef MT_CORE_CMD_PLUGINS_H
#define MT_CORE_CMD_PLUGINS_H

/* argv[0] is "plugins". Lists the plugins on the search path (kind, name, version,
 * file) and the refused files, or describes one plugin and its options.
 * Returns the exit status: 0 success, 1 --describe found nothing (or the registry
 * could not be built), 2 usage error. */
int mt_cmd_plugins(int argc, char **argv);

#endif
