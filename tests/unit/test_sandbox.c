/* test_sandbox.c — the recipe sandbox (core/lua/sandbox.c) and --set overrides (core/lua/recipe_overrides.c). */
#define _XOPEN_SOURCE 700 /* symlink */
#include <lauxlib.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lua/recipe_overrides.h"
#include "base/internal.h"
#include "lua/lua_state.h"
#include "lua/sandbox.h"
#include "testutil.h"

typedef struct fixture {
    char *root;            /* temp dir holding everything below */
    char recipe_dir[PATH_MAX];
    char out_dir[PATH_MAX];
    char data_dir[PATH_MAX];
    char extra_dir[PATH_MAX]; /* allowed later through mt_sandbox_allow_read */
    lua_State *L;
} fixture;

static void path_join(char *out, const char *a, const char *b) {
    assert_true(snprintf(out, PATH_MAX, "%s/%s", a, b) < PATH_MAX);
}

static void write_text(const char *dir, const char *name, const char *text) {
    char p[PATH_MAX];
    path_join(p, dir, name);
    mt_test_write_file(p, text, strlen(text));
}

static int setup(void **state) {
    fixture *f = calloc(1, sizeof *f);
    assert_non_null(f);
    f->root = mt_test_tmpdir("sandbox");
    path_join(f->recipe_dir, f->root, "recipes");
    path_join(f->out_dir, f->root, "out");
    path_join(f->data_dir, f->root, "data");
    path_join(f->extra_dir, f->root, "extra");
    assert_int_equal(mkdir(f->recipe_dir, 0755), 0);
    assert_int_equal(mkdir(f->out_dir, 0755), 0);
    assert_int_equal(mkdir(f->data_dir, 0755), 0);
    assert_int_equal(mkdir(f->extra_dir, 0755), 0);
    char p[PATH_MAX], q[PATH_MAX];
    path_join(p, f->recipe_dir, "team");
    assert_int_equal(mkdir(p, 0755), 0);
    write_text(f->recipe_dir, "teamlib.lua", "return { answer = 42 }\n");
    write_text(f->recipe_dir, "team/util.lua", "return { name = 'util' }\n");
    write_text(f->recipe_dir, "notes.txt", "recipe notes\n");
    write_text(f->recipe_dir, "cmod.so", "not really a shared object\n");
    write_text(f->data_dir, "train.jsonl", "{\"text\": \"hi\"}\n");
    write_text(f->extra_dir, "x.txt", "extra\n");
    write_text(f->root, "secret.txt", "secret\n");
    path_join(p, f->root, "secret.txt");
    path_join(q, f->recipe_dir, "escape.txt");
    assert_int_equal(symlink(p, q), 0);           /* recipes/escape.txt -> ../secret.txt */
    path_join(q, f->recipe_dir, "etc");
    assert_int_equal(symlink("/etc", q), 0);      /* recipes/etc -> /etc */
    path_join(p, f->root, "planted.txt");
    path_join(q, f->out_dir, "dangling.txt");
    assert_int_equal(symlink(p, q), 0);           /* out/dangling.txt -> ../planted.txt (absent) */
    write_text(f->root, "outside.lua", "return 'outside'\n");
    path_join(p, f->root, "outside.lua");
    path_join(q, f->recipe_dir, "evil.lua");
    assert_int_equal(symlink(p, q), 0);           /* recipes/evil.lua -> ../outside.lua */
    path_join(q, f->out_dir, "upper");
    assert_int_equal(symlink(f->root, q), 0);     /* out/upper -> .. */

    mt_error err = {0};
    f->L = mt_lua_open(&err);
    assert_non_null(f->L);
    const char *roots[] = {f->data_dir};
    mt_sandbox_paths paths = {f->recipe_dir, f->out_dir, roots, 1};
    assert_int_equal(mt_sandbox_install(f->L, &paths, &err), MT_OK);
    lua_pushstring(f->L, f->recipe_dir);
    lua_setglobal(f->L, "RECIPE_DIR");
    lua_pushstring(f->L, f->out_dir);
    lua_setglobal(f->L, "OUT_DIR");
    lua_pushstring(f->L, f->data_dir);
    lua_setglobal(f->L, "DATA_DIR");
    lua_pushstring(f->L, f->root);
    lua_setglobal(f->L, "ROOT");
    lua_pushstring(f->L, f->extra_dir);
    lua_setglobal(f->L, "EXTRA_DIR");
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fixture *f = *state;
    lua_close(f->L);
    mt_test_rmtree(f->root);
    free(f->root);
    free(f);
    return 0;
}

