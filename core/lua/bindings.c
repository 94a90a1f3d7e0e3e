/* bindings.c — moontune.core: the C core's objects and mechanism calls for Lua
 * recipes (docs/lua_api.md). This file opens the library from its parts, by area:
 * bind_model.c (Plugin, Model, Tokenizer, exports), bind_data.c (Examples, Records,
 * Batcher, Batch), bind_train.c (step, evaluation, schedule, checkpoints),
 * bind_generate.c (generation), bind_common.c (what they share); here are the small
 * calls (config with --set, validating, now, peak_memory, sha256).
 *
 * Objects owning resources are full userdata with __gc and __close (and a close()
 * method); every error is raised where it happens, with the core's message intact.
 *
 * Lifetimes:
 * - One registry table of plugin registries per Lua state, owned by a sentinel userdata
 *   created when the library opens (before any object), stored in the Lua registry; its
 *   __gc closes the registries (the dlopen handles) after every instance is gone, since
 *   finalizers run newest first. Every Plugin keeps the sentinel as its uservalue.
 * - Model.attach(adapter) hands the adapter instance to the model: the model frees it
 *   after mt_model_free (the adapter outlives the model that calls into it), and keeps
 *   the Plugin userdata in its uservalue table.
 * - A Batcher keeps its Examples in its uservalue (it points into them); an Examples in
 *   use by an open Batcher refuses an explicit close.
 * - A Batch holds its (B,T) arrays inline; it owns nothing else. */
#include "lua/bindings.h"
#include "lua/bind_internal.h"
#include "lua/run_dir.h"

#include <errno.h>
#include <sys/resource.h>
#include <string.h>

#include "lua/recipe_overrides.h"
#include "base/internal.h"
#include "formats/sha256.h"

/* `moontune validate`: the recipe runs up to the training loop, which only reports. */
static const char validating_key = 0;

void mt_lua_set_validating(lua_State *L, int validating) {
    lua_pushboolean(L, validating);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &validating_key);
}

static int l_validating(lua_State *L) {
    lua_rawgetp(L, LUA_REGISTRYINDEX, &validating_key);
    lua_pushboolean(L, lua_toboolean(L, -1));
    return 1;
}

/* The --set overrides of `moontune run`, kept in the registry where a recipe cannot
 * reach them (the sandbox removes the debug library). */
static const char overrides_key = 0;

void mt_lua_set_overrides(lua_State *L, const char *const *sets, int n_sets) {
    lua_createtable(L, n_sets, 1);
    for (int i = 0; i < n_sets; i++) {
        lua_pushstring(L, sets[i]);
        lua_rawseti(L, -2, i + 1);
    }
    lua_rawsetp(L, LUA_REGISTRYINDEX, &overrides_key);
}

int mt_lua_overrides_unused(lua_State *L) {
    lua_rawgetp(L, LUA_REGISTRYINDEX, &overrides_key);
    int unused = 0;
    if (lua_istable(L, -1)) {
        lua_getfield(L, -1, "applied");
        unused = lua_rawlen(L, -2) > 0 && !lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return unused;
}

/* mt.config(tbl) -> tbl with the command line's --set key=value applied, type-checked
 * against the values they replace (core/lua/recipe_overrides.c). */
static int l_config(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_rawgetp(L, LUA_REGISTRYINDEX, &overrides_key);
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        lua_settop(L, 1);
        mt_lua_run_note_config(L, 1);
        return 1;
    }
    int list = lua_gettop(L);
    int n = (int)lua_rawlen(L, list);
    const char **sets = bind_scratch(L, (size_t)(n ? n : 1) * sizeof *sets);
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, list, i + 1);
        sets[i] = lua_tostring(L, -1); /* kept alive by the list */
        lua_pop(L, 1);
    }
    mt_error err = {0};
    if (mt_config_apply_overrides(L, 1, sets, n, &err)) return bind_raise(L, &err);
    lua_pushboolean(L, 1);
    lua_setfield(L, list, "applied");
    lua_settop(L, 1);
    mt_lua_run_note_config(L, 1);
    return 1;
}

/* mt.now() -> monotonic wall-clock seconds (the trainer's tokens/s and ETA) */
static int l_now(lua_State *L) {
    lua_pushnumber(L, mt_now_seconds());
    return 1;
}

/* mt.peak_memory() -> the process's peak resident set size in bytes (getrusage) */
static int l_peak_memory(lua_State *L) {
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0) return luaL_error(L, "peak_memory: %s", strerror(errno));
    lua_pushinteger(L, (lua_Integer)ru.ru_maxrss * 1024); /* Linux reports KiB */
    return 1;
}

static int l_sha256(lua_State *L) {
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    char hex[MT_SHA256_HEX];
    mt_sha256_hex(s, n, hex);
    lua_pushstring(L, hex);
    return 1;
}

/* mt.where(fn) -> "file:line" where the Lua function fn is defined ("?" for a C
 * function): errors about a recipe's callbacks (a GRPO reward that returns a string)
 * name the recipe's line. The sandbox has no debug.getinfo; this reveals only what an
 * error message inside fn would. */
static int l_where(lua_State *L) {
    luaL_checktype(L, 1, LUA_TFUNCTION);
    lua_Debug ar;
    lua_pushvalue(L, 1);
    if (!lua_getinfo(L, ">S", &ar) || ar.linedefined < 0 || !strcmp(ar.what, "C")) {
        lua_pushliteral(L, "?");
        return 1;
    }
    lua_pushfstring(L, "%s:%d", ar.short_src, ar.linedefined);
    return 1;
}

/* ---- registration ------------------------------------------------------------------ */

static const luaL_Reg functions[] = {
    {"sha256", l_sha256},
    {"now", l_now},
    {"peak_memory", l_peak_memory},
    {"config", l_config},
    {"validating", l_validating},
    {"isatty", bind_isatty},
    {"where", l_where},
    {NULL, NULL},
};

int luaopen_moontune_core(lua_State *L) {
    /* the registries' sentinel first: finalizers run newest first, so it closes last */
    bind_push_sentinel(L);
    lua_pop(L, 1);
    lua_newtable(L);
    mt_bind_model_open(L);
    mt_bind_data_open(L);
    mt_bind_train_open(L);
    mt_bind_generate_open(L);
    mt_bind_tensorboard_open(L);
    mt_bind_dist_open(L);
    luaL_setfuncs(L, functions, 0);
    mt_lua_run_funcs(L);
    return 1;
}

void mt_lua_register(lua_State *L) {
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
    lua_pushcfunction(L, luaopen_moontune_core);
    lua_setfield(L, -2, "moontune.core");
    lua_pop(L, 1);
}
