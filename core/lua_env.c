/* lua_env.c — a Lua state that finds moontune's Lua library. */
#include "lua_env.h"

#include <lauxlib.h>
#include <limits.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

static int is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

const char *mt_lua_dir(void) {
    static char dir[PATH_MAX];
    const char *env = getenv("MOONTUNE_LUA_PATH");
    if (env && *env) return env;
    if (!dir[0]) {
        char exe[PATH_MAX];
        ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
        if (n > 0) {
            exe[n] = '\0';
            char *slash = strrchr(exe, '/');
            if (slash) *slash = '\0';
            char candidate[PATH_MAX + 32];
            snprintf(candidate, sizeof candidate, "%s/../share/moontune/lua", exe);
            if (is_dir(candidate) && strlen(candidate) < sizeof dir) strcpy(dir, candidate);
        }
        if (!dir[0]) snprintf(dir, sizeof dir, "%s", MT_LUA_SOURCE_DIR);
    }
    return dir;
}

lua_State *mt_lua_open(mt_error *err) {
    lua_State *L = luaL_newstate();
    if (!L) {
        mt_error_set(err, MT_ERR_NOMEM, "cannot create a Lua state");
        return NULL;
    }
    luaL_openlibs(L);
    lua_getglobal(L, "package");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua", mt_lua_dir(), mt_lua_dir());
    lua_setfield(L, -2, "path");
    lua_pop(L, 1);
    return L;
}

static int traceback(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    if (!msg) msg = luaL_tolstring(L, 1, NULL);
    luaL_traceback(L, L, msg, 1);
    return 1;
}

mt_status mt_lua_pcall(lua_State *L, int nargs, int nresults, mt_error *err) {
    int base = lua_gettop(L) - nargs;
    lua_pushcfunction(L, traceback);
    lua_insert(L, base);
    int rc = lua_pcall(L, nargs, nresults, base);
    lua_remove(L, base);
    if (rc == LUA_OK) return MT_OK;
    mt_status st = mt_error_set(err, MT_ERR_INVALID_ARG, "%s", lua_tostring(L, -1));
    lua_pop(L, 1);
    return st;
}
