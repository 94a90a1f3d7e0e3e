#!/usr/bin/env python3
"""check_export_gguf.py — reads the GGUF files moontune's exporter wrote with third-party
readers (gguf-py and transformers) and checks them against the Hugging Face sources.

Run by hand (needs: pip install gguf numpy safetensors torch transformers):

    MT_EXPORT_KEEP=/tmp/gexp MOONTUNE_SMOLLM2_GGUF=... build/test_export_gguf
    python3 tests/parity/check_export_gguf.py /tmp/gexp

For tiny_gqa and tiny_bias (F32 and F16 exports):
  * metadata keys and values against the fixture's config.json;
  * tensor names, shapes (ne order) and types (2-D weights F32/F16, norms/biases F32);
  * every tensor's data against model.safetensors, after undoing llama's q/k row
    permutation the way gguf-py/transformers do (exact for F32; for F16 equal to the
    source rounded to float16);
  * transformers.AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) logits over
    ids 3 9 27 81 50 2 against the C logits the test kept (<name>.logits.f32), within
    1e-4 (F32 file). tiny_gqa is exported with default rope (the test resets its
    Llama 3.1 rope, which GGUF carries as rope_freqs.weight that transformers ignores).
For smollm2_f16.gguf when present: tokenizer metadata, and transformers' tokenizer
built from the GGUF encodes a few strings as the fixture tokenizer.json does.
"""
import json
import os
import sys

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")
IDS = [3, 9, 27, 81, 50, 2]
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("  FAIL:", what)


def field(r, key):
    f = r.fields.get(key)
    if f is None:
        return None
    return f.contents()


def hf_name(gname):
    if gname == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gname == "output_norm.weight":
        return "model.norm.weight"
    if gname == "output.weight":
        return "lm_head.weight"
    _, layer, rest = gname.split(".", 2)
    mod, kind = rest.rsplit(".", 1)
    m = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
         "ffn_norm": "post_attention_layernorm"}[mod]
    return f"model.layers.{layer}.{m}.{kind}"


def unpermute(w, n_head):
    # gguf-py / transformers: HF = gguf.reshape(n_head, 2, D/2, ...) inverse of the converter's
    # hf.reshape(n_head, 2, D/2, in).swapaxes(1, 2)
    shape = w.shape
    return (w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:])
            .swapaxes(1, 2).reshape(shape))


def check_tiny(keep, fixture, arch, dtype):
    path = os.path.join(keep, f"{fixture}_{dtype}.gguf")
    print(f"{fixture} {dtype}: {path}")
    cfg = json.load(open(os.path.join(FIX, fixture, "config.json")))
    r = GGUFReader(path)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    want = {
        "general.architecture": arch,
        "general.name": fixture,
        "general.file_type": 1 if dtype == "f16" else 0,
        "general.alignment": 32,
        f"{arch}.context_length": cfg["max_position_embeddings"],
        f"{arch}.embedding_length": cfg["hidden_size"],
        f"{arch}.block_count": cfg["num_hidden_layers"],
        f"{arch}.feed_forward_length": cfg["intermediate_size"],
        f"{arch}.attention.head_count": cfg["num_attention_heads"],
        f"{arch}.attention.head_count_kv": cfg["num_key_value_heads"],
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
        f"{arch}.rope.dimension_count": head_dim,
        f"{arch}.vocab_size": cfg["vocab_size"],
    }
    for k, v in want.items():
        check(field(r, k) == v, f"{path}: {k} = {field(r, k)!r}, expected {v!r}")
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    check(abs(field(r, f"{arch}.rope.freq_base") - theta) <= 1e-7 * theta, "rope.freq_base")
    check(abs(field(r, f"{arch}.attention.layer_norm_rms_epsilon") - cfg["rms_norm_eps"]) < 1e-12,
          "layer_norm_rms_epsilon")
    check(field(r, "tokenizer.ggml.model") is None, "no tokenizer keys expected")

    src = load_file(os.path.join(FIX, fixture, "model.safetensors"))
    names = set()
    for t in r.tensors:
        names.add(t.name)
        hn = hf_name(t.name)
        ref = src[hn]
        check([int(x) for x in t.shape] == list(reversed(ref.shape)),
              f"{t.name}: ne {list(t.shape)} vs HF shape {list(ref.shape)}")
        want_type = GGMLQuantizationType.F16 if (dtype == "f16" and ref.ndim == 2) else GGMLQuantizationType.F32
        check(t.tensor_type == want_type, f"{t.name}: type {t.tensor_type.name}, expected {want_type.name}")
        check(t.data_offset % 32 == 0, f"{t.name}: data at {t.data_offset}, not 32-aligned")
        data = np.array(t.data).reshape(ref.shape)
        if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            nh = cfg["num_attention_heads"] if ".attn_q." in t.name else cfg["num_key_value_heads"]
            data = unpermute(data, nh)
        expect = ref.astype(np.float16) if want_type == GGMLQuantizationType.F16 else ref
        check(np.array_equal(data, expect), f"{t.name}: data differs from {hn}")
    expected_names = {n for n in (
        {"token_embd.weight", "output_norm.weight"} |
        {x for x in names if x.startswith("blk.")})}
    if not cfg["tie_word_embeddings"]:
        expected_names.add("output.weight")
    check(names == expected_names, f"tensor set {sorted(names - expected_names)} / {sorted(expected_names - names)}")
    check(len([n for n in names if n.startswith("blk.")]) ==
          cfg["num_hidden_layers"] * (9 + (3 if arch == "qwen2" else 0)), "per-layer tensor count")

    if dtype == "f32":
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(keep, gguf_file=os.path.basename(path),
                                                     torch_dtype=torch.float32)
        with torch.no_grad():
            logits = model(torch.tensor([IDS])).logits[0].numpy()
        c = np.fromfile(os.path.join(keep, f"{fixture}.logits.f32"), dtype=np.float32)
        c = c.reshape(len(IDS), -1)
        err = float(np.abs(logits - c).max() / np.abs(c).max())
        print(f"  transformers(gguf) vs moontune logits: max rel err {err:.2e}")
        check(err < 1e-4, f"{fixture}: transformers logits differ ({err:.2e})")


