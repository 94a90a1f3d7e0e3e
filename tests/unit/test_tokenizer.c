/* test_tokenizer.c — the tokenizers against the `tokenizers` library's ids
 * (tests/parity/make_tokenizer_reference.py wrote tests/fixtures/tokenizer/), the
 * GGUF-built SmolLM2 tokenizer against the tokenizer.json one, throughput, and the
 * errors malformed tokenizer files give. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "base/internal.h"
#include "text/tokenizer.h"
#include "text/unicode_nfc.h"

#define TOK_DIR MT_FIXTURE_DIR "/tokenizer"


static int ids_equal(const mt_token_list *l, json_t *arr) {
    if (l->n != json_array_size(arr)) return 0;
    for (size_t i = 0; i < l->n; i++)
        if (l->ids[i] != json_integer_value(json_array_get(arr, i))) return 0;
    return 1;
}

static void print_mismatch(const char *name, size_t k, const char *text, const mt_token_list *l, json_t *arr) {
    fprintf(stderr, "%s: line %zu differs: \"%.80s\"\n  got     ", name, k + 1, text);
    for (size_t i = 0; i < l->n && i < 40; i++) fprintf(stderr, " %d", l->ids[i]);
    if (!arr) {
        fprintf(stderr, "\n");
        return;
    }
    fprintf(stderr, "\n  expected");
    for (size_t i = 0; i < json_array_size(arr) && i < 40; i++)
        fprintf(stderr, " %d", (int)json_integer_value(json_array_get(arr, i)));
    fprintf(stderr, "\n");
}

/* Every line of the corpus: ids with and without special tokens, decode strings,
 * offsets in order; byte-level tokenizers must round-trip exactly. */
static void check_parity(const char *name) {
    char dir[512], exp_path[600];
    snprintf(dir, sizeof dir, "%s/%s", TOK_DIR, name);
    snprintf(exp_path, sizeof exp_path, "%s/expected.json", dir);
    mt_error err;
    mt_tokenizer *tok;
    mt_status st = mt_tokenizer_load_dir(dir, &tok, &err);
    if (st) fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(st, MT_OK);
    json_error_t je;
    json_t *exp = json_load_file(exp_path, 0, &je);
    assert_non_null(exp);
    json_t *samples = json_object_get(exp, "samples");
    mt_test_corpus c;
    mt_test_corpus_load(&c);
    assert_int_equal(json_array_size(samples), c.n);
    size_t ok_ids = 0, ok_special = 0, ok_dec = 0, ok_skip = 0, ok_rt = 0, ok_offs = 0;
    for (size_t k = 0; k < c.n; k++) {
        json_t *s = json_array_get(samples, k);
        mt_token_list l = {0}, ls = {0};
        st = mt_tokenizer_encode(tok, c.line[k], c.len[k], 0, &l, &err);
        if (st) fprintf(stderr, "%s line %zu: %s\n", name, k + 1, err.msg);
        assert_int_equal(st, MT_OK);
        assert_int_equal(mt_tokenizer_encode(tok, c.line[k], c.len[k], 1, &ls, &err), MT_OK);
        if (ids_equal(&l, json_object_get(s, "ids"))) ok_ids++;
        else print_mismatch(name, k, c.line[k], &l, json_object_get(s, "ids"));
        if (ids_equal(&ls, json_object_get(s, "ids_special"))) ok_special++;
        else print_mismatch(name, k, c.line[k], &ls, json_object_get(s, "ids_special"));
        int offs = 1;
        for (size_t i = 0; i < ls.n; i++)
            if (ls.offsets[i] < 0 || (size_t)ls.offsets[i] > c.len[k] || (i && ls.offsets[i] < ls.offsets[i - 1])) offs = 0;
        ok_offs += offs;
        char *text;
        size_t tl;
        assert_int_equal(mt_tokenizer_decode(tok, l.ids, l.n, 0, &text, &tl, &err), MT_OK);
        assert_int_equal(strlen(text), tl);
        const char *want = json_string_value(json_object_get(s, "decoded"));
        if (strcmp(text, want) == 0) ok_dec++;
        else fprintf(stderr, "%s: line %zu decodes to \"%.80s\", expected \"%.80s\"\n", name, k + 1, text, want);
        if (tl == c.len[k] && memcmp(text, c.line[k], tl) == 0) ok_rt++;
        free(text);
        assert_int_equal(mt_tokenizer_decode(tok, ls.ids, ls.n, 1, &text, &tl, &err), MT_OK);
        want = json_string_value(json_object_get(s, "decoded_skip"));
        if (strcmp(text, want) == 0) ok_skip++;
        else fprintf(stderr, "%s: line %zu decodes (skipping special) to \"%.80s\", expected \"%.80s\"\n", name, k + 1, text, want);
        free(text);
        mt_token_list_free(&l);
        mt_token_list_free(&ls);
    }
    size_t ref_rt = 0;
    for (size_t k = 0; k < c.n; k++)
        ref_rt += strcmp(json_string_value(json_object_get(json_array_get(samples, k), "decoded")), c.line[k]) == 0;
    size_t m = c.n;
    printf("tokenizer %-9s: %zu lines; ids %zu/%zu, ids+special %zu/%zu, decode %zu/%zu, decode(skip special) %zu/%zu, "
           "offsets ordered %zu/%zu, round trip %zu/%zu (tokenizers: %zu)",
           name, c.n, ok_ids, m, ok_special, m, ok_dec, m, ok_skip, m, ok_offs, m, ok_rt, m, ref_rt);
    printf("\n");
    assert_int_equal(ok_ids, m);
    assert_int_equal(ok_special, m);
    assert_int_equal(ok_dec, m);
    assert_int_equal(ok_skip, m);
    assert_int_equal(ok_offs, m);
    /* byte-level tokenizers round-trip, except where NFC (qwen2) changed the text */
    if (mt_tokenizer_get_family(tok) == MT_TOK_BYTE_LEVEL_BPE) assert_int_equal(ok_rt, ref_rt);
    if (mt_tokenizer_get_family(tok) == MT_TOK_BYTE_LEVEL_BPE && strcmp(name, "qwen2") != 0) assert_int_equal(ok_rt, c.n);
    mt_test_corpus_free(&c);
    json_decref(exp);
    mt_tokenizer_free(tok);
}

