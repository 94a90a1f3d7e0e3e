/* lua_state.c — a Lua state that finds moontune's Lua library. */
#include "lua/lua_state.h"

#include <lauxlib.h>
#include <limits.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/internal.h"

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
            if (mt_is_dir(candidate) && strlen(candidate) < sizeof dir) strcpy(dir, candidate);
        }
        if (!dir[0]) snprintf(dir, sizeof dir, "%s", MT_LUA_SOURCE_DIR);
    }
    return dir;
}

/* The first frame from `level` up that runs Lua code: "file:line", or "" when none. */
static void lua_location(lua_State *L, int level, char *out, size_t size) {
    lua_Debug ar;
    out[0] = '\0';
    for (; level < 64 && lua_getstack(L, level, &ar); level++) {
        if (!lua_getinfo(L, "Sl", &ar) || ar.currentline <= 0) continue;
        snprintf(out, size, "%s:%d", ar.short_src, ar.currentline);
        return;
    }
}

/* The Lua heap's allocator: the C library's, plus a note of the last failed request
 * and of the Lua line that made it. A memory error unwinds without calling the
 * message handler, so this note is the only way to say where it happened. */
typedef struct lua_heap {
    lua_State *L;          /* the main thread: where the location is looked up */
    size_t failed_bytes;   /* the last request that could not be met (0: none) */
    char failed_where[96]; /* "recipe.lua:12" or "" */
} lua_heap;

/* Frames are walked only for large requests: those come from strings, tables and
 * buffers a recipe builds, made while the frames are consistent (Lua 5.4 allocates a
 * grown stack beside the old one). Small ones may come from the VM's own structures. */
#define HEAP_LOCATE_MIN (1u << 20)

static void *heap_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    (void)osize;
    lua_heap *h = ud;
    if (nsize == 0) {
        /* lua_close frees the main state's block last: the note goes with it, so every
         * caller can keep closing with plain lua_close */
        int last = h->L && ptr == lua_getextraspace(h->L);
        free(ptr);
        if (last) free(h);
        return NULL;
    }
    void *p = realloc(ptr, nsize);
    if (!p) {
        h->failed_bytes = nsize;
        h->failed_where[0] = '\0';
        if (nsize >= HEAP_LOCATE_MIN && h->L) lua_location(h->L, 0, h->failed_where, sizeof h->failed_where);
    }
    return p;
}

lua_State *mt_lua_open(mt_error *err) {
    lua_heap *heap = calloc(1, sizeof *heap);
    if (!heap) {
        mt_error_set(err, MT_ERR_NOMEM, "cannot create a Lua state: out of memory");
        return NULL;
    }
    lua_State *L = luaL_newstate(); /* its panic and warning functions, then our allocator */
    if (!L) {
        free(heap);
        mt_error_set(err, MT_ERR_NOMEM, "cannot create a Lua state");
        return NULL;
    }
    heap->L = L;
    lua_setallocf(L, heap_alloc, heap);
    luaL_openlibs(L);
    lua_getglobal(L, "package");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua", mt_lua_dir(), mt_lua_dir());
    lua_setfield(L, -2, "path");
    lua_pop(L, 1);
    return L;
}

/* Does msg start with "chunk:line:" (the position Lua adds to errors raised in Lua)? */
static int has_position(const char *msg) {
    const char *colon = strchr(msg, ':');
    while (colon) {
        const char *p = colon + 1;
        if (*p >= '0' && *p <= '9') {
            while (*p >= '0' && *p <= '9') p++;
            if (*p == ':') return 1;
        }
        colon = strchr(colon + 1, ':');
        if (colon && (colon - msg) > 512) break;
    }
    return 0;
}

/* The message handler: every error leaves with the recipe position it was raised at
 * (errors from C functions and stack overflows have none of their own), a readable
 * message when the error value is not a string, and a traceback. */
static int traceback(lua_State *L) {
    char where[128];
    lua_location(L, 1, where, sizeof where);
    const char *msg;
    if (lua_type(L, 1) == LUA_TSTRING || lua_type(L, 1) == LUA_TNUMBER) {
        msg = lua_tostring(L, 1);
    } else if (luaL_getmetafield(L, 1, "__tostring") != LUA_TNIL) {
        lua_pop(L, 1);
        msg = luaL_tolstring(L, 1, NULL);
    } else if (lua_type(L, 1) == LUA_TTABLE &&
               (lua_getfield(L, 1, "message") == LUA_TSTRING ||
                (lua_pop(L, 1), lua_getfield(L, 1, "msg") == LUA_TSTRING))) {
        msg = lua_tostring(L, -1);
    } else {
        msg = lua_pushfstring(L, "an error was raised with a %s value instead of a message "
                                 "(error() takes a string)",
                              luaL_typename(L, 1));
    }
    if (where[0] && !has_position(msg)) msg = lua_pushfstring(L, "%s: %s", where, msg);
    luaL_traceback(L, L, msg, 1);
    return 1;
}

mt_status mt_lua_pcall(lua_State *L, int nargs, int nresults, mt_error *err) {
    int base = lua_gettop(L) - nargs;
    lua_pushcfunction(L, traceback);
    lua_insert(L, base);
    void *ud = NULL;
    lua_Alloc f = lua_getallocf(L, &ud);
    lua_heap *heap = f == heap_alloc ? ud : NULL;
    if (heap) heap->failed_bytes = 0;
    int rc = lua_pcall(L, nargs, nresults, base);
    lua_remove(L, base);
    if (rc == LUA_OK) return MT_OK;
    mt_status st;
    if (rc == LUA_ERRMEM) {
        /* no handler ran: say where from the allocator's note */
        if (heap && heap->failed_bytes)
            st = mt_error_set(err, MT_ERR_NOMEM, "%s%snot enough memory (a request for %.1f MiB failed)",
                              heap->failed_where, heap->failed_where[0] ? ": " : "",
                              (double)heap->failed_bytes / 1048576.0);
        else
            st = mt_error_set(err, MT_ERR_NOMEM, "not enough memory");
    } else {
        const char *msg = lua_tostring(L, -1);
        st = mt_error_set(err, MT_ERR_INVALID_ARG, "%s", msg ? msg : "(an error without a message)");
    }
    lua_pop(L, 1);
    return st;
}

/* registry: {name = "cpu" | "cuda", from_command_line = bool} */
static const char device_key = 0;

void mt_lua_set_device(lua_State *L, const char *device, int from_command_line) {
    if (!device || !*device) return; /* the default: resolved when first needed */
    lua_createtable(L, 0, 2);
    lua_pushstring(L, device);
    lua_setfield(L, -2, "name");
    lua_pushboolean(L, from_command_line);
    lua_setfield(L, -2, "from_command_line");
    lua_rawsetp(L, LUA_REGISTRYINDEX, &device_key);
}

const char *mt_lua_device(lua_State *L, int *from_command_line) {
    const char *name = NULL;
    int explicit_device = 0;
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &device_key) == LUA_TTABLE) {
        lua_getfield(L, -1, "from_command_line");
        explicit_device = lua_toboolean(L, -1);
        lua_pop(L, 1);
        lua_getfield(L, -1, "name");
        name = lua_tostring(L, -1); /* anchored by the table, which the registry holds */
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    if (from_command_line) *from_command_line = name ? explicit_device : 0;
    return name;
}
