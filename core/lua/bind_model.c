/* bind_model.c — moontune.core's Plugin, Model and Tokenizer objects, and the exports. */
#include "lua/bind_internal.h"

#include <stdlib.h>
#include <string.h>

#include "store/export_gguf.h"
#include "store/export_hf.h"
#include "store/peft.h"
#include "store/session.h"
#include "lua/lua_state.h"
#include "lua/sandbox.h"

/* ---- Plugin ---------------------------------------------------------------- */

lplugin *bind_check_plugin(lua_State *L, int idx) {
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

/* optimizer:shard_state(on): ZeRO-1 in a data-parallel job — each rank keeps and
 * updates the optimizer state of its own parameters only (model/train.c), checkpoints
 * gather it (store/checkpoint.c). Set before the first step or checkpoint load. */
static int plugin_shard_state(lua_State *L) {
    lplugin *p = bind_check_plugin(L, 1);
    if (p->inst->desc->kind != MT_PLUGIN_OPTIMIZER)
        return luaL_error(L, "shard_state: '%s' is a %s plugin; only an optimizer's state is sharded",
                          p->inst->desc->name, mt_plugin_kind_name(p->inst->desc->kind));
    p->inst->sharded = lua_toboolean(L, 2);
    return 0;
}

static int plugin_describe(lua_State *L) {
    lplugin *p = bind_check_plugin(L, 1);
    lua_createtable(L, 0, 4);
    bind_set_str(L, "kind", mt_plugin_kind_name(p->inst->desc->kind));
    bind_set_str(L, "name", p->inst->desc->name);
    bind_set_str(L, "version", p->inst->desc->version);
    bind_set_str(L, "file", mt_plugin_path(p->inst->plugin));
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
 * stays on the stack; arrays go into bind_scratch userdata anchored in a table pushed here). */
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
    mt_kv *kv = bind_scratch(L, n * sizeof *kv);
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
            const char **list = bind_scratch(L, (size_t)len * sizeof *list);
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
    bind_check_opts(L, 4);
    mt_plugin_kind kind = mt_plugin_kind_parse(kind_name);
    if (!kind)
        return luaL_error(L, "unknown plugin kind '%s' (expected optimizer, loss, adapter or scheduler)",
                          kind_name);
    /* extra directories */
    const char **dirs = NULL;
    int n_dirs = 0;
    if (bind_opt_field(L, 4, "paths") != LUA_TNIL) {
        if (mt_sandbox_active(L)) /* a plugin is native code: loading one is not sandboxable */
            return luaL_error(L, "sandbox: a recipe cannot name plugin directories (plugins are "
                                 "native code); put them on MOONTUNE_PLUGIN_PATH or run with "
                                 "--unsafe to trust this recipe");
        if (lua_type(L, -1) == LUA_TSTRING) {
            dirs = bind_scratch(L, sizeof *dirs);
            dirs[0] = lua_tostring(L, -2);
            n_dirs = 1;
        } else {
            luaL_checktype(L, -1, LUA_TTABLE);
            dirs = bind_string_list(L, -1, "paths", 0, &n_dirs); /* held by the paths table */
        }
    }
    registries *r = bind_push_sentinel(L);
    int sentinel = lua_gettop(L);
    mt_registry *reg = bind_get_registry(L, r, dirs, n_dirs);
    mt_error err = {0};
    const mt_plugin *pl = mt_registry_find(reg, kind, name, &err);
    if (!pl) return bind_raise(L, &err);
    size_t n_kv;
    mt_kv *kv = options_to_kv(L, 3, name, &n_kv);
    lplugin *p = new_plugin(L, sentinel);
    if (mt_plugin_instantiate(pl, kv, n_kv, &p->inst, &err)) return bind_raise(L, &err);
    return 1;
}

/* ---- Model ------------------------------------------------------------------ */

lmodel *bind_check_model(lua_State *L, int idx) {
    lmodel *u = luaL_checkudata(L, idx, MODEL_MT);
    if (!u->m) luaL_error(L, "the model is closed");
    return u;
}

