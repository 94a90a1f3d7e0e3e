/* test_plugin_loader.c — the plugin loader: one deliberately broken plugin per refusal
 * (each message names the file, each refused library is closed again), lookup by kind
 * and name, the search-path order and duplicate rule, option refusals through
 * mt_plugin_instantiate, and the `moontune plugins` command.
 *
 * The test plugins are the sources in tests/plugins, built into MT_BUILD_DIR/test_plugins. */
#define _GNU_SOURCE /* RTLD_NOLOAD */
#include "base/internal.h"
#include "testutil.h"

#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cmd_plugins.h"
#include "plugin/registry.h"

#ifndef MT_BUILD_DIR
#define MT_BUILD_DIR "build"
#endif
#define TP MT_BUILD_DIR "/test_plugins"

/* ---- helpers -------------------------------------------------------------- */

#define assert_contains(hay, needle) assert_contains_at((hay), (needle), __FILE__, __LINE__)

static void assert_contains_at(const char *hay, const char *needle, const char *file, int line) {
    if (!hay || !strstr(hay, needle)) {
        print_error("%s:%d: expected to find\n    \"%s\"\n  in\n    \"%s\"\n", file, line, needle,
                    hay ? hay : "(null)");
        fail();
    }
}

/* Whether the library at path is mapped in this process (without loading it). */
static int is_loaded(const char *path) {
    void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (h) dlclose(h);
    return h != NULL;
}

/* The refusal message that starts with path, or NULL. */
static const char *refusal_for(const mt_registry *r, const char *path) {
    size_t n = strlen(path);
    for (size_t i = 0; i < mt_registry_refusal_count(r); i++) {
        const char *m = mt_registry_refusal(r, i);
        if (!strncmp(m, path, n) && m[n] == ':') return m;
    }
    return NULL;
}

static mt_registry *open_registry(const char *env, const char *const *extra, size_t n_extra) {
    if (env) setenv("MOONTUNE_PLUGIN_PATH", env, 1);
    else unsetenv("MOONTUNE_PLUGIN_PATH");
    mt_registry *r = NULL;
    mt_error err = {0};
    mt_status st = mt_registry_open(extra, n_extra, &r, &err);
    if (st) print_error("mt_registry_open: %s\n", err.msg);
    assert_int_equal(st, MT_OK);
    assert_non_null(r);
    unsetenv("MOONTUNE_PLUGIN_PATH");
    return r;
}

/* Loads a broken plugin: the status, a message naming the file and each needle, and the
 * library closed again. */
static void expect_refusal(const char *path, mt_status want, const char *const *needles) {
    mt_plugin *p = (mt_plugin *)&p; /* must be reset to NULL */
    mt_error err = {0};
    mt_status st = mt_plugin_load(path, &p, &err);
    print_message("  %s\n", err.msg);
    assert_int_equal(st, want);
    assert_null(p);
    assert_int_equal(err.status, want);
    assert_contains(err.msg, path);
    for (; *needles; needles++) assert_contains(err.msg, *needles);
    assert_false(is_loaded(path));
}

/* ---- refusals of one file ------------------------------------------------- */

static void test_refuse_not_elf(void **state) {
    (void)state;
    expect_refusal(TP "/bad_not_elf.so", MT_ERR_FORMAT,
                   (const char *[]){"not an ELF shared object", NULL});
}

/* A real plugin with its ELF header claiming another machine, or another kind of ELF
 * file: the refusal says so (dlopen itself says "No such file or directory" or
 * "invalid ELF header"). */
static void test_refuse_wrong_architecture(void **state) {
    (void)state;
    char *bytes;
    size_t len;
    assert_int_equal(mt_read_file(MT_BUILD_DIR "/plugins/adamw.so", &bytes, &len, NULL), MT_OK);
    char *dir = mt_test_tmpdir("plugin-arch");
    char path[1024];
    snprintf(path, sizeof path, "%s/adamw_aarch64.so", dir);
    bytes[18] = (char)183; /* e_machine = EM_AARCH64, little-endian */
    bytes[19] = 0;
    mt_test_write_file(path, bytes, len);
    expect_refusal(path, MT_ERR_FORMAT,
                   (const char *[]){"not a plugin for this machine: it was built for AArch64 (ELF machine 183, 64-bit)", NULL});
    snprintf(path, sizeof path, "%s/adamw_object.so", dir);
    bytes[18] = 62; /* back to x86-64 */
    bytes[16] = 1;  /* e_type = ET_REL */
    mt_test_write_file(path, bytes, len);
    expect_refusal(path, MT_ERR_FORMAT, (const char *[]){"an ELF object file, not a shared object", NULL});
    free(bytes);
    mt_test_rmtree(dir);
    free(dir);
}