static void test_parity_smollm2(void **state) { (void)state; check_parity("smollm2"); }
static void test_parity_llama3(void **state) { (void)state; check_parity("llama3"); }
static void test_parity_qwen2(void **state) { (void)state; check_parity("qwen2"); }
static void test_parity_spm(void **state) { (void)state; check_parity("spm"); }
static void test_parity_metaspace(void **state) { (void)state; check_parity("metaspace"); }

static void test_properties(void **state) {
    (void)state;
    mt_error err;
    mt_tokenizer *tok;
    assert_int_equal(mt_tokenizer_load_dir(TOK_DIR "/smollm2", &tok, &err), MT_OK);
    assert_int_equal(mt_tokenizer_get_family(tok), MT_TOK_BYTE_LEVEL_BPE);
    assert_int_equal(mt_tokenizer_vocab_size(tok), 49152);
    assert_int_equal(mt_tokenizer_token_id(tok, "<|im_end|>"), 2);
    assert_int_equal(mt_tokenizer_bos(tok), 1);
    assert_int_equal(mt_tokenizer_eos(tok), 2);
    assert_int_equal(mt_tokenizer_pad(tok), 2);
    assert_false(mt_tokenizer_adds_bos(tok));
    assert_false(mt_tokenizer_adds_eos(tok));
    assert_true(mt_tokenizer_is_special(tok, 1));
    assert_false(mt_tokenizer_is_special(tok, 100));
    assert_string_equal(mt_tokenizer_token_text(tok, 2), "<|im_end|>");
    assert_null(mt_tokenizer_token_text(tok, 49152));
    assert_non_null(mt_tokenizer_chat_template(tok));
    assert_non_null(strstr(mt_tokenizer_chat_template(tok), "<|im_start|>"));
    /* special tokens in the text, offsets at their starts */
    const char *t = "hi<|im_end|>";
    mt_token_list l = {0};
    assert_int_equal(mt_tokenizer_encode(tok, t, strlen(t), 1, &l, &err), MT_OK);
    assert_int_equal(l.ids[l.n - 1], 2);
    assert_int_equal(l.offsets[l.n - 1], 2);
    /* invalid UTF-8 is an error naming the offset, and leaves the list as it was */
    size_t n0 = l.n;
    assert_int_equal(mt_tokenizer_encode(tok, "ab\xC3(", 4, 0, &l, &err), MT_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "byte offset 2"));
    assert_int_equal(l.n, n0);
    int32_t bad = 49152;
    char *text;
    assert_int_not_equal(mt_tokenizer_decode(tok, &bad, 1, 0, &text, NULL, &err), MT_OK);
    assert_null(text);
    mt_token_list_free(&l);
    mt_tokenizer_free(tok);

    assert_int_equal(mt_tokenizer_load_dir(TOK_DIR "/spm", &tok, &err), MT_OK);
    assert_int_equal(mt_tokenizer_get_family(tok), MT_TOK_SENTENCEPIECE_BPE);
    assert_true(mt_tokenizer_adds_bos(tok));
    assert_false(mt_tokenizer_adds_eos(tok));
    assert_int_equal(mt_tokenizer_bos(tok), mt_tokenizer_token_id(tok, "<s>"));
    assert_int_equal(mt_tokenizer_eos(tok), mt_tokenizer_token_id(tok, "</s>"));
    assert_int_equal(mt_tokenizer_pad(tok), -1);
    assert_non_null(mt_tokenizer_chat_template(tok));
    mt_tokenizer_free(tok);

    assert_int_equal(mt_tokenizer_load_dir(TOK_DIR "/metaspace", &tok, &err), MT_OK);
    assert_true(mt_tokenizer_adds_bos(tok));
    assert_true(mt_tokenizer_adds_eos(tok));
    assert_null(mt_tokenizer_chat_template(tok));
    assert_int_equal(mt_tokenizer_encode(tok, "a", 1, 1, &l, &err), MT_OK);
    assert_int_equal(l.ids[0], mt_tokenizer_bos(tok));
    assert_int_equal(l.ids[l.n - 1], mt_tokenizer_eos(tok));
    assert_int_equal(l.offsets[l.n - 1], 1);
    mt_token_list_free(&l);
    mt_tokenizer_free(tok);

    assert_int_equal(mt_tokenizer_load_dir(TOK_DIR "/qwen2", &tok, &err), MT_OK);
    assert_int_equal(mt_tokenizer_bos(tok), -1); /* "bos_token": null */
    assert_int_equal(mt_tokenizer_eos(tok), mt_tokenizer_token_id(tok, "<|im_end|>"));
    assert_int_equal(mt_tokenizer_pad(tok), mt_tokenizer_token_id(tok, "<|endoftext|>"));
    assert_false(mt_tokenizer_adds_bos(tok));
    /* NFC: a decomposed e-acute encodes as the precomposed one; offsets stay in the
     * original text */
    {
        mt_token_list a = {0};
        assert_int_equal(mt_tokenizer_encode(tok, " caf\xC3\xA9", 6, 0, &a, &err), MT_OK);
        assert_int_equal(mt_tokenizer_encode(tok, " cafe\xCC\x81", 7, 0, &l, &err), MT_OK);
        assert_int_equal(l.n, a.n);
        assert_memory_equal(l.ids, a.ids, a.n * sizeof(int32_t));
        for (size_t i = 0; i < l.n; i++) assert_true(l.offsets[i] <= 4 && (i == 0 || l.offsets[i] >= l.offsets[i - 1]));
        mt_token_list_free(&a);
        mt_token_list_free(&l);
    }
    mt_tokenizer_free(tok);

    assert_int_equal(mt_tokenizer_load_dir(TOK_DIR "/llama3", &tok, &err), MT_OK);
    assert_true(mt_tokenizer_adds_bos(tok)); /* from the TemplateProcessing post-processor */
    assert_int_equal(mt_tokenizer_bos(tok), mt_tokenizer_token_id(tok, "<|begin_of_text|>"));
    mt_tokenizer_free(tok);
}

