/* bind_train.c — moontune.core's mechanism calls for training: one step, one
 * evaluation pass, the schedule, and checkpoints (save, load, latest, prune). */
#include "lua/bind_internal.h"
#include "lua/run_dir.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "store/checkpoint.h"
#include "model/evaluate.h"
#include "lua/sandbox.h"
#include "model/train.h"

/* ---- mechanism calls --------------------------------------------------------------- */

static mt_plugin_instance *check_kind(lua_State *L, int idx, mt_plugin_kind kind, const char *what) {
    lplugin *p = bind_check_plugin(L, idx);
    if (p->inst->desc->kind != kind)
        luaL_error(L, "%s: expected a %s plugin, found the %s plugin '%s'", what, mt_plugin_kind_name(kind),
                   mt_plugin_kind_name(p->inst->desc->kind), p->inst->desc->name);
    return p->inst;
}

/* Sets field `metrics` of the table on top: name -> value (the loss plugin's own). */
static void push_metrics(lua_State *L, int n, const char (*names)[64], const double *values) {
    lua_createtable(L, 0, n);
    for (int k = 0; k < n; k++) bind_set_num(L, names[k], values[k]);
    lua_setfield(L, -2, "metrics");
}

/* mt.train_step(model, loss, optimizer, batches, {lr=, step=, max_grad_norm=}) -> {loss=,
 * grad_norm=, lr=, tokens=, skipped=, int8=, metrics = {name = value}} */
static int l_train_step(lua_State *L) {
    lmodel *u = bind_check_model(L, 1);
    mt_plugin_instance *loss = check_kind(L, 2, MT_PLUGIN_LOSS, "train_step");
    mt_plugin_instance *opt = check_kind(L, 3, MT_PLUGIN_OPTIMIZER, "train_step");
    bind_check_opts(L, 5);
    double lr = bind_opt_num(L, 5, "lr", NAN);
    if (isnan(lr)) return luaL_error(L, "train_step: option 'lr' is required");
    lua_Integer step = bind_opt_int(L, 5, "step", 1);
    double clip = bind_opt_num(L, 5, "max_grad_norm", 0);
    int n;
    mt_batch *mb;
    if (luaL_testudata(L, 4, BATCH_MT)) {
        n = 1;
        mb = bind_scratch(L, sizeof *mb);
        mb[0] = bind_batch_view(lua_touserdata(L, 4));
    } else {
        luaL_checktype(L, 4, LUA_TTABLE);
        n = (int)lua_rawlen(L, 4);
        if (n < 1) return luaL_error(L, "train_step: no batches");
        mb = bind_scratch(L, (size_t)n * sizeof *mb);
        for (int i = 0; i < n; i++) {
            lua_rawgeti(L, 4, i + 1);
            lbatch *x = luaL_testudata(L, -1, BATCH_MT);
            if (!x) return luaL_error(L, "train_step: batches[%d] is not a Batch", i + 1);
            mb[i] = bind_batch_view(x);
            lua_pop(L, 1); /* the batches table keeps it */
        }
    }
    mt_step_result res;
    mt_error err = {0};
    if (mt_train_step(u->m, loss, opt, mb, n, lr, (int64_t)step, clip, &res, &err)) return bind_raise(L, &err);
    lua_createtable(L, 0, 7);
    bind_set_num(L, "loss", res.loss);
    bind_set_num(L, "grad_norm", res.grad_norm);
    bind_set_num(L, "lr", res.lr);
    bind_set_int(L, "tokens", res.n_tokens);
    bind_set_bool(L, "skipped", res.skipped);
    bind_set_int(L, "int8", res.int8);
    push_metrics(L, res.n_metrics, res.metric_names, res.metrics);
    return 1;
}

/* mt.evaluate(model, examples, {batch=, seq_len=, loss=, int8=}) (defaults: the model's
 * plan; with a loss plugin, its loss and metrics, item-weighted: preference pairs need
 * one; int8 = true: the frozen base through int8 training's forward, mt_evaluate) */