/* A real plugin for this machine as a 32-bit or big-endian ELF file, and cut short:
 * "it was built for x86-64 (ELF machine 62, 32-bit), this is x86-64" and dlopen's
 * "cannot read file data" did not say what was wrong. */
static void test_refuse_class_and_truncation(void **state) {
    (void)state;
    char *bytes;
    size_t len;
    assert_int_equal(mt_read_file(MT_BUILD_DIR "/plugins/adamw.so", &bytes, &len, NULL), MT_OK);
    char *dir = mt_test_tmpdir("plugin-class");
    char path[1024];
    snprintf(path, sizeof path, "%s/adamw_cut.so", dir);
    mt_test_write_file(path, bytes, len / 2);
    char want[160];
    snprintf(want, sizeof want, "but the file has %zu bytes", len / 2);
    expect_refusal(path, MT_ERR_FORMAT,
                   (const char *[]){"not a plugin moontune can load: the file is truncated", want, NULL});
    snprintf(path, sizeof path, "%s/adamw_cut_more.so", dir);
    mt_test_write_file(path, bytes, 300); /* the program headers cut too */
    expect_refusal(path, MT_ERR_FORMAT, (const char *[]){"the file is truncated", "has 300 bytes", NULL});
#if defined(__x86_64__) || defined(__aarch64__)
    snprintf(path, sizeof path, "%s/adamw_32.so", dir);
    bytes[EI_CLASS] = ELFCLASS32;
    mt_test_write_file(path, bytes, len);
    expect_refusal(path, MT_ERR_FORMAT,
                   (const char *[]){"not a plugin for this machine: it is a 32-bit ELF file",
                                    "this is 64-bit little-endian", NULL});
#endif
    free(bytes);
    mt_test_rmtree(dir);
    free(dir);
}

static void test_refuse_missing_file(void **state) {
    (void)state;
    expect_refusal(TP "/no_such_plugin.so", MT_ERR_IO,
                   (const char *[]){"cannot open plugin", "No such file", NULL});
}

static void test_refuse_no_entry(void **state) {
    (void)state;
    expect_refusal(TP "/bad_no_entry.so", MT_ERR_FORMAT,
                   (const char *[]){"not a moontune plugin", "'moontune_plugin_entry'", NULL});
}

/* "<file>: built for plugin ABI <found>; this moontune loads ABI <oldest>..<current>",
 * with the reason for ABI 1. */
static const char *supported_range(void) {
    static char range[64];
    snprintf(range, sizeof range, "this moontune loads ABI %d..%d", MT_PLUGIN_ABI_OLDEST,
             MT_PLUGIN_ABI_VERSION);
    return range;
}

static void test_refuse_abi_mismatch(void **state) {
    (void)state;
    expect_refusal(TP "/bad_abi.so", MT_ERR_UNSUPPORTED,
                   (const char *[]){"built for plugin ABI 999", supported_range(), NULL});
}

/* A plugin built against ABI 1 (its descriptor in ABI 1's layout): refused with the
 * reason, not read any further. */
static void test_refuse_abi1(void **state) {
    (void)state;
    assert_int_equal(MT_PLUGIN_ABI_OLDEST, 2); /* the day ABI 1 loads again, this test goes */
    expect_refusal(TP "/bad_abi1.so", MT_ERR_UNSUPPORTED,
                   (const char *[]){"built for plugin ABI 1;", supported_range(),
                                    "ABI 1 plugins compute on host pointers and must be rebuilt "
                                    "against moontune/plugin.h version 2 (docs/plugins.md)",
                                    NULL});
}

