/* bind_tensorboard.c — TensorBoard event files for Lua (core/formats/tfevents.c;
 * docs/tensorboard.md):
 *
 *   mt.tensorboard_open(dir [, {restart_step = N}]) -> a TensorBoard writer: a new
 *       events file in dir (in the sandbox: only inside the run directory). restart_step
 *       (a resumed run: the first step it writes) adds a SessionLog START, so that
 *       TensorBoard drops what earlier files hold at that step and after.
 *   w:scalars(step, {tag = number, ...})   one event holding these values (float32),
 *       tags in sorted order; each event reaches the file by one write(2) at once
 *   w:path() -> the file;  w:close() (also __close and __gc)
 *   mt.tensorboard_read(path) -> events [, torn]: every record of an events file, or of
 *       every events file of a directory in name order (as TensorBoard reads them), with
 *       both CRCs checked; each event {file=, offset=, wall_time=, step=, kind=
 *       "file_version" | "summary" | "session_log" | "other", file_version=,
 *       session_status = "start" | "stop" | "checkpoint" | "unspecified",
 *       values = {{tag=, value=}, ...}}. A file that ends inside a record (a writer
 *       killed mid-write) gives its complete records and `torn`, a message naming it.
 *
 * Memory the core allocates (a mapped file, a decoded event) sits in a guard userdata
 * whose __gc releases it, so a Lua error while building the result leaks nothing. */
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "base/internal.h"
#include "formats/tfevents.h"
#include "lua/bind_internal.h"
#include "lua/sandbox.h"

#define TENSORBOARD_MT "moontune.TensorBoard"
#define TB_READ_GUARD_MT "moontune.TensorBoardReadGuard"

typedef struct ltb {
    mt_tfevents_writer *w; /* NULL once closed */
    char *path;            /* kept for path() after close */
} ltb;

