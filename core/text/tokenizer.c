/* tokenizer.c — BPE tokenizers from Hugging Face tokenizer.json or GGUF metadata.
 *
 * One pipeline serves both families, in the order the `tokenizers` library runs it:
 *   1. added tokens whose normalized flag is false are cut out of the raw text
 *      (leftmost-longest, honouring lstrip/rstrip/single_word);
 *   2. every other segment is normalized (Prepend, Replace, Sequence) into an arena
 *      that remembers, per byte, the input offset it came from; added tokens whose
 *      normalized flag is true are cut out of the normalized text;
 *   3. the pre-tokenizer stages (Split through PCRE2, Digits, ByteLevel, Metaspace)
 *      refine the segment into pieces;
 *   4. each piece is merged by rank (a binary heap over a linked list of symbols,
 *      so a long word costs O(n log n)); byte-level pieces start from one symbol per
 *      byte, SentencePiece pieces from one per character with <0xNN> byte fallback.
 * Decoding runs the decoder chain (ByteLevel, Replace, ByteFallback, Fuse, Strip,
 * Metaspace) over token strings, then joins them.
 *
 * Split patterns are Oniguruma regexes in `tokenizers`; they are translated to PCRE2
 * where the dialects differ (\s is White_Space, \w, \b, intervals, POSIX classes,
 * line anchors, options, nested classes: see regex_onig_to_pcre2).
 *
 * Like `tokenizers`, a character (or byte) the vocabulary lacks, with no byte fallback
 * and no unk token, is dropped: SmolLM2's alphabet lacks 0x04, 0x06, 0x13, 0x14,
 * 0x16, 0x1D, 0xF1 and 0xF2, so text holding them does not round-trip.
 * The NFC normalizer (Qwen2) is unicode_nfc.c, whose tables are Unicode 13.0; the
 * `tokenizers` library's are Unicode 9.0, so text with characters that Unicode 10.0
 * to 13.0 gave a nonzero combining class or a canonical composition may normalize
 * differently (none is in the parity corpus). Offsets stay byte offsets into the
 * original text: a normalized character maps to the input character it came from (a
 * composed one to its starter, the first character composed into it), and where
 * canonical ordering moved a mark ahead of earlier ones, to the smallest offset at or
 * after it, so offsets never decrease. A token's offset is that of its first byte.
 * single_word decides word characters as `tokenizers` does (Unicode \w, the table in
 * core/text/unicode_word.c). Limits: regex-pattern Replace normalizers/decoders
 * and the WordPiece/Unigram/WordLevel models are refused at load. */
#define PCRE2_CODE_UNIT_WIDTH 8

#include "text/tokenizer.h"

#include <inttypes.h>
#include <jansson.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/gguf.h"
#include "base/internal.h"
#include "text/unicode_nfc.h"
#include "text/unicode_word.h"

/* ---- small containers ---------------------------------------------------- */

/* open-addressing map from a token's text to its id; slots hold id + 1 */
typedef struct str_map {
    uint32_t *slots;
    size_t mask;
} str_map;

/* open-addressing map from a pair of ids to (rank, merged id) */
typedef struct merge_map {
    uint64_t *keys; /* UINT64_MAX = empty */
    int32_t *rank, *merged;
    size_t mask;
} merge_map;

typedef struct added_token {
    int32_t id;
    char *content;
    size_t len;
    int special, lstrip, rstrip, single_word, normalized;
} added_token;

enum { NORM_PREPEND = 1, NORM_REPLACE, NORM_NFC };
typedef struct norm_stage {
    int type;
    char *a, *b; /* Prepend: a; Replace: a -> b */
    size_t alen, blen;
} norm_stage;

enum { SPLIT_REMOVED = 1, SPLIT_ISOLATED, SPLIT_MERGED_PREV, SPLIT_MERGED_NEXT, SPLIT_CONTIGUOUS };
enum { PT_SPLIT = 1, PT_BYTELEVEL, PT_METASPACE };
enum { PREPEND_ALWAYS = 1, PREPEND_FIRST, PREPEND_NEVER };
typedef struct pt_stage {
    int type;
    pcre2_code *re; /* Split, and ByteLevel with use_regex */
    int behavior, invert;
    int add_prefix_space;
    char repl[8]; /* Metaspace replacement character (UTF-8) */
    size_t repl_len;
    int prepend_scheme, split;
} pt_stage;

enum { DEC_BYTELEVEL = 1, DEC_REPLACE, DEC_BYTEFALLBACK, DEC_FUSE, DEC_STRIP, DEC_METASPACE };
typedef struct dec_stage {
    int type;
    char *a, *b; /* Replace: a -> b; Strip: a = content; Metaspace: a = replacement */
    size_t alen, blen;
    int start, stop, prepend_scheme;
} dec_stage;

#define MT_TOK_MAX_STAGES 16

struct mt_tokenizer {
    mt_tokenizer_family family;
    char *source; /* file path, for messages */
    /* vocabulary, model and added tokens together */
    char **text;
    uint32_t *text_len;
    uint8_t *special;
    int32_t n_ids;
    str_map vocab;
    merge_map merges;
    int32_t unk;
    int byte_fallback, fuse_unk, ignore_merges;
    int32_t byte_id[256];     /* byte-level: id of the byte's alphabet character */
    int32_t fallback_id[256]; /* SentencePiece: id of <0xNN>, -1 when absent */
    uint16_t byte_cp[256];    /* GPT-2 byte -> code point */
    int16_t cp_byte[324];     /* and back, -1 for code points outside the alphabet */
    added_token *added;
    size_t n_added;
    int has_normalized_added; /* some added token matches after normalization */
    uint32_t *added_order;   /* raw-matched added tokens by first byte, longest first */
    uint32_t added_first[257];
    norm_stage norm[MT_TOK_MAX_STAGES];
    int n_norm;
    pt_stage pre[MT_TOK_MAX_STAGES];
    int n_pre;
    int byte_level; /* the last pre-tokenizer stage is ByteLevel */
    dec_stage dec[MT_TOK_MAX_STAGES];
    int n_dec;
    int has_decoder;
    int32_t prefix[4], suffix[4];
    int n_prefix, n_suffix;
    int32_t bos, eos, pad;
    char *chat_template;
};

/* ---- UTF-8 and the byte-level alphabet ----------------------------------- */

/* Length of the valid UTF-8 sequence at s[0..n), 0 when invalid. */
static size_t utf8_valid_len(const unsigned char *s, size_t n) {
    uint32_t cp;
    return mt_utf8_decode(s, n, &cp);
}

/* How many bytes an invalid sequence at s covers: the maximal prefix of a valid
 * sequence, at least 1 (Rust's String::from_utf8_lossy substitutes each such
 * prefix with one U+FFFD). */
static size_t utf8_invalid_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t need;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c < 0xE0) need = 2;
    else if (c >= 0xE0 && c < 0xF0) {
        need = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c < 0xF5) {
        need = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else return 1;
    size_t i = 1;
    if (i < n && s[i] >= lo && s[i] <= hi) {
        i++;
        while (i < need && i < n && (s[i] & 0xC0) == 0x80) i++;
    }
    return i;
}

/* GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the rest
 * are shifted to U+0100 onwards in byte order. */
static uint32_t byte_to_cp(int b) {
    if ((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF))
        return (uint32_t)b;
    int n = 0;
    for (int k = 0; k < b; k++)
        if (!((k >= 0x21 && k <= 0x7E) || (k >= 0xA1 && k <= 0xAC) || (k >= 0xAE && k <= 0xFF))) n++;
    return 256u + (uint32_t)n;
}

/* Unicode White_Space (Rust's char::is_whitespace), as a code point */
static int cp_is_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

/* The code point of the valid character s[0, len). */
static uint32_t utf8_decode(const unsigned char *s, size_t len) {
    uint32_t cp = 0;
    mt_utf8_decode(s, len, &cp);
    return cp;
}

/* start of the character that ends at s[end) (valid UTF-8) */
static size_t utf8_prev(const unsigned char *s, size_t end) {
    size_t i = end - 1;
    while (i > 0 && (s[i] & 0xC0) == 0x80) i--;
    return i;
}

/* ---- hash maps -------------------------------------------------------------- */

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h ^ (h >> 29);
}

static uint64_t hash_u64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}

static size_t pow2_at_least(size_t n) {
    size_t c = 16;
    while (c < n) c <<= 1;
    return c;
}

static int32_t vocab_find(const mt_tokenizer *tok, const char *s, size_t n) {
    if (!tok->vocab.slots) return -1;
    size_t i = hash_bytes(s, n) & tok->vocab.mask;
    for (;;) {
        uint32_t v = tok->vocab.slots[i];
        if (!v) return -1;
        int32_t id = (int32_t)(v - 1);
        if (tok->text_len[id] == n && memcmp(tok->text[id], s, n) == 0) return id;
        i = (i + 1) & tok->vocab.mask;
    }
}

/* Indexes every id's text; the lowest id wins when two share a text. */
static mt_status vocab_build(mt_tokenizer *tok, mt_error *err) {
    size_t cap = pow2_at_least((size_t)tok->n_ids * 2 + 1);
    tok->vocab.slots = mt_calloc(cap, sizeof(uint32_t), "tokenizer vocabulary index", err);
    if (!tok->vocab.slots) return MT_ERR_NOMEM;
    tok->vocab.mask = cap - 1;
    for (int32_t id = 0; id < tok->n_ids; id++) {
        if (!tok->text[id]) continue;
        size_t i = hash_bytes(tok->text[id], tok->text_len[id]) & tok->vocab.mask;
        int dup = 0;
        while (tok->vocab.slots[i]) {
            int32_t o = (int32_t)(tok->vocab.slots[i] - 1);
            if (tok->text_len[o] == tok->text_len[id] &&
                memcmp(tok->text[o], tok->text[id], tok->text_len[id]) == 0) {
                dup = 1;
                break;
            }
            i = (i + 1) & tok->vocab.mask;
        }
        if (!dup) tok->vocab.slots[i] = (uint32_t)id + 1;
    }
    return MT_OK;
}

static mt_status merges_init(merge_map *m, size_t n, mt_error *err) {
    size_t cap = pow2_at_least(n * 2 + 1);
    m->keys = mt_malloc(cap * sizeof(uint64_t), "tokenizer merges", err);
    m->rank = mt_malloc(cap * sizeof(int32_t), "tokenizer merges", err);
    m->merged = mt_malloc(cap * sizeof(int32_t), "tokenizer merges", err);
    if (!m->keys || !m->rank || !m->merged) return MT_ERR_NOMEM;
    memset(m->keys, 0xFF, cap * sizeof(uint64_t));
    m->mask = cap - 1;
    return MT_OK;
}

/* A later duplicate of a pair replaces the earlier one, as in `tokenizers`. */
static void merges_put(merge_map *m, int32_t a, int32_t b, int32_t rank, int32_t merged) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    size_t i = hash_u64(key) & m->mask;
    while (m->keys[i] != UINT64_MAX && m->keys[i] != key) i = (i + 1) & m->mask;
    m->keys[i] = key;
    m->rank[i] = rank;
    m->merged[i] = merged;
}

static int merges_get(const merge_map *m, int32_t a, int32_t b, int32_t *rank, int32_t *merged) {
    if (!m->keys) return 0;
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    size_t i = hash_u64(key) & m->mask;
    for (;;) {
        uint64_t k = m->keys[i];
        if (k == key) {
            *rank = m->rank[i];
            *merged = m->merged[i];
            return 1;
        }
        if (k == UINT64_MAX) return 0;
        i = (i + 1) & m->mask;
    }
}

/* ---- regexes ---------------------------------------------------------------- */

/* `tokenizers` compiles Split patterns with Oniguruma (its default syntax, close to
 * Ruby's) on UTF-8 text; moontune compiles them with PCRE2 (UTF + UCP). Where the two
 * dialects read the same text differently, the pattern is translated before compiling
 * (each rule was checked against `tokenizers` 0.23.3, tests/fixtures/tokenizer/dialect):
 *   - X{n,m}+ and X{n}+ are an interval then a "+" repeat, (?:X{n,m})+ (PCRE2: a
 *     possessive interval); X{n}? is (?:X{n})? (PCRE2: a lazy, i.e. plain, X{n}); X{,m}
 *     is X{0,m} (PCRE2: literal text). ?+ *+ ++ are possessive in both.
 *   - \s is Unicode White_Space; \w (and [[:word:]]) is Alphabetic, marks, decimal
 *     digits and connector punctuation, and outside a class also the Latin-1 ² ³ ¹ ¼ ½
 *     ¾; \b and \B use that \w; \h is a hex digit; \v is U+000B alone; \uHHHH is a
 *     code point; a letter that is no escape (\Q \E \V \U \i ...) is the letter.
 *     PCRE2's UCP \w is letters, all numbers and "_", \h horizontal space, \v
 *     vertical space, \Q...\E quoting.
 *   - POSIX classes: alpha, upper, lower are the Unicode properties Alphabetic,
 *     Uppercase, Lowercase; alnum is Alphabetic + Nd; punct is P + S.
 *   - ^ and $ match at every line start and end (PCRE2 needs MULTILINE); the option m
 *     is PCRE2's s (dot matches newline) and Oniguruma has no option s.
 *   - An isolated option (?i) reaches to the end of its group across later
 *     alternatives: a(?i)b|c is a(?i:b|c) (PCRE2: (?:a(?i)b)|(?i)c).
 *   - A class nested in a class, [a[bc]], is their union; written out flat.
 * A nested negated class, class intersection (&&) and a negated class shorthand or
 * POSIX class PCRE2 cannot express inside a class are refused with an error rather
 * than matched differently. Both libraries' Unicode tables differ in version (PCRE2's
 * may lack the newest characters' properties). */

#define WS_ITEMS "\\x{9}-\\x{d}\\x{20}\\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}"
#define WORD_ITEMS "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}"
#define BSW_ITEMS WORD_ITEMS "\\x{b2}\\x{b3}\\x{b9}\\x{bc}-\\x{be}" /* \w: [[:word:]] and Latin-1 ² ³ ¹ ¼ ½ ¾ */
#define BSW_CLASS "[" BSW_ITEMS "]"

/* A growing output string; on allocation failure it keeps failing and `nomem` is set. */
typedef struct {
    char *s;
    size_t n, cap;
    int nomem;
} rx_buf;

static void rx_reserve(rx_buf *b, size_t more) {
    if (b->nomem || b->n + more + 1 <= b->cap) return;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->n + more + 1) cap *= 2;
    char *s = realloc(b->s, cap);
    if (!s) {
        b->nomem = 1;
        return;
    }
    b->s = s;
    b->cap = cap;
}

static void rx_put(rx_buf *b, const char *p, size_t n) {
    rx_reserve(b, n);
    if (b->nomem) return;
    memcpy(b->s + b->n, p, n);
    b->n += n;
    b->s[b->n] = '\0';
}

static void rx_puts(rx_buf *b, const char *p) { rx_put(b, p, strlen(p)); }

static void rx_insert(rx_buf *b, size_t at, const char *p, size_t n) {
    rx_reserve(b, n);
    if (b->nomem) return;
    memmove(b->s + at + n, b->s + at, b->n - at);
    memcpy(b->s + at, p, n);
    b->n += n;
    b->s[b->n] = '\0';
}

/* Length of an interval quantifier at p[0..n) ("{n}", "{n,}", "{n,m}" or "{,m}"), 0 if
 * p does not start one (then "{" is a literal in both dialects). */
static size_t interval_len(const char *p, size_t n, int *no_min, int *fixed) {
    size_t i = 1, lo = 0, hi = 0;
    while (i < n && p[i] >= '0' && p[i] <= '9') i++, lo++;
    *no_min = *fixed = 0;
    if (i < n && p[i] == '}') {
        *fixed = 1;
        return lo ? i + 1 : 0;
    }
    if (i >= n || p[i] != ',') return 0;
    i++;
    while (i < n && p[i] >= '0' && p[i] <= '9') i++, hi++;
    if (i >= n || p[i] != '}' || (!lo && !hi)) return 0;
    *no_min = lo == 0;
    return i + 1;
}

/* Length of the escape at p[0..n) (p[0] is the backslash): \p{..} \x{..} \k<..> and the
 * like as one unit, else the backslash and one (UTF-8) character. */
