/* run_dir.c — the run directory and the run's own facts, as Lua bindings of
 * moontune.core: mt.output_dir (which directory a run may write, and what happens to an
 * earlier run there), mt.run_info (the command line's --resume/--overwrite/
 * --allow-changes, the recipe's text and its resolved config), mt.json_encode and
 * mt.json_decode (jansson), and mt.write_file (an atomic write inside the run directory).
 *
 * Why the output directory is guarded here: the sandbox lets a recipe write only under
 * the directory mt.output_dir returns, so that directory must never be one that holds
 * the user's own files (the working directory, a repository, a home directory). A run
 * directory is one this function created, or an empty one, or one an earlier moontune
 * run marked with the file .moontune-run; anything else is refused. */
#define _DEFAULT_SOURCE /* realpath */
#include "lua/run_dir.h"

#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <lauxlib.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "base/internal.h"
#include "dist/dist.h"
#include "lua/bind_internal.h"
#include "lua/sandbox.h"

#define RUN_MARKER ".moontune-run"

/* registry: the run table {recipe=, recipe_text=, resume=, overwrite=, allow_changes=,
 * config_json=, claimed={[dir]=true}} */
static const char run_key = 0;

static int push_run(lua_State *L) {
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &run_key) == LUA_TTABLE) return 1;
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &run_key);
    return 1;
}

void mt_lua_set_run(lua_State *L, const mt_run_flags *flags, const char *recipe_text,
                    size_t recipe_len) {
    push_run(L);
    if (flags->recipe) {
        lua_pushstring(L, flags->recipe);
        lua_setfield(L, -2, "recipe");
    }
    if (recipe_text) {
        lua_pushlstring(L, recipe_text, recipe_len);
        lua_setfield(L, -2, "recipe_text");
    }
    lua_pushboolean(L, flags->resume);
    lua_setfield(L, -2, "resume");
    lua_pushboolean(L, flags->overwrite);
    lua_setfield(L, -2, "overwrite");
    lua_pushboolean(L, flags->allow_changes);
    lua_setfield(L, -2, "allow_changes");
    lua_pop(L, 1);
}

static int run_flag(lua_State *L, const char *name) {
    push_run(L);
    lua_getfield(L, -1, name);
    int on = lua_toboolean(L, -1);
    lua_pop(L, 2);
    return on;
}

static const char *push_json_text(lua_State *L, int idx);

/* ---- JSON <-> Lua ------------------------------------------------------------------ */

#define JSON_MAX_DEPTH 64

/* Is the table at idx a sequence 1..n with n > 0 and nothing else? */
static int is_array(lua_State *L, int idx, size_t *n) {
    size_t len = lua_rawlen(L, idx), count = 0;
    if (len == 0) return 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (!lua_isinteger(L, -1)) {
            lua_pop(L, 1);
            return 0;
        }
        lua_Integer k = lua_tointeger(L, -1);
        if (k < 1 || (size_t)k > len) {
            lua_pop(L, 1);
            return 0;
        }
        count++;
    }
    *n = len;
    return count == len;
}

/* The Lua value at idx as JSON, or NULL with *why set (a string that is not UTF-8,
 * nesting deeper than JSON_MAX_DEPTH — a cycle —, out of memory). Non-finite numbers
 * and values JSON cannot hold (functions, userdata) become null; integer keys are
 * written in decimal, other non-string keys are skipped. */
