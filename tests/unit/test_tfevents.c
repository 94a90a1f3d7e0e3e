/* test_tfevents.c — TensorBoard event files (core/formats/tfevents.c) and their Lua
 * binding (core/lua/bind_tensorboard.c): CRC-32C vectors, one record's bytes against a
 * hand-computed layout, decoding and its refusals, bad input that writes nothing, a
 * failed write cut back to the last complete record, file names, the sandbox, and the
 * trainer writing events beside metrics.jsonl (tests/lua/trainer_tensorboard.lua). */
#include "testutil.h"

#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>

#include "base/internal.h"
#include "formats/tfevents.h"
#include "lua/bindings.h"
#include "lua/lua_state.h"
#include "lua/sandbox.h"

#ifndef MT_FIXTURE_DIR
#define MT_FIXTURE_DIR "tests/fixtures"
#endif

static void expect_msg(const mt_error *err, const char *needle) {
    if (!strstr(err->msg, needle)) fail_msg("expected '%s' in the error, got: %s", needle, err->msg);
}

static long file_size(const char *path) {
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    return (long)st.st_size;
}

static void read_all(const char *path, unsigned char **buf, size_t *len) {
    mt_error err = {0};
    char *text = NULL;
    if (mt_read_file(path, &text, len, &err)) fail_msg("%s", err.msg);
    *buf = (unsigned char *)text;
}

/* ---- CRC-32C ------------------------------------------------------------------------ */

static void test_crc32c_vectors(void **state) {
    (void)state;
    /* the standard check value, and RFC 3720 (iSCSI) appendix B.4 */
    assert_int_equal(mt_crc32c("123456789", 9), 0xE3069283u);
    assert_int_equal(mt_crc32c("", 0), 0u);
    unsigned char buf[32];
    memset(buf, 0, sizeof buf);
    assert_int_equal(mt_crc32c(buf, 32), 0x8A9136AAu);
    memset(buf, 0xFF, sizeof buf);
    assert_int_equal(mt_crc32c(buf, 32), 0x62A8AB43u);
    for (int i = 0; i < 32; i++) buf[i] = (unsigned char)i;
    assert_int_equal(mt_crc32c(buf, 32), 0x46DD794Eu);
    for (int i = 0; i < 32; i++) buf[i] = (unsigned char)(31 - i);
    assert_int_equal(mt_crc32c(buf, 32), 0x113FDB5Cu);
    /* continued in pieces == at once */
    uint32_t c = mt_crc32c_update(0, "1234", 4);
    assert_int_equal(mt_crc32c_update(c, "56789", 5), 0xE3069283u);
    /* masking as TFRecord does it, and back */
    assert_int_equal(mt_crc32c_mask(0xd81d45aau), 0x2dd89b12u);
    for (uint32_t x = 1; x < 4000000000u; x += 123456789u) assert_int_equal(mt_crc32c_unmask(mt_crc32c_mask(x)), x);
}

/* ---- one record, byte for byte -------------------------------------------------------- */

static void expect_bytes(const uint8_t *got, size_t n, const uint8_t *want, size_t wn) {
    if (n != wn) fail_msg("record of %zu bytes, want %zu", n, wn);
    for (size_t i = 0; i < n; i++)
        if (got[i] != want[i]) fail_msg("byte %zu: 0x%02x, want 0x%02x", i, got[i], want[i]);
}