static size_t escape_len(const char *p, size_t n) {
    if (n < 2) return n;
    if (strchr("pPxokg", p[1]) && n > 2 && (p[2] == '{' || p[2] == '<' || p[2] == '\'')) {
        const char close = p[2] == '{' ? '}' : p[2] == '<' ? '>' : '\'';
        const char *end = memchr(p + 3, close, n - 3);
        return end ? (size_t)(end - p) + 1 : n;
    }
    size_t len = 2;
    while (len < n && ((unsigned char)p[len] & 0xC0) == 0x80) len++;
    return len;
}

static int is_hex4(const char *p, size_t n) {
    if (n < 4) return 0;
    for (int i = 0; i < 4; i++)
        if (!strchr("0123456789abcdefABCDEF", p[i]) || !p[i]) return 0;
    return 1;
}

/* The PCRE2 class items for an Oniguruma POSIX bracket [:name:] inside a class; NULL
 * when there is no faithful translation. Names PCRE2 reads as Oniguruma does are
 * copied as they are (*same = 1). */
static const char *posix_items(const char *name, size_t len, int *same) {
    static const struct { const char *name, *items; } map[] = {
        {"alpha", "\\p{Alphabetic}"}, {"^alpha", "\\P{Alphabetic}"}, {"upper", "\\p{Uppercase}"},
        {"^upper", "\\P{Uppercase}"}, {"lower", "\\p{Lowercase}"}, {"^lower", "\\P{Lowercase}"},
        {"alnum", "\\p{Alphabetic}\\p{Nd}"}, {"word", WORD_ITEMS}, {"punct", "\\p{P}\\p{S}"},
        {"digit", "\\p{Nd}"}, {"^digit", "\\P{Nd}"}, {"space", WS_ITEMS}, {"xdigit", "\\p{AHex}"},
        {"^xdigit", "\\P{AHex}"}};
    static const char *const same_names[] = {"blank", "cntrl", "graph", "print", "ascii"};
    *same = 0;
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (strlen(map[i].name) == len && !memcmp(map[i].name, name, len)) return map[i].items;
    for (size_t i = 0; i < sizeof same_names / sizeof same_names[0]; i++)
        if (strlen(same_names[i]) == len && !memcmp(same_names[i], name, len)) {
            *same = 1;
            return "";
        }
    return NULL;
}

/* Translates an escape that means something else in PCRE2; 0 when it is to be copied.
 * *bad is set (with a description) for one that cannot be translated. */
static int escape_translate(rx_buf *b, const char *p, size_t n, int in_class, const char **bad) {
    switch (p[1]) {
    case 's': rx_puts(b, in_class ? WS_ITEMS : "[" WS_ITEMS "]"); return 1;
    case 'S':
        if (in_class) return 0; /* PCRE2's \S differs from non-White_Space only at U+180E */
        rx_puts(b, "[^" WS_ITEMS "]");
        return 1;
    case 'w': rx_puts(b, in_class ? WORD_ITEMS : BSW_CLASS); return 1; /* Latin-1 No only outside */
    case 'W':
        if (in_class) {
            *bad = "\\W inside a character class";
            return 1;
        }
        rx_puts(b, "[^" BSW_ITEMS "]");
        return 1;
    case 'b':
        if (in_class) return 0; /* a backspace in both */
        rx_puts(b, "(?:(?<=" BSW_CLASS ")(?!" BSW_CLASS ")|(?<!" BSW_CLASS ")(?=" BSW_CLASS "))");
        return 1;
    case 'B':
        if (in_class) return 0;
        rx_puts(b, "(?:(?<=" BSW_CLASS ")(?=" BSW_CLASS ")|(?<!" BSW_CLASS ")(?!" BSW_CLASS "))");
        return 1;
    case 'h': rx_puts(b, "\\p{AHex}"); return 1;
    case 'H': rx_puts(b, "\\P{AHex}"); return 1;
    case 'v': rx_puts(b, "\\x{0b}"); return 1;
    case 'u':
        if (!is_hex4(p + 2, n - 2)) return 0;
        rx_puts(b, "\\x{");
        rx_put(b, p + 2, 4);
        rx_puts(b, "}");
        return 1;
    case 'C':
    case 'M':
        *bad = "a \\C-x or \\M-x escape";
        return 1;
    default:
        /* letters that are no escape in Oniguruma stand for themselves (PCRE2 reads
         * \Q \E \V \U as escapes and refuses the rest) */
        if (p[1] && strchr("EFIiJjLlmQqTUV", p[1])) {
            rx_put(b, p + 1, 1);
            return 1;
        }
        return 0;
    }
}

/* Copies (translating) a character class starting at pat[*i] == '['. */
static void class_translate(rx_buf *b, const char *pat, size_t n, size_t *i, const char **bad, size_t *bad_at) {
    int nest = 0;
    size_t k = *i;
    while (k < n && !*bad) {
        const char c = pat[k];
        if (c == '\\' && k + 1 < n) {
            size_t len = escape_len(pat + k, n - k);
            if (!escape_translate(b, pat + k, n - k, 1, bad)) rx_put(b, pat + k, len);
            else if (*bad) *bad_at = k;
            if (pat[k + 1] == 'u' && is_hex4(pat + k + 2, n - k - 2)) len = 6;
            k += len;
        } else if (c == '[' && nest > 0 && k + 1 < n && pat[k + 1] == ':') {
            const char *end = NULL;
            for (size_t j = k + 2; j + 1 < n; j++)
                if (pat[j] == ':' && pat[j + 1] == ']') {
                    end = pat + j;
                    break;
                }
            if (!end) { /* not a POSIX bracket: a nested class starting with ':' */
                nest++;
                if (nest > 1) k++;
                else rx_put(b, pat + k++, 1);
                continue;
            }
            int same;
            const char *items = posix_items(pat + k + 2, (size_t)(end - (pat + k + 2)), &same);
            const size_t len = (size_t)(end - (pat + k)) + 2;
            if (!items) {
                *bad = "this POSIX bracket";
                *bad_at = k;
            } else if (same) {
                rx_put(b, pat + k, len);
            } else {
                rx_puts(b, items);
            }
            k += len;
        } else if (c == '[') {
            nest++;
            size_t open = k++;
            if (nest == 1) rx_put(b, "[", 1);
            if (k < n && pat[k] == '^') {
                if (nest > 1) {
                    *bad = "a negated class nested in a class";
                    *bad_at = open;
                    break;
                }
                rx_put(b, "^", 1), k++;
            }
            if (k < n && pat[k] == ']') rx_put(b, "\\]", 2), k++; /* a leading ] is literal */
        } else if (c == ']') {
            nest--;
            if (nest == 0) rx_put(b, "]", 1);
            k++;
            if (nest == 0) break;
        } else if (c == '&' && k + 1 < n && pat[k + 1] == '&') {
            *bad = "class intersection (&&)";
            *bad_at = k;
        } else {
            rx_put(b, pat + k++, 1);
        }
    }
    *i = k;
}

/* Translates pat[0..n) from Oniguruma to PCRE2 into *out (NUL-terminated, *out_len
 * bytes). Refuses what it cannot translate, naming the file, the pattern and the offset. */
static mt_status regex_onig_to_pcre2(const char *source, const char *pat, size_t n, char **out, size_t *out_len,
                                     mt_error *err) {
    rx_buf b = {0};
    enum { MAX_DEPTH = 256 };
    size_t group_at[MAX_DEPTH];  /* output offset of each open group's "(" */
    int implicit[MAX_DEPTH];     /* 1 for a group opened for an isolated option */
    int depth = 0;
    size_t i = 0, atom = SIZE_MAX; /* output offset of the last quantifiable item */
    const char *bad = NULL;
    size_t bad_at = 0;
    rx_reserve(&b, n + 16);
    while (i < n && !bad && !b.nomem) {
        const char c = pat[i];
        size_t start = b.n;
        if (c == '\\' && i + 1 < n) {
            size_t len = escape_len(pat + i, n - i);
            if (!escape_translate(&b, pat + i, n - i, 0, &bad)) rx_put(&b, pat + i, len);
            else if (bad) bad_at = i;
            if (pat[i + 1] == 'u' && is_hex4(pat + i + 2, n - i - 2)) len = 6;
            i += len;
            atom = strchr("AzZGbB", pat[i - len + 1]) && len == 2 ? SIZE_MAX : start;
        } else if (c == '[') {
            class_translate(&b, pat, n, &i, &bad, &bad_at);
            atom = start;
        } else if (c == '(') {
            /* an option group: (?imx-imx) or (?imx-imx:...) */
            size_t j = i + 1, letters = 0;
            int has_s = 0, other = 0;
            if (j < n && pat[j] == '?') {
                for (j++; j < n && ((pat[j] >= 'a' && pat[j] <= 'z') || (pat[j] >= 'A' && pat[j] <= 'Z') || pat[j] == '-'); j++) {
                    letters++;
                    if (pat[j] == 's') has_s = 1;
                    else if (!strchr("imx-", pat[j])) other = 1;
                }
            }
            const int option = letters && j < n && (pat[j] == ')' || pat[j] == ':');
            if (option && (has_s || other)) {
                bad = has_s ? "the option s (Oniguruma has none; its m is dot-matches-newline)" : "this option";
                bad_at = i;
                break;
            }
            if (depth >= MAX_DEPTH) {
                bad = "groups nested this deep";
                bad_at = i;
                break;
            }
            group_at[depth] = b.n;
            implicit[depth] = option && pat[j] == ')';
            depth++;
            if (option) {
                rx_puts(&b, "(?");
                for (size_t k = i + 2; k < j; k++) rx_put(&b, pat[k] == 'm' ? "s" : pat + k, 1);
                rx_puts(&b, ":");
                i = j + 1;
            } else {
                rx_put(&b, pat + i++, 1);
            }
            atom = SIZE_MAX;
        } else if (c == ')') {
            while (depth > 0 && implicit[depth - 1]) depth--, rx_puts(&b, ")");
            rx_put(&b, pat + i++, 1);
            atom = depth > 0 ? group_at[depth - 1] : SIZE_MAX;
            if (depth > 0) depth--;
        } else if (c == '{') {
            int no_min, fixed;
            size_t len = interval_len(pat + i, n - i, &no_min, &fixed);
            if (!len) {
                rx_put(&b, pat + i++, 1);
                atom = start;
                continue;
            }
            const char next = i + len < n ? pat[i + len] : 0;
            const int wrap = atom != SIZE_MAX && (next == '+' || (fixed && next == '?'));
            if (wrap) rx_insert(&b, atom, "(?:", 3);
            rx_puts(&b, "{");
            if (no_min) rx_puts(&b, "0");
            rx_put(&b, pat + i + 1, len - 1);
            i += len;
            if (wrap) rx_puts(&b, ")");
        } else if (c == '|' || c == '^' || c == '$') {
            rx_put(&b, pat + i++, 1);
            atom = SIZE_MAX;
        } else if (c == '*' || c == '+' || c == '?') {
            rx_put(&b, pat + i++, 1); /* a quantifier: the atom stays the quantified one */
        } else {
            rx_put(&b, pat + i++, 1);
            while (i < n && ((unsigned char)pat[i] & 0xC0) == 0x80) rx_put(&b, pat + i++, 1);
            atom = start;
        }
    }
    while (depth > 0) { /* isolated options open at the top level, and unbalanced groups */
        if (implicit[depth - 1]) rx_puts(&b, ")");
        depth--;
    }
    if (b.nomem) {
        free(b.s);
        return mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory translating a regex", source);
    }
    if (bad) {
        free(b.s);
        return mt_error_set(err, MT_ERR_UNSUPPORTED,
                            "%s: regex /%.*s/: %s (at offset %zu) is Oniguruma syntax that PCRE2 cannot match the same way",
                            source, (int)(n > 200 ? 200 : n), pat, bad, bad_at);
    }
    *out = b.s;
    *out_len = b.n;
    return MT_OK;
}

static mt_status regex_compile(const char *source, const char *pat, size_t n, int literal,
                               pcre2_code **out, mt_error *err) {
    char *rw = NULL;
    const char *use = pat;
    size_t use_len = n;
    if (!literal) {
        mt_status st = regex_onig_to_pcre2(source, pat, n, &rw, &use_len, err);
        if (st) return st;
        use = rw;
    }
    /* Oniguruma's newline is "\n" alone: "." excludes it and ^ $ match around it */
    pcre2_compile_context *cc = pcre2_compile_context_create(NULL);
    if (!cc) {
        free(rw);
        return mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory compiling a regex", source);
    }
    pcre2_set_newline(cc, PCRE2_NEWLINE_LF);
    int code;
    PCRE2_SIZE off;
    /* PCRE2_LITERAL refuses PCRE2_UCP (and every option that only shapes regex syntax):
     * with it a {"String": ...} Split never compiled */
    uint32_t opts = literal ? PCRE2_UTF | PCRE2_LITERAL : PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)use, use_len, opts, &code, &off, cc);
    pcre2_compile_context_free(cc);
    free(rw);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        return mt_error_set(err, MT_ERR_FORMAT, "%s: regex /%.*s/ does not compile (at offset %zu of its PCRE2 form): %s",
                            source, (int)(n > 200 ? 200 : n), pat, (size_t)off, (const char *)msg);
    }
    (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* the interpreter serves when JIT is absent */
    *out = re;
    return MT_OK;
}

