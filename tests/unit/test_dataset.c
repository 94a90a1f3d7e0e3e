/* test_dataset.c — JSONL records in every format, bad input, span masking, truncation,
 * packing, shuffling, splits, the batcher's cursor, statistics, and one end-to-end
 * example through the SmolLM2 tokenizer. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "text/dataset.h"
#include "moontune/plugin.h" /* MT_SHARED_SEGMENT */
#include "model/evaluate.h"
#include "base/internal.h"
#include "testutil.h"
#include "text/tokenizer.h"

#define DATA_DIR MT_FIXTURE_DIR "/data"
#define SMOLLM2_TOKENIZER MT_FIXTURE_DIR "/tokenizer/smollm2/tokenizer.json"

static void load_ok(const char *file, mt_data_format fmt, const mt_data_fields *fields,
                    mt_record_set *set) {
    mt_jsonl_options opt = {fmt, fields, MT_BAD_RECORD_ERROR};
    mt_error err = {0};
    mt_record_set_init(set);
    mt_status st = mt_records_load_jsonl(file, &opt, set, &err);
    if (st) fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(st, MT_OK);
}

static void assert_msg(const mt_message *m, const char *role, const char *content) {
    assert_string_equal(m->role, role);
    assert_string_equal(m->content, content);
}

/* ---- formats -------------------------------------------------------------------- */

static void test_alpaca(void **state) {
    (void)state;
    mt_record_set s;
    load_ok(DATA_DIR "/alpaca.jsonl", MT_DATA_AUTO, NULL, &s);
    assert_int_equal(s.format, MT_DATA_ALPACA);
    assert_int_equal(s.n, 3);
    assert_int_equal(s.records[0].line, 1);
    assert_int_equal(s.records[1].line, 3); /* the empty line 2 is skipped, lines still count */
    assert_int_equal(s.records[2].line, 4);
    assert_int_equal(s.records[0].n_messages, 2);
    assert_msg(&s.records[0].messages[0], "user", "Name a primary colour."); /* empty input */
    assert_msg(&s.records[0].messages[1], "assistant", "Red.");
    assert_msg(&s.records[1].messages[0], "user", "Translate to French.\n\ncheese");
    assert_msg(&s.records[1].messages[1], "assistant", "fromage");
    assert_string_equal(s.files[s.records[2].file], DATA_DIR "/alpaca.jsonl");
    mt_record_set_free(&s);
}

static void test_chat_and_text_and_prompt_completion(void **state) {
    (void)state;
    mt_record_set s;
    load_ok(DATA_DIR "/chat.jsonl", MT_DATA_CHAT, NULL, &s);
    assert_int_equal(s.n, 2);
    assert_int_equal(s.records[0].n_messages, 3);
    assert_msg(&s.records[0].messages[0], "system", "Be brief.");
    assert_int_equal(s.records[1].n_messages, 4);
    assert_msg(&s.records[1].messages[3], "assistant", "6");
    /* a second file appends, with its own file index */
    mt_jsonl_options opt = {MT_DATA_AUTO, NULL, MT_BAD_RECORD_ERROR};
    mt_error err = {0};
    assert_int_equal(mt_records_load_jsonl(DATA_DIR "/text.jsonl", &opt, &s, &err), MT_OK);
    assert_int_equal(s.n, 5);
    assert_int_equal(s.format, MT_DATA_TEXT);
    assert_int_equal(s.records[4].file, 1);
    assert_int_equal(s.records[4].line, 3);
    assert_string_equal(s.records[4].text, "café — naïve");
    assert_null(s.records[4].messages);
    mt_record_set_free(&s);

    load_ok(DATA_DIR "/prompt_completion.jsonl", MT_DATA_AUTO, NULL, &s);
    assert_int_equal(s.format, MT_DATA_PROMPT_COMPLETION);
    assert_int_equal(s.n, 2);
    assert_msg(&s.records[0].messages[0], "user", "The capital of France is");
    assert_msg(&s.records[0].messages[1], "assistant", " Paris.");
    assert_msg(&s.records[1].messages[1], "assistant", "Rome.");
    mt_record_set_free(&s);
}

static void test_preference(void **state) {
    (void)state;
    mt_record_set s;
    load_ok(DATA_DIR "/preference.jsonl", MT_DATA_AUTO, NULL, &s);
    assert_int_equal(s.format, MT_DATA_PREFERENCE);
    assert_int_equal(s.n, 2);
    const mt_record *r = &s.records[0];
    assert_int_equal(r->n_messages, 1);
    assert_msg(&r->messages[0], "user", "Is the sky blue?");
    assert_int_equal(r->n_chosen, 1);
    assert_msg(&r->chosen[0], "assistant", "Yes, on a clear day.");
    assert_msg(&r->rejected[0], "assistant", "No.");
    r = &s.records[1];
    assert_int_equal(r->n_messages, 2);
    assert_msg(&r->messages[0], "system", "Be kind.");
    assert_msg(&r->chosen[0], "assistant", "It has vivid images.");
    assert_msg(&r->rejected[0], "assistant", "Bad.");
    mt_record_set_free(&s);
}

/* Without a prompt field, whole conversations share the prompt (TRL's implicit prompt). */
static void test_preference_implicit_prompt(void **state) {
    (void)state;
    const char *data =
        "{\"chosen\": [{\"role\": \"system\", \"content\": \"S\"}, {\"role\": \"user\", "
        "\"content\": \"Q\"}, {\"role\": \"assistant\", \"content\": \"good\"}], "
        "\"rejected\": [{\"role\": \"system\", \"content\": \"S\"}, {\"role\": \"user\", "
        "\"content\": \"Q\"}, {\"role\": \"assistant\", \"content\": \"bad\"}]}\n";
    mt_record_set s;
    mt_record_set_init(&s);
    mt_error err = {0};
    assert_int_equal(mt_records_parse_jsonl("p.jsonl", data, strlen(data), NULL, &s, &err), MT_OK);
    assert_int_equal(s.format, MT_DATA_PREFERENCE);
    const mt_record *r = &s.records[0];
    assert_int_equal(r->n_messages, 2);
    assert_msg(&r->messages[0], "system", "S");
    assert_msg(&r->messages[1], "user", "Q");
    assert_int_equal(r->n_chosen, 1);
    assert_int_equal(r->n_rejected, 1);
    assert_msg(&r->chosen[0], "assistant", "good");
    assert_msg(&r->rejected[0], "assistant", "bad");
    mt_record_set_free(&s);
}

static void test_custom_field_map(void **state) {
    (void)state;
    mt_data_fields f = {0};
    f.messages = "conversations";
    f.role = "from";
    f.content = "value";
    mt_record_set s;
    load_ok(DATA_DIR "/sharegpt.jsonl", MT_DATA_AUTO, &f, &s);
    assert_int_equal(s.format, MT_DATA_CHAT);
    assert_int_equal(s.n, 2);
    assert_msg(&s.records[0].messages[0], "user", "Hello?");
    assert_msg(&s.records[0].messages[1], "assistant", "Hi there.");
    assert_msg(&s.records[1].messages[0], "system", "Rhyme.");
    mt_record_set_free(&s);

    mt_data_fields g = {0};
    g.instruction = "q";
    g.output = "a";
    const char *data = "{\"q\": \"Why?\", \"a\": \"Because.\"}\n";
    mt_jsonl_options opt = {MT_DATA_ALPACA, &g, MT_BAD_RECORD_ERROR};
    mt_error err = {0};
    mt_record_set_init(&s);
    assert_int_equal(mt_records_parse_jsonl("qa.jsonl", data, strlen(data), &opt, &s, &err), MT_OK);
    assert_msg(&s.records[0].messages[0], "user", "Why?");
    assert_msg(&s.records[0].messages[1], "assistant", "Because.");
    mt_record_set_free(&s);
}

static void test_format_names(void **state) {
    (void)state;
    for (int f = MT_DATA_AUTO; f <= MT_DATA_PREFERENCE; f++)
        assert_int_equal(mt_data_format_parse(mt_data_format_name((mt_data_format)f)), f);
    assert_int_equal(mt_data_format_parse("sharegpt"), -1);
}

/* ---- bad input ------------------------------------------------------------------- */

typedef struct bad_case {
    mt_data_format fmt;
    const char *line2; /* the second line; line 1 is a good record of fmt */
    const char *expect1, *expect2;
} bad_case;

static const char *good_line(mt_data_format f) {
    switch (f) {
    case MT_DATA_ALPACA: return "{\"instruction\": \"a\", \"output\": \"b\"}";
    case MT_DATA_CHAT:
        return "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": "
               "\"assistant\", \"content\": \"b\"}]}";
    case MT_DATA_PROMPT_COMPLETION: return "{\"prompt\": \"a\", \"completion\": \"b\"}";
    case MT_DATA_TEXT: return "{\"text\": \"a\"}";
    case MT_DATA_PREFERENCE: return "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}";
    default: return "";
    }
}

