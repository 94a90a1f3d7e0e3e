/* bindings.c — moontune.core: the C core's objects and mechanism calls for Lua
 * recipes (docs/lua_api.md).
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
#define _DEFAULT_SOURCE /* realpath */
#include "lua/bindings.h"
#include "lua/run_dir.h"
#include "base/numparse.h"

#include <errno.h>
#include <lauxlib.h>
#include <limits.h>
#include <stdio.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "store/checkpoint.h"
#include "lua/recipe_overrides.h"
#include "text/dataset.h"
#include "model/evaluate.h"
#include "store/export_gguf.h"
#include "store/export_hf.h"
#include "model/generate.h"
#include "base/internal.h"
#include "lua/lua_state.h"
#include "model/model.h"
#include "store/peft.h"
#include "plugin/registry.h"
#include "lua/chat_render.h"
#include "lua/sandbox.h"
#include "formats/sha256.h"
#include "text/tokenizer.h"
#include "model/train.h"

#define MODEL_MT "moontune.Model"
#define TOKENIZER_MT "moontune.Tokenizer"
#define PLUGIN_MT "moontune.Plugin"
#define EXAMPLES_MT "moontune.Examples"
#define BATCHER_MT "moontune.Batcher"
#define BATCH_MT "moontune.Batch"
#define RECORDS_MT "moontune.Records"
#define SENTINEL_MT "moontune.Registries"
#define SENTINEL_KEY "moontune.registries"

/* Raises the core's error as a Lua error (never returns). */
static int lraise(lua_State *L, const mt_error *err) {
    return luaL_error(L, "%s", err->msg[0] ? err->msg : "moontune: unknown error");
}

/* ---- option tables ------------------------------------------------------- */

/* Pushes opts[key] (nil when opts is absent). */
static int opt_field(lua_State *L, int opts, const char *key) {
    if (lua_isnoneornil(L, opts)) {
        lua_pushnil(L);
        return LUA_TNIL;
    }
    return lua_getfield(L, opts, key);
}

static lua_Integer opt_int(lua_State *L, int opts, const char *key, lua_Integer def) {
    int t = opt_field(L, opts, key);
    lua_Integer v = def;
    if (t != LUA_TNIL) {
        int ok;
        v = lua_tointegerx(L, -1, &ok);
        if (!ok) luaL_error(L, "option '%s': expected an integer, found %s", key, luaL_typename(L, -1));
    }
    lua_pop(L, 1);
    return v;
}

static double opt_num(lua_State *L, int opts, const char *key, double def) {
    int t = opt_field(L, opts, key);
    double v = def;
    if (t != LUA_TNIL) {
        if (t != LUA_TNUMBER) luaL_error(L, "option '%s': expected a number, found %s", key, luaL_typename(L, -1));
        v = lua_tonumber(L, -1);
    }
    lua_pop(L, 1);
    return v;
}

/* opt_int / opt_num within a shared limit (core/base/numparse.c): the Lua API accepts the
 * values the commands accept, and nothing is cut to 32 bits on the way. */
static lua_Integer opt_int_in(lua_State *L, int opts, const char *key, lua_Integer def,
                              const mt_int_limit *lim) {
    if (opt_field(L, opts, key) == LUA_TNIL) {
        lua_pop(L, 1);
        return def; /* the caller's default: not the user's value */
    }
    lua_pop(L, 1);
    lua_Integer v = opt_int(L, opts, key, def);
    mt_error err = {0};
    char name[80];
    snprintf(name, sizeof name, "option '%s'", key);
    if (mt_check_int(name, (int64_t)v, lim, &err)) luaL_error(L, "%s", err.msg);
    return v;
}

static double opt_num_in(lua_State *L, int opts, const char *key, double def,
                         const mt_real_limit *lim) {
    if (opt_field(L, opts, key) == LUA_TNIL) {
        lua_pop(L, 1);
        return def;
    }
    lua_pop(L, 1);
    double v = opt_num(L, opts, key, def);
    mt_error err = {0};
    char name[80];
    snprintf(name, sizeof name, "option '%s'", key);
    if (mt_check_real(name, v, lim, &err)) luaL_error(L, "%s", err.msg);
    return v;
}

/* opt_num_in for a value kept as a float (sampling): also refused when the rounding to
 * float leaves the limit (top_p = 1e-50 would become 0), as the command refuses it. */