/* Runs code as a recipe chunk; returns the status, err filled on failure. */
static mt_status run(lua_State *L, const char *code, mt_error *err) {
    memset(err, 0, sizeof *err);
    if (luaL_loadbufferx(L, code, strlen(code), "@recipe.lua", "t") != LUA_OK) {
        fail_msg("test chunk does not compile: %s", lua_tostring(L, -1));
    }
    return mt_lua_pcall(L, 0, 0, err);
}

static void expect_ok(lua_State *L, const char *code) {
    mt_error err;
    int top = lua_gettop(L);
    if (run(L, code, &err) != MT_OK) fail_msg("expected success for [%s], got: %s", code, err.msg);
    assert_int_equal(lua_gettop(L), top);
}

static void expect_refused(lua_State *L, const char *code, const char *needle) {
    mt_error err;
    int top = lua_gettop(L);
    if (run(L, code, &err) == MT_OK) fail_msg("expected a refusal for [%s]", code);
    if (!strstr(err.msg, needle)) fail_msg("for [%s] expected '%s' in: %s", code, needle, err.msg);
    assert_int_equal(lua_gettop(L), top);
}

#define UNSAFE "is not allowed in recipes (run with --unsafe to trust this recipe)"

static void test_processes_refused(void **state) {
    lua_State *L = ((fixture *)*state)->L;
    expect_refused(L, "os.execute('true')", "sandbox: os.execute " UNSAFE);
    expect_refused(L, "io.popen('ls')", "sandbox: io.popen " UNSAFE);
    expect_refused(L, "os.exit(3)", "sandbox: os.exit " UNSAFE);
    expect_refused(L, "os.remove(OUT_DIR .. '/x')", "sandbox: os.remove " UNSAFE);
    expect_refused(L, "os.rename(OUT_DIR .. '/x', OUT_DIR .. '/y')", "sandbox: os.rename " UNSAFE);
    expect_refused(L, "os.tmpname()", "sandbox: os.tmpname " UNSAFE);
    expect_refused(L, "os.setlocale('C')", "sandbox: os.setlocale " UNSAFE);
    /* the refusal names the recipe line */
    expect_refused(L, "\n\nos.execute('true')", "recipe.lua:3: sandbox: os.execute");
    expect_ok(L, "assert(type(os.time()) == 'number' and type(os.clock()) == 'number')\n"
                 "assert(type(os.date('%Y')) == 'string'); local _ = os.getenv('HOME')\n"
                 "assert(os.difftime(2, 1) == 1)");
}

static void test_c_code_refused(void **state) {
    lua_State *L = ((fixture *)*state)->L;
    expect_refused(L, "package.loadlib('/lib/x86_64-linux-gnu/libc.so.6', '*')", "sandbox: package.loadlib " UNSAFE);
    expect_refused(L, "package.searchpath('x', package.path)", "sandbox: package.searchpath " UNSAFE);
    /* a C module next to the recipe: no C searcher, even after setting cpath */
    expect_refused(L, "package.cpath = RECIPE_DIR .. '/?.so'; require('cmod')", "module 'cmod' not found");
    expect_refused(L, "require('cmod')", "no file '");
    expect_ok(L, "assert(package.cpath == RECIPE_DIR .. '/?.so' or package.cpath == '')");
}

static void test_debug_library(void **state) {
    lua_State *L = ((fixture *)*state)->L;
    expect_refused(L, "debug.getinfo(1)", "field 'getinfo'");
    expect_refused(L, "debug.sethook(print, 'l')", "field 'sethook'");
    expect_refused(L, "require('debug').getregistry()", "field 'getregistry'");
    expect_ok(L, "assert(debug.getupvalue == nil and debug.setupvalue == nil and debug.upvalueid == nil)\n"
                 "assert(debug.traceback('here'):find('stack traceback', 1, true))\n"
                 "assert(require('debug') == debug)");
}

static void test_binary_chunks_refused(void **state) {
    lua_State *L = ((fixture *)*state)->L;
    expect_refused(L, "load(string.dump(function() return 1 end))", "sandbox: loading binary chunks " UNSAFE);
    expect_refused(L, "load(string.dump(function() return 1 end), 'x', 'b')", "sandbox: loading binary chunks");
    /* a reader function handing over a binary chunk: load's own mode check refuses it */
    expect_ok(L, "local s = string.dump(function() return 1 end); local done\n"
                 "local f, msg = load(function() if done then return nil end; done = true; return s end, 'x', 'bt')\n"
                 "assert(f == nil and msg:find('binary'), msg)");
    /* text still loads, with an env */
    expect_ok(L, "local f = load('return x', 'chunk', 'bt', {x = 7}); assert(f() == 7)");
}