static void test_record_bytes(void **state) {
    (void)state;
    mt_error err = {0};
    uint8_t *rec;
    size_t n;
    /* Event{wall_time 1.5, step 3, summary{value{tag "loss", simple_value 0.25}}}:
     *   09 <1.5 as LE double>        field 1, wire 1 (64-bit)
     *   10 03                        field 2, wire 0 (varint)
     *   2a 0d                        field 5, wire 2, 13 bytes: Summary
     *     0a 0b                      Summary.value (field 1, wire 2), 11 bytes
     *       0a 04 'l' 'o' 's' 's'    Value.tag
     *       15 00 00 80 3e           Value.simple_value (field 2, wire 5): 0.25f
     * framed: 26 as LE uint64, masked CRC-32C of those 8 bytes (crc 0xd81d45aa),
     * the 26 bytes, masked CRC-32C of them (crc 0xb4fc5997). The same bytes come out of
     * Python's protobuf (event_pb2.Event(...).SerializeToString()) and tensorboard's
     * masked_crc32c. */
    static const uint8_t want[] = {
        0x1a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x12, 0x9b, 0xd8, 0x2d,
        0x09, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf8, 0x3f, 0x10, 0x03, 0x2a, 0x0d, 0x0a, 0x0b,
        0x0a, 0x04, 'l', 'o', 's', 's', 0x15, 0x00, 0x00, 0x80, 0x3e,
        0xd0, 0x54, 0xb2, 0x55,
    };
    mt_tfevents_value v = {.tag = "loss", .simple_value = 0.25f};
    mt_tfevents_event ev = {.wall_time = 1.5, .step = 3, .kind = MT_TFEVENTS_SUMMARY, .values = &v, .n_values = 1};
    assert_int_equal(mt_tfevents_encode(&ev, &rec, &n, &err), MT_OK);
    expect_bytes(rec, n, want, sizeof want);
    free(rec);

    /* the file_version event (wall time and step 0 are written, not omitted) */
    static const uint8_t version[] = {0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0x00, 0x1a, 0x0d,
                                      'b', 'r', 'a', 'i', 'n', '.', 'E', 'v', 'e', 'n', 't', ':', '2'};
    mt_tfevents_event fv = {.kind = MT_TFEVENTS_VERSION, .file_version = MT_TFEVENTS_FILE_VERSION};
    assert_int_equal(mt_tfevents_encode(&fv, &rec, &n, &err), MT_OK);
    expect_bytes(rec + 12, n - 16, version, sizeof version);
    free(rec);

    /* a negative step is int64's two's complement (10 varint bytes); SessionLog START */
    static const uint8_t start[] = {0x09, 0, 0, 0, 0, 0, 0, 0, 0x40, 0x10, 0xff, 0xff, 0xff, 0xff, 0xff,
                                    0xff, 0xff, 0xff, 0xff, 0x01, 0x3a, 0x02, 0x08, 0x01};
    mt_tfevents_event sl = {.wall_time = 2.0, .step = -1, .kind = MT_TFEVENTS_SESSION_LOG,
                            .session_status = MT_TFEVENTS_START};
    assert_int_equal(mt_tfevents_encode(&sl, &rec, &n, &err), MT_OK);
    expect_bytes(rec + 12, n - 16, start, sizeof start);
    free(rec);

    /* step 300: two varint bytes ac 02 */
    sl.step = 300;
    assert_int_equal(mt_tfevents_encode(&sl, &rec, &n, &err), MT_OK);
    assert_int_equal(rec[12 + 9], 0x10);
    assert_int_equal(rec[12 + 10], 0xac);
    assert_int_equal(rec[12 + 11], 0x02);
    free(rec);
}

/* ---- decoding ------------------------------------------------------------------------- */

