/* bind_common.c — what every part of moontune.core uses: errors raised with the core's
 * message, typed option tables, scratch memory, result fields, the plugin registries
 * (one set per Lua state) and class creation. */
#include "lua/bind_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Raises the core's error as a Lua error (never returns). */
int bind_raise(lua_State *L, const mt_error *err) {
    return luaL_error(L, "%s", err->msg[0] ? err->msg : "moontune: unknown error");
}

/* ---- option tables ------------------------------------------------------- */

/* Pushes opts[key] (nil when opts is absent). */
int bind_opt_field(lua_State *L, int opts, const char *key) {
    if (lua_isnoneornil(L, opts)) {
        lua_pushnil(L);
        return LUA_TNIL;
    }
    return lua_getfield(L, opts, key);
}

lua_Integer bind_opt_int(lua_State *L, int opts, const char *key, lua_Integer def) {
    int t = bind_opt_field(L, opts, key);
    lua_Integer v = def;
    if (t != LUA_TNIL) {
        int ok;
        v = lua_tointegerx(L, -1, &ok);
        if (!ok) luaL_error(L, "option '%s': expected an integer, found %s", key, luaL_typename(L, -1));
    }
    lua_pop(L, 1);
    return v;
}

double bind_opt_num(lua_State *L, int opts, const char *key, double def) {
    int t = bind_opt_field(L, opts, key);
    double v = def;
    if (t != LUA_TNIL) {
        if (t != LUA_TNUMBER) luaL_error(L, "option '%s': expected a number, found %s", key, luaL_typename(L, -1));
        v = lua_tonumber(L, -1);
    }
    lua_pop(L, 1);
    return v;
}

/* bind_opt_int / bind_opt_num within a shared limit (core/base/numparse.c): the Lua API accepts the
 * values the commands accept, and nothing is cut to 32 bits on the way. */
lua_Integer bind_opt_int_in(lua_State *L, int opts, const char *key, lua_Integer def,
                              const mt_int_limit *lim) {
    if (bind_opt_field(L, opts, key) == LUA_TNIL) {
        lua_pop(L, 1);
        return def; /* the caller's default: not the user's value */
    }
    lua_pop(L, 1);
    lua_Integer v = bind_opt_int(L, opts, key, def);
    mt_error err = {0};
    char name[80];
    snprintf(name, sizeof name, "option '%s'", key);
    if (mt_check_int(name, (int64_t)v, lim, &err)) luaL_error(L, "%s", err.msg);
    return v;
}

static double opt_num_in(lua_State *L, int opts, const char *key, double def,
                         const mt_real_limit *lim) {
    if (bind_opt_field(L, opts, key) == LUA_TNIL) {
        lua_pop(L, 1);
        return def;
    }
    lua_pop(L, 1);
    double v = bind_opt_num(L, opts, key, def);
    mt_error err = {0};
    char name[80];
    snprintf(name, sizeof name, "option '%s'", key);
    if (mt_check_real(name, v, lim, &err)) luaL_error(L, "%s", err.msg);
    return v;
}

/* opt_num_in for a value kept as a float (sampling): also refused when the rounding to
 * float leaves the limit (top_p = 1e-50 would become 0), as the command refuses it. */
float bind_opt_float_in(lua_State *L, int opts, const char *key, float def, const mt_real_limit *lim) {
    double v = opt_num_in(L, opts, key, def, lim);
    mt_error err = {0};
    char name[80];
    snprintf(name, sizeof name, "option '%s'", key);
    float f = def;
    if (mt_check_float(name, v, lim, &f, &err)) luaL_error(L, "%s", err.msg);
    return f;
}

/* The seed at stack index idx (`name` for errors): an integer >= 0, or a decimal string
 * for the seeds past 2^63 - 1 that a Lua integer cannot hold, so that the Lua API takes
 * exactly the seeds `--seed` takes (0 .. 2^64 - 1); a negative seed is refused, not
 * wrapped. */