static void test_bad_records_name_file_line_field(void **state) {
    (void)state;
    static const bad_case cases[] = {
        {MT_DATA_ALPACA, "{\"instruction\": \"a\", \"output\": ", "malformed JSON", NULL},
        {MT_DATA_ALPACA, "{\"instruction\": \"a\"}", "field 'output'", "missing"},
        {MT_DATA_ALPACA, "{\"instruction\": 3, \"output\": \"b\"}", "field 'instruction'",
         "expected a string, found an integer"},
        {MT_DATA_ALPACA, "{\"instruction\": \"a\", \"output\": \"  \"}", "field 'output'",
         "empty response"},
        {MT_DATA_ALPACA, "{\"instruction\": \"a\", \"input\": [], \"output\": \"b\"}",
         "field 'input'", "found an array"},
        {MT_DATA_ALPACA, "{\"instruction\": \"\", \"output\": \"b\"}", "field 'instruction'",
         "empty prompt"},
        {MT_DATA_ALPACA, "{\"instruction\": \"caf\xC3\", \"output\": \"b\"}", "invalid UTF-8", NULL},
        {MT_DATA_ALPACA, "{\"instruction\": \"\xED\xA0\x80\", \"output\": \"b\"}", "invalid UTF-8",
         NULL},
        {MT_DATA_ALPACA, "{\"instruction\": \"\\ud800\", \"output\": \"b\"}", "malformed JSON", NULL},
        {MT_DATA_ALPACA, "{\"instruction\": \"a\\u0000b\", \"output\": \"b\"}", "malformed JSON",
         NULL},
        {MT_DATA_ALPACA, "{\"instruction\": \"a\", \"instruction\": \"b\", \"output\": \"c\"}",
         "malformed JSON", "duplicate"},
        {MT_DATA_ALPACA, "[\"instruction\"]", "expected a JSON object", "found an array"},
        {MT_DATA_CHAT, "{\"messages\": {}}", "field 'messages'", "found an object"},
        {MT_DATA_CHAT, "{\"messages\": []}", "field 'messages'", "empty list"},
        {MT_DATA_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}",
         "field 'messages'", "no assistant message"},
        {MT_DATA_CHAT, "{\"messages\": [{\"role\": \"user\"}]}", "field 'messages[0].content'",
         "missing"},
        {MT_DATA_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": null}]}",
         "field 'messages[0].content'", "found null"},
        {MT_DATA_CHAT, "{\"messages\": [{\"role\": \"wizard\", \"content\": \"a\"}]}",
         "field 'messages[0].role'", "unknown role 'wizard'"},
        {MT_DATA_CHAT, "{\"messages\": [7]}", "field 'messages[0]'", "found an integer"},
        {MT_DATA_CHAT,
         "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", "
         "\"content\": \"\"}]}",
         "field 'messages[1].content'", "empty response"},
        {MT_DATA_PROMPT_COMPLETION, "{\"prompt\": \"a\"}", "field 'completion'", "missing"},
        {MT_DATA_PROMPT_COMPLETION, "{\"prompt\": \"a\", \"completion\": true}",
         "field 'completion'", "found a boolean"},
        {MT_DATA_PROMPT_COMPLETION, "{\"prompt\": \"a\", \"completion\": \"\"}",
         "field 'completion'", "empty response"},
        {MT_DATA_TEXT, "{\"text\": \"\"}", "field 'text'", "empty text"},
        {MT_DATA_TEXT, "{\"txt\": \"a\"}", "field 'text'", "missing"},
        {MT_DATA_PREFERENCE, "{\"prompt\": \"a\", \"chosen\": \"b\"}", "field 'rejected'",
         "missing"},
        {MT_DATA_PREFERENCE, "{\"prompt\": \"a\", \"chosen\": \"\", \"rejected\": \"c\"}",
         "field 'chosen'", "empty response"},
        {MT_DATA_PREFERENCE, "{\"prompt\": 1, \"chosen\": \"b\", \"rejected\": \"c\"}",
         "field 'prompt'", "found an integer"},
        {MT_DATA_PREFERENCE,
         "{\"prompt\": \"a\", \"chosen\": [{\"role\": \"user\", \"content\": \"x\"}], "
         "\"rejected\": \"c\"}",
         "field 'chosen'", "no assistant message"},
        {MT_DATA_PREFERENCE, "{\"prompt\": \"\", \"chosen\": \"b\", \"rejected\": \"c\"}",
         "field 'prompt'", "empty prompt"},
        {MT_DATA_PREFERENCE, "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"b\"}",
         "fields 'chosen' and 'rejected'", "the same"},
        {MT_DATA_PREFERENCE, "{\"chosen\": \"b\", \"rejected\": \"c\"}", "field 'prompt'",
         "missing"},
        {MT_DATA_PREFERENCE,
         "{\"chosen\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"assistant\", "
         "\"content\": \"b\"}], \"rejected\": [{\"role\": \"user\", \"content\": \"y\"}, "
         "{\"role\": \"assistant\", \"content\": \"c\"}]}",
         "fields 'chosen' and 'rejected'", "share no first message"},
        {MT_DATA_PREFERENCE,
         "{\"chosen\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"assistant\", "
         "\"content\": \"b\"}], \"rejected\": [{\"role\": \"user\", \"content\": \"x\"}, "
         "{\"role\": \"assistant\", \"content\": \"b\"}]}",
         "fields 'chosen' and 'rejected'", "no reply"},
        {MT_DATA_PREFERENCE,
         "{\"prompt\": \"a\", \"chosen\": [{\"role\": \"assistant\", \"content\": \"b\"}], "
         "\"rejected\": [{\"role\": \"assistant\", \"content\": \" \"}]}",
         "field 'rejected[0].content'", "empty response"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        for (int autodetect = 0; autodetect < 2; autodetect++) {
            char data[1024];
            snprintf(data, sizeof data, "%s\n%s\n%s\n", good_line(cases[i].fmt), cases[i].line2,
                     good_line(cases[i].fmt));
            mt_jsonl_options opt = {autodetect ? MT_DATA_AUTO : cases[i].fmt, NULL,
                                    MT_BAD_RECORD_ERROR};
            mt_record_set s;
            mt_record_set_init(&s);
            mt_error err = {0};
            mt_status st = mt_records_parse_jsonl("in.jsonl", data, strlen(data), &opt, &s, &err);
            if (st != MT_ERR_FORMAT || !strstr(err.msg, "in.jsonl:2: ") ||
                !strstr(err.msg, cases[i].expect1) ||
                (cases[i].expect2 && !strstr(err.msg, cases[i].expect2)))
                fail_msg("case %zu (%s): status %d, message '%s'", i, cases[i].line2, (int)st,
                         err.msg);
            assert_int_equal(s.n, 0); /* the load is all or nothing */
            assert_int_equal(s.n_files, 0);
            mt_record_set_free(&s);
        }
    }
}

static void test_unknown_shape_and_formats(void **state) {
    (void)state;
    const char *data = "\xEF\xBB\xBF{\"foo\": 1}\r\n";
    mt_record_set s;
    mt_record_set_init(&s);
    mt_error err = {0};
    assert_int_equal(mt_records_parse_jsonl("x.jsonl", data, strlen(data), NULL, &s, &err),
                     MT_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "x.jsonl:1: cannot tell the format"));
    /* a BOM and CRLF line ends are fine, blank lines are skipped */
    data = "\xEF\xBB\xBF{\"text\": \"a\"}\r\n   \r\n\t\n{\"text\": \"b\"}";
    assert_int_equal(mt_records_parse_jsonl("x.jsonl", data, strlen(data), NULL, &s, &err), MT_OK);
    assert_int_equal(s.n, 2);
    assert_int_equal(s.records[1].line, 4);
    assert_string_equal(s.records[1].text, "b");
    mt_record_set_free(&s);
    mt_jsonl_options opt = {(mt_data_format)42, NULL, MT_BAD_RECORD_ERROR};
    assert_int_equal(mt_records_parse_jsonl("x.jsonl", data, strlen(data), &opt, &s, &err),
                     MT_ERR_INVALID_ARG);
    mt_record_set_free(&s);
}

static void test_missing_file(void **state) {
    (void)state;
    mt_record_set s;
    mt_record_set_init(&s);
    mt_error err = {0};
    assert_int_equal(mt_records_load_jsonl(DATA_DIR "/no_such_file.jsonl", NULL, &s, &err),
                     MT_ERR_IO);
    assert_non_null(strstr(err.msg, "no_such_file.jsonl"));
    assert_int_equal(s.n_files, 0);
    mt_record_set_free(&s);
}

static void test_bad_record_in_file_names_path(void **state) {
    (void)state;
    mt_record_set s;
    mt_record_set_init(&s);
    mt_error err = {0};
    assert_int_equal(mt_records_load_jsonl(DATA_DIR "/mixed_bad.jsonl", NULL, &s, &err),
                     MT_ERR_FORMAT);
    assert_non_null(strstr(err.msg, DATA_DIR "/mixed_bad.jsonl:2: malformed JSON"));
    mt_record_set_free(&s);
}

static void test_skip_policy_counts_and_lists(void **state) {
    (void)state;
    mt_jsonl_options opt = {MT_DATA_AUTO, NULL, MT_BAD_RECORD_SKIP};
    mt_record_set s;
    mt_record_set_init(&s);
    mt_error err = {0};
    assert_int_equal(mt_records_load_jsonl(DATA_DIR "/mixed_bad.jsonl", &opt, &s, &err), MT_OK);
    assert_int_equal(s.n, 3);
    assert_int_equal(s.records[0].line, 1);
    assert_int_equal(s.records[1].line, 7);
    assert_int_equal(s.records[2].line, 11);
    assert_string_equal(s.records[2].text, "good three");
    assert_int_equal(s.n_bad, 7); /* lines 2, 3, 5, 6, 8, 9, 10 */
    assert_int_equal(s.n_bad_kept, MT_BAD_RECORDS_KEPT);
    static const int64_t lines[] = {2, 3, 5, 6, 8};
    static const char *const what[] = {"malformed JSON", "field 'text': expected a string",
                                       "field 'text': empty text", "field 'text': missing",
                                       "invalid UTF-8"};
    for (int i = 0; i < MT_BAD_RECORDS_KEPT; i++) {
        assert_int_equal(s.bad[i].line, lines[i]);
        assert_int_equal(s.bad[i].file, 0);
        if (!strstr(s.bad[i].msg, what[i]) || !strstr(s.bad[i].msg, "mixed_bad.jsonl:"))
            fail_msg("bad[%d]: '%s'", i, s.bad[i].msg);
    }
    char *dir = mt_test_tmpdir("dataset");
    char *path = mt_path_join(dir, "report.txt", NULL);
    FILE *f = fopen(path, "w+");
    assert_non_null(f);
    mt_record_set_print_bad(&s, f);
    rewind(f);
    char buf[4096];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    assert_non_null(strstr(buf, "skipped 7 bad records (the first 5 follow)"));
    assert_non_null(strstr(buf, "mixed_bad.jsonl:8: invalid UTF-8"));
    free(path);
    mt_test_rmtree(dir);
    free(dir);
    mt_record_set_free(&s);
}

/* ---- masks, targets, truncation ---------------------------------------------------- */

static void test_mask_from_spans(void **state) {
    (void)state;
    /* text of 20 bytes; tokens start at these offsets; the last one (offset 20) is an
     * EOS added after the text */
    const int32_t offsets[] = {0, 3, 5, 8, 10, 12, 15, 18, 20};
    const mt_span spans[] = {{4, 10}, {15, 20}};
    uint8_t m[9];
    mt_mask_from_spans(offsets, 9, 20, spans, 2, m);
    /* 3 straddles the start of [4,10): not trainable; 8 starts inside: trainable; 10 is the
     * exclusive end: not trainable; EOS: a span ends at the text's end */
    const uint8_t expect[] = {0, 0, 1, 1, 0, 0, 1, 1, 1};
    assert_memory_equal(m, expect, sizeof expect);
    const mt_span spans2[] = {{4, 10}};
    mt_mask_from_spans(offsets, 9, 20, spans2, 1, m);
    assert_int_equal(m[8], 0);
    mt_mask_from_spans(offsets, 9, 20, NULL, 0, m);
    for (int i = 0; i < 9; i++) assert_int_equal(m[i], 0);
}

static void test_targets(void **state) {
    (void)state;
    int32_t ids[] = {10, 11, 12, 13, 14};
    uint8_t tr[] = {0, 0, 1, 1, 0};
    mt_example e = {.ids = ids, .trainable = tr, .n = 5, .file = 0, .line = 1};
    int32_t t[5];
    mt_example_targets(&e, t);
    const int32_t expect[] = {-100, 12, 13, -100, -100};
    assert_memory_equal(t, expect, sizeof expect);
}

static void make_example(int32_t *ids, uint8_t *tr, int n, int prompt, int32_t base) {
    for (int i = 0; i < n; i++) {
        ids[i] = base + i;
        tr[i] = i >= prompt;
    }
}