def check_smollm2(keep):
    path = os.path.join(keep, "smollm2_f16.gguf")
    if not os.path.exists(path):
        print("smollm2_f16.gguf absent: skipped")
        return
    print(f"smollm2 f16: {path}")
    r = GGUFReader(path)
    check(field(r, "general.architecture") == "llama", "architecture")
    check(field(r, "tokenizer.ggml.model") == "gpt2", "tokenizer.ggml.model")
    check(field(r, "tokenizer.ggml.pre") == "smollm", "tokenizer.ggml.pre")
    tok_json = json.load(open(os.path.join(FIX, "tokenizer", "smollm2", "tokenizer.json")))
    tokens = field(r, "tokenizer.ggml.tokens")
    check(len(tokens) == 49152, f"{len(tokens)} tokens")
    vocab = tok_json["model"]["vocab"]
    check(all(tokens[i] == t for t, i in vocab.items()), "tokens equal tokenizer.json's vocab")
    merges = field(r, "tokenizer.ggml.merges")
    jm = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    check(merges == jm, f"merges ({len(merges)}) equal tokenizer.json's ({len(jm)})")
    for k in ("bos_token_id", "eos_token_id", "padding_token_id"):
        print(f"  tokenizer.ggml.{k} = {field(r, 'tokenizer.ggml.' + k)}")
    check(isinstance(field(r, "tokenizer.chat_template"), str), "chat template")
    from transformers import AutoTokenizer
    a = AutoTokenizer.from_pretrained(keep, gguf_file="smollm2_f16.gguf")
    b = AutoTokenizer.from_pretrained(os.path.join(FIX, "tokenizer", "smollm2"))
    for s in ["Hello world! 12345", "<|im_start|>user\nWhat's up?<|im_end|>\n", "naïve café 東京 \t x"]:
        ia, ib = a.encode(s, add_special_tokens=False), b.encode(s, add_special_tokens=False)
        check(ia == ib, f"transformers tokenizer from GGUF encodes {s!r} as {ia} vs {ib}")
    print("  transformers tokenizer from the GGUF matches tokenizer.json on 3 strings")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    keep = sys.argv[1]
    for fixture, arch in (("tiny_gqa", "llama"), ("tiny_bias", "qwen2")):
        for dtype in ("f32", "f16"):
            check_tiny(keep, fixture, arch, dtype)
    check_smollm2(keep)
    if failures:
        print(f"{len(failures)} failure(s)")
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