/* llama.cpp's pre-tokenizer names and the splits they stand for */
static const char RE_GPT2[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char RE_LLAMA3[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char RE_QWEN2[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/* ---- freeing ------------------------------------------------------------------ */

void mt_tokenizer_free(mt_tokenizer *tok) {
    if (!tok) return;
    if (tok->text)
        for (int32_t i = 0; i < tok->n_ids; i++) free(tok->text[i]);
    free(tok->text);
    free(tok->text_len);
    free(tok->special);
    free(tok->vocab.slots);
    free(tok->merges.keys);
    free(tok->merges.rank);
    free(tok->merges.merged);
    for (size_t i = 0; i < tok->n_added; i++) free(tok->added[i].content);
    free(tok->added);
    free(tok->added_order);
    for (int i = 0; i < tok->n_norm; i++) {
        free(tok->norm[i].a);
        free(tok->norm[i].b);
    }
    for (int i = 0; i < tok->n_pre; i++) pcre2_code_free(tok->pre[i].re);
    for (int i = 0; i < tok->n_dec; i++) {
        free(tok->dec[i].a);
        free(tok->dec[i].b);
    }
    free(tok->chat_template);
    free(tok->source);
    free(tok);
}

static char *dup_n(const char *s, size_t n, mt_error *err) {
    char *p = mt_malloc(n + 1, "tokenizer string", err);
    if (!p) return NULL;
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

static mt_tokenizer *tok_new(const char *source, mt_error *err) {
    mt_tokenizer *tok = mt_calloc(1, sizeof *tok, "tokenizer", err);
    if (!tok) return NULL;
    tok->source = mt_strdup(source, "tokenizer path", err);
    if (!tok->source) {
        free(tok);
        return NULL;
    }
    tok->unk = tok->bos = tok->eos = tok->pad = -1;
    return tok;
}

static mt_status ids_alloc(mt_tokenizer *tok, int32_t n, mt_error *err) {
    tok->n_ids = n;
    tok->text = mt_calloc((size_t)n + 1, sizeof(char *), "tokenizer vocabulary", err);
    tok->text_len = mt_calloc((size_t)n + 1, sizeof(uint32_t), "tokenizer vocabulary", err);
    tok->special = mt_calloc((size_t)n + 1, 1, "tokenizer vocabulary", err);
    return (tok->text && tok->text_len && tok->special) ? MT_OK : MT_ERR_NOMEM;
}

static mt_status set_text(mt_tokenizer *tok, int32_t id, const char *s, size_t n, mt_error *err) {
    if (tok->text[id]) return MT_OK; /* an added token naming a vocab entry keeps it */
    tok->text[id] = dup_n(s, n, err);
    if (!tok->text[id]) return MT_ERR_NOMEM;
    tok->text_len[id] = (uint32_t)n;
    return MT_OK;
}

/* Tables that follow from the vocabulary: byte alphabet ids, <0xNN> ids, the
 * first-byte index of the added tokens matched on raw text. */
static mt_status finish_tables(mt_tokenizer *tok, mt_error *err) {
    for (int i = 0; i < 324; i++) tok->cp_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        tok->byte_cp[b] = (uint16_t)byte_to_cp(b);
        tok->cp_byte[tok->byte_cp[b]] = (int16_t)b;
    }
    for (int b = 0; b < 256; b++) {
        char s[8];
        size_t n = mt_utf8_encode(byte_to_cp(b), s);
        tok->byte_id[b] = vocab_find(tok, s, n);
        snprintf(s, sizeof s, "<0x%02X>", b);
        tok->fallback_id[b] = vocab_find(tok, s, 6);
    }
    tok->added_order = mt_calloc(tok->n_added + 1, sizeof(uint32_t), "tokenizer added tokens", err);
    if (!tok->added_order) return MT_ERR_NOMEM;
    size_t k = 0;
    for (int b = 0; b < 256; b++) {
        tok->added_first[b] = (uint32_t)k;
        size_t first = k;
        for (size_t i = 0; i < tok->n_added; i++) {
            const added_token *a = &tok->added[i];
            if (a->len == 0 || (unsigned char)a->content[0] != b) continue;
            if (a->normalized && tok->n_norm > 0) continue;
            size_t j = k++;
            while (j > first && tok->added[tok->added_order[j - 1]].len < a->len) {
                tok->added_order[j] = tok->added_order[j - 1];
                j--;
            }
            tok->added_order[j] = (uint32_t)i;
        }
    }
    tok->added_first[256] = (uint32_t)k;
    tok->has_normalized_added = 0;
    for (size_t i = 0; i < tok->n_added; i++)
        if (tok->added[i].normalized && tok->n_norm > 0 && tok->added[i].len) tok->has_normalized_added = 1;
    return MT_OK;
}

/* ---- tokenizer.json ----------------------------------------------------------- */

static const char *jstr(json_t *obj, const char *key) {
    json_t *v = json_object_get(obj, key);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

static int jbool(json_t *obj, const char *key, int dflt) {
    json_t *v = json_object_get(obj, key);
    return json_is_boolean(v) ? json_is_true(v) : dflt;
}

/* A pattern object {"String": s} or {"Regex": r} */
static mt_status json_pattern(const char *path, json_t *p, const char **s, size_t *n, int *is_regex,
                              mt_error *err) {
    json_t *v;
    if ((v = json_object_get(p, "String")) && json_is_string(v)) *is_regex = 0;
    else if ((v = json_object_get(p, "Regex")) && json_is_string(v)) *is_regex = 1;
    else return mt_error_set(err, MT_ERR_FORMAT, "%s: pattern must be {\"String\": ...} or {\"Regex\": ...}", path);
    *s = json_string_value(v);
    *n = json_string_length(v);
    return MT_OK;
}

static mt_status parse_normalizer(mt_tokenizer *tok, json_t *n, mt_error *err) {
    if (!n || json_is_null(n)) return MT_OK;
    const char *type = jstr(n, "type");
    if (!type) return mt_error_set(err, MT_ERR_FORMAT, "%s: normalizer without a \"type\"", tok->source);
    if (strcmp(type, "Sequence") == 0) {
        json_t *list = json_object_get(n, "normalizers");
        if (!json_is_array(list))
            return mt_error_set(err, MT_ERR_FORMAT, "%s: Sequence normalizer without \"normalizers\"", tok->source);
        size_t i;
        json_t *e;
        json_array_foreach(list, i, e) {
            mt_status st = parse_normalizer(tok, e, err);
            if (st) return st;
        }
        return MT_OK;
    }
    if (tok->n_norm >= MT_TOK_MAX_STAGES)
        return mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: more than %d normalizers", tok->source, MT_TOK_MAX_STAGES);
    norm_stage *s = &tok->norm[tok->n_norm];
    if (strcmp(type, "Prepend") == 0) {
        json_t *p = json_object_get(n, "prepend");
        if (!json_is_string(p)) return mt_error_set(err, MT_ERR_FORMAT, "%s: Prepend normalizer without \"prepend\"", tok->source);
        s->type = NORM_PREPEND;
        s->alen = json_string_length(p);
        if (!(s->a = dup_n(json_string_value(p), s->alen, err))) return MT_ERR_NOMEM;
    } else if (strcmp(type, "Replace") == 0) {
        const char *pat = NULL;
        size_t plen = 0;
        int is_regex = 0;
        mt_status st = json_pattern(tok->source, json_object_get(n, "pattern"), &pat, &plen, &is_regex, err);
        if (st) return st;
        json_t *c = json_object_get(n, "content");
        if (is_regex || !json_is_string(c) || plen == 0)
            return mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: Replace normalizer: only a non-empty String pattern and a string content are supported", tok->source);
        s->type = NORM_REPLACE;
        s->alen = plen;
        s->blen = json_string_length(c);
        if (!(s->a = dup_n(pat, plen, err)) || !(s->b = dup_n(json_string_value(c), s->blen, err))) return MT_ERR_NOMEM;
    } else if (strcmp(type, "NFC") == 0) {
        s->type = NORM_NFC; /* unicode_nfc.c */
    } else {
        return mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: normalizer type \"%s\" is not supported (Prepend, Replace, NFC, Sequence are)", tok->source, type);
    }
    tok->n_norm++;
    return MT_OK;
}

static mt_status parse_split_behavior(const char *path, const char *b, int *out, mt_error *err) {
    static const struct { const char *name; int v; } names[] = {
        {"Removed", SPLIT_REMOVED}, {"Isolated", SPLIT_ISOLATED}, {"MergedWithPrevious", SPLIT_MERGED_PREV},
        {"MergedWithNext", SPLIT_MERGED_NEXT}, {"Contiguous", SPLIT_CONTIGUOUS}};
    for (size_t i = 0; b && i < sizeof names / sizeof names[0]; i++)
        if (strcmp(b, names[i].name) == 0) {
            *out = names[i].v;
            return MT_OK;
        }
    return mt_error_set(err, MT_ERR_FORMAT, "%s: Split behavior \"%s\" is not one of Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous", path, b ? b : "(none)");
}

static mt_status parse_prepend_scheme(const char *path, json_t *obj, int *out, mt_error *err) {
    const char *s = jstr(obj, "prepend_scheme");
    if (!s) {
        *out = jbool(obj, "add_prefix_space", 1) ? PREPEND_ALWAYS : PREPEND_NEVER;
        return MT_OK;
    }
    if (strcmp(s, "always") == 0) *out = PREPEND_ALWAYS;
    else if (strcmp(s, "first") == 0) *out = PREPEND_FIRST;
    else if (strcmp(s, "never") == 0) *out = PREPEND_NEVER;
    else return mt_error_set(err, MT_ERR_FORMAT, "%s: prepend_scheme \"%s\" is not always, first or never", path, s);
    return MT_OK;
}

static mt_status parse_replacement(const char *path, json_t *obj, char *buf, size_t *len, mt_error *err) {
    const char *r = jstr(obj, "replacement");
    if (!r) r = "\xE2\x96\x81";
    size_t n = strlen(r);
    if (n == 0 || n > 4 || utf8_valid_len((const unsigned char *)r, n) != n)
        return mt_error_set(err, MT_ERR_FORMAT, "%s: Metaspace replacement must be one character", path);
    memcpy(buf, r, n);
    *len = n;
    return MT_OK;
}

static mt_status parse_pre_tokenizer(mt_tokenizer *tok, json_t *p, mt_error *err) {
    if (!p || json_is_null(p)) return MT_OK;
    const char *type = jstr(p, "type");
    if (!type) return mt_error_set(err, MT_ERR_FORMAT, "%s: pre_tokenizer without a \"type\"", tok->source);
    if (strcmp(type, "Sequence") == 0) {
        json_t *list = json_object_get(p, "pretokenizers");
        if (!json_is_array(list))
            return mt_error_set(err, MT_ERR_FORMAT, "%s: Sequence pre_tokenizer without \"pretokenizers\"", tok->source);
        size_t i;
        json_t *e;
        json_array_foreach(list, i, e) {
            mt_status st = parse_pre_tokenizer(tok, e, err);
            if (st) return st;
        }
        return MT_OK;
    }
    if (tok->byte_level)
        return mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: a pre_tokenizer (%s) after ByteLevel is not supported", tok->source, type);
    if (tok->n_pre >= MT_TOK_MAX_STAGES)
        return mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: more than %d pre_tokenizers", tok->source, MT_TOK_MAX_STAGES);
    pt_stage *s = &tok->pre[tok->n_pre];
    mt_status st = MT_OK;
    if (strcmp(type, "Split") == 0) {
        const char *pat = NULL;
        size_t plen = 0;
        int is_regex = 0;
        if ((st = json_pattern(tok->source, json_object_get(p, "pattern"), &pat, &plen, &is_regex, err))) return st;
        if ((st = parse_split_behavior(tok->source, jstr(p, "behavior"), &s->behavior, err))) return st;
        s->type = PT_SPLIT;
        s->invert = jbool(p, "invert", 0);
        st = regex_compile(tok->source, pat, plen, !is_regex, &s->re, err);
    } else if (strcmp(type, "Digits") == 0) {
        s->type = PT_SPLIT;
        s->behavior = SPLIT_ISOLATED;
        const char *re = jbool(p, "individual_digits", 0) ? "\\p{N}" : "\\p{N}+";
        st = regex_compile(tok->source, re, strlen(re), 0, &s->re, err);
    } else if (strcmp(type, "ByteLevel") == 0) {
        s->type = PT_BYTELEVEL;
        s->add_prefix_space = jbool(p, "add_prefix_space", 1);
        s->behavior = SPLIT_ISOLATED;
        if (jbool(p, "use_regex", 1)) st = regex_compile(tok->source, RE_GPT2, strlen(RE_GPT2), 0, &s->re, err);
        tok->byte_level = 1;
    } else if (strcmp(type, "Metaspace") == 0) {
        s->type = PT_METASPACE;
        s->split = jbool(p, "split", 1);
        if ((st = parse_replacement(tok->source, p, s->repl, &s->repl_len, err))) return st;
        st = parse_prepend_scheme(tok->source, p, &s->prepend_scheme, err);
    } else {
        return mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: pre_tokenizer type \"%s\" is not supported (Split, Digits, ByteLevel, Metaspace, Sequence are)", tok->source, type);
    }
    if (st) return st;
    tok->n_pre++;
    return MT_OK;
}

static mt_status parse_decoder(mt_tokenizer *tok, json_t *d, mt_error *err) {
    if (!d || json_is_null(d)) return MT_OK;
    const char *type = jstr(d, "type");
    if (!type) return mt_error_set(err, MT_ERR_FORMAT, "%s: decoder without a \"type\"", tok->source);
    tok->has_decoder = 1;
    if (strcmp(type, "Sequence") == 0) {
        json_t *list = json_object_get(d, "decoders");
        if (!json_is_array(list)) return mt_error_set(err, MT_ERR_FORMAT, "%s: Sequence decoder without \"decoders\"", tok->source);
        size_t i;
        json_t *e;
        json_array_foreach(list, i, e) {
            mt_status st = parse_decoder(tok, e, err);
            if (st) return st;
        }
        return MT_OK;
    }
    if (tok->n_dec >= MT_TOK_MAX_STAGES)
        return mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: more than %d decoders", tok->source, MT_TOK_MAX_STAGES);
    dec_stage *s = &tok->dec[tok->n_dec];
    if (strcmp(type, "ByteLevel") == 0) s->type = DEC_BYTELEVEL;
    else if (strcmp(type, "ByteFallback") == 0) s->type = DEC_BYTEFALLBACK;
    else if (strcmp(type, "Fuse") == 0) s->type = DEC_FUSE;
    else if (strcmp(type, "Replace") == 0) {
        const char *pat = NULL;
        size_t plen = 0;
        int is_regex = 0;
        mt_status st = json_pattern(tok->source, json_object_get(d, "pattern"), &pat, &plen, &is_regex, err);
        if (st) return st;
        json_t *c = json_object_get(d, "content");
        if (is_regex || !json_is_string(c) || plen == 0)
            return mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: Replace decoder: only a non-empty String pattern is supported", tok->source);
        s->type = DEC_REPLACE;
        s->alen = plen;
        s->blen = json_string_length(c);
        if (!(s->a = dup_n(pat, plen, err)) || !(s->b = dup_n(json_string_value(c), s->blen, err))) return MT_ERR_NOMEM;
    } else if (strcmp(type, "Strip") == 0) {
        const char *c = jstr(d, "content");
        json_t *start = json_object_get(d, "start"), *stop = json_object_get(d, "stop");
        if (!c || !json_is_integer(start) || !json_is_integer(stop) ||
            utf8_valid_len((const unsigned char *)c, strlen(c)) != strlen(c) || !*c)
            return mt_error_set(err, MT_ERR_FORMAT, "%s: Strip decoder needs a one-character \"content\", \"start\" and \"stop\"", tok->source);
        s->type = DEC_STRIP;
        s->alen = strlen(c);
        if (!(s->a = dup_n(c, s->alen, err))) return MT_ERR_NOMEM;
        s->start = (int)json_integer_value(start);
        s->stop = (int)json_integer_value(stop);
    } else if (strcmp(type, "Metaspace") == 0) {
        char r[8];
        size_t rl;
        mt_status st = parse_replacement(tok->source, d, r, &rl, err);
        if (!st) st = parse_prepend_scheme(tok->source, d, &s->prepend_scheme, err);
        if (st) return st;
        s->type = DEC_METASPACE;
        s->alen = rl;
        if (!(s->a = dup_n(r, rl, err))) return MT_ERR_NOMEM;
    } else {
        return mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: decoder type \"%s\" is not supported (ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, Sequence are)", tok->source, type);
    }
    tok->n_dec++;
    return MT_OK;
}

/* The ids a TemplateProcessing "single" template puts before and after $A. */
static mt_status parse_post_processor(mt_tokenizer *tok, json_t *p, mt_error *err) {
    if (!p || json_is_null(p)) return MT_OK;
    const char *type = jstr(p, "type");
    if (!type) return mt_error_set(err, MT_ERR_FORMAT, "%s: post_processor without a \"type\"", tok->source);
    if (strcmp(type, "Sequence") == 0) {
        json_t *list = json_object_get(p, "processors");
        size_t i;
        json_t *e;
        json_array_foreach(list, i, e) {
            mt_status st = parse_post_processor(tok, e, err);
            if (st) return st;
        }
        return MT_OK;
    }
    if (strcmp(type, "ByteLevel") == 0) return MT_OK; /* offsets only */
    if (strcmp(type, "TemplateProcessing") != 0)
        return mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: post_processor type \"%s\" is not supported (TemplateProcessing, ByteLevel, Sequence are)", tok->source, type);
    json_t *single = json_object_get(p, "single"), *specials = json_object_get(p, "special_tokens");
    if (!json_is_array(single)) return mt_error_set(err, MT_ERR_FORMAT, "%s: TemplateProcessing without \"single\"", tok->source);
    int seen_a = 0;
    tok->n_prefix = tok->n_suffix = 0;
    size_t i;
    json_t *e;
    json_array_foreach(single, i, e) {
        if (json_object_get(e, "Sequence")) {
            seen_a = 1;
            continue;
        }
        json_t *st = json_object_get(e, "SpecialToken");
        const char *name = st ? jstr(st, "id") : NULL;
        json_t *entry = name ? json_object_get(specials, name) : NULL;
        json_t *ids = json_object_get(entry, "ids");
        if (!json_is_array(ids))
            return mt_error_set(err, MT_ERR_FORMAT, "%s: TemplateProcessing names special token \"%s\" that special_tokens does not define", tok->source, name ? name : "?");
        size_t k;
        json_t *idv;
        json_array_foreach(ids, k, idv) {
            json_int_t id = json_integer_value(idv);
            if (!json_is_integer(idv) || id < 0 || id >= tok->n_ids)
                return mt_error_set(err, MT_ERR_FORMAT, "%s: TemplateProcessing special token \"%s\" has an id outside the vocabulary", tok->source, name);
            int32_t *dst = seen_a ? tok->suffix : tok->prefix;
            int *n = seen_a ? &tok->n_suffix : &tok->n_prefix;
            if (*n >= 4) return mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: more than 4 template special tokens on one side", tok->source);
            dst[(*n)++] = (int32_t)id;
        }
    }
    return MT_OK;
}

/* What an id that is not a non-negative integer was, for the error: "-1", "a real
 * number", "a string", "nothing". */
