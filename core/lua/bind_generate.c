/* bind_generate.c — mt.generate: batched generation from Lua. */
#include "lua/bind_internal.h"

#include <string.h>

#include "model/generate.h"
#include "lua/chat_render.h"

/* Pushes the chat template opts.template names (a name, default "auto", or a
 * function) and returns its index; 0 for template = "none" (the raw prompt), where a
 * system message is refused. */
static int generate_template(lua_State *L, ltok *t, int opts, const char *system) {
    int tt = bind_opt_field(L, opts, "template"); /* stays on the stack */
    if (tt == LUA_TSTRING && !strcmp(lua_tostring(L, -1), "none")) {
        if (system) return luaL_error(L, "option 'system' needs a chat template");
        return 0;
    }
    if (tt != LUA_TFUNCTION && tt != LUA_TNIL && tt != LUA_TSTRING)
        return luaL_error(L, "option 'template': expected a name, a function or \"none\"");
    mt_error err = {0};
    if (tt == LUA_TFUNCTION) lua_pushvalue(L, -1);
    else if (mt_chat_template_push(L, t->tok, tt == LUA_TSTRING ? lua_tostring(L, -1) : "auto", NULL, &err))
        return bind_raise(L, &err);
    return lua_gettop(L);
}

/* The ids of the prompt text at index `prompt`: rendered as the user message (after
 * the system message, when not NULL) by the template function at index fn, or raw
 * when fn is 0; in bind_scratch memory left on the stack. */
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
            bind_set_str(L, "role", "system");
            bind_set_str(L, "content", system);
            lua_rawseti(L, -2, ++n);
        }
        lua_createtable(L, 0, 2);
        bind_set_str(L, "role", "user");
        lua_pushlstring(L, text, plen);
        lua_setfield(L, -2, "content");
        lua_rawseti(L, -2, ++n);
        lua_createtable(L, 0, 3);
        bind_set_bool(L, "add_generation_prompt", 1);
        int32_t bos = mt_tokenizer_bos(t->tok), eos = mt_tokenizer_eos(t->tok);
        if (bos >= 0) bind_set_str(L, "bos", mt_tokenizer_token_text(t->tok, bos));
        if (eos >= 0) bind_set_str(L, "eos", mt_tokenizer_token_text(t->tok, eos));
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
        bind_raise(L, &err);
        return NULL;
    }
    int32_t *out = bind_scratch(L, ids.n * sizeof *out);
    if (ids.n) memcpy(out, ids.ids, ids.n * sizeof *out);
    *n_ids = (int)ids.n;
    mt_token_list_free(&ids);
    if (fn) lua_remove(L, top + 1); /* the rendered text */
    return out;
}

/* Sets field `key` of the table on top to the list ids (n). */
static void set_id_list(lua_State *L, const char *key, const int32_t *ids, int n) {
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        lua_pushinteger(L, ids[i]);
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, key);
}

/* Pushes a generation's text and info table; with prompt_ids (not NULL), the info also
 * holds the token ids (prompt_ids, ids) and each generated id's log-probability
 * (logps), for reinforcement learning. */
static void push_generation(lua_State *L, const mt_generation *g, const int32_t *prompt_ids) {
    static const char *const reasons[MT_STOP_REASONS] = {"length", "eos", "stop_string", "callback",
                                                         "context", "mismatch"};
    lua_pushlstring(L, g->text ? g->text : "", g->text ? g->text_len : 0);
    lua_createtable(L, 0, prompt_ids ? 9 : 6);
    bind_set_int(L, "prompt_tokens", g->n_prompt);
    bind_set_int(L, "new_tokens", g->n_ids);
    bind_set_str(L, "reason", (unsigned)g->reason < MT_STOP_REASONS ? reasons[g->reason] : "?");
    bind_set_num(L, "prefill_seconds", g->prefill_seconds);
    bind_set_num(L, "decode_seconds", g->decode_seconds);
    bind_set_int(L, "int8", g->int8);
    if (!prompt_ids) return;
    set_id_list(L, "prompt_ids", prompt_ids, g->n_prompt);
    set_id_list(L, "ids", g->ids, g->n_ids);
    lua_createtable(L, g->n_ids, 0);
    for (int i = 0; i < g->n_ids; i++) {
        lua_pushnumber(L, g->logps[i]);
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "logps");
}

/* mt.generate(model, tok, prompt, {template=, system=, max_new_tokens=, temperature=,
 * top_k=, top_p=, seed=, stop={...}, batch=, ids=, int8=, expect=}) -> text, info
 * int8 (default true, false with ids = true): the projections in int8 where the CPU can
 * (mt_kv_decoder_use_int8); info.int8 says how many were.
 * expect: the text the answer must stay able to equal, surrounding whitespace aside; it
 * ends (info.reason "mismatch") as soon as it cannot (mt_generate_options.expect).
 * mt.generate(model, tok, {prompt, ...}, opts) -> {text, ...}, {info, ...}: decoded
 * together, opts.batch (default 16) sequences at a time; prompt i samples with seed + i - 1;
 * expect is then a list with an entry per prompt, a string or false (no expectation). */