static json_t *to_json(lua_State *L, int idx, int depth, const char **why) {
    idx = lua_absindex(L, idx);
    json_t *v = NULL;
    switch (lua_type(L, idx)) {
    case LUA_TBOOLEAN: v = json_boolean(lua_toboolean(L, idx)); break;
    case LUA_TSTRING: {
        size_t n;
        const char *s = lua_tolstring(L, idx, &n);
        if (!(v = json_stringn(s, n))) *why = "a string is not valid UTF-8";
        return v;
    }
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx)) v = json_integer((json_int_t)lua_tointeger(L, idx));
        else if (!isfinite(lua_tonumber(L, idx))) v = json_null();
        else v = json_real(lua_tonumber(L, idx));
        break;
    case LUA_TTABLE: break;
    default: v = json_null(); break;
    }
    if (lua_type(L, idx) != LUA_TTABLE) {
        if (!v) *why = "out of memory";
        return v;
    }
    if (depth >= JSON_MAX_DEPTH || !lua_checkstack(L, 4)) {
        *why = "tables nested too deeply (a cycle?)";
        return NULL;
    }
    size_t n = 0;
    if (is_array(L, idx, &n)) {
        json_t *a = json_array();
        for (size_t i = 1; a && i <= n; i++) {
            lua_rawgeti(L, idx, (lua_Integer)i);
            json_t *item = to_json(L, -1, depth + 1, why);
            lua_pop(L, 1);
            if (!item || json_array_append_new(a, item)) {
                json_decref(a);
                a = NULL;
            }
        }
        if (!a && !*why) *why = "out of memory";
        return a;
    }
    json_t *o = json_object();
    if (!o) {
        *why = "out of memory";
        return NULL;
    }
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        char buf[64];
        const char *key = buf;
        if (lua_type(L, -2) == LUA_TSTRING) key = lua_tostring(L, -2);
        else if (lua_isinteger(L, -2)) snprintf(buf, sizeof buf, "%lld", (long long)lua_tointeger(L, -2));
        else {
            lua_pop(L, 1);
            continue;
        }
        json_t *item = to_json(L, -1, depth + 1, why);
        lua_pop(L, 1);
        if (!item || json_object_set_new(o, key, item)) {
            lua_pop(L, 1); /* the key */
            json_decref(o);
            if (!*why) *why = "a key is not valid UTF-8";
            return NULL;
        }
    }
    return o;
}

/* Pushes the JSON value as Lua (null -> nil; integers stay integers). */
static void push_json(lua_State *L, const json_t *j, int depth) {
    luaL_checkstack(L, 4, "json_decode");
    if (depth >= JSON_MAX_DEPTH) luaL_error(L, "json_decode: nested deeper than %d", JSON_MAX_DEPTH);
    switch (json_typeof(j)) {
    case JSON_OBJECT: {
        lua_createtable(L, 0, (int)(json_object_size(j) > 1024 ? 1024 : json_object_size(j)));
        const char *key;
        json_t *v;
        json_object_foreach ((json_t *)j, key, v) {
            push_json(L, v, depth + 1);
            lua_setfield(L, -2, key);
        }
        return;
    }
    case JSON_ARRAY: {
        size_t n = json_array_size(j);
        lua_createtable(L, n > 1024 ? 1024 : (int)n, 0);
        for (size_t i = 0; i < n; i++) {
            push_json(L, json_array_get(j, i), depth + 1);
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
        return;
    }
    case JSON_STRING: lua_pushlstring(L, json_string_value(j), json_string_length(j)); return;
    case JSON_INTEGER: lua_pushinteger(L, (lua_Integer)json_integer_value(j)); return;
    case JSON_REAL: lua_pushnumber(L, json_real_value(j)); return;
    case JSON_TRUE: lua_pushboolean(L, 1); return;
    case JSON_FALSE: lua_pushboolean(L, 0); return;
    default: lua_pushnil(L); return;
    }
}

/* Encodes the value at idx as compact JSON with sorted keys; pushes the text. */
const char *mt_lua_json_encode(lua_State *L, int idx) { return push_json_text(L, idx); }

static const char *push_json_text(lua_State *L, int idx) {
    const char *why = NULL;
    json_t *j = to_json(L, idx, 0, &why);
    if (!j) luaL_error(L, "json_encode: %s", why ? why : "out of memory");
    char *text = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENCODE_ANY | JSON_REAL_PRECISION(17));
    json_decref(j);
    if (!text) luaL_error(L, "json_encode: out of memory");
    lua_pushstring(L, text);
    free(text);
    return lua_tostring(L, -1);
}

