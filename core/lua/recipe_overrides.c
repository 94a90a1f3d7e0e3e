/* recipe_overrides.c — type-checked --set key=value overrides of a recipe's config table. */
#include "lua/recipe_overrides.h"

#include <ctype.h>
#include <errno.h>
#include <lauxlib.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h"

#define CO_KEY_MAX 256
#define CO_MAX_KEYS 64

static int co_levenshtein(const char *a, const char *b) {
    size_t na = strlen(a), nb = strlen(b);
    if (na >= CO_MAX_KEYS || nb >= CO_MAX_KEYS) return 1 << 20;
    int prev[CO_MAX_KEYS + 1], cur[CO_MAX_KEYS + 1];
    for (size_t j = 0; j <= nb; j++) prev[j] = (int)j;
    for (size_t i = 1; i <= na; i++) {
        cur[0] = (int)i;
        for (size_t j = 1; j <= nb; j++) {
            int sub = prev[j - 1] + (a[i - 1] != b[j - 1]);
            int del = prev[j] + 1, ins = cur[j - 1] + 1;
            cur[j] = sub < del ? (sub < ins ? sub : ins) : (del < ins ? del : ins);
        }
        memcpy(prev, cur, (nb + 1) * sizeof prev[0]);
    }
    return prev[nb];
}

static int co_cmp(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Writes the string keys of the table at idx into out: the close ones to name (edit
 * distance <= 2, or one a prefix of the other) as "did you mean ...", else all of them. */
static void co_suggest(lua_State *L, int idx, const char *prefix, const char *name, char *out, size_t cap) {
    const char *keys[CO_MAX_KEYS];
    int n = 0, truncated = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TSTRING) continue;
        if (n < CO_MAX_KEYS) keys[n++] = lua_tostring(L, -1); /* kept alive by the table */
        else truncated = 1;
    }
    qsort(keys, (size_t)n, sizeof keys[0], co_cmp);
    const char *close[CO_MAX_KEYS];
    int nc = 0;
    size_t nlen = strlen(name);
    for (int i = 0; i < n; i++) {
        size_t klen = strlen(keys[i]);
        int is_prefix = nlen > 0 && klen > 0 &&
                        strncmp(keys[i], name, klen < nlen ? klen : nlen) == 0;
        if (co_levenshtein(name, keys[i]) <= 2 || is_prefix) close[nc++] = keys[i];
    }
    const char *const *list = nc ? close : keys;
    int nl = nc ? nc : n;
    size_t len = (size_t)snprintf(out, cap, nc ? "did you mean " : (n ? "known keys: " : "the table is empty"));
    for (int i = 0; i < nl && len < cap; i++)
        len += (size_t)snprintf(out + len, cap - len, "%s%s%s", i ? ", " : "", prefix, list[i]);
    if (!nc && truncated && len < cap) snprintf(out + len, cap - len, ", ...");
    else if (nc && len < cap) snprintf(out + len, cap - len, "?");
}

/* 1 when the table at idx is a non-empty sequence of strings and nothing else. */
static int co_is_string_list(lua_State *L, int idx) {
    lua_Integer n = (lua_Integer)lua_rawlen(L, idx), count = 0;
    if (n == 0) return 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        int ok = lua_isinteger(L, -2) && lua_tointeger(L, -2) >= 1 && lua_tointeger(L, -2) <= n &&
                 lua_type(L, -1) == LUA_TSTRING;
        lua_pop(L, 1);
        if (!ok) {
            lua_pop(L, 1);
            return 0;
        }
        count++;
    }
    return count == n;
}

/* Whether the integer literal `text` lies outside 64 bits. Lua reads it anyway, and not
 * as written: a hex integer wraps modulo 2^64 (0x10000000000000003 becomes 3) and a
 * decimal one becomes a float. */
static int co_int_overflows(const char *text) {
    while (isspace((unsigned char)*text)) text++;
    if (*text == '-' || *text == '+') text++;
    if (text[0] == '0' && (text[1] == 'x' || text[1] == 'X')) {
        text += 2;
        while (*text == '0') text++;
        int digits = 0;
        while (isxdigit((unsigned char)text[digits])) digits++;
        return digits > 16;
    }
    errno = 0;
    (void)strtoll(text, NULL, 10);
    return errno == ERANGE;
}

