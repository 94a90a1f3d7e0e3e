#!/usr/bin/env python3
"""Greedy-generation reference for tests/unit/test_generate.c.

transformers loads the SmolLM2-135M-Instruct Q4_1 GGUF (dequantized to fp32), renders
three fixed conversations with the tokenizer's chat template (add_generation_prompt=True)
and greedy-decodes 40 new tokens for each (do_sample=False; an EOS does not end the
run, so that every prompt gives 40 tokens to compare; checked against generate() up to
its first EOS). Written to tests/fixtures/generate/reference.json:
per prompt the messages, the rendered text, the prompt ids, the generated ids and text,
and the top-5 ids and values of the logits at the last prompt position (the first step).

    pip install torch transformers gguf
    python3 tests/parity/make_generate_reference.py [PATH.gguf]

The GGUF path defaults to $MOONTUNE_SMOLLM2_GGUF, else
~/.cache/moontune/SmolLM2-135M-Instruct.Q4_1.gguf. Nothing is downloaded.
"""
import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

NEW_TOKENS = 40
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "List three prime numbers and explain why they are prime."}],
]


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get(
        "MOONTUNE_SMOLLM2_GGUF",
        os.path.expanduser("~/.cache/moontune/SmolLM2-135M-Instruct.Q4_1.gguf"))
    directory, name = os.path.split(os.path.abspath(path))
    torch.manual_seed(0)
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                 dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    out = {"model": name, "new_tokens": NEW_TOKENS,
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
           "prompts": []}
    for messages in PROMPTS:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x).logits[0, -1].float()
            top = torch.topk(logits, 5)
            # greedy (do_sample=False) with EOS not stopping the run, so that every prompt
            # compares NEW_TOKENS tokens; a full forward per step, no cache involved
            seq = list(ids)
            for _ in range(NEW_TOKENS):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            # the same through generate() and its KV cache, up to its first EOS
            gen = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, pad_token_id=tok.eos_token_id)
        new = seq[len(ids):]
        cached = gen[0, len(ids):].tolist()
        assert new[:len(cached)] == cached, (new, cached)
        assert len(new) == NEW_TOKENS, len(new)
        out["prompts"].append({
            "messages": messages,
            "text": text,
            "prompt_ids": ids,
            "generated_ids": new,
            "generated_text": tok.decode(new, skip_special_tokens=False),
            "eos_id": tok.eos_token_id,
            "top5_ids": top.indices.tolist(),
            "top5_logits": [float(v) for v in top.values],
        })
        print(repr(out["prompts"][-1]["generated_text"]))
    dst = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "generate",
                       "reference.json")
    with open(dst, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print("wrote", os.path.normpath(dst))


if __name__ == "__main__":
    main()