static double wall_now(void) {
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return (double)time(NULL);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static ltb *check_tb(lua_State *L, int idx) { return luaL_checkudata(L, idx, TENSORBOARD_MT); }

/* mt.tensorboard_open(dir [, opts]) */
static int l_tensorboard_open(lua_State *L) {
    const char *dir = luaL_checkstring(L, 1);
    bind_check_opts(L, 2);
    lua_Integer restart = -1;
    if (bind_opt_field(L, 2, "restart_step") != LUA_TNIL) {
        int ok = 0;
        restart = lua_tointegerx(L, -1, &ok);
        if (!ok || restart < 0)
            return luaL_error(L, "tensorboard_open: option 'restart_step' must be an integer >= 0");
    }
    lua_pop(L, 1);
    mt_sandbox_check_path(L, dir, 1, "tensorboard_open");
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return luaL_error(L, "tensorboard_open: %s is not a directory", dir);
    ltb *tb = lua_newuserdatauv(L, sizeof *tb, 0);
    memset(tb, 0, sizeof *tb);
    luaL_setmetatable(L, TENSORBOARD_MT);
    mt_error err = {0};
    if (mt_tfevents_create(dir, wall_now(), (int64_t)restart, &tb->w, &err))
        return luaL_error(L, "tensorboard_open: %s", err.msg);
    tb->path = strdup(mt_tfevents_writer_path(tb->w));
    if (!tb->path) {
        mt_tfevents_close(tb->w, NULL);
        tb->w = NULL;
        return luaL_error(L, "tensorboard_open: out of memory");
    }
    return 1;
}

static int cmp_value(const void *a, const void *b) {
    return strcmp(((const mt_tfevents_value *)a)->tag, ((const mt_tfevents_value *)b)->tag);
}

static float to_float(double v) {
    if (isfinite(v) && fabs(v) > FLT_MAX) return v > 0 ? INFINITY : -INFINITY;
    return (float)v;
}

/* w:scalars(step, {tag = number, ...}) */
static int tb_scalars(lua_State *L) {
    ltb *tb = check_tb(L, 1);
    int ok = 0;
    lua_Integer step = lua_tointegerx(L, 2, &ok);
    if (!ok) return luaL_error(L, "tensorboard: scalars: the step must be an integer, got %s", luaL_typename(L, 2));
    luaL_checktype(L, 3, LUA_TTABLE);
    if (!tb->w) return luaL_error(L, "tensorboard: %s is closed", tb->path ? tb->path : "the writer");
    size_t n = 0;
    lua_pushnil(L);
    while (lua_next(L, 3)) {
        if (lua_type(L, -2) != LUA_TSTRING)
            return luaL_error(L, "tensorboard: scalars: every key must be a string tag, found %s", luaL_typename(L, -2));
        if (lua_type(L, -1) != LUA_TNUMBER)
            return luaL_error(L, "tensorboard: scalars: value '%s' is %s, want a number", lua_tostring(L, -2),
                              luaL_typename(L, -1));
        lua_pop(L, 1);
        if (++n > MT_TFEVENTS_MAX_VALUES)
            return luaL_error(L, "tensorboard: scalars: more than %d values", MT_TFEVENTS_MAX_VALUES);
    }
    mt_tfevents_value *vals = bind_scratch(L, (n ? n : 1) * sizeof *vals);
    size_t i = 0;
    lua_pushnil(L);
    while (lua_next(L, 3)) {
        vals[i].tag = lua_tostring(L, -2); /* kept alive by the table */
        vals[i].simple_value = to_float(lua_tonumber(L, -1));
        i++;
        lua_pop(L, 1);
    }
    if (n > 1) qsort(vals, n, sizeof *vals, cmp_value);
    mt_tfevents_event ev = {.wall_time = wall_now(), .step = (int64_t)step, .kind = MT_TFEVENTS_SUMMARY,
                            .values = vals, .n_values = n};
    mt_error err = {0};
    if (mt_tfevents_add(tb->w, &ev, &err)) return luaL_error(L, "tensorboard: %s", err.msg);
    return 0;
}

static int tb_path(lua_State *L) {
    ltb *tb = check_tb(L, 1);
    lua_pushstring(L, tb->path ? tb->path : "");
    return 1;
}

/* close(): raises when the file cannot be synced or closed; __gc closes silently. */
static int tb_close(lua_State *L) {
    ltb *tb = check_tb(L, 1);
    mt_error err = {0};
    mt_status st = MT_OK;
    if (tb->w) st = mt_tfevents_close(tb->w, &err);
    tb->w = NULL;
    if (st) return luaL_error(L, "tensorboard: %s", err.msg);
    return 0;
}

static int tb_gc(lua_State *L) {
    ltb *tb = check_tb(L, 1);
    if (tb->w) mt_tfevents_close(tb->w, NULL);
    tb->w = NULL;
    free(tb->path);
    tb->path = NULL;
    return 0;
}

static int tb_tostring(lua_State *L) {
    ltb *tb = check_tb(L, 1);
    lua_pushfstring(L, "TensorBoard(%s%s)", tb->path ? tb->path : "?", tb->w ? "" : ", closed");
    return 1;
}

/* ---- reading -------------------------------------------------------------------------- */

typedef struct read_guard {
    const unsigned char *map;
    size_t len;
    mt_tfevents_event ev;
} read_guard;

static void guard_release(read_guard *g) {
    if (g->map) mt_unmap_file(g->map, g->len);
    g->map = NULL;
    g->len = 0;
    mt_tfevents_event_free(&g->ev);
}

static int guard_gc(lua_State *L) {
    guard_release(luaL_checkudata(L, 1, TB_READ_GUARD_MT));
    return 0;
}

static const char *status_name(int s) {
    switch (s) {
    case MT_TFEVENTS_START: return "start";
    case MT_TFEVENTS_STOP: return "stop";
    case MT_TFEVENTS_CHECKPOINT: return "checkpoint";
    default: return "unspecified";
    }
}

static void push_event(lua_State *L, const mt_tfevents_event *ev, const char *file, size_t offset) {
    lua_createtable(L, 0, 8);
    bind_set_str(L, "file", file);
    bind_set_int(L, "offset", (lua_Integer)offset);
    bind_set_num(L, "wall_time", ev->wall_time);
    bind_set_int(L, "step", (lua_Integer)ev->step);
    switch (ev->kind) {
    case MT_TFEVENTS_VERSION:
        bind_set_str(L, "kind", "file_version");
        bind_set_str(L, "file_version", ev->file_version);
        break;
    case MT_TFEVENTS_SESSION_LOG:
        bind_set_str(L, "kind", "session_log");
        bind_set_str(L, "session_status", status_name(ev->session_status));
        break;
    case MT_TFEVENTS_SUMMARY:
        bind_set_str(L, "kind", "summary");
        break;
    default: bind_set_str(L, "kind", "other"); break;
    }
    lua_createtable(L, ev->n_values > 1024 ? 1024 : (int)ev->n_values, 0);
    for (size_t i = 0; i < ev->n_values; i++) {
        lua_createtable(L, 0, 2);
        bind_set_str(L, "tag", ev->values[i].tag);
        if (ev->values[i].has_simple_value) bind_set_num(L, "value", (double)ev->values[i].simple_value);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    lua_setfield(L, -2, "values");
}

/* Appends the events of one file to the list at `list`; returns 1 when the file ends
 * inside a record (a message is pushed then), else 0. */
static int read_file_events(lua_State *L, const char *path, int list) {
    read_guard *g = lua_newuserdatauv(L, sizeof *g, 0);
    memset(g, 0, sizeof *g);
    luaL_setmetatable(L, TB_READ_GUARD_MT);
    int guard = lua_gettop(L);
    mt_error err = {0};
    if (mt_map_file(path, "TensorBoard events", &g->map, &g->len, &err))
        return luaL_error(L, "tensorboard_read: %s", err.msg);
    size_t pos = 0;
    for (;;) {
        const uint8_t *data;
        size_t len, at = pos;
        int torn = 0;
        if (mt_tfevents_next_record(g->map, g->len, &pos, path, &data, &len, &torn, &err))
            return luaL_error(L, "tensorboard_read: %s", err.msg);
        if (torn) {
            lua_pushfstring(L, "%s ends inside a record at byte %I (of %I): a writer stopped mid-record",
                            path, (lua_Integer)at, (lua_Integer)g->len);
            lua_remove(L, guard);
            guard_release(g);
            return 1;
        }
        if (!data) break;
        lua_pushfstring(L, "%s: record at byte %I", path, (lua_Integer)at);
        if (mt_tfevents_decode(data, len, lua_tostring(L, -1), &g->ev, &err))
            return luaL_error(L, "tensorboard_read: %s", err.msg);
        lua_pop(L, 1);
        push_event(L, &g->ev, path, at);
        mt_tfevents_event_free(&g->ev);
        lua_rawseti(L, list, (lua_Integer)lua_rawlen(L, list) + 1);
    }
    guard_release(g);
    lua_settop(L, guard - 1);
    return 0;
}

typedef struct list_guard {
    char **paths;
    size_t n;
} list_guard;

#define TB_LIST_GUARD_MT "moontune.TensorBoardListGuard"

static int list_gc(lua_State *L) {
    list_guard *g = luaL_checkudata(L, 1, TB_LIST_GUARD_MT);
    for (size_t i = 0; i < g->n; i++) free(g->paths[i]);
    free(g->paths);
    g->paths = NULL;
    g->n = 0;
    return 0;
}

/* mt.tensorboard_read(path) -> events [, torn] */
static int l_tensorboard_read(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    mt_sandbox_check_path(L, path, 0, "tensorboard_read");
    struct stat st;
    if (stat(path, &st) != 0) return luaL_error(L, "tensorboard_read: cannot read %s: %s", path, strerror(errno));
    lua_settop(L, 1);
    lua_newtable(L); /* 2: the events */
    if (!S_ISDIR(st.st_mode)) return 1 + read_file_events(L, path, 2);
    lua_newtable(L); /* 3: the torn files' messages */
    list_guard *g = lua_newuserdatauv(L, sizeof *g, 0);
    memset(g, 0, sizeof *g);
    luaL_setmetatable(L, TB_LIST_GUARD_MT);
    mt_error err = {0};
    if (mt_tfevents_list(path, &g->paths, &g->n, &err)) return luaL_error(L, "tensorboard_read: %s", err.msg);
    lua_Integer n_torn = 0;
    for (size_t i = 0; i < g->n; i++) {
        /* each file too: a symlink in the directory must not lead the reader elsewhere */
        mt_sandbox_check_path(L, g->paths[i], 0, "tensorboard_read");
        if (read_file_events(L, g->paths[i], 2)) lua_rawseti(L, 3, ++n_torn);
    }
    lua_settop(L, 3);
    if (n_torn == 0) {
        lua_pop(L, 1);
        return 1;
    }
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (lua_Integer i = 1; i <= n_torn; i++) {
        if (i > 1) luaL_addstring(&b, "; ");
        lua_rawgeti(L, 3, i);
        luaL_addvalue(&b);
    }
    luaL_pushresult(&b);
    lua_remove(L, 3);
    return 2;
}

static const luaL_Reg tb_methods[] = {
    {"scalars", tb_scalars},
    {"path", tb_path},
    {"close", tb_close},
    {NULL, NULL},
};

static const luaL_Reg tb_functions[] = {
    {"tensorboard_open", l_tensorboard_open},
    {"tensorboard_read", l_tensorboard_read},
    {NULL, NULL},
};

void mt_bind_tensorboard_open(lua_State *L) {
    bind_new_class(L, TENSORBOARD_MT, tb_methods, tb_gc, tb_tostring);
    static const luaL_Reg none[] = {{NULL, NULL}};
    bind_new_class(L, TB_READ_GUARD_MT, none, guard_gc, NULL);
    bind_new_class(L, TB_LIST_GUARD_MT, none, list_gc, NULL);
    luaL_setfuncs(L, tb_functions, 0);
}