uint64_t bind_seed_at(lua_State *L, int idx, const char *name) {
    mt_error err = {0};
    uint64_t seed = 0;
    mt_status st;
    if (lua_type(L, idx) == LUA_TSTRING) {
        st = mt_parse_u64(name, lua_tostring(L, idx), &seed, &err);
    } else {
        int ok = 0;
        lua_Integer v = lua_tointegerx(L, idx, &ok);
        if (!ok)
            return (uint64_t)luaL_error(L, "%s: expected an integer or a decimal string, found %s", name,
                                        luaL_typename(L, idx));
        st = mt_check_seed(name, (int64_t)v, &seed, &err);
    }
    if (st) luaL_error(L, "%s", err.msg);
    return seed;
}

/* A positional integer argument within a shared limit: luaL_checkinteger then (int)
 * would turn 4294967297 into 1. */
lua_Integer bind_arg_int_in(lua_State *L, int idx, const char *name, const mt_int_limit *lim) {
    lua_Integer v = luaL_checkinteger(L, idx);
    mt_error err = {0};
    if (mt_check_int(name, (int64_t)v, lim, &err)) luaL_error(L, "%s", err.msg);
    return v;
}

uint64_t bind_opt_seed(lua_State *L, int opts, const char *key, uint64_t def) {
    uint64_t seed = def;
    if (bind_opt_field(L, opts, key) != LUA_TNIL) {
        char name[80];
        snprintf(name, sizeof name, "option '%s'", key);
        seed = bind_seed_at(L, lua_gettop(L), name);
    }
    lua_pop(L, 1);
    return seed;
}

int bind_opt_bool(lua_State *L, int opts, const char *key, int def) {
    int t = bind_opt_field(L, opts, key);
    int v = def;
    if (t != LUA_TNIL) {
        if (t != LUA_TBOOLEAN) luaL_error(L, "option '%s': expected a boolean, found %s", key, luaL_typename(L, -1));
        v = lua_toboolean(L, -1);
    }
    lua_pop(L, 1);
    return v;
}

/* The string stays valid while opts is on the stack (the table holds it). */
const char *bind_opt_str(lua_State *L, int opts, const char *key, const char *def) {
    int t = bind_opt_field(L, opts, key);
    const char *v = def;
    if (t != LUA_TNIL) {
        if (t != LUA_TSTRING) luaL_error(L, "option '%s': expected a string, found %s", key, luaL_typename(L, -1));
        v = lua_tostring(L, -1);
    }
    lua_pop(L, 1);
    return v;
}

void bind_check_opts(lua_State *L, int idx) {
    if (!lua_isnoneornil(L, idx)) luaL_checktype(L, idx, LUA_TTABLE);
}

/* Scratch memory that Lua frees (so a raised error leaks nothing); left on the stack. */
void *bind_scratch(lua_State *L, size_t bytes) {
    void *p = lua_newuserdatauv(L, bytes ? bytes : 1, 0);
    memset(p, 0, bytes ? bytes : 1);
    return p;
}

const char **bind_string_list(lua_State *L, int list, const char *key, int allow_false, int *n) {
    list = lua_absindex(L, list);
    *n = (int)lua_rawlen(L, list);
    const char **out = bind_scratch(L, (size_t)*n * sizeof *out);
    for (int i = 0; i < *n; i++) {
        const int t = lua_rawgeti(L, list, i + 1);
        if (t != LUA_TSTRING && !(allow_false && t == LUA_TBOOLEAN && !lua_toboolean(L, -1))) {
            luaL_error(L, "option '%s': item %d: expected a string%s, found %s", key, i + 1,
                       allow_false ? " or false" : "", luaL_typename(L, -1));
            return NULL;
        }
        out[i] = t == LUA_TSTRING ? lua_tostring(L, -1) : NULL; /* held by the list */
        lua_pop(L, 1);
    }
    return out;
}

void bind_set_int(lua_State *L, const char *k, lua_Integer v) {
    lua_pushinteger(L, v);
    lua_setfield(L, -2, k);
}
void bind_set_num(lua_State *L, const char *k, double v) {
    lua_pushnumber(L, v);
    lua_setfield(L, -2, k);
}
void bind_set_str(lua_State *L, const char *k, const char *v) {
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}
void bind_set_bool(lua_State *L, const char *k, int v) {
    lua_pushboolean(L, v);
    lua_setfield(L, -2, k);
}

/* ---- the plugin registries (one set per Lua state) ------------------------ */