/* A plugin of the next ABI: refused, naming both versions. */
static void test_refuse_newer_abi(void **state) {
    (void)state;
    char found[64];
    snprintf(found, sizeof found, "built for plugin ABI %d;", MT_PLUGIN_ABI_VERSION + 1);
    expect_refusal(TP "/bad_abi3.so", MT_ERR_UNSUPPORTED,
                   (const char *[]){found, supported_range(), NULL});
}

/* The struct-size rule: a descriptor smaller than ABI 2's, a vtable of size 0. */
static void test_refuse_small_structs(void **state) {
    (void)state;
    char have[32], need[32];
    snprintf(have, sizeof have, "%zu bytes", offsetof(mt_plugin_descriptor, vtable));
    snprintf(need, sizeof need, "%zu", sizeof(mt_plugin_descriptor));
    expect_refusal(TP "/bad_desc_size.so", MT_ERR_FORMAT,
                   (const char *[]){"size", have, need, NULL});
    expect_refusal(TP "/bad_vtable_size.so", MT_ERR_FORMAT,
                   (const char *[]){"'bad_vtable_size'", "vtable size of 0", NULL});
}

static void test_refuse_bad_kind(void **state) {
    (void)state;
    expect_refusal(TP "/bad_kind.so", MT_ERR_FORMAT,
                   (const char *[]){"invalid plugin kind 42", "4 scheduler", NULL});
}

static void test_refuse_null_descriptor(void **state) {
    (void)state;
    expect_refusal(TP "/bad_null.so", MT_ERR_FORMAT,
                   (const char *[]){"moontune_plugin_entry() returned NULL", NULL});
}

static void test_refuse_duplicate_option(void **state) {
    (void)state;
    expect_refusal(TP "/bad_schema_dup.so", MT_ERR_FORMAT,
                   (const char *[]){"plugin 'bad_schema_dup' has a bad option schema",
                                    "option 'lr' is declared twice", NULL});
}

static void test_refuse_bad_default(void **state) {
    (void)state;
    expect_refusal(TP "/bad_schema_default.so", MT_ERR_FORMAT,
                   (const char *[]){"plugin 'bad_schema_default' has a bad option schema",
                                    "option 'steps'", "\"fast\" is not a number", NULL});
}

static void test_refuse_bad_name(void **state) {
    (void)state;
    expect_refusal(TP "/bad_name.so", MT_ERR_FORMAT,
                   (const char *[]){"bad descriptor", "\"Bad Name\" is invalid", NULL});
}

static void test_refuse_missing_slot(void **state) {
    (void)state;
    expect_refusal(TP "/bad_vtable.so", MT_ERR_FORMAT,
                   (const char *[]){"optimizer 'bad_vtable'", "mandatory vtable slot 'step'",
                                    NULL});
}

static void test_load_valid(void **state) {
    (void)state;
    const char *path = TP "/test_sched.so";
    mt_plugin *p = NULL;
    mt_error err = {0};
    assert_int_equal(mt_plugin_load(path, &p, &err), MT_OK);
    const mt_plugin_descriptor *d = mt_plugin_desc(p);
    assert_int_equal(d->kind, MT_PLUGIN_SCHEDULER);
    assert_string_equal(d->name, "test_sched");
    assert_string_equal(mt_plugin_path(p), path);
    assert_true(is_loaded(path));
    mt_plugin_unload(p);
    assert_false(is_loaded(path));
}

static void test_kind_names(void **state) {
    (void)state;
    assert_string_equal(mt_plugin_kind_name(MT_PLUGIN_OPTIMIZER), "optimizer");
    assert_string_equal(mt_plugin_kind_name(MT_PLUGIN_SCHEDULER), "scheduler");
    assert_null(mt_plugin_kind_name((mt_plugin_kind)42));
    assert_int_equal(mt_plugin_kind_parse("loss"), MT_PLUGIN_LOSS);
    assert_int_equal(mt_plugin_kind_parse("adapter"), MT_PLUGIN_ADAPTER);
    assert_int_equal(mt_plugin_kind_parse("bogus"), 0);
}

/* ---- the registry --------------------------------------------------------- */