static void id_found(const json_t *v, char *buf, size_t size) {
    if (json_is_integer(v)) snprintf(buf, size, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
    else snprintf(buf, size, "%s", mt_json_kind(v));
}

static mt_status parse_model(mt_tokenizer *tok, json_t *root, mt_error *err) {
    const char *path = tok->source;
    json_t *model = json_object_get(root, "model");
    if (!json_is_object(model)) return mt_error_set(err, MT_ERR_FORMAT, "%s: no \"model\" object", path);
    json_t *jtype = json_object_get(model, "type");
    if (jtype && !json_is_string(jtype))
        return mt_error_set(err, MT_ERR_FORMAT, "%s: key 'model.type': expected a string such as \"BPE\", found %s",
                            path, mt_json_kind(jtype));
    const char *type = jstr(model, "type");
    if (type && strcmp(type, "BPE") != 0)
        return mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: model type \"%s\" is not supported (only BPE is)", path, type);
    json_t *vocab = json_object_get(model, "vocab"), *merges = json_object_get(model, "merges");
    if (!json_is_object(vocab)) return mt_error_set(err, MT_ERR_FORMAT, "%s: model has no \"vocab\" object", path);
    if (!type && !json_is_array(merges))
        return mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: model has no \"type\" and no \"merges\"; only BPE is supported", path);
    if (merges && !json_is_array(merges)) return mt_error_set(err, MT_ERR_FORMAT, "%s: model \"merges\" is not an array", path);
    const char *csp = jstr(model, "continuing_subword_prefix"), *eows = jstr(model, "end_of_word_suffix");
    if ((csp && *csp) || (eows && *eows))
        return mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: BPE continuing_subword_prefix / end_of_word_suffix are not supported", path);
    json_t *dropout = json_object_get(model, "dropout");
    if (json_is_number(dropout) && json_number_value(dropout) > 0.0)
        return mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: BPE dropout is not supported when encoding", path);
    /* these change the ids: a value of another type ("yes") is refused, not read as false */
    static const char *const flags[] = {"byte_fallback", "fuse_unk", "ignore_merges"};
    for (size_t f = 0; f < sizeof flags / sizeof flags[0]; f++) {
        json_t *b = json_object_get(model, flags[f]);
        if (b && !json_is_boolean(b) && !json_is_null(b))
            return mt_error_set(err, MT_ERR_FORMAT, "%s: key 'model.%s': expected true or false, found %s", path, flags[f],
                                mt_json_kind(b));
    }
    tok->byte_fallback = jbool(model, "byte_fallback", 0);
    tok->fuse_unk = jbool(model, "fuse_unk", 0);
    tok->ignore_merges = jbool(model, "ignore_merges", 0);

    /* ids: the vocab's and the added tokens' together. Ids index dense tables, so an id
     * far past the number of tokens (a typo, or a hostile file) would allocate gigabytes:
     * gaps are allowed (reserved ids) up to ID_SLACK beyond the count. */
    if (json_object_size(vocab) == 0)
        return mt_error_set(err, MT_ERR_FORMAT, "%s: key 'model.vocab' is empty: a tokenizer needs a vocabulary", path);
    json_t *added = json_object_get(root, "added_tokens");
    if (added && !json_is_array(added)) return mt_error_set(err, MT_ERR_FORMAT, "%s: \"added_tokens\" is not an array", path);
    const json_int_t ID_SLACK = 1 << 20;
    const json_int_t id_limit = (json_int_t)json_object_size(vocab) + (json_int_t)json_array_size(added) + ID_SLACK;
    json_int_t max_id = -1;
    const char *key;
    json_t *v;
    json_object_foreach(vocab, key, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0) {
            char found[64];
            id_found(v, found, sizeof found);
            return mt_error_set(err, MT_ERR_FORMAT, "%s: vocab entry \"%s\": expected an integer id >= 0, found %s", path,
                                key, found);
        }
        if (json_integer_value(v) >= id_limit)
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: vocab entry \"%s\": id %" JSON_INTEGER_FORMAT " is far beyond the vocabulary's %zu "
                                "entries (ids must be below %" JSON_INTEGER_FORMAT ")",
                                path, key, json_integer_value(v), json_object_size(vocab), id_limit);
        if (json_integer_value(v) > max_id) max_id = json_integer_value(v);
    }
    size_t i;
    json_t *e;
    json_array_foreach(added, i, e) {
        json_t *id = json_object_get(e, "id");
        if (!jstr(e, "content"))
            return mt_error_set(err, MT_ERR_FORMAT, "%s: added_tokens[%zu]: key 'content': expected a string, found %s", path,
                                i, mt_json_kind(json_object_get(e, "content")));
        if (!json_is_integer(id) || json_integer_value(id) < 0) {
            char found[64];
            id_found(id, found, sizeof found);
            return mt_error_set(err, MT_ERR_FORMAT, "%s: added_tokens[%zu] \"%s\": key 'id': expected an integer >= 0, found %s",
                                path, i, jstr(e, "content"), found);
        }
        if (json_integer_value(id) >= id_limit)
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s: added_tokens[%zu] \"%s\": id %" JSON_INTEGER_FORMAT " is far beyond the vocabulary's "
                                "%zu entries (ids must be below %" JSON_INTEGER_FORMAT ")",
                                path, i, jstr(e, "content"), json_integer_value(id), json_object_size(vocab), id_limit);
        if (json_integer_value(id) > max_id) max_id = json_integer_value(id);
    }
    mt_status st = ids_alloc(tok, (int32_t)max_id + 1, err);
    if (st) return st;
    json_object_foreach(vocab, key, v) {
        int32_t id = (int32_t)json_integer_value(v);
        if (tok->text[id])
            return mt_error_set(err, MT_ERR_FORMAT, "%s: vocab id %d is given to both \"%s\" and \"%s\"", path, id, tok->text[id], key);
        if ((st = set_text(tok, id, key, strlen(key), err))) return st;
    }
    size_t n_added = json_array_size(added);
    tok->added = mt_calloc(n_added + 1, sizeof(added_token), "tokenizer added tokens", err);
    if (!tok->added) return MT_ERR_NOMEM;
    json_array_foreach(added, i, e) {
        added_token *a = &tok->added[tok->n_added++];
        json_t *c = json_object_get(e, "content");
        a->id = (int32_t)json_integer_value(json_object_get(e, "id"));
        a->len = json_string_length(c);
        if (!(a->content = dup_n(json_string_value(c), a->len, err))) return MT_ERR_NOMEM;
        a->special = jbool(e, "special", 0);
        a->lstrip = jbool(e, "lstrip", 0);
        a->rstrip = jbool(e, "rstrip", 0);
        a->single_word = jbool(e, "single_word", 0);
        a->normalized = jbool(e, "normalized", !a->special);
        if ((st = set_text(tok, a->id, a->content, a->len, err))) return st;
        if (a->special) tok->special[a->id] = 1;
    }
    if ((st = vocab_build(tok, err))) return st;

    const char *unk = jstr(model, "unk_token");
    if (unk) {
        tok->unk = vocab_find(tok, unk, strlen(unk));
        if (tok->unk < 0) return mt_error_set(err, MT_ERR_FORMAT, "%s: unk_token \"%s\" is not in the vocab", path, unk);
    }

    size_t n_merges = json_array_size(merges);
    if ((st = merges_init(&tok->merges, n_merges, err))) return st;
    char *cat = NULL;
    size_t cat_cap = 0;
    json_array_foreach(merges, i, e) {
        const char *a, *b;
        size_t al, bl;
        if (json_is_string(e)) {
            a = json_string_value(e);
            const char *sp = strchr(a, ' ');
            if (!sp || sp == a || !sp[1]) {
                free(cat);
                return mt_error_set(err, MT_ERR_FORMAT, "%s: merge %zu (\"%s\") is not two tokens separated by a space", path, i, a);
            }
            al = (size_t)(sp - a);
            b = sp + 1;
            bl = strlen(b);
        } else if (json_is_array(e) && json_array_size(e) == 2 && json_is_string(json_array_get(e, 0)) &&
                   json_is_string(json_array_get(e, 1))) {
            a = json_string_value(json_array_get(e, 0));
            b = json_string_value(json_array_get(e, 1));
            al = json_string_length(json_array_get(e, 0));
            bl = json_string_length(json_array_get(e, 1));
        } else {
            free(cat);
            return mt_error_set(err, MT_ERR_FORMAT, "%s: merge %zu is neither \"a b\" nor [\"a\", \"b\"]", path, i);
        }
        int32_t ia = vocab_find(tok, a, al), ib = vocab_find(tok, b, bl);
        if (al + bl + 1 > cat_cap) {
            free(cat);
            cat_cap = (al + bl + 1) * 2;
            if (!(cat = mt_malloc(cat_cap, "tokenizer merge", err))) return MT_ERR_NOMEM;
        }
        memcpy(cat, a, al);
        memcpy(cat + al, b, bl);
        int32_t im = vocab_find(tok, cat, al + bl);
        if (ia < 0 || ib < 0 || im < 0) {
            const char *which = ia < 0 ? a : ib < 0 ? b : cat;
            int wl = (int)(ia < 0 ? al : ib < 0 ? bl : al + bl);
            mt_error_set(err, MT_ERR_FORMAT, "%s: merge %zu (\"%.*s\" + \"%.*s\") names a token not in the vocab: \"%.*s\"",
                         path, i, (int)al, a, (int)bl, b, wl, which);
            free(cat);
            return MT_ERR_FORMAT;
        }
        merges_put(&tok->merges, ia, ib, (int32_t)i, im);
    }
    free(cat);
    return MT_OK;
}

static int32_t config_token(const mt_tokenizer *tok, json_t *cfg, const char *key, int *present) {
    json_t *v = json_object_get(cfg, key);
    *present = v != NULL;
    if (json_is_object(v)) v = json_object_get(v, "content");
    if (!json_is_string(v)) return -1;
    return vocab_find(tok, json_string_value(v), json_string_length(v));
}

static mt_status apply_config(mt_tokenizer *tok, const char *cfg_path, mt_error *err) {
    /* defaults from the post-processor template */
    if (tok->n_prefix) tok->bos = tok->prefix[0];
    if (tok->n_suffix) tok->eos = tok->suffix[tok->n_suffix - 1];
    if (!cfg_path) return MT_OK;
    char *buf;
    size_t len;
    mt_status st = mt_read_file(cfg_path, &buf, &len, err);
    if (st) return st;
    json_error_t je;
    /* model_max_length is often 1e30 written as an integer: read numbers as reals */
    json_t *cfg = json_loadb(buf, len, JSON_REJECT_DUPLICATES | JSON_DECODE_INT_AS_REAL, &je);
    free(buf);
    if (!json_is_object(cfg)) {
        json_decref(cfg);
        return mt_error_set(err, MT_ERR_FORMAT, "%s: not a JSON object (line %d, column %d: %s)", cfg_path, je.line, je.column, je.text);
    }
    int present;
    int32_t id = config_token(tok, cfg, "bos_token", &present);
    if (present) tok->bos = id;
    id = config_token(tok, cfg, "eos_token", &present);
    if (present) tok->eos = id;
    id = config_token(tok, cfg, "pad_token", &present);
    if (present) tok->pad = id;
    json_t *ab = json_object_get(cfg, "add_bos_token"), *ae = json_object_get(cfg, "add_eos_token");
    if (json_is_boolean(ab)) {
        tok->n_prefix = 0;
        if (json_is_true(ab) && tok->bos >= 0) tok->prefix[tok->n_prefix++] = tok->bos;
    }
    if (json_is_boolean(ae)) {
        tok->n_suffix = 0;
        if (json_is_true(ae) && tok->eos >= 0) tok->suffix[tok->n_suffix++] = tok->eos;
    }
    json_t *ct = json_object_get(cfg, "chat_template");
    const char *tmpl = NULL;
    if (json_is_string(ct)) tmpl = json_string_value(ct);
    else if (json_is_array(ct)) { /* [{"name": ..., "template": ...}]: "default", else the first */
        size_t i;
        json_t *e;
        json_array_foreach(ct, i, e) {
            const char *name = jstr(e, "name");
            if (!tmpl || (name && strcmp(name, "default") == 0)) tmpl = jstr(e, "template");
        }
    }
    if (tmpl && !(tok->chat_template = mt_strdup(tmpl, "chat template", err))) st = MT_ERR_NOMEM;
    json_decref(cfg);
    return st;
}

mt_status mt_tokenizer_load_json(const char *tokenizer_json, const char *tokenizer_config,
                                 mt_tokenizer **out, mt_error *err) {
    *out = NULL;
    char *buf;
    size_t len;
    mt_status st = mt_read_file(tokenizer_json, &buf, &len, err);
    if (st) return st;
    json_error_t je;
    json_t *root = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &je);
    free(buf);
    if (!root) return mt_error_set(err, MT_ERR_FORMAT, "%s: not valid JSON (line %d, column %d: %s)", tokenizer_json, je.line, je.column, je.text);
    if (!json_is_object(root)) {
        json_decref(root);
        return mt_error_set(err, MT_ERR_FORMAT, "%s: not a JSON object", tokenizer_json);
    }
    mt_tokenizer *tok = tok_new(tokenizer_json, err);
    if (!tok) {
        json_decref(root);
        return MT_ERR_NOMEM;
    }
    st = parse_model(tok, root, err);
    if (!st) st = parse_normalizer(tok, json_object_get(root, "normalizer"), err);
    if (!st) st = parse_pre_tokenizer(tok, json_object_get(root, "pre_tokenizer"), err);
    if (!st) st = parse_decoder(tok, json_object_get(root, "decoder"), err);
    if (!st) st = parse_post_processor(tok, json_object_get(root, "post_processor"), err);
    json_decref(root);
    if (!st) st = finish_tables(tok, err);
    if (!st) st = apply_config(tok, tokenizer_config, err);
    if (st) {
        mt_tokenizer_free(tok);
        return st;
    }
    tok->family = tok->byte_level ? MT_TOK_BYTE_LEVEL_BPE : MT_TOK_SENTENCEPIECE_BPE;
    *out = tok;
    return MT_OK;
}

static int file_exists(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    return f != NULL;
}

mt_status mt_tokenizer_load(const char *path, mt_tokenizer **out, mt_error *err) {
    return mt_path_is_gguf(path) ? mt_tokenizer_load_gguf(path, out, err)
                                 : mt_tokenizer_load_dir(path, out, err);
}

mt_status mt_tokenizer_load_dir(const char *dir, mt_tokenizer **out, mt_error *err) {
    *out = NULL;
    char *tj = mt_path_join(dir, "tokenizer.json", err);
    char *tc = tj ? mt_path_join(dir, "tokenizer_config.json", err) : NULL;
    char *jj = tc ? mt_path_join(dir, "chat_template.jinja", err) : NULL;
    mt_status st = jj ? MT_OK : MT_ERR_NOMEM;
    if (!st) st = mt_tokenizer_load_json(tj, file_exists(tc) ? tc : NULL, out, err);
    if (!st && !(*out)->chat_template && file_exists(jj)) {
        char *t;
        size_t n;
        st = mt_read_file(jj, &t, &n, err);
        if (!st) (*out)->chat_template = t;
    }
    if (st && *out) {
        mt_tokenizer_free(*out);
        *out = NULL;
    }
    free(tj);
    free(tc);
    free(jj);
    return st;
}

/* ---- GGUF ------------------------------------------------------------------------ */

static int gguf_bool(const mt_gguf *g, const char *key, int dflt) {
    const mt_gguf_value *v = mt_gguf_get(g, key);
    if (!v) return dflt;
    if (v->type == MT_GGUF_BOOL) return v->num.boolean != 0;
    if (v->type <= MT_GGUF_INT32 || v->type >= MT_GGUF_UINT64) return v->num.u64 != 0;
    return dflt;
}

/* A special token id from the GGUF metadata into *out: -1 when the key is absent; an id
 * outside the vocabulary is an error (dropped silently, an EOS id would let generation
 * run to its limit). */
static mt_status gguf_id(const mt_gguf *g, const char *path, const char *key, int32_t n_ids,
                         int32_t *out, mt_error *err) {
    *out = -1;
    if (!mt_gguf_get(g, key)) return MT_OK;
    int64_t v;
    if (mt_gguf_get_int(g, key, &v, NULL) != MT_OK)
        return mt_error_set(err, MT_ERR_FORMAT, "%s: key '%s': expected an integer token id", path, key);
    if (v < 0 || v >= n_ids)
        return mt_error_set(err, MT_ERR_FORMAT,
                            "%s: key '%s': token id %" PRId64 " is outside the vocabulary of %d tokens (ids 0 to %d)",
                            path, key, v, n_ids, n_ids - 1);
    *out = (int32_t)v;
    return MT_OK;
}

