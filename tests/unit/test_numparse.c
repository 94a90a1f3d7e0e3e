/* test_numparse.c — the shared number parser (core/base/numparse.c) and the commands that
 * use it: every value the issue found cut to 32 bits or unchecked is refused, with the
 * option, the text and the accepted range in the message. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include <lauxlib.h>
#include <lualib.h>

#include "lua/recipe_overrides.h"
#include "base/numparse.h"
#include "testutil.h"

static void expect_int(const char *text, const mt_int_limit *lim, int64_t want) {
    int64_t v = -12345;
    mt_error err = {0};
    if (mt_parse_int("--x", text, lim, &v, &err)) fail_msg("'%s' refused: %s", text, err.msg);
    assert_int_equal(v, want);
}

static void expect_int_refused(const char *text, const mt_int_limit *lim, const char *part) {
    int64_t v = 77;
    mt_error err = {0};
    assert_int_not_equal(mt_parse_int("--x", text, lim, &v, &err), MT_OK);
    assert_int_equal(v, 77); /* untouched */
    if (!strstr(err.msg, part)) fail_msg("'%s': message '%s' lacks '%s'", text, err.msg, part);
    assert_non_null(strstr(err.msg, "--x"));
}

static void test_integers(void **state) {
    (void)state;
    const mt_int_limit *seq = &MT_LIMIT_SEQ_LEN;
    expect_int("2", seq, 2);
    expect_int("1048576", seq, 1048576);
    expect_int("0512", seq, 512); /* decimal, not octal */
    expect_int_refused("1", seq, "out of range (expected an integer from 2 to 1048576)");
    expect_int_refused("1048577", seq, "out of range");
    expect_int_refused("4294967298", seq, "'4294967298' is out of range"); /* was 2 */
    expect_int_refused("4294967297", &MT_LIMIT_BATCH, "out of range");    /* was 1 */
    expect_int_refused("4294967296", &MT_LIMIT_MAX_NEW_TOKENS, "out of range"); /* was 0 */
    expect_int_refused("4294967296", &MT_LIMIT_TOP_K, "out of range");          /* was 0 */
    expect_int_refused("100000", &MT_LIMIT_THREADS, "from 0 to 1024");
    expect_int_refused("99999999999999999999999", seq, "out of range"); /* ERANGE */
    expect_int_refused("-99999999999999999999999", seq, "out of range");
    expect_int_refused("", seq, "is not an integer");
    expect_int_refused(" 8", seq, "is not an integer");
    expect_int_refused("8 ", seq, "is not an integer");
    expect_int_refused("8x", seq, "is not an integer");
    expect_int_refused("0x10", seq, "is not an integer");
    expect_int_refused("8.0", seq, "is not an integer");
    expect_int_refused("1e3", seq, "is not an integer");
    expect_int_refused(NULL, seq, "is not an integer");
    expect_int("-0", &MT_LIMIT_THREADS, 0);
    expect_int("+7", &MT_LIMIT_THREADS, 7);
}

