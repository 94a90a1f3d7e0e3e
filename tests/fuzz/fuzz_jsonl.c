/* fuzz_jsonl.c — libFuzzer target for the JSONL record reader (core/text/dataset_jsonl.c).
 * The first byte picks the format (auto or one of the five), the bad-record policy and
 * default or custom field names; the rest is the file. The input is read twice into one
 * set: once as chosen, once with the error policy (which exercises the roll-back of a
 * failed load on top of earlier records). Must never crash, leak or read out of bounds. */
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
    mt_status st = mt_records_parse_jsonl("fuzz.jsonl", text, len, &opt, &set, &err);
    if (st != MT_OK && (err.msg[0] == '\0' || memchr(err.msg, '\0', sizeof err.msg) == NULL))
        __builtin_trap(); /* every failure says why */
    size_t before = set.n;
    opt.on_bad_record = MT_BAD_RECORD_ERROR;
    st = mt_records_parse_jsonl("fuzz2.jsonl", text, len, &opt, &set, &err);
    if (st != MT_OK && set.n != before) __builtin_trap(); /* a failed load leaves the set */
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
        if (mt_record_set_split(&set, 0.25, sel, &train, &eval, &err) == MT_OK) {
            if (train.n + eval.n != before + (st == MT_OK ? before : 0)) __builtin_trap();
            mt_record_set_free(&train);
            mt_record_set_free(&eval);
        }
    }
    mt_record_set_free(&set);
    return 0;
}