static void test_truncation(void **state) {
    (void)state;
    int32_t ids[64];
    uint8_t tr[64];
    int32_t start, len;
    make_example(ids, tr, 12, 8, 0);
    assert_int_equal(mt_truncate_window(tr, 12, 16, MT_TRUNCATE_LEFT, &start, &len), 0);
    assert_true(start == 0 && len == 12);
    assert_int_equal(mt_truncate_window(tr, 12, 10, MT_TRUNCATE_LEFT, &start, &len), 1);
    assert_true(start == 2 && len == 10); /* 6 prompt tokens left, the 4 response tokens */
    assert_int_equal(mt_truncate_window(tr, 12, 10, MT_TRUNCATE_DROP, &start, &len), -1);
    make_example(ids, tr, 30, 6, 0); /* response of 24 > 10 */
    assert_int_equal(mt_truncate_window(tr, 30, 10, MT_TRUNCATE_LEFT, &start, &len), 2);
    assert_true(start == 1 && len == 10); /* last 5 prompt tokens + the first 5 of the response */
    make_example(ids, tr, 30, 2, 0);
    assert_int_equal(mt_truncate_window(tr, 30, 10, MT_TRUNCATE_LEFT, &start, &len), 2);
    assert_true(start == 0 && len == 10);

    mt_example_options o = {.seq_len = 10, .truncation = MT_TRUNCATE_LEFT};
    mt_example_set s;
    mt_error err = {0};
    assert_int_equal(mt_example_set_init(&s, &o, &err), MT_OK);
    make_example(ids, tr, 12, 8, 100);
    assert_int_equal(mt_example_set_add(&s, ids, tr, 12, 0, 1, &err), MT_OK);
    make_example(ids, tr, 30, 6, 200);
    assert_int_equal(mt_example_set_add(&s, ids, tr, 30, 0, 2, &err), MT_OK);
    make_example(ids, tr, 5, 2, 300);
    assert_int_equal(mt_example_set_add(&s, ids, tr, 5, 0, 3, &err), MT_OK);
    make_example(ids, tr, 5, 5, 400); /* nothing to train */
    assert_int_equal(mt_example_set_add(&s, ids, tr, 5, 0, 4, &err), MT_OK);
    make_example(ids, tr, 5, 4, 500); /* one trainable token: a target */
    assert_int_equal(mt_example_set_add(&s, ids, tr, 5, 0, 5, &err), MT_OK);
    make_example(ids, tr, 30, 25, 600); /* a long prompt: left-truncated to the last 5 prompt tokens */
    assert_int_equal(mt_example_set_add(&s, ids, tr, 30, 0, 6, &err), MT_OK);
    assert_int_equal(s.n, 5);
    assert_int_equal(s.ex[0].n, 10);
    assert_int_equal(s.ex[0].ids[0], 102);
    assert_int_equal(s.ex[0].line, 1);
    assert_int_equal(s.ex[1].ids[0], 201);
    assert_int_equal(s.ex[1].trainable[4], 0);
    assert_int_equal(s.ex[1].trainable[5], 1);
    assert_int_equal(s.ex[4].ids[0], 620);
    assert_int_equal(s.ex[4].line, 6);
    assert_int_equal(s.n_truncated_prompt, 2);
    assert_int_equal(s.n_truncated_response, 1);
    assert_int_equal(s.n_dropped_no_target, 1);
    assert_int_equal(s.n_dropped_too_long, 0);
    mt_example_set_free(&s);

    o.truncation = MT_TRUNCATE_DROP;
    assert_int_equal(mt_example_set_init(&s, &o, &err), MT_OK);
    make_example(ids, tr, 12, 8, 100);
    assert_int_equal(mt_example_set_add(&s, ids, tr, 12, 0, 1, &err), MT_OK);
    make_example(ids, tr, 10, 8, 100);
    assert_int_equal(mt_example_set_add(&s, ids, tr, 10, 0, 2, &err), MT_OK);
    assert_int_equal(s.n, 1);
    assert_int_equal(s.n_dropped_too_long, 1);
    assert_int_equal(s.n_truncated_prompt + s.n_truncated_response, 0);
    mt_example_set_free(&s);

    o.seq_len = 1;
    assert_int_equal(mt_example_set_init(&s, &o, &err), MT_ERR_INVALID_ARG);
}

/* ---- batches ----------------------------------------------------------------------- */

/* n examples of lengths 2..maxlen; example i's tokens are i*1000 + position, the first
 * two prompt tokens masked. */
static void make_set(mt_example_set *s, int n, int maxlen, uint64_t seed) {
    mt_example_options o = {.seq_len = maxlen, .truncation = MT_TRUNCATE_LEFT, .pad_id = 7};
    mt_error err = {0};
    assert_int_equal(mt_example_set_init(s, &o, &err), MT_OK);
    int32_t ids[256];
    uint8_t tr[256];
    uint64_t r = seed;
    for (int i = 0; i < n; i++) {
        int len = 3 + (int)(mt_test_rand_u64(&r) % (uint64_t)(maxlen - 2));
        for (int j = 0; j < len; j++) {
            ids[j] = i * 1000 + j;
            tr[j] = j >= 2;
        }
        assert_int_equal(mt_example_set_add(s, ids, tr, (size_t)len, 0, i + 1, &err), MT_OK);
    }
    assert_int_equal((int)s->n, n);
}

typedef struct batch_buf {
    int32_t *tok, *pos, *seg, *tgt;
} batch_buf;

static batch_buf buf_new(int B, int T) {
    batch_buf b = {malloc(sizeof(int32_t) * (size_t)(B * T)), malloc(sizeof(int32_t) * (size_t)(B * T)),
                   malloc(sizeof(int32_t) * (size_t)(B * T)), malloc(sizeof(int32_t) * (size_t)(B * T))};
    assert_true(b.tok && b.pos && b.seg && b.tgt);
    return b;
}

static void buf_free(batch_buf *b) {
    free(b->tok);
    free(b->pos);
    free(b->seg);
    free(b->tgt);
}

/* ---- preference pairs --------------------------------------------------------------- */

/* A pair: prompt tokens base + 0..prompt-1 in both, then chosen (base + 100 + i) and
 * rejected (base + 200 + i) replies of the given lengths. */
static void add_pair(mt_example_set *s, int prompt, int nc, int nr, int32_t base, int64_t line,
                     mt_status want) {
    int32_t ci[128], ri[128];
    uint8_t ct[128], rt[128];
    for (int i = 0; i < prompt; i++) ci[i] = ri[i] = base + i, ct[i] = rt[i] = 0;
    for (int i = 0; i < nc; i++) ci[prompt + i] = base + 100 + i, ct[prompt + i] = 1;
    for (int i = 0; i < nr; i++) ri[prompt + i] = base + 200 + i, rt[prompt + i] = 1;
    mt_error err = {0};
    mt_status st = mt_example_set_add_pair(s, ci, ct, (size_t)(prompt + nc), ri, rt,
                                           (size_t)(prompt + nr), 0, line, &err);
    if (st != want) fail_msg("pair at line %lld: status %d, want %d (%s)", (long long)line, st, want, err.msg);
}

static void test_pair_truncation(void **state) {
    (void)state;
    uint8_t c[40], r[40];
    memset(c, 0, sizeof c);
    memset(r, 0, sizeof r);
    int32_t sc, lc, sr, lr;
    /* prompt 8; replies 4 and 6: 14 tokens at most */
    memset(c + 8, 1, 4);
    memset(r + 8, 1, 6);
    assert_int_equal(mt_truncate_pair(c, 12, r, 14, 14, MT_TRUNCATE_LEFT, &sc, &lc, &sr, &lr), 0);
    /* seq_len 10: the same 4 prompt tokens go from both, the longer one just fits */
    assert_int_equal(mt_truncate_pair(c, 12, r, 14, 10, MT_TRUNCATE_LEFT, &sc, &lc, &sr, &lr), 1);
    assert_true(sc == 4 && lc == 8 && sr == 4 && lr == 10);
    assert_int_equal(mt_truncate_pair(c, 12, r, 14, 10, MT_TRUNCATE_DROP, &sc, &lc, &sr, &lr), -1);
    /* seq_len 6: the longer reply alone fills it (as for one example, no prompt is left) */
    assert_int_equal(mt_truncate_pair(c, 12, r, 14, 6, MT_TRUNCATE_LEFT, &sc, &lc, &sr, &lr), 1);
    assert_true(sc == 8 && lc == 4 && sr == 8 && lr == 6);
    /* seq_len 5: the longer reply does not fit; both keep the last 2 prompt tokens and
     * the replies are cut at the end */
    assert_int_equal(mt_truncate_pair(c, 12, r, 14, 5, MT_TRUNCATE_LEFT, &sc, &lc, &sr, &lr), 2);
    assert_true(sc == 6 && lc == 5 && sr == 6 && lr == 5);

    mt_example_options o = {.seq_len = 10, .truncation = MT_TRUNCATE_LEFT};
    mt_example_set s;
    mt_error err = {0};
    assert_int_equal(mt_example_set_init(&s, &o, &err), MT_OK);
    add_pair(&s, 8, 4, 6, 1000, 1, MT_OK); /* prompt truncated by 4 in both */
    add_pair(&s, 3, 2, 2, 2000, 2, MT_OK); /* fits */
    add_pair(&s, 3, 20, 2, 3000, 3, MT_OK); /* chosen reply too long: cut */
    assert_true(s.paired);
    assert_int_equal(s.n, 6);
    assert_int_equal(mt_example_set_items(&s), 3);
    /* both sides of pair 1 start at the same prompt token */
    assert_int_equal(s.ex[0].ids[0], 1004);
    assert_int_equal(s.ex[1].ids[0], 1004);
    assert_int_equal(s.ex[0].n, 8);
    assert_int_equal(s.ex[1].n, 10);
    assert_int_equal(s.ex[5].ids[s.ex[5].n - 1], 3201);
    assert_int_equal(s.ex[4].n, 10);
    assert_int_equal(s.ex[4].ids[0], 3000);
    assert_int_equal(s.n_truncated_prompt, 1);
    assert_int_equal(s.n_truncated_response, 1);
    assert_true(isnan(s.ex[0].ref_logp));
    /* a single example cannot join pairs */
    int32_t ids[4] = {1, 2, 3, 4};
    uint8_t tr[4] = {0, 1, 1, 1};
    assert_int_equal(mt_example_set_add(&s, ids, tr, 4, 0, 9, &err), MT_ERR_INVALID_ARG);
    mt_example_set_free(&s);

    /* too long under DROP: a bad record, refused or skipped as on_bad_record says */
    o.truncation = MT_TRUNCATE_DROP;
    assert_int_equal(mt_example_set_init(&s, &o, &err), MT_OK);
    const char *files[] = {"prefs.jsonl"};
    assert_int_equal(mt_example_set_set_files(&s, (char *const *)files, 1, &err), MT_OK);
    int32_t ci[20], ri[20];
    uint8_t ct[20], rt[20];
    for (int i = 0; i < 20; i++) ci[i] = ri[i] = i, ct[i] = rt[i] = i >= 5;
    assert_int_equal(mt_example_set_add_pair(&s, ci, ct, 12, ri, rt, 9, 0, 7, &err), MT_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "prefs.jsonl:7: the preference pair needs 12 tokens"));
    s.opt.on_bad_record = MT_BAD_RECORD_SKIP;
    err = (mt_error){0};
    assert_int_equal(mt_example_set_add_pair(&s, ci, ct, 12, ri, rt, 9, 0, 7, &err), MT_OK);
    assert_int_equal(mt_example_set_add_pair(&s, ci, ct, 8, ri, rt, 9, 0, 8, &err), MT_OK);
    assert_int_equal(s.n, 2);
    assert_int_equal(s.n_dropped_too_long, 1);
    assert_int_equal(s.n_skipped_kept, 1);
    assert_non_null(strstr(s.skipped[0].msg, "prefs.jsonl:7"));
    /* a pair whose reply is masked away entirely is dropped as a pair */
    memset(rt, 0, sizeof rt);
    assert_int_equal(mt_example_set_add_pair(&s, ci, ct, 8, ri, rt, 9, 0, 9, &err), MT_OK);
    assert_int_equal(s.n, 2);
    assert_int_equal(s.n_dropped_no_target, 1);
    mt_dataset_stats st;
    mt_dataset_stats_compute(NULL, &s, &st);
    assert_int_equal(st.pairs, 1);
    assert_int_equal(st.examples, 2);
    mt_example_set_free(&s);
}