static int64_t arr_int(const mt_gguf_value *v, uint64_t i) {
    const unsigned char *p = v->arr_data;
    switch (v->arr_type) {
    case MT_GGUF_INT32: { int32_t x; memcpy(&x, p + 4 * i, 4); return x; }
    case MT_GGUF_UINT32: { uint32_t x; memcpy(&x, p + 4 * i, 4); return x; }
    case MT_GGUF_INT8: return ((const int8_t *)p)[i];
    case MT_GGUF_UINT8: return p[i];
    case MT_GGUF_INT16: { int16_t x; memcpy(&x, p + 2 * i, 2); return x; }
    case MT_GGUF_UINT16: { uint16_t x; memcpy(&x, p + 2 * i, 2); return x; }
    case MT_GGUF_INT64: case MT_GGUF_UINT64: { int64_t x; memcpy(&x, p + 8 * i, 8); return x; }
    default: return 0;
    }
}

static double arr_float(const mt_gguf_value *v, uint64_t i) {
    const unsigned char *p = v->arr_data;
    if (v->arr_type == MT_GGUF_FLOAT32) { float x; memcpy(&x, p + 4 * i, 4); return x; }
    if (v->arr_type == MT_GGUF_FLOAT64) { double x; memcpy(&x, p + 8 * i, 8); return x; }
    return (double)arr_int(v, i);
}

static mt_status add_stage_regex(mt_tokenizer *tok, const char *re, int type, mt_error *err) {
    pt_stage *s = &tok->pre[tok->n_pre];
    s->type = type;
    s->behavior = SPLIT_ISOLATED;
    mt_status st = regex_compile(tok->source, re, strlen(re), 0, &s->re, err);
    if (!st) tok->n_pre++;
    return st;
}

/* Merges for a SentencePiece vocabulary without a merge list: every split of a token
 * into two tokens merges into it, ranked by the token's score (higher first). */
typedef struct scored { double score; int32_t id; } scored;
static int cmp_score(const void *a, const void *b) {
    const scored *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

static mt_status merges_from_scores(mt_tokenizer *tok, const mt_gguf *g, mt_error *err) {
    const mt_gguf_value *sv = mt_gguf_get(g, "tokenizer.ggml.scores");
    if (!sv || sv->type != MT_GGUF_ARRAY || sv->arr_len != (uint64_t)tok->n_ids)
        return mt_error_set(err, MT_ERR_FORMAT, "%s: tokenizer.ggml.merges is absent and tokenizer.ggml.scores does not give one score per token", tok->source);
    double *scores = mt_malloc((size_t)tok->n_ids * sizeof(double), "token scores", err);
    scored *order = mt_malloc((size_t)tok->n_ids * sizeof(scored), "token scores", err);
    mt_status st = (scores && order) ? MT_OK : MT_ERR_NOMEM;
    size_t n_pairs = 0;
    if (!st) {
        for (int32_t i = 0; i < tok->n_ids; i++) {
            scores[i] = arr_float(sv, (uint64_t)i);
            order[i] = (scored){scores[i], i};
            n_pairs += tok->text_len[i];
        }
        qsort(order, (size_t)tok->n_ids, sizeof(scored), cmp_score);
        st = merges_init(&tok->merges, n_pairs, err);
    }
    for (int32_t r = 0; !st && r < tok->n_ids; r++) {
        int32_t id = order[r].id;
        const char *t = tok->text[id];
        size_t n = tok->text_len[id];
        if (!t || tok->special[id]) continue;
        for (size_t k = 1; k < n; k++) {
            if (((unsigned char)t[k] & 0xC0) == 0x80) continue;
            int32_t a = vocab_find(tok, t, k), b = vocab_find(tok, t + k, n - k);
            if (a >= 0 && b >= 0) {
                int32_t rk, m;
                if (!merges_get(&tok->merges, a, b, &rk, &m)) merges_put(&tok->merges, a, b, r, id);
            }
        }
    }
    free(scores);
    free(order);
    return st;
}

mt_status mt_tokenizer_load_gguf(const char *gguf_path, mt_tokenizer **out, mt_error *err) {
    *out = NULL;
    mt_gguf *g;
    mt_status st = mt_gguf_open(gguf_path, &g, err);
    if (st) return st;
    mt_tokenizer *tok = tok_new(gguf_path, err);
    char *model = NULL, *pre = NULL;
    if (!tok) st = MT_ERR_NOMEM;
    if (!st) st = mt_gguf_get_string(g, "tokenizer.ggml.model", &model, err);
    const mt_gguf_value *tv = mt_gguf_get(g, "tokenizer.ggml.tokens");
    if (!st && (!tv || tv->type != MT_GGUF_ARRAY || tv->arr_type != MT_GGUF_STRING || tv->arr_len == 0 || tv->arr_len > INT32_MAX - 2))
        st = mt_error_set(err, MT_ERR_FORMAT, "%s: tokenizer.ggml.tokens is missing or not a non-empty string array", gguf_path);
    int spm = 0;
    if (!st) {
        if (strcmp(model, "gpt2") == 0) spm = 0;
        else if (strcmp(model, "llama") == 0) spm = 1;
        else st = mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: tokenizer.ggml.model \"%s\" is not supported (gpt2, llama are)", gguf_path, model);
    }
    if (!st) st = ids_alloc(tok, (int32_t)tv->arr_len, err);
    for (uint64_t i = 0; !st && i < tv->arr_len; i++) {
        uint64_t n;
        const char *s = mt_gguf_array_string(g, tv, i, &n);
        if (!s || n > UINT32_MAX) st = mt_error_set(err, MT_ERR_FORMAT, "%s: tokenizer.ggml.tokens[%llu] is unreadable", gguf_path, (unsigned long long)i);
        else st = set_text(tok, (int32_t)i, s, (size_t)n, err);
    }
    if (!st) st = vocab_build(tok, err);
    const mt_gguf_value *tt = mt_gguf_get(g, "tokenizer.ggml.token_type");
    if (!st && tt && (tt->type != MT_GGUF_ARRAY || tt->arr_len != tv->arr_len))
        st = mt_error_set(err, MT_ERR_FORMAT, "%s: tokenizer.ggml.token_type does not give one type per token", gguf_path);
    if (!st && tt) {
        size_t n = 0;
        for (uint64_t i = 0; i < tt->arr_len; i++) {
            int64_t t = arr_int(tt, i);
            n += (t == 2 || t == 3 || t == 4);
        }
        tok->added = mt_calloc(n + 1, sizeof(added_token), "tokenizer added tokens", err);
        if (!tok->added) st = MT_ERR_NOMEM;
        for (uint64_t i = 0; !st && i < tt->arr_len; i++) {
            int64_t t = arr_int(tt, i);
            if (t != 2 && t != 3 && t != 4) continue; /* unknown, control, user defined */
            added_token *a = &tok->added[tok->n_added++];
            a->id = (int32_t)i;
            a->len = tok->text_len[i];
            a->special = t != 4;
            if (!(a->content = dup_n(tok->text[i], a->len, err))) st = MT_ERR_NOMEM;
            tok->special[i] = (uint8_t)a->special;
        }
    }
    const mt_gguf_value *mv = mt_gguf_get(g, "tokenizer.ggml.merges");
    if (!st && mv && mv->arr_len > 0) {
        if (mv->type != MT_GGUF_ARRAY || mv->arr_type != MT_GGUF_STRING)
            st = mt_error_set(err, MT_ERR_FORMAT, "%s: tokenizer.ggml.merges is not a string array", gguf_path);
        if (!st) st = merges_init(&tok->merges, (size_t)mv->arr_len, err);
        char *cat = NULL;
        for (uint64_t i = 0; !st && i < mv->arr_len; i++) {
            uint64_t n;
            const char *s = mt_gguf_array_string(g, mv, i, &n);
            const char *sp = s ? memchr(s, ' ', (size_t)n) : NULL;
            if (!sp || sp == s || sp + 1 == s + n) {
                st = mt_error_set(err, MT_ERR_FORMAT, "%s: tokenizer.ggml.merges[%llu] is not two tokens separated by a space", gguf_path, (unsigned long long)i);
                break;
            }
            size_t al = (size_t)(sp - s), bl = (size_t)n - al - 1;
            free(cat);
            if (!(cat = mt_malloc(al + bl + 1, "tokenizer merge", err))) { st = MT_ERR_NOMEM; break; }
            memcpy(cat, s, al);
            memcpy(cat + al, sp + 1, bl);
            int32_t a = vocab_find(tok, s, al), b = vocab_find(tok, sp + 1, bl), m = vocab_find(tok, cat, al + bl);
            if (a < 0 || b < 0 || m < 0)
                st = mt_error_set(err, MT_ERR_FORMAT, "%s: tokenizer.ggml.merges[%llu] (\"%.*s\") names a token not in the vocab", gguf_path, (unsigned long long)i, (int)n, s);
            else merges_put(&tok->merges, a, b, (int32_t)i, m);
        }
        free(cat);
    } else if (!st && spm) {
        st = merges_from_scores(tok, g, err);
    } else if (!st) {
        st = mt_error_set(err, MT_ERR_FORMAT, "%s: tokenizer.ggml.merges is missing", gguf_path);
    }
    if (!st && !spm) {
        if (mt_gguf_get(g, "tokenizer.ggml.pre")) st = mt_gguf_get_string(g, "tokenizer.ggml.pre", &pre, err);
        const char *p = pre ? pre : "default";
        if (!st) {
            if (!strcmp(p, "smollm") || !strcmp(p, "starcoder") || !strcmp(p, "refact") || !strcmp(p, "command-r") ||
                !strcmp(p, "codeshell") || !strcmp(p, "exaone") || !strcmp(p, "minerva-7b")) {
                st = add_stage_regex(tok, "\\p{N}", PT_SPLIT, err);
                if (!st) st = add_stage_regex(tok, RE_GPT2, PT_BYTELEVEL, err);
            } else if (!strcmp(p, "gpt-2") || !strcmp(p, "gpt2") || !strcmp(p, "mpt") || !strcmp(p, "olmo") ||
                       !strcmp(p, "jais") || !strcmp(p, "default")) {
                st = add_stage_regex(tok, RE_GPT2, PT_BYTELEVEL, err);
            } else if (!strcmp(p, "llama-bpe") || !strcmp(p, "llama3") || !strcmp(p, "falcon3") || !strcmp(p, "pixtral")) {
                st = add_stage_regex(tok, RE_LLAMA3, PT_BYTELEVEL, err);
                tok->ignore_merges = 1; /* as Llama 3's tokenizer.json says, and llama.cpp does */
            } else if (!strcmp(p, "qwen2") || !strcmp(p, "stablelm2") || !strcmp(p, "deepseek-r1-qwen")) {
                st = add_stage_regex(tok, RE_QWEN2, PT_BYTELEVEL, err);
            } else {
                st = mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: tokenizer.ggml.pre \"%s\" is not supported (smollm, starcoder, gpt-2, llama-bpe, qwen2 and their kin are)", gguf_path, p);
            }
        }
        tok->byte_level = 1;
        tok->dec[tok->n_dec++].type = DEC_BYTELEVEL;
        tok->has_decoder = 1;
        tok->family = MT_TOK_BYTE_LEVEL_BPE;
    } else if (!st) {
        int space_prefix = gguf_bool(g, "tokenizer.ggml.add_space_prefix", 1);
        norm_stage *n = tok->norm;
        if (space_prefix) {
            n[tok->n_norm].type = NORM_PREPEND;
            n[tok->n_norm].alen = 3;
            if (!(n[tok->n_norm++].a = dup_n("\xE2\x96\x81", 3, err))) st = MT_ERR_NOMEM;
        }
        n[tok->n_norm].type = NORM_REPLACE;
        n[tok->n_norm].alen = 1;
        n[tok->n_norm].blen = 3;
        if (!(n[tok->n_norm].a = dup_n(" ", 1, err)) || !(n[tok->n_norm].b = dup_n("\xE2\x96\x81", 3, err))) st = MT_ERR_NOMEM;
        tok->n_norm++;
        dec_stage *d = tok->dec;
        d[0].type = DEC_REPLACE;
        d[0].alen = 3;
        d[0].blen = 1;
        if (!st && (!(d[0].a = dup_n("\xE2\x96\x81", 3, err)) || !(d[0].b = dup_n(" ", 1, err)))) st = MT_ERR_NOMEM;
        d[1].type = DEC_BYTEFALLBACK;
        d[2].type = DEC_FUSE;
        tok->n_dec = 3;
        if (space_prefix && !st) {
            d[3].type = DEC_STRIP;
            d[3].alen = 1;
            d[3].start = 1;
            if (!(d[3].a = dup_n(" ", 1, err))) st = MT_ERR_NOMEM;
            tok->n_dec = 4;
        }
        tok->has_decoder = 1;
        tok->byte_fallback = 1;
        tok->fuse_unk = 1;
        if (!st) st = gguf_id(g, gguf_path, "tokenizer.ggml.unknown_token_id", tok->n_ids, &tok->unk, err);
        tok->family = MT_TOK_SENTENCEPIECE_BPE;
    }
    if (!st) st = finish_tables(tok, err);
    if (!st) {
        st = gguf_id(g, gguf_path, "tokenizer.ggml.bos_token_id", tok->n_ids, &tok->bos, err);
        if (!st) st = gguf_id(g, gguf_path, "tokenizer.ggml.eos_token_id", tok->n_ids, &tok->eos, err);
        if (!st) st = gguf_id(g, gguf_path, "tokenizer.ggml.padding_token_id", tok->n_ids, &tok->pad, err);
    }
    if (!st) {
        if (gguf_bool(g, "tokenizer.ggml.add_bos_token", spm) && tok->bos >= 0) tok->prefix[tok->n_prefix++] = tok->bos;
        if (gguf_bool(g, "tokenizer.ggml.add_eos_token", 0) && tok->eos >= 0) tok->suffix[tok->n_suffix++] = tok->eos;
        if (mt_gguf_get(g, "tokenizer.chat_template"))
            st = mt_gguf_get_string(g, "tokenizer.chat_template", &tok->chat_template, err);
    }
    free(model);
    free(pre);
    mt_gguf_close(g);
    if (st) {
        mt_tokenizer_free(tok);
        return st;
    }
    *out = tok;
    return MT_OK;
}

/* ---- accessors ------------------------------------------------------------------- */

mt_tokenizer_family mt_tokenizer_get_family(const mt_tokenizer *tok) { return tok->family; }
int mt_tokenizer_vocab_size(const mt_tokenizer *tok) { return tok->n_ids; }
int32_t mt_tokenizer_bos(const mt_tokenizer *tok) { return tok->bos; }
int32_t mt_tokenizer_eos(const mt_tokenizer *tok) { return tok->eos; }
int32_t mt_tokenizer_pad(const mt_tokenizer *tok) { return tok->pad; }
const char *mt_tokenizer_chat_template(const mt_tokenizer *tok) { return tok->chat_template; }

int mt_tokenizer_adds_bos(const mt_tokenizer *tok) {
    for (int i = 0; i < tok->n_prefix; i++)
        if (tok->prefix[i] == tok->bos) return 1;
    return 0;
}

int mt_tokenizer_adds_eos(const mt_tokenizer *tok) {
    for (int i = 0; i < tok->n_suffix; i++)
        if (tok->suffix[i] == tok->eos) return 1;
    return 0;
}

int32_t mt_tokenizer_token_id(const mt_tokenizer *tok, const char *token) {
    return vocab_find(tok, token, strlen(token));
}

const char *mt_tokenizer_token_text(const mt_tokenizer *tok, int32_t id) {
    return (id >= 0 && id < tok->n_ids) ? tok->text[id] : NULL;
}

int mt_tokenizer_is_special(const mt_tokenizer *tok, int32_t id) {
    return id >= 0 && id < tok->n_ids && tok->special[id];
}

void mt_token_list_free(mt_token_list *list) {
    if (!list) return;
    free(list->ids);
    free(list->offsets);
    list->ids = list->offsets = NULL;
    list->n = list->cap = 0;
}

/* ---- encoding -------------------------------------------------------------------- */

typedef struct piece {
    size_t off, len; /* in the arena */
    int32_t fixed;   /* an added token's id, or -1 */
} piece;

typedef struct sym {
    int32_t id;
    uint32_t start, len;
    int32_t prev, next;
} sym;

typedef struct heap_item {
    uint64_t key; /* rank << 32 | position */
    int32_t merged;
} heap_item;

typedef struct enc_ctx {
    const mt_tokenizer *tok;
    const char *input;
    char *buf; /* normalized text, all segments */
    size_t *orig; /* per byte of buf: the input offset it came from */
    size_t len, cap, ocap;
    char *nb[2]; /* normalizer ping-pong */
    size_t *no[2];
    size_t nbcap[2], nocap[2];
    piece *pc[2];
    size_t npc[2], pccap[2];
    sym *syms;
    size_t symcap;
    heap_item *heap;
    size_t heapcap;
    char *word; /* byte-level text of a piece, for ignore_merges */
    size_t wordcap;
    pcre2_match_data *md;
    mt_token_list *list;
    mt_error *err;
} enc_ctx;