static void test_reals(void **state) {
    (void)state;
    double v = 0;
    mt_error err = {0};
    assert_int_equal(mt_parse_real("--top-p", "1", &MT_LIMIT_TOP_P, &v, &err), MT_OK);
    assert_true(v == 1.0);
    assert_int_equal(mt_parse_real("--top-p", "1e-9", &MT_LIMIT_TOP_P, &v, &err), MT_OK);
    const char *bad_top_p[] = {"0", "-0", "1.0000001", "5", "nan", "inf", "-inf", "", "0.5x", " 0.5"};
    for (size_t i = 0; i < sizeof bad_top_p / sizeof bad_top_p[0]; i++) {
        v = 42;
        assert_int_not_equal(mt_parse_real("--top-p", bad_top_p[i], &MT_LIMIT_TOP_P, &v, &err), MT_OK);
        assert_true(v == 42);
        assert_non_null(strstr(err.msg, "--top-p"));
        assert_non_null(strstr(err.msg, "> 0 and <= 1"));
    }
    assert_int_not_equal(mt_parse_real("--temperature", "inf", &MT_LIMIT_TEMPERATURE, &v, &err), MT_OK);
    assert_non_null(strstr(err.msg, "'inf' is not finite"));
    assert_int_not_equal(mt_parse_real("--temperature", "1e309", &MT_LIMIT_TEMPERATURE, &v, &err), MT_OK);
    assert_int_equal(mt_parse_real("--temperature", "0", &MT_LIMIT_TEMPERATURE, &v, &err), MT_OK);
    assert_int_not_equal(mt_parse_real("--heldout", "1", &MT_LIMIT_FRACTION, &v, &err), MT_OK);
    assert_non_null(strstr(err.msg, ">= 0 and < 1"));
    assert_int_equal(mt_parse_real("--heldout", "0", &MT_LIMIT_FRACTION, &v, &err), MT_OK);
    /* already numbers (the Lua API) */
    assert_int_not_equal(mt_check_real("option 'top_p'", 5.0, &MT_LIMIT_TOP_P, &err), MT_OK);
    assert_non_null(strstr(err.msg, "option 'top_p': 5 is out of range"));
    assert_int_not_equal(mt_check_real("t", NAN, &MT_LIMIT_TEMPERATURE, &err), MT_OK);
    assert_int_not_equal(mt_check_int("option 'top_k'", -1, &MT_LIMIT_TOP_K, &err), MT_OK);
    assert_int_equal(mt_check_int("option 'top_k'", 0, &MT_LIMIT_TOP_K, &err), MT_OK);
}

/* Values strtod reads but that are not what the user wrote: hex floats, values that
 * round to 0 (as a double or as the float the sampler keeps), and the error text. */
static void test_real_rounding(void **state) {
    (void)state;
    double v = 42;
    float f = 42;
    mt_error err = {0};
    assert_int_not_equal(mt_parse_real("--top-p", "0x1p-1", &MT_LIMIT_TOP_P, &v, &err), MT_OK);
    assert_non_null(strstr(err.msg, "--top-p: '0x1p-1' is not a decimal number"));
    assert_int_not_equal(mt_parse_real("--temperature", "0X10", &MT_LIMIT_TEMPERATURE, &v, &err), MT_OK);
    /* 1e-400 underflows to 0: temperature 0 would silently mean greedy decoding */
    assert_int_not_equal(mt_parse_real("--temperature", "1e-400", &MT_LIMIT_TEMPERATURE, &v, &err), MT_OK);
    assert_non_null(strstr(err.msg, "'1e-400' is out of range"));
    assert_int_not_equal(mt_parse_real("--temperature", "1e309", &MT_LIMIT_TEMPERATURE, &v, &err), MT_OK);
    assert_non_null(strstr(err.msg, "'1e309' is out of range"));
    assert_true(v == 42);
    /* a double inside (0, 1] that is 0 as a float: top_p 0 is what the limit excludes */
    assert_int_not_equal(mt_parse_float_into("--top-p", "1e-50", &MT_LIMIT_TOP_P, &f, &err), MT_OK);
    assert_non_null(strstr(err.msg, "--top-p: '1e-50' is out of range for a 32-bit float"));
    assert_true(f == 42);
    assert_int_not_equal(mt_check_float("option 'top_p'", 1e-50, &MT_LIMIT_TOP_P, &f, &err), MT_OK);
    assert_non_null(strstr(err.msg, "option 'top_p': 1e-50 is out of range for a 32-bit float"));
    assert_int_not_equal(mt_check_float("option 'temperature'", 1e-60, &MT_LIMIT_TEMPERATURE, &f, &err), MT_OK);
    assert_int_equal(mt_parse_float_into("--top-p", "1e-30", &MT_LIMIT_TOP_P, &f, &err), MT_OK);
    assert_true(f > 0);
    assert_int_equal(mt_parse_float_into("--temperature", "-0", &MT_LIMIT_TEMPERATURE, &f, &err), MT_OK);
    assert_true(f == 0);
    assert_int_equal(mt_check_float("t", 0.7, &MT_LIMIT_TEMPERATURE, &f, &err), MT_OK);
    assert_true(f == 0.7f);
    /* the value as written, not 1000.1000000000000227 */
    assert_int_not_equal(mt_check_real("option 'temperature'", 1000.1, &MT_LIMIT_TEMPERATURE, &err), MT_OK);
    assert_non_null(strstr(err.msg, "option 'temperature': 1000.1 is out of range (expected a number >= 0 and <= 1000)"));
    /* but never rounded onto the bound it exceeds */
    assert_int_not_equal(mt_check_real("p", 1.0000000000000002, &MT_LIMIT_TOP_P, &err), MT_OK);
    assert_non_null(strstr(err.msg, "p: 1.0000000000000002 is out of range"));
}