static void test_registry_scan(void **state) {
    (void)state;
    const char *extra[] = {TP};
    mt_registry *r = open_registry(NULL, extra, 1);
    mt_error err = {0};
    const mt_plugin *p = mt_registry_find(r, MT_PLUGIN_SCHEDULER, "test_sched", &err);
    assert_non_null(p);
    assert_string_equal(mt_plugin_path(p), TP "/test_sched.so");
    assert_true(is_loaded(TP "/test_sched.so"));
    /* Every broken file is a refusal naming it, none is fatal, and none stays loaded. */
    static const char *const bad[] = {"bad_abi", "bad_abi1", "bad_abi3", "bad_desc_size",
                                      "bad_kind", "bad_name", "bad_no_entry", "bad_not_elf",
                                      "bad_null", "bad_schema_default", "bad_schema_dup",
                                      "bad_vtable", "bad_vtable_size"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char path[512];
        snprintf(path, sizeof path, TP "/%s.so", bad[i]);
        if (!refusal_for(r, path)) print_error("no refusal for %s\n", path);
        assert_non_null(refusal_for(r, path));
        assert_false(is_loaded(path));
    }
    /* Subdirectories are not searched. */
    assert_null(mt_registry_find(r, MT_PLUGIN_SCHEDULER, "dupe", NULL));
    mt_registry_close(r);
    assert_false(is_loaded(TP "/test_sched.so"));
}

static void test_registry_find_by_kind(void **state) {
    (void)state;
    const char *extra[] = {TP, TP "/kind"};
    mt_registry *r = open_registry(NULL, extra, 2);
    mt_error err = {0};

    assert_non_null(mt_registry_find(r, MT_PLUGIN_SCHEDULER, "cosine", &err));
    /* The name exists, as another kind: refused, and the message says what it is. */
    assert_null(mt_registry_find(r, MT_PLUGIN_OPTIMIZER, "cosine", &err));
    print_message("  %s\n", err.msg);
    assert_int_equal(err.status, MT_ERR_INVALID_ARG);
    assert_contains(err.msg, "no optimizer plugin named 'cosine'");
    assert_contains(err.msg, "'cosine' is a scheduler");
    assert_contains(err.msg, "not an optimizer");

    assert_null(mt_registry_find(r, MT_PLUGIN_LOSS, "test_sched", &err));
    assert_contains(err.msg, "'test_sched' is a scheduler");
    assert_contains(err.msg, TP "/test_sched.so");
    assert_contains(err.msg, "not a loss");

    /* A plain miss lists what there is of that kind, sorted. */
    assert_null(mt_registry_find(r, MT_PLUGIN_SCHEDULER, "cosin", &err));
    print_message("  %s\n", err.msg);
    assert_contains(err.msg, "no scheduler plugin named 'cosin' (available: ");
    assert_contains(err.msg, "test_sched");
    const char *a = strstr(err.msg, "cosine"), *b = strstr(err.msg, "test_sched");
    assert_true(a && b && a < b);

    /* A miss whose file was refused says why. */
    assert_null(mt_registry_find(r, MT_PLUGIN_SCHEDULER, "bad_abi", &err));
    assert_contains(err.msg, "was refused");
    assert_contains(err.msg, "ABI 999");
    mt_registry_close(r);
}

static const char *const dup_a = TP "/dup_a/dupe.so";
static const char *const dup_b = TP "/dup_b/dupe.so";

/* The winner of "dupe" is `win`; the loser's refusal names both files, says why, and the
 * loser is closed again. */
static void expect_dupe(mt_registry *r, const char *win, const char *lose) {
    const mt_plugin *p = mt_registry_find(r, MT_PLUGIN_SCHEDULER, "dupe", NULL);
    assert_non_null(p);
    assert_string_equal(mt_plugin_path(p), win);
    char want[1024];
    snprintf(want, sizeof want,
             "%s: scheduler 'dupe' is also provided by %s, which wins because it comes earlier "
             "on the search path (built-in directory, then MOONTUNE_PLUGIN_PATH, then recipe "
             "directories)",
             lose, win);
    const char *got = refusal_for(r, lose);
    assert_non_null(got);
    print_message("  %s\n", got);
    assert_string_equal(got, want);
    assert_true(is_loaded(win));
    assert_false(is_loaded(lose));
}