/* The SmolLM2 tokenizer built from GGUF metadata encodes the corpus as the
 * tokenizer.json one does. */
static void test_gguf_matches_json(void **state) {
    (void)state;
    const char *path = mt_test_smollm2_gguf();
    if (!path) skip();
    mt_error err;
    mt_tokenizer *g, *j;
    mt_status st = mt_tokenizer_load_gguf(path, &g, &err);
    if (st) fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(st, MT_OK);
    assert_int_equal(mt_tokenizer_load_dir(TOK_DIR "/smollm2", &j, &err), MT_OK);
    assert_int_equal(mt_tokenizer_get_family(g), MT_TOK_BYTE_LEVEL_BPE);
    assert_int_equal(mt_tokenizer_vocab_size(g), mt_tokenizer_vocab_size(j));
    assert_int_equal(mt_tokenizer_bos(g), mt_tokenizer_bos(j));
    assert_int_equal(mt_tokenizer_eos(g), mt_tokenizer_eos(j));
    assert_int_equal(mt_tokenizer_pad(g), mt_tokenizer_pad(j));
    assert_int_equal(mt_tokenizer_adds_bos(g), mt_tokenizer_adds_bos(j));
    assert_non_null(mt_tokenizer_chat_template(g));
    assert_string_equal(mt_tokenizer_chat_template(g), mt_tokenizer_chat_template(j));
    mt_test_corpus c;
    mt_test_corpus_load(&c);
    size_t same = 0, same_dec = 0;
    for (size_t k = 0; k < c.n; k++) {
        mt_token_list a = {0}, b = {0};
        assert_int_equal(mt_tokenizer_encode(g, c.line[k], c.len[k], 1, &a, &err), MT_OK);
        assert_int_equal(mt_tokenizer_encode(j, c.line[k], c.len[k], 1, &b, &err), MT_OK);
        if (a.n == b.n && memcmp(a.ids, b.ids, a.n * sizeof(int32_t)) == 0) same++;
        else fprintf(stderr, "gguf: line %zu differs from tokenizer.json\n", k + 1);
        char *text;
        size_t tl;
        assert_int_equal(mt_tokenizer_decode(g, a.ids, a.n, 0, &text, &tl, &err), MT_OK);
        same_dec += tl == c.len[k] && memcmp(text, c.line[k], tl) == 0;
        free(text);
        mt_token_list_free(&a);
        mt_token_list_free(&b);
    }
    printf("tokenizer gguf     : %zu lines; ids equal to tokenizer.json %zu/%zu, round trip %zu/%zu\n", c.n, same, c.n,
           same_dec, c.n);
    assert_int_equal(same, c.n);
    assert_int_equal(same_dec, c.n);
    mt_test_corpus_free(&c);
    mt_tokenizer_free(g);
    mt_tokenizer_free(j);
}

/* A fixture tokenizer written as llama.cpp stores it (tests/parity/
 * make_tokenizer_reference.py: spm with scores and no merges, llama3 as "llama-bpe",
 * qwen2 as "qwen2") gives the ids and decodes of its tokenizer.json. GGUF carries no
 * normalizer, so the lines NFC changes are left out for qwen2. */
