#!/usr/bin/env python3
"""Builds tests/fixtures/tiny_chat/: a tiny random LlamaForCausalLM with its own small
byte-level BPE tokenizer and a plain ChatML chat template, for running the shipped
recipes (recipes/*.lua) end to end in the test suite (tests/run/check_recipes.sh).

  hidden 48, 2 layers, 4 heads, 2 kv heads, intermediate 96, float32, tied embeddings;
  vocab = the tokenizer's (704: 3 special tokens, 256 bytes, BPE merges trained on
  data/quickstart/*.jsonl text). eos = <|im_end|>, bos = <|im_start|>.

Also writes tests/fixtures/data/tiny_chat_train.jsonl (48 records) and
tiny_chat_heldout.jsonl (12 records): the first records of data/quickstart.

Deterministic (fixed seeds). Needs: tokenizers, numpy, safetensors (no torch).
Run from anywhere:  python3 tests/parity/make_tiny_chat.py
"""
import json
import os

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "tiny_chat")
DATA = os.path.join(ROOT, "tests", "fixtures", "data")
QUICK = os.path.join(ROOT, "data", "quickstart")

# teknium/OpenHermes-2.5-Mistral-7B's chat template (as tests/parity/make_chat_reference.py)
CHATML_TEMPLATE = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 800
N_TRAIN, N_HELDOUT = 48, 12


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def corpus(records):
    for r in records:
        for m in r["messages"]:
            yield "<|im_start|>" + m["role"] + "\n" + m["content"] + "<|im_end|>\n"


def build_tokenizer(records):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                 use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(records), trainer=trainer)
    return tok


def main():
    train = read_jsonl(os.path.join(QUICK, "train.jsonl"))
    heldout = read_jsonl(os.path.join(QUICK, "heldout.jsonl"))
    os.makedirs(OUT, exist_ok=True)

    tok = build_tokenizer(train + heldout)
    tok.save(os.path.join(OUT, "tokenizer.json"))
    vocab = tok.get_vocab_size()
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    assert ids == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}, ids

    with open(os.path.join(OUT, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                   "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                   "add_bos_token": False, "model_max_length": 256,
                   "chat_template": CHATML_TEMPLATE,
                   "tokenizer_class": "GPT2Tokenizer"}, f, indent=2)

    hidden, layers, heads, kv, inter, hd = 48, 2, 4, 2, 96, 12
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
        "head_dim": hd, "hidden_act": "silu", "hidden_size": hidden,
        "initializer_range": 0.02, "intermediate_size": inter,
        "max_position_embeddings": 256, "num_attention_heads": heads,
        "num_hidden_layers": layers, "num_key_value_heads": kv, "pretraining_tp": 1,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
        "tie_word_embeddings": True, "torch_dtype": "float32", "use_cache": True,
        "vocab_size": vocab,
    }
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(OUT, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f, indent=2)

    rng = np.random.default_rng(20240611)

    def w(*shape, std=0.02):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    t = {"model.embed_tokens.weight": w(vocab, hidden),
         "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = np.ones(hidden, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
        t[p + "self_attn.q_proj.weight"] = w(heads * hd, hidden)
        t[p + "self_attn.k_proj.weight"] = w(kv * hd, hidden)
        t[p + "self_attn.v_proj.weight"] = w(kv * hd, hidden)
        t[p + "self_attn.o_proj.weight"] = w(hidden, heads * hd)
        t[p + "mlp.gate_proj.weight"] = w(inter, hidden)
        t[p + "mlp.up_proj.weight"] = w(inter, hidden)
        t[p + "mlp.down_proj.weight"] = w(hidden, inter)
    save_file(t, os.path.join(OUT, "model.safetensors"), metadata={"format": "pt"})

    write_jsonl(os.path.join(DATA, "tiny_chat_train.jsonl"), train[:N_TRAIN])
    write_jsonl(os.path.join(DATA, "tiny_chat_heldout.jsonl"), heldout[:N_HELDOUT])
    print(f"tiny_chat: vocab {vocab}, {sum(a.size for a in t.values())} parameters -> {OUT}")


if __name__ == "__main__":
    main()