static int model_close(lua_State *L) {
    lmodel *u = luaL_checkudata(L, 1, MODEL_MT);
    /* the model first, then the adapters it calls into, then the backend their device
     * memory lives on */
    mt_session_release_model(u->session);
    u->m = NULL;
    for (int i = 0; i < u->n_adapters; i++) {
        mt_plugin_instance_free(u->adapters[i]->inst);
        u->adapters[i]->inst = NULL;
    }
    free(u->adapters);
    u->adapters = NULL;
    u->n_adapters = 0;
    mt_session_close(u->session);
    u->session = NULL;
    return 0;
}

/* mt.model(path, {threads=, device=}): device "cpu" or "cuda"; without one, the device
 * `moontune run --device` named, else the default (CUDA where it starts, else the CPU). */
static int l_model(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    bind_check_opts(L, 2);
    int threads = (int)bind_opt_int_in(L, 2, "threads", 0, &MT_LIMIT_THREADS);
    mt_session_options so = {.threads = threads, .model_path = path};
    so.device = bind_opt_str(L, 2, "device", NULL); /* held by the options table */
    so.device_origin = "mt.model: device";
    int from_command_line = 0;
    const char *run_device = mt_lua_device(L, &from_command_line);
    if (!so.device && from_command_line) {
        so.device = run_device;
        so.device_origin = "--device";
    }
    mt_error err = {0};
    /* refused before the userdata exists: a misspelt name costs no backend start */
    if (mt_device_check_name(so.device_origin, so.device, &err)) return bind_raise(L, &err);
    lmodel *b = lua_newuserdatauv(L, sizeof *b, 1);
    memset(b, 0, sizeof *b);
    luaL_setmetatable(L, MODEL_MT);
    lua_newtable(L);
    lua_pushstring(L, path);
    lua_setfield(L, -2, "path"); /* the base model's name in exported adapters */
    lua_setiuservalue(L, -2, 1);
    if (mt_session_open(&so, &b->session, &err)) return bind_raise(L, &err);
    b->m = b->session->model;
    /* the default, now known, is the run's device for mt.device() */
    if (!run_device && (!so.device || !*so.device)) mt_lua_set_device(L, b->session->device, 0);
    return 1;
}

/* mt.device() -> "cpu" or "cuda": the run's device, where mt.model puts a model whose
 * recipe names none (moontune run --device, else the default, found once). */
static int l_device(lua_State *L) {
    const char *name = mt_lua_device(L, NULL);
    if (!name) {
        name = mt_device_default_name(NULL, 0);
        mt_lua_set_device(L, name, 0);
    }
    lua_pushstring(L, name);
    return 1;
}

static int model_info(lua_State *L) {
    lmodel *u = bind_check_model(L, 1);
    const mt_model_config *c = &u->m->cfg;
    lua_createtable(L, 0, 12);
    bind_set_str(L, "model_type", c->model_type);
    bind_set_str(L, "device", u->session->device);
    bind_set_int(L, "params", (lua_Integer)u->m->total_numel);
    bind_set_int(L, "layers", c->num_layers);
    bind_set_int(L, "hidden", c->hidden_size);
    bind_set_int(L, "vocab", c->vocab_size);
    bind_set_int(L, "heads", c->num_heads);
    bind_set_int(L, "kv_heads", c->num_kv_heads);
    bind_set_int(L, "max_positions", c->max_position_embeddings);
    /* memory, for `moontune validate`'s estimate: parameters, gradients of what trains,
     * and the activations planned for (B,T) */
    size_t grads = 0;
    for (size_t i = 0; i < u->m->num_params; i++)
        if (u->m->params[i].grad) grads += u->m->params[i].numel * sizeof(float);
    for (size_t i = 0; i < u->m->num_extra; i++)
        grads += (size_t)mt_tensor_numel(&u->m->extra_params[i].grad) * 2 * sizeof(float);
    bind_set_int(L, "param_bytes", (lua_Integer)(u->m->total_numel * sizeof(float)));
    bind_set_int(L, "trainable_bytes", (lua_Integer)grads);
    bind_set_int(L, "activation_bytes", (lua_Integer)mt_model_plan_bytes(u->m));
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
    lmodel *u = bind_check_model(L, 1);
    lplugin *p = bind_check_plugin(L, 2);
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
    if (mt_model_attach_adapter(u->m, p->inst->desc->vtable, p->inst->state, &err)) return bind_raise(L, &err);
    own_adapter(L, u, p, 2);
    return 0;
}