static void check_gguf(const char *name, mt_tokenizer_family family) {
    char dir[512], path[600];
    snprintf(dir, sizeof dir, "%s/%s", TOK_DIR, name);
    snprintf(path, sizeof path, "%s/tokenizer.gguf", dir);
    mt_error err;
    mt_tokenizer *g, *j;
    mt_status st = mt_tokenizer_load_gguf(path, &g, &err);
    if (st) fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(st, MT_OK);
    assert_int_equal(mt_tokenizer_load_dir(dir, &j, &err), MT_OK);
    assert_int_equal(mt_tokenizer_get_family(g), family);
    assert_int_equal(mt_tokenizer_bos(g), mt_tokenizer_bos(j) >= 0 ? mt_tokenizer_bos(j) : mt_tokenizer_bos(g));
    assert_int_equal(mt_tokenizer_adds_bos(g), mt_tokenizer_adds_bos(j));
    assert_int_equal(mt_tokenizer_adds_eos(g), mt_tokenizer_adds_eos(j));
    mt_test_corpus c;
    mt_test_corpus_load(&c);
    size_t same = 0, same_dec = 0, n = 0;
    for (size_t k = 0; k < c.n; k++) {
        mt_token_list a = {0}, b = {0};
        if (strcmp(name, "qwen2") == 0) { /* GGUF has no NFC normalizer: lines NFC changes are left out */
            char *nfc;
            size_t nl;
            assert_int_equal(mt_utf8_nfc(c.line[k], c.len[k], &nfc, &nl, &err), MT_OK);
            int same_text = nl == c.len[k] && memcmp(nfc, c.line[k], nl) == 0;
            free(nfc);
            if (!same_text) continue;
        }
        assert_int_equal(mt_tokenizer_encode(j, c.line[k], c.len[k], 1, &b, &err), MT_OK);
        n++;
        assert_int_equal(mt_tokenizer_encode(g, c.line[k], c.len[k], 1, &a, &err), MT_OK);
        if (a.n == b.n && memcmp(a.ids, b.ids, a.n * sizeof(int32_t)) == 0) same++;
        else print_mismatch(path, k, c.line[k], &a, NULL);
        char *t1, *t2;
        size_t l1, l2;
        assert_int_equal(mt_tokenizer_decode(g, b.ids, b.n, 1, &t1, &l1, &err), MT_OK);
        assert_int_equal(mt_tokenizer_decode(j, b.ids, b.n, 1, &t2, &l2, &err), MT_OK);
        same_dec += l1 == l2 && memcmp(t1, t2, l1) == 0;
        free(t1);
        free(t2);
        mt_token_list_free(&a);
        mt_token_list_free(&b);
    }
    printf("tokenizer gguf %-9s: %zu lines; ids equal to tokenizer.json %zu/%zu, decode equal %zu/%zu\n", name, n,
           same, n, same_dec, n);
    assert_true(n > c.n / 2);
    assert_int_equal(same, n);
    assert_int_equal(same_dec, n);
    mt_test_corpus_free(&c);
    mt_tokenizer_free(g);
    mt_tokenizer_free(j);
}

static void test_gguf_fixtures(void **state) {
    (void)state;
    check_gguf("spm", MT_TOK_SENTENCEPIECE_BPE);
    check_gguf("llama3", MT_TOK_BYTE_LEVEL_BPE);
    check_gguf("qwen2", MT_TOK_BYTE_LEVEL_BPE);
}

/* mt_utf8_nfc against Python's unicodedata.normalize('NFC', ...) (the expected bytes
 * were computed with it, Unicode 13.0 and 14.0 alike). */
