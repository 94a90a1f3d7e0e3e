/* fuzz_tokenizer.c — libFuzzer target: encodes arbitrary bytes with the SmolLM2
 * fixture tokenizer. Invalid UTF-8 must be refused with an error, never a crash;
 * valid UTF-8 must decode back to itself. The first input byte, when odd, asks for
 * BOS/EOS (which SmolLM2 does not add).
 *
 * SmolLM2's vocabulary lacks the byte-level characters of 21 bytes (0x04, 0x06, 0x13,
 * 0x14, 0x16, 0x1D, 0xF1, 0xF2 among those valid UTF-8 can hold); like the
 * `tokenizers` library, encode drops them, so inputs holding them are only checked
 * for a clean encode and decode, not for the round trip.
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -D_POSIX_C_SOURCE=200809L \
 *     -DMT_FIXTURE_DIR="\"$PWD/tests/fixtures\"" -Icore -Icore/include \
 *     tests/fuzz/fuzz_tokenizer.c core/text/tokenizer.c core/formats/gguf.c core/base/util.c \
 *     $(pkg-config --cflags --libs jansson libpcre2-8) -lm -o fuzz_tokenizer
 *   ./fuzz_tokenizer -max_total_time=60 -max_len=4096
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "text/tokenizer.h"

#ifndef MT_FIXTURE_DIR
#define MT_FIXTURE_DIR "tests/fixtures"
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int utf8_ok(const uint8_t *s, size_t n) {
    for (size_t i = 0; i < n;) {
        uint8_t c = s[i];
        size_t l;
        uint32_t cp;
        if (c < 0x80) { i++; continue; }
        if (c >= 0xC2 && c < 0xE0) l = 2, cp = c & 0x1F;
        else if (c >= 0xE0 && c < 0xF0) l = 3, cp = c & 0x0F;
        else if (c >= 0xF0 && c < 0xF5) l = 4, cp = c & 0x07;
        else return 0;
        if (i + l > n) return 0;
        for (size_t k = 1; k < l; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if ((l == 3 && cp < 0x800) || (l == 4 && (cp < 0x10000 || cp > 0x10FFFF)) || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += l;
    }
    return 1;
}

/* GPT-2's byte -> character map: printable Latin-1 stands for itself, the rest
 * moves to U+0100 onwards. Returns the UTF-8 of the character in out. */
static void byte_char(int b, char out[4]) {
    int printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    unsigned cp = (unsigned)b;
    if (!printable) {
        cp = 256;
        for (int k = 0; k < b; k++)
            cp += !((k >= 0x21 && k <= 0x7E) || (k >= 0xA1 && k <= 0xAC) || (k >= 0xAE && k <= 0xFF));
    }
    if (cp < 0x80) out[0] = (char)cp, out[1] = 0;
    else out[0] = (char)(0xC0 | (cp >> 6)), out[1] = (char)(0x80 | (cp & 0x3F)), out[2] = 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static mt_tokenizer *tok;
    static int byte_known[256];
    mt_error err;
    if (!tok) {
        const char *dir = getenv("MT_FUZZ_TOKENIZER_DIR");
        if (mt_tokenizer_load_dir(dir ? dir : MT_FIXTURE_DIR "/tokenizer/smollm2", &tok, &err) != MT_OK) {
            fprintf(stderr, "fuzz_tokenizer: %s\n", err.msg);
            abort();
        }
        for (int b = 0; b < 256; b++) {
            char ch[4];
            byte_char(b, ch);
            byte_known[b] = mt_tokenizer_token_id(tok, ch) >= 0;
        }
    }
    int add_special = size > 0 && (data[0] & 1);
    mt_token_list list = {0};
    mt_status st = mt_tokenizer_encode(tok, (const char *)data, size, add_special, &list, &err);
    int valid = utf8_ok(data, size);
    if (!valid) {
        if (st == MT_OK || list.n != 0) abort(); /* invalid UTF-8 must be refused */
        mt_token_list_free(&list);
        return 0;
    }
    if (st != MT_OK) {
        fprintf(stderr, "fuzz_tokenizer: valid UTF-8 refused: %s\n", err.msg);
        abort();
    }
    for (size_t i = 0; i < list.n; i++)
        if (list.offsets[i] < 0 || (size_t)list.offsets[i] > size || (i && list.offsets[i] < list.offsets[i - 1])) abort();
    char *text = NULL;
    size_t len = 0;
    if (mt_tokenizer_decode(tok, list.ids, list.n, 0, &text, &len, &err) != MT_OK) abort();
    int all_known = 1;
    for (size_t i = 0; i < size; i++) all_known &= byte_known[data[i]];
    if (all_known && (len != size || memcmp(text, data, size) != 0)) abort(); /* decode(encode(x)) == x */
    free(text);
    mt_token_list_free(&list);
    return 0;
}
