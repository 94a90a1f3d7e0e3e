#!/usr/bin/env python3
"""PEFT-made LoRA adapter directories, for loading them with mt_peft_attach (core/store/peft.c).

    pip install torch transformers safetensors peft    # CPU is enough
    python3 tests/parity/make_peft_fixture.py

On tests/fixtures/tiny_gqa (float32, eager attention), with A and B set to fixed
random non-zero values (seeded) and saved by PEFT's own model.save_pretrained:

tests/fixtures/peft_adapter/
    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
    lora_dropout=0.0): adapter_config.json + adapter_model.safetensors as PEFT writes
    them ("base_model.model.<module>.lora_A.weight" (r,in), ".lora_B.weight" (out,r)).
tests/fixtures/peft_adapter_rslora/
    LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True).
tests/fixtures/peft_adapter_reference.safetensors
    tokens (the batch of tiny_gqa/reference.safetensors), logits (the first adapter's
    logits, PEFT's) and logits_rslora (the second's).

adapter_config.json is PEFT's, with base_model_name_or_path rewritten to null (no path
of this machine in the fixture) and a target_modules list sorted (PEFT keeps a set, whose
order varies from run to run); the README.md model card PEFT writes is removed.
"""
import json
import math
import os

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import peft
from peft import LoraConfig, get_peft_model

from make_lora_reference import canonicalise_metadata_order

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "tests", "fixtures")
MODEL = os.path.join(FIX, "tiny_gqa")


def adapter(cfg, seed, out_dir, tokens):
    base = LlamaForCausalLM.from_pretrained(MODEL, attn_implementation="eager",
                                            dtype=torch.float32)
    model = get_peft_model(base, cfg)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                bound = 1.0 / math.sqrt(p.shape[1])
                p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound)
            elif "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        logits = model(input_ids=tokens).logits.float().contiguous()
    model.save_pretrained(out_dir)
    path = os.path.join(out_dir, "adapter_config.json")
    with open(path) as f:
        conf = json.load(f)
    conf["base_model_name_or_path"] = None
    if isinstance(conf["target_modules"], list):  # a set in PEFT: its order varies by run
        conf["target_modules"] = sorted(conf["target_modules"])
    with open(path, "w") as f:
        json.dump(conf, f, indent=2, sort_keys=True)
        f.write("\n")
    os.remove(os.path.join(out_dir, "README.md"))  # PEFT's model card boilerplate
    # a reload through PEFT gives the same logits (the directory is what PEFT reads)
    base2 = LlamaForCausalLM.from_pretrained(MODEL, attn_implementation="eager",
                                             dtype=torch.float32)
    again = peft.PeftModel.from_pretrained(base2, out_dir).eval()
    with torch.no_grad():
        d = (again(input_ids=tokens).logits - logits).abs().max().item()
    print(f"{out_dir}: reloaded with PeftModel.from_pretrained, max|d| {d:.3e}")
    assert d == 0.0
    return logits


def main():
    ref = load_file(os.path.join(MODEL, "reference.safetensors"))
    tokens = ref["tokens"].long()
    logits = adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                lora_dropout=0.0, task_type="CAUSAL_LM"),
                     1111, os.path.join(FIX, "peft_adapter"), tokens)
    logits_rs = adapter(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                   use_rslora=True, lora_dropout=0.0, task_type="CAUSAL_LM"),
                        2222, os.path.join(FIX, "peft_adapter_rslora"), tokens)
    out = os.path.join(FIX, "peft_adapter_reference.safetensors")
    save_file({"tokens": ref["tokens"], "logits": logits, "logits_rslora": logits_rs}, out,
              metadata={"generator": "tests/parity/make_peft_fixture.py",
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "peft": peft.__version__})
    canonicalise_metadata_order(out)  # byte-identical when run again
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