static void test_nfc(void **state) {
    (void)state;
    static const struct { const char *in, *want; } cases[] = {
        {"\x78\xCC\x81\xCC\x96", "\x78\xCC\x96\xCC\x81"}, /* marks put in canonical order */
        {"\x61\xCC\x81\xCC\x96", "\xC3\xA1\xCC\x96"}, /* reordered, then composed past the lower class */
        {"\x65\xCC\x81\x20\x41\xCC\x8A", "\xC3\xA9\x20\xC3\x85"}, /* precomposed */
        {"\xE1\xB8\x8B\xCC\xA3", "\xE1\xB8\x8D\xCC\x87"}, /* decomposed, reordered, recomposed */
        {"\xE0\xA5\x98\xE0\xA4\x95\xE0\xA4\xBC", "\xE0\xA4\x95\xE0\xA4\xBC\xE0\xA4\x95\xE0\xA4\xBC"}, /* composition exclusion */
        {"\xE1\x84\x80\xE1\x85\xA1\x20\xE1\x84\x80\xE1\x85\xA1\xE1\x86\xA8\x20\xEA\xB0\x80\xE1\x86\xA8", "\xEA\xB0\x80\x20\xEA\xB0\x81\x20\xEA\xB0\x81"}, /* Hangul LV, LVT from jamo, LV+T */
        {"\xE2\x84\xAB\xE2\x84\xA6", "\xC3\x85\xCE\xA9"}, /* singletons */
        {"\xCD\x84", "\xCC\x88\xCC\x81"}, /* non-starter decomposition */
        {"\x61\xCC\x88\xCC\x81\xCC\x88", "\xC3\xA4\xCC\x81\xCC\x88"}, /* blocked second diaeresis */
        {"\x68\x65\x6C\x6C\x6F\x2C\x20\xE4\xB8\x96\xE7\x95\x8C\x20\x63\x61\x66\xC3\xA9\x20\xED\x95\x9C\xEA\xB5\xAD\xEC\x96\xB4", "\x68\x65\x6C\x6C\x6F\x2C\x20\xE4\xB8\x96\xE7\x95\x8C\x20\x63\x61\x66\xC3\xA9\x20\xED\x95\x9C\xEA\xB5\xAD\xEC\x96\xB4"}, /* unchanged */
    };
    mt_error err;
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        char *out;
        size_t n;
        assert_int_equal(mt_utf8_nfc(cases[k].in, strlen(cases[k].in), &out, &n, &err), MT_OK);
        assert_int_equal(n, strlen(cases[k].want));
        assert_string_equal(out, cases[k].want);
        free(out);
    }
    char *out;
    size_t n;
    assert_int_equal(mt_utf8_nfc("", 0, &out, &n, &err), MT_OK);
    assert_int_equal(n, 0);
    free(out);
    assert_int_equal(mt_utf8_nfc("a\xCC", 2, &out, &n, &err), MT_ERR_INVALID_ARG);
    assert_int_equal(mt_utf8_nfc("\xED\xA0\x80", 3, &out, &n, &err), MT_ERR_INVALID_ARG); /* a surrogate */
    /* a run of marks longer than the insertion sort takes: a + 40 x (U+0301 U+0316)
     * is a-acute, 40 x U+0316, 39 x U+0301 */
    char in[1 + 40 * 4], want[2 + 79 * 2];
    in[0] = 'a';
    for (int i = 0; i < 40; i++) memcpy(in + 1 + 4 * i, "\xCC\x81\xCC\x96", 4);
    memcpy(want, "\xC3\xA1", 2);
    for (int i = 0; i < 79; i++) memcpy(want + 2 + 2 * i, i < 40 ? "\xCC\x96" : "\xCC\x81", 2);
    assert_int_equal(mt_utf8_nfc(in, sizeof in, &out, &n, &err), MT_OK);
    assert_int_equal(n, sizeof want);
    assert_memory_equal(out, want, sizeof want);
    free(out);
    /* offsets: a composed character takes its starter's, a reordered mark the smallest
     * at or after it; unchanged characters keep one per byte */
    char buf[64];
    size_t src[64];
    assert_int_equal(mt_utf8_nfc_into("x\xCC\x81\xCC\x96", 5, NULL, buf, src, &n, &err), MT_OK);
    assert_int_equal(n, 5);
    static const size_t want_src1[] = {0, 1, 1, 1, 2};
    assert_memory_equal(src, want_src1, sizeof want_src1);
    assert_int_equal(mt_utf8_nfc_into("e\xCC\x81 A\xCC\x8A\xC3\xA9", 9, NULL, buf, src, &n, &err), MT_OK);
    assert_int_equal(n, 7);
    static const size_t want_src2[] = {0, 0, 3, 4, 4, 7, 8};
    assert_memory_equal(src, want_src2, sizeof want_src2);
    assert_non_null(mt_nfc_unicode_version());
}

static void test_throughput(void **state) {
    (void)state;
    mt_error err;
    mt_tokenizer *tok;
    assert_int_equal(mt_tokenizer_load_dir(TOK_DIR "/smollm2", &tok, &err), MT_OK);
    mt_test_corpus c;
    mt_test_corpus_load(&c);
    size_t bytes = 0, ids = 0;
    mt_token_list l = {0};
    double t0 = mt_now_seconds(), t;
    do {
        for (size_t k = 0; k < c.n; k++) {
            l.n = 0;
            assert_int_equal(mt_tokenizer_encode(tok, c.line[k], c.len[k], 0, &l, &err), MT_OK);
            bytes += c.len[k];
            ids += l.n;
        }
        t = mt_now_seconds() - t0;
    } while (t < 0.5);
    printf("tokenizer throughput (smollm2, one thread): %.2f MB/s, %.0f tokens/s\n", bytes / t / 1e6, ids / t);
    mt_token_list_free(&l);
    mt_test_corpus_free(&c);
    mt_tokenizer_free(tok);
}

/* A malformed tokenizer.json fails with a message naming the file and the fault. */
static void expect_bad(const char *dir, const char *content, const char *needle) {
    char *path = mt_path_join(dir, "tokenizer.json", NULL);
    assert_non_null(path);
    mt_test_write_file(path, content, strlen(content));
    mt_error err;
    mt_tokenizer *tok = (mt_tokenizer *)1;
    mt_status st = mt_tokenizer_load_json(path, NULL, &tok, &err);
    assert_int_not_equal(st, MT_OK);
    assert_null(tok);
    if (!strstr(err.msg, path) || !strstr(err.msg, needle))
        fail_msg("message \"%s\" should name %s and say \"%s\"", err.msg, path, needle);
    free(path);
}