/* rejected_until = "first_difference": the rejected sequence ends where the replies part */
static void test_pair_rejected_to_difference(void **state) {
    (void)state;
    /* prompt 10 11; chosen reply 20 21 22 23; rejected 20 21 30 22 23 */
    const int32_t c[] = {10, 11, 20, 21, 22, 23}, r[] = {10, 11, 20, 21, 30, 22, 23};
    const uint8_t ct[] = {0, 0, 1, 1, 1, 1}, rt[] = {0, 0, 1, 1, 1, 1, 1};
    assert_int_equal(mt_pair_rejected_end(c, 6, r, rt, 7), 5);
    /* a rejected reply that goes on past the chosen one ends at its first extra token */
    const int32_t longer[] = {10, 11, 20, 21, 22, 23, 40, 41};
    const uint8_t lt[] = {0, 0, 1, 1, 1, 1, 1, 1};
    assert_int_equal(mt_pair_rejected_end(c, 6, longer, lt, 8), 7);
    /* a rejected reply that is a prefix of the chosen one is kept whole */
    assert_int_equal(mt_pair_rejected_end(c, 6, r, rt, 4), 4);
    /* windows that part in the prompt do not line up: nothing is cut */
    const int32_t other[] = {10, 12, 20, 21, 30};
    assert_int_equal(mt_pair_rejected_end(c, 6, other, rt, 5), 5);

    mt_example_options o = {.seq_len = 16, .truncation = MT_TRUNCATE_LEFT, .rejected_to_difference = 1};
    mt_example_set s;
    mt_error err = {0};
    assert_int_equal(mt_example_set_init(&s, &o, &err), MT_OK);
    assert_int_equal(mt_example_set_add_pair(&s, c, ct, 6, r, rt, 7, 0, 1, &err), MT_OK);
    assert_int_equal(s.ex[0].n, 6); /* the chosen sequence is whole */
    assert_int_equal(s.ex[1].n, 5);
    assert_int_equal(s.ex[1].ids[4], 30);
    assert_int_equal(s.ex[1].trainable[4], 1);
    /* after a left truncation the windows still line up: seq_len 6 drops the first prompt
     * token from both */
    mt_example_set_free(&s);
    o.seq_len = 6;
    assert_int_equal(mt_example_set_init(&s, &o, &err), MT_OK);
    assert_int_equal(mt_example_set_add_pair(&s, c, ct, 6, r, rt, 7, 0, 1, &err), MT_OK);
    assert_int_equal(s.ex[1].n, 4);
    assert_int_equal(s.ex[1].ids[0], 11);
    assert_int_equal(s.ex[1].ids[3], 30);
    mt_example_set_free(&s);
}

static void test_pair_batcher(void **state) {
    (void)state;
    mt_example_options o = {.seq_len = 16, .truncation = MT_TRUNCATE_LEFT, .pad_id = 7};
    mt_example_set s;
    mt_error err = {0};
    assert_int_equal(mt_example_set_init(&s, &o, &err), MT_OK);
    const int pairs = 5;
    for (int i = 0; i < pairs; i++) add_pair(&s, 2 + i % 3, 1 + i, 3, 1000 * (i + 1), i + 1, MT_OK);
    for (size_t i = 0; i < s.n; i++) s.ex[i].ref_logp = -(double)i;
    s.has_ref_logps = 1;
    mt_batcher *b = NULL;
    assert_int_equal(mt_batcher_create(&s, 3, 16, 0, 1, 1, &b, &err), MT_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "even batch"));
    assert_int_equal(mt_batcher_create(&s, 4, 16, 1, 1, 1, &b, &err), MT_ERR_INVALID_ARG);
    assert_int_equal(mt_batcher_create(&s, 4, 16, 0, 1, 1, &b, &err), MT_OK);
    assert_int_equal(mt_batcher_batches_per_epoch(b, 0), 3); /* 2 + 2 + 1 pairs */
    batch_buf buf = buf_new(4, 16);
    double ref[4];
    int seen[5] = {0}, batches = 0;
    for (;;) {
        mt_batch_info info;
        assert_int_equal(mt_batcher_next(b, buf.tok, buf.pos, buf.seg, buf.tgt, ref, &info, &err), MT_OK);
        batches++;
        assert_int_equal(info.examples, 2 * info.pairs);
        for (int row = 0; row < 4; row += 2) {
            if (row / 2 >= info.pairs) { /* padding rows */
                assert_int_equal(buf.tok[row * 16], 7);
                assert_int_equal(buf.tgt[row * 16], MT_IGNORE_INDEX);
                assert_true(isnan(ref[row]) && isnan(ref[row + 1]));
                continue;
            }
            const int pair = buf.tok[row * 16] / 1000 - 1; /* the chosen row */
            assert_true(pair >= 0 && pair < pairs);
            seen[pair]++;
            /* the next row is the same pair's rejected sequence, with the same prompt */
            assert_int_equal(buf.tok[(row + 1) * 16], buf.tok[row * 16]);
            const int prompt = 2 + pair % 3;
            assert_int_equal(buf.tok[row * 16 + prompt], 1000 * (pair + 1) + 100);
            assert_int_equal(buf.tok[(row + 1) * 16 + prompt], 1000 * (pair + 1) + 200);
            assert_true(ref[row] == -(double)(2 * pair) && ref[row + 1] == -(double)(2 * pair + 1));
            assert_int_equal(buf.seg[row * 16], 0);
        }
        if (info.epoch_end) break;
        /* the cursor counts pairs */
        assert_int_equal(mt_batcher_get_cursor(b).position, 2 * batches);
    }
    assert_int_equal(batches, 3);
    for (int i = 0; i < pairs; i++) assert_int_equal(seen[i], 1);
    mt_cursor c = {0, 5};
    assert_int_equal(mt_batcher_set_cursor(b, c, &err), MT_OK); /* the end: the next epoch */
    c.position = 6;
    assert_int_equal(mt_batcher_set_cursor(b, c, &err), MT_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "past the 5 pairs"));
    mt_batcher_free(b);
    buf_free(&buf);

    /* copying items keeps pairs whole */
    mt_example_set d;
    assert_int_equal(mt_example_set_init(&d, &o, &err), MT_OK);
    assert_int_equal(mt_example_set_copy_item(&d, &s, 3, &err), MT_OK);
    assert_true(d.paired && d.has_ref_logps);
    assert_int_equal(d.n, 2);
    assert_int_equal(d.ex[0].ids[0], 4000);
    assert_true(d.ex[1].ref_logp == -7.0);
    mt_example_set_free(&d);
    mt_example_set_free(&s);
}

/* Runs one epoch and checks the packing invariants; records the order in which examples
 * appear (by index) into order_out. Returns the number of batches. */
static int check_epoch(mt_batcher *bt, const mt_example_set *s, int B, int T, int pack,
                       int *order_out) {
    batch_buf b = buf_new(B, T);
    int *seen = calloc(s->n, sizeof *seen);
    int batches = 0, k = 0;
    mt_error err = {0};
    for (;;) {
        mt_batch_info info;
        assert_int_equal(mt_batcher_next(bt, b.tok, b.pos, b.seg, b.tgt, NULL, &info, &err), MT_OK);
        batches++;
        int found = 0;
        int64_t ntgt = 0;
        for (int r = 0; r < B; r++) {
            const int32_t *tok = b.tok + r * T, *pos = b.pos + r * T, *seg = b.seg + r * T,
                          *tgt = b.tgt + r * T;
            int t = 0, expect_seg = 0, in_row = 0;
            while (t < T && seg[t] != MT_PAD_SEGMENT) {
                /* one example: positions from 0, one segment id, tokens in order */
                int ex = tok[t] / 1000;
                assert_true(ex >= 0 && ex < (int)s->n);
                assert_int_equal(tok[t] % 1000, 0); /* whole: starts at its first token */
                const mt_example *e = &s->ex[ex];
                assert_true(t + e->n <= T);
                for (int j = 0; j < e->n; j++) {
                    assert_int_equal(tok[t + j], e->ids[j]);
                    assert_int_equal(pos[t + j], j);
                    assert_int_equal(seg[t + j], expect_seg);
                    int32_t want = j + 1 < e->n && e->trainable[j + 1] ? e->ids[j + 1] : -100;
                    assert_int_equal(tgt[t + j], want);
                    ntgt += want != -100;
                }
                seen[ex]++;
                order_out[k++] = ex;
                found++;
                in_row++;
                expect_seg++;
                t += e->n;
            }
            if (!pack) assert_true(in_row <= 1);
            for (int p = t; p < T; p++) { /* padding */
                assert_int_equal(seg[p], MT_PAD_SEGMENT);
                assert_int_equal(tgt[p], -100);
                assert_int_equal(tok[p], 7);
                assert_int_equal(pos[p], p - t);
            }
        }
        assert_int_equal(found, info.examples);
        assert_int_equal(ntgt, info.targets);
        if (info.epoch_end) break;
    }
    for (size_t i = 0; i < s->n; i++) assert_int_equal(seen[i], 1); /* once per epoch */
    assert_int_equal(k, (int)s->n);
    free(seen);
    buf_free(&b);
    return batches;
}

