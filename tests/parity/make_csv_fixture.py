#!/usr/bin/env python3
"""Writes the CSV/TSV fixtures of tests/unit/test_dataset.c with Python's csv module (the
writer pandas and most tools follow), and the JSONL file with the same records, so the
test compares moontune's CSV reader against an independent writer.

  python3 tests/parity/make_csv_fixture.py   (writes tests/fixtures/data/mixed_fields.*)
"""
import csv
import json
import os

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "data")

# alpaca records with what CSV must quote: commas, quotes, line breaks (LF and CRLF),
# tabs, leading/trailing spaces, non-ASCII text and an empty input
ALPACA = [
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Split the list", "input": "a, b, c", "output": "a\nb\nc"},
    {"instruction": 'Quote "this"', "input": 'He said "hi", then left.', "output": '"hi"'},
    {"instruction": "Keep\r\nthe CRLF", "input": "\ttabbed\t", "output": "  spaced  "},
    {"instruction": "Übersetze ins Englische", "input": "Grüße, 世界", "output": "Greetings, world"},
    {"instruction": "Trailing comma,", "input": ",", "output": ",,"},
]

# conversations: messages written as JSON text in one column
CHAT = [
    {"messages": [{"role": "user", "content": "Hi, there"},
                  {"role": "assistant", "content": "Hello!\nHow can I help?"}]},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": 'Say "yes"'},
                  {"role": "assistant", "content": "yes"}]},
]


def write(name, rows, fields, delimiter, line_terminator, encode=None):
    path = os.path.join(OUT, name)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter, lineterminator=line_terminator)
        w.writerow(fields)
        for r in rows:
            w.writerow([encode(r[k]) if encode else r[k] for k in fields])
    print("wrote", path)


def main():
    fields = ["instruction", "input", "output"]
    write("mixed_fields.csv", ALPACA, fields, ",", "\r\n")  # csv's default: CRLF rows
    write("mixed_fields.tsv", ALPACA, fields, "\t", "\n")
    write("chat_messages.csv", CHAT, ["messages"], ",", "\n",
          encode=lambda v: json.dumps(v, ensure_ascii=False))
    with open(os.path.join(OUT, "mixed_fields.jsonl"), "w", encoding="utf-8") as f:
        for r in ALPACA:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(os.path.join(OUT, "chat_messages.jsonl"), "w", encoding="utf-8") as f:
        for r in CHAT:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
