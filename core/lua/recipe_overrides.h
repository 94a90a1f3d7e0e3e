/* recipe_overrides.h — `moontune run RECIPE.lua --set key=value ...`. */
#ifndef MT_CORE_CONFIG_OVERRIDE_H
#define MT_CORE_CONFIG_OVERRIDE_H

#include <lua.h>

#include "moontune/moontune.h"

/* Applies each "key=value" of sets to the config table at config_index, in order.
 * A dotted key walks nested tables (lora.r=16, optimizer.lr=2e-4). Only an existing
 * value can be overridden, and the new value must have its type:
 *   integer  a Lua integer literal (16, 0x10); 2.5 or 16.0 is refused
 *   float    any Lua number literal, stored as a float (1 becomes 1.0)
 *   boolean  exactly true or false
 *   string   the text after the first '=', as is (may be empty)
 *   list     a non-empty sequence of strings: the text split on ',' ("" gives {})
 * An unknown key is refused naming the closest known keys (or all keys of that table);
 * a mismatch says what was expected and what was found. Reads and writes are raw (no
 * metamethods). Stops at the first refusal (earlier sets stay applied). */
mt_status mt_config_apply_overrides(lua_State *L, int config_index, const char *const *sets, int n_sets,
                                    mt_error *err);

#endif