static int l_evaluate(lua_State *L) {
    lmodel *u = bind_check_model(L, 1);
    lexamples *e = bind_check_examples(L, 2);
    bind_check_opts(L, 3);
    int B = (int)bind_opt_int_in(L, 3, "batch", u->m->plan_B, &MT_LIMIT_BATCH);
    int T = (int)bind_opt_int_in(L, 3, "seq_len", u->m->plan_T, &MT_LIMIT_SEQ_LEN);
    mt_plugin_instance *loss = NULL;
    if (bind_opt_field(L, 3, "loss") != LUA_TNIL) loss = check_kind(L, lua_gettop(L), MT_PLUGIN_LOSS, "evaluate");
    lua_pop(L, 1); /* the loss stays referenced by the options table */
    const int int8 = bind_opt_bool(L, 3, "int8", 0);
    mt_eval_result r;
    mt_error err = {0};
    mt_status st = loss ? mt_evaluate_loss(u->m, loss, &e->set, B, T, int8, &r, &err)
                        : mt_evaluate(u->m, &e->set, B, T, int8, &r, &err);
    if (st) return bind_raise(L, &err);
    lua_createtable(L, 0, 8);
    bind_set_num(L, "loss", r.loss);
    bind_set_num(L, "perplexity", r.perplexity);
    bind_set_int(L, "tokens", r.tokens);
    bind_set_int(L, "examples", r.examples);
    bind_set_num(L, "seconds", r.seconds);
    bind_set_num(L, "tokens_per_second", r.tokens_per_second);
    bind_set_int(L, "int8", r.int8);
    if (loss) push_metrics(L, r.n_metrics, r.metric_names, r.metrics);
    return 1;
}

/* mt.reference_logps(model, examples, {batch=, seq_len=, share_prefix=}) -> shared:
 * every sequence's log-probability of its reply under the model as it is now, kept with
 * the examples as the reference of preference training (computed once, before it);
 * returns how many rejected replies were scored from their chosen row's forward
 * (share_prefix, default true: mt_examples_ref_logps). */