static int grow(void **p, size_t *cap, size_t need, size_t elem, mt_error *err) {
    if (need <= *cap) return 1;
    size_t c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    void *q = realloc(*p, c * elem);
    if (!q) {
        mt_error_set(err, MT_ERR_NOMEM, "out of memory while tokenizing (%zu elements)", need);
        return 0;
    }
    *p = q;
    *cap = c;
    return 1;
}

static int arena_reserve(enc_ctx *c, size_t extra) {
    return grow((void **)&c->buf, &c->cap, c->len + extra, 1, c->err) &&
           grow((void **)&c->orig, &c->ocap, c->len + extra, sizeof(size_t), c->err);
}

static int list_push(enc_ctx *c, int32_t id, size_t offset) {
    mt_token_list *l = c->list;
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 256;
        int32_t *ids = realloc(l->ids, cap * sizeof(int32_t));
        if (!ids) return mt_error_set(c->err, MT_ERR_NOMEM, "out of memory growing a token list"), 0;
        l->ids = ids;
        int32_t *offs = realloc(l->offsets, cap * sizeof(int32_t));
        if (!offs) return mt_error_set(c->err, MT_ERR_NOMEM, "out of memory growing a token list"), 0;
        l->offsets = offs;
        l->cap = cap;
    }
    l->ids[l->n] = id;
    l->offsets[l->n] = (int32_t)(offset > INT32_MAX ? INT32_MAX : offset);
    l->n++;
    return 1;
}

static int piece_push(enc_ctx *c, int which, size_t off, size_t len, int32_t fixed) {
    if (len == 0) return 1;
    if (!grow((void **)&c->pc[which], &c->pccap[which], c->npc[which] + 1, sizeof(piece), c->err)) return 0;
    c->pc[which][c->npc[which]++] = (piece){off, len, fixed};
    return 1;
}

/* Is the character ending at s[end) / starting at s[start] a word character, as
 * `tokenizers` decides for single_word (Unicode \w: core/text/unicode_word.c)? The text is
 * valid UTF-8 here. */
static int word_before(const char *s, size_t end) {
    const unsigned char *u = (const unsigned char *)s;
    size_t start = utf8_prev(u, end);
    return mt_unicode_is_word(utf8_decode(u + start, end - start));
}

static int word_after(const char *s, size_t start, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    uint32_t cp;
    return mt_utf8_decode(u + start, n - start, &cp) ? mt_unicode_is_word(cp) : 0;
}

/* Finds the next added-token match in s[from, n): leftmost, longest at that position,
 * with single_word honoured (a refused match is skipped, not shortened). On a match,
 * [*ms, *me) is its extent after lstrip/rstrip, never reaching below floor. */
static const added_token *find_added(const mt_tokenizer *tok, const char *s, size_t n, size_t from,
                                     size_t floor, int normalized, size_t *ms, size_t *me) {
    for (size_t i = from; i < n; i++) {
        unsigned char b = (unsigned char)s[i];
        const added_token *hit = NULL;
        if (!normalized) {
            for (uint32_t k = tok->added_first[b]; k < tok->added_first[b + 1]; k++) {
                const added_token *a = &tok->added[tok->added_order[k]];
                if (a->len <= n - i && memcmp(s + i, a->content, a->len) == 0) {
                    hit = a;
                    break;
                }
            }
        } else {
            for (size_t k = 0; k < tok->n_added; k++) {
                const added_token *a = &tok->added[k];
                if (a->normalized && a->len && a->len <= n - i && (unsigned char)a->content[0] == b &&
                    memcmp(s + i, a->content, a->len) == 0 && (!hit || a->len > hit->len))
                    hit = a;
            }
        }
        if (!hit) continue;
        size_t start = i, stop = i + hit->len;
        if (hit->single_word &&
            ((start > 0 && word_before(s, start)) || (stop < n && word_after(s, stop, n)))) {
            i = stop - 1;
            continue;
        }
        if (hit->lstrip) {
            while (start > floor) {
                size_t p = utf8_prev((const unsigned char *)s, start);
                if (!cp_is_space(utf8_decode((const unsigned char *)s + p, start - p))) break;
                start = p;
            }
        }
        if (hit->rstrip) {
            while (stop < n) {
                uint32_t cp;
                size_t l = mt_utf8_decode((const unsigned char *)s + stop, n - stop, &cp);
                if (!l || !cp_is_space(cp)) break;
                stop += l;
            }
        }
        *ms = start;
        *me = stop;
        return hit;
    }
    return NULL;
}

/* Applies the normalizers to input[s, e) and appends the result to the arena. */
static int normalize_segment(enc_ctx *c, size_t s, size_t e) {
    const mt_tokenizer *tok = c->tok;
    size_t n = e - s;
    if (tok->n_norm == 0) {
        if (!arena_reserve(c, n)) return 0;
        memcpy(c->buf + c->len, c->input + s, n);
        for (size_t i = 0; i < n; i++) c->orig[c->len + i] = s + i;
        c->len += n;
        return 1;
    }
    /* worst growth: each Replace and NFC multiplies, each Prepend adds */
    size_t need = n + 16;
    for (int k = 0; k < tok->n_norm; k++) {
        const norm_stage *ns = &tok->norm[k];
        if (ns->type == NORM_PREPEND) need += ns->alen;
        if (ns->type == NORM_NFC) need *= MT_NFC_MAX_GROWTH;
        if (ns->type == NORM_REPLACE && ns->blen > ns->alen) need = need * (ns->blen / ns->alen + 1);
    }
    for (int w = 0; w < 2; w++)
        if (!grow((void **)&c->nb[w], &c->nbcap[w], need, 1, c->err) ||
            !grow((void **)&c->no[w], &c->nocap[w], need, sizeof(size_t), c->err))
            return 0;
    char *cur = c->nb[0];
    size_t *co = c->no[0];
    memcpy(cur, c->input + s, n);
    for (size_t i = 0; i < n; i++) co[i] = s + i;
    int which = 0;
    for (int k = 0; k < tok->n_norm; k++) {
        const norm_stage *ns = &tok->norm[k];
        char *dst = c->nb[!which];
        size_t *dso = c->no[!which];
        size_t m = 0;
        if (ns->type == NORM_NFC) {
            if (mt_utf8_nfc_trivial(cur, n)) continue; /* below U+0300 text is its own NFC form */
            if (mt_utf8_nfc_into(cur, n, co, dst, dso, &m, c->err)) return 0;
        } else if (ns->type == NORM_PREPEND) {
            if (n == 0) continue;
            memcpy(dst, ns->a, ns->alen);
            for (size_t i = 0; i < ns->alen; i++) dso[i] = co[0];
            memcpy(dst + ns->alen, cur, n);
            memcpy(dso + ns->alen, co, n * sizeof(size_t));
            m = n + ns->alen;
        } else { /* NORM_REPLACE */
            for (size_t i = 0; i < n;) {
                if (i + ns->alen <= n && memcmp(cur + i, ns->a, ns->alen) == 0) {
                    memcpy(dst + m, ns->b, ns->blen);
                    for (size_t j = 0; j < ns->blen; j++) dso[m + j] = co[i];
                    m += ns->blen;
                    i += ns->alen;
                } else {
                    dst[m] = cur[i];
                    dso[m++] = co[i++];
                }
            }
        }
        which = !which;
        cur = dst;
        co = dso;
        n = m;
    }
    if (!arena_reserve(c, n)) return 0;
    memcpy(c->buf + c->len, cur, n);
    memcpy(c->orig + c->len, co, n * sizeof(size_t));
    c->len += n;
    return 1;
}

/* Appends piece text with a prefix and/or a ' ' -> repl replacement into the arena. */
static int arena_copy_piece(enc_ctx *c, const piece *p, const char *prefix, size_t plen, const char *repl,
                            size_t rlen, piece *out) {
    size_t need = plen + p->len * (rlen ? rlen : 1);
    if (!arena_reserve(c, need)) return 0;
    size_t start = c->len, o = c->len;
    size_t first = c->orig[p->off];
    for (size_t i = 0; i < plen; i++) {
        c->buf[o] = prefix[i];
        c->orig[o++] = first;
    }
    for (size_t i = 0; i < p->len; i++) {
        char ch = c->buf[p->off + i];
        size_t org = c->orig[p->off + i];
        if (rlen && ch == ' ') {
            for (size_t j = 0; j < rlen; j++) {
                c->buf[o] = repl[j];
                c->orig[o++] = org;
            }
        } else {
            c->buf[o] = ch;
            c->orig[o++] = org;
        }
    }
    c->len = o;
    *out = (piece){start, o - start, -1};
    return 1;
}

/* Splits piece p by a regex (or, with re NULL, by the character repl) into list `to`. */
static int split_piece(enc_ctx *c, const piece *p, const pcre2_code *re, const char *ch, size_t chlen,
                       int behavior, int invert, int to) {
    /* collect (start, end, is_match) ranges relative to p */
    size_t first_new = c->npc[to];
    size_t prev = 0;
    const char *s = c->buf + p->off;
    size_t n = p->len;
    int prev_match = 0;
    /* emit one range, folding it by behavior as the `tokenizers` library does */
#define EMIT(a, b, m)                                                                               \
    do {                                                                                            \
        size_t ra_ = (a), rb_ = (b);                                                                \
        int im_ = (m) != invert;                                                                    \
        piece *last_ = c->npc[to] > first_new ? &c->pc[to][c->npc[to] - 1] : NULL;                  \
        if (behavior == SPLIT_REMOVED) {                                                            \
            if (!im_ && !piece_push(c, to, p->off + ra_, rb_ - ra_, -1)) return 0;                  \
        } else if (behavior == SPLIT_ISOLATED) {                                                    \
            if (!piece_push(c, to, p->off + ra_, rb_ - ra_, -1)) return 0;                          \
        } else if (behavior == SPLIT_MERGED_PREV) {                                                 \
            if (im_ && !prev_match && last_) last_->len = p->off + rb_ - last_->off;                \
            else if (!piece_push(c, to, p->off + ra_, rb_ - ra_, -1)) return 0;                     \
        } else if (behavior == SPLIT_CONTIGUOUS) {                                                  \
            if (im_ == prev_match && last_) last_->len = p->off + rb_ - last_->off;                 \
            else if (!piece_push(c, to, p->off + ra_, rb_ - ra_, -1)) return 0;                     \
        } else { /* MergedWithNext: a match takes the non-match after it */                      \
            if (!im_ && prev_match && last_) last_->len = p->off + rb_ - last_->off;                \
            else if (!piece_push(c, to, p->off + ra_, rb_ - ra_, -1)) return 0;                     \
        }                                                                                           \
        if (rb_ > ra_) prev_match = im_;                                                            \
    } while (0)
    if (re) {
        size_t at = 0;
        while (at <= n) {
            int rc = pcre2_match(re, (PCRE2_SPTR)s, n, at, PCRE2_NO_UTF_CHECK, c->md, NULL);
            if (rc == PCRE2_ERROR_JIT_STACKLIMIT || rc == PCRE2_ERROR_MATCHLIMIT || rc == PCRE2_ERROR_DEPTHLIMIT ||
                rc == PCRE2_ERROR_HEAPLIMIT)
                rc = pcre2_match(re, (PCRE2_SPTR)s, n, at, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, c->md, NULL);
            if (rc == PCRE2_ERROR_NOMATCH) break;
            if (rc < 0) {
                PCRE2_UCHAR msg[128];
                pcre2_get_error_message(rc, msg, sizeof msg);
                mt_error_set(c->err, MT_ERR_BACKEND, "%s: regex match failed: %s", c->tok->source, (const char *)msg);
                return 0;
            }
            PCRE2_SIZE *ov = pcre2_get_ovector_pointer(c->md);
            size_t ms = ov[0], me = ov[1];
            if (ms > prev) EMIT(prev, ms, 0);
            if (me > ms) EMIT(ms, me, 1);
            prev = me;
            if (me == ms) { /* empty match: step one character */
                if (me >= n) break;
                size_t l = utf8_valid_len((const unsigned char *)s + me, n - me);
                at = me + (l ? l : 1);
            } else at = me;
        }
    } else {
        for (size_t i = 0; i + chlen <= n;) {
            if (memcmp(s + i, ch, chlen) == 0) {
                if (i > prev) EMIT(prev, i, 0);
                EMIT(i, i + chlen, 1);
                i += chlen;
                prev = i;
            } else i++;
        }
    }
    if (prev < n) EMIT(prev, n, 0);
#undef EMIT
    return 1;
}

/* Merges the symbols of one piece by rank and appends the resulting ids. */
static int bpe_piece(enc_ctx *c, const piece *p) {
    const mt_tokenizer *tok = c->tok;
    const unsigned char *s = (const unsigned char *)c->buf + p->off;
    size_t n = p->len;
    if (tok->ignore_merges) {
        int32_t id;
        if (tok->byte_level) {
            if (!grow((void **)&c->word, &c->wordcap, n * 2 + 1, 1, c->err)) return 0;
            size_t w = 0;
            for (size_t i = 0; i < n; i++) w += mt_utf8_encode(tok->byte_cp[s[i]], c->word + w);
            id = vocab_find(tok, c->word, w);
        } else id = vocab_find(tok, (const char *)s, n);
        if (id >= 0) return list_push(c, id, c->orig[p->off]);
    }
    if (!grow((void **)&c->syms, &c->symcap, n + 1, sizeof(sym), c->err)) return 0;
    sym *sy = c->syms;
    int32_t ns = 0;
    int last_unk = 0;
    for (size_t i = 0; i < n;) {
        size_t l = tok->byte_level ? 1 : utf8_valid_len(s + i, n - i);
        if (!l) l = 1;
        int32_t id = tok->byte_level ? tok->byte_id[s[i]] : vocab_find(tok, (const char *)s + i, l);
        if (id >= 0) {
            sy[ns++] = (sym){id, (uint32_t)i, (uint32_t)l, 0, 0};
            last_unk = 0;
        } else {
            int fell_back = 0;
            if (tok->byte_fallback) {
                fell_back = 1;
                for (size_t k = 0; k < l; k++)
                    if (tok->fallback_id[s[i + k]] < 0) fell_back = 0;
                if (fell_back) {
                    if (!grow((void **)&c->syms, &c->symcap, (size_t)ns + (n - i) * 4 + 1, sizeof(sym), c->err)) return 0;
                    sy = c->syms;
                    for (size_t k = 0; k < l; k++)
                        sy[ns++] = (sym){tok->fallback_id[s[i + k]], (uint32_t)(i + k), 1, 0, 0};
                    last_unk = 0;
                }
            }
            if (!fell_back && tok->unk >= 0) {
                if (tok->fuse_unk && last_unk) sy[ns - 1].len += (uint32_t)l;
                else sy[ns++] = (sym){tok->unk, (uint32_t)i, (uint32_t)l, 0, 0};
                last_unk = 1;
            }
        }
        i += l;
    }
    for (int32_t k = 0; k < ns; k++) {
        sy[k].prev = k - 1;
        sy[k].next = k + 1 < ns ? k + 1 : -1;
    }
    /* the heap of candidate merges, lowest rank first, leftmost on ties */
    size_t nh = 0;
    if (ns > 1 && !grow((void **)&c->heap, &c->heapcap, (size_t)ns * 2 + 4, sizeof(heap_item), c->err)) return 0;
    heap_item *h = c->heap;
#define HEAP_PUSH(pos)                                                                          \
    do {                                                                                        \
        int32_t r_, m_;                                                                         \
        int32_t q_ = (pos);                                                                     \
        if (sy[q_].next >= 0 && merges_get(&tok->merges, sy[q_].id, sy[sy[q_].next].id, &r_, &m_)) { \
            if (nh == c->heapcap) {                                                             \
                if (!grow((void **)&c->heap, &c->heapcap, nh + 1, sizeof(heap_item), c->err)) return 0; \
                h = c->heap;                                                                    \
            }                                                                                   \
            size_t j_ = nh++;                                                                   \
            heap_item it_ = {((uint64_t)(uint32_t)r_ << 32) | (uint32_t)q_, m_};                 \
            while (j_ > 0 && h[(j_ - 1) / 2].key > it_.key) {                                   \
                h[j_] = h[(j_ - 1) / 2];                                                        \
                j_ = (j_ - 1) / 2;                                                              \
            }                                                                                   \
            h[j_] = it_;                                                                        \
        }                                                                                       \
    } while (0)
    for (int32_t k = 0; k + 1 < ns; k++) HEAP_PUSH(k);
    while (nh > 0) {
        heap_item top = h[0];
        heap_item last = h[--nh];
        size_t j = 0;
        for (;;) {
            size_t l = 2 * j + 1;
            if (l >= nh) break;
            if (l + 1 < nh && h[l + 1].key < h[l].key) l++;
            if (h[l].key >= last.key) break;
            h[j] = h[l];
            j = l;
        }
        if (nh > 0) h[j] = last;
        int32_t pos = (int32_t)(top.key & 0xFFFFFFFFu);
        if (sy[pos].len == 0 || sy[pos].next < 0) continue;
        int32_t nx = sy[pos].next;
        int32_t r, m;
        if (!merges_get(&tok->merges, sy[pos].id, sy[nx].id, &r, &m) || m != top.merged) continue;
        sy[pos].id = m;
        sy[pos].len += sy[nx].len;
        sy[pos].next = sy[nx].next;
        sy[nx].len = 0;
        if (sy[pos].next >= 0) sy[sy[pos].next].prev = pos;
        if (sy[pos].prev >= 0) HEAP_PUSH(sy[pos].prev);
        HEAP_PUSH(pos);
    }
#undef HEAP_PUSH
    for (int32_t k = ns > 0 ? 0 : -1; k >= 0; k = sy[k].next)
        if (!list_push(c, sy[k].id, c->orig[p->off + sy[k].start])) return 0;
    return 1;
}