static void test_bad_input(void **state) {
    (void)state;
    char *dir = mt_test_tmpdir("tok");
    const char *vocab = "\"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}";
    char buf[1024];
    expect_bad(dir, "{\"model\": ", "not valid JSON");
    expect_bad(dir, "[1, 2]", "not a JSON object");
    expect_bad(dir, "{\"version\": \"1.0\"}", "no \"model\"");
    snprintf(buf, sizeof buf, "{\"model\": {\"type\": \"Unigram\", %s}}", vocab);
    expect_bad(dir, buf, "model type \"Unigram\" is not supported");
    snprintf(buf, sizeof buf, "{\"model\": {\"type\": \"BPE\", %s, \"merges\": [\"a b\", \"a c\"]}}", vocab);
    expect_bad(dir, buf, "merge 1 (\"a\" + \"c\") names a token not in the vocab: \"c\"");
    snprintf(buf, sizeof buf, "{\"model\": {\"type\": \"BPE\", %s, \"merges\": [[\"a\", \"b\"], [\"b\", \"a\"]]}}", vocab);
    expect_bad(dir, buf, "merge 1 (\"b\" + \"a\") names a token not in the vocab: \"ba\"");
    snprintf(buf, sizeof buf, "{\"model\": {\"type\": \"BPE\", %s, \"merges\": [\"ab\"]}}", vocab);
    expect_bad(dir, buf, "merge 0 (\"ab\") is not two tokens");
    snprintf(buf, sizeof buf, "{\"model\": {\"type\": \"BPE\", %s, \"merges\": []}, \"pre_tokenizer\": {\"type\": \"BertPreTokenizer\"}}", vocab);
    expect_bad(dir, buf, "pre_tokenizer type \"BertPreTokenizer\" is not supported");
    snprintf(buf, sizeof buf, "{\"model\": {\"type\": \"BPE\", %s, \"merges\": []}, \"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"(\"}, \"behavior\": \"Isolated\"}}", vocab);
    expect_bad(dir, buf, "does not compile");
    expect_bad(dir, "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"a\": 1}, \"merges\": []}}", "not valid JSON");
    /* a good minimal one loads and merges */
    snprintf(buf, sizeof buf, "{\"model\": {\"type\": \"BPE\", %s, \"merges\": [\"a b\"]}}", vocab);
    char *path = mt_path_join(dir, "tokenizer.json", NULL);
    mt_test_write_file(path, buf, strlen(buf));
    mt_error err;
    mt_tokenizer *tok;
    assert_int_equal(mt_tokenizer_load_json(path, NULL, &tok, &err), MT_OK);
    mt_token_list l = {0};
    assert_int_equal(mt_tokenizer_encode(tok, "abba", 4, 1, &l, &err), MT_OK);
    assert_int_equal(l.n, 3);
    assert_int_equal(l.ids[0], 2);
    assert_int_equal(l.ids[1], 1);
    assert_int_equal(l.ids[2], 0);
    assert_int_equal(l.offsets[2], 3);
    mt_token_list_free(&l);
    mt_tokenizer_free(tok);
    free(path);
    /* model.type that is not a string is refused, not taken for BPE */
    snprintf(buf, sizeof buf, "{\"model\": {\"type\": 7, %s, \"merges\": []}}", vocab);
    expect_bad(dir, buf, "key 'model.type': expected a string such as \"BPE\", found an integer");
    snprintf(buf, sizeof buf, "{\"model\": {\"type\": null, %s, \"merges\": []}}", vocab);
    expect_bad(dir, buf, "key 'model.type': expected a string");
    /* an id far past the vocabulary would size the tables by it (8 GB for 2e9) */
    expect_bad(dir, "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 2000000000}, \"merges\": []}}",
               "vocab entry \"a\": id 2000000000 is far beyond the vocabulary's 1 entries");
    snprintf(buf, sizeof buf, "{\"model\": {\"type\": \"BPE\", %s, \"merges\": []}, \"added_tokens\": "
             "[{\"id\": 2000000000, \"content\": \"<x>\", \"special\": true}]}", vocab);
    expect_bad(dir, buf, "added_tokens[0] \"<x>\": id 2000000000 is far beyond");
    expect_bad(dir, "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": -1}, \"merges\": []}}",
               "vocab entry \"a\": expected an integer id >= 0, found -1");
    expect_bad(dir, "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 1.5}, \"merges\": []}}",
               "vocab entry \"a\": expected an integer id >= 0, found a real number");
    expect_bad(dir, "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": \"0\"}, \"merges\": []}}",
               "vocab entry \"a\": expected an integer id >= 0, found a string");
    snprintf(buf, sizeof buf, "{\"model\": {\"type\": \"BPE\", %s, \"merges\": []}, \"added_tokens\": "
             "[{\"id\": -3, \"content\": \"<x>\", \"special\": true}]}", vocab);
    expect_bad(dir, buf, "added_tokens[0] \"<x>\": key 'id': expected an integer >= 0, found -3");
    snprintf(buf, sizeof buf, "{\"model\": {\"type\": \"BPE\", %s, \"merges\": []}, \"added_tokens\": "
             "[{\"id\": 2.0, \"content\": \"<x>\", \"special\": true}]}", vocab);
    expect_bad(dir, buf, "added_tokens[0] \"<x>\": key 'id': expected an integer >= 0, found a real number");
    snprintf(buf, sizeof buf, "{\"model\": {\"type\": \"BPE\", %s, \"merges\": []}, \"added_tokens\": "
             "[{\"id\": 2, \"special\": true}]}", vocab);
    expect_bad(dir, buf, "added_tokens[0]: key 'content': expected a string, found nothing");
    /* a model flag of another type would silently read as false */
    expect_bad(dir, "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [], \"byte_fallback\": \"yes\"}}",
               "key 'model.byte_fallback': expected true or false, found a string");
    expect_bad(dir, "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [], \"ignore_merges\": 1}}",
               "key 'model.ignore_merges': expected true or false, found an integer");
    /* an empty vocabulary (even with added tokens) would make ordinary text vanish */
    expect_bad(dir, "{\"model\": {\"type\": \"BPE\", \"vocab\": {}, \"merges\": []}, \"added_tokens\": "
               "[{\"id\": 0, \"content\": \"<s>\", \"special\": true}]}", "key 'model.vocab' is empty");
    mt_tokenizer *none;
    assert_int_equal(mt_tokenizer_load_json("/nonexistent/tokenizer.json", NULL, &none, &err), MT_ERR_IO);
    assert_non_null(strstr(err.msg, "/nonexistent/tokenizer.json"));
    mt_test_rmtree(dir);
    free(dir);
}