static void test_packing_invariants(void **state) {
    (void)state;
    mt_example_set s;
    make_set(&s, 57, 24, 11);
    const int B = 3, T = 32;
    mt_batcher *bt;
    mt_error err = {0};
    assert_int_equal(mt_batcher_create(&s, B, T, 1, 1234, 1, &bt, &err), MT_OK);
    int order0[57], order1[57];
    int64_t planned = mt_batcher_batches_per_epoch(bt, 0);
    int batches = check_epoch(bt, &s, B, T, 1, order0);
    assert_int_equal(batches, planned);
    assert_int_equal(mt_batcher_get_cursor(bt).epoch, 1);
    assert_int_equal(mt_batcher_get_cursor(bt).position, 0);
    check_epoch(bt, &s, B, T, 1, order1);
    assert_true(memcmp(order0, order1, sizeof order0) != 0); /* epochs reshuffle */
    /* packing puts more than one example per row */
    assert_true(batches < (57 + B - 1) / B);
    mt_batcher_free(bt);

    /* unpacked: one example per row, batches of B */
    assert_int_equal(mt_batcher_create(&s, B, T, 0, 1234, 1, &bt, &err), MT_OK);
    batches = check_epoch(bt, &s, B, T, 0, order0);
    assert_int_equal(batches, (57 + B - 1) / B);
    mt_batcher_free(bt);

    /* unshuffled: the set's order */
    assert_int_equal(mt_batcher_create(&s, 2, T, 0, 1234, 0, &bt, &err), MT_OK);
    check_epoch(bt, &s, 2, T, 0, order0);
    for (int i = 0; i < 57; i++) assert_int_equal(order0[i], i);
    mt_batcher_free(bt);

    /* too long for T */
    assert_int_equal(mt_batcher_create(&s, 2, 8, 1, 1, 1, &bt, &err), MT_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "more than T=8"));
    assert_null(bt);
    mt_example_set_free(&s);
}

/* Data parallel: the rows of N sharded batchers, side by side, are exactly the batches
 * of one unsharded batcher (packed and unpacked, over an epoch boundary), the info is the
 * global batch's but for `longest`, which is the shard's; a batch that does not split
 * evenly (in whole pairs for a paired set) is refused. */
static void test_shard_rows(void **state) {
    (void)state;
    mt_example_set s;
    make_set(&s, 23, 12, 5);
    enum { B = 6, T = 16, N = 3, rows = B / N };
    mt_error err = {0};
    for (int pack = 0; pack <= 1; pack++) {
        mt_batcher *whole, *part[N];
        assert_int_equal(mt_batcher_create(&s, B, T, pack, 99, 1, &whole, &err), MT_OK);
        for (int r = 0; r < N; r++) {
            assert_int_equal(mt_batcher_create(&s, B, T, pack, 99, 1, &part[r], &err), MT_OK);
            assert_int_equal(mt_batcher_set_shard(part[r], r, N, &err), MT_OK);
            assert_int_equal(mt_batcher_rows(part[r]), rows);
        }
        batch_buf w = buf_new(B, T), p = buf_new(rows, T);
        const int64_t per_epoch = mt_batcher_batches_per_epoch(whole, 0);
        for (int64_t k = 0; k < per_epoch + 2; k++) { /* into the next epoch */
            mt_batch_info wi, pi;
            assert_int_equal(mt_batcher_next(whole, w.tok, w.pos, w.seg, w.tgt, NULL, &wi, &err), MT_OK);
            for (int r = 0; r < N; r++) {
                assert_int_equal(mt_batcher_next(part[r], p.tok, p.pos, p.seg, p.tgt, NULL, &pi, &err), MT_OK);
                const size_t at = (size_t)r * rows * T, n = (size_t)rows * T * sizeof(int32_t);
                assert_memory_equal(p.tok, w.tok + at, n);
                assert_memory_equal(p.pos, w.pos + at, n);
                assert_memory_equal(p.seg, w.seg + at, n);
                assert_memory_equal(p.tgt, w.tgt + at, n);
                assert_int_equal(pi.examples, wi.examples);
                assert_int_equal(pi.tokens, wi.tokens);
                assert_int_equal(pi.targets, wi.targets);
                assert_int_equal(pi.epoch_end, wi.epoch_end);
                int longest = 0; /* the shard's own: its last non-padding column */
                for (int i = 0; i < rows; i++)
                    for (int t = 0; t < T; t++)
                        if (p.seg[i * T + t] != MT_PAD_SEGMENT && t + 1 > longest) longest = t + 1;
                assert_int_equal(pi.longest, longest);
                assert_true(pi.longest <= wi.longest);
            }
        }
        buf_free(&w);
        buf_free(&p);
        mt_batcher_free(whole);
        for (int r = 0; r < N; r++) mt_batcher_free(part[r]);
    }
    mt_batcher *b;
    assert_int_equal(mt_batcher_create(&s, 4, T, 1, 1, 1, &b, &err), MT_OK);
    assert_int_equal(mt_batcher_set_shard(b, 0, 3, &err), MT_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "does not split evenly over 3 ranks"));
    assert_int_equal(mt_batcher_set_shard(b, 3, 3, &err), MT_ERR_INVALID_ARG);
    assert_int_equal(mt_batcher_set_shard(b, 0, 1, &err), MT_OK); /* one rank: the whole batch */
    assert_int_equal(mt_batcher_rows(b), 4);
    mt_batcher_free(b);
    mt_example_set_free(&s);

    /* pairs: rows 2i and 2i+1 on one rank, so B must be a multiple of 2N */
    mt_example_options o = {.seq_len = 16, .truncation = MT_TRUNCATE_LEFT, .pad_id = 7};
    assert_int_equal(mt_example_set_init(&s, &o, &err), MT_OK);
    for (int i = 0; i < 4; i++) add_pair(&s, 2 + i % 3, 1 + i, 3, 1000 * (i + 1), i + 1, MT_OK);
    assert_int_equal(mt_batcher_create(&s, 2, 16, 0, 1, 1, &b, &err), MT_OK);
    assert_int_equal(mt_batcher_set_shard(b, 0, 2, &err), MT_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "in whole pairs"));
    mt_batcher_free(b);
    assert_int_equal(mt_batcher_create(&s, 4, 16, 0, 1, 1, &b, &err), MT_OK);
    assert_int_equal(mt_batcher_set_shard(b, 1, 2, &err), MT_OK);
    batch_buf p = buf_new(2, 16);
    mt_batch_info pi;
    assert_int_equal(mt_batcher_next(b, p.tok, p.pos, p.seg, p.tgt, NULL, &pi, &err), MT_OK);
    assert_int_equal(pi.pairs, 2); /* the global batch's */
    assert_int_equal(p.tok[0] / 1000, p.tok[16] / 1000); /* chosen and rejected of one pair */
    buf_free(&p);
    mt_batcher_free(b);
    mt_example_set_free(&s);
}

static void test_shuffle_deterministic(void **state) {
    (void)state;
    size_t a[100], b[100], c[100];
    for (size_t i = 0; i < 100; i++) a[i] = b[i] = c[i] = i;
    mt_shuffle_indices(a, 100, 42);
    mt_shuffle_indices(b, 100, 42);
    mt_shuffle_indices(c, 100, 43);
    assert_memory_equal(a, b, sizeof a);
    assert_true(memcmp(a, c, sizeof a) != 0);
    int hit[100] = {0};
    for (size_t i = 0; i < 100; i++) hit[a[i]]++;
    for (size_t i = 0; i < 100; i++) assert_int_equal(hit[i], 1);
    /* the stream is fixed across platforms: splitmix64 of 0 */
    uint64_t st = 0;
    assert_true(mt_splitmix64(&st) == 0xE220A8397B1DCDAFull);

    mt_example_set s;
    make_set(&s, 30, 16, 5);
    int o1[30], o2[30], o3[30];
    mt_batcher *x, *y, *z;
    mt_error err = {0};
    assert_int_equal(mt_batcher_create(&s, 2, 16, 1, 9, 1, &x, &err), MT_OK);
    assert_int_equal(mt_batcher_create(&s, 2, 16, 1, 9, 1, &y, &err), MT_OK);
    assert_int_equal(mt_batcher_create(&s, 2, 16, 1, 10, 1, &z, &err), MT_OK);
    check_epoch(x, &s, 2, 16, 1, o1);
    check_epoch(y, &s, 2, 16, 1, o2);
    check_epoch(z, &s, 2, 16, 1, o3);
    assert_memory_equal(o1, o2, sizeof o1);
    assert_true(memcmp(o1, o3, sizeof o1) != 0);
    mt_batcher_free(x);
    mt_batcher_free(y);
    mt_batcher_free(z);
    mt_example_set_free(&s);
}

static void test_split(void **state) {
    (void)state;
    size_t *tr, *ev, ntr, nev, *tr2, *ev2, ntr2, nev2;
    mt_error err = {0};
    assert_int_equal(mt_split_indices(200, 0.1, 7, &tr, &ntr, &ev, &nev, &err), MT_OK);
    assert_int_equal(nev, 20);
    assert_int_equal(ntr, 180);
    int hit[200] = {0};
    for (size_t i = 0; i < ntr; i++) hit[tr[i]]++;
    for (size_t i = 0; i < nev; i++) hit[ev[i]]++;
    for (int i = 0; i < 200; i++) assert_int_equal(hit[i], 1); /* disjoint and complete */
    for (size_t i = 1; i < nev; i++) assert_true(ev[i - 1] < ev[i]);
    assert_int_equal(mt_split_indices(200, 0.1, 7, &tr2, &ntr2, &ev2, &nev2, &err), MT_OK);
    assert_memory_equal(ev, ev2, nev * sizeof *ev);
    free(tr2);
    free(ev2);
    assert_int_equal(mt_split_indices(200, 0.1, 8, &tr2, &ntr2, &ev2, &nev2, &err), MT_OK);
    assert_true(memcmp(ev, ev2, nev * sizeof *ev) != 0);
    free(tr2);
    free(ev2);
    free(tr);
    free(ev);
    assert_int_equal(mt_split_indices(7, 0.25, 1, &tr, &ntr, &ev, &nev, &err), MT_OK);
    assert_int_equal(nev, 2); /* round(1.75) */
    free(tr);
    free(ev);
    assert_int_equal(mt_split_indices(7, 1.0, 1, &tr, &ntr, &ev, &nev, &err), MT_ERR_INVALID_ARG);
    assert_int_equal(mt_split_indices(7, -0.1, 1, &tr, &ntr, &ev, &nev, &err), MT_ERR_INVALID_ARG);

    /* records move into the two sets */
    mt_record_set all, train, eval;
    load_ok(DATA_DIR "/text.jsonl", MT_DATA_AUTO, NULL, &all);
    assert_int_equal(mt_record_set_split(&all, 0.34, 3, &train, &eval, &err), MT_OK);
    assert_int_equal(all.n, 0);
    assert_int_equal(train.n, 2);
    assert_int_equal(eval.n, 1);
    assert_int_equal(train.n_files, 1);
    assert_true(train.records[0].line < train.records[1].line);
    int lines = (int)(train.records[0].line + train.records[1].line + eval.records[0].line);
    assert_int_equal(lines, 1 + 2 + 3);
    mt_record_set_free(&train);
    mt_record_set_free(&eval);
}