/* model:attach_peft(dir, {adapter=}) -> the attached adapter Plugin: a PEFT adapter
 * directory (adapter_config.json + adapter_model.safetensors) loaded onto the model
 * (core/store/peft.h) by the adapter plugin named, or by the first that can load it. The
 * model owns the instance as with attach. On a refusal nothing is attached; only a
 * failure in the adapter's load, after the attach (see mt_peft_attach), leaves the
 * adapter on the model, owned by it, before the error is raised. */
static int model_attach_peft(lua_State *L) {
    lmodel *u = bind_check_model(L, 1);
    const char *dir = luaL_checkstring(L, 2);
    bind_check_opts(L, 3);
    const char *adapter = bind_opt_str(L, 3, "adapter", NULL); /* held by the options table */
    lplugin **na = realloc(u->adapters, (size_t)(u->n_adapters + 1) * sizeof *na);
    if (!na) return luaL_error(L, "out of memory");
    u->adapters = na;
    registries *r = bind_push_sentinel(L);
    int sentinel = lua_gettop(L);
    mt_registry *reg = bind_get_registry(L, r, NULL, 0);
    lplugin *p = new_plugin(L, sentinel);
    int plugin = lua_gettop(L);
    mt_error err = {0};
    mt_status st = mt_peft_attach(u->m, reg, adapter, dir, &p->inst, &err);
    if (p->inst) own_adapter(L, u, p, plugin); /* attached, even when the weights failed */
    if (st) return bind_raise(L, &err);
    lua_pushvalue(L, plugin);
    return 1;
}

/* model:plan(B, T [, chunk]) */
static int model_plan(lua_State *L) {
    lmodel *u = bind_check_model(L, 1);
    static const mt_int_limit chunk_rows = {"chunk", 0, INT32_MAX}; /* 0: the default */
    int B = (int)bind_arg_int_in(L, 2, "plan: batch", &MT_LIMIT_BATCH);
    int T = (int)bind_arg_int_in(L, 3, "plan: sequence length", &MT_LIMIT_SEQ_LEN);
    int chunk = lua_isnoneornil(L, 4) ? 0 : (int)bind_arg_int_in(L, 4, "plan: chunk", &chunk_rows);
    mt_error err = {0};
    if (mt_model_plan(u->m, B, T, chunk, &err)) return bind_raise(L, &err);
    return 0;
}