static void test_search_path_order(void **state) {
    (void)state;
    mt_registry *r;
    /* MOONTUNE_PLUGIN_PATH in its own order; empty entries are skipped. */
    char env[1024];
    snprintf(env, sizeof env, "::%s::%s:", TP "/dup_b", TP "/dup_a");
    r = open_registry(env, NULL, 0);
    expect_dupe(r, dup_b, dup_a);
    mt_registry_close(r);
    snprintf(env, sizeof env, "%s:%s", TP "/dup_a", TP "/dup_b");
    r = open_registry(env, NULL, 0);
    expect_dupe(r, dup_a, dup_b);
    mt_registry_close(r);

    /* MOONTUNE_PLUGIN_PATH before the recipe's directories, whatever their names. */
    const char *extra_a[] = {TP "/dup_a"}, *extra_b[] = {TP "/dup_b"};
    r = open_registry(TP "/dup_b", extra_a, 1);
    expect_dupe(r, dup_b, dup_a);
    mt_registry_close(r);
    r = open_registry(TP "/dup_a", extra_b, 1);
    expect_dupe(r, dup_a, dup_b);
    mt_registry_close(r);

    /* Recipe directories in their own order. */
    const char *extra_ba[] = {TP "/dup_b", TP "/dup_a"};
    r = open_registry(NULL, extra_ba, 2);
    expect_dupe(r, dup_b, dup_a);
    mt_registry_close(r);
    assert_false(is_loaded(dup_a));
    assert_false(is_loaded(dup_b));
}

static void test_search_path_dedup_and_missing(void **state) {
    (void)state;
    /* The same directory twice (once with a trailing slash) is scanned once: no plugin
     * is refused as a duplicate of itself. A missing directory is a warning, not fatal. */
    const char *extra[] = {TP "/", "/nonexistent/moontune-plugins"};
    mt_registry *r = open_registry(TP, extra, 2);
    for (size_t i = 0; i < mt_registry_refusal_count(r); i++)
        if (strstr(mt_registry_refusal(r, i), "also provided by")) {
            print_error("unexpected duplicate: %s\n", mt_registry_refusal(r, i));
            fail();
        }
    assert_non_null(mt_registry_find(r, MT_PLUGIN_SCHEDULER, "test_sched", NULL));
    const char *m = refusal_for(r, "/nonexistent/moontune-plugins");
    assert_non_null(m);
    assert_contains(m, "cannot read plugin directory (named by the recipe)");
    assert_contains(m, "No such file or directory");
    mt_registry_close(r);
}

/* ---- options through mt_plugin_instantiate -------------------------------- */

static mt_plugin *load_test_sched(void) {
    mt_plugin *p = NULL;
    mt_error err = {0};
    mt_status st = mt_plugin_load(TP "/test_sched.so", &p, &err);
    if (st) print_error("%s\n", err.msg);
    assert_int_equal(st, MT_OK);
    return p;
}

static double sched_lr(const mt_plugin_instance *inst, int64_t step, int64_t total, double base) {
    const mt_scheduler_vtable *v = inst->desc->vtable;
    return v->lr(inst->state, step, total, base);
}

static void test_options_defaults(void **state) {
    (void)state;
    mt_plugin *p = load_test_sched();
    mt_plugin_instance *inst = NULL;
    mt_error err = {0};
    assert_int_equal(mt_plugin_instantiate(p, NULL, 0, &inst, &err), MT_OK);
    assert_ptr_equal(inst->plugin, p);
    assert_int_equal(mt_options_int(inst->options, "warmup_steps"), 10);
    assert_true(mt_options_float(inst->options, "min_lr_ratio") == 0.1);
    assert_int_equal(mt_options_bool(inst->options, "hold"), 0);
    assert_string_equal(mt_options_string(inst->options, "shape"), "cosine");
    assert_int_equal(mt_options_list_len(inst->options, "phases"), 2);
    assert_string_equal(mt_options_list_item(inst->options, "phases", 0), "warmup");
    assert_string_equal(mt_options_list_item(inst->options, "phases", 1), "decay");
    assert_string_equal(mt_options_string(inst->options, "label"), "");
    /* The plugin read the defaults: warmup over 10 steps, cosine down to 0.1. */
    assert_true(sched_lr(inst, 5, 110, 2.0) == 1.0);
    assert_true(sched_lr(inst, 10, 110, 2.0) == 2.0);
    assert_true(fabs(sched_lr(inst, 110, 110, 2.0) - 0.2) < 1e-12);
    mt_plugin_instance_free(inst);
    mt_plugin_unload(p);
}