static void test_decode(void **state) {
    (void)state;
    mt_error err = {0};
    mt_tfevents_value vals[3] = {{.tag = "loss", .simple_value = 1.25f},
                                 {.tag = "rewards/accuracies", .simple_value = -0.5f},
                                 {.tag = "\xc3\xa9t\xc3\xa9", .simple_value = 3e38f}};
    mt_tfevents_event ev = {.wall_time = 1700000000.5, .step = 123456789012LL, .kind = MT_TFEVENTS_SUMMARY,
                            .values = vals, .n_values = 3};
    uint8_t *rec;
    size_t n;
    assert_int_equal(mt_tfevents_encode(&ev, &rec, &n, &err), MT_OK);
    size_t pos = 0, len;
    const uint8_t *data;
    int torn;
    assert_int_equal(mt_tfevents_next_record(rec, n, &pos, "mem", &data, &len, &torn, &err), MT_OK);
    assert_non_null(data);
    assert_int_equal(pos, n);
    mt_tfevents_event back;
    assert_int_equal(mt_tfevents_decode(data, len, "mem", &back, &err), MT_OK);
    assert_int_equal(back.kind, MT_TFEVENTS_SUMMARY);
    assert_int_equal(back.step, 123456789012LL);
    assert_true(back.wall_time == 1700000000.5);
    assert_int_equal(back.n_values, 3);
    for (int i = 0; i < 3; i++) {
        assert_string_equal(back.values[i].tag, vals[i].tag);
        assert_true(back.values[i].simple_value == vals[i].simple_value);
        assert_true(back.values[i].has_simple_value);
    }
    mt_tfevents_event_free(&back);
    /* the end of the buffer */
    assert_int_equal(mt_tfevents_next_record(rec, n, &pos, "mem", &data, &len, &torn, &err), MT_OK);
    assert_null(data);
    assert_false(torn);

    /* a record cut short: torn, not an error, and the position stays */
    for (size_t cut = 1; cut < n; cut += 7) {
        pos = 0;
        assert_int_equal(mt_tfevents_next_record(rec, cut, &pos, "mem", &data, &len, &torn, &err), MT_OK);
        assert_null(data);
        assert_true(torn);
        assert_int_equal(pos, 0);
    }
    /* a changed byte fails a CRC: in the length, in the data */
    rec[2] ^= 1;
    pos = 0;
    assert_int_equal(mt_tfevents_next_record(rec, n, &pos, "f.tfevents", &data, &len, &torn, &err), MT_ERR_FORMAT);
    expect_msg(&err, "f.tfevents: the record at byte 0 fails its length CRC-32C check");
    rec[2] ^= 1;
    rec[20] ^= 0x40;
    assert_int_equal(mt_tfevents_next_record(rec, n, &pos, "f.tfevents", &data, &len, &torn, &err), MT_ERR_FORMAT);
    expect_msg(&err, "fails its data CRC-32C check");
    free(rec);

    /* unknown fields are skipped: Event.source_metadata (10), Value.metadata (9) */
    static const uint8_t extra[] = {0x10, 0x07, 0x52, 0x02, 0x0a, 0x00, 0x2a, 0x0c, 0x0a, 0x0a, 0x0a, 0x01, 'x',
                                    0x4a, 0x00, 0x15, 0x00, 0x00, 0x80, 0x3f};
    assert_int_equal(mt_tfevents_decode(extra, sizeof extra, "x", &back, &err), MT_OK);
    assert_int_equal(back.step, 7);
    assert_int_equal(back.n_values, 1);
    assert_string_equal(back.values[0].tag, "x");
    assert_true(back.values[0].simple_value == 1.0f);
    mt_tfevents_event_free(&back);

    /* malformed protobuf is refused, naming what */
    static const uint8_t trunc_varint[] = {0x10, 0x80};
    static const uint8_t long_len[] = {0x2a, 0x05, 0x0a};
    static const uint8_t group[] = {0x5b}; /* field 11, wire type 3 (a group) */
    static const uint8_t nul_tag[] = {0x2a, 0x05, 0x0a, 0x03, 0x0a, 0x01, 0x00};
    static const uint8_t bad_utf8[] = {0x1a, 0x01, 0xff};
    static const uint8_t wrong_wire[] = {0x08, 0x01};
    static const uint8_t field0[] = {0x00, 0x01};
    const struct { const uint8_t *d; size_t n; const char *why; } cases[] = {
        {trunc_varint, sizeof trunc_varint, "Event.step"},
        {long_len, sizeof long_len, "Event.summary"},
        {group, sizeof group, "a field of Event"},
        {nul_tag, sizeof nul_tag, "NUL"},
        {bad_utf8, sizeof bad_utf8, "UTF-8"},
        {wrong_wire, sizeof wrong_wire, "Event.wall_time"},
        {field0, sizeof field0, "a bad key"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        memset(&err, 0, sizeof err);
        assert_int_equal(mt_tfevents_decode(cases[i].d, cases[i].n, "where", &back, &err), MT_ERR_FORMAT);
        expect_msg(&err, "where: malformed Event protobuf");
        expect_msg(&err, cases[i].why);
        assert_null(back.owned);
    }
}

/* ---- files ---------------------------------------------------------------------------- */

/* Every record of a file, decoded; fails the test on a CRC or a torn tail. */
static size_t count_records(const char *path) {
    unsigned char *buf;
    size_t len, pos = 0, count = 0;
    read_all(path, &buf, &len);
    mt_error err = {0};
    for (;;) {
        const uint8_t *data;
        size_t dl;
        int torn;
        if (mt_tfevents_next_record(buf, len, &pos, path, &data, &dl, &torn, &err)) fail_msg("%s", err.msg);
        assert_false(torn);
        if (!data) break;
        mt_tfevents_event ev;
        if (mt_tfevents_decode(data, dl, path, &ev, &err)) fail_msg("%s", err.msg);
        mt_tfevents_event_free(&ev);
        count++;
    }
    free(buf);
    return count;
}

static void test_bad_input_writes_nothing(void **state) {
    (void)state;
    char *dir = mt_test_tmpdir("tfevents_bad");
    mt_error err = {0};
    mt_tfevents_writer *w = NULL;
    assert_int_equal(mt_tfevents_create(dir, 1700000000.0, -1, &w, &err), MT_OK);
    const char *path = mt_tfevents_writer_path(w);
    long size = file_size(path);
    assert_true(size > 0);

    char long_tag[MT_TFEVENTS_MAX_TAG + 2];
    memset(long_tag, 'a', sizeof long_tag - 1);
    long_tag[sizeof long_tag - 1] = '\0';
    mt_tfevents_value good = {.tag = "loss", .simple_value = 1};
    mt_tfevents_value no_tag = {.tag = NULL}, empty = {.tag = ""}, bad_utf8 = {.tag = "lo\xffss"},
                      surrogate = {.tag = "\xed\xa0\x80"}, too_long = {.tag = long_tag};
    mt_tfevents_value two_bad[2] = {{.tag = "ok"}, {.tag = "\xc3"}};
    const struct { mt_tfevents_event ev; const char *why; } cases[] = {
        {{.kind = MT_TFEVENTS_SUMMARY, .values = &no_tag, .n_values = 1}, "value 1 has no tag"},
        {{.kind = MT_TFEVENTS_SUMMARY, .values = &empty, .n_values = 1}, "value 1 has no tag"},
        {{.kind = MT_TFEVENTS_SUMMARY, .values = &bad_utf8, .n_values = 1}, "not valid UTF-8 (byte 2)"},
        {{.kind = MT_TFEVENTS_SUMMARY, .values = &surrogate, .n_values = 1}, "not valid UTF-8"},
        {{.kind = MT_TFEVENTS_SUMMARY, .values = &too_long, .n_values = 1}, "1025 bytes long"},
        {{.kind = MT_TFEVENTS_SUMMARY, .values = two_bad, .n_values = 2}, "tag of value 2"},
        {{.kind = MT_TFEVENTS_SUMMARY, .values = &good, .n_values = 0}, "1 to 4096 values"},
        {{.kind = MT_TFEVENTS_SUMMARY, .values = NULL, .n_values = 1}, "1 to 4096 values"},
        {{.kind = MT_TFEVENTS_SUMMARY, .values = &good, .n_values = MT_TFEVENTS_MAX_VALUES + 1}, "values"},
        {{.kind = MT_TFEVENTS_SESSION_LOG, .session_status = 9}, "session status 9"},
        {{.kind = MT_TFEVENTS_VERSION, .file_version = NULL}, "file_version is missing"},
        {{.kind = MT_TFEVENTS_OTHER}, "cannot write an event of kind"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        memset(&err, 0, sizeof err);
        assert_int_equal(mt_tfevents_add(w, &cases[i].ev, &err), MT_ERR_INVALID_ARG);
        expect_msg(&err, cases[i].why);
        expect_msg(&err, path); /* the message names the file */
        assert_int_equal(file_size(path), size);
    }
    assert_int_equal(mt_tfevents_add(w, NULL, &err), MT_ERR_INVALID_ARG);
    /* the writer still works after refusing bad input */
    mt_tfevents_event ok = {.wall_time = 1.0, .step = 1, .kind = MT_TFEVENTS_SUMMARY, .values = &good, .n_values = 1};
    assert_int_equal(mt_tfevents_add(w, &ok, &err), MT_OK);
    assert_true(file_size(path) > size);
    assert_int_equal(count_records(path), 2);
    assert_int_equal(mt_tfevents_close(w, &err), MT_OK);

    /* a directory that does not exist: the error names the file */
    char missing[PATH_MAX];
    snprintf(missing, sizeof missing, "%s/nope", dir);
    assert_int_equal(mt_tfevents_create(missing, 1700000000.0, -1, &w, &err), MT_ERR_IO);
    expect_msg(&err, missing);
    expect_msg(&err, "No such file or directory");
    assert_null(w);
    assert_int_equal(mt_tfevents_create(dir, -5.0, -1, &w, &err), MT_ERR_INVALID_ARG);
    mt_test_rmtree(dir);
    free(dir);
}

/* A write that fails half way (the file size limit stands in for a full disk) leaves
 * the file at its last complete record, and the writer refuses more. */
static void test_failed_write_cut_back(void **state) {
    (void)state;
    char *dir = mt_test_tmpdir("tfevents_full");
    mt_error err = {0};
    mt_tfevents_writer *w = NULL;
    assert_int_equal(mt_tfevents_create(dir, 1700000000.0, 4, &w, &err), MT_OK);
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s", mt_tfevents_writer_path(w));
    long size = file_size(path);

    struct rlimit old;
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &old), 0);
    void (*old_handler)(int) = signal(SIGXFSZ, SIG_IGN);
    struct rlimit lim = old;
    lim.rlim_cur = (rlim_t)size + 20; /* room for a part of the next record only */
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
    mt_tfevents_value vals[4] = {{.tag = "loss", .simple_value = 1}, {.tag = "lr", .simple_value = 2},
                                 {.tag = "grad_norm", .simple_value = 3}, {.tag = "tokens", .simple_value = 4}};
    mt_tfevents_event ev = {.wall_time = 1.0, .step = 5, .kind = MT_TFEVENTS_SUMMARY, .values = vals, .n_values = 4};
    mt_status st = mt_tfevents_add(w, &ev, &err);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &old), 0);
    signal(SIGXFSZ, old_handler);

    assert_int_equal(st, MT_ERR_IO);
    expect_msg(&err, path);
    expect_msg(&err, "cannot write a TensorBoard event");
    assert_int_equal(file_size(path), size); /* cut back: no torn record */
    assert_int_equal(count_records(path), 2);  /* file_version, SessionLog START */
    memset(&err, 0, sizeof err);
    assert_int_equal(mt_tfevents_add(w, &ev, &err), MT_ERR_IO);
    expect_msg(&err, "an earlier write failed");
    assert_int_equal(mt_tfevents_close(w, &err), MT_OK);
    mt_test_rmtree(dir);
    free(dir);
}

