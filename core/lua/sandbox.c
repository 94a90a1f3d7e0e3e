/* sandbox.c — the recipe sandbox (rules in sandbox.h).
 *
 * Every replaced function is a C closure holding the original in an upvalue, and the
 * allow-list is a table in the registry under a light userdata key; with the debug
 * library gone, a recipe reaches neither, so reassigning io, package.searchers or
 * package.path cannot widen what it may touch. */
#define _XOPEN_SOURCE 700 /* realpath */
#include "lua/sandbox.h"

#include <errno.h>
#include <lauxlib.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/internal.h"
#include "lua/lua_state.h"

static const char sb_key = 0; /* registry[&sb_key] = { read = {roots}, write = {roots}, search = {dirs} } */

#define SB_UNSAFE_HINT "(run with --unsafe to trust this recipe)"

/* ---- path resolution ------------------------------------------------------ */

/* Resolves path into out (PATH_MAX bytes): absolute against the working directory,
 * the longest existing prefix through realpath, the rest appended as is. Returns NULL
 * on success, else a reason. The non-existing rest may hold no "." or ".." and may not
 * start at a dangling symlink (opening it would follow the link). */
const char *mt_path_resolve(const char *path, char *out) {
    char abs[PATH_MAX];
    if (!path || !*path) return "empty path";
    if (path[0] == '/') {
        if (snprintf(abs, sizeof abs, "%s", path) >= (int)sizeof abs) return "path too long";
    } else {
        char cwd[PATH_MAX];
        if (!getcwd(cwd, sizeof cwd)) return "cannot get the working directory";
        if (snprintf(abs, sizeof abs, "%s/%s", cwd, path) >= (int)sizeof abs) return "path too long";
    }
    char prefix[PATH_MAX];
    memcpy(prefix, abs, strlen(abs) + 1);
    for (;;) {
        if (realpath(prefix, out)) break;
        if (errno != ENOENT && errno != ENOTDIR) return strerror(errno);
        struct stat st;
        if (lstat(prefix, &st) == 0 && S_ISLNK(st.st_mode)) return "dangling or looping symlink";
        char *slash = strrchr(prefix, '/');
        if (!slash) return "cannot resolve";
        if (slash == prefix) slash[1] = '\0'; /* "/" always resolves */
        else *slash = '\0';
    }
    const char *rest = abs + strlen(prefix);
    size_t len = strlen(out);
    while (*rest) {
        while (*rest == '/') rest++;
        if (!*rest) break;
        size_t n = strcspn(rest, "/");
        if ((n == 1 && rest[0] == '.') || (n == 2 && rest[0] == '.' && rest[1] == '.'))
            return "'.' or '..' after a missing directory";
        int need_slash = !(len == 1 && out[0] == '/');
        if (len + (size_t)need_slash + n + 1 > PATH_MAX) return "path too long";
        if (need_slash) out[len++] = '/';
        memcpy(out + len, rest, n);
        len += n;
        out[len] = '\0';
        rest += n;
    }
    return NULL;
}

int mt_path_under(const char *resolved, const char *root) {
    size_t n = strlen(root);
    if (n == 1 && root[0] == '/') return 1;
    return strncmp(resolved, root, n) == 0 && (resolved[n] == '\0' || resolved[n] == '/');
}

/* ---- the allow-list ------------------------------------------------------- */

static int sb_push_state(lua_State *L) {
    return lua_rawgetp(L, LUA_REGISTRYINDEX, &sb_key) == LUA_TTABLE;
}

