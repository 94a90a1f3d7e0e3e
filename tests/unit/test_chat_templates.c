/* test_chat_templates.c — lua/moontune/chat.lua against transformers' renderings
 * (tests/fixtures/chat/reference.json, made by tests/parity/make_chat_reference.py):
 * every case's text byte for byte, every training span (its bytes, its order, and no
 * assistant text left outside the spans), detect() on known and unknown templates,
 * and get() with names, unknown names and a recipe's own function. */
#include "testutil.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#ifndef MT_FIXTURE_DIR
#define MT_FIXTURE_DIR "tests/fixtures"
#endif
/* The Lua standard library of the source tree. */
#ifndef MT_LUA_DIR
#define MT_LUA_DIR MT_FIXTURE_DIR "/../../lua"
#endif

typedef struct {
    lua_State *L;
    json_t *ref;
} chat_fixture;

/* ---- helpers -------------------------------------------------------------- */

/* Pushes a JSON value as the Lua value a recipe would build: objects and arrays
 * become tables (arrays 1-based), null becomes nil. */
static void push_json(lua_State *L, const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        const char *key;
        json_t *item;
        lua_createtable(L, 0, (int)json_object_size(v));
        json_object_foreach((json_t *)v, key, item) {
            push_json(L, item);
            lua_setfield(L, -2, key);
        }
        break;
    }
    case JSON_ARRAY: {
        lua_createtable(L, (int)json_array_size(v), 0);
        for (size_t i = 0; i < json_array_size(v); i++) {
            push_json(L, json_array_get(v, i));
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
        break;
    }
    case JSON_STRING: lua_pushlstring(L, json_string_value(v), json_string_length(v)); break;
    case JSON_INTEGER: lua_pushinteger(L, (lua_Integer)json_integer_value(v)); break;
    case JSON_REAL: lua_pushnumber(L, json_real_value(v)); break;
    case JSON_TRUE: lua_pushboolean(L, 1); break;
    case JSON_FALSE: lua_pushboolean(L, 0); break;
    case JSON_NULL: lua_pushnil(L); break;
    }
}

/* Pushes require("moontune.chat")[field]. */
static void push_chat_field(lua_State *L, const char *field) {
    lua_getglobal(L, "chat");
    lua_getfield(L, -1, field);
    lua_remove(L, -2);
}

static const char *str_field(const json_t *o, const char *key) {
    const json_t *v = json_object_get(o, key);
    assert_true(json_is_string(v));
    return json_string_value(v);
}

/* The end-of-turn marker each family trains on after an answer (see chat.lua). */
static void end_marker(const char *family, const char *eos, char *out, size_t cap) {
    if (!strcmp(family, "chatml") || !strcmp(family, "smollm2") || !strcmp(family, "qwen2"))
        snprintf(out, cap, "<|im_end|>");
    else if (!strcmp(family, "llama3"))
        snprintf(out, cap, "<|eot_id|>");
    else if (!strcmp(family, "llama2"))
        snprintf(out, cap, " %s", eos);
    else
        snprintf(out, cap, "%s", eos);
}