static int registries_gc(lua_State *L) {
    registries *r = luaL_checkudata(L, 1, SENTINEL_MT);
    for (int i = 0; i < r->n; i++) {
        mt_registry_close(r->regs[i]);
        free(r->keys[i]);
    }
    free(r->regs);
    free(r->keys);
    r->regs = NULL;
    r->keys = NULL;
    r->n = 0;
    return 0;
}

/* Pushes the sentinel, creating it on first use. */
registries *bind_push_sentinel(lua_State *L) {
    if (lua_getfield(L, LUA_REGISTRYINDEX, SENTINEL_KEY) == LUA_TUSERDATA)
        return lua_touserdata(L, -1);
    lua_pop(L, 1);
    registries *r = lua_newuserdatauv(L, sizeof *r, 0);
    memset(r, 0, sizeof *r);
    if (luaL_newmetatable(L, SENTINEL_MT)) {
        lua_pushcfunction(L, registries_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, SENTINEL_KEY);
    return r;
}

/* The registry for these extra directories (opened once per distinct list). */
mt_registry *bind_get_registry(lua_State *L, registries *r, const char *const *dirs, int n_dirs) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (int i = 0; i < n_dirs; i++) {
        if (i) luaL_addchar(&b, '\n');
        luaL_addstring(&b, dirs[i]);
    }
    luaL_pushresult(&b);
    const char *key = lua_tostring(L, -1);
    for (int i = 0; i < r->n; i++)
        if (!strcmp(r->keys[i], key)) {
            lua_pop(L, 1);
            return r->regs[i];
        }
    mt_error err = {0};
    mt_registry *reg = NULL;
    if (mt_registry_open(dirs, (size_t)n_dirs, &reg, &err)) bind_raise(L, &err);
    mt_registry **nr = realloc(r->regs, (size_t)(r->n + 1) * sizeof *nr);
    if (nr) r->regs = nr;
    char **nk = nr ? realloc(r->keys, (size_t)(r->n + 1) * sizeof *nk) : NULL;
    if (nk) r->keys = nk;
    char *k = nk ? strdup(key) : NULL;
    if (!k) {
        mt_registry_close(reg);
        luaL_error(L, "out of memory opening the plugin registry");
    }
    r->regs[r->n] = reg;
    r->keys[r->n] = k;
    r->n++;
    lua_pop(L, 1);
    return reg;
}

/* A method that does nothing: close() and __close of objects that own nothing. */
int bind_noop(lua_State *L) {
    (void)L;
    return 0;
}

/* A metatable with methods as __index, and gc as __gc and __close. */
void bind_new_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc,
                      lua_CFunction tostring) {
    if (!luaL_newmetatable(L, name)) {
        lua_pop(L, 1);
        return;
    }
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
    if (gc) {
        lua_pushcfunction(L, gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, gc);
        lua_setfield(L, -2, "__close");
    } else {
        lua_pushcfunction(L, bind_noop);
        lua_setfield(L, -2, "__close");
    }
    if (tostring) {
        lua_pushcfunction(L, tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pushstring(L, name);
    lua_setfield(L, -2, "__name");
    lua_pop(L, 1);
}


/* mt.isatty(stream) -> whether the stream is a terminal: stream is "stdout", "stderr",
 * "stdin" or an open Lua file handle (io.stdout, io.open(...)); anything else (a table
 * with a write method, a closed file) is not a terminal. The trainer draws its \r
 * progress bar only on a terminal, so log files under nohup or a batch system stay
 * plain lines whatever $TERM says. */
int bind_isatty(lua_State *L) {
    FILE *f = NULL;
    if (lua_type(L, 1) == LUA_TSTRING) {
        const char *name = lua_tostring(L, 1);
        if (!strcmp(name, "stdout")) f = stdout;
        else if (!strcmp(name, "stderr")) f = stderr;
        else if (!strcmp(name, "stdin")) f = stdin;
        else return luaL_error(L, "isatty: unknown stream '%s' (want \"stdout\", \"stderr\", \"stdin\" or a file)", name);
    } else {
        luaL_Stream *s = luaL_testudata(L, 1, LUA_FILEHANDLE);
        if (s && s->closef && s->f) f = s->f;
    }
    int fd = f ? fileno(f) : -1;
    lua_pushboolean(L, fd >= 0 && isatty(fd));
    return 1;
}