static float opt_float_in(lua_State *L, int opts, const char *key, float def, const mt_real_limit *lim) {
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
static uint64_t seed_at(lua_State *L, int idx, const char *name) {
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
static lua_Integer arg_int_in(lua_State *L, int idx, const char *name, const mt_int_limit *lim) {
    lua_Integer v = luaL_checkinteger(L, idx);
    mt_error err = {0};
    if (mt_check_int(name, (int64_t)v, lim, &err)) luaL_error(L, "%s", err.msg);
    return v;
}

static uint64_t opt_seed(lua_State *L, int opts, const char *key, uint64_t def) {
    uint64_t seed = def;
    if (opt_field(L, opts, key) != LUA_TNIL) {
        char name[80];
        snprintf(name, sizeof name, "option '%s'", key);
        seed = seed_at(L, lua_gettop(L), name);
    }
    lua_pop(L, 1);
    return seed;
}

static int opt_bool(lua_State *L, int opts, const char *key, int def) {
    int t = opt_field(L, opts, key);
    int v = def;
    if (t != LUA_TNIL) {
        if (t != LUA_TBOOLEAN) luaL_error(L, "option '%s': expected a boolean, found %s", key, luaL_typename(L, -1));
        v = lua_toboolean(L, -1);
    }
    lua_pop(L, 1);
    return v;
}

/* The string stays valid while opts is on the stack (the table holds it). */
static const char *opt_str(lua_State *L, int opts, const char *key, const char *def) {
    int t = opt_field(L, opts, key);
    const char *v = def;
    if (t != LUA_TNIL) {
        if (t != LUA_TSTRING) luaL_error(L, "option '%s': expected a string, found %s", key, luaL_typename(L, -1));
        v = lua_tostring(L, -1);
    }
    lua_pop(L, 1);
    return v;
}

static void check_opts(lua_State *L, int idx) {
    if (!lua_isnoneornil(L, idx)) luaL_checktype(L, idx, LUA_TTABLE);
}

/* Scratch memory that Lua frees (so a raised error leaks nothing); left on the stack. */
static void *scratch(lua_State *L, size_t bytes) {
    void *p = lua_newuserdatauv(L, bytes ? bytes : 1, 0);
    memset(p, 0, bytes ? bytes : 1);
    return p;
}

static void set_int(lua_State *L, const char *k, lua_Integer v) {
    lua_pushinteger(L, v);
    lua_setfield(L, -2, k);
}
static void set_num(lua_State *L, const char *k, double v) {
    lua_pushnumber(L, v);
    lua_setfield(L, -2, k);
}
static void set_str(lua_State *L, const char *k, const char *v) {
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}
static void set_bool(lua_State *L, const char *k, int v) {
    lua_pushboolean(L, v);
    lua_setfield(L, -2, k);
}

/* ---- the plugin registries (one set per Lua state) ------------------------ */

typedef struct registries {
    mt_registry **regs;
    char **keys; /* the extra directories joined by '\n' ("" for none) */
    int n;
} registries;

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
static registries *push_sentinel(lua_State *L) {
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
static mt_registry *get_registry(lua_State *L, registries *r, const char *const *dirs, int n_dirs) {
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
    if (mt_registry_open(dirs, (size_t)n_dirs, &reg, &err)) lraise(L, &err);
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

/* ---- Plugin ---------------------------------------------------------------- */

typedef struct lplugin {
    mt_plugin_instance *inst; /* NULL once closed (or freed by the model it was attached to) */
    int attached;             /* owned by a Model */
} lplugin;

static lplugin *check_plugin(lua_State *L, int idx) {
    lplugin *p = luaL_checkudata(L, idx, PLUGIN_MT);
    if (!p->inst) luaL_error(L, "the plugin is closed");
    return p;
}

static int plugin_close(lua_State *L) {
    lplugin *p = luaL_checkudata(L, 1, PLUGIN_MT);
    if (p->inst && !p->attached) {
        mt_plugin_instance_free(p->inst);
        p->inst = NULL;
    }
    return 0;
}

static int plugin_describe(lua_State *L) {
    lplugin *p = check_plugin(L, 1);
    lua_createtable(L, 0, 4);
    set_str(L, "kind", mt_plugin_kind_name(p->inst->desc->kind));
    set_str(L, "name", p->inst->desc->name);
    set_str(L, "version", p->inst->desc->version);
    set_str(L, "file", mt_plugin_path(p->inst->plugin));
    return 1;
}

static int plugin_tostring(lua_State *L) {
    lplugin *p = luaL_checkudata(L, 1, PLUGIN_MT);
    if (p->inst)
        lua_pushfstring(L, "moontune.Plugin(%s %s)", mt_plugin_kind_name(p->inst->desc->kind),
                        p->inst->desc->name);
    else
        lua_pushliteral(L, "moontune.Plugin(closed)");
    return 1;
}

/* Converts the options table at idx into mt_kv (strings point into the table, which
 * stays on the stack; arrays go into scratch userdata anchored in a table pushed here). */
static mt_kv *options_to_kv(lua_State *L, int idx, const char *plugin, size_t *n_kv) {
    *n_kv = 0;
    lua_newtable(L); /* anchors */
    int anchors = lua_gettop(L);
    if (lua_isnoneornil(L, idx)) return NULL;
    luaL_checktype(L, idx, LUA_TTABLE);
    size_t n = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        n++;
        lua_pop(L, 1);
    }
    mt_kv *kv = scratch(L, n * sizeof *kv);
    lua_rawseti(L, anchors, (lua_Integer)lua_rawlen(L, anchors) + 1);
    size_t i = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        if (lua_type(L, -2) != LUA_TSTRING)
            luaL_error(L, "plugin '%s': option keys must be strings, found %s", plugin, luaL_typename(L, -2));
        const char *key = lua_tostring(L, -2);
        kv[i].key = key;
        switch (lua_type(L, -1)) {
        case LUA_TBOOLEAN:
            kv[i].type = MT_KV_BOOL;
            kv[i].boolean = lua_toboolean(L, -1);
            break;
        case LUA_TNUMBER:
            kv[i].type = MT_KV_NUMBER;
            kv[i].number = lua_tonumber(L, -1);
            break;
        case LUA_TSTRING:
            kv[i].type = MT_KV_STRING;
            kv[i].string = lua_tostring(L, -1);
            break;
        case LUA_TTABLE: {
            int len = (int)lua_rawlen(L, -1);
            const char **list = scratch(L, (size_t)len * sizeof *list);
            lua_rawseti(L, anchors, (lua_Integer)lua_rawlen(L, anchors) + 1);
            for (int k = 0; k < len; k++) {
                lua_rawgeti(L, -1, k + 1);
                if (lua_type(L, -1) != LUA_TSTRING)
                    luaL_error(L, "plugin '%s': option '%s': item %d: expected a string, found %s", plugin,
                               key, k + 1, luaL_typename(L, -1));
                list[k] = lua_tostring(L, -1); /* held by the options table */
                lua_pop(L, 1);
            }
            kv[i].type = MT_KV_LIST;
            kv[i].list = list;
            kv[i].list_len = len;
            break;
        }
        default:
            luaL_error(L, "plugin '%s': option '%s': expected a boolean, number, string or list of strings, "
                       "found %s", plugin, key, luaL_typename(L, -1));
        }
        i++;
        lua_pop(L, 1);
    }
    *n_kv = i;
    return kv;
}

/* A new Plugin userdata on the stack, with no instance yet; it keeps the registries'
 * sentinel (at index sentinel) alive as its uservalue. */
static lplugin *new_plugin(lua_State *L, int sentinel) {
    lplugin *p = lua_newuserdatauv(L, sizeof *p, 1);
    p->inst = NULL;
    p->attached = 0;
    luaL_setmetatable(L, PLUGIN_MT);
    lua_pushvalue(L, sentinel);
    lua_setiuservalue(L, -2, 1);
    return p;
}

/* mt.plugin(kind, name, options, {paths={dir,...}}) */
static int l_plugin(lua_State *L) {
    const char *kind_name = luaL_checkstring(L, 1);
    const char *name = luaL_checkstring(L, 2);
    check_opts(L, 4);
    mt_plugin_kind kind = mt_plugin_kind_parse(kind_name);
    if (!kind)
        return luaL_error(L, "unknown plugin kind '%s' (expected optimizer, loss, adapter or scheduler)",
                          kind_name);
    /* extra directories */
    const char **dirs = NULL;
    int n_dirs = 0;
    if (opt_field(L, 4, "paths") != LUA_TNIL) {
        if (mt_sandbox_active(L)) /* a plugin is native code: loading one is not sandboxable */
            return luaL_error(L, "sandbox: a recipe cannot name plugin directories (plugins are "
                                 "native code); put them on MOONTUNE_PLUGIN_PATH or run with "
                                 "--unsafe to trust this recipe");
        if (lua_type(L, -1) == LUA_TSTRING) {
            dirs = scratch(L, sizeof *dirs);
            dirs[0] = lua_tostring(L, -2);
            n_dirs = 1;
        } else {
            luaL_checktype(L, -1, LUA_TTABLE);
            int t = lua_gettop(L);
            n_dirs = (int)lua_rawlen(L, t);
            dirs = scratch(L, (size_t)n_dirs * sizeof *dirs);
            for (int i = 0; i < n_dirs; i++) {
                lua_rawgeti(L, t, i + 1);
                if (lua_type(L, -1) != LUA_TSTRING)
                    return luaL_error(L, "option 'paths': item %d: expected a string, found %s", i + 1,
                                      luaL_typename(L, -1));
                dirs[i] = lua_tostring(L, -1); /* held by the paths table */
                lua_pop(L, 1);
            }
        }
    }
    registries *r = push_sentinel(L);
    int sentinel = lua_gettop(L);
    mt_registry *reg = get_registry(L, r, dirs, n_dirs);
    mt_error err = {0};
    const mt_plugin *pl = mt_registry_find(reg, kind, name, &err);
    if (!pl) return lraise(L, &err);
    size_t n_kv;
    mt_kv *kv = options_to_kv(L, 3, name, &n_kv);
    lplugin *p = new_plugin(L, sentinel);
    if (mt_plugin_instantiate(pl, kv, n_kv, &p->inst, &err)) return lraise(L, &err);
    return 1;
}

/* ---- Model ------------------------------------------------------------------ */

typedef struct lmodel {
    mt_model *m;
    mt_backend be;
    int have_be;
    lplugin **adapters; /* attached adapter Plugins (kept alive by the uservalue table) */
    int n_adapters;
} lmodel;

static lmodel *check_model(lua_State *L, int idx) {
    lmodel *u = luaL_checkudata(L, idx, MODEL_MT);
    if (!u->m) luaL_error(L, "the model is closed");
    return u;
}

static int model_close(lua_State *L) {
    lmodel *u = luaL_checkudata(L, 1, MODEL_MT);
    if (u->m) mt_model_free(u->m);
    u->m = NULL;
    /* adapters after the model that calls into them, the backend last */
    for (int i = 0; i < u->n_adapters; i++) {
        mt_plugin_instance_free(u->adapters[i]->inst);
        u->adapters[i]->inst = NULL;
    }
    free(u->adapters);
    u->adapters = NULL;
    u->n_adapters = 0;
    if (u->have_be) mt_backend_cpu_shutdown(&u->be);
    u->have_be = 0;
    return 0;
}

/* mt.model(path, {threads=}) */
static int l_model(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    check_opts(L, 2);
    int threads = (int)opt_int_in(L, 2, "threads", 0, &MT_LIMIT_THREADS);
    lmodel *u = lua_newuserdatauv(L, sizeof *u, 1);
    memset(u, 0, sizeof *u);
    luaL_setmetatable(L, MODEL_MT);
    lua_newtable(L);
    lua_pushstring(L, path);
    lua_setfield(L, -2, "path"); /* the base model's name in exported adapters */
    lua_setiuservalue(L, -2, 1);
    mt_error err = {0};
    if (mt_backend_cpu_init(&u->be, threads, &err)) return lraise(L, &err);
    u->have_be = 1;
    if (mt_model_load(path, &u->be, &u->m, &err)) return lraise(L, &err);
    return 1;
}

static int model_info(lua_State *L) {
    lmodel *u = check_model(L, 1);
    const mt_model_config *c = &u->m->cfg;
    lua_createtable(L, 0, 8);
    set_str(L, "model_type", c->model_type);
    set_int(L, "params", (lua_Integer)u->m->total_numel);
    set_int(L, "layers", c->num_layers);
    set_int(L, "hidden", c->hidden_size);
    set_int(L, "vocab", c->vocab_size);
    set_int(L, "heads", c->num_heads);
    set_int(L, "kv_heads", c->num_kv_heads);
    set_int(L, "max_positions", c->max_position_embeddings);
    /* memory, for `moontune validate`'s estimate: parameters, gradients of what trains,
     * and the activations planned for (B,T) */
    size_t grads = 0;
    for (size_t i = 0; i < u->m->num_params; i++)
        if (u->m->params[i].grad) grads += u->m->params[i].numel * sizeof(float);
    for (size_t i = 0; i < u->m->num_extra; i++)
        grads += (size_t)mt_tensor_numel(&u->m->extra_params[i].grad) * 2 * sizeof(float);
    set_int(L, "param_bytes", (lua_Integer)(u->m->total_numel * sizeof(float)));
    set_int(L, "trainable_bytes", (lua_Integer)grads);
    set_int(L, "activation_bytes", (lua_Integer)mt_model_plan_bytes(u->m));
    return 1;
}

/* The model (at index 1) takes an attached adapter Plugin p (at index idx): it frees
 * the instance after itself and keeps the userdata in its uservalue table. The caller
 * has made room in u->adapters. */
static void own_adapter(lua_State *L, lmodel *u, lplugin *p, int idx) {
    u->adapters[u->n_adapters++] = p;
    p->attached = 1;
    lua_getiuservalue(L, 1, 1);
    lua_pushvalue(L, idx);
    lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
    lua_pop(L, 1);
}

static int model_attach(lua_State *L) {
    lmodel *u = check_model(L, 1);
    lplugin *p = check_plugin(L, 2);
    if (p->inst->desc->kind != MT_PLUGIN_ADAPTER)
        return luaL_error(L, "model:attach: '%s' is a %s plugin, not an adapter", p->inst->desc->name,
                          mt_plugin_kind_name(p->inst->desc->kind));
    if (p->attached)
        return luaL_error(L, "model:attach: the adapter '%s' is already attached to a model",
                          p->inst->desc->name);
    lplugin **na = realloc(u->adapters, (size_t)(u->n_adapters + 1) * sizeof *na);
    if (!na) return luaL_error(L, "out of memory");
    u->adapters = na;
    mt_error err = {0};
    if (mt_model_attach_adapter(u->m, p->inst->desc->vtable, p->inst->state, &err)) return lraise(L, &err);
    own_adapter(L, u, p, 2);
    return 0;
}

/* model:attach_peft(dir) -> the attached "lora" Plugin: a PEFT adapter directory
 * (adapter_config.json + adapter_model.safetensors) loaded onto the model
 * (core/store/peft.h). The model owns the instance as with attach. On a refusal nothing is
 * attached; only a failure after the attach (see mt_peft_attach) leaves the adapter on
 * the model, owned by it, before the error is raised. */
static int model_attach_peft(lua_State *L) {
    lmodel *u = check_model(L, 1);
    const char *dir = luaL_checkstring(L, 2);
    lplugin **na = realloc(u->adapters, (size_t)(u->n_adapters + 1) * sizeof *na);
    if (!na) return luaL_error(L, "out of memory");
    u->adapters = na;
    registries *r = push_sentinel(L);
    int sentinel = lua_gettop(L);
    mt_registry *reg = get_registry(L, r, NULL, 0);
    lplugin *p = new_plugin(L, sentinel);
    int plugin = lua_gettop(L);
    mt_error err = {0};
    mt_status st = mt_peft_attach(u->m, reg, dir, &p->inst, &err);
    if (p->inst) own_adapter(L, u, p, plugin); /* attached, even when the weights failed */
    if (st) return lraise(L, &err);
    lua_pushvalue(L, plugin);
    return 1;
}

/* model:plan(B, T [, chunk]) */
static int model_plan(lua_State *L) {
    lmodel *u = check_model(L, 1);
    static const mt_int_limit chunk_rows = {"chunk", 0, INT32_MAX}; /* 0: the default */
    int B = (int)arg_int_in(L, 2, "plan: batch", &MT_LIMIT_BATCH);
    int T = (int)arg_int_in(L, 3, "plan: sequence length", &MT_LIMIT_SEQ_LEN);
    int chunk = lua_isnoneornil(L, 4) ? 0 : (int)arg_int_in(L, 4, "plan: chunk", &chunk_rows);
    mt_error err = {0};
    if (mt_model_plan(u->m, B, T, chunk, &err)) return lraise(L, &err);
    return 0;
}

static int model_trainable(lua_State *L) {
    lmodel *u = check_model(L, 1);
    mt_param_view *views = NULL;
    size_t n = 0;
    mt_error err = {0};
    if (mt_model_trainable_params(u->m, &views, &n, &err)) return lraise(L, &err);
    lua_createtable(L, (int)n, 0);
    for (size_t i = 0; i < n; i++) {
        lua_createtable(L, 0, 2);
        set_str(L, "name", views[i].name);
        set_int(L, "numel", (lua_Integer)mt_tensor_numel(&views[i].value));
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    free(views);
    return 1;
}

static int model_set_training(lua_State *L) {
    lmodel *u = check_model(L, 1);
    luaL_checktype(L, 2, LUA_TBOOLEAN);
    mt_model_set_training(u->m, lua_toboolean(L, 2));
    return 0;
}

/* ---- Tokenizer ---------------------------------------------------------------- */

typedef struct ltok {
    mt_tokenizer *tok;
} ltok;

static ltok *check_tok(lua_State *L, int idx) {
    ltok *t = luaL_checkudata(L, idx, TOKENIZER_MT);
    if (!t->tok) luaL_error(L, "the tokenizer is closed");
    return t;
}

static int tok_close(lua_State *L) {
    ltok *t = luaL_checkudata(L, 1, TOKENIZER_MT);
    mt_tokenizer_free(t->tok);
    t->tok = NULL;
    return 0;
}

static int l_tokenizer(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    ltok *t = lua_newuserdatauv(L, sizeof *t, 0);
    t->tok = NULL;
    luaL_setmetatable(L, TOKENIZER_MT);
    mt_error err = {0};
    if (mt_tokenizer_load(path, &t->tok, &err)) return lraise(L, &err);
    return 1;
}

/* tok:encode(text [, add_special = true]) */
static int tok_encode(lua_State *L) {
    ltok *t = check_tok(L, 1);
    size_t len;
    const char *text = luaL_checklstring(L, 2, &len);
    int add_special = lua_isnoneornil(L, 3) ? 1 : lua_toboolean(L, 3);
    mt_token_list list = {0};
    mt_error err = {0};
    if (mt_tokenizer_encode(t->tok, text, len, add_special, &list, &err)) {
        mt_token_list_free(&list);
        return lraise(L, &err);
    }
    if (!lua_checkstack(L, 4)) {
        mt_token_list_free(&list);
        return luaL_error(L, "out of Lua stack");
    }
    lua_createtable(L, (int)list.n, 0);
    for (size_t i = 0; i < list.n; i++) {
        lua_pushinteger(L, list.ids[i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    mt_token_list_free(&list);
    return 1;
}

/* Reads an array of ids at idx into scratch memory (left on the stack). */
static int32_t *read_ids(lua_State *L, int idx, size_t *n, const char *what) {
    luaL_checktype(L, idx, LUA_TTABLE);
    *n = (size_t)lua_rawlen(L, idx);
    int32_t *ids = scratch(L, *n * sizeof *ids);
    for (size_t i = 0; i < *n; i++) {
        lua_rawgeti(L, idx, (lua_Integer)i + 1);
        int ok;
        lua_Integer v = lua_tointegerx(L, -1, &ok);
        if (!ok || v < INT32_MIN || v > INT32_MAX)
            luaL_error(L, "%s: item %d: expected an integer id, found %s", what, (int)i + 1,
                       luaL_typename(L, -1));
        ids[i] = (int32_t)v;
        lua_pop(L, 1);
    }
    return ids;
}

/* tok:decode(ids [, skip_special = false]) */
static int tok_decode(lua_State *L) {
    ltok *t = check_tok(L, 1);
    /* read before read_ids, whose scratch buffer is pushed where an absent flag was */
    int skip = lua_toboolean(L, 3);
    size_t n;
    int32_t *ids = read_ids(L, 2, &n, "decode");
    char *text = NULL;
    size_t len = 0;
    mt_error err = {0};
    if (mt_tokenizer_decode(t->tok, ids, n, skip, &text, &len, &err)) return lraise(L, &err);
    lua_pushlstring(L, text, len);
    free(text);
    return 1;
}

static int tok_chat_template(lua_State *L) {
    const char *s = mt_tokenizer_chat_template(check_tok(L, 1)->tok);
    if (s) lua_pushstring(L, s);
    else lua_pushnil(L);
    return 1;
}

static int push_id(lua_State *L, int32_t id) {
    if (id >= 0) lua_pushinteger(L, id);
    else lua_pushnil(L);
    return 1;
}
static int tok_bos(lua_State *L) { return push_id(L, mt_tokenizer_bos(check_tok(L, 1)->tok)); }
static int tok_eos(lua_State *L) { return push_id(L, mt_tokenizer_eos(check_tok(L, 1)->tok)); }
static int tok_vocab_size(lua_State *L) {
    lua_pushinteger(L, mt_tokenizer_vocab_size(check_tok(L, 1)->tok));
    return 1;
}

/* ---- exports -------------------------------------------------------------------- */

/* The one attached adapter, or NULL when none; several are refused (which to export?). */
static const mt_plugin_instance *export_adapter(lua_State *L, lmodel *u, const char *what) {
    if (u->n_adapters > 1)
        luaL_error(L, "%s: the model has %d adapters attached; export works with one", what,
                   u->n_adapters);
    return u->n_adapters ? u->adapters[0]->inst : NULL;
}

/* The option 'tokenizer' of the table at opts: a Tokenizer or nil. */
static const mt_tokenizer *opt_tokenizer(lua_State *L, int opts) {
    const mt_tokenizer *tok = NULL;
    if (opt_field(L, opts, "tokenizer") != LUA_TNIL) tok = check_tok(L, lua_gettop(L))->tok;
    lua_pop(L, 1);
    return tok;
}

/* model:export_peft(dir, {base_model=}) -> dir: the attached LoRA adapter as a PEFT
 * adapter directory; base_model defaults to the path the model was loaded from. */
static int model_export_peft(lua_State *L) {
    lmodel *u = check_model(L, 1);
    const char *dir = luaL_checkstring(L, 2);
    check_opts(L, 3);
    mt_sandbox_check_path(L, dir, 1, "export_peft");
    const mt_plugin_instance *adapter = export_adapter(L, u, "export_peft");
    if (!adapter) return luaL_error(L, "export_peft: the model has no adapter attached");
    lua_getiuservalue(L, 1, 1);
    lua_getfield(L, -1, "path");
    const char *base = opt_str(L, 3, "base_model", lua_tostring(L, -1));
    mt_error err = {0};
    if (mt_export_peft(u->m, adapter, base, dir, &err)) return lraise(L, &err);
    lua_pushvalue(L, 2);
    return 1;
}

/* model:export_merged(dir, {tokenizer=}) -> dir: a transformers model directory with the
 * attached adapter (if any) merged in; the model in memory is unchanged. */
static int model_export_merged(lua_State *L) {
    lmodel *u = check_model(L, 1);
    const char *dir = luaL_checkstring(L, 2);
    check_opts(L, 3);
    mt_sandbox_check_path(L, dir, 1, "export_merged");
    const mt_tokenizer *tok = opt_tokenizer(L, 3);
    const mt_plugin_instance *adapter = export_adapter(L, u, "export_merged");
    mt_error err = {0};
    if (mt_export_merged_hf(u->m, adapter, tok, dir, &err)) return lraise(L, &err);
    lua_pushvalue(L, 2);
    return 1;
}

typedef struct gguf_job {
    const mt_model *m;
    const mt_tokenizer *tok;
    const char *path, *name;
    mt_dtype dtype;
} gguf_job;

static mt_status write_gguf_job(void *ctx, mt_error *err) {
    const gguf_job *job = ctx;
    return mt_export_gguf(job->m, job->tok, job->path, job->dtype, job->name, err);
}

/* model:export_gguf(path, {tokenizer=, dtype="f16"|"f32", name=}) -> path: one GGUF file
 * with the attached adapter (if any) merged in, and the tokenizer and chat template. */
static int model_export_gguf(lua_State *L) {
    lmodel *u = check_model(L, 1);
    const char *path = luaL_checkstring(L, 2);
    check_opts(L, 3);
    mt_sandbox_check_path(L, path, 1, "export_gguf");
    gguf_job job = {.m = u->m, .path = path};
    job.tok = opt_tokenizer(L, 3);
    const char *dtype = opt_str(L, 3, "dtype", "f16");
    if (!strcmp(dtype, "f16")) job.dtype = MT_F16;
    else if (!strcmp(dtype, "f32")) job.dtype = MT_F32;
    else return luaL_error(L, "export_gguf: option 'dtype': expected \"f16\" or \"f32\", found \"%s\"", dtype);
    job.name = opt_str(L, 3, "name", NULL);
    const mt_plugin_instance *adapter = export_adapter(L, u, "export_gguf");
    mt_error err = {0};
    if (mt_with_merged_adapter(adapter, write_gguf_job, &job, &err)) return lraise(L, &err);
    lua_pushvalue(L, 2);
    return 1;
}

/* ---- Examples ------------------------------------------------------------------ */

typedef struct lexamples {
    int open;
    mt_example_set set;
    mt_record_set records;
    int has_records; /* records were read (stats count them) */
    int users;       /* open Batchers pointing at the set */
} lexamples;

static lexamples *check_examples(lua_State *L, int idx) {
    lexamples *e = luaL_checkudata(L, idx, EXAMPLES_MT);
    if (!e->open) luaL_error(L, "the examples are closed");
    return e;
}

static void examples_free(lexamples *e) {
    if (!e->open) return;
    mt_example_set_free(&e->set);
    mt_record_set_free(&e->records);
    e->open = 0;
}

static int examples_gc(lua_State *L) {
    examples_free(luaL_checkudata(L, 1, EXAMPLES_MT));
    return 0;
}

static int examples_close(lua_State *L) {
    lexamples *e = luaL_checkudata(L, 1, EXAMPLES_MT);
    if (e->open && e->users > 0)
        return luaL_error(L, "the examples are in use by %d open batcher(s); close those first", e->users);
    examples_free(e);
    return 0;
}

/* A new, initialised Examples userdata on the stack. */
static lexamples *new_examples(lua_State *L, const mt_example_options *opt) {
    lexamples *e = lua_newuserdatauv(L, sizeof *e, 0);
    memset(e, 0, sizeof *e);
    luaL_setmetatable(L, EXAMPLES_MT);
    mt_error err = {0};
    if (mt_example_set_init(&e->set, opt, &err)) lraise(L, &err);
    mt_record_set_init(&e->records);
    e->open = 1;
    return e;
}

static void read_example_options(lua_State *L, int opts, mt_example_options *ex) {
    memset(ex, 0, sizeof *ex);
    ex->seq_len = (int)opt_int_in(L, opts, "seq_len", 512, &MT_LIMIT_SEQ_LEN);
    const char *tr = opt_str(L, opts, "truncation", "left");
    if (!strcmp(tr, "left")) ex->truncation = MT_TRUNCATE_LEFT;
    else if (!strcmp(tr, "drop")) ex->truncation = MT_TRUNCATE_DROP;
    else luaL_error(L, "option 'truncation': expected \"left\" or \"drop\", found \"%s\"", tr);
    ex->train_on_inputs = opt_bool(L, opts, "train_on_inputs", 0);
}

/* The files argument at idx: a path or a list of paths (held by the Lua values). */
static const char **read_files_arg(lua_State *L, int idx, int *n_paths) {
    const char **paths;
    if (lua_type(L, idx) == LUA_TSTRING) {
        paths = scratch(L, sizeof *paths);
        paths[0] = lua_tostring(L, idx);
        *n_paths = 1;
        return paths;
    }
    luaL_checktype(L, idx, LUA_TTABLE);
    int n = (int)lua_rawlen(L, idx);
    paths = scratch(L, (size_t)n * sizeof *paths);
    for (int i = 0; i < n; i++) {
        if (lua_rawgeti(L, idx, i + 1) != LUA_TSTRING)
            luaL_error(L, "files: item %d: expected a path, found %s", i + 1, luaL_typename(L, -1));
        paths[i] = lua_tostring(L, -1); /* held by the files table */
        lua_pop(L, 1);
    }
    *n_paths = n;
    return paths;
}

/* The JSONL reading options {format=, fields=, on_bad_record=} of the table at opts;
 * the field names stay referenced from the stack. */
static void read_jsonl_options(lua_State *L, int opts, mt_jsonl_options *jsonl) {
    memset(jsonl, 0, sizeof *jsonl);
    const char *fmt = opt_str(L, opts, "format", "auto");
    int f = mt_data_format_parse(fmt);
    if (f < 0) luaL_error(L, "option 'format': unknown data format \"%s\"", fmt);
    jsonl->format = (mt_data_format)f;
    const char *bad = opt_str(L, opts, "on_bad_record", "error");
    if (!strcmp(bad, "error")) jsonl->on_bad_record = MT_BAD_RECORD_ERROR;
    else if (!strcmp(bad, "skip")) jsonl->on_bad_record = MT_BAD_RECORD_SKIP;
    else luaL_error(L, "option 'on_bad_record': expected \"error\" or \"skip\", found \"%s\"", bad);
    mt_data_fields *fields = scratch(L, sizeof *fields);
    if (opt_field(L, opts, "fields") == LUA_TNIL) return;
    luaL_checktype(L, -1, LUA_TTABLE);
    int ft = lua_gettop(L);
    struct {
        const char *name;
        const char **slot;
    } names[] = {
        {"instruction", &fields->instruction}, {"input", &fields->input},
        {"output", &fields->output},           {"messages", &fields->messages},
        {"role", &fields->role},               {"content", &fields->content},
        {"prompt", &fields->prompt},           {"completion", &fields->completion},
        {"text", &fields->text},               {"chosen", &fields->chosen},
        {"rejected", &fields->rejected},
    };
    lua_pushnil(L);
    while (lua_next(L, ft)) {
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
        size_t j = 0;
        while (k && j < sizeof names / sizeof names[0] && strcmp(names[j].name, k)) j++;
        if (!k || j == sizeof names / sizeof names[0])
            luaL_error(L, "option 'fields': unknown field '%s'", k ? k : "?");
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "option 'fields.%s': expected a string, found %s", k, luaL_typename(L, -1));
        *names[j].slot = lua_tostring(L, -1); /* held by the fields table */
        lua_pop(L, 1);
    }
    jsonl->fields = fields; /* the fields table stays on the stack */
}

/* mt.examples(files, tok, {format=, fields=, on_bad_record=, template=, seq_len=,
 * truncation=, train_on_inputs=}) */
static int l_examples(lua_State *L) {
    lua_settop(L, 3); /* an absent options table stays a nil slot below the scratch values */
    int n_paths;
    const char **paths = read_files_arg(L, 1, &n_paths);
    ltok *t = check_tok(L, 2);
    check_opts(L, 3);
    mt_jsonl_options jsonl;
    read_jsonl_options(L, 3, &jsonl);
    mt_example_options ex;
    read_example_options(L, 3, &ex);
    int32_t pad = mt_tokenizer_pad(t->tok);
    ex.pad_id = pad >= 0 ? pad : 0;
    int tmpl_type = opt_field(L, 3, "template");
    if (tmpl_type != LUA_TNIL && tmpl_type != LUA_TSTRING && tmpl_type != LUA_TFUNCTION)
        return luaL_error(L, "option 'template': expected a name or a function, found %s", luaL_typename(L, -1));
    int tmpl = lua_gettop(L);

    lexamples *e = new_examples(L, &ex);
    int eidx = lua_gettop(L);
    mt_error err = {0};
    for (int i = 0; i < n_paths; i++)
        if (mt_records_load_jsonl(paths[i], &jsonl, &e->records, &err)) return lraise(L, &err);
    e->has_records = 1;
    if (e->records.format == MT_DATA_TEXT) e->set.opt.add_special = 1; /* plain text: BOS/EOS */
    if (tmpl_type == LUA_TFUNCTION) lua_pushvalue(L, tmpl);
    else if (mt_chat_template_push(L, t->tok, tmpl_type == LUA_TSTRING ? lua_tostring(L, tmpl) : "auto",
                                   NULL, &err))
        return lraise(L, &err);
    if (mt_examples_from_records(L, t->tok, &e->records, &e->set, &err)) return lraise(L, &err);
    lua_settop(L, eidx);
    return 1;
}

/* ---- Records -------------------------------------------------------------------- */

/* A record set owned by Lua while mt.records converts it, so an error frees it. */
static int records_gc(lua_State *L) {
    mt_record_set_free(luaL_checkudata(L, 1, RECORDS_MT));
    return 0;
}

static void push_messages(lua_State *L, const mt_message *msgs, int n) {
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        lua_createtable(L, 0, 2);
        set_str(L, "role", msgs[i].role);
        set_str(L, "content", msgs[i].content);
        lua_rawseti(L, -2, i + 1);
    }
}

/* mt.records(files, {format=, fields=, on_bad_record=}) -> list of records, each
 * {format=, file=, line=, messages=, text=, chosen=, rejected=}: the records as the data
 * loader normalises them (alpaca and prompt/completion become messages), so a recipe
 * can read held-out prompts and reference answers without a JSON parser of its own. */
static int l_records(lua_State *L) {
    lua_settop(L, 2); /* an absent options table stays a nil slot below the scratch values */
    int n_paths;
    const char **paths = read_files_arg(L, 1, &n_paths);
    check_opts(L, 2);
    mt_jsonl_options jsonl;
    read_jsonl_options(L, 2, &jsonl);
    mt_record_set *set = lua_newuserdatauv(L, sizeof *set, 0);
    mt_record_set_init(set);
    luaL_setmetatable(L, RECORDS_MT);
    mt_error err = {0};
    for (int i = 0; i < n_paths; i++)
        if (mt_records_load_jsonl(paths[i], &jsonl, set, &err)) return lraise(L, &err);
    if (set->n_bad) mt_record_set_print_bad(set, stderr);
    lua_createtable(L, (int)set->n, 0);
    for (size_t i = 0; i < set->n; i++) {
        const mt_record *r = &set->records[i];
        lua_createtable(L, 0, 6);
        set_str(L, "format", mt_data_format_name(r->format));
        set_str(L, "file", set->files[r->file]);
        set_int(L, "line", (lua_Integer)r->line);
        if (r->text) set_str(L, "text", r->text);
        if (r->n_messages) {
            push_messages(L, r->messages, r->n_messages);
            lua_setfield(L, -2, "messages");
        }
        if (r->n_chosen) {
            push_messages(L, r->chosen, r->n_chosen);
            lua_setfield(L, -2, "chosen");
        }
        if (r->n_rejected) {
            push_messages(L, r->rejected, r->n_rejected);
            lua_setfield(L, -2, "rejected");
        }
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    return 1;
}

/* mt.examples_from_ids({ {ids={...}, trainable={...}}, ... }, {seq_len=, truncation=, pad_id=}) */
static int l_examples_from_ids(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    check_opts(L, 2);
    mt_example_options ex;
    read_example_options(L, 2, &ex);
    ex.pad_id = (int32_t)opt_int(L, 2, "pad_id", 0);
    lexamples *e = new_examples(L, &ex);
    int eidx = lua_gettop(L);
    int n = (int)lua_rawlen(L, 1);
    for (int i = 0; i < n; i++) {
        lua_settop(L, eidx);
        if (lua_rawgeti(L, 1, i + 1) != LUA_TTABLE)
            return luaL_error(L, "example %d: expected a table {ids=, trainable=}", i + 1);
        int item = lua_gettop(L);
        if (lua_getfield(L, item, "ids") != LUA_TTABLE)
            return luaL_error(L, "example %d: field 'ids': expected a list of ids", i + 1);
        size_t len;
        int32_t *ids = read_ids(L, item + 1, &len, "ids");
        uint8_t *tr = scratch(L, len);
        int tt = lua_getfield(L, item, "trainable");
        if (tt == LUA_TNIL) memset(tr, 1, len);
        else if (tt != LUA_TTABLE || lua_rawlen(L, -1) != len)
            return luaL_error(L, "example %d: field 'trainable': expected a list as long as ids", i + 1);
        else
            for (size_t k = 0; k < len; k++) {
                lua_rawgeti(L, -1, (lua_Integer)k + 1);
                tr[k] = lua_isboolean(L, -1) ? (uint8_t)lua_toboolean(L, -1) : lua_tointeger(L, -1) != 0;
                lua_pop(L, 1);
            }
        mt_error err = {0};
        if (mt_example_set_add(&e->set, ids, tr, len, -1, 0, &err)) return lraise(L, &err);
    }
    lua_settop(L, eidx);
    return 1;
}

static int examples_count(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)check_examples(L, 1)->set.n);
    return 1;
}

static int examples_stats(lua_State *L) {
    lexamples *e = check_examples(L, 1);
    mt_dataset_stats st;
    mt_dataset_stats_compute(e->has_records ? &e->records : NULL, &e->set, &st);
    lua_createtable(L, 0, 14);
    set_int(L, "records", st.records);
    set_int(L, "bad_skipped", st.bad_skipped);
    set_int(L, "examples", st.examples);
    set_int(L, "tokens", st.tokens);
    set_num(L, "mean_len", st.mean_len);
    set_int(L, "max_len", st.max_len);
    set_int(L, "trained_tokens", st.trained_tokens);
    set_num(L, "trained_fraction", st.trained_fraction);
    set_int(L, "truncated_prompt", st.truncated_prompt);
    set_int(L, "truncated_response", st.truncated_response);
    set_int(L, "dropped_too_long", st.dropped_too_long);
    set_int(L, "dropped_no_target", st.dropped_no_target);
    set_int(L, "seq_len", st.seq_len);
    return 1;
}

/* examples:split(fraction, seed) -> train, heldout: the examples (already rendered and
 * fitted) are split by mt_split_indices; the train part keeps the truncation counts. */
static int examples_split(lua_State *L) {
    lexamples *e = check_examples(L, 1);
    double fraction = luaL_checknumber(L, 2);
    uint64_t seed = lua_isnoneornil(L, 3) ? 0 : seed_at(L, 3, "split: seed");
    size_t *tr = NULL, *ev = NULL, n_tr = 0, n_ev = 0;
    mt_error err = {0};
    if (mt_split_indices(e->set.n, fraction, (uint64_t)seed, &tr, &n_tr, &ev, &n_ev, &err)) return lraise(L, &err);
    /* the index lists go into scratch memory so that an error below frees them */
    size_t *idx = scratch(L, (n_tr + n_ev) * sizeof *idx);
    if (n_tr) memcpy(idx, tr, n_tr * sizeof *idx);
    if (n_ev) memcpy(idx + n_tr, ev, n_ev * sizeof *idx);
    free(tr);
    free(ev);
    lexamples *a = new_examples(L, &e->set.opt);
    lexamples *b = new_examples(L, &e->set.opt);
    /* both parts name the files their examples came from */
    if (mt_example_set_set_files(&a->set, e->set.files, e->set.n_files, &err) ||
        mt_example_set_set_files(&b->set, e->set.files, e->set.n_files, &err))
        return lraise(L, &err);
    for (size_t i = 0; i < n_tr + n_ev; i++) {
        const mt_example *x = &e->set.ex[idx[i]];
        if (mt_example_set_add(i < n_tr ? &a->set : &b->set, x->ids, x->trainable, (size_t)x->n, x->file,
                               x->line, &err))
            return lraise(L, &err);
    }
    a->set.n_truncated_prompt = e->set.n_truncated_prompt;
    a->set.n_truncated_response = e->set.n_truncated_response;
    a->set.n_dropped_too_long = e->set.n_dropped_too_long;
    a->set.n_dropped_no_target = e->set.n_dropped_no_target;
    return 2;
}

/* ---- Batcher and Batch ----------------------------------------------------------- */

typedef struct lbatcher {
    mt_batcher *b;
    int B, T;
} lbatcher;

typedef struct lbatch {
    int B, T;
    int32_t data[]; /* tokens, positions, segments, targets: each (B,T) */
} lbatch;

static lbatcher *check_batcher(lua_State *L, int idx) {
    lbatcher *b = luaL_checkudata(L, idx, BATCHER_MT);
    if (!b->b) luaL_error(L, "the batcher is closed");
    return b;
}

static int batcher_close(lua_State *L) {
    lbatcher *b = luaL_checkudata(L, 1, BATCHER_MT);
    if (b->b) {
        mt_batcher_free(b->b);
        b->b = NULL;
        lua_getiuservalue(L, 1, 1);
        lexamples *e = luaL_testudata(L, -1, EXAMPLES_MT);
        if (e && e->users > 0) e->users--;
    }
    return 0;
}

/* mt.batcher(examples, {batch=, seq_len=, pack=true, seed=, shuffle=true}) */
static int l_batcher(lua_State *L) {
    lexamples *e = check_examples(L, 1);
    check_opts(L, 2);
    int B = (int)opt_int_in(L, 2, "batch", 1, &MT_LIMIT_BATCH);
    int T = (int)opt_int_in(L, 2, "seq_len", e->set.opt.seq_len, &MT_LIMIT_SEQ_LEN);
    int pack = opt_bool(L, 2, "pack", 1);
    uint64_t seed = opt_seed(L, 2, "seed", 0);
    int shuffle = opt_bool(L, 2, "shuffle", 1);
    lbatcher *b = lua_newuserdatauv(L, sizeof *b, 1);
    b->b = NULL;
    b->B = B;
    b->T = T;
    luaL_setmetatable(L, BATCHER_MT);
    mt_error err = {0};
    if (mt_batcher_create(&e->set, B, T, pack, (uint64_t)seed, shuffle, &b->b, &err)) return lraise(L, &err);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);
    e->users++;
    return 1;
}

static int batcher_next(lua_State *L) {
    lbatcher *b = check_batcher(L, 1);
    size_t bt = (size_t)b->B * (size_t)b->T;
    lbatch *x = lua_newuserdatauv(L, sizeof *x + 4 * bt * sizeof(int32_t), 0);
    x->B = b->B;
    x->T = b->T;
    luaL_setmetatable(L, BATCH_MT);
    mt_batch_info info;
    mt_error err = {0};
    if (mt_batcher_next(b->b, x->data, x->data + bt, x->data + 2 * bt, x->data + 3 * bt, &info, &err))
        return lraise(L, &err);
    lua_createtable(L, 0, 6);
    set_int(L, "examples", info.examples);
    set_int(L, "rows", info.rows);
    set_int(L, "tokens", info.tokens);
    set_int(L, "targets", info.targets);
    set_int(L, "epoch", (lua_Integer)info.epoch);
    set_bool(L, "epoch_end", info.epoch_end);
    return 2;
}

static int batcher_cursor(lua_State *L) {
    mt_cursor c = mt_batcher_get_cursor(check_batcher(L, 1)->b);
    lua_createtable(L, 0, 2);
    set_int(L, "epoch", (lua_Integer)c.epoch);
    set_int(L, "position", (lua_Integer)c.position);
    return 1;
}

static int batcher_set_cursor(lua_State *L) {
    lbatcher *b = check_batcher(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    mt_cursor c = {(uint64_t)opt_int(L, 2, "epoch", 0), (uint64_t)opt_int(L, 2, "position", 0)};
    mt_error err = {0};
    if (mt_batcher_set_cursor(b->b, c, &err)) return lraise(L, &err);
    return 0;
}

/* batcher:batches_per_epoch([epoch]) (default: the cursor's epoch) */
static int batcher_batches_per_epoch(lua_State *L) {
    lbatcher *b = check_batcher(L, 1);
    lua_Integer epoch = luaL_optinteger(L, 2, (lua_Integer)mt_batcher_get_cursor(b->b).epoch);
    lua_pushinteger(L, (lua_Integer)mt_batcher_batches_per_epoch(b->b, (uint64_t)epoch));
    return 1;
}

static int batch_shape(lua_State *L) {
    lbatch *x = luaL_checkudata(L, 1, BATCH_MT);
    lua_pushinteger(L, x->B);
    lua_pushinteger(L, x->T);
    return 2;
}

/* batch:tokens() / batch:targets(): flat (B*T) lists, for inspection */
static int batch_list(lua_State *L, int which) {
    lbatch *x = luaL_checkudata(L, 1, BATCH_MT);
    size_t bt = (size_t)x->B * (size_t)x->T;
    lua_createtable(L, (int)bt, 0);
    for (size_t i = 0; i < bt; i++) {
        lua_pushinteger(L, x->data[(size_t)which * bt + i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    return 1;
}
static int batch_tokens(lua_State *L) { return batch_list(L, 0); }
static int batch_targets(lua_State *L) { return batch_list(L, 3); }

static int noop(lua_State *L) {
    (void)L;
    return 0;
}

/* ---- mechanism calls --------------------------------------------------------------- */

static mt_plugin_instance *check_kind(lua_State *L, int idx, mt_plugin_kind kind, const char *what) {
    lplugin *p = check_plugin(L, idx);
    if (p->inst->desc->kind != kind)
        luaL_error(L, "%s: expected a %s plugin, found the %s plugin '%s'", what, mt_plugin_kind_name(kind),
                   mt_plugin_kind_name(p->inst->desc->kind), p->inst->desc->name);
    return p->inst;
}

/* mt.train_step(model, loss, optimizer, batches, {lr=, step=, max_grad_norm=}) */
static int l_train_step(lua_State *L) {
    lmodel *u = check_model(L, 1);
    mt_plugin_instance *loss = check_kind(L, 2, MT_PLUGIN_LOSS, "train_step");
    mt_plugin_instance *opt = check_kind(L, 3, MT_PLUGIN_OPTIMIZER, "train_step");
    check_opts(L, 5);
    double lr = opt_num(L, 5, "lr", NAN);
    if (isnan(lr)) return luaL_error(L, "train_step: option 'lr' is required");
    lua_Integer step = opt_int(L, 5, "step", 1);
    double clip = opt_num(L, 5, "max_grad_norm", 0);
    int n;
    mt_batch *mb;
    if (luaL_testudata(L, 4, BATCH_MT)) {
        n = 1;
        mb = scratch(L, sizeof *mb);
        lbatch *x = lua_touserdata(L, 4);
        size_t bt = (size_t)x->B * (size_t)x->T;
        mb[0] = (mt_batch){x->B, x->T, x->data, x->data + bt, x->data + 2 * bt, x->data + 3 * bt};
    } else {
        luaL_checktype(L, 4, LUA_TTABLE);
        n = (int)lua_rawlen(L, 4);
        if (n < 1) return luaL_error(L, "train_step: no batches");
        mb = scratch(L, (size_t)n * sizeof *mb);
        for (int i = 0; i < n; i++) {
            lua_rawgeti(L, 4, i + 1);
            lbatch *x = luaL_testudata(L, -1, BATCH_MT);
            if (!x) return luaL_error(L, "train_step: batches[%d] is not a Batch", i + 1);
            size_t bt = (size_t)x->B * (size_t)x->T;
            mb[i] = (mt_batch){x->B, x->T, x->data, x->data + bt, x->data + 2 * bt, x->data + 3 * bt};
            lua_pop(L, 1); /* the batches table keeps it */
        }
    }
    mt_step_result res;
    mt_error err = {0};
    if (mt_train_step(u->m, loss, opt, mb, n, lr, (int64_t)step, clip, &res, &err)) return lraise(L, &err);
    lua_createtable(L, 0, 5);
    set_num(L, "loss", res.loss);
    set_num(L, "grad_norm", res.grad_norm);
    set_num(L, "lr", res.lr);
    set_int(L, "tokens", res.n_tokens);
    set_bool(L, "skipped", res.skipped);
    return 1;
}

/* mt.evaluate(model, examples, {batch=, seq_len=}) (defaults: the model's plan) */
static int l_evaluate(lua_State *L) {
    lmodel *u = check_model(L, 1);
    lexamples *e = check_examples(L, 2);
    check_opts(L, 3);
    int B = (int)opt_int_in(L, 3, "batch", u->m->plan_B, &MT_LIMIT_BATCH);
    int T = (int)opt_int_in(L, 3, "seq_len", u->m->plan_T, &MT_LIMIT_SEQ_LEN);
    mt_eval_result r;
    mt_error err = {0};
    if (mt_evaluate(u->m, &e->set, B, T, &r, &err)) return lraise(L, &err);
    lua_createtable(L, 0, 6);
    set_num(L, "loss", r.loss);
    set_num(L, "perplexity", r.perplexity);
    set_int(L, "tokens", r.tokens);
    set_int(L, "examples", r.examples);
    set_num(L, "seconds", r.seconds);
    set_num(L, "tokens_per_second", r.tokens_per_second);
    return 1;
}

static int l_schedule(lua_State *L) {
    mt_plugin_instance *s = check_kind(L, 1, MT_PLUGIN_SCHEDULER, "schedule");
    lua_Integer step = luaL_checkinteger(L, 2), total = luaL_checkinteger(L, 3);
    double base = luaL_checknumber(L, 4);
    /* schedulers count steps from 0 (transformers' lambdas); a base lr is finite, >= 0 */
    if (total < 1) return luaL_error(L, "schedule: total steps %I: must be >= 1", total);
    if (step < 0 || step > total)
        return luaL_error(L, "schedule: step %I is out of range (expected 0 to the total, %I)", step, total);
    if (!isfinite(base) || base < 0)
        return luaL_error(L, "schedule: base learning rate %f: must be finite and >= 0", base);
    lua_pushnumber(L, mt_schedule_lr(s, (int64_t)step, (int64_t)total, base));
    return 1;
}

/* Optional optimizer argument: nil or an optimizer Plugin. */
static mt_plugin_instance *opt_optimizer(lua_State *L, int idx) {
    if (lua_isnoneornil(L, idx)) return NULL;
    return check_kind(L, idx, MT_PLUGIN_OPTIMIZER, "checkpoint");
}

/* mt.checkpoint_save(run_dir, model, optimizer, state) -> path */
static int l_checkpoint_save(lua_State *L) {
    const char *run_dir = luaL_checkstring(L, 1);
    mt_sandbox_check_path(L, run_dir, 1, "checkpoint_save");
    lmodel *u = check_model(L, 2);
    mt_plugin_instance *opt = opt_optimizer(L, 3);
    luaL_checktype(L, 4, LUA_TTABLE);
    mt_ckpt_state *s = scratch(L, sizeof *s);
    mt_error err = {0};
    s->step = opt_int(L, 4, "step", 0);
    s->epoch = opt_int(L, 4, "epoch", 0);
    s->lr = opt_num(L, 4, "lr", 0);
    s->total_steps = opt_int(L, 4, "total_steps", 0);
    s->sched_step = opt_int(L, 4, "sched_step", s->step);
    size_t rlen = 0;
    const char *recipe = opt_str(L, 4, "recipe", NULL);
    if (recipe) {
        lua_getfield(L, 4, "recipe");
        recipe = lua_tolstring(L, -1, &rlen); /* held by the state table */
        lua_pop(L, 1);
    }
    s->recipe = recipe;
    s->recipe_len = rlen;
    if (opt_field(L, 4, "cursor") == LUA_TTABLE) {
        int c = lua_gettop(L);
        s->cursor.epoch = (uint64_t)opt_int(L, c, "epoch", 0);
        s->cursor.position = (uint64_t)opt_int(L, c, "position", 0);
    }
    lua_pop(L, 1);
    if (opt_field(L, 4, "rng") == LUA_TTABLE) {
        int n = (int)lua_rawlen(L, -1);
        if (n > MT_CKPT_MAX_RNG) return luaL_error(L, "checkpoint state: rng holds at most %d words", MT_CKPT_MAX_RNG);
        for (int i = 0; i < n; i++) {
            lua_rawgeti(L, -1, i + 1);
            s->rng[i] = (uint64_t)luaL_checkinteger(L, -1);
            lua_pop(L, 1);
        }
        s->n_rng = n;
    }
    lua_pop(L, 1);
    if (opt_field(L, 4, "metrics") == LUA_TTABLE) {
        lua_pushnil(L);
        while (lua_next(L, -2)) {
            if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TNUMBER)
                return luaL_error(L, "checkpoint state: metrics must map names to numbers");
            if (mt_ckpt_state_set_metric(s, lua_tostring(L, -2), lua_tonumber(L, -1), &err)) return lraise(L, &err);
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
    if (opt_field(L, 4, "plugins") == LUA_TTABLE) {
        int n = (int)lua_rawlen(L, -1);
        for (int i = 0; i < n; i++) {
            lua_rawgeti(L, -1, i + 1);
            lplugin *p = luaL_testudata(L, -1, PLUGIN_MT);
            if (!p || !p->inst) return luaL_error(L, "checkpoint state: plugins[%d] is not an open Plugin", i + 1);
            if (mt_ckpt_state_add_plugin(s, p->inst, &err)) return lraise(L, &err);
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
    /* run: the settings a resume compares, any JSON-able table (held on the stack) */
    if (opt_field(L, 4, "run") == LUA_TTABLE) s->run = mt_lua_json_encode(L, -1);
    else if (!lua_isnil(L, -1)) return luaL_error(L, "checkpoint state: run must be a table");
    char *path = NULL;
    if (mt_checkpoint_save(run_dir, u->m, opt, s, &path, &err)) return lraise(L, &err);
    lua_pushstring(L, path);
    free(path);
    return 1;
}

/* mt.checkpoint_load(path, model, optimizer) -> state */
static int decode_run(lua_State *L) {
    const char *text = lua_touserdata(L, 1);
    mt_lua_json_decode(L, text, strlen(text), "checkpoint state.json run");
    return 1;
}

static int l_checkpoint_load(lua_State *L) {
    const char *dir = luaL_checkstring(L, 1);
    mt_sandbox_check_path(L, dir, 0, "checkpoint_load");
    lmodel *u = lua_isnoneornil(L, 2) ? NULL : check_model(L, 2);
    mt_plugin_instance *opt = opt_optimizer(L, 3);
    mt_ckpt_state s;
    memset(&s, 0, sizeof s);
    mt_error err = {0};
    if (mt_checkpoint_load(dir, u ? u->m : NULL, opt, &s, &err)) {
        mt_ckpt_state_clear(&s);
        return lraise(L, &err);
    }
    if (!lua_checkstack(L, 8)) {
        mt_ckpt_state_clear(&s);
        return luaL_error(L, "out of Lua stack");
    }
    lua_createtable(L, 0, 12);
    set_int(L, "step", s.step);
    set_int(L, "epoch", s.epoch);
    set_int(L, "sched_step", s.sched_step);
    set_int(L, "total_steps", s.total_steps);
    set_num(L, "lr", s.lr);
    lua_createtable(L, 0, 2);
    set_int(L, "epoch", (lua_Integer)s.cursor.epoch);
    set_int(L, "position", (lua_Integer)s.cursor.position);
    lua_setfield(L, -2, "cursor");
    lua_createtable(L, s.n_rng, 0);
    for (int i = 0; i < s.n_rng; i++) {
        lua_pushinteger(L, (lua_Integer)s.rng[i]);
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "rng");
    lua_createtable(L, 0, s.n_metrics);
    for (int i = 0; i < s.n_metrics; i++) set_num(L, s.metrics[i].name, s.metrics[i].value);
    lua_setfield(L, -2, "metrics");
    lua_pushlstring(L, s.recipe ? s.recipe : "", s.recipe ? s.recipe_len : 0);
    lua_setfield(L, -2, "recipe");
    set_str(L, "recipe_sha256", s.recipe_sha256);
    lua_createtable(L, s.n_plugins, 0);
    for (int i = 0; i < s.n_plugins; i++) {
        lua_createtable(L, 0, 3);
        set_str(L, "kind", s.plugins[i].kind);
        set_str(L, "name", s.plugins[i].name);
        set_str(L, "version", s.plugins[i].version);
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "plugins");
    set_str(L, "path", dir);
    if (s.model_fingerprint[0]) set_str(L, "model_fingerprint", s.model_fingerprint);
    if (s.run) {
        /* a protected decode: the state's allocations must be freed either way */
        lua_pushcfunction(L, decode_run);
        lua_pushlightuserdata(L, (void *)s.run);
        int rc = lua_pcall(L, 1, 1, 0);
        if (rc != LUA_OK) {
            mt_ckpt_state_clear(&s);
            return lua_error(L);
        }
        lua_setfield(L, -2, "run");
    }
    mt_ckpt_state_clear(&s);
    return 1;
}

static int l_checkpoint_latest(lua_State *L) {
    const char *run_dir = luaL_checkstring(L, 1);
    mt_sandbox_check_path(L, run_dir, 0, "checkpoint_latest");
    char *path = NULL;
    mt_error err = {0};
    if (mt_checkpoint_latest(run_dir, &path, &err)) return lraise(L, &err);
    if (path) lua_pushstring(L, path);
    else lua_pushnil(L);
    free(path);
    return 1;
}

static int l_checkpoint_prune(lua_State *L) {
    const char *run_dir = luaL_checkstring(L, 1);
    mt_sandbox_check_path(L, run_dir, 1, "checkpoint_prune");
    int keep = (int)luaL_checkinteger(L, 2);
    lua_Integer best = luaL_optinteger(L, 3, -1);
    int deleted = 0;
    mt_error err = {0};
    if (mt_checkpoint_prune(run_dir, keep, (int64_t)best, &deleted, &err)) return lraise(L, &err);
    lua_pushinteger(L, deleted);
    return 1;
}

/* Pushes the chat template opts.template names (a name, default "auto", or a
 * function) and returns its index; 0 for template = "none" (the raw prompt), where a
 * system message is refused. */
static int generate_template(lua_State *L, ltok *t, int opts, const char *system) {
    int tt = opt_field(L, opts, "template"); /* stays on the stack */
    if (tt == LUA_TSTRING && !strcmp(lua_tostring(L, -1), "none")) {
        if (system) return luaL_error(L, "option 'system' needs a chat template");
        return 0;
    }
    if (tt != LUA_TFUNCTION && tt != LUA_TNIL && tt != LUA_TSTRING)
        return luaL_error(L, "option 'template': expected a name, a function or \"none\"");
    mt_error err = {0};
    if (tt == LUA_TFUNCTION) lua_pushvalue(L, -1);
    else if (mt_chat_template_push(L, t->tok, tt == LUA_TSTRING ? lua_tostring(L, -1) : "auto", NULL, &err))
        return lraise(L, &err);
    return lua_gettop(L);
}

/* The ids of the prompt text at index `prompt`: rendered as the user message (after
 * the system message, when not NULL) by the template function at index fn, or raw
 * when fn is 0; in scratch memory left on the stack. */
static int32_t *generate_prompt_ids(lua_State *L, ltok *t, int fn, const char *system, int prompt,
                                    int *n_ids) {
    size_t plen;
    const char *text = lua_tolstring(L, prompt, &plen);
    const int top = lua_gettop(L);
    if (fn) {
        lua_pushvalue(L, fn);
        lua_newtable(L);
        int n = 0;
        if (system) {
            lua_createtable(L, 0, 2);
            set_str(L, "role", "system");
            set_str(L, "content", system);
            lua_rawseti(L, -2, ++n);
        }
        lua_createtable(L, 0, 2);
        set_str(L, "role", "user");
        lua_pushlstring(L, text, plen);
        lua_setfield(L, -2, "content");
        lua_rawseti(L, -2, ++n);
        lua_createtable(L, 0, 3);
        set_bool(L, "add_generation_prompt", 1);
        int32_t bos = mt_tokenizer_bos(t->tok), eos = mt_tokenizer_eos(t->tok);
        if (bos >= 0) set_str(L, "bos", mt_tokenizer_token_text(t->tok, bos));
        if (eos >= 0) set_str(L, "eos", mt_tokenizer_token_text(t->tok, eos));
        lua_call(L, 2, 2);
        lua_pop(L, 1); /* spans */
        if (!lua_isstring(L, -1)) {
            luaL_error(L, "the chat template returned no text");
            return NULL;
        }
        text = lua_tolstring(L, -1, &plen); /* held until the ids are made */
    }
    mt_token_list ids = {0};
    mt_error err = {0};
    if (mt_tokenizer_encode(t->tok, text, plen, !fn, &ids, &err)) {
        mt_token_list_free(&ids);
        lraise(L, &err);
        return NULL;
    }
    int32_t *out = scratch(L, ids.n * sizeof *out);
    if (ids.n) memcpy(out, ids.ids, ids.n * sizeof *out);
    *n_ids = (int)ids.n;
    mt_token_list_free(&ids);
    if (fn) lua_remove(L, top + 1); /* the rendered text */
    return out;
}

/* Pushes a generation's text and info table. */
static void push_generation(lua_State *L, const mt_generation *g) {
    static const char *const reasons[] = {"length", "eos", "stop_string", "callback", "context"};
    lua_pushlstring(L, g->text ? g->text : "", g->text ? g->text_len : 0);
    lua_createtable(L, 0, 5);
    set_int(L, "prompt_tokens", g->n_prompt);
    set_int(L, "new_tokens", g->n_ids);
    set_str(L, "reason", (unsigned)g->reason < 5 ? reasons[g->reason] : "?");
    set_num(L, "prefill_seconds", g->prefill_seconds);
    set_num(L, "decode_seconds", g->decode_seconds);
}

/* mt.generate(model, tok, prompt, {template=, system=, max_new_tokens=, temperature=,
 * top_k=, top_p=, seed=, stop={...}, batch=}) -> text, info
 * mt.generate(model, tok, {prompt, ...}, opts) -> {text, ...}, {info, ...}: decoded
 * together, opts.batch (default 16) sequences at a time; prompt i samples with seed + i - 1. */
static int l_generate(lua_State *L) {
    lmodel *u = check_model(L, 1);
    ltok *t = check_tok(L, 2);
    const int many = lua_type(L, 3) == LUA_TTABLE;
    if (!many) luaL_checkstring(L, 3);
    check_opts(L, 4);
    const char *system = opt_str(L, 4, "system", NULL);
    mt_generate_options go;
    memset(&go, 0, sizeof go);
    go.max_new_tokens = (int)opt_int_in(L, 4, "max_new_tokens", 256, &MT_LIMIT_MAX_NEW_TOKENS);
    go.sampling.temperature = opt_float_in(L, 4, "temperature", 0, &MT_LIMIT_TEMPERATURE);
    go.sampling.top_k = (int)opt_int_in(L, 4, "top_k", 0, &MT_LIMIT_TOP_K);
    go.sampling.top_p = opt_float_in(L, 4, "top_p", 1, &MT_LIMIT_TOP_P);
    go.sampling.seed = opt_seed(L, 4, "seed", 0);
    go.skip_special = 1;
    lua_Integer slots = opt_int_in(L, 4, "batch", MT_GENERATE_SLOTS, &MT_LIMIT_GENERATE_SLOTS);
    if (slots < 1) return luaL_error(L, "option 'batch': %I sequences at a time: must be >= 1", slots);
    const char **stops = NULL;
    int n_stops = 0;
    if (opt_field(L, 4, "stop") == LUA_TTABLE) {
        int st = lua_gettop(L);
        n_stops = (int)lua_rawlen(L, st);
        stops = scratch(L, (size_t)n_stops * sizeof *stops);
        for (int i = 0; i < n_stops; i++) {
            if (lua_rawgeti(L, st, i + 1) != LUA_TSTRING)
                return luaL_error(L, "option 'stop': item %d: expected a string", i + 1);
            stops[i] = lua_tostring(L, -1); /* held by the stop table */
            lua_pop(L, 1);
        }
    } /* the stop table stays on the stack */
    go.stop_strings = stops;
    go.n_stop_strings = n_stops;
    const int fn = generate_template(L, t, 4, system);
    int32_t stop_ids[MT_CHAT_STOP_IDS_MAX];
    int n_stop_ids = mt_chat_stop_ids(t->tok, stop_ids);
    go.stop_ids = stop_ids;
    go.n_stop_ids = n_stop_ids;
    mt_error err = {0};
    if (!many) {
        int n_prompt = 0;
        int32_t *prompt_ids = generate_prompt_ids(L, t, fn, system, 3, &n_prompt);
        mt_generation g;
        memset(&g, 0, sizeof g);
        if (mt_generate(u->m, t->tok, prompt_ids, n_prompt, &go, &g, &err)) {
            mt_generation_free(&g);
            return lraise(L, &err);
        }
        push_generation(L, &g);
        mt_generation_free(&g);
        return 2;
    }
    /* a list of prompts: their ids are anchored in a table, so the stack stays small */
    const int n = (int)lua_rawlen(L, 3), max_pos = u->m->cfg.max_position_embeddings;
    const int32_t **prompts = scratch(L, (size_t)n * sizeof *prompts);
    int *n_prompt = scratch(L, (size_t)n * sizeof *n_prompt);
    mt_generation *out = scratch(L, (size_t)n * sizeof *out);
    lua_createtable(L, n, 0);
    const int anchor = lua_gettop(L);
    for (int i = 0; i < n; i++) {
        if (lua_rawgeti(L, 3, i + 1) != LUA_TSTRING)
            return luaL_error(L, "prompt %d: expected a string, found %s", i + 1, luaL_typename(L, -1));
        prompts[i] = generate_prompt_ids(L, t, fn, system, lua_gettop(L), &n_prompt[i]);
        if (n_prompt[i] < 1 || n_prompt[i] >= max_pos)
            return luaL_error(L, "prompt %d has %d tokens: must be in [1, %d) (the model's context)",
                              i + 1, n_prompt[i], max_pos);
        lua_rawseti(L, anchor, i + 1); /* the ids */
        lua_pop(L, 1);                 /* the prompt */
    }
    if (n > 0 && mt_generate_batch(u->m, t->tok, prompts, n_prompt, n, (int)slots, &go, out, &err))
        return lraise(L, &err);
    lua_createtable(L, n, 0);
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        push_generation(L, &out[i]);
        lua_rawseti(L, -3, i + 1);
        lua_rawseti(L, -3, i + 1);
        mt_generation_free(&out[i]);
    }
    return 2;
}

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
    const char **sets = scratch(L, (size_t)(n ? n : 1) * sizeof *sets);
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, list, i + 1);
        sets[i] = lua_tostring(L, -1); /* kept alive by the list */
        lua_pop(L, 1);
    }
    mt_error err = {0};
    if (mt_config_apply_overrides(L, 1, sets, n, &err)) return lraise(L, &err);
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

/* ---- registration ------------------------------------------------------------------ */

static const luaL_Reg model_methods[] = {
    {"info", model_info},         {"attach", model_attach},
    {"attach_peft", model_attach_peft},
    {"plan", model_plan},         {"trainable", model_trainable},
    {"set_training", model_set_training}, {"close", model_close},
    {"export_peft", model_export_peft},   {"export_merged", model_export_merged},
    {"export_gguf", model_export_gguf},
    {NULL, NULL},
};
static const luaL_Reg tok_methods[] = {
    {"encode", tok_encode}, {"decode", tok_decode}, {"chat_template", tok_chat_template},
    {"bos", tok_bos},       {"eos", tok_eos},       {"vocab_size", tok_vocab_size},
    {"close", tok_close},   {NULL, NULL},
};
static const luaL_Reg plugin_methods[] = {
    {"describe", plugin_describe}, {"close", plugin_close}, {NULL, NULL},
};
static const luaL_Reg examples_methods[] = {
    {"stats", examples_stats}, {"count", examples_count}, {"split", examples_split},
    {"close", examples_close}, {NULL, NULL},
};
static const luaL_Reg batcher_methods[] = {
    {"next", batcher_next},
    {"cursor", batcher_cursor},
    {"set_cursor", batcher_set_cursor},
    {"batches_per_epoch", batcher_batches_per_epoch},
    {"close", batcher_close},
    {NULL, NULL},
};
static const luaL_Reg batch_methods[] = {
    {"shape", batch_shape}, {"tokens", batch_tokens}, {"targets", batch_targets}, {"close", noop},
    {NULL, NULL},
};

static const luaL_Reg records_methods[] = {{NULL, NULL}};

static const luaL_Reg moontune_core[] = {
    {"model", l_model},
    {"tokenizer", l_tokenizer},
    {"plugin", l_plugin},
    {"examples", l_examples},
    {"examples_from_ids", l_examples_from_ids},
    {"records", l_records},
    {"batcher", l_batcher},
    {"train_step", l_train_step},
    {"evaluate", l_evaluate},
    {"schedule", l_schedule},
    {"checkpoint_save", l_checkpoint_save},
    {"checkpoint_load", l_checkpoint_load},
    {"checkpoint_latest", l_checkpoint_latest},
    {"checkpoint_prune", l_checkpoint_prune},
    {"generate", l_generate},
    {"sha256", l_sha256},
    {"now", l_now},
    {"peak_memory", l_peak_memory},
    {"config", l_config},
    {"validating", l_validating},
    {NULL, NULL},
};

/* A metatable with methods as __index, and gc as __gc and __close. */
static void new_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc,
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
        lua_pushcfunction(L, noop);
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

int luaopen_moontune_core(lua_State *L) {
    /* the registries' sentinel first: finalizers run newest first, so it closes last */
    push_sentinel(L);
    lua_pop(L, 1);
    new_class(L, MODEL_MT, model_methods, model_close, NULL);
    new_class(L, TOKENIZER_MT, tok_methods, tok_close, NULL);
    new_class(L, PLUGIN_MT, plugin_methods, plugin_close, plugin_tostring);
    new_class(L, EXAMPLES_MT, examples_methods, examples_gc, NULL);
    new_class(L, BATCHER_MT, batcher_methods, batcher_close, NULL);
    new_class(L, BATCH_MT, batch_methods, NULL, NULL);
    new_class(L, RECORDS_MT, records_methods, records_gc, NULL);
    /* an explicit close of in-use examples raises; __close behaves as close() */
    luaL_getmetatable(L, EXAMPLES_MT);
    lua_pushcfunction(L, examples_close);
    lua_setfield(L, -2, "__close");
    lua_pop(L, 1);
    luaL_newlib(L, moontune_core);
    mt_lua_run_funcs(L);
    return 1;
}

void mt_lua_register(lua_State *L) {
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
    lua_pushcfunction(L, luaopen_moontune_core);
    lua_setfield(L, -2, "moontune.core");
    lua_pop(L, 1);
}