static int sb_in_list(lua_State *L, int state, const char *field, const char *resolved) {
    int found = 0;
    lua_getfield(L, state, field);
    lua_Integer n = luaL_len(L, -1);
    for (lua_Integer i = 1; i <= n && !found; i++) {
        lua_rawgeti(L, -1, i);
        found = mt_path_under(resolved, lua_tostring(L, -1));
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return found;
}

/* Pushes the roots of state[field] joined by ", " (or none_msg). */
static void sb_push_roots(lua_State *L, int state, const char *field, const char *none_msg) {
    luaL_Buffer b;
    lua_getfield(L, state, field);
    int list = lua_gettop(L);
    lua_Integer n = luaL_len(L, list);
    luaL_buffinit(L, &b);
    for (lua_Integer i = 1; i <= n; i++) {
        if (i > 1) luaL_addstring(&b, ", ");
        lua_rawgeti(L, list, i);
        luaL_addvalue(&b);
    }
    if (n == 0) luaL_addstring(&b, none_msg);
    luaL_pushresult(&b);
    lua_remove(L, list);
}

/* Raises a Lua error unless path may be read (write == 0) or written (write == 1). */
static void sb_check(lua_State *L, const char *path, int write, const char *what) {
    char resolved[PATH_MAX];
    const char *why = mt_path_resolve(path, resolved);
    if (why) luaL_error(L, "sandbox: %s: cannot resolve %s safely: %s", what, path, why);
    if (!sb_push_state(L)) luaL_error(L, "sandbox: state missing");
    int state = lua_gettop(L);
    int ok = sb_in_list(L, state, "write", resolved) || (!write && sb_in_list(L, state, "read", resolved));
    if (ok) {
        lua_pop(L, 1);
        return;
    }
    if (write) {
        sb_push_roots(L, state, "write", "a declared output directory (none declared)");
        luaL_error(L, "sandbox: cannot write %s: recipes write only under %s", path, lua_tostring(L, -1));
    }
    sb_push_roots(L, state, "read", "");
    sb_push_roots(L, state, "write", "");
    luaL_error(L, "sandbox: cannot read %s: recipes read only under the recipe directory, the declared "
               "data and model paths and the output directory (%s%s%s)",
               path, lua_tostring(L, -2), lua_rawlen(L, -1) ? ", " : "", lua_tostring(L, -1));
}

static const char *sb_add_root(lua_State *L, int state, const char *field, const char *path, char *resolved) {
    const char *why = mt_path_resolve(path, resolved);
    if (why) return why;
    lua_getfield(L, state, field);
    lua_pushstring(L, resolved);
    lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
    lua_pop(L, 1);
    return NULL;
}

static mt_status sb_allow(lua_State *L, const char *field, const char *path, mt_error *err) {
    char resolved[PATH_MAX];
    if (!sb_push_state(L)) {
        lua_pop(L, 1);
        return mt_error_set(err, MT_ERR_INVALID_ARG, "sandbox: not installed on this Lua state");
    }
    const char *why = sb_add_root(L, lua_gettop(L), field, path, resolved);
    lua_pop(L, 1);
    if (why) return mt_error_set(err, MT_ERR_INVALID_ARG, "sandbox: cannot allow %s: %s", path, why);
    return MT_OK;
}

mt_status mt_sandbox_allow_read(lua_State *L, const char *path, mt_error *err) {
    return sb_allow(L, "read", path, err);
}

mt_status mt_sandbox_allow_write(lua_State *L, const char *path, mt_error *err) {
    return sb_allow(L, "write", path, err);
}

void mt_sandbox_check_path(lua_State *L, const char *path, int write, const char *what) {
    if (mt_sandbox_active(L)) sb_check(L, path, write, what);
}

int mt_sandbox_active(lua_State *L) {
    int active = sb_push_state(L);
    lua_pop(L, 1);
    return active;
}

/* ---- replacements --------------------------------------------------------- */

static int sb_denied(lua_State *L) {
    return luaL_error(L, "sandbox: %s is not allowed in recipes " SB_UNSAFE_HINT,
                      lua_tostring(L, lua_upvalueindex(1)));
}

/* Calls upvalue 1 with the current arguments and returns all its results. */
static int sb_forward(lua_State *L) {
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
}

static int sb_io_open(lua_State *L) {
    const char *fname = luaL_checkstring(L, 1);
    const char *mode = luaL_optstring(L, 2, "r");
    sb_check(L, fname, strpbrk(mode, "wa+") != NULL, "io.open");
    return sb_forward(L);
}

static int sb_io_lines(lua_State *L) {
    if (!lua_isnoneornil(L, 1)) sb_check(L, luaL_checkstring(L, 1), 0, "io.lines");
    return sb_forward(L);
}

static int sb_io_input(lua_State *L) {
    if (lua_type(L, 1) == LUA_TSTRING) sb_check(L, lua_tostring(L, 1), 0, "io.input");
    return sb_forward(L);
}

static int sb_io_output(lua_State *L) {
    if (lua_type(L, 1) == LUA_TSTRING) sb_check(L, lua_tostring(L, 1), 1, "io.output");
    return sb_forward(L);
}

static int sb_load(lua_State *L) {
    size_t n = 0;
    const char *s = lua_type(L, 1) == LUA_TSTRING ? lua_tolstring(L, 1, &n) : NULL;
    if (s && n > 0 && s[0] == LUA_SIGNATURE[0])
        return luaL_error(L, "sandbox: loading binary chunks is not allowed in recipes " SB_UNSAFE_HINT);
    if (lua_gettop(L) < 3) lua_settop(L, 3);
    lua_pushliteral(L, "t");
    lua_replace(L, 3);
    return sb_forward(L);
}

static int sb_loadfile(lua_State *L) {
    if (!lua_isnoneornil(L, 1)) sb_check(L, luaL_checkstring(L, 1), 0, "loadfile");
    if (lua_gettop(L) < 2) lua_settop(L, 2);
    lua_pushliteral(L, "t");
    lua_replace(L, 2);
    return sb_forward(L);
}

static int sb_dofile(lua_State *L) {
    const char *fname = luaL_optstring(L, 1, NULL);
    if (fname) sb_check(L, fname, 0, "dofile");
    lua_settop(L, 1);
    if (luaL_loadfilex(L, fname, "t") != LUA_OK) return lua_error(L);
    lua_call(L, 0, LUA_MULTRET);
    return lua_gettop(L) - 1;
}

/* package.searchers[2]: Lua files under the recipe directory, then moontune's. */
static int sb_searcher(lua_State *L) {
    const char *name = luaL_checkstring(L, 1);
    const char *rel = luaL_gsub(L, name, ".", "/");
    static const char *const patterns[] = {"%s/%s.lua", "%s/%s/init.lua"};
    if (!sb_push_state(L)) return luaL_error(L, "sandbox: state missing");
    lua_getfield(L, -1, "search");
    int dirs = lua_gettop(L);
    lua_Integer n = luaL_len(L, dirs);
    int pieces = 0;
    for (lua_Integer i = 1; i <= n; i++) {
        lua_rawgeti(L, dirs, i);
        const char *dir = lua_tostring(L, -1); /* kept alive by the registry table */
        lua_pop(L, 1);
        for (size_t p = 0; p < sizeof patterns / sizeof patterns[0]; p++) {
            const char *file = lua_pushfstring(L, patterns[p], dir, rel);
            if (access(file, R_OK) == 0) {
                sb_check(L, file, 0, "require");
                if (luaL_loadfilex(L, file, "t") != LUA_OK)
                    return luaL_error(L, "error loading module '%s' from file '%s':\n\t%s", name, file,
                                      lua_tostring(L, -1));
                lua_pushstring(L, file);
                return 2;
            }
            lua_pop(L, 1);
            lua_pushfstring(L, pieces ? "\n\tno file '%s/%s%s'" : "no file '%s/%s%s'", dir, rel,
                            p == 0 ? ".lua" : "/init.lua");
            pieces++;
        }
    }
    lua_concat(L, pieces);
    return 1;
}

/* ---- installation ----------------------------------------------------------- */

static void sb_deny(lua_State *L, int table, const char *field, const char *qualified) {
    lua_pushstring(L, qualified);
    lua_pushcclosure(L, sb_denied, 1);
    lua_setfield(L, table, field);
}

/* table[field] = closure(fn, upvalue = original table[field]). */
static void sb_wrap(lua_State *L, int table, const char *field, lua_CFunction fn) {
    if (lua_getfield(L, table, field) != LUA_TFUNCTION) luaL_error(L, "sandbox: %s missing", field);
    lua_pushcclosure(L, fn, 1);
    lua_setfield(L, table, field);
}

static int sb_install_lua(lua_State *L) {
    const mt_sandbox_paths *paths = lua_touserdata(L, 1);
    char resolved[PATH_MAX];
    const char *why;
    if (sb_push_state(L)) return luaL_error(L, "sandbox: already installed on this Lua state");
    lua_pop(L, 1);

    /* the allow-list */
    lua_createtable(L, 0, 3);
    int state = lua_gettop(L);
    lua_newtable(L);
    lua_setfield(L, state, "read");
    lua_newtable(L);
    lua_setfield(L, state, "write");
    lua_newtable(L);
    lua_setfield(L, state, "search");
    struct stat st;
    if (stat(paths->recipe_dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return luaL_error(L, "sandbox: recipe directory %s is not a directory", paths->recipe_dir);
    if ((why = sb_add_root(L, state, "read", paths->recipe_dir, resolved)))
        return luaL_error(L, "sandbox: recipe directory %s: %s", paths->recipe_dir, why);
    lua_getfield(L, state, "search");
    lua_pushstring(L, resolved);
    lua_rawseti(L, -2, 1);
    if ((why = sb_add_root(L, state, "read", mt_lua_dir(), resolved)))
        return luaL_error(L, "sandbox: moontune Lua directory %s: %s", mt_lua_dir(), why);
    lua_pushstring(L, resolved);
    lua_rawseti(L, -2, 2);
    lua_pop(L, 1);
    for (int i = 0; i < paths->n_read_roots; i++)
        if ((why = sb_add_root(L, state, "read", paths->read_roots[i], resolved)))
            return luaL_error(L, "sandbox: read root %s: %s", paths->read_roots[i], why);
    if (paths->out_dir && (why = sb_add_root(L, state, "write", paths->out_dir, resolved)))
        return luaL_error(L, "sandbox: output directory %s: %s", paths->out_dir, why);

    /* os */
    if (lua_getglobal(L, "os") != LUA_TTABLE) return luaL_error(L, "sandbox: os library missing");
    int os = lua_gettop(L);
    static const char *const os_denied[] = {"execute", "exit", "remove", "rename", "setlocale", "tmpname"};
    for (size_t i = 0; i < sizeof os_denied / sizeof os_denied[0]; i++) {
        lua_pushfstring(L, "os.%s", os_denied[i]);
        sb_deny(L, os, os_denied[i], lua_tostring(L, -1));
        lua_pop(L, 1);
    }
    lua_pop(L, 1);

    /* io: the table is changed in place, so package.loaded.io is the same sandboxed one */
    if (lua_getglobal(L, "io") != LUA_TTABLE) return luaL_error(L, "sandbox: io library missing");
    int io = lua_gettop(L);
    sb_deny(L, io, "popen", "io.popen");
    sb_wrap(L, io, "open", sb_io_open);
    sb_wrap(L, io, "lines", sb_io_lines);
    sb_wrap(L, io, "input", sb_io_input);
    sb_wrap(L, io, "output", sb_io_output);
    lua_pop(L, 1);

    /* load, loadfile, dofile */
    lua_pushglobaltable(L);
    int g = lua_gettop(L);
    sb_wrap(L, g, "load", sb_load);
    sb_wrap(L, g, "loadfile", sb_loadfile);
    lua_pushcfunction(L, sb_dofile);
    lua_setfield(L, g, "dofile");

    /* package */
    if (lua_getglobal(L, "package") != LUA_TTABLE) return luaL_error(L, "sandbox: package library missing");
    int pkg = lua_gettop(L);
    sb_deny(L, pkg, "loadlib", "package.loadlib");
    sb_deny(L, pkg, "searchpath", "package.searchpath");
    lua_pushliteral(L, "");
    lua_setfield(L, pkg, "cpath");
    lua_getfield(L, pkg, "searchers");
    lua_createtable(L, 2, 0);
    lua_rawgeti(L, -2, 1); /* the preload searcher */
    lua_rawseti(L, -2, 1);
    lua_pushcfunction(L, sb_searcher);
    lua_rawseti(L, -2, 2);
    lua_setfield(L, pkg, "searchers");
    lua_pop(L, 1);

    /* debug: only traceback, both as the global and as require("debug") */
    lua_getglobal(L, "debug");
    lua_createtable(L, 0, 1);
    if (lua_getfield(L, -2, "traceback") != LUA_TFUNCTION) return luaL_error(L, "sandbox: debug.traceback missing");
    lua_setfield(L, -2, "traceback");
    lua_pushvalue(L, -1);
    lua_setglobal(L, "debug");
    lua_getfield(L, pkg, "loaded");
    lua_pushvalue(L, -2);
    lua_setfield(L, -2, "debug");
    lua_pop(L, 3);

    lua_pushvalue(L, state);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &sb_key);
    return 0;
}

mt_status mt_sandbox_install(lua_State *L, const mt_sandbox_paths *paths, mt_error *err) {
    if (!L || !paths || !paths->recipe_dir || paths->n_read_roots < 0 || (paths->n_read_roots > 0 && !paths->read_roots))
        return mt_error_set(err, MT_ERR_INVALID_ARG, "sandbox: a Lua state and a recipe directory are required");
    lua_pushcfunction(L, sb_install_lua);
    lua_pushlightuserdata(L, (void *)paths);
    if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
        mt_status st = mt_error_set(err, MT_ERR_INVALID_ARG, "%s", lua_tostring(L, -1));
        lua_pop(L, 1);
        return st;
    }
    return MT_OK;
}