static int l_reference_logps(lua_State *L) {
    lmodel *u = bind_check_model(L, 1);
    lexamples *e = bind_check_examples(L, 2);
    bind_check_opts(L, 3);
    int B = (int)bind_opt_int_in(L, 3, "batch", u->m->plan_B, &MT_LIMIT_BATCH);
    int T = (int)bind_opt_int_in(L, 3, "seq_len", u->m->plan_T, &MT_LIMIT_SEQ_LEN);
    const int share_prefix = bind_opt_bool(L, 3, "share_prefix", 1);
    int64_t shared = 0;
    mt_error err = {0};
    if (mt_examples_ref_logps(u->m, &e->set, B, T, share_prefix, &shared, &err))
        return bind_raise(L, &err);
    lua_pushinteger(L, (lua_Integer)shared);
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
    lmodel *u = bind_check_model(L, 2);
    mt_plugin_instance *opt = opt_optimizer(L, 3);
    luaL_checktype(L, 4, LUA_TTABLE);
    mt_ckpt_state *s = bind_scratch(L, sizeof *s);
    mt_plugin_instance *loss = NULL; /* the loss among state.plugins: its state is saved too */
    mt_error err = {0};
    s->step = bind_opt_int(L, 4, "step", 0);
    s->epoch = bind_opt_int(L, 4, "epoch", 0);
    s->lr = bind_opt_num(L, 4, "lr", 0);
    s->total_steps = bind_opt_int(L, 4, "total_steps", 0);
    s->sched_step = bind_opt_int(L, 4, "sched_step", s->step);
    size_t rlen = 0;
    const char *recipe = bind_opt_str(L, 4, "recipe", NULL);
    if (recipe) {
        lua_getfield(L, 4, "recipe");
        recipe = lua_tolstring(L, -1, &rlen); /* held by the state table */
        lua_pop(L, 1);
    }
    s->recipe = recipe;
    s->recipe_len = rlen;
    if (bind_opt_field(L, 4, "cursor") == LUA_TTABLE) {
        int c = lua_gettop(L);
        s->cursor.epoch = (uint64_t)bind_opt_int(L, c, "epoch", 0);
        s->cursor.position = (uint64_t)bind_opt_int(L, c, "position", 0);
    }
    lua_pop(L, 1);
    if (bind_opt_field(L, 4, "rng") == LUA_TTABLE) {
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
    if (bind_opt_field(L, 4, "metrics") == LUA_TTABLE) {
        lua_pushnil(L);
        while (lua_next(L, -2)) {
            if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TNUMBER)
                return luaL_error(L, "checkpoint state: metrics must map names to numbers");
            if (mt_ckpt_state_set_metric(s, lua_tostring(L, -2), lua_tonumber(L, -1), &err)) return bind_raise(L, &err);
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
    if (bind_opt_field(L, 4, "plugins") == LUA_TTABLE) {
        int n = (int)lua_rawlen(L, -1);
        for (int i = 0; i < n; i++) {
            lua_rawgeti(L, -1, i + 1);
            lplugin *p = luaL_testudata(L, -1, PLUGIN_MT);
            if (!p || !p->inst) return luaL_error(L, "checkpoint state: plugins[%d] is not an open Plugin", i + 1);
            if (mt_ckpt_state_add_plugin(s, p->inst, &err)) return bind_raise(L, &err);
            if (p->inst->desc->kind == MT_PLUGIN_LOSS && !loss) loss = p->inst;
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
    /* the model's adapter, whether the recipe listed it or not: `moontune export`
     * rebuilds it from the name and options recorded */
    for (int i = 0; i < u->n_adapters; i++)
        if (u->adapters[i]->inst && mt_ckpt_state_add_plugin(s, u->adapters[i]->inst, &err))
            return bind_raise(L, &err);
    /* run: the settings a resume compares; trainer: the workflow's own state. Any
     * JSON-able tables (their text is held on the stack). */
    if (bind_opt_field(L, 4, "run") == LUA_TTABLE) s->run = mt_lua_json_encode(L, -1);
    else if (!lua_isnil(L, -1)) return luaL_error(L, "checkpoint state: run must be a table");
    if (bind_opt_field(L, 4, "trainer") == LUA_TTABLE) s->trainer = mt_lua_json_encode(L, -1);
    else if (!lua_isnil(L, -1)) return luaL_error(L, "checkpoint state: trainer must be a table");
    char *path = NULL;
    if (mt_checkpoint_save(run_dir, u->m, opt, loss, s, &path, &err)) return bind_raise(L, &err);
    lua_pushstring(L, path);
    free(path);
    return 1;
}

/* mt.checkpoint_load(path, model, optimizer[, loss]) -> state */
static int decode_object(lua_State *L) {
    const char *text = lua_touserdata(L, 1);
    const char *field = lua_touserdata(L, 2);
    lua_pushfstring(L, "checkpoint state.json %s", field);
    mt_lua_json_decode(L, text, strlen(text), lua_tostring(L, -1));
    return 1;
}

static int l_checkpoint_load(lua_State *L) {
    const char *dir = luaL_checkstring(L, 1);
    mt_sandbox_check_path(L, dir, 0, "checkpoint_load");
    lmodel *u = lua_isnoneornil(L, 2) ? NULL : bind_check_model(L, 2);
    mt_plugin_instance *opt = opt_optimizer(L, 3);
    mt_plugin_instance *loss =
        lua_isnoneornil(L, 4) ? NULL : check_kind(L, 4, MT_PLUGIN_LOSS, "checkpoint_load");
    mt_ckpt_state s;
    memset(&s, 0, sizeof s);
    mt_error err = {0};
    if (mt_checkpoint_load(dir, u ? u->m : NULL, opt, loss, &s, &err)) {
        mt_ckpt_state_clear(&s);
        return bind_raise(L, &err);
    }
    if (!lua_checkstack(L, 8)) {
        mt_ckpt_state_clear(&s);
        return luaL_error(L, "out of Lua stack");
    }
    lua_createtable(L, 0, 12);
    bind_set_int(L, "step", s.step);
    bind_set_int(L, "epoch", s.epoch);
    bind_set_int(L, "sched_step", s.sched_step);
    bind_set_int(L, "total_steps", s.total_steps);
    bind_set_num(L, "lr", s.lr);
    lua_createtable(L, 0, 2);
    bind_set_int(L, "epoch", (lua_Integer)s.cursor.epoch);
    bind_set_int(L, "position", (lua_Integer)s.cursor.position);
    lua_setfield(L, -2, "cursor");
    lua_createtable(L, s.n_rng, 0);
    for (int i = 0; i < s.n_rng; i++) {
        lua_pushinteger(L, (lua_Integer)s.rng[i]);
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "rng");
    lua_createtable(L, 0, s.n_metrics);
    for (int i = 0; i < s.n_metrics; i++) bind_set_num(L, s.metrics[i].name, s.metrics[i].value);
    lua_setfield(L, -2, "metrics");
    lua_pushlstring(L, s.recipe ? s.recipe : "", s.recipe ? s.recipe_len : 0);
    lua_setfield(L, -2, "recipe");
    bind_set_str(L, "recipe_sha256", s.recipe_sha256);
    lua_createtable(L, s.n_plugins, 0);
    for (int i = 0; i < s.n_plugins; i++) {
        lua_createtable(L, 0, 3);
        bind_set_str(L, "kind", s.plugins[i].kind);
        bind_set_str(L, "name", s.plugins[i].name);
        bind_set_str(L, "version", s.plugins[i].version);
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "plugins");
    bind_set_str(L, "path", dir);
    if (s.model_fingerprint[0]) bind_set_str(L, "model_fingerprint", s.model_fingerprint);
    const char *const objects[][2] = {{"run", s.run}, {"trainer", s.trainer}};
    for (size_t i = 0; i < sizeof objects / sizeof objects[0]; i++) {
        if (!objects[i][1]) continue;
        /* a protected decode: the state's allocations must be freed either way */
        lua_pushcfunction(L, decode_object);
        lua_pushlightuserdata(L, (void *)objects[i][1]);
        lua_pushlightuserdata(L, (void *)objects[i][0]);
        int rc = lua_pcall(L, 2, 1, 0);
        if (rc != LUA_OK) {
            mt_ckpt_state_clear(&s);
            return lua_error(L);
        }
        lua_setfield(L, -2, objects[i][0]);
    }
    mt_ckpt_state_clear(&s);
    return 1;
}

static int l_checkpoint_latest(lua_State *L) {
    const char *run_dir = luaL_checkstring(L, 1);
    mt_sandbox_check_path(L, run_dir, 0, "checkpoint_latest");
    char *path = NULL;
    mt_error err = {0};
    if (mt_checkpoint_latest(run_dir, &path, &err)) return bind_raise(L, &err);
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
    if (mt_checkpoint_prune(run_dir, keep, (int64_t)best, &deleted, &err)) return bind_raise(L, &err);
    lua_pushinteger(L, deleted);
    return 1;
}

/* ---- registration ---- */

static const luaL_Reg functions[] = {
    {"train_step", l_train_step},
    {"evaluate", l_evaluate},
    {"reference_logps", l_reference_logps},
    {"schedule", l_schedule},
    {"checkpoint_save", l_checkpoint_save},
    {"checkpoint_load", l_checkpoint_load},
    {"checkpoint_latest", l_checkpoint_latest},
    {"checkpoint_prune", l_checkpoint_prune},
    {NULL, NULL},
};

void mt_bind_train_open(lua_State *L) {
    luaL_setfuncs(L, functions, 0);
}