static void test_seeds(void **state) {
    (void)state;
    uint64_t v = 0;
    mt_error err = {0};
    assert_int_equal(mt_parse_u64("--seed", "18446744073709551615", &v, &err), MT_OK);
    assert_true(v == UINT64_MAX);
    assert_int_not_equal(mt_parse_u64("--seed", "18446744073709551616", &v, &err), MT_OK);
    assert_int_not_equal(mt_parse_u64("--seed", "-1", &v, &err), MT_OK); /* strtoull wraps it */
    assert_int_not_equal(mt_parse_u64("--seed", "", &v, &err), MT_OK);
    assert_int_not_equal(mt_parse_u64("--seed", "1x", &v, &err), MT_OK);
    /* already integers (the Lua API): a negative seed is refused, not wrapped */
    assert_int_not_equal(mt_check_seed("option 'seed'", -1, &v, &err), MT_OK);
    assert_non_null(strstr(err.msg, "option 'seed': -1 is out of range (expected an integer from 0 to 18446744073709551615)"));
    assert_int_equal(mt_check_seed("option 'seed'", INT64_MAX, &v, &err), MT_OK);
    assert_true(v == (uint64_t)INT64_MAX);
}

/* --set overrides (core/lua/recipe_overrides.c) read numbers as Lua does, but not the two
 * readings that change the value: a hex integer past 64 bits wraps, 1e400 is inf. */
static void expect_set(const char *set, const char *part) {
    lua_State *L = luaL_newstate();
    assert_non_null(L);
    assert_int_equal(luaL_dostring(L, "return { epochs = 3, lr = 2e-4 }"), LUA_OK);
    const char *sets[] = {set};
    mt_error err = {0};
    mt_status st = mt_config_apply_overrides(L, -1, sets, 1, &err);
    if (part) {
        if (st == MT_OK) fail_msg("--set %s was accepted", set);
        if (!strstr(err.msg, part)) fail_msg("--set %s: '%s' lacks '%s'", set, err.msg, part);
        /* nothing changed */
        lua_getfield(L, -1, "epochs");
        assert_int_equal(lua_tointeger(L, -1), 3);
        lua_pop(L, 1);
    } else if (st != MT_OK) {
        fail_msg("--set %s refused: %s", set, err.msg);
    }
    lua_close(L);
}

static void test_set_overrides(void **state) {
    (void)state;
    expect_set("epochs=0x10000000000000003", "epochs: '0x10000000000000003' is out of range");
    expect_set("epochs=-0x10000000000000003", "is out of range");
    expect_set("epochs=99999999999999999999", "epochs: '99999999999999999999' is out of range "
                                              "(expected an integer from -9223372036854775808 to 9223372036854775807)");
    expect_set("lr=1e400", "lr: '1e400' is out of range (expected a finite number)");
    expect_set("lr=-1e400", "expected a finite number");
    expect_set("epochs=0xffffffffffffffff", NULL); /* 16 digits: Lua's -1, as before */
    expect_set("epochs=00000000000000000000012", NULL);
    expect_set("epochs=0x00000000000000000010", NULL);
    expect_set("epochs=9223372036854775807", NULL);
    expect_set("lr=1e-400", NULL); /* 0: a learning rate of 0 is a value a recipe may mean */
    expect_set("lr=1e308", NULL);
}

