/* cmd_run.h — `moontune run RECIPE.lua`: runs a Lua recipe. */
#ifndef MT_CORE_CMD_RUN_H
#define MT_CORE_CMD_RUN_H

/* moontune run RECIPE.lua [--unsafe] [--resume [PATH]] [--set key=value ...].
 * Returns the process exit status (0 on success, 1 on a recipe error, 2 on usage). */
int mt_cmd_run(int argc, char **argv);
/* `moontune ls`: the shipped recipes; `moontune cp NAME DEST`: copy one to edit. */
int mt_cmd_ls(int argc, char **argv);
int mt_cmd_cp(int argc, char **argv);

#endif
