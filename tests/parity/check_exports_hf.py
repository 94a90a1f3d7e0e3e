#!/usr/bin/env python3
"""check_exports_hf.py — the PEFT and merged exports of core/store/export_hf.c against
transformers and PEFT themselves. Run by hand (not part of ctest):

    cmake --build build && python3 tests/parity/check_exports_hf.py [--build build]

It runs the unit test build/test_export_hf with MT_EXPORT_KEEP=<tmpdir>, which leaves,
for tiny_gqa (llama, tied) and tiny_bias (qwen2, untied, biases), each with a LoRA
r=4 alpha=8 all-linear adapter with random non-zero A and B:
    <tmpdir>/<model>/merged/              config.json, model.safetensors, generation_config.json
    <tmpdir>/<model>/peft/                adapter_config.json, adapter_model.safetensors
    <tmpdir>/<model>/logits.safetensors   tokens (B,T) and moontune's adapted logits (B,T,V)
Then, for each model:
  (a) transformers AutoModelForCausalLM.from_pretrained(merged) on the tokens, and
  (b) the base fixture + peft.PeftModel.from_pretrained(base, peft)
must both give moontune's logits within 1e-4 (max |diff| / max |ref|), and (b) after
merge_and_unload() as well. The tokenizer.json files the test wrote (tok_smollm2 from the
fixture tokenizer, tok_gguf from the SmolLM2 GGUF when MOONTUNE_SMOLLM2_GGUF names it)
must encode tests/fixtures/tokenizer/corpus.txt as the fixture tokenizer.json does, with
the `tokenizers` library. Prints the numbers; exits 1 on a failure.
Needs torch, transformers, peft, tokenizers and safetensors.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TOL = 1e-4


def rel(a, ref):
    return ((a - ref).abs().max() / ref.abs().max()).item()


def logits_of(model, tokens):
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens.long()).logits.float()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default=os.path.join(ROOT, "build"), help="cmake build directory")
    ap.add_argument("--keep", default=None, help="directory for the exports (default: a temporary one)")
    args = ap.parse_args()
    out = args.keep or tempfile.mkdtemp(prefix="mt_export_hf_")
    env = dict(os.environ, MT_EXPORT_KEEP=out)
    test = os.path.join(args.build, "test_export_hf")
    r = subprocess.run([test], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout, r.stderr)
        sys.exit("test_export_hf failed")
    ok = True
    for name in ("tiny_gqa", "tiny_bias"):
        d = os.path.join(out, name)
        ref = load_file(os.path.join(d, "logits.safetensors"))
        tokens, mt_logits = ref["tokens"], ref["logits"]
        merged = AutoModelForCausalLM.from_pretrained(os.path.join(d, "merged"), dtype=torch.float32)
        e_merged = rel(logits_of(merged, tokens), mt_logits)
        base = AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, name), dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(base, os.path.join(d, "peft"))
        n_lora = sum(1 for n, _ in peft_model.named_parameters() if "lora_" in n)
        e_peft = rel(logits_of(peft_model, tokens), mt_logits)
        e_unload = rel(logits_of(peft_model.merge_and_unload(), tokens), mt_logits)
        for what, e in (("merged dir, transformers", e_merged), ("base + PEFT adapter", e_peft),
                        ("PEFT merge_and_unload", e_unload)):
            status = "ok" if e <= TOL else "FAIL"
            ok &= e <= TOL
            print(f"{name:10s} {what:26s} rel err {e:.3g}  {status}")
        print(f"{name:10s} PEFT loaded {n_lora} lora tensors")
    from tokenizers import Tokenizer
    ref_tok = Tokenizer.from_file(os.path.join(FIXTURES, "tokenizer", "smollm2", "tokenizer.json"))
    esc = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    lines = []
    with open(os.path.join(FIXTURES, "tokenizer", "corpus.txt"), encoding="utf-8") as f:
        for raw in f.read().split("\n")[:-1]:
            o, i = [], 0
            while i < len(raw):
                if raw[i] == "\\" and i + 1 < len(raw) and raw[i + 1] in esc:
                    o.append(esc[raw[i + 1]])
                    i += 2
                else:
                    o.append(raw[i])
                    i += 1
            lines.append("".join(o))
    for tag in ("tok_smollm2", "tok_gguf"):
        path = os.path.join(out, tag, "tokenizer.json")
        if not os.path.exists(path):
            print(f"{tag:11s} absent (no GGUF given): skipped")
            continue
        t = Tokenizer.from_file(path)
        bad = sum(ref_tok.encode(x).ids != t.encode(x).ids for x in lines)
        ok &= bad == 0
        print(f"{tag:11s} tokenizer.json: {len(lines)} corpus lines, {bad} encode differently"
              f"  {'ok' if bad == 0 else 'FAIL'}")
    print("exports kept in", out)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