static void test_cursor_resume(void **state) {
    (void)state;
    mt_example_set s;
    make_set(&s, 23, 20, 99);
    const int B = 2, T = 24;
    const size_t BT = (size_t)(B * T);
    mt_error err = {0};
    for (int pack = 0; pack < 2; pack++) {
        /* uninterrupted: 15 batches, across epoch boundaries */
        int32_t ref[15][4][48];
        int ref_n[15];
        mt_batcher *a;
        assert_int_equal(mt_batcher_create(&s, B, T, pack, 2024, 1, &a, &err), MT_OK);
        mt_cursor at5 = {0, 0};
        for (int i = 0; i < 15; i++) {
            mt_batch_info info;
            assert_int_equal(mt_batcher_next(a, ref[i][0], ref[i][1], ref[i][2], ref[i][3], NULL, &info,
                                             &err),
                             MT_OK);
            ref_n[i] = info.examples;
            if (i == 4) at5 = mt_batcher_get_cursor(a);
        }
        mt_batcher_free(a);
        /* resumed: a fresh batcher set to the cursor saved after batch 5 */
        mt_batcher *b2;
        assert_int_equal(mt_batcher_create(&s, B, T, pack, 2024, 1, &b2, &err), MT_OK);
        assert_int_equal(mt_batcher_set_cursor(b2, at5, &err), MT_OK);
        for (int i = 5; i < 15; i++) {
            int32_t got[4][48];
            mt_batch_info info;
            assert_int_equal(mt_batcher_next(b2, got[0], got[1], got[2], got[3], NULL, &info, &err),
                             MT_OK);
            assert_int_equal(info.examples, ref_n[i]);
            for (int k = 0; k < 4; k++) assert_memory_equal(got[k], ref[i][k], BT * sizeof(int32_t));
        }
        mt_cursor bad = {0, 24};
        assert_int_equal(mt_batcher_set_cursor(b2, bad, &err), MT_ERR_INVALID_ARG);
        mt_batcher_free(b2);
    }
    mt_example_set_free(&s);
}

static void test_stats(void **state) {
    (void)state;
    mt_example_options o = {.seq_len = 8, .truncation = MT_TRUNCATE_LEFT};
    mt_example_set s;
    mt_error err = {0};
    assert_int_equal(mt_example_set_init(&s, &o, &err), MT_OK);
    int32_t ids[16];
    uint8_t tr[16];
    make_example(ids, tr, 4, 2, 0); /* 4 tokens, targets at 1,2 -> trainable[2], [3]: 2 */
    assert_int_equal(mt_example_set_add(&s, ids, tr, 4, 0, 1, &err), MT_OK);
    make_example(ids, tr, 6, 3, 0); /* 6 tokens, 3 targets */
    assert_int_equal(mt_example_set_add(&s, ids, tr, 6, 0, 2, &err), MT_OK);
    make_example(ids, tr, 10, 6, 0); /* truncated to 8: 4 targets */
    assert_int_equal(mt_example_set_add(&s, ids, tr, 10, 0, 3, &err), MT_OK);
    make_example(ids, tr, 3, 3, 0); /* nothing to train */
    assert_int_equal(mt_example_set_add(&s, ids, tr, 3, 0, 4, &err), MT_OK);
    mt_record_set rs;
    mt_record_set_init(&rs);
    mt_jsonl_options jo = {MT_DATA_AUTO, NULL, MT_BAD_RECORD_SKIP};
    assert_int_equal(mt_records_load_jsonl(DATA_DIR "/mixed_bad.jsonl", &jo, &rs, &err), MT_OK);
    mt_dataset_stats st;
    mt_dataset_stats_compute(&rs, &s, &st);
    assert_int_equal(st.records, 3);
    assert_int_equal(st.bad_skipped, 7);
    assert_int_equal(st.examples, 3);
    assert_int_equal(st.tokens, 18);
    assert_true(st.mean_len == 6.0);
    assert_int_equal(st.max_len, 8);
    assert_int_equal(st.trained_tokens, 9);
    assert_true(st.trained_fraction == 9.0 / 18.0);
    assert_int_equal(st.truncated_prompt, 1);
    assert_int_equal(st.truncated_response, 0);
    assert_int_equal(st.dropped_no_target, 1);
    assert_int_equal(st.seq_len, 8);
    char *dir = mt_test_tmpdir("dataset");
    char *path = mt_path_join(dir, "stats.txt", NULL);
    FILE *f = fopen(path, "w+");
    mt_dataset_stats_print(&st, "train", f);
    rewind(f);
    char buf[2048];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    assert_non_null(strstr(buf, "dataset: train"));
    assert_non_null(strstr(buf, "(7 bad records skipped)"));
    assert_non_null(strstr(buf, "tokens           18 (mean 6.0, max 8"));
    assert_non_null(strstr(buf, "trained tokens   9 (50.0%)"));
    free(path);
    mt_test_rmtree(dir);
    free(dir);
    mt_record_set_free(&rs);
    mt_example_set_free(&s);
}

/* ---- end to end through the real tokenizer ------------------------------------------- */

static void test_smollm2_end_to_end(void **state) {
    (void)state;
    if (access(SMOLLM2_TOKENIZER, R_OK) != 0) {
        printf("SKIP test_smollm2_end_to_end: %s is not there yet\n", SMOLLM2_TOKENIZER);
        return;
    }
    mt_tokenizer *tok;
    mt_error err = {0};
    assert_int_equal(mt_tokenizer_load_json(SMOLLM2_TOKENIZER, NULL, &tok, &err), MT_OK);
    const char *text = "<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
                       "<|im_start|>assistant\nFour, of course.<|im_end|>\n";
    const char *reply = "Four, of course.<|im_end|>";
    size_t start = (size_t)(strstr(text, reply) - text);
    mt_span span = {start, start + strlen(reply)};
    mt_example_options o = {.seq_len = 128, .truncation = MT_TRUNCATE_LEFT};
    mt_example_set s;
    assert_int_equal(mt_example_set_init(&s, &o, &err), MT_OK);
    mt_status st = mt_example_set_add_text(&s, tok, text, strlen(text), &span, 1, 0, 1, &err);
    if (st) fail_msg("%s", err.msg);
    assert_int_equal(s.n, 1);
    const mt_example *e = &s.ex[0];
    int32_t ids[128];
    size_t n = 0;
    for (int i = 0; i < e->n; i++)
        if (e->trainable[i]) ids[n++] = e->ids[i];
    char *dec = NULL;
    size_t dlen = 0;
    assert_int_equal(mt_tokenizer_decode(tok, ids, n, 0, &dec, &dlen, &err), MT_OK);
    assert_string_equal(dec, reply); /* exactly the reply and its end-of-turn token */
    free(dec);
    assert_int_equal(e->ids[e->n - 2], mt_tokenizer_token_id(tok, "<|im_end|>"));
    assert_int_equal(e->trainable[e->n - 1], 0); /* the final "\n" */
    /* a bad span is refused */
    mt_span wild = {5, 9999};
    assert_int_equal(mt_example_set_add_text(&s, tok, text, strlen(text), &wild, 1, 0, 2, &err),
                     MT_ERR_INVALID_ARG);
    /* train_on_inputs marks everything */
    mt_example_set s2;
    o.train_on_inputs = 1;
    assert_int_equal(mt_example_set_init(&s2, &o, &err), MT_OK);
    assert_int_equal(mt_example_set_add_text(&s2, tok, text, strlen(text), &span, 1, 0, 1, &err),
                     MT_OK);
    for (int i = 0; i < s2.ex[0].n; i++) assert_int_equal(s2.ex[0].trainable[i], 1);
    mt_example_set_free(&s2);
    mt_example_set_free(&s);
    mt_tokenizer_free(tok);
}

/* A data file without records is refused at load, naming it (later, an empty held-out
 * set could not say which file it came from); the record set is left as it was. */

/* ---- CSV and TSV ------------------------------------------------------------------ */

/* Two record sets hold the same conversations. */
static void assert_same_records(const mt_record_set *a, const mt_record_set *b) {
    assert_int_equal(a->n, b->n);
    for (size_t i = 0; i < a->n; i++) {
        assert_int_equal(a->records[i].format, b->records[i].format);
        assert_int_equal(a->records[i].n_messages, b->records[i].n_messages);
        for (int j = 0; j < a->records[i].n_messages; j++)
            assert_msg(&a->records[i].messages[j], b->records[i].messages[j].role,
                       b->records[i].messages[j].content);
    }
}

/* Python's csv.writer wrote the fixtures (tests/parity/make_csv_fixture.py): quoted
 * commas, doubled quotes, LF and CRLF inside fields, CRLF rows, tabs, non-ASCII; read
 * as CSV and TSV they are the records of the JSONL file it wrote alongside. */
static void test_csv_tsv_match_jsonl(void **state) {
    (void)state;
    mt_record_set want, got;
    load_ok(DATA_DIR "/mixed_fields.jsonl", MT_DATA_AUTO, NULL, &want);
    assert_int_equal(want.n, 6);
    const char *files[] = {DATA_DIR "/mixed_fields.csv", DATA_DIR "/mixed_fields.tsv"};
    for (int f = 0; f < 2; f++) {
        mt_jsonl_options opt = {MT_DATA_AUTO, NULL, MT_BAD_RECORD_ERROR};
        mt_error err = {0};
        mt_record_set_init(&got);
        if (mt_records_load(files[f], &opt, &got, &err)) fail_msg("%s", err.msg);
        assert_int_equal(got.format, MT_DATA_ALPACA);
        assert_same_records(&got, &want);
        /* a record's line is where its row starts: the header is line 1, the record
         * after the one with a line break inside a field starts two lines later */
        assert_int_equal(got.records[0].line, 2);
        assert_int_equal(got.records[1].line, 3);
        assert_int_equal(got.records[2].line, 6);
        mt_record_set_free(&got);
    }
    mt_record_set_free(&want);
    /* a messages column written as JSON text is the conversation */
    load_ok(DATA_DIR "/chat_messages.jsonl", MT_DATA_AUTO, NULL, &want);
    mt_jsonl_options opt = {MT_DATA_AUTO, NULL, MT_BAD_RECORD_ERROR};
    mt_error err = {0};
    mt_record_set_init(&got);
    if (mt_records_load(DATA_DIR "/chat_messages.csv", &opt, &got, &err)) fail_msg("%s", err.msg);
    assert_int_equal(got.format, MT_DATA_CHAT);
    assert_same_records(&got, &want);
    mt_record_set_free(&got);
    mt_record_set_free(&want);
    /* the digest of what was parsed is the file's own SHA-256, JSONL and CSV alike */
    const char *digested[] = {DATA_DIR "/mixed_fields.jsonl", DATA_DIR "/mixed_fields.csv"};
    for (int f = 0; f < 2; f++) {
        uint8_t sum[MT_SHA256_BYTES];
        char hex[MT_SHA256_HEX], file_hex[MT_SHA256_HEX];
        mt_record_set_init(&got);
        if (mt_records_load_digest(digested[f], &opt, &got, sum, &err)) fail_msg("%s", err.msg);
        assert_int_equal(got.n, 6);
        mt_sha256_to_hex(sum, hex);
        assert_int_equal(mt_sha256_file(digested[f], file_hex, NULL, &err), MT_OK);
        assert_string_equal(hex, file_hex);
        mt_record_set_free(&got);
    }
}

