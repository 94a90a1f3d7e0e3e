/* fuzz_jsonl.c — libFuzzer target for the record readers (core/text/dataset_jsonl.c):
 * JSONL, and CSV/TSV (formats/csv.c) when bit 5 of the first byte is set (bit 6: tab).
 * The first byte picks the format (auto or one of the five), the bad-record policy and
 * default or custom field names; the rest is the file. The input is read twice into one
 * set: once as chosen, once with the error policy (which exercises the roll-back of a
 * failed load on top of earlier records); a mixture weight then repeats or samples the
 * second file's records. Must never crash, leak or read out of bounds. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "text/dataset.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    uint8_t sel = data[0];
    const char *text = (const char *)data + 1;
    size_t len = size - 1;

    mt_data_fields custom = {0};
    custom.messages = "conversations";
    custom.role = "from";
    custom.content = "value";
    custom.instruction = "q";
    custom.output = "a";

    mt_jsonl_options opt = {0};
    opt.format = (mt_data_format)(sel % 6);
    opt.on_bad_record = (sel >> 3) & 1 ? MT_BAD_RECORD_SKIP : MT_BAD_RECORD_ERROR;
    opt.fields = (sel >> 4) & 1 ? &custom : NULL;

    mt_record_set set;
    mt_record_set_init(&set);
    mt_error err = {0};
    const int csv = (sel >> 5) & 1;
    const char delim = (sel >> 6) & 1 ? '\t' : ',';
#define PARSE(name) (csv ? mt_records_parse_csv(name, text, len, delim, &opt, &set, &err) \
                         : mt_records_parse_jsonl(name, text, len, &opt, &set, &err))
    mt_status st = PARSE("fuzz.jsonl");
    if (st != MT_OK && (err.msg[0] == '\0' || memchr(err.msg, '\0', sizeof err.msg) == NULL))
        __builtin_trap(); /* every failure says why */
    size_t before = set.n;
    opt.on_bad_record = MT_BAD_RECORD_ERROR;
    st = PARSE("fuzz2.jsonl");
    if (st != MT_OK && set.n != before) __builtin_trap(); /* a failed load leaves the set */
    if (st == MT_OK && set.n > before) { /* weights 0.5 or 2 on the second file */
        size_t n = set.n - before, want = sel & 1 ? 2 * n : (n + 1) / 2;
        if (mt_record_set_weight(&set, before, sel & 1 ? 2.0 : 0.5, sel, &err) == MT_OK &&
            set.n != before + want)
            __builtin_trap();
    }
    for (size_t i = 0; i < set.n; i++) { /* every record is whole */
        const mt_record *r = &set.records[i];
        if (r->line < 1 || r->file < 0 || r->file >= set.n_files) __builtin_trap();
        for (int m = 0; m < r->n_messages; m++)
            if (!r->messages[m].role || !r->messages[m].content) __builtin_trap();
        if (r->format == MT_DATA_TEXT && !r->text) __builtin_trap();
        if (r->format == MT_DATA_PREFERENCE && (r->n_chosen < 1 || r->n_rejected < 1))
            __builtin_trap();
    }
    FILE *devnull = fopen("/dev/null", "w");
    if (devnull) {
        mt_record_set_print_bad(&set, devnull);
        fclose(devnull);
    }
    if (sel & 0x80) { /* a held-out split of what was read */
        mt_record_set train, eval;
        const size_t total = set.n;
        if (mt_record_set_split(&set, 0.25, sel, &train, &eval, &err) == MT_OK) {
            if (train.n + eval.n != total) __builtin_trap();
            mt_record_set_free(&train);
            mt_record_set_free(&eval);
        }
    }
    mt_record_set_free(&set);
    return 0;
}