static int l_generate(lua_State *L) {
    lmodel *u = bind_check_model(L, 1);
    ltok *t = bind_check_tok(L, 2);
    const int many = lua_type(L, 3) == LUA_TTABLE;
    if (!many) luaL_checkstring(L, 3);
    bind_check_opts(L, 4);
    const char *system = bind_opt_str(L, 4, "system", NULL);
    mt_generate_options go;
    memset(&go, 0, sizeof go);
    go.max_new_tokens = (int)bind_opt_int_in(L, 4, "max_new_tokens", 256, &MT_LIMIT_MAX_NEW_TOKENS);
    go.sampling.temperature = bind_opt_float_in(L, 4, "temperature", 0, &MT_LIMIT_TEMPERATURE);
    go.sampling.top_k = (int)bind_opt_int_in(L, 4, "top_k", 0, &MT_LIMIT_TOP_K);
    go.sampling.top_p = bind_opt_float_in(L, 4, "top_p", 1, &MT_LIMIT_TOP_P);
    go.sampling.seed = bind_opt_seed(L, 4, "seed", 0);
    go.skip_special = 1;
    const int with_ids = bind_opt_bool(L, 4, "ids", 0);
    /* with ids the log-probabilities are asked for (reinforcement learning): by default
     * they come from the fp32 model, the one training computes */
    go.fp32 = !bind_opt_bool(L, 4, "int8", !with_ids);
    go.logps = with_ids;
    lua_Integer slots = bind_opt_int_in(L, 4, "batch", MT_GENERATE_SLOTS, &MT_LIMIT_GENERATE_SLOTS);
    if (slots < 1) return luaL_error(L, "option 'batch': %I sequences at a time: must be >= 1", slots);
    const char **stops = NULL;
    int n_stops = 0;
    if (bind_opt_field(L, 4, "stop") == LUA_TTABLE)
        stops = bind_string_list(L, -1, "stop", 0, &n_stops); /* the table stays on the stack */
    go.stop_strings = stops;
    go.n_stop_strings = n_stops;
    /* expect: held by the options table while the call runs */
    const int expect_type = bind_opt_field(L, 4, "expect");
    const int expect_at = lua_gettop(L);
    if (expect_type != LUA_TNIL && expect_type != (many ? LUA_TTABLE : LUA_TSTRING))
        return luaL_error(L, "option 'expect': expected %s, found %s",
                          many ? "a list with an entry per prompt" : "a string",
                          luaL_typename(L, expect_at));
    const char *expect_one = expect_type == LUA_TSTRING ? lua_tostring(L, expect_at) : NULL;
    const int fn = generate_template(L, t, 4, system);
    int32_t stop_ids[MT_CHAT_STOP_IDS_MAX];
    int n_stop_ids = mt_chat_stop_ids(t->tok, stop_ids);
    go.stop_ids = stop_ids;
    go.n_stop_ids = n_stop_ids;
    mt_error err = {0};
    if (!many) {
        int n_prompt = 0;
        int32_t *prompt_ids = generate_prompt_ids(L, t, fn, system, 3, &n_prompt);
        go.expect = expect_one ? &expect_one : NULL;
        mt_generation g;
        memset(&g, 0, sizeof g);
        if (mt_generate(u->m, t->tok, prompt_ids, n_prompt, &go, &g, &err)) {
            mt_generation_free(&g);
            return bind_raise(L, &err);
        }
        push_generation(L, &g, with_ids ? prompt_ids : NULL);
        mt_generation_free(&g);
        return 2;
    }
    /* a list of prompts: their ids are anchored in a table, so the stack stays small */
    const int n = (int)lua_rawlen(L, 3), max_pos = u->m->cfg.max_position_embeddings;
    const int32_t **prompts = bind_scratch(L, (size_t)n * sizeof *prompts);
    int *n_prompt = bind_scratch(L, (size_t)n * sizeof *n_prompt);
    mt_generation *out = bind_scratch(L, (size_t)n * sizeof *out);
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
    if (expect_type == LUA_TTABLE) {
        int n_expect = 0;
        go.expect = bind_string_list(L, expect_at, "expect", 1, &n_expect);
        if (n_expect != n)
            return luaL_error(L, "option 'expect': %d entries for %d prompts", n_expect, n);
    }
    if (n > 0 && mt_generate_batch(u->m, t->tok, prompts, n_prompt, n, (int)slots, &go, out, &err))
        return bind_raise(L, &err);
    lua_createtable(L, n, 0);
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        push_generation(L, &out[i], with_ids ? prompts[i] : NULL);
        lua_rawseti(L, -3, i + 1);
        lua_rawseti(L, -3, i + 1);
        mt_generation_free(&out[i]);
    }
    return 2;
}

/* ---- registration ---- */

static const luaL_Reg functions[] = {
    {"generate", l_generate},
    {NULL, NULL},
};

void mt_bind_generate_open(lua_State *L) {
    luaL_setfuncs(L, functions, 0);
}
