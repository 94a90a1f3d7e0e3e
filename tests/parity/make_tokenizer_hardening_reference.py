"""Fixtures for reading Split patterns as `tokenizers` does, where Oniguruma (its regex
engine) and PCRE2 (moontune's) read the same pattern differently
(tests/fixtures/tokenizer/dialect/):

- pieces.json: a byte-level BPE tokenizer whose vocabulary holds every substring of the
  texts below and which sets ignore_merges, so each pre-tokenizer piece becomes exactly
  one token: the ids spell out where the Split pattern cut the text. The test swaps
  each pattern into its Split pre-tokenizer.
- regex_expected.json: per pattern ("pattern" a Regex, "string" a String), the ids `tokenizers` gives each text, or, for
  patterns `tokenizers` accepts but moontune refuses (Oniguruma constructs PCRE2 cannot
  express), the expected error.

    pip install tokenizers && python3 tests/parity/make_tokenizer_hardening_reference.py
"""
import json
import os

import tokenizers
from tokenizers import Tokenizer

here = os.path.dirname(os.path.abspath(__file__))
out = os.path.join(here, "..", "fixtures", "tokenizer", "dialect")

TEXTS = ["1234567", "a.*b,c", "x，y", "12345678 and 9", "x²³ ½ ٣٤٥", "Hi  you\n\nfoo", "a\u00a0b c", "É\u0301e İst",
         "don't I'LL", "K k", "l1\nl2\r\nx", "t\tb \u000b\u000c", "🙂👍🏽 ok", "中文，测。ok", "0xDEADbe g",
         "a_b-c__d", "\u200bz", "p\u2028q", "…!? ?!", "", "Ⅻ ⑴ ⓐ", "a/b//c", "  x", "A\nB\n", "abcABC", "QVaE", "aab"]

SPLIT = {
    # real-world tiktoken-style patterns (Llama 3 with {1,3}+, cl100k, o200k), BLOOM, DeepSeek
    "llama3_interval_plus": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "cl100k_possessive": r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "o200k": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "bloom_nested_class": " ?[^(\\s|[.,!?…。，、।۔،])]+",
    "deepseek": r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    # Oniguruma's \w \b \B (Alphabetic, marks, Nd, Pc; outside a class also ² ³ ¹ ¼ ½ ¾)
    "word": r"\w+|[^\w\s]+", "word_in_class": r"[\w]+", "not_word_class": r"[^\w]+", "word_boundary": r"\b\w",
    "not_boundary": r"\B.", "not_word": r"\W+",
    # ^ $ are line anchors; the option m is dot-matches-newline; an isolated option reaches across |
    "anchors": r"^\s+|\s+$", "line_start": r"^.", "line_end": r".$", "option_m": r"(?m).+",
    "option_groups": r"(?i:a)(?m:.)", "isolated_option": r"a(?i)b|c", "isolated_option2": r"x(?i)l|E",
    # escapes: \h hex digit, \v VT, \uHHHH, letters that are no escape
    "hex": r"\h+", "hex_class": r"[\h]+", "not_hex": r"\H+", "vtab": r"\v", "u_escape": r"\u0041|\u00e9",
    "plain_letters": r"\V|\Q|\E|[\U\l]",
    # intervals: {n}? is an optional group, {n,m}+ a repeated group, {,m} is {0,m}
    "fixed_optional": r"a{2}?", "fixed_optional2": r"\p{N}{2}?\p{N}", "fixed_plus": r"\p{N}{3}+", "low_abbrev": r"x{,2}",
    # POSIX brackets
    "posix_alpha": "[[:alpha:]]+", "posix_punct": "[[:punct:]]+", "posix_word": "[[:word:]]+",
    "posix_alnum": "[[:alnum:]]+", "posix_upper": "[[:upper:]]+", "posix_lower": "[[:lower:]]+",
    "posix_not_alpha": "[[:^alpha:]]+", "posix_space": "[[:space:]]+",
    # a class nested in a class is a union
    "nested_union": "[[a-c][x-z]]+", "nested_negated_outer": "[^[a-c]]+",
}
STRING = {  # {"String": ...} patterns: literal text, regex characters included
    "string_comma": ",", "string_regex_chars": ".*", "string_space": " ", "string_multibyte": "，",
}
REFUSED = {  # accepted by tokenizers, refused by moontune rather than matched differently
    "intersection": ("[a-z&&[^aeiou]]+", "class intersection (&&)"),
    "nested_negated": ("[a[^b]]+", "a negated class nested in a class"),
    "not_word_in_class": (r"[\W]+", r"\W inside a character class"),
    "posix_not_word": ("[[:^word:]]+", "this POSIX bracket"),
    "control_escape": (r"\C-a", r"a \C-x or \M-x escape"),
}


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


B2U = bytes_to_unicode()
vocab = {}
for b in range(256):
    vocab.setdefault(B2U[b], len(vocab))
for t in TEXTS:
    s = "".join(B2U[b] for b in t.encode("utf-8"))
    for i in range(len(s)):
        for j in range(i + 2, len(s) + 1):
            vocab.setdefault(s[i:j], len(vocab))


def tokenizer_json(pattern, kind="Regex"):
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {kind: pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": vocab, "merges": []}}


base = tokenizer_json("PATTERN")
with open(os.path.join(out, "pieces.json"), "w", encoding="utf-8") as f:
    json.dump(base, f, ensure_ascii=False, separators=(",", ":"))

tmp = os.path.join(out, ".probe.json")
expected = {"tokenizers": tokenizers.__version__, "texts": TEXTS, "patterns": []}
for name, pattern in SPLIT.items():
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(tokenizer_json(pattern), f, ensure_ascii=False)
    tok = Tokenizer.from_file(tmp)
    ids = [tok.encode(t, add_special_tokens=False).ids for t in TEXTS]
    pieces = [[tok.decode([i]) for i in row] for row in ids]
    expected["patterns"].append({"name": name, "pattern": pattern, "ids": ids, "pieces": pieces})
for name, pattern in STRING.items():
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(tokenizer_json(pattern, "String"), f, ensure_ascii=False)
    tok = Tokenizer.from_file(tmp)
    ids = [tok.encode(t, add_special_tokens=False).ids for t in TEXTS]
    pieces = [[tok.decode([i]) for i in row] for row in ids]
    expected["patterns"].append({"name": name, "string": pattern, "ids": ids, "pieces": pieces})
for name, (pattern, error) in REFUSED.items():
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(tokenizer_json(pattern), f, ensure_ascii=False)
    Tokenizer.from_file(tmp)  # tokenizers accepts it
    expected["patterns"].append({"name": name, "pattern": pattern, "error": error})
os.remove(tmp)
with open(os.path.join(out, "regex_expected.json"), "w", encoding="utf-8") as f:
    json.dump(expected, f, ensure_ascii=False, indent=0)
print("wrote", out, len(vocab), "vocabulary entries")
