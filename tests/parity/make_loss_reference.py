#!/usr/bin/env python3
"""Reference for the cross_entropy loss plugin's label smoothing and z-loss.

Loads tests/fixtures/tiny_gqa with transformers, runs the batch of its
reference.safetensors, and computes in float32

    loss = F.cross_entropy(logits, targets, ignore_index=-100, label_smoothing=eps)
         + z * mean over unmasked rows of logsumexp(logits)^2

then writes the loss and the gradient of every parameter to
tests/fixtures/loss/reference.safetensors (names grad.<parameter>).

    python3 tests/parity/make_loss_reference.py
"""
import os

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODEL = os.path.join(ROOT, "tests", "fixtures", "tiny_gqa")
OUT = os.path.join(ROOT, "tests", "fixtures", "loss", "reference.safetensors")
EPS, Z = 0.1, 1e-3


def main():
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(MODEL, attn_implementation="eager",
                                             dtype=torch.float32)
    ref = load_file(os.path.join(MODEL, "reference.safetensors"))
    tokens, targets = ref["tokens"].long(), ref["targets"].long()
    logits = model(input_ids=tokens).logits
    V = logits.shape[-1]
    flat, tgt = logits.reshape(-1, V), targets.reshape(-1)
    ce = F.cross_entropy(flat, tgt, ignore_index=-100, label_smoothing=EPS)
    mask = tgt != -100
    z = Z * (torch.logsumexp(flat[mask], dim=-1) ** 2).mean()
    loss = ce + z
    loss.backward()
    out = {"loss": loss.detach().reshape(1).float(), "tokens": ref["tokens"],
           "targets": ref["targets"]}
    for name, p in model.named_parameters():
        out["grad." + name] = p.grad.detach().float().contiguous()
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(out, OUT, metadata={"generator": "tests/parity/make_loss_reference.py",
                                  "label_smoothing": str(EPS), "z_loss": str(Z),
                                  "torch": torch.__version__,
                                  "transformers": transformers.__version__})
    print(f"loss {loss.item():.9g} (cross-entropy {ce.item():.9g}, z term {z.item():.9g})")


if __name__ == "__main__":
    main()