static void test_file_names(void **state) {
    (void)state;
    char *dir = mt_test_tmpdir("tfevents_names");
    mt_error err = {0};
    char host[80];
    mt_tfevents_hostname(host, sizeof host);
    assert_true(host[0] != '\0');
    assert_null(strchr(host, '/'));

    mt_tfevents_writer *a = NULL, *b = NULL;
    assert_int_equal(mt_tfevents_create(dir, 1700000000.75, -1, &a, &err), MT_OK);
    assert_int_equal(mt_tfevents_create(dir, 1700000000.9, 6, &b, &err), MT_OK); /* the same second */
    char want[PATH_MAX];
    snprintf(want, sizeof want, "%s/events.out.tfevents.1700000000.%s", dir, host);
    assert_string_equal(mt_tfevents_writer_path(a), want);
    snprintf(want, sizeof want, "%s/events.out.tfevents.1700000000.%s.001", dir, host);
    assert_string_equal(mt_tfevents_writer_path(b), want);
    /* an older file with an earlier time, and a file the reader skips */
    mt_tfevents_writer *c = NULL;
    assert_int_equal(mt_tfevents_create(dir, 999999999.0, -1, &c, &err), MT_OK);
    char skip[PATH_MAX];
    snprintf(skip, sizeof skip, "%s/x.tfevents.profile-empty", dir);
    mt_test_write_file(skip, "", 0);
    snprintf(skip, sizeof skip, "%s/metrics.jsonl", dir);
    mt_test_write_file(skip, "{}\n", 3);

    char **paths;
    size_t n;
    assert_int_equal(mt_tfevents_list(dir, &paths, &n, &err), MT_OK);
    assert_int_equal(n, 3);
    assert_string_equal(paths[0], mt_tfevents_writer_path(c)); /* 0999999999 sorts first */
    assert_string_equal(paths[1], mt_tfevents_writer_path(a));
    assert_string_equal(paths[2], mt_tfevents_writer_path(b));
    for (size_t i = 0; i < n; i++) free(paths[i]);
    free(paths);

    /* b begins with the file version and a SessionLog START at step 6 */
    unsigned char *buf;
    size_t len, pos = 0, dl;
    read_all(mt_tfevents_writer_path(b), &buf, &len);
    const uint8_t *data;
    int torn;
    mt_tfevents_event ev;
    assert_int_equal(mt_tfevents_next_record(buf, len, &pos, "b", &data, &dl, &torn, &err), MT_OK);
    assert_int_equal(mt_tfevents_decode(data, dl, "b", &ev, &err), MT_OK);
    assert_int_equal(ev.kind, MT_TFEVENTS_VERSION);
    assert_string_equal(ev.file_version, "brain.Event:2");
    assert_true(ev.wall_time == 1700000000.9);
    mt_tfevents_event_free(&ev);
    assert_int_equal(mt_tfevents_next_record(buf, len, &pos, "b", &data, &dl, &torn, &err), MT_OK);
    assert_int_equal(mt_tfevents_decode(data, dl, "b", &ev, &err), MT_OK);
    assert_int_equal(ev.kind, MT_TFEVENTS_SESSION_LOG);
    assert_int_equal(ev.session_status, MT_TFEVENTS_START);
    assert_int_equal(ev.step, 6);
    mt_tfevents_event_free(&ev);
    assert_int_equal(mt_tfevents_next_record(buf, len, &pos, "b", &data, &dl, &torn, &err), MT_OK);
    assert_null(data);
    free(buf);
    assert_int_equal(mt_tfevents_close(a, &err), MT_OK);
    assert_int_equal(mt_tfevents_close(b, &err), MT_OK);
    assert_int_equal(mt_tfevents_close(c, &err), MT_OK);
    mt_test_rmtree(dir);
    free(dir);
}

