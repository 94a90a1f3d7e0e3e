/* test_lua_api.c — the moontune Lua library (core/lua/bindings.c) end to end: each
 * test runs one script of tests/lua/ in a state from mt_lua_open + mt_lua_register,
 * with the globals FIXTURE_DIR, BUILD_DIR, ROOT (the source tree), TMP (a fresh
 * directory) and SMOLLM2_GGUF (when the model is cached). A script fails by raising an error; the test prints it with its traceback. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "lua/lua_state.h"
#include "lua/bindings.h"
#include "testutil.h"

#define LUA_TEST_DIR MT_FIXTURE_DIR "/../lua"

static void run_script(const char *name) {
    mt_error err = {0};
    lua_State *L = mt_lua_open(&err);
    if (!L) fail_msg("mt_lua_open: %s", err.msg);
    mt_lua_register(L);
    const char *gguf = mt_test_smollm2_gguf();
    if (gguf) {
        lua_pushstring(L, gguf);
        lua_setglobal(L, "SMOLLM2_GGUF");
    }
    char *tmp = mt_test_tmpdir("lua_api");
    lua_pushstring(L, MT_FIXTURE_DIR);
    lua_setglobal(L, "FIXTURE_DIR");
    lua_pushstring(L, MT_BUILD_DIR);
    lua_setglobal(L, "BUILD_DIR");
    lua_pushstring(L, MT_FIXTURE_DIR "/../..");
    lua_setglobal(L, "ROOT");
    lua_pushstring(L, tmp);
    lua_setglobal(L, "TMP");
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", LUA_TEST_DIR, name);
    int failed = 0;
    char msg[4096] = "";
    if (luaL_loadfile(L, path) != LUA_OK) {
        snprintf(msg, sizeof msg, "%s", lua_tostring(L, -1));
        failed = 1;
    } else if (mt_lua_pcall(L, 0, 1, &err)) {
        snprintf(msg, sizeof msg, "%s", err.msg);
        failed = 1;
    } else if (!lua_isstring(L, -1) || strcmp(lua_tostring(L, -1), "ok")) {
        snprintf(msg, sizeof msg, "%s did not return \"ok\"", name);
        failed = 1;
    }
    lua_close(L); /* every object left to the collector is freed here (ASan checks) */
    mt_test_rmtree(tmp);
    free(tmp);
    if (failed) fail_msg("%s", msg);
}

static void test_train_end_to_end(void **state) {
    (void)state;
    run_script("train.lua");
}

static void test_errors_and_close(void **state) {
    (void)state;
    run_script("errors.lua");
}

static void test_tokenizer_and_data(void **state) {
    (void)state;
    run_script("tokenizer.lua");
}

static void test_records_tasks_exports(void **state) {
    (void)state;
    run_script("export.lua");
}

static void test_preference_pairs(void **state) {
    (void)state;
    run_script("preference.lua");
}

static void test_data_files_and_mixtures(void **state) {
    (void)state;
    /* the example cache goes to a fresh directory of this test */
    char *dir = mt_test_tmpdir("example_cache");
    setenv("MOONTUNE_CACHE_DIR", dir, 1);
    run_script("data_files.lua");
    unsetenv("MOONTUNE_CACHE_DIR");
    mt_test_rmtree(dir);
    free(dir);
}

static void test_numbers(void **state) {
    (void)state;
    run_script("numbers.lua");
}

/* mt.generate's ids and log-probabilities, and mt.rl_batch (GRPO's batches) */
static void test_rollout_batches(void **state) {
    (void)state;
    run_script("rl_batch.lua");
}

static void test_generate_smollm2(void **state) {
    (void)state;
    if (!mt_test_smollm2_gguf()) {
        print_message("skipped: no SmolLM2 GGUF (set MOONTUNE_SMOLLM2_GGUF)\n");
        skip();
    }
    run_script("generate.lua");
}

/* moontune.core opens on its own too, and the preload entry is what require finds */
static void test_preload(void **state) {
    (void)state;
    mt_error err = {0};
    lua_State *L = mt_lua_open(&err);
    assert_non_null(L);
    mt_lua_register(L);
    const char *code = "local mt = require('moontune'); "
                       "assert(type(mt.model) == 'function' and type(mt.chat) == 'table'); "
                       "assert(mt.trainer == nil or type(mt.trainer) == 'table'); "
                       "assert(require('moontune.core').sha256 == mt.sha256)";
    assert_int_equal(luaL_loadstring(L, code), LUA_OK);
    if (mt_lua_pcall(L, 0, 0, &err)) fail_msg("%s", err.msg);
    lua_close(L);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_preload),
        cmocka_unit_test(test_errors_and_close),
        cmocka_unit_test(test_tokenizer_and_data),
        cmocka_unit_test(test_train_end_to_end),
        cmocka_unit_test(test_records_tasks_exports),
        cmocka_unit_test(test_generate_smollm2),
        cmocka_unit_test(test_rollout_batches),
        cmocka_unit_test(test_numbers),
        cmocka_unit_test(test_data_files_and_mixtures),
        cmocka_unit_test(test_preference_pairs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