static int is_ws(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

/* [*b, *e) is s without leading and trailing ASCII whitespace. */
static void strip_range(const char *s, size_t n, size_t *b, size_t *e) {
    size_t i = 0, j = n;
    while (i < j && is_ws(s[i])) i++;
    while (j > i && is_ws(s[j - 1])) j--;
    *b = i;
    *e = j;
}

static int memfind(const char *hay, size_t hn, const char *needle, size_t nn) {
    if (nn == 0 || nn > hn) return nn == 0;
    for (size_t i = 0; i + nn <= hn; i++)
        if (memcmp(hay + i, needle, nn) == 0) return 1;
    return 0;
}

static void print_mismatch(const char *what, const char *got, size_t gn, const char *want, size_t wn) {
    size_t i = 0;
    while (i < gn && i < wn && got[i] == want[i]) i++;
    size_t from = i > 20 ? i - 20 : 0;
    fprintf(stderr, "  %s: first difference at byte %zu (got %zu bytes, want %zu)\n", what, i, gn, wn);
    fprintf(stderr, "    got : \"%.*s\"\n", (int)((gn - from) < 60 ? gn - from : 60), got + from);
    fprintf(stderr, "    want: \"%.*s\"\n", (int)((wn - from) < 60 ? wn - from : 60), want + from);
}

/* Runs a Lua chunk that raises on failure. */
static void run_lua(lua_State *L, const char *chunk) {
    if (luaL_dostring(L, chunk) != LUA_OK) {
        fprintf(stderr, "Lua: %s\n", lua_tostring(L, -1));
        fail_msg("Lua check failed");
    }
}

/* ---- setup ---------------------------------------------------------------- */

static int setup(void **state) {
    chat_fixture *fx = calloc(1, sizeof *fx);
    if (!fx) return -1;
    json_error_t err;
    fx->ref = json_load_file(MT_FIXTURE_DIR "/chat/reference.json", 0, &err);
    if (!fx->ref) {
        fprintf(stderr, "%s/chat/reference.json: line %d: %s\n", MT_FIXTURE_DIR, err.line, err.text);
        free(fx);
        return -1;
    }
    fx->L = luaL_newstate();
    luaL_openlibs(fx->L);
    lua_getglobal(fx->L, "package");
    lua_pushstring(fx->L, MT_LUA_DIR "/?.lua");
    lua_setfield(fx->L, -2, "path");
    lua_pop(fx->L, 1);
    if (luaL_dostring(fx->L, "chat = require('moontune.chat')") != LUA_OK) {
        fprintf(stderr, "require('moontune.chat'): %s\n", lua_tostring(fx->L, -1));
        lua_close(fx->L);
        json_decref(fx->ref);
        free(fx);
        return -1;
    }
    *state = fx;
    return 0;
}

static int teardown(void **state) {
    chat_fixture *fx = *state;
    lua_close(fx->L);
    json_decref(fx->ref);
    free(fx);
    return 0;
}

/* ---- rendering and spans -------------------------------------------------- */

/* Checks one case; returns the number of problems found (each printed). */
static int check_case(lua_State *L, const json_t *c) {
    const char *family = str_field(c, "family"), *variant = str_field(c, "variant");
    const json_t *messages = json_object_get(c, "messages"), *options = json_object_get(c, "options");
    const json_t *want = json_object_get(c, "text"), *span_texts = json_object_get(c, "span_texts");
    int problems = 0;
    int top = lua_gettop(L);

    push_chat_field(L, "get");
    lua_pushstring(L, family);
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
        fprintf(stderr, "%s/%s: get: %s\n", family, variant, lua_tostring(L, -1));
        lua_settop(L, top);
        return 1;
    }
    push_json(L, messages);
    push_json(L, options);
    if (lua_pcall(L, 2, 2, 0) != LUA_OK) {
        fprintf(stderr, "%s/%s: render: %s\n", family, variant, lua_tostring(L, -1));
        lua_settop(L, top);
        return 1;
    }
    size_t n = 0;
    const char *text = lua_tolstring(L, -2, &n);
    if (!text || !lua_istable(L, -1)) {
        fprintf(stderr, "%s/%s: render did not return (string, table)\n", family, variant);
        lua_settop(L, top);
        return 1;
    }
    const char *wtext = json_string_value(want);
    size_t wn = json_string_length(want);
    if (n != wn || memcmp(text, wtext, n) != 0) {
        fprintf(stderr, "%s/%s: text differs from transformers'\n", family, variant);
        print_mismatch("text", text, n, wtext, wn);
        problems++;
    }

    /* The assistant messages, in order, with the bytes each span must hold. */
    const char *eos = json_string_value(json_object_get(options, "eos"));
    char marker[64];
    end_marker(family, eos ? eos : "", marker, sizeof marker);
    size_t nspans = (size_t)luaL_len(L, -1);
    size_t nassist = 0;
    for (size_t i = 0; i < json_array_size(messages); i++)
        if (!strcmp(str_field(json_array_get(messages, i), "role"), "assistant")) nassist++;
    if (nspans != nassist || nspans != json_array_size(span_texts)) {
        fprintf(stderr, "%s/%s: %zu spans for %zu assistant messages (%zu expected span texts)\n",
                family, variant, nspans, nassist, json_array_size(span_texts));
        lua_settop(L, top);
        return problems + 1;
    }

    /* outside: text with every span blanked to \x01, so no match can run across one. */
    char *outside = malloc(n + 1);
    assert_non_null(outside);
    memcpy(outside, text, n);
    lua_Integer prev_stop = 0;
    size_t k = 0;
    for (size_t i = 0; i < json_array_size(messages); i++) {
        const json_t *m = json_array_get(messages, i);
        if (strcmp(str_field(m, "role"), "assistant") != 0) continue;
        lua_rawgeti(L, -1, (lua_Integer)k + 1);
        lua_rawgeti(L, -1, 1);
        lua_rawgeti(L, -2, 2);
        int ok1 = 0, ok2 = 0;
        lua_Integer start = lua_tointegerx(L, -2, &ok1), stop = lua_tointegerx(L, -1, &ok2);
        lua_pop(L, 3);
        if (!ok1 || !ok2 || start < prev_stop || stop < start || (size_t)stop > n) {
            fprintf(stderr, "%s/%s: span %zu = {%lld, %lld} is not an in-order range of [%lld, %zu]\n",
                    family, variant, k + 1, (long long)start, (long long)stop, (long long)prev_stop, n);
            problems++;
            k++;
            continue;
        }
        /* Expected bytes: the content as the template writes it + the end marker. */
        const json_t *content = json_object_get(m, "content");
        const char *cs = json_string_value(content);
        size_t cn = json_string_length(content), cb = 0, ce = cn;
        if (!strcmp(family, "llama3") || !strcmp(family, "llama2")) strip_range(cs, cn, &cb, &ce);
        size_t en = (ce - cb) + strlen(marker);
        char *expect = malloc(en + 1);
        assert_non_null(expect);
        memcpy(expect, cs + cb, ce - cb);
        memcpy(expect + (ce - cb), marker, strlen(marker));
        const json_t *st = json_array_get(span_texts, k);
        if (en != json_string_length(st) || memcmp(expect, json_string_value(st), en) != 0) {
            fprintf(stderr, "%s/%s: span %zu: the fixture's span text disagrees with the rule\n",
                    family, variant, k + 1);
            problems++;
        }
        size_t sn = (size_t)(stop - start);
        if (sn != en || memcmp(text + start, expect, en) != 0) {
            fprintf(stderr, "%s/%s: span %zu does not hold content + end marker\n", family, variant, k + 1);
            print_mismatch("span", text + start, sn, expect, en);
            problems++;
        }
        free(expect);
        memset(outside + start, 1, sn);
        prev_stop = stop;
        k++;
    }
    /* No assistant text outside the spans (its whitespace-stripped core). */
    for (size_t i = 0; i < json_array_size(messages); i++) {
        const json_t *m = json_array_get(messages, i);
        if (strcmp(str_field(m, "role"), "assistant") != 0) continue;
        const json_t *content = json_object_get(m, "content");
        size_t cb, ce;
        strip_range(json_string_value(content), json_string_length(content), &cb, &ce);
        if (ce > cb && memfind(outside, n, json_string_value(content) + cb, ce - cb)) {
            fprintf(stderr, "%s/%s: assistant text \"%.*s\" appears outside the spans\n", family,
                    variant, (int)(ce - cb), json_string_value(content) + cb);
            problems++;
        }
    }
    free(outside);
    lua_settop(L, top);
    return problems;
}