static void test_options_given(void **state) {
    (void)state;
    mt_plugin *p = load_test_sched();
    const char *phases[] = {"warmup", "hold"};
    mt_kv kv[] = {
        {.key = "warmup_steps", .type = MT_KV_NUMBER, .number = 0},
        {.key = "shape", .type = MT_KV_STRING, .string = "linear"},
        {.key = "min_lr_ratio", .type = MT_KV_NUMBER, .number = 0.0},
        {.key = "phases", .type = MT_KV_LIST, .list = phases, .list_len = 2},
        {.key = "hold", .type = MT_KV_BOOL, .boolean = 0},
    };
    mt_plugin_instance *inst = NULL;
    mt_error err = {0};
    assert_int_equal(mt_plugin_instantiate(p, kv, 5, &inst, &err), MT_OK);
    assert_string_equal(mt_options_list_item(inst->options, "phases", 1), "hold");
    assert_true(fabs(sched_lr(inst, 25, 100, 1.0) - 0.75) < 1e-12);
    mt_plugin_instance_free(inst);
    mt_plugin_unload(p);
}

/* One option refusal: status, no instance, and a message naming the plugin, its file,
 * the key and what was wrong. */
static void expect_option_refusal(const mt_plugin *p, mt_kv kv, const char *what) {
    mt_plugin_instance *inst = (mt_plugin_instance *)&inst;
    mt_error err = {0};
    mt_status st = mt_plugin_instantiate(p, &kv, 1, &inst, &err);
    print_message("  %s\n", err.msg);
    assert_int_equal(st, MT_ERR_INVALID_ARG);
    assert_null(inst);
    assert_contains(err.msg, "plugin 'test_sched'");
    assert_contains(err.msg, TP "/test_sched.so");
    char key[128];
    snprintf(key, sizeof key, "'%s'", kv.key);
    assert_contains(err.msg, key);
    assert_contains(err.msg, what);
}

static void test_options_refused(void **state) {
    (void)state;
    mt_plugin *p = load_test_sched();
    const char *bad_list[] = {"warmup", "cooldown"};
    expect_option_refusal(p, (mt_kv){.key = "warmup", .type = MT_KV_NUMBER, .number = 5},
                          "unknown option 'warmup' (known: warmup_steps, min_lr_ratio");
    expect_option_refusal(p, (mt_kv){.key = "warmup_steps", .type = MT_KV_STRING, .string = "10"},
                          "expected an integer, found a string");
    expect_option_refusal(p, (mt_kv){.key = "warmup_steps", .type = MT_KV_NUMBER, .number = 2.5},
                          "expected an integer, found 2.5");
    expect_option_refusal(p, (mt_kv){.key = "hold", .type = MT_KV_NUMBER, .number = 1},
                          "expected a boolean, found a number");
    expect_option_refusal(p, (mt_kv){.key = "min_lr_ratio", .type = MT_KV_NUMBER, .number = 1.5},
                          "1.5 is out of range [0, 1]");
    expect_option_refusal(p, (mt_kv){.key = "warmup_steps", .type = MT_KV_NUMBER, .number = -1},
                          "-1 is out of range [0, 1e+06]");
    expect_option_refusal(p, (mt_kv){.key = "shape", .type = MT_KV_STRING, .string = "exp"},
                          "\"exp\" is not one of cosine|linear|constant");
    expect_option_refusal(p,
                          (mt_kv){.key = "phases", .type = MT_KV_LIST, .list = bad_list,
                                  .list_len = 2},
                          "\"cooldown\" is not one of warmup|decay|hold");
    expect_option_refusal(p,
                          (mt_kv){.key = "phases", .type = MT_KV_STRING,
                                  .string = "warmup, cooldown"},
                          "\"cooldown\" is not one of warmup|decay|hold");
    mt_plugin_unload(p);
}

