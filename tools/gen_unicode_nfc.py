#!/usr/bin/env python3
"""Generates the Unicode NFC tables of core/text/unicode_nfc.c from Python's unicodedata.

Rewrites the region between the "BEGIN GENERATED TABLES" and "END GENERATED TABLES"
lines of core/text/unicode_nfc.c (or, with --check, exits 1 when that region is stale).
Every table is derived from unicodedata alone:

  canonical combining classes  unicodedata.combining, as ranges of equal class;
  full canonical decompositions unicodedata.normalize('NFD', c) for each c that NFD
                                changes (Hangul syllables are left to the algorithm);
  primary composites           c whose canonical decomposition is two code points and
                                that NFC leaves alone (so the composition exclusions,
                                singletons and non-starter decompositions drop out).

The Unicode version is unicodedata.unidata_version; it is written into the file.
The `tokenizers` library (0.23) normalizes with the Rust crate
unicode-normalization-alignments 0.1.12, whose tables are Unicode 9.0; no Python
in reach has 9.0 (3.6 had it), so the tables are generated with the oldest one that
is, Python 3.10 (Unicode 13.0):

  /root/.pyenv/versions/3.10.13/bin/python3 tools/gen_unicode_nfc.py
"""
import argparse
import os
import sys
import unicodedata

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = os.path.join(HERE, "..", "core", "unicode_nfc.c")
BEGIN = "/* ---- BEGIN GENERATED TABLES (tools/gen_unicode_nfc.py) ---- */"
END = "/* ---- END GENERATED TABLES ---- */"

SBASE, SCOUNT = 0xAC00, 11172


def code_points():
    for c in range(0x110000):
        if 0xD800 <= c < 0xE000:
            continue
        yield c


def utf8_len(c):
    return 1 if c < 0x80 else 2 if c < 0x800 else 3 if c < 0x10000 else 4


def build():
    ccc_ranges = []  # [first, last, class]
    decomp = []  # (cp, [cps])
    comp = []  # (first, second, composite)
    for c in code_points():
        ch = chr(c)
        k = unicodedata.combining(ch)
        if k:
            if ccc_ranges and ccc_ranges[-1][1] == c - 1 and ccc_ranges[-1][2] == k and c - ccc_ranges[-1][0] < 2048:
                ccc_ranges[-1][1] = c
            else:
                ccc_ranges.append([c, c, k])
        if SBASE <= c < SBASE + SCOUNT:
            continue
        d = unicodedata.normalize("NFD", ch)
        if d != ch:
            cps = [ord(x) for x in d]
            assert 1 <= len(cps) <= 4, hex(c)
            # bounds the C code relies on: at most 2 code points and 3x the bytes
            assert len(cps) <= 2 * utf8_len(c) and sum(map(utf8_len, cps)) <= 3 * utf8_len(c), hex(c)
            decomp.append((c, cps))
        raw = unicodedata.decomposition(ch)
        if raw and not raw.startswith("<"):
            parts = [int(x, 16) for x in raw.split()]
            if len(parts) == 2 and unicodedata.normalize("NFC", ch) == ch:
                a, b = parts
                assert unicodedata.combining(chr(a)) == 0 and unicodedata.combining(ch) == 0, hex(c)
                assert unicodedata.normalize("NFC", chr(a) + chr(b)) == ch, hex(c)
                assert utf8_len(c) <= utf8_len(a) + utf8_len(b), hex(c)
                comp.append((a, b, c))
    comp.sort()
    # the smallest code point that NFC changes, that is a non-starter or that composes
    # onto what precedes it: text below it is its own NFC form
    touched = [r[0] for r in ccc_ranges] + [b for _, b, _ in comp] + [0x1161, 0x11A8]
    touched += [c for c, _ in decomp if unicodedata.normalize("NFC", chr(c)) != chr(c)]
    first_touched = min(touched)
    assert first_touched >= 0x300, hex(first_touched)
    return ccc_ranges, decomp, comp, first_touched


def rows(items, per_line, indent="    "):
    out = []
    for i in range(0, len(items), per_line):
        out.append(indent + ", ".join(items[i:i + per_line]) + ",")
    return "\n".join(out)


def render():
    ccc_ranges, decomp, comp, first_touched = build()
    pool = []
    keys, offs = [], []
    for c, cps in decomp:
        keys.append("0x%X" % (c | (len(cps) << 21)))
        offs.append("%d" % len(pool))
        pool.extend(cps)
    assert len(pool) < 65536
    ver = unicodedata.unidata_version
    py = "%d.%d.%d" % sys.version_info[:3]
    nbytes = len(ccc_ranges) * 5 + len(decomp) * 6 + len(pool) * 4 + len(comp) * 8
    s = []
    s.append(BEGIN)
    s.append("/* Unicode %s (Python %s unicodedata). %d combining-class ranges, %d canonical\n"
             " * decompositions (%d code points), %d primary composites: %d bytes. */"
             % (ver, py, len(ccc_ranges), len(decomp), len(pool), len(comp), nbytes))
    s.append('#define NFC_UNICODE_VERSION "%s"' % ver)
    s.append("/* below this code point text is its own NFC form */")
    s.append("#define NFC_FIRST_TOUCHED 0x%X" % first_touched)
    s.append("")
    s.append("/* nonzero canonical combining classes: first | (count - 1) << 21, ascending */")
    s.append("static const uint32_t nfc_ccc_range[%d] = {" % len(ccc_ranges))
    s.append(rows(["0x%X" % (a | ((b - a) << 21)) for a, b, _ in ccc_ranges], 8))
    s.append("};")
    s.append("static const uint8_t nfc_ccc_class[%d] = {" % len(ccc_ranges))
    s.append(rows(["%d" % k for _, _, k in ccc_ranges], 16))
    s.append("};")
    s.append("")
    s.append("/* full canonical decompositions (Hangul excluded): cp | length << 21, ascending;\n"
             " * the code points start at nfc_decomp_pool[nfc_decomp_off[i]] */")
    s.append("static const uint32_t nfc_decomp_key[%d] = {" % len(keys))
    s.append(rows(keys, 8))
    s.append("};")
    s.append("static const uint16_t nfc_decomp_off[%d] = {" % len(offs))
    s.append(rows(offs, 12))
    s.append("};")
    s.append("static const uint32_t nfc_decomp_pool[%d] = {" % len(pool))
    s.append(rows(["0x%X" % c for c in pool], 10))
    s.append("};")
    s.append("")
    s.append("/* primary composites: first << 42 | second << 21 | composite, ascending */")
    s.append("static const uint64_t nfc_comp[%d] = {" % len(comp))
    s.append(rows(["0x%XULL" % ((a << 42) | (b << 21) | c) for a, b, c in comp], 4))
    s.append("};")
    s.append(END)
    return "\n".join(s), (ver, len(ccc_ranges), len(decomp), len(pool), len(comp), nbytes)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="exit 1 when core/text/unicode_nfc.c is stale")
    args = ap.parse_args()
    with open(TARGET, encoding="utf-8") as f:
        text = f.read()
    i, j = text.index(BEGIN), text.index(END) + len(END)
    region, stats = render()
    new = text[:i] + region + text[j:]
    if args.check:
        if new != text:
            print("core/text/unicode_nfc.c: generated tables are stale (or from another Unicode version)")
            sys.exit(1)
        return
    with open(TARGET, "w", encoding="utf-8") as f:
        f.write(new)
    print("Unicode %s: %d ccc ranges, %d decompositions (%d cps), %d composites, %d bytes" % stats)


if __name__ == "__main__":
    main()