static void test_render_matches_reference(void **state) {
    chat_fixture *fx = *state;
    const json_t *cases = json_object_get(fx->ref, "cases");
    assert_true(json_array_size(cases) >= 40);
    int problems = 0;
    size_t families_seen = 0;
    const char *last = "";
    for (size_t i = 0; i < json_array_size(cases); i++) {
        const json_t *c = json_array_get(cases, i);
        problems += check_case(fx->L, c);
        if (strcmp(last, str_field(c, "family")) != 0) families_seen++;
        last = str_field(c, "family");
    }
    assert_int_equal(families_seen, 8);
    if (problems) fail_msg("%d problem(s) in %zu cases", problems, json_array_size(cases));
}

/* ---- detect() ------------------------------------------------------------- */

static void test_detect_known(void **state) {
    chat_fixture *fx = *state;
    const json_t *known = json_object_get(json_object_get(fx->ref, "templates"), "known");
    assert_true(json_array_size(known) >= 8);
    for (size_t i = 0; i < json_array_size(known); i++) {
        const json_t *t = json_array_get(known, i);
        push_chat_field(fx->L, "detect");
        push_json(fx->L, json_object_get(t, "template"));
        assert_int_equal(lua_pcall(fx->L, 1, 2, 0), LUA_OK);
        const char *got = lua_tostring(fx->L, -2);
        if (!got || strcmp(got, str_field(t, "family")) != 0)
            fail_msg("detect(%s template from %s) = %s (%s)", str_field(t, "family"), str_field(t, "source"),
                     got ? got : "nil", lua_tostring(fx->L, -1) ? lua_tostring(fx->L, -1) : "");
        lua_pop(fx->L, 2);
    }
}