/* Malformed CSV and bad rows name the file, the line and (for quoting) the column; a
 * bad row follows the bad-record policy, malformed quoting always ends the file. */
static void test_csv_errors(void **state) {
    (void)state;
    static const struct {
        const char *text, *want;
        int skippable;
    } cases[] = {
        {"prompt,completion\na,b\nc,d,e\n", "t.csv:3: 3 fields where the header has 2", 1},
        {"prompt,completion\na,b\nc\n", "t.csv:3: 1 fields where the header has 2", 1},
        {"prompt,completion\n\"a,b\n", "t.csv:2:1: this quote is never closed", 0},
        {"prompt,completion\n\"a\"x,b\n", "t.csv:2:4: text after a closing quote", 0},
        {"prompt,completion\na,\"b\n\nc\"d\n", "t.csv:4:3: text after a closing quote", 0},
        {"prompt,prompt\na,b\n", "t.csv:1: header: column 'prompt' appears twice", 0},
        {"prompt,\na,b\n", "t.csv:1: header: column 2 needs a name", 0},
        {"prompt,completion\ncaf\xC3,b\n", "t.csv:2: column 'prompt': invalid UTF-8", 1},
        {"prompt,completion\na,\n", "t.csv:2: field 'completion'", 1},
        {"prompt,completion\n", "t.csv: no records", 0},
        {"", "t.csv: no records", 0},
        {"question,answer\na,b\n", "t.csv:2: cannot tell the format", 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        for (int skip = 0; skip <= 1; skip++) {
            mt_jsonl_options opt = {MT_DATA_AUTO, NULL, skip ? MT_BAD_RECORD_SKIP : MT_BAD_RECORD_ERROR};
            mt_record_set s;
            mt_record_set_init(&s);
            mt_error err = {0};
            mt_status st = mt_records_parse_csv("t.csv", cases[i].text, strlen(cases[i].text), ',',
                                                &opt, &s, &err);
            const char *msg = err.msg, *want = cases[i].want;
            if (skip && cases[i].skippable) { /* counted; with no good row, no records */
                if (st == MT_OK) msg = s.bad[0].msg;
                else want = "every record was bad and skipped";
            }
            if (!strstr(msg, want))
                fail_msg("case %zu (skip %d): expected '%s', got status %d '%s'", i, skip, want,
                         (int)st, msg);
            if (!skip || !cases[i].skippable) assert_int_not_equal(st, MT_OK);
            if (st) assert_int_equal(s.n, 0); /* a failed load keeps nothing of the file */
            mt_record_set_free(&s);
        }
    }
    /* the skip policy keeps the good rows around a bad one */
    const char *text = "prompt,completion\na,b\nc,d,e\nf,g\n";
    mt_jsonl_options opt = {MT_DATA_AUTO, NULL, MT_BAD_RECORD_SKIP};
    mt_record_set s;
    mt_record_set_init(&s);
    mt_error err = {0};
    assert_int_equal(mt_records_parse_csv("t.csv", text, strlen(text), ',', &opt, &s, &err), MT_OK);
    assert_int_equal(s.n, 2);
    assert_int_equal(s.n_bad, 1);
    assert_int_equal(s.records[1].line, 4);
    assert_msg(&s.records[1].messages[1], "assistant", "g");
    mt_record_set_free(&s);
}

/* ---- mixtures --------------------------------------------------------------------- */

static int same_record_text(const mt_record *a, const mt_record *b) {
    return a->n_messages == b->n_messages &&
           !strcmp(a->messages[0].content, b->messages[0].content);
}

static void test_mixture_weights(void **state) {
    (void)state;
    mt_record_set base;
    load_ok(DATA_DIR "/mixed_fields.jsonl", MT_DATA_AUTO, NULL, &base);
    const size_t n = base.n; /* 6 */
    static const struct {
        double weight;
        size_t want;
    } cases[] = {{1.0, 6}, {2.0, 12}, {0.5, 3}, {1.5, 9}, {0.2, 1}, {3.25, 20}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        mt_record_set s;
        load_ok(DATA_DIR "/alpaca.jsonl", MT_DATA_AUTO, NULL, &s); /* 3 records before */
        mt_jsonl_options opt = {MT_DATA_AUTO, NULL, MT_BAD_RECORD_ERROR};
        mt_error err = {0};
        assert_int_equal(mt_records_load_jsonl(DATA_DIR "/mixed_fields.jsonl", &opt, &s, &err), MT_OK);
        if (mt_record_set_weight(&s, 3, cases[c].weight, 7, &err)) fail_msg("%s", err.msg);
        assert_int_equal(s.n, 3 + cases[c].want);
        /* the earlier file is untouched; every record of the weighted one is one of its
         * records, each appearing floor(w) or floor(w) + 1 times, the sampled ones in
         * file order */
        assert_string_equal(s.records[0].messages[0].content, "Name a primary colour.");
        size_t counts[6] = {0};
        size_t last = 0;
        for (size_t i = 3; i < s.n; i++) {
            size_t j = 0;
            while (j < n && !same_record_text(&s.records[i], &base.records[j])) j++;
            assert_true(j < n);
            assert_int_equal(s.records[i].file, 1);
            if (i >= 3 + (size_t)cases[c].weight * n) { /* the sampled part */
                if (i > 3 + (size_t)cases[c].weight * n) assert_true(j > last);
                last = j;
            }
            counts[j]++;
        }
        for (size_t j = 0; j < n; j++) {
            assert_true(counts[j] >= (size_t)cases[c].weight);
            assert_true(counts[j] <= (size_t)cases[c].weight + 1);
        }
        mt_record_set_free(&s);
    }
    /* the seed chooses which records a fraction keeps: the same seed the same ones */
    int differs = 0;
    for (uint64_t seed = 1; seed <= 8; seed++) {
        mt_record_set a, b;
        load_ok(DATA_DIR "/mixed_fields.jsonl", MT_DATA_AUTO, NULL, &a);
        load_ok(DATA_DIR "/mixed_fields.jsonl", MT_DATA_AUTO, NULL, &b);
        mt_error err = {0};
        assert_int_equal(mt_record_set_weight(&a, 0, 0.5, 100, &err), MT_OK);
        assert_int_equal(mt_record_set_weight(&b, 0, 0.5, seed, &err), MT_OK);
        for (size_t i = 0; i < a.n; i++) differs |= !same_record_text(&a.records[i], &b.records[i]);
        mt_record_set_free(&a);
        mt_record_set_free(&b);
    }
    assert_true(differs);
    /* refusals name the file */
    static const double bad[] = {0.0, -1.0, NAN, 1001.0, 0.01};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        mt_record_set s;
        load_ok(DATA_DIR "/mixed_fields.jsonl", MT_DATA_AUTO, NULL, &s);
        mt_error err = {0};
        assert_int_not_equal(mt_record_set_weight(&s, 0, bad[i], 1, &err), MT_OK);
        assert_non_null(strstr(err.msg, "mixed_fields.jsonl"));
        assert_int_equal(s.n, n);
        mt_record_set_free(&s);
    }
    mt_record_set_free(&base);
}

static void test_empty_file_is_named(void **state) {
    (void)state;
    const char *texts[] = {"", "\n\n  \n", "{\"bad\": 1}\n"};
    const char *want[] = {"no records (the file is empty or holds only blank lines)",
                          "no records (the file is empty or holds only blank lines)",
                          "no records (every record was bad and skipped)"};
    for (int i = 0; i < 3; i++) {
        mt_record_set s;
        memset(&s, 0, sizeof s);
        mt_jsonl_options opt = {MT_DATA_AUTO, NULL, i == 2 ? MT_BAD_RECORD_SKIP : MT_BAD_RECORD_ERROR};
        mt_error err = {0};
        assert_int_not_equal(mt_records_parse_jsonl("heldout.jsonl", texts[i], strlen(texts[i]), &opt, &s, &err), MT_OK);
        printf("refused: %s\n", err.msg);
        assert_non_null(strstr(err.msg, "heldout.jsonl: "));
        assert_non_null(strstr(err.msg, want[i]));
        assert_int_equal(s.n, 0);
        assert_int_equal(s.n_files, 0);
        mt_record_set_free(&s);
    }
}

/* An example set remembers the files it came from: an empty held-out set, an example
 * too long for the batch and a set without examples name the file ("evaluation: the
 * held-out set is empty" named none), and say why the set is empty. */
static void test_examples_name_their_source(void **state) {
    (void)state;
    mt_example_options opt = {.seq_len = 4, .truncation = MT_TRUNCATE_DROP};
    mt_example_set s;
    mt_error err = {0};
    assert_int_equal(mt_example_set_init(&s, &opt, &err), MT_OK);
    char buf[256];
    assert_null(mt_example_set_source(&s, buf, sizeof buf));
    assert_string_equal(mt_example_where(&s, 0, 7, buf, sizeof buf), "line 7");
    char *files[] = {"data/a.jsonl", "data/heldout.jsonl", "c.jsonl"};
    assert_int_equal(mt_example_set_set_files(&s, files + 1, 1, &err), MT_OK);
    assert_string_equal(mt_example_set_source(&s, buf, sizeof buf), "data/heldout.jsonl");
    assert_string_equal(mt_example_where(&s, 0, 7, buf, sizeof buf), "data/heldout.jsonl:7");
    /* an example longer than seq_len under "drop", and one with nothing to train on */
    const int32_t ids[6] = {1, 2, 3, 4, 5, 6};
    const uint8_t all[6] = {1, 1, 1, 1, 1, 1}, none[3] = {0, 0, 0};
    assert_int_equal(mt_example_set_add(&s, ids, all, 6, 0, 3, &err), MT_OK);
    assert_int_equal(mt_example_set_add(&s, ids, none, 3, 0, 4, &err), MT_OK);
    assert_int_equal(s.n, 0);
    mt_eval_result r;
    assert_int_not_equal(mt_evaluate(NULL, &s, 2, 8, 0, &r, &err), MT_OK);
    printf("refused: %s\n", err.msg);
    assert_string_equal(err.msg, "data/heldout.jsonl: evaluation: the held-out set is empty (1 example "
                                 "longer than seq_len 4 dropped by truncation \"drop\"; 1 example "
                                 "with nothing to train on)");
    mt_batcher *b = NULL;
    assert_int_not_equal(mt_batcher_create(&s, 2, 8, 1, 0, 0, &b, &err), MT_OK);
    assert_non_null(strstr(err.msg, "data/heldout.jsonl: batcher: the dataset has no examples"));
    /* several files; an example too long for the batch is named by file and line */
    assert_int_equal(mt_example_set_set_files(&s, files, 3, &err), MT_OK);
    assert_string_equal(mt_example_set_source(&s, buf, sizeof buf), "data/a.jsonl and 2 more files");
    assert_int_equal(mt_example_set_add(&s, ids, all, 4, 2, 9, &err), MT_OK);
    assert_int_equal(mt_batcher_create(&s, 2, 3, 1, 0, 0, &b, &err), MT_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "(c.jsonl:9) has 4 tokens, more than T=3"));
    mt_example_set_free(&s);
    assert_int_equal(s.n_files, 0);
    /* without files: no name, and the plain message */
    assert_int_equal(mt_example_set_init(&s, &opt, &err), MT_OK);
    assert_int_not_equal(mt_evaluate(NULL, &s, 2, 8, 0, &r, &err), MT_OK);
    assert_string_equal(err.msg, "evaluation: the held-out set is empty");
    mt_example_set_free(&s);
}

