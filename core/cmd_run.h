/* cmd_run.h — `moontune run RECIPE.lua`: runs a Lua recipe. */
#ifndef MT_CORE_CMD_RUN_H
#define MT_CORE_CMD_RUN_H

/* moontune run RECIPE.lua [--unsafe] [--resume [PATH]] [--set key=value ...].
 * Returns the process exit status (0 on success, 1 on a recipe error, 2 on usage). */
int mt_cmd_run(int argc, char **argv);

#endif