static void test_reads_outside_refused(void **state) {
    lua_State *L = ((fixture *)*state)->L;
    expect_refused(L, "io.open('/etc/passwd')", "sandbox: cannot read /etc/passwd: recipes read only under");
    expect_refused(L, "io.open(RECIPE_DIR .. '/../secret.txt')", "sandbox: cannot read");
    expect_refused(L, "io.open(RECIPE_DIR .. '/escape.txt')", "sandbox: cannot read");
    expect_refused(L, "io.open(RECIPE_DIR .. '/etc/passwd')", "sandbox: cannot read");
    expect_refused(L, "io.open(OUT_DIR .. '/upper/secret.txt')", "sandbox: cannot read");
    expect_refused(L, "for l in io.lines('/etc/passwd') do end", "sandbox: cannot read /etc/passwd");
    expect_refused(L, "io.input('/etc/passwd')", "sandbox: cannot read /etc/passwd");
    expect_refused(L, "loadfile('/etc/passwd')", "sandbox: cannot read /etc/passwd");
    expect_refused(L, "dofile('/etc/passwd')", "sandbox: cannot read /etc/passwd");
    expect_refused(L, "require('evil')", "sandbox: cannot read");
    expect_refused(L, "io.open(EXTRA_DIR .. '/x.txt')", "sandbox: cannot read");
    /* the trusted layer widens it */
    fixture *f = *state;
    mt_error err = {0};
    assert_int_equal(mt_sandbox_allow_read(L, f->extra_dir, &err), MT_OK);
    expect_ok(L, "assert(io.open(EXTRA_DIR .. '/x.txt'):read('a') == 'extra\\n')");
}

static void test_writes(void **state) {
    lua_State *L = ((fixture *)*state)->L;
    fixture *f = *state;
    char want[PATH_MAX + 64];
    snprintf(want, sizeof want, "recipes write only under %s", f->out_dir);
    expect_refused(L, "io.open('/etc/passwd', 'w')", "sandbox: cannot write /etc/passwd: ");
    expect_refused(L, "io.open('/etc/passwd', 'a')", want);
    expect_refused(L, "io.open(RECIPE_DIR .. '/notes.txt', 'r+')", "sandbox: cannot write");
    expect_refused(L, "io.open(RECIPE_DIR .. '/new.txt', 'w')", "sandbox: cannot write");
    expect_refused(L, "io.open(OUT_DIR .. '/../secret.txt', 'w')", "sandbox: cannot write");
    expect_refused(L, "io.open(OUT_DIR .. '/upper/secret.txt', 'w')", "sandbox: cannot write");
    expect_refused(L, "io.open(OUT_DIR .. '/dangling.txt', 'w')", "dangling or looping symlink");
    expect_refused(L, "io.open(OUT_DIR .. '/nope/../../secret.txt', 'w')", "cannot resolve");
    expect_refused(L, "io.output(ROOT .. '/log.txt')", "sandbox: cannot write");
    char planted[PATH_MAX];
    path_join(planted, f->root, "planted.txt");
    assert_int_equal(access(planted, F_OK), -1);
    /* inside the output directory: write, append, read back, subdirectories */
    expect_ok(L, "local f = assert(io.open(OUT_DIR .. '/log.txt', 'w')); f:write('a'); f:close()\n"
                 "f = assert(io.open(OUT_DIR .. '/log.txt', 'a+')); f:write('b'); f:close()\n"
                 "assert(io.open(OUT_DIR .. '/log.txt'):read('a') == 'ab')\n"
                 "io.output(OUT_DIR .. '/out2.txt'); io.write('x'); io.close(); io.output(io.stdout)");
    char sub[PATH_MAX];
    path_join(sub, f->out_dir, "sub");
    assert_int_equal(mkdir(sub, 0755), 0);
    expect_ok(L, "assert(io.open(OUT_DIR .. '/sub/metrics.jsonl', 'w')):close()");
    /* allow_write: a second output directory */
    mt_error err = {0};
    expect_refused(L, "io.open(EXTRA_DIR .. '/w.txt', 'w')", "sandbox: cannot write");
    assert_int_equal(mt_sandbox_allow_write(L, f->extra_dir, &err), MT_OK);
    expect_ok(L, "assert(io.open(EXTRA_DIR .. '/w.txt', 'w')):close()");
}

