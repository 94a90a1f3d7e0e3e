/* lua_state.h — the embedded Lua 5.4 and where moontune's Lua library lives. */
#ifndef MT_CORE_LUA_ENV_H
#define MT_CORE_LUA_ENV_H

#include <lua.h>

#include "moontune/moontune.h"

/* The directory holding the moontune Lua modules: $MOONTUNE_LUA_PATH, else share/moontune/lua
 * of the install tree next to the running binary, else the source tree's lua/. */
const char *mt_lua_dir(void);

/* A fresh Lua state with the standard libraries whose package.path finds
 * require("moontune.chat") and friends. NULL (and err set) on failure. */
lua_State *mt_lua_open(mt_error *err);

/* Calls the function at the top of the stack (below it nargs arguments) under a
 * traceback handler; on error fills err with the message and traceback and pops it. */
mt_status mt_lua_pcall(lua_State *L, int nargs, int nresults, mt_error *err);

/* The device of a run, kept in the Lua registry where a recipe cannot change it: what
 * `moontune run --device` named (from_command_line 1), or the default device once it is
 * known (0: the first model opened without a device, or mt.device() asked). mt.model
 * uses the command line's when the recipe names none; mt.device() returns it. */
void mt_lua_set_device(lua_State *L, const char *device, int from_command_line);
/* The recorded device, or NULL when none is yet; *from_command_line (may be NULL) says
 * which kind. The string lives in the registry for the state's lifetime. */
const char *mt_lua_device(lua_State *L, int *from_command_line);

#endif
