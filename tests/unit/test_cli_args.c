/* test_cli_args.c — the commands' shared argument reader (core/cli/cli_args.c) and the
 * key=value splitter (core/base): every GNU form, arguments in order, and a refusal
 * for each kind of mistake; --device and the backend it starts (model/device_select.c). */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "base/internal.h"
#include "cli/cli_args.h"
#include "model/device.h"
#include "model/device_select.h"
#include "testutil.h"

enum { OPT_SEQ = 256, OPT_FLAG, OPT_MAYBE };

static const struct option options[] = {
    {"help", no_argument, NULL, MT_CLI_HELP},
    {"seq", required_argument, NULL, OPT_SEQ},
    {"flag", no_argument, NULL, OPT_FLAG},
    {"maybe", optional_argument, NULL, OPT_MAYBE},
    MT_CLI_DEVICE_OPTION,
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
        else if (c == MT_CLI_DEVICE) snprintf(out + n, size - n, "device(%s)=%s ", flag, v);
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

/* --device takes cpu or cuda in every GNU form; anything else is refused by the reader,
 * with a message that names the choices and what was given. */
static void test_device_option(void **state) {
    (void)state;
    READS("device(--device)=cpu ", "--device", "cpu");
    READS("device(--device)=cuda pos=x ", "--device=cuda", "x");
    READS("device(--device)=cpu ", "--dev", "cpu"); /* a unique prefix */
    READS("--seq=1 device(--device)=cuda device(--device)=cpu ", "--seq", "1", "--device", "cuda",
          "--device", "cpu"); /* the last one counts: the command stores each in turn */
    REFUSES("--device", "gpu");
    REFUSES("--device", "CPU"); /* names are exact */
    REFUSES("--device=");
    REFUSES("--device"); /* no value */
    mt_error err = {0};
    assert_int_equal(mt_cli_check_device("--device", "gpu", &err), MT_ERR_INVALID_ARG);
    assert_string_equal(err.msg, "--device: expected cpu or cuda, got \"gpu\"");
    assert_int_equal(mt_cli_check_device("--device", "", &err), MT_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "expected cpu or cuda"));
    assert_int_equal(mt_cli_check_device("--device", "cuda", &err), MT_OK);
    /* below the command line, NULL and "" mean the default */
    assert_int_equal(mt_device_check_name("device", NULL, &err), MT_OK);
    assert_int_equal(mt_device_check_name("device", "", &err), MT_OK);
    assert_int_equal(mt_device_check_name("mt.model: option 'device'", "tpu", &err),
                     MT_ERR_INVALID_ARG);
    assert_string_equal(err.msg, "mt.model: option 'device': expected cpu or cuda, got \"tpu\"");
}

/* The backend each choice starts: cpu always; the default is cuda exactly when cuda
 * starts; a named cuda that cannot start is an error naming the reason, never the CPU.
 * A started CUDA backend is bound to its device until stopped (the CPU needs no binding:
 * model/device.c keeps one process-wide). */
static void test_device_backend(void **state) {
    (void)state;
    mt_backend be;
    mt_error err = {0};
    char why[256];
    assert_int_equal(mt_device_backend_start("--device", "cpu", 1, &be, why, sizeof why, &err),
                     MT_OK);
    assert_int_equal(be.device, MT_DEVICE_CPU);
    assert_string_equal(be.name, "cpu");
    assert_string_equal(why, ""); /* named: no fallback to explain */
    mt_device_backend_stop(&be);
    assert_null(be.ops); /* stopped; host memory still has its process-wide CPU backend */
    assert_non_null(mt_device_backend(MT_DEVICE_CPU, &err));

    mt_status cuda = mt_device_backend_start("--device", "cuda", 0, &be, NULL, 0, &err);
    if (cuda == MT_OK) { /* a machine with a usable GPU */
        assert_int_equal(be.device, MT_DEVICE_CUDA);
        assert_ptr_equal(mt_device_backend(MT_DEVICE_CUDA, &err), &be);
        mt_device_backend_stop(&be);
        assert_null(mt_device_backend(MT_DEVICE_CUDA, &err));
    } else {
        assert_true(!strncmp(err.msg, "--device cuda: ", 15));
#ifdef MT_HAVE_CUDA
        assert_non_null(strstr(err.msg, "CUDA device")); /* "no CUDA device ..." */
#else
        assert_string_equal(err.msg, "--device cuda: this moontune was built without the CUDA "
                                     "backend (nvcc was not found at build time)");
#endif
        assert_null(mt_device_backend(MT_DEVICE_CUDA, &err)); /* nothing bound */
    }
    assert_int_equal(mt_device_backend_start(NULL, NULL, 1, &be, why, sizeof why, &err), MT_OK);
    assert_int_equal(be.device, cuda == MT_OK ? MT_DEVICE_CUDA : MT_DEVICE_CPU);
    if (cuda != MT_OK) assert_true(why[0] != '\0'); /* the fallback keeps its reason */
    assert_string_equal(mt_device_default_name(NULL, 0), cuda == MT_OK ? "cuda" : "cpu");
    mt_device_backend_stop(&be);
    assert_int_equal(mt_device_backend_start("--device", "gpu", 1, &be, NULL, 0, &err),
                     MT_ERR_INVALID_ARG);
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
        cmocka_unit_test(test_device_option),
        cmocka_unit_test(test_device_backend),
        cmocka_unit_test(test_split_kv),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