static void test_detect_refuses_unknown(void **state) {
    chat_fixture *fx = *state;
    const json_t *unknown = json_object_get(json_object_get(fx->ref, "templates"), "unknown");
    assert_true(json_array_size(unknown) >= 5);
    for (size_t i = 0; i < json_array_size(unknown); i++) {
        const json_t *t = json_array_get(unknown, i);
        push_chat_field(fx->L, "detect");
        push_json(fx->L, json_object_get(t, "template"));
        assert_int_equal(lua_pcall(fx->L, 1, 2, 0), LUA_OK);
        if (!lua_isnil(fx->L, -2))
            fail_msg("detect(%s) guessed '%s'", str_field(t, "name"), lua_tostring(fx->L, -2));
        const char *why = lua_tostring(fx->L, -1);
        assert_non_null(why);
        /* The message asks the recipe to name a template and lists the known ones. */
        assert_non_null(strstr(why, "name one in the recipe"));
        assert_non_null(strstr(why, "chatml"));
        assert_non_null(strstr(why, "llama3"));
        lua_pop(fx->L, 2);
    }
    /* Not a string at all. */
    run_lua(fx->L, "local n, why = chat.detect(nil); assert(n == nil and why:find('name one'))");
}

/* ---- get() and options ---------------------------------------------------- */

static void test_get_names_and_functions(void **state) {
    chat_fixture *fx = *state;
    run_lua(fx->L,
            "for _, name in ipairs(chat.names) do\n"
            "  assert(type(chat.get(name)) == 'function', name)\n"
            "  assert(chat.get(name) == chat.templates[name], name)\n"
            "end\n"
            /* A recipe's own template: returned unchanged and usable. */
            "local mine = function(messages, opts)\n"
            "  local text, spans = chat.chatml(messages, { default_system = 'Be brief.' })\n"
            "  return text, spans\n"
            "end\n"
            "assert(chat.get(mine) == mine)\n"
            "local text, spans = chat.get(mine)({ {role='user', content='hi'}, {role='assistant', content='yo'} })\n"
            "assert(text == '<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>user\\nhi<|im_end|>\\n'\n"
            "  .. '<|im_start|>assistant\\nyo<|im_end|>\\n', text)\n"
            "assert(#spans == 1 and text:sub(spans[1][1] + 1, spans[1][2]) == 'yo<|im_end|>')\n");
}

static void test_get_unknown_name_lists_known(void **state) {
    chat_fixture *fx = *state;
    push_chat_field(fx->L, "get");
    lua_pushstring(fx->L, "vicuna");
    assert_int_not_equal(lua_pcall(fx->L, 1, 1, 0), LUA_OK);
    const char *msg = lua_tostring(fx->L, -1);
    assert_non_null(msg);
    assert_non_null(strstr(msg, "'vicuna'"));
    static const char *const names[] = { "chatml", "smollm2", "qwen2", "llama3", "llama2",
                                         "mistral", "mistral_legacy", "alpaca" };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (!strstr(msg, names[i])) fail_msg("error \"%s\" does not list '%s'", msg, names[i]);
    lua_pop(fx->L, 1);
    /* Neither a name nor a function. */
    run_lua(fx->L, "local ok, err = pcall(chat.get, 42); assert(not ok and err:find('known templates'))");
}

static void test_options_and_refusals(void **state) {
    chat_fixture *fx = *state;
    run_lua(fx->L,
            "local conv = { {role='user', content='q'}, {role='assistant', content='a'} }\n"
            /* default_system = false switches SmolLM2's default off; a string replaces it. */
            "assert(chat.smollm2(conv, { default_system = false }) == chat.chatml(conv))\n"
            "assert(chat.qwen2(conv, { default_system = 'S' }):sub(1, 30) == '<|im_start|>system\\nS<|im_end|>')\n"
            /* No messages: no default system turn (the reference loops over nothing). */
            "assert(chat.smollm2({}) == '')\n"
            "assert(chat.smollm2({}, { add_generation_prompt = true }) == '<|im_start|>assistant\\n')\n"
            /* bos/eos options. */
            "local t = chat.llama2(conv, { bos = '<B>', eos = '<E>' })\n"
            "assert(t == '<B>[INST] q [/INST] a <E>', t)\n"
            "local t2, s2 = chat.alpaca(conv, { eos = '<|endoftext|>' })\n"
            "assert(t2:sub(s2[1][1] + 1, s2[1][2]) == 'a<|endoftext|>')\n"
            /* Refusals the reference templates also make. */
            "assert(not pcall(chat.mistral_legacy, { {role='system', content='s'}, conv[1] }))\n"
            "local ok, err = pcall(chat.llama2, { conv[1], conv[1] })\n"
            "assert(not ok and err:find('alternate'), err)\n"
            "assert(not pcall(chat.mistral, { conv[2] }))\n"
            "assert(not pcall(chat.chatml, { {role='user'} }))\n"
            "assert(not pcall(chat.chatml, 'not a table'))\n");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_render_matches_reference),
        cmocka_unit_test(test_detect_known),
        cmocka_unit_test(test_detect_refuses_unknown),
        cmocka_unit_test(test_get_names_and_functions),
        cmocka_unit_test(test_get_unknown_name_lists_known),
        cmocka_unit_test(test_options_and_refusals),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