/* Normalizes, pre-tokenizes and merges input[s, e). */
static int encode_segment(enc_ctx *c, size_t s, size_t e) {
    const mt_tokenizer *tok = c->tok;
    c->len = 0;
    if (!normalize_segment(c, s, e)) return 0;
    int cur = 0;
    c->npc[0] = c->npc[1] = 0;
    if (tok->has_normalized_added) {
        size_t at = 0, ms, me;
        const added_token *a;
        while ((a = find_added(tok, c->buf, c->len, at, at, 1, &ms, &me)) != NULL) {
            if (!piece_push(c, cur, at, ms - at, -1) || !piece_push(c, cur, ms, me - ms, a->id)) return 0;
            at = me;
        }
        if (!piece_push(c, cur, at, c->len - at, -1)) return 0;
    } else if (!piece_push(c, cur, 0, c->len, -1)) return 0;

    for (int k = 0; k < tok->n_pre; k++) {
        const pt_stage *st = &tok->pre[k];
        int to = !cur;
        c->npc[to] = 0;
        for (size_t i = 0; i < c->npc[cur]; i++) {
            piece p = c->pc[cur][i];
            if (p.fixed >= 0) {
                if (!piece_push(c, to, p.off, p.len, p.fixed)) return 0;
                continue;
            }
            if (st->type == PT_BYTELEVEL && st->add_prefix_space && c->buf[p.off] != ' ') {
                if (!arena_copy_piece(c, &p, " ", 1, NULL, 0, &p)) return 0;
            } else if (st->type == PT_METASPACE) {
                int starts = p.len >= st->repl_len && memcmp(c->buf + p.off, st->repl, st->repl_len) == 0;
                int first_char_space = c->buf[p.off] == ' ';
                int prepend = 0;
                if (!starts && !first_char_space) {
                    if (st->prepend_scheme == PREPEND_ALWAYS) prepend = 1;
                    if (st->prepend_scheme == PREPEND_FIRST && c->orig[p.off] == 0) prepend = 1;
                }
                if (!arena_copy_piece(c, &p, st->repl, prepend ? st->repl_len : 0, st->repl, st->repl_len, &p)) return 0;
                if (st->split) {
                    if (!split_piece(c, &p, NULL, st->repl, st->repl_len, SPLIT_MERGED_NEXT, 0, to)) return 0;
                } else if (!piece_push(c, to, p.off, p.len, -1)) return 0;
                continue;
            }
            if (st->re) {
                if (!split_piece(c, &p, st->re, NULL, 0, st->behavior, st->invert, to)) return 0;
            } else if (!piece_push(c, to, p.off, p.len, -1)) return 0;
        }
        cur = to;
    }
    for (size_t i = 0; i < c->npc[cur]; i++) {
        const piece *p = &c->pc[cur][i];
        if (p->fixed >= 0) {
            if (!list_push(c, p->fixed, c->orig[p->off])) return 0;
        } else if (!bpe_piece(c, p)) return 0;
    }
    return 1;
}

mt_status mt_tokenizer_encode(const mt_tokenizer *tok, const char *text, size_t len,
                              int add_special, mt_token_list *list, mt_error *err) {
    if (!tok || !list || (!text && len))
        return mt_error_set(err, MT_ERR_INVALID_ARG, "mt_tokenizer_encode: NULL argument");
    for (size_t i = 0; i < len;) {
        unsigned char b = (unsigned char)text[i];
        if (b < 0x80) {
            i++;
            continue;
        }
        size_t l = utf8_valid_len((const unsigned char *)text + i, len - i);
        if (!l) return mt_error_set(err, MT_ERR_INVALID_ARG, "text is not valid UTF-8 at byte offset %zu (byte 0x%02X)", i, b);
        i += l;
    }
    if (len > INT32_MAX) return mt_error_set(err, MT_ERR_INVALID_ARG, "text of %zu bytes is too long to encode at once", len);
    enc_ctx c;
    memset(&c, 0, sizeof c);
    c.tok = tok;
    c.input = text;
    c.list = list;
    c.err = err;
    size_t n0 = list->n;
    int ok = 1;
    if (tok->n_pre > 0) {
        c.md = pcre2_match_data_create(1, NULL);
        if (!c.md) ok = 0, mt_error_set(err, MT_ERR_NOMEM, "out of memory for regex match data");
    }
    if (ok && add_special)
        for (int k = 0; ok && k < tok->n_prefix; k++) ok = list_push(&c, tok->prefix[k], 0);
    size_t at = 0, ms, me;
    const added_token *a;
    while (ok && at < len && (a = find_added(tok, text, len, at, at, 0, &ms, &me)) != NULL) {
        if (ms > at) ok = encode_segment(&c, at, ms);
        if (ok) ok = list_push(&c, a->id, ms);
        at = me;
    }
    if (ok && at < len) ok = encode_segment(&c, at, len);
    if (ok && add_special)
        for (int k = 0; ok && k < tok->n_suffix; k++) ok = list_push(&c, tok->suffix[k], len);
    free(c.buf);
    free(c.orig);
    free(c.nb[0]);
    free(c.nb[1]);
    free(c.no[0]);
    free(c.no[1]);
    free(c.pc[0]);
    free(c.pc[1]);
    free(c.syms);
    free(c.heap);
    free(c.word);
    pcre2_match_data_free(c.md);
    if (!ok) {
        list->n = n0;
        return err ? err->status : MT_ERR_NOMEM;
    }
    return MT_OK;
}

/* ---- decoding --------------------------------------------------------------------- */

typedef struct strbuf {
    char *p;
    size_t n, cap;
} strbuf;

static int sb_add(strbuf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t c = b->cap ? b->cap : 64;
        while (c < b->n + n + 1) c *= 2;
        char *q = realloc(b->p, c);
        if (!q) return 0;
        b->p = q;
        b->cap = c;
    }
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
    return 1;
}

typedef struct toklist {
    strbuf *t;
    size_t n, cap;
} toklist;

static void tl_free(toklist *l) {
    for (size_t i = 0; i < l->n; i++) free(l->t[i].p);
    free(l->t);
    l->t = NULL;
    l->n = l->cap = 0;
}

static int tl_push(toklist *l, const char *s, size_t n) {
    if (l->n == l->cap) {
        size_t c = l->cap ? l->cap * 2 : 16;
        strbuf *q = realloc(l->t, c * sizeof(strbuf));
        if (!q) return 0;
        l->t = q;
        l->cap = c;
    }
    l->t[l->n] = (strbuf){NULL, 0, 0};
    if (!sb_add(&l->t[l->n], s, n)) return 0;
    l->n++;
    return 1;
}

/* Appends bytes to b, replacing each maximal invalid UTF-8 prefix with U+FFFD. */
static int sb_add_lossy(strbuf *b, const unsigned char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        size_t l = utf8_valid_len(s + i, n - i);
        if (l) {
            if (!sb_add(b, (const char *)s + i, l)) return 0;
            i += l;
        } else {
            if (!sb_add(b, "\xEF\xBF\xBD", 3)) return 0;
            i += utf8_invalid_len(s + i, n - i);
        }
    }
    return 1;
}

static int parse_byte_token(const char *s, size_t n) {
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
    int v = 0;
    for (int k = 3; k < 5; k++) {
        char ch = s[k];
        int d = ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

static int dec_apply(const mt_tokenizer *tok, const dec_stage *d, toklist *l) {
    toklist out = {0};
    int ok = 1;
    if (d->type == DEC_BYTELEVEL) {
        strbuf raw = {0}, res = {0};
        for (size_t i = 0; ok && i < l->n; i++) {
            const unsigned char *s = (const unsigned char *)l->t[i].p;
            size_t n = l->t[i].n, mark = raw.n;
            int all = 1;
            for (size_t k = 0; k < n && all;) {
                uint32_t cp = 0xFFFFFFFFu;
                size_t cl = mt_utf8_decode(s + k, n - k, &cp);
                int b = cp < 324 ? tok->cp_byte[cp] : -1;
                if (b < 0) all = 0;
                else {
                    unsigned char bb = (unsigned char)b;
                    ok = sb_add(&raw, (const char *)&bb, 1);
                    k += cl;
                }
            }
            if (!all) {
                raw.n = mark;
                ok = sb_add(&raw, (const char *)s, n);
            }
        }
        if (ok) ok = sb_add(&res, "", 0) && sb_add_lossy(&res, (const unsigned char *)raw.p, raw.n);
        free(raw.p);
        if (ok) ok = tl_push(&out, res.p ? res.p : "", res.n);
        free(res.p);
    } else if (d->type == DEC_FUSE) {
        strbuf all = {0};
        ok = sb_add(&all, "", 0);
        for (size_t i = 0; ok && i < l->n; i++) ok = sb_add(&all, l->t[i].p, l->t[i].n);
        if (ok) ok = tl_push(&out, all.p, all.n);
        free(all.p);
    } else if (d->type == DEC_BYTEFALLBACK) {
        strbuf bytes = {0};
        size_t nb = 0;
        for (size_t i = 0; ok && i <= l->n; i++) {
            int b = i < l->n ? parse_byte_token(l->t[i].p, l->t[i].n) : -1;
            if (b >= 0) {
                unsigned char bb = (unsigned char)b;
                ok = sb_add(&bytes, (const char *)&bb, 1);
                nb++;
                continue;
            }
            if (nb) {
                size_t k = 0, valid = 1;
                while (k < bytes.n) {
                    size_t cl = utf8_valid_len((const unsigned char *)bytes.p + k, bytes.n - k);
                    if (!cl) { valid = 0; break; }
                    k += cl;
                }
                if (valid) ok = tl_push(&out, bytes.p, bytes.n);
                else
                    for (size_t k2 = 0; ok && k2 < nb; k2++) ok = tl_push(&out, "\xEF\xBF\xBD", 3);
                bytes.n = 0;
                nb = 0;
            }
            if (ok && i < l->n) ok = tl_push(&out, l->t[i].p, l->t[i].n);
        }
        free(bytes.p);
    } else {
        for (size_t i = 0; ok && i < l->n; i++) {
            const char *s = l->t[i].p;
            size_t n = l->t[i].n;
            strbuf r = {0};
            ok = sb_add(&r, "", 0);
            if (d->type == DEC_REPLACE) {
                for (size_t k = 0; ok && k < n;) {
                    if (k + d->alen <= n && memcmp(s + k, d->a, d->alen) == 0) {
                        ok = sb_add(&r, d->b, d->blen);
                        k += d->alen;
                    } else ok = sb_add(&r, s + k++, 1);
                }
            } else if (d->type == DEC_STRIP) {
                size_t a = 0, b = n;
                for (int k = 0; k < d->start && a + d->alen <= b && memcmp(s + a, d->a, d->alen) == 0; k++) a += d->alen;
                for (int k = 0; k < d->stop && b >= a + d->alen && memcmp(s + b - d->alen, d->a, d->alen) == 0; k++) b -= d->alen;
                ok = sb_add(&r, s + a, b - a);
            } else { /* DEC_METASPACE: the first token loses every replacement character */
                for (size_t k = 0; ok && k < n;) {
                    if (k + d->alen <= n && memcmp(s + k, d->a, d->alen) == 0) {
                        if (!(i == 0 && d->prepend_scheme != PREPEND_NEVER)) ok = sb_add(&r, " ", 1);
                        k += d->alen;
                    } else ok = sb_add(&r, s + k++, 1);
                }
            }
            if (ok) ok = tl_push(&out, r.p, r.n);
            free(r.p);
        }
    }
    tl_free(l);
    *l = out;
    return ok;
}

mt_status mt_tokenizer_decode(const mt_tokenizer *tok, const int32_t *ids, size_t n,
                              int skip_special, char **text, size_t *len, mt_error *err) {
    *text = NULL;
    if (len) *len = 0;
    toklist l = {0};
    int ok = 1;
    for (size_t i = 0; ok && i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= tok->n_ids || !tok->text[id]) {
            tl_free(&l);
            return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: cannot decode id %d at position %zu: not in the vocabulary of %d ids", tok->source, id, i, tok->n_ids);
        }
        if (skip_special && tok->special[id]) continue;
        ok = tl_push(&l, tok->text[id], tok->text_len[id]);
    }
    for (int k = 0; ok && k < tok->n_dec; k++) ok = dec_apply(tok, &tok->dec[k], &l);
    strbuf out = {0};
    if (ok) ok = sb_add(&out, "", 0);
    for (size_t i = 0; ok && i < l.n; i++) {
        if (!tok->has_decoder && i > 0) ok = sb_add(&out, " ", 1);
        if (ok) ok = sb_add(&out, l.t[i].p, l.t[i].n);
    }
    tl_free(&l);
    if (!ok) {
        free(out.p);
        return mt_error_set(err, MT_ERR_NOMEM, "out of memory decoding %zu ids", n);
    }
    *text = out.p;
    if (len) *len = out.n;
    return MT_OK;
}

/* ---- accessors for the GGUF exporter (core/store/export_gguf.c) ------------------------- */

int32_t mt_tokenizer_unk(const mt_tokenizer *tok) { return tok->unk; }

const char *mt_tokenizer_token_bytes(const mt_tokenizer *tok, int32_t id, size_t *len) {
    if (id < 0 || id >= tok->n_ids || !tok->text[id]) {
        if (len) *len = 0;
        return NULL;
    }
    if (len) *len = tok->text_len[id];
    return tok->text[id];
}

int mt_tokenizer_gguf_token_type(const mt_tokenizer *tok, int32_t id) {
    if (id < 0 || id >= tok->n_ids) return 1;
    if (tok->special[id]) return id == tok->unk ? 2 : 3;
    for (size_t i = 0; i < tok->n_added; i++)
        if (tok->added[i].id == id) return 4;
    if (tok->family == MT_TOK_SENTENCEPIECE_BPE && tok->text[id] && tok->text_len[id] == 6 &&
        !memcmp(tok->text[id], "<0x", 3) && tok->text[id][5] == '>')
        return 6;
    return id == tok->unk ? 2 : 1;
}

int mt_tokenizer_adds_space_prefix(const mt_tokenizer *tok) {
    for (int i = 0; i < tok->n_norm; i++)
        if (tok->norm[i].type == NORM_PREPEND) return 1;
    for (int i = 0; i < tok->n_pre; i++)
        if (tok->pre[i].type == PT_METASPACE && tok->pre[i].prepend_scheme != PREPEND_NEVER) return 1;
    return 0;
}

typedef struct ranked_pair { int32_t rank, a, b; } ranked_pair;
static int cmp_ranked_pair(const void *x, const void *y) {
    const ranked_pair *p = x, *q = y;
    return (p->rank > q->rank) - (p->rank < q->rank);
}

mt_status mt_tokenizer_merge_list(const mt_tokenizer *tok, int32_t **pairs, size_t *count,
                                  mt_error *err) {
    *pairs = NULL;
    *count = 0;
    const merge_map *m = &tok->merges;
    if (!m->keys) return MT_OK;
    size_t n = 0;
    for (size_t i = 0; i <= m->mask; i++) n += m->keys[i] != UINT64_MAX;
    ranked_pair *r = mt_malloc((n ? n : 1) * sizeof *r, "merge list", err);
    int32_t *out = mt_malloc((n ? n : 1) * 2 * sizeof(int32_t), "merge list", err);
    if (!r || !out) {
        free(r);
        free(out);
        return MT_ERR_NOMEM;
    }
    size_t k = 0;
    for (size_t i = 0; i <= m->mask; i++) {
        if (m->keys[i] == UINT64_MAX) continue;
        r[k++] = (ranked_pair){m->rank[i], (int32_t)(uint32_t)(m->keys[i] >> 32),
                               (int32_t)(uint32_t)m->keys[i]};
    }
    qsort(r, n, sizeof *r, cmp_ranked_pair);
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = r[i].a;
        out[2 * i + 1] = r[i].b;
    }
    free(r);
    *pairs = out;
    *count = n;
    return MT_OK;
}

