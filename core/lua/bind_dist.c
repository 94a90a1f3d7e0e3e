/* bind_dist.c — the data-parallel job as recipes see it (dist/dist.h; docs/distributed.md):
 *
 *   mt.rank() -> this process' rank, from 0;  mt.world_size() -> the number of ranks
 *       (1 without a launcher). Every rank runs the same recipe on its own rows of each
 *       batch; the trainer keeps outputs on rank 0.
 *   mt.broadcast(value [, root = 0]) -> rank root's value on every rank: a string (any
 *       bytes), or a JSON-able value (nil, boolean, number, tables of them). Decisions taken on one rank
 *       (a callback's stop, a wall-clock budget) reach the others this way.
 *   mt.all_sum(x) -> x summed over the ranks: a number, or a list of numbers (each
 *       summed); integers stay integers.
 * Each is a collective: every rank must call it, in the same order. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h"
#include "dist/dist.h"
#include "lua/bind_internal.h"
#include "lua/run_dir.h"

static int l_rank(lua_State *L) {
    lua_pushinteger(L, mt_dist_rank());
    return 1;
}

static int l_world_size(lua_State *L) {
    lua_pushinteger(L, mt_dist_size());
    return 1;
}

static int l_broadcast(lua_State *L) {
    lua_Integer root = luaL_optinteger(L, 2, 0);
    if (root < 0 || root >= mt_dist_size())
        return luaL_error(L, "broadcast: root %I is not a rank (0 to %d)", root, mt_dist_size() - 1);
    if (mt_dist_size() == 1) {
        lua_settop(L, 1);
        return 1;
    }
    /* [0]: the length; [1]: 1 for a string sent as it is, 0 for JSON text */
    uint64_t head[2] = {0, 0};
    const char *text = NULL;
    if (mt_dist_rank() == root) {
        size_t n = 0;
        if (lua_type(L, 1) == LUA_TSTRING) {
            text = lua_tolstring(L, 1, &n);
            head[1] = 1;
        } else {
            text = mt_lua_json_encode(L, 1); /* held on the stack */
            n = strlen(text);
        }
        head[0] = n;
    }
    mt_error err = {0};
    if (mt_dist_broadcast(head, sizeof head, (int)root, &err)) return bind_raise(L, &err);
    const uint64_t len = head[0];
    char *buf = bind_scratch(L, (size_t)len + 1);
    if (mt_dist_rank() == root) memcpy(buf, text, (size_t)len);
    buf[len] = '\0';
    if (mt_dist_broadcast(buf, (size_t)len, (int)root, &err)) return bind_raise(L, &err);
    if (head[1]) lua_pushlstring(L, buf, (size_t)len);
    else mt_lua_json_decode(L, buf, (size_t)len, "broadcast");
    return 1;
}

static int l_all_sum(lua_State *L) {
    int is_list = lua_type(L, 1) == LUA_TTABLE;
    if (!is_list) luaL_checknumber(L, 1);
    lua_Integer n = is_list ? (lua_Integer)lua_rawlen(L, 1) : 1;
    /* the sum in doubles, unless every value is an integer (then exact in int64) */
    int integers = 1;
    for (lua_Integer i = 1; i <= n; i++) {
        if (is_list) lua_rawgeti(L, 1, i);
        else lua_pushvalue(L, 1);
        if (!lua_isnumber(L, -1)) return luaL_error(L, "all_sum: element %I is not a number", i);
        integers = integers && lua_isinteger(L, -1);
        lua_pop(L, 1);
    }
    unsigned char flag = (unsigned char)!integers; /* a float anywhere: floats everywhere */
    mt_error err = {0};
    if (mt_dist_max_u8(&flag, 1, &err)) return bind_raise(L, &err);
    integers = !flag;
    double *f = bind_scratch(L, (size_t)(n ? n : 1) * sizeof(double));
    int64_t *k = (int64_t *)(void *)f;
    for (lua_Integer i = 1; i <= n; i++) {
        if (is_list) lua_rawgeti(L, 1, i);
        else lua_pushvalue(L, 1);
        if (integers) k[i - 1] = (int64_t)lua_tointeger(L, -1);
        else f[i - 1] = lua_tonumber(L, -1);
        lua_pop(L, 1);
    }
    mt_status st = integers ? mt_dist_sum_i64(k, (size_t)n, &err) : mt_dist_sum_f64(f, (size_t)n, &err);
    if (st) return bind_raise(L, &err);
    if (is_list) lua_createtable(L, (int)n, 0);
    for (lua_Integer i = 1; i <= n; i++) {
        if (integers) lua_pushinteger(L, (lua_Integer)k[i - 1]);
        else lua_pushnumber(L, f[i - 1]);
        if (is_list) lua_rawseti(L, -2, i);
    }
    return 1;
}

int bind_on_rank0(lua_State *L, lua_CFunction work) {
    if (mt_dist_size() == 1) return work(L);
    const int n = lua_gettop(L);
    char *text = NULL; /* rank 0's result, or its error message */
    mt_status st = MT_OK;
    if (mt_dist_rank() == 0) {
        lua_pushcfunction(L, work);
        lua_insert(L, 1);
        st = lua_pcall(L, n, 1, 0) == LUA_OK ? MT_OK : MT_ERR_INVALID_ARG;
        const char *s = lua_tostring(L, -1);
        if (!(text = mt_strdup(s ? s : (st ? "failed" : ""), "rank 0's outcome", NULL)))
            mt_dist_abort(1); /* the other ranks wait for it */
        lua_pop(L, 1);
    }
    mt_error err = {0};
    st = mt_dist_share_outcome(st, &err, &text);
    if (st && st != MT_ERR_INVALID_ARG) { /* the exchange itself failed */
        free(text);
        return bind_raise(L, &err);
    }
    lua_pushstring(L, text ? text : "");
    free(text);
    if (st) return lua_error(L); /* rank 0's error, on every rank */
    return 1;
}

static const luaL_Reg functions[] = {
    {"rank", l_rank},
    {"world_size", l_world_size},
    {"broadcast", l_broadcast},
    {"all_sum", l_all_sum},
    {NULL, NULL},
};

void mt_bind_dist_open(lua_State *L) { luaL_setfuncs(L, functions, 0); }
