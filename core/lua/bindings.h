/* bindings.h — the C core as the Lua library `moontune.core` (docs/lua_api.md).
 * lua/moontune/init.lua re-exports it as require("moontune"). */
#ifndef MT_CORE_LUA_MOONTUNE_H
#define MT_CORE_LUA_MOONTUNE_H
#include <lua.h>

/* Opens moontune.core: the library table (objects are userdata with __gc and __close;
 * C errors are raised as Lua errors carrying the core's message). */
int luaopen_moontune_core(lua_State *L);

/* Adds moontune.core to package.preload, so that require("moontune") finds it. */
void mt_lua_register(lua_State *L);

/* The --set key=value overrides that mt.config(tbl) applies (moontune run). */
void mt_lua_set_overrides(lua_State *L, const char *const *sets, int n_sets);
/* 1 when overrides were given but the recipe never called mt.config. */
int mt_lua_overrides_unused(lua_State *L);

/* moontune validate: mt.validating() is true and the trainer reports instead of training. */
void mt_lua_set_validating(lua_State *L, int validating);

#endif
