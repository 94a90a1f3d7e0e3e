/* test_cli_args.c — the commands' shared argument reader (core/cli/cli_args.c) and the
 * key=value splitter (core/base): every GNU form, arguments in order, and a refusal
 * for each kind of mistake. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "base/internal.h"
#include "cli/cli_args.h"
#include "testutil.h"

enum { OPT_SEQ = 256, OPT_FLAG, OPT_MAYBE };

static const struct option options[] = {
    {"help", no_argument, NULL, MT_CLI_HELP},
    {"seq", required_argument, NULL, OPT_SEQ},
    {"flag", no_argument, NULL, OPT_FLAG},
    {"maybe", optional_argument, NULL, OPT_MAYBE},
    {NULL, 0, NULL, 0},
};

static void no_usage(FILE *out) { (void)out; }

/* Reads argv and writes what came back as "seq(--seq)=5 pos=a flag ..." into out. */
static int read_all(int argc, const char **argv, char *out, size_t size) {
    static const mt_cli cli = {"moontune test", options, no_usage, NULL, 0};
    out[0] = '\0';
    const char *v, *flag;
    int c;
    mt_cli_begin();
    while ((c = mt_cli_next(&cli, argc, (char **)argv, &v, &flag)) != -1) {
        size_t n = strlen(out);
        if (c == MT_CLI_REFUSED) return c;
        if (c == MT_CLI_HELP) snprintf(out + n, size - n, "help ");
        else if (c == MT_CLI_POSITIONAL) snprintf(out + n, size - n, "pos=%s ", v);
        else if (c == OPT_FLAG) snprintf(out + n, size - n, "flag(%s) ", flag);
        else snprintf(out + n, size - n, "%s=%s ", flag, v ? v : "(none)");
    }
    return 0;
}

#define READS(expected, ...)                                                                  \
    do {                                                                                      \
        const char *argv[] = {"test", __VA_ARGS__};                                           \
        char out[512];                                                                        \
        assert_int_equal(read_all((int)(sizeof argv / sizeof argv[0]), argv, out, sizeof out), \
                         0);                                                                  \
        assert_string_equal(out, expected);                                                   \
    } while (0)

#define REFUSES(...)                                                                          \
    do {                                                                                      \
        const char *argv[] = {"test", __VA_ARGS__};                                           \
        char out[512];                                                                        \
        assert_int_equal(read_all((int)(sizeof argv / sizeof argv[0]), argv, out, sizeof out), \
                         MT_CLI_REFUSED);                                                     \
    } while (0)

static void test_forms(void **state) {
    (void)state;
    READS("--seq=5 ", "--seq", "5");
    READS("--seq=5 ", "--seq=5");
    READS("--seq=5 ", "--se", "5");               /* a unique prefix */
    READS("--seq=-3 ", "--seq", "-3");            /* a value may start with '-' */
    READS("pos=a --seq=1 pos=b flag(--flag) ", "a", "--seq", "1", "b", "--flag");
    READS("flag(--flag) pos=--seq pos=x ", "--flag", "--", "--seq", "x"); /* after --: words */
    READS("--maybe=(none) pos=p ", "--maybe", "p"); /* the word after stays in place */
    READS("--maybe=q ", "--maybe=q");
    READS("help ", "-h");
    READS("help ", "--help");
}

static void test_refusals(void **state) {
    (void)state;
    REFUSES("--bogus");
    REFUSES("--seq");       /* no value */
    REFUSES("--flag=1");    /* a flag takes none */
    REFUSES("-x");
    REFUSES("a", "--nope", "b");
}

/* Numeric options are parsed by the reader into their targets, within their limits. */
static void test_numbers(void **state) {
    (void)state;
    int seq = -1;
    uint64_t seed = 0;
    const mt_cli_number numbers[] = {{OPT_SEQ, MT_CLI_INT, &MT_LIMIT_SEQ_LEN, &seq},
                                     {OPT_MAYBE, MT_CLI_SEED, NULL, &seed}};
    const mt_cli cli = {"moontune test", options, no_usage, numbers, 2};
    const char *ok[] = {"test", "--seq", "128", "pos", "--maybe=18446744073709551615", "--flag"};
    const char *v, *flag;
    int c, seen = 0;
    mt_cli_begin();
    while ((c = mt_cli_next(&cli, 6, (char **)ok, &v, &flag)) != -1) {
        assert_true(c == MT_CLI_POSITIONAL || c == OPT_FLAG); /* numbers are not returned */
        seen++;
    }
    assert_int_equal(seen, 2);
    assert_int_equal(seq, 128);
    assert_true(seed == UINT64_MAX);
    const char *big[] = {"test", "--seq", "4294967298"};
    mt_cli_begin();
    assert_int_equal(mt_cli_next(&cli, 3, (char **)big, &v, &flag), MT_CLI_REFUSED);
    assert_int_equal(seq, 128); /* untouched when refused */
}

static void test_split_kv(void **state) {
    (void)state;
    char key[8];
    const char *value = NULL;
    mt_error err = {0};
    assert_int_equal(mt_split_kv("--set", "lora.r=16", key, sizeof key, &value, &err), MT_OK);
    assert_string_equal(key, "lora.r");
    assert_string_equal(value, "16");
    assert_int_equal(mt_split_kv("--set", "a=b=c", key, sizeof key, &value, &err), MT_OK);
    assert_string_equal(key, "a");
    assert_string_equal(value, "b=c");
    assert_int_equal(mt_split_kv("--set", "k=", key, sizeof key, &value, &err), MT_OK);
    assert_string_equal(value, "");
    assert_int_equal(mt_split_kv("--set", "=3", key, sizeof key, &value, &err), MT_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "--set =3: expected key=value"));
    assert_int_equal(mt_split_kv("--x", "novalue", key, sizeof key, &value, &err), MT_ERR_INVALID_ARG);
    assert_int_equal(mt_split_kv("--x", "longerkey=1", key, sizeof key, &value, &err),
                     MT_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "longer than 7 bytes"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_forms),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_numbers),
        cmocka_unit_test(test_split_kv),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