/* mt.json_encode(value) -> text */
static int l_json_encode(lua_State *L) {
    luaL_checkany(L, 1);
    push_json_text(L, 1);
    return 1;
}

static int push_json_protected(lua_State *L) {
    push_json(L, lua_touserdata(L, 1), 0);
    return 1;
}

/* Pushes the decoded tree; the tree is released whether or not that raises. */
static void push_json_tree(lua_State *L, json_t *j) {
    lua_pushcfunction(L, push_json_protected);
    lua_pushlightuserdata(L, j);
    int rc = lua_pcall(L, 1, 1, 0);
    json_decref(j);
    if (rc != LUA_OK) lua_error(L);
}

void mt_lua_json_decode(lua_State *L, const char *text, size_t len, const char *name) {
    json_error_t jerr;
    json_t *j = json_loadb(text, len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
    if (!j) luaL_error(L, "%s: line %d, column %d: %s", name, jerr.line, jerr.column, jerr.text);
    push_json_tree(L, j);
}

/* mt.json_decode(text [, name]) -> value; an error names `name` (or "JSON") and the
 * line and column. */
static int l_json_decode(lua_State *L) {
    size_t n;
    const char *text = luaL_checklstring(L, 1, &n);
    mt_lua_json_decode(L, text, n, luaL_optstring(L, 2, "JSON"));
    return 1;
}

/* ---- mt.config snapshots ----------------------------------------------------------- */

void mt_lua_run_note_config(lua_State *L, int idx) {
    idx = lua_absindex(L, idx);
    push_run(L);
    push_json_text(L, idx);
    lua_setfield(L, -2, "config_json");
    lua_pop(L, 1);
}

/* mt.run_info() -> {recipe=, recipe_text=, resume=, overwrite=, allow_changes=,
 * config=} — config is the resolved mt.config table as it was when the recipe asked
 * for it (a copy: what a checkpoint records and a resume compares). */
static int l_run_info(lua_State *L) {
    push_run(L);
    int run = lua_gettop(L);
    lua_createtable(L, 0, 6);
    static const char *const fields[] = {"recipe", "recipe_text", "resume", "overwrite", "allow_changes"};
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        lua_getfield(L, run, fields[i]);
        lua_setfield(L, -2, fields[i]);
    }
    if (lua_getfield(L, run, "config_json") == LUA_TSTRING) {
        size_t n;
        const char *text = lua_tolstring(L, -1, &n);
        json_t *j = json_loadb(text, n, JSON_DECODE_ANY, NULL);
        lua_pop(L, 1);
        if (j) {
            push_json_tree(L, j);
            lua_setfield(L, -2, "config");
        }
    } else {
        lua_pop(L, 1);
    }
    return 1;
}

/* ---- the output directory ---------------------------------------------------------- */

/* What an existing directory holds: 0 empty, 1 only moontune's marker (and runs'
 * files, *has_run set when anything besides the marker is there), -1 files without
 * the marker. The temporary file of a marker whose writing was killed (before its
 * rename) is removed: the directory was made by moontune, which died before marking
 * it. */
static int dir_contents(const char *dir, int *has_run) {
    DIR *d = opendir(dir);
    if (!d) return -2;
    int marker = 0, other = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        if (!strcmp(e->d_name, RUN_MARKER)) {
            marker = 1;
        } else if (mt_atomic_is_tmp_of(e->d_name, RUN_MARKER)) {
            char path[PATH_MAX + 256];
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            if (unlink(path) != 0) other = 1;
        } else {
            other = 1;
        }
    }
    closedir(d);
    *has_run = other;
    if (!marker && !other) return 0;
    return marker ? 1 : -1;
}

