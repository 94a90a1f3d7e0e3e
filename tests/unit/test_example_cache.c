/* test_example_cache.c — the tokenized-example cache's files (text/example_cache.h):
 * what is saved loads back equal; a file that is damaged anywhere, truncated, written
 * for another key or holding ids beyond the vocabulary is refused (MT_ERR_FORMAT), and
 * the set is left empty; a missing file is MT_ERR_IO. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "base/internal.h"
#include "testutil.h"
#include "text/example_cache.h"

static const mt_example_options OPT = {.seq_len = 16, .truncation = MT_TRUNCATE_LEFT};

static void make_set(mt_example_set *set) {
    mt_error err = {0};
    assert_int_equal(mt_example_set_init(set, &OPT, &err), MT_OK);
    for (int e = 0; e < 5; e++) {
        int32_t ids[20];
        uint8_t trainable[20];
        const int n = 4 + 4 * e; /* the last one, 20 tokens, is cut from the left */
        for (int i = 0; i < n; i++) {
            ids[i] = (e * 31 + i * 7) % 97;
            trainable[i] = i >= n / 2;
        }
        assert_int_equal(mt_example_set_add(set, ids, trainable, (size_t)n, 0, 10 + e, &err), MT_OK);
    }
    assert_int_equal(set->n_truncated_prompt, 1);
}

static void load_into(mt_example_set *got, const char *dir, const uint8_t *key, int32_t vocab,
                      mt_status want, const char *msg) {
    mt_error err = {0};
    assert_int_equal(mt_example_set_init(got, &OPT, &err), MT_OK);
    mt_status st = mt_example_cache_load(got, dir, key, vocab, 1, &err);
    if (st != want) fail_msg("expected status %d, got %d: %s", (int)want, (int)st, err.msg);
    if (msg && !strstr(err.msg, msg)) fail_msg("expected '%s' in '%s'", msg, err.msg);
    if (st) assert_int_equal(got->n, 0);
}

static char *file_of(const char *dir, const uint8_t *key) {
    char hex[MT_SHA256_HEX], name[MT_SHA256_HEX + 8];
    mt_sha256_to_hex(key, hex);
    snprintf(name, sizeof name, "%s.mtex", hex);
    return mt_path_join(dir, name, NULL);
}

static void test_round_trip_and_refusals(void **state) {
    (void)state;
    char *dir = mt_test_tmpdir("example_cache");
    mt_example_set set, got;
    make_set(&set);
    uint8_t key[MT_SHA256_BYTES], other[MT_SHA256_BYTES];
    mt_sha256_digest("key", 3, key);
    mt_sha256_digest("other", 5, other);
    mt_error err = {0};
    load_into(&got, dir, key, 97, MT_ERR_IO, "no cached examples");
    mt_example_set_free(&got);
    assert_int_equal(mt_example_cache_save(&set, dir, key, &err), MT_OK);

    load_into(&got, dir, key, 97, MT_OK, NULL);
    assert_int_equal(got.n, set.n);
    assert_int_equal(got.n_truncated_prompt, set.n_truncated_prompt);
    for (size_t i = 0; i < set.n; i++) {
        assert_int_equal(got.ex[i].n, set.ex[i].n);
        assert_int_equal(got.ex[i].line, set.ex[i].line);
        assert_memory_equal(got.ex[i].ids, set.ex[i].ids, (size_t)set.ex[i].n * sizeof(int32_t));
        assert_memory_equal(got.ex[i].trainable, set.ex[i].trainable, (size_t)set.ex[i].n);
    }
    mt_example_set_free(&got);

    /* ids beyond a smaller vocabulary */
    load_into(&got, dir, key, 50, MT_ERR_FORMAT, "out of range");
    mt_example_set_free(&got);
    /* another seq_len is another set */
    mt_example_options opt20 = OPT;
    opt20.seq_len = 20;
    assert_int_equal(mt_example_set_init(&got, &opt20, &err), MT_OK);
    assert_int_equal(mt_example_cache_load(&got, dir, key, 97, 1, &err), MT_ERR_FORMAT);
    mt_example_set_free(&got);

    char *path = file_of(dir, key), *path2 = file_of(dir, other);
    char *data = NULL;
    size_t len = 0;
    assert_int_equal(mt_read_file(path, &data, &len, &err), MT_OK);
    /* the same file under another key's name */
    mt_test_write_file(path2, data, len);
    load_into(&got, dir, other, 97, MT_ERR_FORMAT, "another key");
    mt_example_set_free(&got);
    /* every byte flipped in turn, and every truncation, is refused */
    for (size_t i = 0; i < len; i++) {
        data[i] ^= 0x5A;
        mt_test_write_file(path, data, len);
        load_into(&got, dir, key, 97, MT_ERR_FORMAT, NULL);
        mt_example_set_free(&got);
        data[i] ^= 0x5A;
    }
    for (size_t cut = 0; cut < len; cut += 7) {
        mt_test_write_file(path, data, cut);
        load_into(&got, dir, key, 97, MT_ERR_FORMAT, NULL);
        mt_example_set_free(&got);
    }
    free(data);
    free(path);
    free(path2);
    mt_example_set_free(&set);
    mt_test_rmtree(dir);
    free(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_round_trip_and_refusals)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