/* ---- mt_batch_share_prefix ---- */

/* A packed batch of examples given as (row, length): example i's tokens are
 * prefix[0..common) then 100 * (i + 1) + t, its targets ignored below first_target. */
#define SP_MAX 512
typedef struct sp_batch {
    int B, T, n;
    int32_t tok[SP_MAX], pos[SP_MAX], seg[SP_MAX], tgt[SP_MAX];
    int32_t ex_tok[16][64], ex_tgt[16][64];
    int ex_len[16];
} sp_batch;

static void sp_make(sp_batch *b, int B, int T, int n, const int *rows, const int *lens, int common,
                    int first_target) {
    memset(b, 0, sizeof *b);
    b->B = B, b->T = T, b->n = n;
    int used[8] = {0}, nseg[8] = {0};
    for (int i = 0; i < B * T; i++) b->tok[i] = 7, b->pos[i] = i % T, b->seg[i] = -1, b->tgt[i] = -100;
    for (int i = 0; i < n; i++) {
        const int r = rows[i];
        b->ex_len[i] = lens[i];
        for (int t = 0; t < lens[i]; t++) {
            b->ex_tok[i][t] = t < common ? 50 + t : 100 * (i + 1) + t;
            b->ex_tgt[i][t] = t < first_target || t == lens[i] - 1 ? -100 : 1000 + 10 * i + t;
            const int at = r * T + used[r] + t;
            b->tok[at] = b->ex_tok[i][t], b->tgt[at] = b->ex_tgt[i][t];
            b->pos[at] = t, b->seg[at] = nseg[r];
        }
        used[r] += lens[i];
        nseg[r]++;
    }
}

/* Runs mt_batch_share_prefix; checks that every example comes back whole (the prefix
 * at the start of its row, then its own segment continuing the positions) and returns
 * the prefix's length (0: the batch was left as it was, checked byte for byte). */
static int sp_check_rows(sp_batch *b, int rows, int *B_new, int *T_new) {
    sp_batch before = *b;
    mt_error err = {0};
    assert_int_equal(mt_batch_share_prefix(b->tok, b->pos, b->seg, b->tgt, b->B, b->T, rows,
                                           B_new, T_new, &err),
                     MT_OK);
    if (*B_new == b->B && *T_new == b->T) {
        assert_memory_equal(b, &before, sizeof *b);
        return 0;
    }
    const int R = *B_new, W = *T_new;
    assert_true((int64_t)R * W <= (int64_t)b->B * b->T);
    /* the four arrays moved to stride W, one after another at their own bases */
    int P = 0;
    while (P < W && b->seg[P] == MT_SHARED_SEGMENT) P++;
    assert_true(P >= 1);
    int found[16] = {0};
    for (int r = 0; r < R; r++) {
        const int32_t *tok = b->tok + r * W, *pos = b->pos + r * W, *seg = b->seg + r * W,
                      *tgt = b->tgt + r * W;
        for (int t = 0; t < P; t++) {
            assert_int_equal(seg[t], MT_SHARED_SEGMENT);
            assert_int_equal(pos[t], t);
            assert_int_equal(tok[t], before.ex_tok[0][t]);
            assert_int_equal(tgt[t], -100);
        }
        for (int t = P; t < W;) {
            if (seg[t] == -1) { /* padding to the row's end */
                for (int u = t; u < W; u++) {
                    assert_int_equal(seg[u], -1);
                    assert_int_equal(tgt[u], -100);
                    assert_true(pos[u] >= 0 && pos[u] < b->T);
                }
                break;
            }
            const int i = seg[t];
            assert_true(i >= 0 && i < b->n && !found[i]);
            found[i] = 1;
            for (int k = 0; k < P; k++) assert_int_equal(before.ex_tok[i][k], tok[k]);
            for (int k = P; k < before.ex_len[i]; k++, t++) {
                assert_int_equal(seg[t], i);
                assert_int_equal(pos[t], k);
                assert_int_equal(tok[t], before.ex_tok[i][k]);
                assert_int_equal(tgt[t], before.ex_tgt[i][k]);
            }
            assert_true(t == W || seg[t] != i);
        }
    }
    for (int i = 0; i < b->n; i++) assert_true(found[i]);
    return P;
}

static int sp_check(sp_batch *b, int *B_new, int *T_new) { return sp_check_rows(b, 0, B_new, T_new); }

static void test_batch_share_prefix(void **state) {
    (void)state;
    sp_batch b;
    int B_new, T_new;
    /* two rows of two: one new row as wide as the prefix and four remainders, past T */
    const int rows4[] = {0, 0, 1, 1}, lens4[] = {10, 11, 12, 9};
    sp_make(&b, 2, 24, 4, rows4, lens4, 5, 6);
    assert_int_equal(sp_check(&b, &B_new, &T_new), 5);
    assert_int_equal(B_new, 1);
    assert_int_equal(T_new, 5 + 5 + 6 + 7 + 4);
    /* the prefix stops at the first target (train_on_inputs: none shared at all) */
    sp_make(&b, 2, 24, 4, rows4, lens4, 5, 3);
    assert_int_equal(sp_check(&b, &B_new, &T_new), 3);
    sp_make(&b, 2, 24, 4, rows4, lens4, 5, 0);
    assert_int_equal(sp_check(&b, &B_new, &T_new), 0);
    /* nothing in common; a single example; an example as short as the prefix + 1 */
    sp_make(&b, 2, 24, 4, rows4, lens4, 0, 6);
    assert_int_equal(sp_check(&b, &B_new, &T_new), 0);
    const int row1[] = {0}, len1[] = {20};
    sp_make(&b, 1, 24, 1, row1, len1, 5, 6);
    assert_int_equal(sp_check(&b, &B_new, &T_new), 0);
    const int lens_short[] = {10, 3, 12, 9};
    sp_make(&b, 2, 24, 4, rows4, lens_short, 5, 6);
    assert_int_equal(sp_check(&b, &B_new, &T_new), 2);
    /* four rows of two, unequal, into two new rows: examples to the shorter row in order */
    const int rows8[] = {0, 0, 1, 1, 2, 2, 3, 3}, lens8[] = {20, 9, 14, 14, 25, 6, 11, 12};
    sp_make(&b, 4, 32, 8, rows8, lens8, 4, 4);
    assert_int_equal(sp_check_rows(&b, 2, &B_new, &T_new), 4);
    assert_int_equal(B_new, 2);
    /* remainders 16 5 10 10 21 2 7 8: row 0 takes 16, 21 (4 + 37); row 1 the rest (4 + 42) */
    assert_int_equal(T_new, 46);
    /* the same in one row (the default, as 1 asks), and in more rows than in use: 4 */
    for (int rows = 0; rows <= 1; rows++) {
        sp_make(&b, 4, 32, 8, rows8, lens8, 4, 4);
        assert_int_equal(sp_check_rows(&b, rows, &B_new, &T_new), 4);
        assert_int_equal(B_new, 1);
        assert_int_equal(T_new, 4 + 16 + 5 + 10 + 10 + 21 + 2 + 7 + 8);
    }
    sp_make(&b, 4, 32, 8, rows8, lens8, 4, 4);
    assert_int_equal(sp_check_rows(&b, 9, &B_new, &T_new), 4);
    assert_int_equal(B_new, 4);
    /* a second pass finds a shared prefix already and leaves the batch alone */
    assert_int_equal(sp_check(&b, &B_new, &T_new), 0);
    /* three rows of one into two new rows: 4 + 16 + 16 and 4 + 16 */
    const int rows3[] = {0, 1, 2}, lens3[] = {20, 20, 20};
    sp_make(&b, 3, 32, 3, rows3, lens3, 4, 4);
    assert_int_equal(sp_check_rows(&b, 2, &B_new, &T_new), 4);
    assert_int_equal(B_new, 2);
    assert_int_equal(T_new, 36);
    /* full rows: 2 x (4 + 28 + 28) would not fit 3 x 32 tokens, so left as they were;
     * one row of 4 + 3 x 28 does */
    const int full3[] = {32, 32, 32};
    sp_make(&b, 3, 32, 3, rows3, full3, 4, 4);
    assert_int_equal(sp_check_rows(&b, 2, &B_new, &T_new), 0);
    assert_int_equal(sp_check(&b, &B_new, &T_new), 4);
    assert_int_equal(B_new, 1);
    assert_int_equal(T_new, 4 + 3 * 28);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_examples_name_their_source),
        cmocka_unit_test(test_alpaca),
        cmocka_unit_test(test_csv_tsv_match_jsonl),
        cmocka_unit_test(test_csv_errors),
        cmocka_unit_test(test_mixture_weights),
        cmocka_unit_test(test_empty_file_is_named),
        cmocka_unit_test(test_chat_and_text_and_prompt_completion),
        cmocka_unit_test(test_preference),
        cmocka_unit_test(test_preference_implicit_prompt),
        cmocka_unit_test(test_pair_truncation),
        cmocka_unit_test(test_pair_rejected_to_difference),
        cmocka_unit_test(test_pair_batcher),
        cmocka_unit_test(test_custom_field_map),
        cmocka_unit_test(test_format_names),
        cmocka_unit_test(test_bad_records_name_file_line_field),
        cmocka_unit_test(test_unknown_shape_and_formats),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_bad_record_in_file_names_path),
        cmocka_unit_test(test_skip_policy_counts_and_lists),
        cmocka_unit_test(test_mask_from_spans),
        cmocka_unit_test(test_targets),
        cmocka_unit_test(test_truncation),
        cmocka_unit_test(test_packing_invariants),
        cmocka_unit_test(test_shard_rows),
        cmocka_unit_test(test_shuffle_deterministic),
        cmocka_unit_test(test_split),
        cmocka_unit_test(test_cursor_resume),
        cmocka_unit_test(test_stats),
        cmocka_unit_test(test_smollm2_end_to_end),
        cmocka_unit_test(test_batch_share_prefix),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