static void write_marker(lua_State *L, const char *dir) {
    char *path = NULL;
    mt_error err = {0};
    char when[32] = "";
    time_t now = time(NULL);
    struct tm tm;
    if (gmtime_r(&now, &tm)) strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
    push_run(L);
    lua_getfield(L, -1, "recipe");
    json_t *j = json_pack("{s:s, s:i, s:s, s:s}", "format", "moontune-run", "version", 1, "created", when,
                          "recipe", lua_isstring(L, -1) ? lua_tostring(L, -1) : "");
    lua_pop(L, 2);
    char *text = j ? json_dumps(j, JSON_INDENT(2)) : NULL;
    json_decref(j);
    if (!text || !(path = mt_path_join(dir, RUN_MARKER, &err)) ||
        mt_write_file_atomic(path, text, strlen(text), &err)) {
        free(text);
        free(path);
        if (!err.msg[0]) mt_error_set(&err, MT_ERR_NOMEM, "out of memory");
        luaL_error(L, "output_dir: cannot mark %s as a run directory: %s", dir, err.msg);
    }
    free(text);
    free(path);
}

static void make_dirs(lua_State *L, const char *abs) {
    char partial[PATH_MAX];
    snprintf(partial, sizeof partial, "%s", abs);
    for (char *p = partial + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(partial, 0755) != 0 && errno != EEXIST)
            luaL_error(L, "output_dir: cannot create %s: %s", partial, strerror(errno));
        *p = '/';
    }
    if (mkdir(partial, 0755) != 0 && errno != EEXIST)
        luaL_error(L, "output_dir: cannot create %s: %s", partial, strerror(errno));
}

/* Moves an earlier run aside to <dir>.old-<UTC time>[-N]; never deletes it. */
static void move_aside(lua_State *L, const char *dir) {
    char stamp[32] = "x";
    time_t now = time(NULL);
    struct tm tm;
    if (gmtime_r(&now, &tm)) strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", &tm);
    char target[PATH_MAX + 64];
    struct stat st;
    for (int i = 0; i < 1000; i++) {
        if (i == 0) snprintf(target, sizeof target, "%s.old-%s", dir, stamp);
        else snprintf(target, sizeof target, "%s.old-%s-%d", dir, stamp, i);
        if (lstat(target, &st) != 0 && errno == ENOENT) {
            if (rename(dir, target) != 0)
                luaL_error(L, "output_dir: cannot move the earlier run %s aside to %s: %s", dir, target,
                           strerror(errno));
            fprintf(stderr, "moontune: --overwrite: moved the earlier run %s to %s\n", dir, target);
            return;
        }
    }
    luaL_error(L, "output_dir: cannot find a free name to move %s aside", dir);
}

/* Makes `target` the run's directory: writable in the sandbox, known as claimed. */
static int claim(lua_State *L, const char *target) {
    if (mt_sandbox_active(L)) {
        mt_error err = {0};
        if (mt_sandbox_allow_write(L, target, &err)) return luaL_error(L, "%s", err.msg);
    }
    push_run(L);
    luaL_getsubtable(L, -1, "claimed");
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, target);
    lua_pop(L, 2);
    lua_pushstring(L, target);
    return 1;
}

/* mt.output_dir(path [, {resume = bool}]) -> the absolute path of the run directory.
 *
 * It is created when missing. An existing one is accepted when it is empty or was
 * made by an earlier moontune run (the .moontune-run marker); one with an earlier run
 * in it is reused only when the run resumes (--resume, or opts.resume), or moved aside
 * with --overwrite. The working directory itself, a directory above it, and a
 * directory with files moontune did not write are refused, sandbox or not. In the
 * sandbox the directory must lie below the working directory, and becomes the one
 * place the recipe may write. Calling it again for the same directory in one run
 * returns it without these checks. */
