/* fuzz_tokenizer_json.c — libFuzzer target for tokenizer.json: each input is written
 * to a temporary file and loaded with mt_tokenizer_load_json; a refusal must name the
 * file; an accepted tokenizer encodes and decodes a short mixed text (special tokens,
 * digits, accents, CJK, emoji, invalid-looking spacing) without crashing. Built by
 * scripts/fuzz; seeds in tests/fuzz/corpus/fuzz_tokenizer_json. */
#define _DEFAULT_SOURCE /* mkstemps */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz_tmpfile.h"
#include "text/tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *tmp_path = fuzz_write_tmp("tok", ".json", data, size);
    mt_tokenizer *tok = NULL;
    mt_error err = {MT_OK, ""};
    if (mt_tokenizer_load_json(tmp_path, NULL, &tok, &err) != MT_OK) {
        if (tok || !strstr(err.msg, tmp_path)) abort();
        return 0;
    }
    static const char text[] = "Hello, world! 12345 caf\xc3\xa9  \xe4\xb8\xad\xe6\x96\x87 \xf0\x9f\x98\x80 <s>[W]\n\tend";
    mt_token_list l = {0};
    if (mt_tokenizer_encode(tok, text, sizeof text - 1, 1, &l, &err) == MT_OK) {
        char *out = NULL;
        size_t len = 0;
        if (mt_tokenizer_decode(tok, l.ids, l.n, 0, &out, &len, &err) == MT_OK) free(out);
    }
    mt_token_list_free(&l);
    mt_tokenizer_free(tok);
    return 0;
}