/* The commands themselves: each value the issue reported is refused with exit 2 and a
 * message naming the option (never run with a truncated value). */
static void expect_command_refuses(const char *args, const char *part) {
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s/moontune %s 2>&1 >/dev/null", MT_BUILD_DIR, args);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    char out[4096] = "";
    size_t n = fread(out, 1, sizeof out - 1, p);
    out[n] = '\0';
    int status = pclose(p);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 2)
        fail_msg("moontune %s: expected exit 2, got status %d: %s", args, status, out);
    if (!strstr(out, part)) fail_msg("moontune %s: '%s' lacks '%s'", args, out, part);
}

static void test_commands(void **state) {
    (void)state;
    const char *m = MT_FIXTURE_DIR "/tiny_chat", *d = MT_FIXTURE_DIR "/data/tiny_chat_heldout.jsonl";
    char a[1024];
    snprintf(a, sizeof a, "eval --model %s --seq 4294967298 %s", m, d);
    expect_command_refuses(a, "--seq: '4294967298' is out of range");
    snprintf(a, sizeof a, "eval --model %s --batch 4294967297 %s", m, d);
    expect_command_refuses(a, "--batch: '4294967297' is out of range");
    snprintf(a, sizeof a, "eval --model %s --threads 100000 %s", m, d);
    expect_command_refuses(a, "--threads: '100000' is out of range");
    snprintf(a, sizeof a, "generate --model %s --prompt hi --max-new-tokens 4294967296", m);
    expect_command_refuses(a, "--max-new-tokens: '4294967296' is out of range");
    snprintf(a, sizeof a, "generate --model %s --prompt hi --top-k 4294967296", m);
    expect_command_refuses(a, "--top-k: '4294967296' is out of range");
    snprintf(a, sizeof a, "generate --model %s --prompt hi --temperature inf", m);
    expect_command_refuses(a, "--temperature: 'inf' is not finite");
    snprintf(a, sizeof a, "generate --model %s --prompt hi --top-p 5", m);
    expect_command_refuses(a, "--top-p: '5' is out of range");
    snprintf(a, sizeof a, "generate --model %s --prompt hi --top-p 1e-50", m);
    expect_command_refuses(a, "--top-p: '1e-50' is out of range for a 32-bit float");
    snprintf(a, sizeof a, "generate --model %s --prompt hi --temperature 0x1p3", m);
    expect_command_refuses(a, "--temperature: '0x1p3' is not a decimal number");
    snprintf(a, sizeof a, "generate --model %s --prompt hi --threads 100000", m);
    expect_command_refuses(a, "--threads: '100000' is out of range");
    snprintf(a, sizeof a, "generate --model %s --prompt hi --seed -1", m);
    expect_command_refuses(a, "--seed: '-1' is not an unsigned integer");
    snprintf(a, sizeof a, "data %s --tokenizer %s --seq 4294967298", d, m);
    expect_command_refuses(a, "--seq: '4294967298' is out of range");
    snprintf(a, sizeof a, "data %s --tokenizer %s --heldout 1", d, m);
    expect_command_refuses(a, "--heldout: '1' is out of range");
    expect_command_refuses("bench --seq 4294967298", "--seq: '4294967298' is out of range");
    expect_command_refuses("bench --threads 100000", "--threads: '100000' is out of range");
    /* warmup + steps was an int sum: 2^31-1 twice overflowed */
    expect_command_refuses("bench --steps 2147483647 --warmup 2147483647",
                           "--steps: '2147483647' is out of range (expected an integer from 1 to 1000000)");
    expect_command_refuses("bench --steps 0", "--steps: '0' is out of range");
    expect_command_refuses("bench --warmup 1000001", "--warmup: '1000001' is out of range");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_integers),
        cmocka_unit_test(test_reals),
        cmocka_unit_test(test_real_rounding),
        cmocka_unit_test(test_seeds),
        cmocka_unit_test(test_set_overrides),
        cmocka_unit_test(test_commands),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