static void test_reads_inside(void **state) {
    lua_State *L = ((fixture *)*state)->L;
    expect_ok(L, "assert(io.open(RECIPE_DIR .. '/notes.txt'):read('l') == 'recipe notes')\n"
                 "assert(io.open(RECIPE_DIR .. '/team/../notes.txt'):read('l') == 'recipe notes')\n"
                 "for l in io.lines(DATA_DIR .. '/train.jsonl') do assert(l:find('hi')) end\n"
                 "io.input(DATA_DIR .. '/train.jsonl'); assert(io.read('l'):find('hi')); io.input(io.stdin)\n"
                 "local f = assert(io.open(OUT_DIR .. '/r.txt', 'w')); f:write('out'); f:close()\n"
                 "assert(io.open(OUT_DIR .. '/r.txt'):read('a') == 'out')\n"
                 "assert(assert(loadfile(RECIPE_DIR .. '/teamlib.lua'))().answer == 42)\n"
                 "assert(dofile(RECIPE_DIR .. '/teamlib.lua').answer == 42)");
}

static void test_require_lua(void **state) {
    lua_State *L = ((fixture *)*state)->L;
    expect_ok(L, "assert(require('teamlib').answer == 42)\n"
                 "assert(require('team.util').name == 'util')");
    expect_refused(L, "require('no_such_lib')", "module 'no_such_lib' not found");
}

static void test_cannot_undo(void **state) {
    lua_State *L = ((fixture *)*state)->L;
    /* swapping the searchers or the path, or dropping io, reaches no original */
    expect_ok(L, "package.path = '/etc/?'; package.searchers = { package.searchers[1] }\n"
                 "io = nil; _G.os = nil");
    expect_refused(L, "require('io').open('/etc/passwd')", "sandbox: cannot read /etc/passwd");
    expect_refused(L, "require('os').execute('true')", "sandbox: os.execute");
    expect_refused(L, "package.loaded.io.popen('ls')", "sandbox: io.popen");
    expect_ok(L, "local m = getmetatable(require('io').stdout).__index\n"
                 "assert(m.open == nil and m.popen == nil)\n"
                 "assert(mt_sandbox_allow_read == nil and debug.getregistry == nil)");
    /* the trusted helpers refuse on a state without a sandbox, and installing twice is refused */
    mt_error err = {0};
    fixture *f = *state;
    mt_sandbox_paths paths = {f->recipe_dir, f->out_dir, NULL, 0};
    assert_int_equal(mt_sandbox_install(L, &paths, &err), MT_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "already installed"));
    lua_State *plain = mt_lua_open(&err);
    assert_non_null(plain);
    assert_int_equal(mt_sandbox_active(plain), 0);
    assert_int_equal(mt_sandbox_allow_read(plain, "/", &err), MT_ERR_INVALID_ARG);
    lua_close(plain);
    assert_int_equal(mt_sandbox_active(L), 1);
}

static void test_error_traceback(void **state) {
    lua_State *L = ((fixture *)*state)->L;
    mt_error err;
    const char *code = "local function inner()\n  error('bad lr')\nend\ninner()\n";
    assert_int_equal(run(L, code, &err), MT_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "recipe.lua:2: bad lr"));
    assert_non_null(strstr(err.msg, "stack traceback"));
    assert_non_null(strstr(err.msg, "recipe.lua:4"));
}

/* ---- overrides -------------------------------------------------------------- */

static const char *const config_src =
    "return { lr = 2e-4, epochs = 3, name = 'run', bf16 = true, seed = 1,\n"
    "  lora = { r = 8, alpha = 16.0, dropout = 0.05, targets = { 'q_proj', 'v_proj' } },\n"
    "  optimizer = { lr = 1e-3, kind = 'adamw' }, hook = print,\n"
    "  sched = { name = 'cosine', warmup_ratio = 0.1 } }";

static lua_State *config_state(void) {
    mt_error err = {0};
    lua_State *L = mt_lua_open(&err);
    assert_non_null(L);
    assert_int_equal(luaL_dostring(L, config_src), LUA_OK);
    return L;
}

static mt_status set1(lua_State *L, const char *s, mt_error *err) {
    const char *sets[] = {s};
    memset(err, 0, sizeof *err);
    int top = lua_gettop(L);
    mt_status st = mt_config_apply_overrides(L, -1, sets, 1, err);
    assert_int_equal(lua_gettop(L), top);
    return st;
}

static void expect_set_refused(lua_State *L, const char *s, const char *needle) {
    mt_error err;
    if (set1(L, s, &err) == MT_OK) fail_msg("expected --set %s to be refused", s);
    if (!strstr(err.msg, needle)) fail_msg("for --set %s expected '%s' in: %s", s, needle, err.msg);
}

