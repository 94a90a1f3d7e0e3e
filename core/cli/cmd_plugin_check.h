/* cmd_plugin_check.h — the `moontune plugin check FILE.so` command. */
#ifndef MT_CORE_CMD_PLUGIN_CHECK_H
#define MT_CORE_CMD_PLUGIN_CHECK_H

/* argv[0] is "plugin". Returns the exit status: 0 every check passed, 1 a check failed or
 * the plugin was refused, 2 usage error. */
int mt_cmd_plugin(int argc, char **argv);

#endif