static void test_create_failure(void **state) {
    (void)state;
    mt_plugin *p = load_test_sched();
    mt_kv kv = {.key = "label", .type = MT_KV_STRING, .string = "fail"};
    mt_plugin_instance *inst = NULL;
    mt_error err = {0};
    assert_int_equal(mt_plugin_instantiate(p, &kv, 1, &inst, &err), MT_ERR_INVALID_ARG);
    assert_null(inst);
    assert_contains(err.msg, "plugin 'test_sched' (" TP "/test_sched.so): ");
    assert_contains(err.msg, "asks create to fail");
    mt_plugin_unload(p);
}

/* ---- `moontune plugins` --------------------------------------------------- */

typedef struct captured {
    int rc;
    char *out, *err;
} captured;

static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    assert_non_null(buf);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n - 1, f)) > 0) {
        n += got;
        if (n + 1 == cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            assert_non_null(buf);
        }
    }
    fclose(f);
    buf[n] = '\0';
    return buf;
}

/* Runs `moontune plugins ARGS` with stdout and stderr captured. */
static captured run_cmd(int argc, const char **argv) {
    char *dir = mt_test_tmpdir("cmd-plugins");
    char out_path[512], err_path[512];
    snprintf(out_path, sizeof out_path, "%s/out", dir);
    snprintf(err_path, sizeof err_path, "%s/err", dir);
    fflush(stdout);
    fflush(stderr);
    int saved_out = dup(1), saved_err = dup(2);
    int fo = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    int fe = open(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(saved_out >= 0 && saved_err >= 0 && fo >= 0 && fe >= 0);
    dup2(fo, 1);
    dup2(fe, 2);
    close(fo);
    close(fe);
    unsetenv("MOONTUNE_PLUGIN_PATH");
    captured c = {0};
    c.rc = mt_cmd_plugins(argc, (char **)argv);
    fflush(stdout);
    fflush(stderr);
    dup2(saved_out, 1);
    dup2(saved_err, 2);
    close(saved_out);
    close(saved_err);
    c.out = slurp(out_path);
    c.err = slurp(err_path);
    mt_test_rmtree(dir);
    free(dir);
    return c;
}

static void captured_free(captured *c) {
    free(c->out);
    free(c->err);
}

static void test_cmd_list(void **state) {
    (void)state;
    const char *argv[] = {"plugins", "--path", TP, "--path=" TP "/kind"};
    captured c = run_cmd(4, argv);
    assert_int_equal(c.rc, 0);
    assert_contains(c.out, "KIND");
    assert_contains(c.out, "VERSION");
    assert_contains(c.out, "test_sched");
    assert_contains(c.out, "0.0.1");
    assert_contains(c.out, TP "/test_sched.so");
    /* sorted by kind, then name: scheduler cosine (the built-in one, when built, wins over
     * kind/cosine.so) before scheduler test_sched */
    const char *a = strstr(c.out, " cosine "), *b = strstr(c.out, " test_sched ");
    assert_true(a && b && a < b);
    assert_contains(c.err, "warning: " TP "/bad_abi.so: built for plugin ABI 999");
    assert_contains(c.err, "warning: " TP "/bad_abi1.so: built for plugin ABI 1;");
    assert_contains(c.err, "warning: " TP "/bad_not_elf.so: not a plugin: not an ELF shared object");
    captured_free(&c);
}

static void test_cmd_describe(void **state) {
    (void)state;
    const char *argv[] = {"plugins", "--path", TP, "--describe", "test_sched"};
    captured c = run_cmd(5, argv);
    assert_int_equal(c.rc, 0);
    print_message("%s", c.out);
    assert_contains(c.out, "kind:        scheduler\n");
    assert_contains(c.out, "name:        test_sched\n");
    assert_contains(c.out, "version:     0.0.1\n");
    assert_contains(c.out, "file:        " TP "/test_sched.so\n");
    assert_contains(c.out, "description: test scheduler: warmup");
    assert_contains(c.out, "  warmup_steps (int, default 10, range [0, 1000000])\n"
                           "      steps of linear warmup from 0\n");
    assert_contains(c.out, "  min_lr_ratio (float, default 0.1, range [0, 1])\n");
    assert_contains(c.out, "  hold (bool, default false)\n");
    assert_contains(c.out, "  shape (string, default \"cosine\", one of cosine, linear, constant)\n");
    assert_contains(c.out, "  phases (string list, default \"warmup,decay\", each one of warmup, "
                           "decay, hold)\n");
    assert_contains(c.out, "  label (string, default \"\")\n");
    captured_free(&c);
}

static void test_cmd_describe_missing(void **state) {
    (void)state;
    const char *argv[] = {"plugins", "--path", TP, "--describe", "nope"};
    captured c = run_cmd(5, argv);
    assert_int_equal(c.rc, 1);
    assert_contains(c.err, "no plugin named 'nope' (available:");
    assert_contains(c.err, "scheduler test_sched");
    captured_free(&c);

    const char *argv2[] = {"plugins", "--path", TP, "--describe", "test_sched", "--kind",
                           "optimizer"};
    c = run_cmd(7, argv2);
    assert_int_equal(c.rc, 1);
    assert_contains(c.err, "'test_sched' is a scheduler");
    captured_free(&c);
}

static void test_cmd_usage(void **state) {
    (void)state;
    const char *help[] = {"plugins", "--help"};
    captured c = run_cmd(2, help);
    assert_int_equal(c.rc, 0);
    assert_contains(c.out, "usage: moontune plugins");
    assert_contains(c.out, "MOONTUNE_PLUGIN_PATH");
    captured_free(&c);

    const char *bogus[] = {"plugins", "--bogus"};
    c = run_cmd(2, bogus);
    assert_int_equal(c.rc, 2);
    assert_contains(c.err, "unknown option '--bogus'");
    captured_free(&c);

    const char *kind[] = {"plugins", "--kind", "optimiser"};
    c = run_cmd(3, kind);
    assert_int_equal(c.rc, 2);
    assert_contains(c.err, "--kind expects optimizer, loss, adapter or scheduler, got \"optimiser\"");
    captured_free(&c);

    const char *missing[] = {"plugins", "--describe"};
    c = run_cmd(2, missing);
    assert_int_equal(c.rc, 2);
    assert_contains(c.err, "--describe needs a value");
    captured_free(&c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_refuse_not_elf),
        cmocka_unit_test(test_refuse_wrong_architecture),
        cmocka_unit_test(test_refuse_class_and_truncation),
        cmocka_unit_test(test_refuse_missing_file),
        cmocka_unit_test(test_refuse_no_entry),
        cmocka_unit_test(test_refuse_abi_mismatch),
        cmocka_unit_test(test_refuse_abi1),
        cmocka_unit_test(test_refuse_newer_abi),
        cmocka_unit_test(test_refuse_small_structs),
        cmocka_unit_test(test_refuse_bad_kind),
        cmocka_unit_test(test_refuse_null_descriptor),
        cmocka_unit_test(test_refuse_duplicate_option),
        cmocka_unit_test(test_refuse_bad_default),
        cmocka_unit_test(test_refuse_bad_name),
        cmocka_unit_test(test_refuse_missing_slot),
        cmocka_unit_test(test_load_valid),
        cmocka_unit_test(test_kind_names),
        cmocka_unit_test(test_registry_scan),
        cmocka_unit_test(test_registry_find_by_kind),
        cmocka_unit_test(test_search_path_order),
        cmocka_unit_test(test_search_path_dedup_and_missing),
        cmocka_unit_test(test_options_defaults),
        cmocka_unit_test(test_options_given),
        cmocka_unit_test(test_options_refused),
        cmocka_unit_test(test_create_failure),
        cmocka_unit_test(test_cmd_list),
        cmocka_unit_test(test_cmd_describe),
        cmocka_unit_test(test_cmd_describe_missing),
        cmocka_unit_test(test_cmd_usage),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