static int output_dir_here(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    int resume = run_flag(L, "resume");
    if (lua_istable(L, 2)) {
        lua_getfield(L, 2, "resume");
        if (lua_toboolean(L, -1)) resume = 1;
        lua_pop(L, 1);
    } else if (!lua_isnoneornil(L, 2)) {
        return luaL_error(L, "output_dir: the second argument must be a table of options");
    }
    int overwrite = run_flag(L, "overwrite");
    size_t n = strlen(path);
    if (n == 0 || n >= PATH_MAX) return luaL_error(L, "output_dir: bad path '%s'", path);
    char cwd[PATH_MAX], cwd_real[PATH_MAX], target[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd) || !realpath(cwd, cwd_real))
        return luaL_error(L, "output_dir: cannot find the working directory: %s", strerror(errno));
    const char *why = mt_path_resolve(path, target);
    if (why) return luaL_error(L, "output_dir: cannot resolve '%s': %s", path, why);

    /* the same directory again in this run */
    push_run(L);
    luaL_getsubtable(L, -1, "claimed");
    if (lua_getfield(L, -1, target) == LUA_TBOOLEAN) {
        lua_pop(L, 3);
        lua_pushstring(L, target);
        return 1;
    }
    lua_pop(L, 3);

    if (mt_path_under(cwd_real, target))
        return luaL_error(L,
                          "output_dir: '%s' is %s (%s); a run writes into a directory of its own, "
                          "for example runs/NAME",
                          path, strcmp(cwd_real, target) ? "a directory above the one moontune runs in"
                                                         : "the directory moontune runs in",
                          target);
    if (mt_sandbox_active(L) && !mt_path_under(target, cwd_real))
        return luaL_error(L,
                          "sandbox: output_dir %s lies outside the directory moontune runs in "
                          "(%s); run with --unsafe to trust this recipe",
                          target, cwd_real);

    struct stat st;
    int exists = stat(target, &st) == 0;
    if (exists && !S_ISDIR(st.st_mode))
        return luaL_error(L, "output_dir: %s exists and is not a directory", target);
    if (exists) {
        int has_run = 0, kind = dir_contents(target, &has_run);
        if (kind == -2) return luaL_error(L, "output_dir: cannot read %s: %s", target, strerror(errno));
        if (kind == -1)
            return luaL_error(L,
                              "output_dir: %s holds files that moontune did not write (it has no %s "
                              "marker); a run writes only into a new or empty directory, or one an "
                              "earlier moontune run made",
                              target, RUN_MARKER);
        if (kind == 1 && has_run && !resume) {
            if (!overwrite)
                return luaL_error(L,
                                  "output_dir: %s holds an earlier run; continue it with --resume, "
                                  "or start over with --overwrite (which moves it aside, to "
                                  "%s.old-<time>)",
                                  target, target);
            move_aside(L, target);
            exists = 0;
        }
    }
    if (!exists) make_dirs(L, target);
    struct stat mst;
    char marker[PATH_MAX + 32];
    snprintf(marker, sizeof marker, "%s/" RUN_MARKER, target);
    if (lstat(marker, &mst) != 0) write_marker(L, target);

    return claim(L, target);
}

/* In a data-parallel job rank 0 checks and prepares the directory; the others wait for
 * its outcome (the same error on every rank, or the same directory), then claim it. */
static int l_output_dir(lua_State *L) {
    lua_settop(L, 2);
    bind_on_rank0(L, output_dir_here);
    if (mt_dist_rank() == 0) return 1;
    return claim(L, lua_tostring(L, -1));
}

/* mt.write_file(path, text): replaces the file atomically (a temporary file, fsync,
 * rename), so a crash leaves the old or the new content. In the sandbox only inside
 * the run directory. */
static int l_write_file(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    size_t n;
    const char *text = luaL_checklstring(L, 2, &n);
    mt_sandbox_check_path(L, path, 1, "write_file");
    mt_error err = {0};
    if (mt_write_file_atomic(path, text, n, &err)) return luaL_error(L, "write_file: %s", err.msg);
    return 0;
}

static const luaL_Reg run_funcs[] = {
    {"output_dir", l_output_dir},   {"run_info", l_run_info},     {"json_encode", l_json_encode},
    {"json_decode", l_json_decode}, {"write_file", l_write_file}, {NULL, NULL},
};

void mt_lua_run_funcs(lua_State *L) { luaL_setfuncs(L, run_funcs, 0); }