/* Reading tokenizer.json as `tokenizers` does where the dialects differ: single_word
 * added tokens next to non-ASCII characters (Unicode \w decides), and Oniguruma split
 * patterns (X{n,m}+ is an interval then a repeat, {,m} is {0,m}). Expected ids come
 * from `tokenizers` (tests/parity/make_tokenizer_dialect.py). */
static void test_dialect_parity(void **state) {
    (void)state;
    json_error_t je;
    json_t *exp = json_load_file(TOK_DIR "/dialect/expected.json", 0, &je);
    assert_non_null(exp);
    size_t f;
    json_t *fx;
    size_t total = 0, same = 0;
    json_array_foreach(json_object_get(exp, "fixtures"), f, fx) {
        char path[512];
        snprintf(path, sizeof path, "%s/dialect/%s", TOK_DIR, json_string_value(json_object_get(fx, "file")));
        mt_tokenizer *tok;
        mt_error err = {0};
        if (mt_tokenizer_load_json(path, NULL, &tok, &err)) fail_msg("%s", err.msg);
        size_t k;
        json_t *sample;
        json_array_foreach(json_object_get(fx, "samples"), k, sample) {
            const char *text = json_string_value(json_object_get(sample, "text"));
            mt_token_list l = {0};
            if (mt_tokenizer_encode(tok, text, strlen(text), 0, &l, &err)) fail_msg("%s", err.msg);
            total++;
            if (ids_equal(&l, json_object_get(sample, "ids"))) same++;
            else print_mismatch(json_string_value(json_object_get(fx, "file")), k, text, &l, json_object_get(sample, "ids"));
            mt_token_list_free(&l);
        }
        mt_tokenizer_free(tok);
    }
    printf("dialect parity: %zu/%zu texts give the ids of tokenizers\n", same, total);
    json_decref(exp);
    assert_true(total > 100);
    assert_int_equal(same, total);
}

/* Split patterns read as Oniguruma reads them (`tokenizers`' engine), not as PCRE2
 * would: each pattern of dialect/regex_expected.json goes into the Split of
 * dialect/pieces.json, whose vocabulary holds every substring of the texts and which
 * sets ignore_merges, so each id is one pre-tokenizer piece. Patterns PCRE2 cannot
 * express are refused with an error naming the file and the construct.
 * (tests/parity/make_tokenizer_hardening_reference.py) */