/* ---- the Lua binding ------------------------------------------------------------------ */

static mt_status run_chunk(lua_State *L, const char *code, mt_error *err) {
    memset(err, 0, sizeof *err);
    if (luaL_loadbufferx(L, code, strlen(code), "@recipe.lua", "t") != LUA_OK)
        fail_msg("test chunk does not compile: %s", lua_tostring(L, -1));
    return mt_lua_pcall(L, 0, 0, err);
}

static void expect_lua_ok(lua_State *L, const char *code) {
    mt_error err;
    if (run_chunk(L, code, &err) != MT_OK) fail_msg("expected success for [%s], got: %s", code, err.msg);
}

static void expect_lua_error(lua_State *L, const char *code, const char *needle) {
    mt_error err;
    if (run_chunk(L, code, &err) == MT_OK) fail_msg("expected an error for [%s]", code);
    if (!strstr(err.msg, needle)) fail_msg("expected '%s' in the error of [%s], got: %s", needle, code, err.msg);
}

/* In the sandbox a recipe writes events only inside its run directory, and reads them
 * only where it may read. */
static void test_lua_sandbox(void **state) {
    (void)state;
    char *root = mt_test_tmpdir("tfevents_sandbox");
    char recipe_dir[PATH_MAX], out_dir[PATH_MAX], other[PATH_MAX];
    snprintf(recipe_dir, sizeof recipe_dir, "%s/recipes", root);
    snprintf(out_dir, sizeof out_dir, "%s/out", root);
    snprintf(other, sizeof other, "%s/other", root);
    assert_int_equal(mkdir(recipe_dir, 0755), 0);
    assert_int_equal(mkdir(out_dir, 0755), 0);
    assert_int_equal(mkdir(other, 0755), 0);
    mt_error err = {0};
    mt_tfevents_writer *w = NULL; /* an events file the recipe may not read */
    assert_int_equal(mt_tfevents_create(other, 1700000000.0, -1, &w, &err), MT_OK);
    assert_int_equal(mt_tfevents_close(w, &err), MT_OK);

    lua_State *L = mt_lua_open(&err);
    assert_non_null(L);
    mt_lua_register(L);
    mt_sandbox_paths paths = {recipe_dir, out_dir, NULL, 0};
    assert_int_equal(mt_sandbox_install(L, &paths, &err), MT_OK);
    lua_pushstring(L, out_dir);
    lua_setglobal(L, "OUT_DIR");
    lua_pushstring(L, other);
    lua_setglobal(L, "OTHER");

    expect_lua_ok(L,
                  "local mt = require('moontune.core')\n"
                  "local w = mt.tensorboard_open(OUT_DIR)\n"
                  "assert(w:path():find(OUT_DIR .. '/events.out.tfevents.', 1, true) == 1, w:path())\n"
                  "w:scalars(1, { loss = 0.5, ['rewards/accuracies'] = 1, lr = 1e-4 })\n"
                  "w:scalars(2, { loss = 0.25 })\n"
                  "w:close(); w:close()\n"
                  "local ev, torn = mt.tensorboard_read(OUT_DIR)\n"
                  "assert(torn == nil, torn)\n"
                  "assert(#ev == 3, #ev)\n"
                  "assert(ev[1].kind == 'file_version' and ev[1].file_version == 'brain.Event:2')\n"
                  "assert(ev[2].kind == 'summary' and ev[2].step == 1 and #ev[2].values == 3)\n"
                  "assert(ev[2].values[1].tag == 'loss' and ev[2].values[1].value == 0.5)\n"
                  "assert(ev[2].values[2].tag == 'lr' and ev[2].values[2].value == string.unpack('f', string.pack('f', 1e-4)))\n"
                  "assert(ev[2].values[3].tag == 'rewards/accuracies' and ev[2].values[3].value == 1)\n"
                  "assert(ev[3].step == 2 and ev[3].values[1].value == 0.25)\n"
                  "assert(math.abs(ev[3].wall_time - os.time()) < 60, ev[3].wall_time)\n"
                  "local again = mt.tensorboard_read(ev[1].file)\n"
                  "assert(#again == 3)\n"
                  "local r = mt.tensorboard_open(OUT_DIR, { restart_step = 3 })\n"
                  "r:close()\n"
                  "local all = mt.tensorboard_read(OUT_DIR)\n"
                  "assert(#all == 5 and all[5].kind == 'session_log' and all[5].session_status == 'start' and all[5].step == 3)\n");
    expect_lua_error(L, "require('moontune.core').tensorboard_open(OTHER)", "sandbox: cannot write");
    expect_lua_error(L, "require('moontune.core').tensorboard_read(OTHER)", "sandbox: cannot read");
    expect_lua_error(L, "require('moontune.core').tensorboard_open(OUT_DIR .. '/missing')", "is not a directory");
    expect_lua_error(L, "require('moontune.core').tensorboard_open(OUT_DIR, { restart_step = -1 })", "restart_step");
    expect_lua_error(L, "local w = require('moontune.core').tensorboard_open(OUT_DIR) w:scalars(1, { loss = 'x' })",
                     "value 'loss' is string, want a number");
    expect_lua_error(L, "local w = require('moontune.core').tensorboard_open(OUT_DIR) w:scalars(1.5, { loss = 1 })",
                     "the step must be an integer");
    expect_lua_error(L, "local w = require('moontune.core').tensorboard_open(OUT_DIR) w:scalars(1, { [''] = 1 })",
                     "value 1 has no tag");
    expect_lua_error(L, "local w = require('moontune.core').tensorboard_open(OUT_DIR) w:close() w:scalars(1, { a = 1 })",
                     "is closed");
    /* isatty: names and file handles; a regular file and a table are no terminals */
    expect_lua_ok(L,
                  "local mt = require('moontune.core')\n"
                  "assert(type(mt.isatty('stdout')) == 'boolean')\n"
                  "assert(mt.isatty({ write = function() end }) == false)\n"
                  "local f = assert(io.open(OUT_DIR .. '/log.txt', 'w'))\n"
                  "assert(mt.isatty(f) == false)\n"
                  "f:close()\n"
                  "assert(mt.isatty(f) == false)\n");
    expect_lua_error(L, "require('moontune.core').isatty('stdpipe')", "unknown stream 'stdpipe'");
    /* an events file in the run directory that is a symlink to one outside: refused */
    char link[PATH_MAX + 32];
    snprintf(link, sizeof link, "%s/zz.tfevents", out_dir);
    char **outside;
    size_t n_outside;
    assert_int_equal(mt_tfevents_list(other, &outside, &n_outside, &err), MT_OK);
    assert_int_equal(n_outside, 1);
    assert_int_equal(symlink(outside[0], link), 0);
    free(outside[0]);
    free(outside);
    expect_lua_error(L, "require('moontune.core').tensorboard_read(OUT_DIR)", "sandbox: cannot read");
    assert_int_equal(unlink(link), 0);
    expect_lua_ok(L, "assert(#require('moontune.core').tensorboard_read(OUT_DIR) >= 5)");
    lua_close(L);

    /* a torn last record: the complete ones and a message */
    char **files;
    size_t n;
    assert_int_equal(mt_tfevents_list(out_dir, &files, &n, &err), MT_OK);
    assert_true(n >= 1);
    unsigned char *buf;
    size_t len;
    read_all(files[0], &buf, &len);
    char torn_path[PATH_MAX + 32];
    snprintf(torn_path, sizeof torn_path, "%s/cut.tfevents", other);
    mt_test_write_file(torn_path, buf, len - 3);
    free(buf);
    for (size_t i = 0; i < n; i++) free(files[i]);
    free(files);
    L = mt_lua_open(&err);
    assert_non_null(L);
    mt_lua_register(L);
    lua_pushstring(L, torn_path);
    lua_setglobal(L, "TORN");
    expect_lua_ok(L,
                  "local ev, torn = require('moontune.core').tensorboard_read(TORN)\n"
                  "assert(#ev == 2, #ev)\n"
                  "assert(torn and torn:find('ends inside a record at byte', 1, true), torn)\n");
    lua_close(L);
    mt_test_rmtree(root);
    free(root);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_crc32c_vectors),
        cmocka_unit_test(test_record_bytes),
        cmocka_unit_test(test_decode),
        cmocka_unit_test(test_bad_input_writes_nothing),
        cmocka_unit_test(test_failed_write_cut_back),
        cmocka_unit_test(test_file_names),
        cmocka_unit_test(test_lua_sandbox),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