/* Evaluates expr with the config as global C; fails unless it is true. */
static void expect_config(lua_State *L, const char *expr) {
    lua_pushvalue(L, -1);
    lua_setglobal(L, "C");
    char code[512];
    snprintf(code, sizeof code, "return %s", expr);
    assert_int_equal(luaL_dostring(L, code), LUA_OK);
    if (!lua_toboolean(L, -1)) fail_msg("config check failed: %s", expr);
    lua_pop(L, 1);
}

static void test_override_types(void **state) {
    (void)state;
    lua_State *L = config_state();
    mt_error err;
    const char *sets[] = {"lora.r=16", "optimizer.lr=2e-4", "lora.alpha=32", "epochs=5", "lr=1e-5",
                          "bf16=false", "name=exp=1", "optimizer.kind=", "seed=0x10"};
    assert_int_equal(mt_config_apply_overrides(L, -1, sets, 9, &err), MT_OK);
    expect_config(L, "math.type(C.lora.r) == 'integer' and C.lora.r == 16");
    expect_config(L, "math.type(C.optimizer.lr) == 'float' and C.optimizer.lr == 2e-4");
    expect_config(L, "math.type(C.lora.alpha) == 'float' and C.lora.alpha == 32.0");
    expect_config(L, "math.type(C.epochs) == 'integer' and C.epochs == 5 and C.lr == 1e-5");
    expect_config(L, "C.bf16 == false and C.name == 'exp=1' and C.optimizer.kind == '' and C.seed == 16");
    assert_int_equal(set1(L, "bf16=true", &err), MT_OK);
    expect_config(L, "C.bf16 == true");
    /* a string list */
    assert_int_equal(set1(L, "lora.targets=q_proj,k_proj,v_proj", &err), MT_OK);
    expect_config(L, "#C.lora.targets == 3 and C.lora.targets[2] == 'k_proj'");
    /* a plugin choice {name = ..., options}: a plain value names another plugin and
     * keeps the options */
    assert_int_equal(set1(L, "sched=linear", &err), MT_OK);
    expect_config(L, "C.sched.name == 'linear' and C.sched.warmup_ratio == 0.1");
    assert_int_equal(set1(L, "sched.warmup_ratio=0.2", &err), MT_OK);
    expect_config(L, "C.sched.name == 'linear' and C.sched.warmup_ratio == 0.2");
    lua_close(L);
}

static void test_override_refusals(void **state) {
    (void)state;
    lua_State *L = config_state();
    expect_set_refused(L, "epochs=2.5", "epochs: expected an integer (the recipe has 3), found 2.5");
    expect_set_refused(L, "lora.r=16.0", "expected an integer");
    expect_set_refused(L, "lora.r=sixteen", "expected an integer number, found 'sixteen'");
    expect_set_refused(L, "lr=fast", "lr: expected a number, found 'fast'");
    expect_set_refused(L, "bf16=yes", "bf16: expected a boolean (true or false), found 'yes'");
    expect_set_refused(L, "bf16=1", "expected a boolean");
    expect_set_refused(L, "lora.rank=16", "unknown key 'lora.rank' (did you mean lora.r?)");
    expect_set_refused(L, "lora.dropuot=0.1", "did you mean lora.dropout?");
    expect_set_refused(L, "zzz=1", "unknown key 'zzz' (known keys: bf16, epochs, hook, lora, lr, name, optimizer, sched, seed)");
    expect_set_refused(L, "lora", "--set lora: expected key=value");
    expect_set_refused(L, "=3", "expected key=value");
    expect_set_refused(L, "lora..r=1", "empty component");
    expect_set_refused(L, "lora=3", "lora is a table; set one of its keys with lora.KEY=value");
    expect_set_refused(L, "lora.r.x=1", "lora.r is a number, not a table");
    expect_set_refused(L, "hook=x", "hook is a function and cannot be set");
    /* nothing changed */
    expect_config(L, "C.epochs == 3 and C.lora.r == 8 and C.bf16 == true and C.lr == 2e-4");
    lua_close(L);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_processes_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_c_code_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_debug_library, setup, teardown),
        cmocka_unit_test_setup_teardown(test_binary_chunks_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reads_outside_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_writes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reads_inside, setup, teardown),
        cmocka_unit_test_setup_teardown(test_require_lua, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cannot_undo, setup, teardown),
        cmocka_unit_test_setup_teardown(test_error_traceback, setup, teardown),
        cmocka_unit_test(test_override_types),
        cmocka_unit_test(test_override_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