static int model_trainable(lua_State *L) {
    lmodel *u = bind_check_model(L, 1);
    mt_param_view *views = NULL;
    size_t n = 0;
    mt_error err = {0};
    if (mt_model_trainable_params(u->m, &views, &n, &err)) return bind_raise(L, &err);
    lua_createtable(L, (int)n, 0);
    for (size_t i = 0; i < n; i++) {
        lua_createtable(L, 0, 2);
        bind_set_str(L, "name", views[i].name);
        bind_set_int(L, "numel", (lua_Integer)mt_tensor_numel(&views[i].value));
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    free(views);
    return 1;
}

static int model_set_training(lua_State *L) {
    lmodel *u = bind_check_model(L, 1);
    luaL_checktype(L, 2, LUA_TBOOLEAN);
    mt_model_set_training(u->m, lua_toboolean(L, 2));
    return 0;
}

/* model:int8_training("off" | "forward" | "all"; false, true: off, all): the frozen
 * projections' products in int8 during training steps (mt_model_set_int8_training):
 * none, the forward only, or the forward and the input gradients; the copies are made
 * at the next step */
static int model_int8_training(lua_State *L) {
    lmodel *u = bind_check_model(L, 1);
    mt_int8_training mode;
    if (lua_type(L, 2) == LUA_TBOOLEAN) {
        mode = lua_toboolean(L, 2) ? MT_INT8_ALL : MT_INT8_OFF;
    } else {
        static const char *const names[] = {"off", "forward", "all", NULL};
        static const mt_int8_training modes[] = {MT_INT8_OFF, MT_INT8_FORWARD, MT_INT8_ALL};
        mode = modes[luaL_checkoption(L, 2, NULL, names)];
    }
    mt_model_set_int8_training(u->m, mode);
    return 0;
}

/* model:recompute("off" | "norms" | "layers"): what backward recomputes instead of
 * keeping (mt_model_set_recompute); the plan is made again for the mode. Refused (an
 * error) for "layers" while an attached adapter cannot replay a forward. */
static int model_recompute(lua_State *L) {
    lmodel *u = bind_check_model(L, 1);
    const char *name = luaL_checkstring(L, 2);
    mt_recompute mode;
    if (!mt_recompute_parse(name, &mode))
        return luaL_error(L, "model:recompute: expected \"off\", \"norms\" or \"layers\", got \"%s\"",
                          name);
    mt_error err = {0};
    if (mt_model_set_recompute(u->m, mode, &err)) return bind_raise(L, &err);
    return 0;
}

/* ---- Tokenizer ---------------------------------------------------------------- */

ltok *bind_check_tok(lua_State *L, int idx) {
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
    if (mt_tokenizer_load(path, &t->tok, &err)) return bind_raise(L, &err);
    return 1;
}

/* tok:encode(text [, add_special = true]) */
static int tok_encode(lua_State *L) {
    ltok *t = bind_check_tok(L, 1);
    size_t len;
    const char *text = luaL_checklstring(L, 2, &len);
    int add_special = lua_isnoneornil(L, 3) ? 1 : lua_toboolean(L, 3);
    mt_token_list list = {0};
    mt_error err = {0};
    if (mt_tokenizer_encode(t->tok, text, len, add_special, &list, &err)) {
        mt_token_list_free(&list);
        return bind_raise(L, &err);
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

/* Reads an array of ids at idx into bind_scratch memory (left on the stack). */
int32_t *bind_read_ids(lua_State *L, int idx, size_t *n, const char *what) {
    luaL_checktype(L, idx, LUA_TTABLE);
    *n = (size_t)lua_rawlen(L, idx);
    int32_t *ids = bind_scratch(L, *n * sizeof *ids);
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
    ltok *t = bind_check_tok(L, 1);
    /* read before bind_read_ids, whose bind_scratch buffer is pushed where an absent flag was */
    int skip = lua_toboolean(L, 3);
    size_t n;
    int32_t *ids = bind_read_ids(L, 2, &n, "decode");
    char *text = NULL;
    size_t len = 0;
    mt_error err = {0};
    if (mt_tokenizer_decode(t->tok, ids, n, skip, &text, &len, &err)) return bind_raise(L, &err);
    lua_pushlstring(L, text, len);
    free(text);
    return 1;
}

static int tok_chat_template(lua_State *L) {
    const char *s = mt_tokenizer_chat_template(bind_check_tok(L, 1)->tok);
    if (s) lua_pushstring(L, s);
    else lua_pushnil(L);
    return 1;
}

static int push_id(lua_State *L, int32_t id) {
    if (id >= 0) lua_pushinteger(L, id);
    else lua_pushnil(L);
    return 1;
}
static int tok_bos(lua_State *L) { return push_id(L, mt_tokenizer_bos(bind_check_tok(L, 1)->tok)); }
static int tok_eos(lua_State *L) { return push_id(L, mt_tokenizer_eos(bind_check_tok(L, 1)->tok)); }
static int tok_vocab_size(lua_State *L) {
    lua_pushinteger(L, mt_tokenizer_vocab_size(bind_check_tok(L, 1)->tok));
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
    if (bind_opt_field(L, opts, "tokenizer") != LUA_TNIL) tok = bind_check_tok(L, lua_gettop(L))->tok;
    lua_pop(L, 1);
    return tok;
}

/* model:export_peft(dir, {base_model=}) -> dir: the attached LoRA adapter as a PEFT
 * adapter directory; base_model defaults to the path the model was loaded from. */
static int export_peft_here(lua_State *L) {
    lmodel *u = bind_check_model(L, 1);
    const char *dir = luaL_checkstring(L, 2);
    bind_check_opts(L, 3);
    mt_sandbox_check_path(L, dir, 1, "export_peft");
    const mt_plugin_instance *adapter = export_adapter(L, u, "export_peft");
    if (!adapter) return luaL_error(L, "export_peft: the model has no adapter attached");
    lua_getiuservalue(L, 1, 1);
    lua_getfield(L, -1, "path");
    const char *base = bind_opt_str(L, 3, "base_model", lua_tostring(L, -1));
    mt_error err = {0};
    if (mt_export_peft(u->m, adapter, base, dir, &err)) return bind_raise(L, &err);
    lua_pushvalue(L, 2);
    return 1;
}

/* rank 0 of a data-parallel job writes it; the others wait for the outcome */
static int model_export_peft(lua_State *L) { return bind_on_rank0(L, export_peft_here); }

/* model:export_merged(dir, {tokenizer=}) -> dir: a transformers model directory with the
 * attached adapter (if any) merged in; the model in memory is unchanged. */
static int export_merged_here(lua_State *L) {
    lmodel *u = bind_check_model(L, 1);
    const char *dir = luaL_checkstring(L, 2);
    bind_check_opts(L, 3);
    mt_sandbox_check_path(L, dir, 1, "export_merged");
    const mt_tokenizer *tok = opt_tokenizer(L, 3);
    const mt_plugin_instance *adapter = export_adapter(L, u, "export_merged");
    mt_error err = {0};
    if (mt_export_merged_hf(u->m, adapter, tok, dir, &err)) return bind_raise(L, &err);
    lua_pushvalue(L, 2);
    return 1;
}

/* rank 0 of a data-parallel job writes it; the others wait for the outcome */
static int model_export_merged(lua_State *L) { return bind_on_rank0(L, export_merged_here); }

/* model:export_gguf(path, {tokenizer=, dtype="f16"|"f32"|"bf16"|"q8_0", name=}) -> path: one GGUF file
 * with the attached adapter (if any) merged in, and the tokenizer and chat template. */
static int export_gguf_here(lua_State *L) {
    lmodel *u = bind_check_model(L, 1);
    const char *path = luaL_checkstring(L, 2);
    bind_check_opts(L, 3);
    mt_sandbox_check_path(L, path, 1, "export_gguf");
    const mt_tokenizer *tok = opt_tokenizer(L, 3);
    mt_ggml_type type;
    const char *dtype = bind_opt_str(L, 3, "dtype", "f16");
    if (mt_export_gguf_type_parse(dtype, &type))
        return luaL_error(L, "export_gguf: option 'dtype': expected \"f32\", \"f16\", \"bf16\" or \"q8_0\", found \"%s\"", dtype);
    const char *name = bind_opt_str(L, 3, "name", NULL);
    const mt_plugin_instance *adapter = export_adapter(L, u, "export_gguf");
    mt_error err = {0};
    if (mt_export_gguf_merged(u->m, adapter, tok, path, type, name, &err)) return bind_raise(L, &err);
    lua_pushvalue(L, 2);
    return 1;
}

/* rank 0 of a data-parallel job writes it; the others wait for the outcome */
static int model_export_gguf(lua_State *L) { return bind_on_rank0(L, export_gguf_here); }

/* ---- registration ---- */

static const luaL_Reg model_methods[] = {
    {"info", model_info},         {"attach", model_attach},
    {"attach_peft", model_attach_peft},
    {"plan", model_plan},         {"trainable", model_trainable},
    {"set_training", model_set_training}, {"int8_training", model_int8_training},
    {"recompute", model_recompute},
    {"close", model_close},
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
    {"describe", plugin_describe}, {"shard_state", plugin_shard_state}, {"close", plugin_close},
    {NULL, NULL},
};

static const luaL_Reg functions[] = {
    {"model", l_model},
    {"device", l_device},
    {"tokenizer", l_tokenizer},
    {"plugin", l_plugin},
    {NULL, NULL},
};

void mt_bind_model_open(lua_State *L) {
    bind_new_class(L, MODEL_MT, model_methods, model_close, NULL);
    bind_new_class(L, TOKENIZER_MT, tok_methods, tok_close, NULL);
    bind_new_class(L, PLUGIN_MT, plugin_methods, plugin_close, plugin_tostring);
    luaL_setfuncs(L, functions, 0);
}