static void test_split_dialect(void **state) {
    (void)state;
    json_error_t je;
    json_t *exp = json_load_file(TOK_DIR "/dialect/regex_expected.json", 0, &je);
    json_t *base = json_load_file(TOK_DIR "/dialect/pieces.json", 0, &je);
    assert_non_null(exp);
    assert_non_null(base);
    json_t *split = json_array_get(json_object_get(json_object_get(base, "pre_tokenizer"), "pretokenizers"), 0);
    json_t *texts = json_object_get(exp, "texts");
    char *dir = mt_test_tmpdir("tok-dialect");
    char *path = mt_path_join(dir, "tokenizer.json", NULL);
    size_t f, total = 0, same = 0, refused = 0;
    json_t *fx;
    json_array_foreach(json_object_get(exp, "patterns"), f, fx) {
        const char *name = json_string_value(json_object_get(fx, "name"));
        json_t *string = json_object_get(fx, "string"); /* a {"String": ...} pattern */
        json_object_set_new(split, "pattern", string ? json_pack("{sO}", "String", string)
                                                     : json_pack("{sO}", "Regex", json_object_get(fx, "pattern")));
        assert_int_equal(json_dump_file(base, path, JSON_COMPACT), 0);
        mt_tokenizer *tok = NULL;
        mt_error err = {0};
        const char *want_error = json_string_value(json_object_get(fx, "error"));
        mt_status st = mt_tokenizer_load_json(path, NULL, &tok, &err);
        if (want_error) {
            if (st == MT_OK) {
                fprintf(stderr, "%s: pattern accepted, expected a refusal: %s\n", name, want_error);
                mt_tokenizer_free(tok);
            } else if (!strstr(err.msg, path) || !strstr(err.msg, want_error)) {
                fprintf(stderr, "%s: error does not name the file and \"%s\": %s\n", name, want_error, err.msg);
            } else {
                refused++;
            }
            continue;
        }
        if (st) { /* counted as texts split wrongly, so that one run shows every difference */
            fprintf(stderr, "%s: %s\n", name, err.msg);
            total += json_array_size(texts);
            continue;
        }
        size_t k;
        json_t *text;
        json_array_foreach(texts, k, text) {
            mt_token_list l = {0};
            if (mt_tokenizer_encode(tok, json_string_value(text), json_string_length(text), 0, &l, &err))
                fail_msg("%s: %s", name, err.msg);
            total++;
            json_t *ids = json_array_get(json_object_get(fx, "ids"), k);
            if (ids_equal(&l, ids)) {
                same++;
            } else {
                fprintf(stderr, "%s /%s/ on \"%s\":\n  pieces:", name,
                        json_string_value(string ? string : json_object_get(fx, "pattern")),
                        json_string_value(text));
                for (size_t i = 0; i < l.n; i++) fprintf(stderr, " [%s]", mt_tokenizer_token_text(tok, l.ids[i]));
                fprintf(stderr, "\n  tokenizers:");
                size_t e;
                json_t *piece;
                json_array_foreach(json_array_get(json_object_get(fx, "pieces"), k), e, piece)
                    fprintf(stderr, " [%s]", json_string_value(piece));
                fprintf(stderr, "\n");
            }
            mt_token_list_free(&l);
        }
        mt_tokenizer_free(tok);
    }
    printf("split dialect: %zu/%zu texts split as tokenizers splits them; %zu patterns refused\n", same, total, refused);
    json_decref(exp);
    json_decref(base);
    mt_test_rmtree(dir);
    free(dir);
    free(path);
    assert_true(total >= 1100);
    assert_int_equal(same, total);
    assert_int_equal(refused, 5);
}

/* A GGUF whose eos_token_id lies outside the vocabulary is refused, naming the file,
 * the key and the id (dropped silently, generation would never stop). */
static void test_gguf_special_id_outside_vocab(void **state) {
    (void)state;
    char *bytes;
    size_t len;
    assert_int_equal(mt_read_file(MT_FIXTURE_DIR "/tokenizer/llama3/tokenizer.gguf", &bytes, &len, NULL), MT_OK);
    char *dir = mt_test_tmpdir("tok-gguf");
    char *path = mt_path_join(dir, "tokenizer.gguf", NULL);
    /* each special-token key the fixture has, set in turn to 2e9 and to the vocabulary
     * size (one past the last id) */
    static const char *const keys[] = {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id",
                                       "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id"};
    int tested = 0;
    for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
        const size_t klen = strlen(keys[k]);
        size_t at = SIZE_MAX;
        for (size_t i = 0; i + klen + 8 < len && at == SIZE_MAX; i++)
            if (!memcmp(bytes + i, keys[k], klen)) at = i + klen;
        if (at == SIZE_MAX) continue;
        uint32_t type, orig;
        memcpy(&type, bytes + at, 4);
        assert_true(type == 4 || type == 5); /* UINT32 or INT32 */
        memcpy(&orig, bytes + at + 4, 4);
        const uint32_t bad[] = {2000000000u, 1000u}; /* the fixture's vocabulary has 1000 tokens */
        for (int b = 0; b < 2; b++) {
            memcpy(bytes + at + 4, &bad[b], 4);
            mt_test_write_file(path, bytes, len);
            mt_tokenizer *tok = NULL;
            mt_error err = {0};
            assert_int_not_equal(mt_tokenizer_load_gguf(path, &tok, &err), MT_OK);
            assert_null(tok);
            printf("refused: %s\n", err.msg);
            char want[160];
            snprintf(want, sizeof want, "key '%s': token id %u is outside the vocabulary of 1000 tokens (ids 0 to 999)",
                     keys[k], bad[b]);
            assert_non_null(strstr(err.msg, path));
            assert_non_null(strstr(err.msg, want));
        }
        memcpy(bytes + at + 4, &orig, 4);
        tested++;
    }
    assert_true(tested >= 2);
    free(path);
    free(bytes);
    mt_test_rmtree(dir);
    free(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nfc),
        cmocka_unit_test(test_parity_smollm2),
        cmocka_unit_test(test_parity_llama3),
        cmocka_unit_test(test_parity_qwen2),
        cmocka_unit_test(test_parity_spm),
        cmocka_unit_test(test_parity_metaspace),
        cmocka_unit_test(test_properties),
        cmocka_unit_test(test_gguf_matches_json),
        cmocka_unit_test(test_gguf_fixtures),
        cmocka_unit_test(test_throughput),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_gguf_special_id_outside_vocab),
        cmocka_unit_test(test_dialect_parity),
        cmocka_unit_test(test_split_dialect),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
