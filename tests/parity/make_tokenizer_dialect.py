"""Fixtures for two places where moontune must read tokenizer.json as `tokenizers`
does (tests/fixtures/tokenizer/dialect/):

- single_word.json: the llama3 fixture with added tokens marked single_word, encoded
  next to non-ASCII neighbours (word characters are Unicode \\w, not every byte >= 0x80);
- onig.json: the llama3 fixture with an Oniguruma-dialect split pattern, where
  \\p{N}{1,3}+ is an interval then a repeat (PCRE2 would read it as possessive) and
  {,2} means {0,2}.

expected.json holds, per fixture, the texts and the ids `tokenizers` gives them.
    pip install tokenizers && python3 tests/parity/make_tokenizer_dialect.py
"""
import json
import os

import tokenizers
from tokenizers import Tokenizer

here = os.path.dirname(os.path.abspath(__file__))
src = os.path.join(here, "..", "fixtures", "tokenizer", "llama3", "tokenizer.json")
out = os.path.join(here, "..", "fixtures", "tokenizer", "dialect")
os.makedirs(out, exist_ok=True)
base = json.load(open(src, encoding="utf-8"))

single = json.loads(json.dumps(base))
next_id = max(max(single["model"]["vocab"].values()), max(a["id"] for a in single["added_tokens"])) + 1
for i, content in enumerate(["[W]", "wörd"]):
    single["added_tokens"].append({"id": next_id + i, "content": content, "single_word": True, "lstrip": False,
                                   "rstrip": False, "normalized": False, "special": False})
neighbours = ["½", "\u3000", "\u00a0", "\u200b", "😀", "é", "\u0301", "٣", "_", "x", "1", "Ⅳ", "Ⓐ", "²", "-", "。", "中"]
single_texts = []
for c in neighbours:
    single_texts += [c + "[W]", "[W]" + c, c + "[W]" + c, "a " + c + "[W] b", c + "wörd", "wörd" + c]

onig = json.loads(json.dumps(base))
split = onig["pre_tokenizer"]["pretokenizers"][0]
split["pattern"]["Regex"] = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}+|x{,2}"
                             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
onig_texts = ["1234567", "12345678 and 9", "pi is 3.14159265358979", "year 2024, 10000000 items",
              "xxxxx", "x1x22x333", "٣٤٥٦٧", "a1b22c333d4444"]

expected = {"tokenizers": tokenizers.__version__, "fixtures": []}
for name, tj, texts in [("single_word.json", single, single_texts), ("onig.json", onig, onig_texts)]:
    path = os.path.join(out, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False)
    tok = Tokenizer.from_file(path)
    expected["fixtures"].append({"file": name, "samples": [
        {"text": t, "ids": tok.encode(t, add_special_tokens=False).ids} for t in texts]})
with open(os.path.join(out, "expected.json"), "w", encoding="utf-8") as f:
    json.dump(expected, f, ensure_ascii=False, indent=1)
print("wrote", out)
