"""Helpers the loss parity scripts on a PEFT LoRA share (make_dpo_reference.py,
make_grpo_reference.py): parameter names, errors, the reference LoRA on tiny_gqa, and
deterministic fixture files."""
import json
import struct

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM


def fmt(v):
    """0.1 -> '0.1', 0.0 -> '0', as in the case tables."""
    return "0" if v == 0 else repr(v)


def plain_name(peft_name):
    """base_model.model.X.lora_A.default.weight -> X.lora_A.weight"""
    name = peft_name.replace(".default.", ".")
    prefix = "base_model.model."
    assert name.startswith(prefix), peft_name
    return name[len(prefix):]


def rel(a, b):
    """max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def peft_model(model_dir, r, alpha, dtype, init):
    """model_dir's LlamaForCausalLM (eager attention) with an all-linear LoRA of rank r,
    whose lora_A / lora_B values are init[plain name] (every one of them); only they
    train."""
    base = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=dtype)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0,
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    model.eval()
    loaded = set()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(init[plain_name(n)].to(dtype))
                loaded.add(plain_name(n))
    assert loaded == set(init), sorted(set(init) ^ loaded)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    return model


def write_sorted_metadata(path):
    """Rewrite the file with its __metadata__ keys sorted and placed first.

    safetensors serialises the metadata from a hash map, so its order (and the file's
    bytes) would otherwise vary from run to run. The whole file is rewritten, with the
    header padded by spaces to a multiple of 8 bytes; tensor offsets are unchanged
    because they are relative to the end of the header.
    """
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = dict(sorted(header.pop("__metadata__", {}).items()))
    tensors = {k: header[k] for k in sorted(header)}
    text = json.dumps({"__metadata__": meta, **tensors}, separators=(",", ":"),
                      ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.write(data)
