#!/usr/bin/env python3
"""check_quickstart.py — the main job's exports, read by the reference libraries.
Run by hand after scripts/main-job (not part of ctest):

    python3 tests/parity/check_quickstart.py [--run runs/quickstart] [--base BASE.gguf] [-n 40]

With the base model (the default SmolLM2 GGUF: scripts/fetch-model prints its path),
it checks, on the first n held-out requests of data/quickstart/heldout.jsonl rendered
with the exported tokenizer's chat template (transformers' apply_chat_template):
  (a) transformers loads <run>/merged and PEFT loads <run>/adapter onto the base
      (transformers dequantizes the GGUF to fp32): their logits agree within 1e-4
      (max |diff| / max |ref|);
  (b) gguf-py reads <run>/model.gguf: architecture, tensor count, tokenizer and chat
      template present; transformers loads it (F16 -> fp32) and its logits agree with
      the merged model's within 2e-2 (F16 weights);
  (c) transformers' greedy answers with the merged model score the exact-match
      accuracy the recipe reported for the same requests (<run>/summary.json holds the
      accuracy over all held-out requests; with -n 120 the two must agree to a request:
      |diff| <= 1/120, as near-tied logits may round differently).
Needs torch, transformers, peft and gguf. Prints the numbers; exits 1 on a failure.
"""
import argparse
import json
import os
import subprocess
import sys

import torch
from gguf import GGUFReader
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rel(a, ref):
    return ((a - ref).abs().max() / ref.abs().max()).item()


def logits_of(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def from_gguf(path):
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=os.path.join(ROOT, "runs", "quickstart"))
    ap.add_argument("--base", default=None, help="the base model GGUF (default: scripts/fetch-model)")
    ap.add_argument("-n", type=int, default=40, help="held-out requests to check")
    args = ap.parse_args()
    base_path = args.base or subprocess.run([os.path.join(ROOT, "scripts", "fetch-model")], check=True,
                                            capture_output=True, text=True).stdout.strip().splitlines()[-1]
    with open(os.path.join(ROOT, "data", "quickstart", "heldout.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f][: args.n]
    summary = json.load(open(os.path.join(args.run, "summary.json")))
    tok = AutoTokenizer.from_pretrained(os.path.join(args.run, "merged"))
    prompts = [tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
               for r in records]
    failed = []

    merged = AutoModelForCausalLM.from_pretrained(os.path.join(args.run, "merged"), dtype=torch.float32)
    base = from_gguf(base_path)
    peft = PeftModel.from_pretrained(base, os.path.join(args.run, "adapter"))
    ids = tok(prompts[0], return_tensors="pt", add_special_tokens=False).input_ids
    ref = logits_of(merged, ids)
    e_peft = rel(logits_of(peft, ids), ref)
    print(f"(a) PEFT adapter on the base vs merged export: rel {e_peft:.2e} over {ids.shape[1]} positions")
    if e_peft > 1e-4:
        failed.append("peft vs merged")
    del peft, base

    reader = GGUFReader(os.path.join(args.run, "model.gguf"))
    keys = {f.name for f in reader.fields.values()}
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    print(f"(b) model.gguf: architecture {arch}, {len(reader.tensors)} tensors, "
          f"chat template {'present' if 'tokenizer.chat_template' in keys else 'MISSING'}, "
          f"{len(reader.fields['tokenizer.ggml.tokens'].data)} tokens")
    if "tokenizer.chat_template" not in keys or arch != "llama":
        failed.append("gguf metadata")
    gg = from_gguf(os.path.join(args.run, "model.gguf"))
    e_gguf = rel(logits_of(gg, ids), ref)
    print(f"    transformers on model.gguf vs merged export: rel {e_gguf:.2e}")
    if e_gguf > 2e-2:
        failed.append("gguf vs merged")
    del gg

    correct = 0
    for r, p in zip(records, prompts):
        ids = tok(p, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = merged.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.eos_token_id)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        correct += text == r["messages"][-1]["content"].strip()
    acc = correct / len(records)
    print(f"(c) transformers greedy on the merged export: {correct}/{len(records)} exact "
          f"({100 * acc:.1f}%); the recipe reported {100 * summary['after']['accuracy']:.1f}% over all "
          f"held-out requests")
    if len(records) == 120 and abs(acc - summary["after"]["accuracy"]) > 1 / 120 + 1e-9:
        failed.append("accuracy")
    if failed:
        sys.exit("FAILED: " + ", ".join(failed))
    print("quickstart exports: all checks passed")


if __name__ == "__main__":
    main()