/* The spans a regex matches in probe text, as "start:end," pairs. */
static void regex_spans(const pcre2_code *re, const char *s, size_t n, char *out, size_t size) {
    size_t used = 0;
    out[0] = '\0';
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
    if (!md) return;
    size_t off = 0;
    while (off <= n && used + 32 < size) {
        int rc = pcre2_match(re, (PCRE2_SPTR)s, n, off, 0, md, NULL);
        if (rc < 0) break;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        used += (size_t)snprintf(out + used, size - used, "%zu:%zu,", (size_t)ov[0], (size_t)ov[1]);
        off = ov[1] > ov[0] ? ov[1] : ov[1] + 1;
    }
    pcre2_match_data_free(md);
}

static int regex_same(const pcre2_code *re, const char *candidate) {
    static const char probe[] = "Hello World's 'S 'LL x12345 y 6\n\n  \t z!!?  \r\n\xc3\xbc\xc3\x9f 3a \xe4\xb8\xad\xe6\x96\x87 ";
    pcre2_code *c = NULL;
    if (regex_compile("probe", candidate, strlen(candidate), 0, &c, NULL) != MT_OK) return 0;
    char a[2048], b[2048];
    regex_spans(re, probe, sizeof probe - 1, a, sizeof a);
    regex_spans(c, probe, sizeof probe - 1, b, sizeof b);
    pcre2_code_free(c);
    return strcmp(a, b) == 0;
}

const char *mt_tokenizer_pre_name(const mt_tokenizer *tok) {
    if (tok->family != MT_TOK_BYTE_LEVEL_BPE) return NULL;
    const pt_stage *p = tok->pre;
    if (tok->n_pre == 1 && p[0].type == PT_BYTELEVEL && p[0].re && regex_same(p[0].re, RE_GPT2))
        return "gpt-2";
    if (tok->n_pre != 2 || p[0].type != PT_SPLIT || p[0].behavior != SPLIT_ISOLATED ||
        p[0].invert || p[1].type != PT_BYTELEVEL)
        return NULL;
    if (p[1].re && regex_same(p[1].re, RE_GPT2) && regex_same(p[0].re, "\\p{N}")) return "smollm";
    if (p[1].re) return NULL;
    if (regex_same(p[0].re, RE_LLAMA3)) return "llama-bpe";
    if (regex_same(p[0].re, RE_QWEN2)) return "qwen2";
    return NULL;
}

/* ---- writing tokenizer.json (core/store/export_hf.c) ------------------------------------ */

/* The regex of a Split / ByteLevel stage, recognised among the patterns moontune
 * compiles (the compiled code keeps no text); NULL when none matches. */
static const char *save_regex_text(const pcre2_code *re) {
    static const char *const known[] = {RE_GPT2, RE_LLAMA3, RE_QWEN2, "\\p{N}", "\\p{N}+"};
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        if (regex_same(re, known[i])) return known[i];
    return NULL;
}

static const char *save_prepend_name(int scheme) {
    return scheme == PREPEND_FIRST ? "first" : scheme == PREPEND_NEVER ? "never" : "always";
}

static json_t *save_str(const char *s, size_t n) {
    json_t *v = json_stringn(s, n);
    return v ? v : json_string("");
}

static json_t *save_seq(json_t *list, const char *type, const char *key) {
    size_t n = json_array_size(list);
    if (n == 0) {
        json_decref(list);
        return json_null();
    }
    if (n == 1) {
        json_t *one = json_incref(json_array_get(list, 0));
        json_decref(list);
        return one;
    }
    return json_pack("{s:s, s:o}", "type", type, key, list);
}

static mt_status save_pre_tokenizer(const mt_tokenizer *tok, json_t **out, mt_error *err) {
    json_t *list = json_array();
    for (int i = 0; i < tok->n_pre; i++) {
        const pt_stage *s = &tok->pre[i];
        if (s->type == PT_METASPACE) {
            json_array_append_new(list, json_pack("{s:s, s:o, s:s, s:b}", "type", "Metaspace",
                                                  "replacement", save_str(s->repl, s->repl_len),
                                                  "prepend_scheme", save_prepend_name(s->prepend_scheme),
                                                  "split", s->split));
            continue;
        }
        const char *pat = s->re ? save_regex_text(s->re) : NULL;
        if (s->re && !pat) {
            json_decref(list);
            return mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: a pre-tokenizer regex that moontune cannot write back", tok->source);
        }
        if (s->type == PT_BYTELEVEL) {
            int own = pat && strcmp(pat, RE_GPT2) != 0; /* llama-bpe, qwen2: Split, then ByteLevel without regex */
            if (own)
                json_array_append_new(list, json_pack("{s:s, s:{s:s}, s:s, s:b}", "type", "Split", "pattern", "Regex", pat,
                                                      "behavior", "Isolated", "invert", 0));
            json_array_append_new(list, json_pack("{s:s, s:b, s:b, s:b}", "type", "ByteLevel", "add_prefix_space",
                                                  s->add_prefix_space, "trim_offsets", 1, "use_regex", s->re && !own));
        } else if (s->behavior == SPLIT_ISOLATED && !s->invert && pat && (!strcmp(pat, "\\p{N}") || !strcmp(pat, "\\p{N}+"))) {
            json_array_append_new(list, json_pack("{s:s, s:b}", "type", "Digits", "individual_digits", !strcmp(pat, "\\p{N}")));
        } else {
            static const char *const beh[] = {"", "Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
            if (!pat || s->behavior < 1 || s->behavior > 5) {
                json_decref(list);
                return mt_error_set(err, MT_ERR_UNSUPPORTED, "%s: a Split pre-tokenizer that moontune cannot write back", tok->source);
            }
            json_array_append_new(list, json_pack("{s:s, s:{s:s}, s:s, s:b}", "type", "Split", "pattern", "Regex", pat,
                                                  "behavior", beh[s->behavior], "invert", s->invert));
        }
    }
    *out = save_seq(list, "Sequence", "pretokenizers");
    return MT_OK;
}

static json_t *save_normalizer(const mt_tokenizer *tok) {
    json_t *list = json_array();
    for (int i = 0; i < tok->n_norm; i++) {
        const norm_stage *s = &tok->norm[i];
        if (s->type == NORM_PREPEND)
            json_array_append_new(list, json_pack("{s:s, s:o}", "type", "Prepend", "prepend", save_str(s->a, s->alen)));
        else if (s->type == NORM_REPLACE)
            json_array_append_new(list, json_pack("{s:s, s:{s:o}, s:o}", "type", "Replace", "pattern", "String",
                                                  save_str(s->a, s->alen), "content", save_str(s->b, s->blen)));
        else if (s->type == NORM_NFC)
            json_array_append_new(list, json_pack("{s:s}", "type", "NFC"));
    }
    return save_seq(list, "Sequence", "normalizers");
}

static json_t *save_decoder(const mt_tokenizer *tok) {
    if (!tok->has_decoder) return json_null();
    json_t *list = json_array();
    for (int i = 0; i < tok->n_dec; i++) {
        const dec_stage *s = &tok->dec[i];
        json_t *d = NULL;
        switch (s->type) {
        case DEC_BYTELEVEL:
            d = json_pack("{s:s, s:b, s:b, s:b}", "type", "ByteLevel", "add_prefix_space", 1, "trim_offsets", 1, "use_regex", 1);
            break;
        case DEC_REPLACE:
            d = json_pack("{s:s, s:{s:o}, s:o}", "type", "Replace", "pattern", "String", save_str(s->a, s->alen), "content",
                          save_str(s->b, s->blen));
            break;
        case DEC_BYTEFALLBACK: d = json_pack("{s:s}", "type", "ByteFallback"); break;
        case DEC_FUSE: d = json_pack("{s:s}", "type", "Fuse"); break;
        case DEC_STRIP:
            d = json_pack("{s:s, s:o, s:i, s:i}", "type", "Strip", "content", save_str(s->a, s->alen), "start", s->start,
                          "stop", s->stop);
            break;
        case DEC_METASPACE:
            d = json_pack("{s:s, s:o, s:s, s:b}", "type", "Metaspace", "replacement", save_str(s->a, s->alen),
                          "prepend_scheme", save_prepend_name(s->prepend_scheme), "split", 1);
            break;
        default: break;
        }
        if (d) json_array_append_new(list, d);
    }
    return save_seq(list, "Sequence", "decoders");
}

/* TemplateProcessing from the ids added around a sequence, or ByteLevel (offsets only). */
static json_t *save_post_processor(const mt_tokenizer *tok) {
    if (!tok->n_prefix && !tok->n_suffix)
        return tok->byte_level ? json_pack("{s:s, s:b, s:b, s:b}", "type", "ByteLevel", "add_prefix_space", 0,
                                           "trim_offsets", 0, "use_regex", 1)
                               : json_null();
    json_t *single = json_array(), *pair = json_array(), *specials = json_object();
    for (int pass = 0; pass < 2; pass++) {
        const char *seq = pass ? "B" : "A";
        for (int i = 0; i < tok->n_prefix; i++) {
            const char *t = tok->text[tok->prefix[i]];
            json_t *e = json_pack("{s:{s:s, s:i}}", "SpecialToken", "id", t, "type_id", pass);
            if (!pass) json_array_append(single, e);
            json_array_append_new(pair, e);
        }
        json_t *e = json_pack("{s:{s:s, s:i}}", "Sequence", "id", seq, "type_id", pass);
        if (!pass) json_array_append(single, e);
        json_array_append_new(pair, e);
        for (int i = 0; i < tok->n_suffix; i++) {
            const char *t = tok->text[tok->suffix[i]];
            e = json_pack("{s:{s:s, s:i}}", "SpecialToken", "id", t, "type_id", pass);
            if (!pass) json_array_append(single, e);
            json_array_append_new(pair, e);
        }
    }
    for (int i = 0; i < tok->n_prefix + tok->n_suffix; i++) {
        int32_t id = i < tok->n_prefix ? tok->prefix[i] : tok->suffix[i - tok->n_prefix];
        json_object_set_new(specials, tok->text[id],
                            json_pack("{s:s, s:[i], s:[s]}", "id", tok->text[id], "ids", id, "tokens", tok->text[id]));
    }
    return json_pack("{s:s, s:o, s:o, s:o}", "type", "TemplateProcessing", "single", single, "pair", pair,
                     "special_tokens", specials);
}

static json_t *save_token_or_null(const mt_tokenizer *tok, int32_t id) {
    return id >= 0 && id < tok->n_ids && tok->text[id] ? save_str(tok->text[id], tok->text_len[id]) : json_null();
}

static mt_status save_json_file(json_t *root, const char *path, mt_error *err) {
    char *text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(root);
    if (!text) return mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory writing JSON", path);
    size_t n = strlen(text);
    char *buf = realloc(text, n + 2);
    if (buf) {
        buf[n++] = '\n';
        buf[n] = '\0';
        text = buf;
    }
    mt_status st = mt_write_file_atomic(path, text, n, err);
    free(text);
    return st;
}

mt_status mt_tokenizer_save_json(const mt_tokenizer *tok, const char *tokenizer_json_path,
                                 const char *tokenizer_config_path, mt_error *err) {
    json_t *pre = NULL;
    mt_status st = save_pre_tokenizer(tok, &pre, err);
    if (st) return st;
    json_t *added = json_array();
    for (size_t i = 0; i < tok->n_added; i++) {
        const added_token *a = &tok->added[i];
        json_array_append_new(added, json_pack("{s:i, s:o, s:b, s:b, s:b, s:b, s:b}", "id", a->id, "content",
                                               save_str(a->content, a->len), "single_word", a->single_word, "lstrip",
                                               a->lstrip, "rstrip", a->rstrip, "normalized", a->normalized, "special",
                                               a->special));
    }
    json_t *vocab = json_object();
    for (int32_t id = 0; id < tok->n_ids; id++) {
        if (!tok->text[id] || vocab_find(tok, tok->text[id], tok->text_len[id]) != id) continue; /* duplicates: first wins */
        if (memchr(tok->text[id], '\0', tok->text_len[id])) continue;
        json_object_set_new(vocab, tok->text[id], json_integer(id));
    }
    int32_t *pairs = NULL;
    size_t n_pairs = 0;
    if ((st = mt_tokenizer_merge_list(tok, &pairs, &n_pairs, err))) {
        json_decref(pre);
        json_decref(added);
        json_decref(vocab);
        return st;
    }
    json_t *merges = json_array();
    for (size_t i = 0; i < n_pairs; i++)
        json_array_append_new(merges, json_pack("[o, o]", save_str(tok->text[pairs[2 * i]], tok->text_len[pairs[2 * i]]),
                                                save_str(tok->text[pairs[2 * i + 1]], tok->text_len[pairs[2 * i + 1]])));
    free(pairs);
    json_t *model = json_pack("{s:s, s:n, s:o, s:n, s:n, s:b, s:b, s:b, s:o, s:o}", "type", "BPE", "dropout", "unk_token",
                              save_token_or_null(tok, tok->unk), "continuing_subword_prefix", "end_of_word_suffix",
                              "fuse_unk", tok->fuse_unk, "byte_fallback", tok->byte_fallback, "ignore_merges",
                              tok->ignore_merges, "vocab", vocab, "merges", merges);
    json_t *root = json_pack("{s:s, s:n, s:n, s:o, s:o, s:o, s:o, s:o, s:o}", "version", "1.0", "truncation", "padding",
                             "added_tokens", added, "normalizer", save_normalizer(tok), "pre_tokenizer", pre,
                             "post_processor", save_post_processor(tok), "decoder", save_decoder(tok), "model", model);
    if (!root) return mt_error_set(err, MT_ERR_NOMEM, "%s: cannot build tokenizer.json", tokenizer_json_path);
    if ((st = save_json_file(root, tokenizer_json_path, err))) return st;
    if (!tokenizer_config_path) return MT_OK;

    json_t *cfg = json_object();
    json_object_set_new(cfg, "add_bos_token", json_boolean(mt_tokenizer_adds_bos(tok)));
    json_object_set_new(cfg, "add_eos_token", json_boolean(mt_tokenizer_adds_eos(tok)));
    json_t *decoder = json_object();
    for (size_t i = 0; i < tok->n_added; i++) {
        const added_token *a = &tok->added[i];
        char key[16];
        snprintf(key, sizeof key, "%d", a->id);
        json_object_set_new(decoder, key, json_pack("{s:o, s:b, s:b, s:b, s:b, s:b}", "content", save_str(a->content, a->len),
                                                    "lstrip", a->lstrip, "normalized", a->normalized, "rstrip", a->rstrip,
                                                    "single_word", a->single_word, "special", a->special));
    }
    json_object_set_new(cfg, "added_tokens_decoder", decoder);
    json_object_set_new(cfg, "bos_token", save_token_or_null(tok, tok->bos));
    json_object_set_new(cfg, "eos_token", save_token_or_null(tok, tok->eos));
    json_object_set_new(cfg, "pad_token", save_token_or_null(tok, tok->pad));
    json_object_set_new(cfg, "unk_token", save_token_or_null(tok, tok->unk));
    if (tok->chat_template) json_object_set_new(cfg, "chat_template", json_string(tok->chat_template));
    json_object_set_new(cfg, "clean_up_tokenization_spaces", json_false());
    json_object_set_new(cfg, "model_max_length", json_integer(1000000000));
    json_object_set_new(cfg, "tokenizer_class", json_string("PreTrainedTokenizerFast"));
    return save_json_file(cfg, tokenizer_config_path, err);
}

const char *mt_tokenizer_source(const mt_tokenizer *tok) { return tok->source; }
