/* test_trainer_lua.c — lua/moontune/trainer.lua and plot.lua against a fake `moontune`
 * module (tests/lua/trainer_fake.lua): early stopping, callbacks and control, the NaN
 * guard, resume, metrics.jsonl and loss.svg. Each script runs in a fresh state from
 * mt_lua_open with OUT_DIR set to a temporary directory; any Lua error fails the test
 * with its traceback. moontune.core is preloaded only for its JSON encoder, which the
 * fake hands the trainer. */
#include "testutil.h"

#include <stdio.h>
#include <stdlib.h>

#include <lauxlib.h>
#include <lua.h>

#include "lua/bindings.h"
#include "lua/lua_state.h"

#ifndef MT_FIXTURE_DIR
#define MT_FIXTURE_DIR "tests/fixtures"
#endif
#define MT_TEST_LUA_DIR MT_FIXTURE_DIR "/../lua"

static void run_script(const char *name) {
    mt_error err = {0};
    lua_State *L = mt_lua_open(&err);
    if (!L) fail_msg("mt_lua_open: %s", err.msg);
    mt_lua_register(L);
    char *dir = mt_test_tmpdir("trainer_lua");
    assert_non_null(dir);

    /* package.path also finds the fake in tests/lua */
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    lua_pushfstring(L, "%s/?.lua;%s", MT_TEST_LUA_DIR, lua_tostring(L, -1));
    lua_setfield(L, -3, "path");
    lua_pop(L, 2);
    lua_pushstring(L, dir);
    lua_setglobal(L, "OUT_DIR");

    char path[4096];
    snprintf(path, sizeof path, "%s/%s", MT_TEST_LUA_DIR, name);
    if (luaL_loadfile(L, path) != LUA_OK) {
        const char *msg = lua_tostring(L, -1);
        print_error("%s\n", msg ? msg : "(no message)");
        lua_close(L);
        mt_test_rmtree(dir);
        free(dir);
        fail_msg("cannot load %s", path);
    }
    mt_status st = mt_lua_pcall(L, 0, 0, &err);
    lua_close(L);
    mt_test_rmtree(dir);
    free(dir);
    if (st != MT_OK) {
        print_error("%s\n", err.msg);
        fail_msg("%s failed", name);
    }
}

static void test_early_stopping(void **state) { (void)state; run_script("trainer_early_stopping.lua"); }
static void test_callbacks(void **state) { (void)state; run_script("trainer_callbacks.lua"); }
static void test_nan_guard(void **state) { (void)state; run_script("trainer_nan_guard.lua"); }
static void test_resume(void **state) { (void)state; run_script("trainer_resume.lua"); }
static void test_logging(void **state) { (void)state; run_script("trainer_logging.lua"); }
static void test_general(void **state) { (void)state; run_script("trainer_general.lua"); }
static void test_checks(void **state) { (void)state; run_script("checks.lua"); }
static void test_loss_metrics(void **state) { (void)state; run_script("trainer_metrics.lua"); }
/* TensorBoard events beside metrics.jsonl, fresh and resumed; no \r in a log file */
static void test_tensorboard(void **state) { (void)state; run_script("trainer_tensorboard.lua"); }

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_early_stopping),
        cmocka_unit_test(test_callbacks),
        cmocka_unit_test(test_nan_guard),
        cmocka_unit_test(test_resume),
        cmocka_unit_test(test_logging),
        cmocka_unit_test(test_general),
        cmocka_unit_test(test_checks),
        cmocka_unit_test(test_loss_metrics),
        cmocka_unit_test(test_tensorboard),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