/* Pushes the new value for the current value at top (type-checked), or returns an error. */
static mt_status co_convert(lua_State *L, const char *set, const char *key, const char *value, mt_error *err) {
    int cur = lua_gettop(L);
    switch (lua_type(L, cur)) {
    case LUA_TNUMBER:
        if (lua_stringtonumber(L, value) == 0)
            return mt_error_set(err, MT_ERR_INVALID_ARG, "--set %s: %s: expected a%s number, found '%s'", set, key,
                                lua_isinteger(L, cur) ? "n integer" : "", value);
        if (lua_isinteger(L, cur) && co_int_overflows(value)) {
            lua_pop(L, 1);
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "--set %s: %s: '%s' is out of range (expected an integer from %lld to %lld)",
                                set, key, value, (long long)LUA_MININTEGER, (long long)LUA_MAXINTEGER);
        }
        if (lua_isinteger(L, cur) && !lua_isinteger(L, -1)) {
            lua_pop(L, 1);
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "--set %s: %s: expected an integer (the recipe has %lld), found %s", set, key,
                                (long long)lua_tointeger(L, cur), value);
        }
        if (!lua_isinteger(L, cur)) {
            lua_Number d = lua_tonumber(L, -1);
            lua_pop(L, 1);
            /* 1e400 reads as inf: no recipe value (a learning rate, a fraction) means that */
            if (!isfinite(d))
                return mt_error_set(err, MT_ERR_INVALID_ARG,
                                    "--set %s: %s: '%s' is out of range (expected a finite number)", set, key,
                                    value);
            lua_pushnumber(L, d);
        }
        return MT_OK;
    case LUA_TBOOLEAN:
        if (strcmp(value, "true") == 0) lua_pushboolean(L, 1);
        else if (strcmp(value, "false") == 0) lua_pushboolean(L, 0);
        else
            return mt_error_set(err, MT_ERR_INVALID_ARG, "--set %s: %s: expected a boolean (true or false), found '%s'",
                                set, key, value);
        return MT_OK;
    case LUA_TSTRING:
        lua_pushstring(L, value);
        return MT_OK;
    case LUA_TTABLE:
        if (co_is_string_list(L, cur)) {
            lua_newtable(L);
            lua_Integer i = 0;
            for (const char *p = value; *value; p++) { /* "" gives {} */
                size_t n = strcspn(p, ",");
                lua_pushlstring(L, p, n);
                lua_rawseti(L, -2, ++i);
                p += n;
                if (!*p) break;
            }
            return MT_OK;
        } else if (lua_getfield(L, cur, "name") == LUA_TSTRING) {
            /* a plugin choice {name = "adamw", option = ...}: --set optimizer=lion names
             * another plugin; its options stay and the plugin validates them */
            lua_pop(L, 1);
            lua_pushvalue(L, cur);
            lua_pushstring(L, value);
            lua_setfield(L, -2, "name");
            return MT_OK;
        } else {
            lua_pop(L, 1);
            char known[320];
            co_suggest(L, cur, "", "", known, sizeof known);
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "--set %s: %s is a table; set one of its keys with %s.KEY=value (%s)", set, key,
                                key, known);
        }
    default:
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "--set %s: %s is a %s and cannot be set from the command line", set, key,
                            luaL_typename(L, cur));
    }
}

static mt_status co_apply_one(lua_State *L, int cfg, const char *set, mt_error *err) {
    char key[CO_KEY_MAX];
    const char *value;
    mt_status split = mt_split_kv("--set", set, key, sizeof key, &value, err);
    if (split != MT_OK) return split;
    size_t klen = strlen(key);

    lua_pushvalue(L, cfg);
    char *part = key;
    for (;;) {
        int table = lua_gettop(L);
        char *dot = strchr(part, '.');
        if (dot) *dot = '\0';
        if (!*part) {
            if (dot) *dot = '.';
            return mt_error_set(err, MT_ERR_INVALID_ARG, "--set %s: empty component in key '%.*s'", set,
                                (int)klen, set);
        }
        lua_pushstring(L, part);
        lua_rawget(L, table);
        /* key[0 .. end of part] is the path so far; prefix is the part before it */
        char prefix[CO_KEY_MAX];
        snprintf(prefix, sizeof prefix, "%.*s", (int)(part - key), set);
        if (lua_isnil(L, -1)) {
            char hint[320];
            co_suggest(L, table, prefix, part, hint, sizeof hint);
            return mt_error_set(err, MT_ERR_INVALID_ARG, "--set %s: unknown key '%s%s' (%s)", set, prefix, part,
                                hint);
        }
        if (!dot) {
            mt_status st = co_convert(L, set, key, value, err);
            if (st != MT_OK) return st;
            lua_pushstring(L, part);
            lua_insert(L, -2);
            lua_rawset(L, table);
            return MT_OK;
        }
        *dot = '.';
        if (!lua_istable(L, -1))
            return mt_error_set(err, MT_ERR_INVALID_ARG, "--set %s: %.*s is a %s, not a table", set,
                                (int)(dot - key), key, luaL_typename(L, -1));
        part = dot + 1;
    }
}

mt_status mt_config_apply_overrides(lua_State *L, int config_index, const char *const *sets, int n_sets,
                                    mt_error *err) {
    int cfg = lua_absindex(L, config_index);
    if (!lua_istable(L, cfg))
        return mt_error_set(err, MT_ERR_INVALID_ARG, "--set: the recipe's config is a %s, not a table",
                            luaL_typename(L, cfg));
    for (int i = 0; i < n_sets; i++) {
        int top = lua_gettop(L);
        mt_status st = co_apply_one(L, cfg, sets[i], err);
        lua_settop(L, top);
        if (st != MT_OK) return st;
    }
    return MT_OK;
}
