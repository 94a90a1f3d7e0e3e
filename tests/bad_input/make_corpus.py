"""Writes the bad-input corpus, tests/bad_input/cases/<category>/<case>/ (README.md).

Each case is a directory with `cmd` (moontune's arguments, one per line), `expect`
(strings stderr must hold, the first naming the bad file), optional `setup` (bash run
before, to copy a fixture or mutate a copy of the previous run) and `env`, and its
input files. Binary inputs are made here from the committed fixtures; the runner
(run.sh) needs no Python. Run from anywhere:

    python3 tests/bad_input/make_corpus.py
"""
import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(HERE, "cases")
count = {}


def case(cat, name, cmd, expect, files=None, setup=None, env=None):
    d = os.path.join(OUT, cat, name)
    os.makedirs(d)
    with open(os.path.join(d, "cmd"), "w") as f:
        f.write("\n".join(cmd) + "\n")
    with open(os.path.join(d, "expect"), "w") as f:
        f.write("\n".join(expect) + "\n")
    if setup:
        with open(os.path.join(d, "setup"), "w") as f:
            f.write(setup.strip() + "\n")
    if env:
        with open(os.path.join(d, "env"), "w") as f:
            f.write("\n".join(env) + "\n")
    for fname, content in (files or {}).items():
        with open(os.path.join(d, fname), "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
    count[cat] = count.get(cat, 0) + 1


shutil.rmtree(OUT, ignore_errors=True)

# ---- JSONL ---------------------------------------------------------------------------
DATA = ["data", "@CASE@/data.jsonl", "--tokenizer", "@FIX@/tokenizer/smollm2"]
good = '{"instruction": "Say hi.", "output": "Hi."}\n'
jsonl = {
    "not_json": (good + "this is not json\n", ["data.jsonl:2"]),
    "truncated_object": (good + '{"instruction": "x", "output": \n', ["data.jsonl:2"]),
    "top_level_array": ('[1, 2, 3]\n', ["data.jsonl:1"]),
    "top_level_number": ('42\n', ["data.jsonl:1"]),
    "unknown_format": ('{"question": "x", "answer": "y"}\n', ["data.jsonl:1", "cannot tell the format"]),
    "instruction_number": ('{"instruction": 5, "output": "x"}\n', ["data.jsonl:1", "field 'instruction'"]),
    "output_null": ('{"instruction": "x", "output": null}\n', ["data.jsonl:1", "'output'"]),
    "messages_not_list": ('{"messages": "hi"}\n', ["data.jsonl:1", "'messages'"]),
    "messages_empty": ('{"messages": []}\n', ["data.jsonl:1", "empty list of messages"]),
    "message_bad_role": ('{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
                         ["data.jsonl:1"]),
    "message_content_number": ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}\n',
                               ["data.jsonl:1"]),
    "empty_response": ('{"instruction": "x", "output": "   "}\n', ["data.jsonl:1", "empty response"]),
    "invalid_utf8": (b'{"instruction": "caf\xe9", "output": "x"}\n', ["data.jsonl:1"]),
    "nul_byte": (b'{"instruction": "a\x00b", "output": "x"}\n', ["data.jsonl:1"]),
    "empty_file": ("", ["data.jsonl: no records"]),
    "blank_lines_only": ("\n\n   \n", ["data.jsonl: no records"]),
    "deep_nesting": ('{"instruction": ' + "[" * 5000 + "]" * 5000 + ', "output": "x"}\n', ["data.jsonl:1"]),
    "duplicate_key": ('{"instruction": "a", "instruction": "b", "output": "x"}\n', ["data.jsonl:1"]),
    "trailing_garbage": ('{"instruction": "a", "output": "x"} extra\n', ["data.jsonl:1"]),
    "text_not_string": ('{"text": ["a"]}\n', ["data.jsonl:1", "'text'"]),
    "preference_missing_rejected": ('{"prompt": "p", "chosen": "c"}\n', ["data.jsonl:1"]),
    "preference_same_replies": ('{"prompt": "p", "chosen": "c", "rejected": "c"}\n',
                                ["data.jsonl:1", "the same"]),
    "preference_no_prompt": ('{"chosen": "c", "rejected": "d"}\n', ["data.jsonl:1", "field 'prompt'"]),
    "preference_empty_rejected": ('{"prompt": "p", "chosen": "c", "rejected": " "}\n',
                                  ["data.jsonl:1", "empty response"]),
    "mixed_formats": (good + '{"text": "plain"}\n', ["data.jsonl:2"]),
}
for name, (text, exp) in jsonl.items():
    case("jsonl", name, DATA, exp, {"data.jsonl": text})

# ---- config.json (a copy of the tiny chat model with its config replaced) ---------------
EVAL = ["eval", "--model", "@CASE@", "@FIX@/data/tiny_chat_heldout.jsonl"]
COPY_CHAT = "cp \"$FIX\"/tiny_chat/* \"$CASE\"/"
base_cfg = json.load(open(os.path.join(FIX, "tiny_chat", "config.json")))


def with_keys(base, **kw):
    """base (a dict) as JSON text with keys replaced; None removes a key."""
    c = dict(base)
    for k, v in kw.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    return json.dumps(c)


def cfg_with(**kw):
    return with_keys(base_cfg, **kw)


configs = {
    "not_json": ("{\"model_type\": ", ["config.json", "line 1"]),
    "not_object": ("[1]", ["config.json", "expected a JSON object"]),
    "missing_hidden_size": (cfg_with(hidden_size=None), ["config.json", "hidden_size"]),
    "hidden_size_string": (cfg_with(hidden_size="64"), ["config.json", "key \"hidden_size\": expected an integer"]),
    "hidden_size_zero": (cfg_with(hidden_size=0), ["config.json", "key \"hidden_size\": must be positive"]),
    "layers_negative": (cfg_with(num_hidden_layers=-1), ["config.json", "key \"num_hidden_layers\""]),
    "vocab_huge": (cfg_with(vocab_size=4294967296), ["config.json", "key \"vocab_size\""]),
    "vocab_too_large": (cfg_with(vocab_size=100000000), ["config.json", "key \"vocab_size\": 100000000 exceeds"]),
    "layers_too_many": (cfg_with(num_hidden_layers=1000000), ["config.json", "key \"num_hidden_layers\""]),
    "kv_heads_not_dividing": (cfg_with(num_key_value_heads=3), ["config.json", "num_key_value_heads"]),
    "head_dim_odd": (cfg_with(head_dim=7), ["config.json", "key \"head_dim\""]),
    "rms_eps_string": (cfg_with(rms_norm_eps="small"), ["config.json", "rms_norm_eps"]),
    "rope_theta_negative": (cfg_with(rope_theta=-1.0), ["config.json", "rope_theta"]),
    "rope_scaling_unknown": (cfg_with(rope_scaling={"rope_type": "yarn", "factor": 4.0}), ["config.json", "yarn"]),
    "rope_factor_zero": (cfg_with(rope_scaling={"type": "linear", "factor": 0}), ["config.json", "factor"]),
    "model_type_gpt2": (cfg_with(model_type="gpt2"), ["config.json", "gpt2"]),
    "hidden_act_gelu": (cfg_with(hidden_act="gelu"), ["config.json", "hidden_act"]),
    "sizes_lie_about_weights": (cfg_with(intermediate_size=base_cfg["intermediate_size"] * 2),
                                ["model.safetensors", "intermediate_size" if False else "mlp"]),
}
for name, (text, exp) in configs.items():
    case("config", name, EVAL, exp, {"config.json": text}, setup=COPY_CHAT)

# ---- safetensors (the tiny chat model with its weights replaced) ------------------------


def st_bytes(header, data=b"", pad=True, length=None):
    h = json.dumps(header).encode() if not isinstance(header, bytes) else header
    if pad:
        h += b" " * ((8 - len(h) % 8) % 8)
    n = len(h) if length is None else length
    return struct.pack("<Q", n) + h + data


f32_4 = struct.pack("<4f", 1, 2, 3, 4)
W = "model.norm.weight"
sts = {
    "empty_file": (b"", ["model.safetensors"]),
    "short_header_length": (b"\x10\x00\x00", ["model.safetensors"]),
    "header_length_huge": (st_bytes({}, length=1 << 40), ["model.safetensors"]),
    "header_length_past_end": (st_bytes({W: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, f32_4,
                                        length=4000), ["model.safetensors"]),
    "header_not_json": (st_bytes(b"{not json}   "), ["model.safetensors"]),
    "header_not_object": (st_bytes(b"[1, 2]  "), ["model.safetensors"]),
    "offsets_past_end": (st_bytes({W: {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}, f32_4),
                         ["model.safetensors", W]),
    "offsets_reversed": (st_bytes({W: {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, f32_4),
                         ["model.safetensors", W]),
    "size_not_shape": (st_bytes({W: {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, f32_4),
                       ["model.safetensors", W]),
    "unknown_dtype": (st_bytes({W: {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, f32_4),
                      ["model.safetensors", W]),
    "negative_shape": (st_bytes({W: {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, f32_4),
                       ["model.safetensors", W]),
    "overlapping": (st_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, f32_4),
                    ["model.safetensors"]),
    "gap_in_data": (st_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, f32_4),
                    ["model.safetensors"]),
    "missing_tensors": (st_bytes({W: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, f32_4),
                        ["model.safetensors"]),
    "bad_name_utf8": (st_bytes(b'{"\xff\xfe": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', f32_4),
                      ["model.safetensors"]),
    "metadata_not_strings": (st_bytes({"__metadata__": {"format": 1},
                                       W: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, f32_4),
                             ["model.safetensors"]),
}
for name, (blob, exp) in sts.items():
    case("safetensors", name, EVAL, exp, {"model.safetensors": blob}, setup=COPY_CHAT)
# NaN in a real weight: the real file with one value replaced
real = open(os.path.join(FIX, "tiny_chat", "model.safetensors"), "rb").read()
hlen = struct.unpack("<Q", real[:8])[0]
hdr = json.loads(real[8:8 + hlen])
name0 = sorted(k for k in hdr if k != "__metadata__" and hdr[k]["dtype"] == "F32")[0]
off = 8 + hlen + hdr[name0]["data_offsets"][0] + 4 * 3
case("safetensors", "nan_weight", EVAL, ["model.safetensors", name0, "non-finite"],
     setup=COPY_CHAT + "\nprintf '\\000\\000\\300\\177' | dd of=\"$CASE\"/model.safetensors bs=1 seek=%d "
     "conv=notrunc 2>/dev/null" % off)

# ---- GGUF (structure: mutations of the small fixture; ids: the llama3 tokenizer GGUF) ---
small = open(os.path.join(FIX, "gguf", "small.gguf"), "rb").read()
GG = ["data", "@FIX@/data/tiny_chat_heldout.jsonl", "--tokenizer", "@CASE@/t.gguf"]


def patch(blob, at, new):
    return blob[:at] + new + blob[at + len(new):]


# the first key: u64 length at 24, then the key bytes, then its u32 type
klen = struct.unpack("<Q", small[24:32])[0]
ggufs = {
    "empty": (b"", ["t.gguf"]),
    "bad_magic": (b"GGUX" + small[4:], ["t.gguf"]),
    "version_0": (patch(small, 4, struct.pack("<I", 0)), ["t.gguf"]),
    "version_99": (patch(small, 4, struct.pack("<I", 99)), ["t.gguf"]),
    "truncated_header": (small[:20], ["t.gguf"]),
    "truncated_kv": (small[:40], ["t.gguf"]),
    "truncated_data": (small[:len(small) - 100], ["t.gguf"]),
    "tensor_count_huge": (patch(small, 8, struct.pack("<Q", 1 << 60)), ["t.gguf"]),
    "kv_count_huge": (patch(small, 16, struct.pack("<Q", 1 << 60)), ["t.gguf"]),
    "key_length_huge": (patch(small, 24, struct.pack("<Q", 1 << 62)), ["t.gguf"]),
    "value_type_unknown": (patch(small, 32 + klen, struct.pack("<I", 77)), ["t.gguf"]),
    "random_bytes": (bytes((i * 37 + 11) % 256 for i in range(512)), ["t.gguf"]),
    "only_magic": (b"GGUF", ["t.gguf"]),
    "no_tokenizer": (small, ["t.gguf", "tokenizer.ggml.model"]),
}
for name, (blob, exp) in ggufs.items():
    case("gguf", name, GG, exp, {"t.gguf": blob})
tokg = open(os.path.join(FIX, "tokenizer", "llama3", "tokenizer.gguf"), "rb").read()
for key, value in [("tokenizer.ggml.eos_token_id", 2000000000), ("tokenizer.ggml.bos_token_id", 99999)]:
    at = tokg.find(key.encode()) + len(key) + 4
    blob = patch(tokg, at, struct.pack("<I", value))
    case("gguf", key.split(".")[-1] + "_outside_vocab", GG, ["t.gguf", key, "outside the vocabulary"], {"t.gguf": blob})

# ---- tokenizer.json (the tiny chat model with its tokenizer replaced) -------------------
GEN = ["generate", "--model", "@CASE@", "--prompt", "hi", "--max-new-tokens", "1"]
tok = json.load(open(os.path.join(FIX, "tiny_chat", "tokenizer.json")))


def tok_with(path, value, drop=False):
    t = json.loads(json.dumps(tok))
    obj = t
    for p in path[:-1]:
        obj = obj[p]
    if drop:
        obj.pop(path[-1], None)
    else:
        obj[path[-1]] = value
    return json.dumps(t)


tokenizers_cases = {
    "not_json": ("{\"model\": ", ["tokenizer.json"]),
    "not_object": ("[]", ["tokenizer.json"]),
    "no_model": (tok_with(["model"], None, drop=True), ["tokenizer.json", "model"]),
    "model_type_number": (tok_with(["model", "type"], 3), ["tokenizer.json", "model.type"]),
    "model_type_wordpiece": (tok_with(["model", "type"], "WordPiece"), ["tokenizer.json", "WordPiece"]),
    "vocab_not_object": (tok_with(["model", "vocab"], [1, 2]), ["tokenizer.json", "vocab"]),
    "vocab_empty": (tok_with(["model", "vocab"], {}), ["tokenizer.json", "model.vocab"]),
    "vocab_id_huge": (tok_with(["model", "vocab"], dict(tok["model"]["vocab"], zz=2000000000)),
                      ["tokenizer.json", "2000000000"]),
    "vocab_id_negative": (tok_with(["model", "vocab"], dict(tok["model"]["vocab"], zz=-5)), ["tokenizer.json", "zz"]),
    "merges_not_array": (tok_with(["model", "merges"], "a b"), ["tokenizer.json", "merges"]),
    "merge_unknown_token": (tok_with(["model", "merges"], ["qqq www"]), ["tokenizer.json", "merge 0"]),
    "added_tokens_not_array": (tok_with(["added_tokens"], {}), ["tokenizer.json", "added_tokens"]),
    "added_token_without_id": (tok_with(["added_tokens"], [{"content": "<x>"}]), ["tokenizer.json", "added_tokens[0]"]),
    "pre_tokenizer_unknown": (tok_with(["pre_tokenizer"], {"type": "Whitespace2"}), ["tokenizer.json", "Whitespace2"]),
    "split_regex_broken": (tok_with(["pre_tokenizer"], {"type": "Split", "pattern": {"Regex": "(["},
                                                       "behavior": "Isolated", "invert": False}),
                           ["tokenizer.json", "does not compile"]),
}
for name, (text, exp) in tokenizers_cases.items():
    case("tokenizer", name, GEN, exp, {"tokenizer.json": text}, setup=COPY_CHAT)

# ---- recipes ------------------------------------------------------------------------------
RUN = ["run", "@CASE@/recipe.lua"]
MT = 'local mt = require("moontune")\n'
recipes = {
    "syntax_error": ("local x = = 1\n", ["recipe.lua:1"]),
    "runtime_error": ("local t = nil\nprint(t.x)\n", ["recipe.lua:2", "attempt to index"]),
    "error_with_table": ("error({code = 1})\n", ["recipe.lua:1", "table value instead of a message"]),
    "error_with_nil": ("error(nil)\n", ["recipe.lua:1"]),
    "stack_overflow": ("local function f() return 1 + f() end\nf()\n", ["recipe.lua:1", "stack overflow"]),
    "c_stack_overflow": ("local t = setmetatable({}, {__index = function(t, k) return t[k] end})\nprint(t.x)\n",
                         ["recipe.lua:1", "stack overflow"]),
    "tostring_overflow": ("local t = setmetatable({}, {__tostring = function(t) return tostring(t) end})\n"
                          "print(tostring(t))\n", ["recipe.lua:1", "C stack overflow"]),
    "os_execute": ("os.execute('touch pwned')\n", ["recipe.lua:1", "os.execute is not allowed"]),
    "io_popen": ("io.popen('ls')\n", ["recipe.lua:1", "io.popen"]),
    "write_outside": ("io.open('../escaped.txt', 'w')\n", ["recipe.lua:1", "sandbox"]),
    "read_etc_passwd": ("io.open('/etc/passwd', 'r')\n", ["recipe.lua:1", "sandbox"]),
    "load_binary_chunk": ("local f = load(string.dump(function() end))\n", ["recipe.lua:1", "binary chunks"]),
    "output_dir_cwd": (MT + "mt.output_dir('.')\n", ["recipe.lua:2", "the directory moontune runs in"]),
    "output_dir_parent": (MT + "mt.output_dir('..')\n", ["recipe.lua:2", "output_dir"]),
    "output_dir_users_files": (MT + "mt.output_dir('case')\n", ["recipe.lua:2", "moontune did not write"]),
    "output_dir_earlier_run": (MT + "mt.output_dir('prev')\n", ["recipe.lua:2", "holds an earlier run"]),
    "unknown_plugin": (MT + "mt.plugin('optimizer', 'adamx', {})\n", ["recipe.lua:2", "adamx"]),
    "plugin_option_type": (MT + "mt.plugin('optimizer', 'adamw', {lr = 'fast'})\n", ["recipe.lua:2", "lr"]),
    "plugin_unknown_option": (MT + "mt.plugin('optimizer', 'adamw', {learning_rate = 1})\n",
                              ["recipe.lua:2", "learning_rate"]),
    "missing_data_file": (MT + "local tok = mt.tokenizer('@FIX@/tokenizer/smollm2')\n"
                          "mt.examples('@CASE@/missing.jsonl', tok, {})\n", ["missing.jsonl"]),
    "missing_model": (MT + "mt.model('@CASE@/no-model')\n", ["no-model"]),
    "generate_top_p": (MT + "local m = mt.model('@FIX@/tiny_chat')\nlocal t = mt.tokenizer('@FIX@/tiny_chat')\n"
                       "mt.generate(m, t, 'hi', {top_p = 5})\n", ["recipe.lua:4", "option 'top_p'"]),
    "schedule_negative_step": (MT + "local s = mt.plugin('scheduler', 'cosine', {})\nprint(mt.schedule(s, -1, 10, 0.1))\n",
                               ["recipe.lua:3", "schedule: step -1"]),
    "memory_hog": ("local s = string.rep('x', 1 << 40)\n", ["recipe.lua:1"]),
    "set_unknown_key": (MT + "local cfg = mt.config({ lr = 1 })\n", ["lr2"]),
}
for name, (text, exp) in recipes.items():
    cmd = RUN + (["--set", "lr2=3"] if name == "set_unknown_key" else [])
    case("recipes", name, cmd, exp, {"recipe.lua": text})
case("recipes", "binary_recipe", RUN, ["recipe.lua: is a precompiled (binary) Lua chunk"],
     {"recipe.lua": b"\x1bLuaT\x00\x19\x93\r\n\x1a\n\x04\x08\x08\x78\x56" + bytes(40)})
case("recipes", "missing_recipe", ["run", "@CASE@/nope.lua"], ["nope.lua"])
case("recipes", "recipe_is_directory", ["run", "@CASE@"], ["@CASE@"])

# ---- PEFT adapter directories (attached to the tiny GQA model by a recipe) -------------
ATTACH = MT + "local m = mt.model('@FIX@/tiny_gqa')\nm:attach_peft('@CASE@/adapter')\n"
COPY_PEFT = "mkdir -p \"$CASE\"/adapter && cp \"$FIX\"/peft_adapter/* \"$CASE\"/adapter/"
acfg = json.load(open(os.path.join(FIX, "peft_adapter", "adapter_config.json")))


def acfg_with(**kw):
    return with_keys(acfg, **kw)


pefts = {
    "config_not_json": ("{", ["adapter_config.json"]),
    "config_not_object": ("[]", ["adapter_config.json"]),
    "peft_type_prefix": (acfg_with(peft_type="PREFIX_TUNING"), ["adapter_config.json", "PREFIX_TUNING"]),
    "rank_zero": (acfg_with(r=0), ["adapter_config.json"]),
    "rank_string": (acfg_with(r="4"), ["adapter_config.json"]),
    "rank_mismatch": (acfg_with(r=8), ["adapter_model.safetensors"]),
    "alpha_string": (acfg_with(lora_alpha="x"), ["adapter_config.json"]),
    "targets_unknown": (acfg_with(target_modules=["wq", "wk"]), ["adapter"]),
    "bias_all": (acfg_with(bias="all"), ["adapter_config.json"]),
    "dora": (acfg_with(use_dora=True), ["adapter_config.json"]),
}
for name, (text, exp) in pefts.items():
    case("peft", name, RUN, exp, {"recipe.lua": ATTACH}, setup=COPY_PEFT + "\ncat > \"$CASE\"/adapter/adapter_config.json <<'JSON'\n"
         + text + "\nJSON")
case("peft", "weights_missing", RUN, ["adapter_model.safetensors"], {"recipe.lua": ATTACH},
     setup=COPY_PEFT + "\nrm \"$CASE\"/adapter/adapter_model.safetensors")
case("peft", "weights_truncated", RUN, ["adapter_model.safetensors"], {"recipe.lua": ATTACH},
     setup=COPY_PEFT + "\ntruncate -s 200 \"$CASE\"/adapter/adapter_model.safetensors")
case("peft", "directory_missing", RUN, ["adapter"], {"recipe.lua": MT + "local m = mt.model('@FIX@/tiny_gqa')\n"
                                                     "m:attach_peft('@CASE@/none')\n"})
case("peft", "made_for_another_model", ["generate", "--model", "@FIX@/tiny_chat", "--adapter", "@CASE@/adapter",
                                        "--prompt", "hi"], ["adapter_model.safetensors", "tensor"], setup=COPY_PEFT)

# ---- plugins (files on a plugin path; `plugins --describe` must report each refusal) ---
PLUG = ["plugins", "--path", "@CASE@", "--describe", "bad"]
ADAMW = "cp \"$BUILD\"/plugins/adamw.so \"$CASE\"/bad.so"
plugins = {
    "not_elf": (None, {"bad.so": "this is text, not a shared object\n"}, ["bad.so", "not an ELF shared object"]),
    "empty_file": (None, {"bad.so": ""}, ["bad.so"]),
    "truncated_elf": (ADAMW + "\ntruncate -s 300 \"$CASE\"/bad.so", None, ["bad.so", "the file is truncated"]),
    "wrong_arch_aarch64": (ADAMW + "\nprintf '\\267\\000' | dd of=\"$CASE\"/bad.so bs=1 seek=18 conv=notrunc 2>/dev/null",
                           None, ["bad.so", "not a plugin for this machine", "AArch64"]),
    "wrong_arch_riscv": (ADAMW + "\nprintf '\\363\\000' | dd of=\"$CASE\"/bad.so bs=1 seek=18 conv=notrunc 2>/dev/null",
                         None, ["bad.so", "RISC-V"]),
    "elf_32bit": (ADAMW + "\nprintf '\\001' | dd of=\"$CASE\"/bad.so bs=1 seek=4 conv=notrunc 2>/dev/null",
                  None, ["bad.so", "32-bit"]),
    "object_file": (ADAMW + "\nprintf '\\001' | dd of=\"$CASE\"/bad.so bs=1 seek=16 conv=notrunc 2>/dev/null",
                    None, ["bad.so", "object file"]),
    "wrong_abi": ("cp \"$BUILD\"/test_plugins/bad_abi.so \"$CASE\"/bad.so", None, ["bad.so", "ABI"]),
    "wrong_kind": ("cp \"$BUILD\"/test_plugins/bad_kind.so \"$CASE\"/bad.so", None, ["bad.so"]),
    "no_entry": ("cp \"$BUILD\"/test_plugins/bad_no_entry.so \"$CASE\"/bad.so", None, ["bad.so", "entry symbol"]),
    "null_descriptor": ("cp \"$BUILD\"/test_plugins/bad_null.so \"$CASE\"/bad.so", None, ["bad.so"]),
    "bad_schema": ("cp \"$BUILD\"/test_plugins/bad_schema_dup.so \"$CASE\"/bad.so", None, ["bad.so"]),
    "missing_slot": ("cp \"$BUILD\"/test_plugins/bad_vtable.so \"$CASE\"/bad.so", None, ["bad.so"]),
}
for name, (setup, files, exp) in plugins.items():
    case("plugins", name, PLUG, exp, files, setup=setup)

# ---- checkpoints (the previous run's latest checkpoint, damaged, then --resume) --------
RESUME = ["run", "@SRC@/tests/run/tiny_lora.lua", "--set", "fixtures=@FIX@", "--set", "steps=4", "--set",
          "save_every=2", "--set", "out_dir=prev", "--set", "resume=true"]
ckpts = {
    "weights_flipped": ("printf 'X' | dd of=\"$CKPT\"/weights.safetensors bs=1 seek=200 conv=notrunc 2>/dev/null",
                        ["weights.safetensors", "SHA-256 mismatch"]),
    "weights_truncated": ("truncate -s 100 \"$CKPT\"/weights.safetensors", ["weights.safetensors", "size mismatch"]),
    "weights_missing": ("rm \"$CKPT\"/weights.safetensors", ["weights.safetensors"]),
    "optimizer_truncated": ("truncate -s 10 \"$CKPT\"/optimizer.safetensors", ["optimizer.safetensors"]),
    "state_edited": ("sed -i 's/\"step\": 4/\"step\": 7/' \"$CKPT\"/state.json", ["state.json", "SHA-256 mismatch"]),
    "state_missing": ("rm \"$CKPT\"/state.json", ["state.json"]),  # via --resume PATH below
    "state_sum_missing": ("rm \"$CKPT\"/state.json.sha256", ["state.json.sha256"]),
    "state_sum_garbage": ("echo nonsense > \"$CKPT\"/state.json.sha256", ["state.json.sha256"]),
    "state_not_json": ("echo '{' > \"$CKPT\"/state.json && sha256sum \"$CKPT\"/state.json | sed 's| .*|  state.json|' "
                       "> \"$CKPT\"/state.json.sha256", ["state.json"]),
    "state_future_version": ("sed -i 's/\"format_version\": [0-9]*/\"format_version\": 9/' \"$CKPT\"/state.json && "
                             "(cd \"$CKPT\" && sha256sum state.json > state.json.sha256)",
                             ["state.json", "format version 9"]),
    "recipe_edited": ("echo '-- edited' >> \"$CKPT\"/recipe.lua", ["recipe.lua"]),
    "other_base_model": ("sed -i 's/\"fingerprint\": \"[0-9a-f]*\"/\"fingerprint\": \"" + "ab" * 32 + "\"/' \"$CKPT\"/state.json"
                         " && (cd \"$CKPT\" && sha256sum state.json > state.json.sha256)",
                         ["state.json", "another base model"]),
    "other_adapter_shape": (None, ["weights.safetensors", "expected shape [2, 48], found [4, 48]"]),
    "settings_changed": (None, ["allow-changes", "config.lr: 0.02 -> 0.05"]),
}
# a resumed run loads the latest complete checkpoint, so one without state.json is
# skipped there; loading it by path must name what is missing
LOAD = MT + "mt.checkpoint_load(arg.resume)\n"
for name, (setup, exp) in ckpts.items():
    if name == "state_missing":
        case("checkpoints", name, ["run", "@CASE@/recipe.lua", "--resume", "@CKPT@"], exp, {"recipe.lua": LOAD},
             setup=setup)
        continue
    cmd = RESUME + {"other_adapter_shape": ["--set", "lora.r=2"], "settings_changed": ["--set", "lr=0.05"]}.get(name, [])
    case("checkpoints", name, cmd, exp, setup=setup)
case("checkpoints", "fresh_run_into_earlier_run", RESUME[:-2], ["holds an earlier run"])
case("checkpoints", "resume_and_overwrite", RESUME + ["--overwrite", "--resume"], ["contradict"])

# ---- command-line values ---------------------------------------------------------------
M = "@FIX@/tiny_chat"
H = "@FIX@/data/tiny_chat_heldout.jsonl"
clis = {
    "eval_seq_huge": (["eval", "--model", M, "--seq", "4294967298", H], ["--seq", "4294967298"]),
    "eval_seq_one": (["eval", "--model", M, "--seq", "1", H], ["--seq"]),
    "eval_batch_huge": (["eval", "--model", M, "--batch", "4294967297", H], ["--batch", "4294967297"]),
    "eval_batch_zero": (["eval", "--model", M, "--batch", "0", H], ["--batch"]),
    "eval_threads_huge": (["eval", "--model", M, "--threads", "100000", H], ["--threads", "100000"]),
    "eval_seq_junk": (["eval", "--model", M, "--seq", "12abc", H], ["--seq", "12abc"]),
    "eval_missing_file": (["eval", "--model", M, "@CASE@/none.jsonl"], ["none.jsonl"]),
    "eval_model_missing": (["eval", "--model", "@CASE@/none", H], ["none"]),
    "eval_file_is_dir": (["eval", "--model", M, "@CASE@"], ["@CASE@"]),
    "gen_max_new_huge": (["generate", "--model", M, "--prompt", "hi", "--max-new-tokens", "4294967296"],
                         ["--max-new-tokens", "4294967296"]),
    "gen_top_k_huge": (["generate", "--model", M, "--prompt", "hi", "--top-k", "4294967296"], ["--top-k"]),
    "gen_top_k_negative": (["generate", "--model", M, "--prompt", "hi", "--top-k", "-1"], ["--top-k"]),
    "gen_temperature_inf": (["generate", "--model", M, "--prompt", "hi", "--temperature", "inf"],
                            ["--temperature", "not finite"]),
    "gen_temperature_nan": (["generate", "--model", M, "--prompt", "hi", "--temperature", "nan"], ["--temperature"]),
    "gen_top_p_five": (["generate", "--model", M, "--prompt", "hi", "--top-p", "5"], ["--top-p"]),
    "gen_top_p_zero": (["generate", "--model", M, "--prompt", "hi", "--top-p", "0"], ["--top-p"]),
    "gen_seed_negative": (["generate", "--model", M, "--prompt", "hi", "--seed", "-1"], ["--seed"]),
    "gen_seed_huge": (["generate", "--model", M, "--prompt", "hi", "--seed", "99999999999999999999999"], ["--seed"]),
    "gen_threads_huge": (["generate", "--model", M, "--prompt", "hi", "--threads", "100000"], ["--threads"]),
    "gen_missing_value": (["generate", "--model", M, "--prompt"], ["--prompt"]),
    "gen_unknown_option": (["generate", "--model", M, "--prompt", "hi", "--tempreature", "1"], ["--tempreature"]),
    "gen_adapter_missing": (["generate", "--model", M, "--prompt", "hi", "--adapter", "@CASE@/none"], ["none"]),
    "data_heldout_one": (["data", H, "--tokenizer", M, "--heldout", "1"], ["--heldout"]),
    "data_seq_huge": (["data", H, "--tokenizer", M, "--seq", "4294967298"], ["--seq"]),
    "data_seed_junk": (["data", H, "--tokenizer", M, "--seed", "x1"], ["--seed"]),
    "bench_seq_huge": (["bench", "--seq", "4294967298"], ["--seq"]),
    "bench_threads_huge": (["bench", "--threads", "100000"], ["--threads"]),
    "bench_batch_negative": (["bench", "--batch", "-4"], ["--batch"]),
    "run_set_no_value": (["run", "@SRC@/tests/run/tiny_lora.lua", "--set", "steps"], ["--set"]),
    "run_set_wrong_type": (["run", "@SRC@/tests/run/tiny_lora.lua", "--set", "fixtures=@FIX@", "--set", "steps=many",
                            "--set", "out_dir=new"], ["steps"]),
    "unknown_command": (["frobnicate"], ["frobnicate"]),
}
for name, (cmd, exp) in clis.items():
    case("cli", name, cmd, exp)


# =========================================================================================
# Added for issue 13 (hardening): more of each category, GGUF model files, sharded
# safetensors indexes, plugins through MOONTUNE_PLUGIN_PATH and recipes, --resume PATH.
# =========================================================================================

# ---- JSONL, more ---------------------------------------------------------------------
jsonl2 = {
    "message_not_object": ('{"messages": [7]}\n', ["data.jsonl:1", "field 'messages[0]'"]),
    "message_role_missing": ('{"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}\n',
                             ["data.jsonl:1", "field 'messages[0].role': missing"]),
    "message_role_number": ('{"messages": [{"role": 1, "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
                            ["data.jsonl:1", "field 'messages[0].role'"]),
    "no_assistant_message": ('{"messages": [{"role": "user", "content": "hi"}]}\n',
                             ["data.jsonl:1", "no assistant message"]),
    "preference_chosen_number": ('{"prompt": "p", "chosen": 3, "rejected": "r"}\n', ["data.jsonl:1", "'chosen'"]),
    "preference_rejected_empty": ('{"prompt": "p", "chosen": "c", "rejected": " "}\n',
                                  ["data.jsonl:1", "field 'rejected'", "empty response"]),
    "escaped_nul": ('{"instruction": "a\\u0000b", "output": "x"}\n', ["data.jsonl:1", "column"]),
    "lone_surrogate_escape": ('{"instruction": "a\\ud800b", "output": "x"}\n', ["data.jsonl:1", "Unicode"]),
    "utf8_surrogate_bytes": (b'{"instruction": "a\xed\xa0\x80b", "output": "x"}\n', ["data.jsonl:1", "invalid UTF-8"]),
    "utf8_overlong": (b'{"instruction": "a\xc0\xafb", "output": "x"}\n', ["data.jsonl:1", "invalid UTF-8"]),
    "number_overflow": ('{"instruction": "a", "output": "x", "n": 1e999}\n', ["data.jsonl:1", "overflow"]),
    "bad_line_after_many": ((good * 40) + '{"instruction": "a", "output": 5}\n', ["data.jsonl:41", "field 'output'"]),
}
for name, (text, exp) in jsonl2.items():
    case("jsonl", name, DATA, exp, {"data.jsonl": text})
# a 16 MB line that never closes: made at test time (the corpus stays small)
case("jsonl", "huge_unterminated_line", DATA, ["data.jsonl:2", "malformed JSON"],
     setup="{ printf '%s\\n' '" + good.strip() + "'; printf '{\"instruction\": \"'; "
           "head -c 16000000 /dev/zero | tr '\\0' 'a'; echo; } > \"$CASE\"/data.jsonl")
case("jsonl", "bad_heldout_file", DATA + ["--heldout-file", "@CASE@/heldout.jsonl"], ["heldout.jsonl:1", "field 'output'"],
     {"data.jsonl": good, "heldout.jsonl": '{"instruction": "a", "output": false}\n'})
case("jsonl", "second_file_bad", ["eval", "--model", "@FIX@/tiny_chat", "--seq", "64", "@FIX@/data/tiny_chat_heldout.jsonl",
                                   "@CASE@/b.jsonl"], ["b.jsonl:2", "malformed JSON"], {"b.jsonl": good + "{\n"})
case("jsonl", "eval_empty_file", ["eval", "--model", "@FIX@/tiny_chat", "--seq", "64", "@CASE@/heldout.jsonl"],
     ["heldout.jsonl: no records"], {"heldout.jsonl": ""})
case("jsonl", "eval_preference", ["eval", "--model", "@FIX@/tiny_chat", "--seq", "64", "@CASE@/p.jsonl"],
     ["p.jsonl:1", "preference"], {"p.jsonl": '{"prompt": "a", "chosen": "x", "rejected": "y"}\n'})
PAIR = '{"prompt": "Schedule the roadmap review for Monday.", "chosen": "yes", "rejected": "no"}\n'
case("jsonl", "pair_too_long_drop", RUN, ["p.jsonl:2", "preference pair needs"],
     {"p.jsonl": PAIR + '{"prompt": "' + "word " * 80 + '", "chosen": "yes", "rejected": "no"}\n',
      "recipe.lua": MT + "local tok = mt.tokenizer('@FIX@/tiny_chat')\n"
                         "mt.examples('@CASE@/p.jsonl', tok, {seq_len = 48, truncation = 'drop'})\n"})
case("jsonl", "pairs_with_cross_entropy", RUN, ["cross_entropy: the batch holds preference pairs"],
     {"p.jsonl": PAIR * 2,
      "recipe.lua": MT + "local tok = mt.tokenizer('@FIX@/tiny_chat')\n"
                         "local ex = mt.examples('@CASE@/p.jsonl', tok, {seq_len = 64})\n"
                         "local m = mt.model('@FIX@/tiny_chat')\n"
                         "m:attach(mt.plugin('adapter', 'lora', {r = 2}))\n"
                         "m:plan(2, 64)\n"
                         "local b = mt.batcher(ex, {batch = 2, seq_len = 64}):next()\n"
                         "mt.train_step(m, mt.plugin('loss', 'cross_entropy', {}), "
                         "mt.plugin('optimizer', 'adamw', {}), {b}, {lr = 1e-3})\n"})
case("jsonl", "train_empty_file", RUN, ["empty.jsonl: no records"],
     {"empty.jsonl": "", "recipe.lua": MT + "local tok = mt.tokenizer('@FIX@/tiny_chat')\n"
                                           "mt.examples('@CASE@/empty.jsonl', tok, {})\n"})

# ---- CSV and TSV (the same record rules through a table's header) ---------------------
CSV = ["data", "@CASE@/data.csv", "--tokenizer", "@FIX@/tokenizer/smollm2"]
TSV = ["data", "@CASE@/data.tsv", "--tokenizer", "@FIX@/tokenizer/smollm2"]
HDR = "instruction,output\n"
csv_cases = {
    "csv_quote_never_closed": (HDR + 'Say hi.,Hi.\n"Say bye.,Bye.\n', ["data.csv:3:1", "never closed"]),
    "csv_text_after_quote": (HDR + '"Say "hi".",Hi.\n', ["data.csv:2:7", "text after a closing quote"]),
    "csv_too_many_fields": (HDR + "Say hi.,Hi.\nSay, bye.,Bye.\n", ["data.csv:3", "3 fields where the header has 2"]),
    "csv_too_few_fields": (HDR + "Say hi.\n", ["data.csv:2", "1 fields where the header has 2"]),
    "csv_header_repeated": ("output,output\nHi.,Hi.\n", ["data.csv:1", "appears twice"]),
    "csv_header_empty_name": ("instruction,,output\na,b,c\n", ["data.csv:1", "column 2 needs a name"]),
    "csv_nul_byte": (HDR.encode() + b"Say\x00 hi.,Hi.\n", ["data.csv:2:4", "NUL"]),
    "csv_bad_utf8": (HDR.encode() + b"caf\xc3,Hi.\n", ["data.csv:2", "column 'instruction': invalid UTF-8"]),
    "csv_empty_output": (HDR + "Say hi.,\n", ["data.csv:2", "field 'output'"]),
    "csv_unknown_columns": ("question,answer\nx,y\n", ["data.csv:2", "cannot tell the format"]),
    "csv_header_only": (HDR, ["data.csv: no records"]),
    "csv_messages_not_a_list": ('messages\n"[{""role"": ""user"", ""content"": 3}]"\n', ["data.csv:2", "messages[0].content"]),
}
for name, (text, exp) in csv_cases.items():
    case("jsonl", name, CSV, exp, {"data.csv": text})
case("jsonl", "tsv_too_many_fields", TSV, ["data.tsv:2", "3 fields where the header has 2"],
     {"data.tsv": "instruction\toutput\na\tb\tc\n"})
case("jsonl", "mixture_weight_zero", RUN, ["alpaca.jsonl: a mixture weight must be above 0"],
     {"recipe.lua": MT + "mt.records({ {file = '@FIX@/data/alpaca.jsonl', weight = 0} })\n"})

# ---- config.json, more -------------------------------------------------------------------
configs2 = {
    "rms_eps_zero": (cfg_with(rms_norm_eps=0), ["config.json", "key \"rms_norm_eps\""]),
    "max_position_zero": (cfg_with(max_position_embeddings=0), ["config.json", "key \"max_position_embeddings\""]),
    "tie_embeddings_string": (cfg_with(tie_word_embeddings="yes"), ["config.json", "key \"tie_word_embeddings\""]),
    "rope_llama3_incomplete": (cfg_with(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
                               ["config.json", "original_max_position_embeddings"]),
    "rope_scaling_string": (cfg_with(rope_scaling="linear"), ["config.json", "key \"rope_scaling\""]),
    "heads_zero": (cfg_with(num_attention_heads=0), ["config.json", "key \"num_attention_heads\""]),
    "intermediate_huge": (cfg_with(intermediate_size=1 << 40), ["config.json", "key \"intermediate_size\""]),
    "head_dim_huge": (cfg_with(head_dim=1 << 31), ["config.json", "key \"head_dim\""]),
    "attention_bias_string": (cfg_with(attention_bias="no"), ["config.json", "key \"attention_bias\""]),
    "rope_theta_overflow": (cfg_with(rope_theta=1.0).replace("\"rope_theta\": 1.0", "\"rope_theta\": 1e999"),
                            ["config.json", "line 1"]),
    "vocab_smaller_than_weights": (cfg_with(vocab_size=100), ["model.safetensors", "model.embed_tokens.weight"]),
    "hidden_not_matching_weights": (cfg_with(hidden_size=50), ["model.safetensors", "model.embed_tokens.weight"]),
    "empty_file": ("", ["config.json"]),
}
for name, (text, exp) in configs2.items():
    case("config", name, EVAL, exp, {"config.json": text}, setup=COPY_CHAT)
case("config", "missing_file", EVAL, ["config.json", "cannot open"], setup=COPY_CHAT + "\nrm \"$CASE\"/config.json")
case("config", "is_a_directory", EVAL, ["config.json"],
     setup=COPY_CHAT + "\nrm \"$CASE\"/config.json && mkdir \"$CASE\"/config.json")

# ---- safetensors, more ---------------------------------------------------------------------
real_h = {k: v for k, v in hdr.items()}
real_data = real[8 + hlen:]


def real_with(edit=None, raw=None, extra=""):
    """(files, setup): the tiny chat model whose safetensors header is replaced, the data
    section kept. Only the new header is committed (header.bin, length prefix included);
    the setup splices it onto the fixture's data at test time, then runs `extra`."""
    h = json.loads(json.dumps(real_h))
    if edit:
        edit(h)
    hb = raw if raw is not None else json.dumps(h).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    setup = (COPY_CHAT + "\n{ cat \"$CASEDIR\"/header.bin; tail -c +%d \"$FIX\"/tiny_chat/model.safetensors; } "
             "> \"$CASE\"/model.safetensors" % (8 + hlen + 1))
    return {"header.bin": struct.pack("<Q", len(hb)) + hb}, setup + ("\n" + extra if extra else "")


def set_field(name, key, value):
    def f(h):
        h[name][key] = value
    return f


def rename(old, new):
    def f(h):
        h[new] = h.pop(old)
    return f


Q = "model.layers.0.self_attn.q_proj.weight"
sts2 = {
    "duplicate_name": (real_with(raw=json.dumps(real_h).encode()[:-1] + b', "' + W.encode()
                                 + b'": {"dtype": "F32", "shape": [48], "data_offsets": [0, 192]}}'),
                       ["model.safetensors", "duplicate", W]),
    "dtype_int": (real_with(set_field(W, "dtype", "I32")), ["model.safetensors", W, "I32"]),
    "dtype_not_string": (real_with(set_field(W, "dtype", 7)), ["model.safetensors", W, "dtype"]),
    "shape_not_array": (real_with(set_field(W, "shape", "48")), ["model.safetensors", W, "shape"]),
    "offsets_one_entry": (real_with(set_field(W, "data_offsets", [0])), ["model.safetensors", W, "data_offsets"]),
    "offsets_real_number": (real_with(set_field(W, "data_offsets", [0.5, 1])), ["model.safetensors", W, "data_offsets"]),
    "unknown_tensor_name": (real_with(rename(Q, Q + "X")), ["model.safetensors", Q + "X"]),
    "shape_overflow": (real_with(set_field(W, "shape", [1 << 62, 1 << 62])), ["model.safetensors", W, "overflow"]),
    "trailing_bytes": (real_with(extra="printf xxxxxxx >> \"$CASE\"/model.safetensors"),
                       ["model.safetensors", "trailing bytes"]),
    "wrong_shape_same_size": (real_with(set_field(W, "shape", [6, 8])), ["model.safetensors", W, "[6, 8]"]),
}
for name, ((files, setup), exp) in sts2.items():
    case("safetensors", name, EVAL, exp, files, setup=setup)

# sharded: model.safetensors.index.json naming shard1.safetensors (a copy of the weights)
COPY_SHARDED = ("cp \"$FIX\"/tiny_chat/config.json \"$FIX\"/tiny_chat/tokenizer*.json \"$CASE\"/ && "
                "cp \"$FIX\"/tiny_chat/model.safetensors \"$CASE\"/shard1.safetensors")
wm = {k: "shard1.safetensors" for k in real_h if k != "__metadata__"}


def index_with(edit):
    ix = {"metadata": {"total_size": len(real)}, "weight_map": dict(wm)}
    edit(ix)
    return json.dumps(ix)


IDX = "model.safetensors.index.json"
indexes = {
    "index_not_json": ("{", [IDX, "not valid JSON"]),
    "index_missing_shard": (index_with(lambda ix: ix["weight_map"].__setitem__(W, "missing.safetensors")),
                            [IDX, "missing.safetensors"]),
    "index_shard_escapes_up": (index_with(lambda ix: ix["weight_map"].__setitem__(W, "../../etc/passwd")),
                               [IDX, "../../etc/passwd"]),
    "index_shard_absolute": (index_with(lambda ix: ix["weight_map"].__setitem__(W, "/etc/passwd")), [IDX, "/etc/passwd"]),
    "index_tensor_not_in_shard": (index_with(lambda ix: ix["weight_map"].__setitem__("model.extra.weight",
                                                                                    "shard1.safetensors")),
                                  [IDX, "model.extra.weight"]),
    "index_tensor_missing_from_map": (index_with(lambda ix: ix["weight_map"].pop(W)), [IDX, W]),
    "index_weight_map_array": (index_with(lambda ix: ix.__setitem__("weight_map", [])), [IDX, "weight_map"]),
    "index_entry_number": (index_with(lambda ix: ix["weight_map"].__setitem__(W, 3)), [IDX, W]),
}
for name, (text, exp) in indexes.items():
    case("safetensors", name, EVAL, exp, {IDX: text}, setup=COPY_SHARDED)

# ---- GGUF, more structure (the small fixture; `moontune data --tokenizer FILE`) ------------
def find_key(blob, key):
    """Offset just past a key's bytes (where its u32 value type starts)."""
    return blob.index(key.encode()) + len(key)


def find_tensor(blob, name):
    """Offset of a tensor info's n_dims (just past its name)."""
    return blob.index(name.encode() + struct.pack("<I", 2 if "matrix" in name else 3 if "cube" in name else 1)) + len(name)


at_str = find_key(small, "test.str") + 4            # u64 length of the string value
at_arr = find_key(small, "test.arr_str") + 4        # u32 element type, then u64 count
at_bool = find_key(small, "test.bool_true") + 4
t_m = find_tensor(small, "f32.matrix")             # u32 n_dims, u64 ne[2], u32 type, u64 offset
t_c = find_tensor(small, "f32.cube")
t_q8 = find_tensor(small, "q8_0.matrix")
ggufs2 = {
    "string_length_huge": (patch(small, at_str, struct.pack("<Q", 1 << 40)), ["t.gguf", "key 'test.str'"]),
    "array_count_huge": (patch(small, at_arr + 4, struct.pack("<Q", 1 << 58)), ["t.gguf", "key 'test.arr_str'"]),
    "array_of_arrays": (patch(small, at_arr, struct.pack("<I", 9)), ["t.gguf", "key 'test.arr_str'"]),
    "array_type_unknown": (patch(small, at_arr, struct.pack("<I", 55)), ["t.gguf", "key 'test.arr_str'"]),
    "bool_value_2": (patch(small, at_bool, b"\x02"), ["t.gguf", "key 'test.bool_true'"]),
    "duplicate_key": (small.replace(b"test.i8", b"test.u8", 1), ["t.gguf", "duplicate key"]),
    "key_not_utf8": (small.replace(b"general.name", b"general.\xffame", 1), ["t.gguf", "kv 1", "not valid UTF-8"]),
    "tensor_name_not_utf8": (small.replace(b"f32.cube", b"f32.\xe2ube", 1), ["t.gguf", "tensor 1", "not valid UTF-8"]),
    "n_dims_5": (patch(small, t_m, struct.pack("<I", 5)), ["t.gguf", "tensor 'f32.matrix'"]),
    "tensor_offset_misaligned": (patch(small, t_c + 4 + 24 + 4, struct.pack("<Q", 65)), ["t.gguf", "tensor 'f32.cube'"]),
    "tensor_offsets_overlap": (patch(small, t_c + 4 + 24 + 4, struct.pack("<Q", 32)), ["t.gguf", "f32.cube", "overlaps"]),
    "tensor_ne_overflow": (patch(small, t_m + 4, struct.pack("<QQ", 1 << 62, 1 << 62)), ["t.gguf", "tensor 'f32.matrix'"]),
    "quant_row_not_blocks": (patch(small, t_q8 + 4, struct.pack("<Q", 48)), ["t.gguf", "tensor 'q8_0.matrix'"]),
    "tensor_name_duplicate": (small.replace(b"f16.matrix", b"f32.matrix", 1), ["t.gguf", "f32.matrix", "duplicate"]),
}
for name, (blob, exp) in ggufs2.items():
    case("gguf", name, GG, exp, {"t.gguf": blob})

# ---- GGUF model files: the tiny chat model exported to GGUF by run.sh (@GGUF@), damaged
# at the bytes found by key or tensor name; `moontune generate --model FILE` -----------------
GEN_G = ["generate", "--model", "@CASE@/m.gguf", "--prompt", "hi", "--max-new-tokens", "1"]
GG_PRE = ('cp "$GGUF" "$CASE"/m.gguf\n'
          'at() { o=$(grep -obUaF -- "$1" "$CASE"/m.gguf | head -n 1 | cut -d: -f1); [ -n "$o" ]; echo "$o"; }\n'
          'put() { printf "$2" | dd of="$CASE"/m.gguf bs=1 seek="$1" conv=notrunc 2>/dev/null; }\n')


def kv_u32_patch(key, hexbytes):
    return GG_PRE + f'o=$(at {key}); put $((o + {len(key)} + 4)) \'{hexbytes}\''


def tensor_patch(name, n_dims, field_off, hexbytes):
    # after the name: u32 n_dims, u64 ne[n_dims], u32 type, u64 offset
    return GG_PRE + f'o=$(at {name}); put $((o + {len(name)} + {field_off})) \'{hexbytes}\''


gmodels = {
    "block_count_99": (kv_u32_patch("llama.block_count", r"\x63\x00\x00\x00"), ["m.gguf", "blk.2"]),
    "embedding_length_0": (kv_u32_patch("llama.embedding_length", r"\x00\x00\x00\x00"), ["m.gguf", "llama.embedding_length"]),
    "context_length_0": (kv_u32_patch("llama.context_length", r"\x00\x00\x00\x00"), ["m.gguf", "llama.context_length"]),
    "head_count_5": (kv_u32_patch("llama.attention.head_count", r"\x05\x00\x00\x00"), ["m.gguf", "num_attention_heads (5)"]),
    "head_count_kv_3": (kv_u32_patch("llama.attention.head_count_kv", r"\x03\x00\x00\x00"), ["m.gguf", "num_key_value_heads"]),
    "vocab_size_700": (kv_u32_patch("llama.vocab_size", r"\xbc\x02\x00\x00"), ["m.gguf", "token_embd.weight"]),
    "rope_freq_base_negative": (kv_u32_patch("llama.rope.freq_base", r"\x00\x00\x80\xbf"), ["m.gguf", "llama.rope.freq_base"]),
    "rms_epsilon_nan": (kv_u32_patch("llama.attention.layer_norm_rms_epsilon", r"\x00\x00\xc0\x7f"),
                        ["m.gguf", "llama.attention.layer_norm_rms_epsilon"]),
    "architecture_unknown": (GG_PRE + 'o=$(at general.architecture); put $((o + 20 + 4 + 8 + 4)) b', ["m.gguf", "llamb"]),
    "alignment_3": (kv_u32_patch("general.alignment", r"\x03\x00\x00\x00"), ["m.gguf", "general.alignment"]),
    "tokenizer_model_unknown": (GG_PRE + 'o=$(at tokenizer.ggml.model); put $((o + 20 + 4 + 8)) xxxx',
                                ["m.gguf", "tokenizer.ggml.model", "xxxx"]),
    "tokens_count_huge": (GG_PRE + r"o=$(at tokenizer.ggml.tokens); put $((o + 21 + 4 + 4)) '\x00\x00\x00\x00\x00\x01'",
                          ["m.gguf", "tokenizer.ggml.tokens"]),
    "token_length_huge": (GG_PRE + r"o=$(at tokenizer.ggml.tokens); put $((o + 21 + 4 + 4 + 8)) '\x00\x00\x00\x00\x00\x01'",
                          ["m.gguf", "tokenizer.ggml.tokens"]),
    "tensor_renamed": (GG_PRE + 'o=$(at output_norm.weight); put $((o + 5)) z', ["m.gguf", "output_norm.weight", "missing"]),
    "tensor_duplicate": (GG_PRE + 'o=$(at blk.1.attn_q.weight); put $((o + 4)) 0', ["m.gguf", "blk.0.attn_q.weight", "duplicate"]),
    "tensor_type_99": (tensor_patch("token_embd.weight", 2, 4 + 16, r"\x63"), ["m.gguf", "token_embd.weight", "99"]),
    "tensor_dim_changed": (tensor_patch("token_embd.weight", 2, 4, r"\x31"), ["m.gguf", "token_embd.weight"]),
    "tensor_offset_misaligned": (tensor_patch("blk.0.attn_q.weight", 2, 4 + 16 + 4, r"\x01\x10\x02"),
                                 ["m.gguf", "blk.0.attn_q.weight", "alignment"]),
    "tensor_offset_past_end": (tensor_patch("output_norm.weight", 1, 4 + 8 + 4, r"\x00\x00\x00\x00\x00\x01"),
                               ["m.gguf", "output_norm.weight", "past the end"]),
    "truncated_in_data": (GG_PRE + 'truncate -s 300000 "$CASE"/m.gguf', ["m.gguf", "blk.1.ffn_up.weight", "truncated"]),
    "truncated_in_header": (GG_PRE + 'truncate -s 5000 "$CASE"/m.gguf', ["m.gguf", "tokenizer.ggml"]),
    "nan_weight": (GG_PRE + r"""put $(( $(stat -c %s "$CASE"/m.gguf) - 192 + 8 )) '\x00\x00\xc0\x7f'""",
                   ["m.gguf", "output_norm.weight", "non-finite"]),
    "eos_outside_vocab": (kv_u32_patch("tokenizer.ggml.eos_token_id", r"\x00\x10\x00\x00"),
                          ["m.gguf", "tokenizer.ggml.eos_token_id", "outside the vocabulary"]),
}
for name, (setup, exp) in gmodels.items():
    case("gguf", "model_" + name, GEN_G, exp, setup=setup)

# ---- tokenizer.json, more --------------------------------------------------------------------
tokenizers2 = {
    "empty_file": ("", ["tokenizer.json", "not valid JSON"]),
    "merge_not_pair": (tok_with(["model", "merges"], [["a"]]), ["tokenizer.json", "merge 0"]),
    "added_token_id_huge": (tok_with(["added_tokens"], [{"id": 1 << 40, "content": "<x>"}]),
                            ["tokenizer.json", "added_tokens[0]", "1099511627776"]),
    "added_token_content_number": (tok_with(["added_tokens"], [{"id": 5, "content": 7}]), ["tokenizer.json", "added_tokens[0]"]),
    "vocab_id_string": (tok_with(["model", "vocab"], dict(tok["model"]["vocab"], zz="5")), ["tokenizer.json", "zz"]),
    "vocab_id_shared": (tok_with(["model", "vocab"], {"a": 0, "b": 0}), ["tokenizer.json", "vocab id 0"]),
    "normalizer_unknown": (tok_with(["normalizer"], {"type": "Lowercase2"}), ["tokenizer.json", "Lowercase2"]),
    "decoder_unknown": (tok_with(["decoder"], {"type": "WordPiece"}), ["tokenizer.json", "decoder type \"WordPiece\""]),
    "model_type_unigram": (tok_with(["model", "type"], "Unigram"), ["tokenizer.json", "Unigram"]),
    "post_processor_unknown": (tok_with(["post_processor"], {"type": "Weird"}), ["tokenizer.json", "Weird"]),
    "sequence_without_list": (tok_with(["pre_tokenizer"], {"type": "Sequence", "pretokenizers": "x"}),
                              ["tokenizer.json", "pretokenizers"]),
    "byte_fallback_string": (tok_with(["model", "byte_fallback"], "yes"), ["tokenizer.json", "byte_fallback"]),
}
for name, (text, exp) in tokenizers2.items():
    case("tokenizer", name, GEN, exp, {"tokenizer.json": text}, setup=COPY_CHAT)
case("tokenizer", "missing_file", GEN, ["tokenizer.json", "cannot open"], setup=COPY_CHAT + "\nrm \"$CASE\"/tokenizer.json")

# ---- recipes, more ------------------------------------------------------------------------------
TOK = "local tok = mt.tokenizer('@FIX@/tiny_chat')\n"
recipes2 = {
    "package_loadlib": ("package.loadlib('/lib/x86_64-linux-gnu/libc.so.6', '*')\n",
                        ["recipe.lua:1", "package.loadlib is not allowed"]),
    "dofile_outside": ("dofile('/etc/hostname')\n", ["recipe.lua:1", "/etc/hostname"]),
    "write_absolute": ("io.open('/tmp/moontune-bad-input-escape.txt', 'w')\n", ["recipe.lua:1", "sandbox"]),
    "output_dir_absolute": (MT + "mt.output_dir('/tmp')\n", ["recipe.lua:2", "output_dir"]),
    "output_dir_empty": (MT + "mt.output_dir('')\n", ["recipe.lua:2", "output_dir"]),
    "plugin_paths_sandboxed": (MT + "mt.plugin('optimizer', 'adamw', {}, {paths = '@CASE@'})\n",
                               ["recipe.lua:2", "cannot name plugin directories"]),
    "plugin_option_out_of_range": (MT + "mt.plugin('optimizer', 'adamw', {beta1 = 7})\n", ["recipe.lua:2", "beta1"]),
    "plugin_option_wrong_type": (MT + "mt.plugin('optimizer', 'adamw', {beta1 = 'fast'})\n",
                                 ["recipe.lua:2", "option 'beta1': expected a number"]),
    "plugin_kind_unknown": (MT + "mt.plugin('optimiser', 'adamw', {})\n", ["recipe.lua:2", "optimiser"]),
    "examples_seq_len_string": (MT + TOK + "mt.examples('@FIX@/data/tiny_chat_heldout.jsonl', tok, {seq_len = 'x'})\n",
                                ["recipe.lua:3", "seq_len"]),
    "examples_truncation_unknown": (MT + TOK + "mt.examples('@FIX@/data/tiny_chat_heldout.jsonl', tok, {truncation = 'mid'})\n",
                                    ["recipe.lua:3", "truncation"]),
    "examples_format_unknown": (MT + TOK + "mt.examples('@FIX@/data/tiny_chat_heldout.jsonl', tok, {format = 'yaml'})\n",
                                ["recipe.lua:3", "yaml"]),
    "examples_bad_file_line": (MT + TOK + "mt.examples('@CASE@/d.jsonl', tok, {})\n", ["d.jsonl:2", "field 'output'"]),
    "model_is_jsonl_file": (MT + "mt.model('@FIX@/data/tiny_chat_heldout.jsonl')\n", ["recipe.lua:2", "tiny_chat_heldout.jsonl"]),
    "evaluate_all_dropped": (MT + TOK + "local m = mt.model('@FIX@/tiny_chat')\n"
                             "local ex = mt.examples('@FIX@/data/tiny_chat_heldout.jsonl', tok, {seq_len = 4, truncation = 'drop'})\n"
                             "m:plan(2, 16)\nmt.evaluate(m, ex, {batch = 2, seq_len = 16})\n",
                             ["recipe.lua:6", "tiny_chat_heldout.jsonl: evaluation: the held-out set is empty",
                              "longer than seq_len 4"]),
    "evaluate_split_empty": (MT + TOK + "local m = mt.model('@FIX@/tiny_chat')\n"
                             "local ex = mt.examples('@FIX@/data/tiny_chat_heldout.jsonl', tok, {seq_len = 64})\n"
                             "local train, held = ex:split(0.0001, 1)\n"
                             "m:plan(2, 64)\nmt.evaluate(m, held, {batch = 2, seq_len = 64})\n",
                             ["recipe.lua:7", "tiny_chat_heldout.jsonl: evaluation: the held-out set is empty"]),
    "set_wrong_type_bool": (MT + "local cfg = mt.config({ lr = 1 })\n", ["recipe.lua:2", "lr"]),
    "set_number_inf": (MT + "local cfg = mt.config({ lr = 1 })\n", ["recipe.lua:2", "lr=inf"]),
}
sets2 = {"set_wrong_type_bool": ["--set", "lr=true"], "set_number_inf": ["--set", "lr=inf"]}
for name, (text, exp) in recipes2.items():
    files = {"recipe.lua": text}
    if name == "examples_bad_file_line":
        files["d.jsonl"] = good + '{"instruction": "a", "output": []}\n'
    case("recipes", name, RUN + sets2.get(name, []), exp, files)

# ---- PEFT, more (built from the fixture adapter) -------------------------------------------------
pa = open(os.path.join(FIX, "peft_adapter", "adapter_model.safetensors"), "rb").read()
pa_hlen = struct.unpack("<Q", pa[:8])[0]
pa_h = json.loads(pa[8:8 + pa_hlen])
pa_data = pa[8 + pa_hlen:]
A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def adapter_with(edit=None, data_edit=None):
    h = json.loads(json.dumps(pa_h))
    data = bytearray(pa_data)
    if edit:
        edit(h)
    if data_edit:
        data_edit(h, data)
    hb = json.dumps(h).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    return struct.pack("<Q", len(hb)) + hb + bytes(data)


def nan_at_a0(h, data):
    o = h[A0]["data_offsets"][0] + 4 * 5
    data[o:o + 4] = struct.pack("<f", float("nan"))


pweights = {
    "tensor_for_missing_layer": (adapter_with(rename(A0, A0.replace("layers.0", "layers.9"))),
                                 ["adapter_model.safetensors", "this model has no parameter model.layers.9"]),
    "tensor_for_unknown_module": (adapter_with(rename(A0, A0.replace("q_proj", "qq_proj"))),
                                  ["adapter_model.safetensors", "qq_proj is not a projection"]),
    "tensor_not_targeted": (adapter_with(rename(A0, A0.replace("q_proj", "k_proj"))),
                            ["adapter_model.safetensors", "k_proj is not among the target_modules"]),
    "tensor_not_lora": (adapter_with(rename(A0, "foo.weight")), ["adapter_model.safetensors", "foo.weight"]),
    "tensor_dtype_int": (adapter_with(set_field(A0, "dtype", "I32")), ["adapter_model.safetensors", A0, "I32"]),
    "nan_weight": (adapter_with(data_edit=nan_at_a0), ["adapter_model.safetensors", A0, "non-finite"]),
    "no_tensors": (struct.pack("<Q", 8) + b"{}      ", ["adapter_model.safetensors", "missing"]),
}
for name, (blob, exp) in pweights.items():
    # run.sh copies the case's files after its setup: adapter/ lands on the fixture's copy
    case("peft", name, RUN, exp, {"recipe.lua": ATTACH}, setup=COPY_PEFT)
    os.makedirs(os.path.join(OUT, "peft", name, "adapter"))
    with open(os.path.join(OUT, "peft", name, "adapter", "adapter_model.safetensors"), "wb") as f:
        f.write(blob)
pconfigs = {
    "task_type_seq_cls": (acfg_with(task_type="SEQ_CLS"), ["adapter_config.json", "task_type is \"SEQ_CLS\""]),
    "target_modules_number": (acfg_with(target_modules=7), ["adapter_config.json", "target_modules"]),
    "target_modules_empty": (acfg_with(target_modules=[]), ["adapter_config.json", "target_modules"]),
    "layers_to_transform": (acfg_with(layers_to_transform=[0]), ["adapter_config.json", "layers_to_transform"]),
    "modules_to_save": (acfg_with(modules_to_save=["lm_head"]), ["adapter_config.json", "modules_to_save"]),
    "rank_pattern": (acfg_with(rank_pattern={"q_proj": 8}), ["adapter_config.json", "rank_pattern"]),
    "rank_huge": (acfg_with(r=1 << 40), ["adapter_config.json", "r must be"]),
    "rank_missing": (acfg_with(r=None), ["adapter_config.json", "r must be"]),
    "fan_in_fan_out": (acfg_with(fan_in_fan_out=True), ["adapter_config.json", "fan_in_fan_out"]),
    "alpha_negative": (acfg_with(lora_alpha=-1), ["adapter_config.json", "lora_alpha"]),
    "rslora_string": (acfg_with(use_rslora="yes"), ["adapter_config.json", "use_rslora"]),
    "target_modules_all_linear": (acfg_with(target_modules="all-linear"), ["adapter_model.safetensors", "k_proj", "missing"]),
}
for name, (text, exp) in pconfigs.items():
    case("peft", name, RUN, exp, {"recipe.lua": ATTACH}, setup=COPY_PEFT + "\ncat > \"$CASE\"/adapter/adapter_config.json <<'JSON'\n"
         + text + "\nJSON")
case("peft", "config_missing", RUN, ["adapter_config.json", "cannot open"], {"recipe.lua": ATTACH},
     setup=COPY_PEFT + "\nrm \"$CASE\"/adapter/adapter_config.json")
case("peft", "eval_adapter_for_another_model", ["eval", "--model", "@FIX@/tiny_chat", "--seq", "64", "--adapter",
                                                "@CASE@/adapter", "@FIX@/data/tiny_chat_heldout.jsonl"],
     ["adapter_model.safetensors", "tensor"], setup=COPY_PEFT)
case("peft", "adapter_is_a_file", ["generate", "--model", "@FIX@/tiny_gqa", "--adapter", "@CASE@/file",
                                   "--prompt", "hi"], ["file"], {"file": "not a directory\n"})

# ---- plugins, more: MOONTUNE_PLUGIN_PATH, recipes, other ELF damage -------------------------------
ENVP = ["MOONTUNE_PLUGIN_PATH=@CASE@"]
plugins2 = {
    "big_endian": (ADAMW + "\nprintf '\\002' | dd of=\"$CASE\"/bad.so bs=1 seek=5 conv=notrunc 2>/dev/null",
                   ["bad.so", "big-endian"]),
    "bad_name": ("cp \"$BUILD\"/test_plugins/bad_name.so \"$CASE\"/bad.so", ["bad.so"]),
    "bad_schema_default": ("cp \"$BUILD\"/test_plugins/bad_schema_default.so \"$CASE\"/bad.so", ["bad.so"]),
}
for name, (setup, exp) in plugins2.items():
    case("plugins", name, PLUG, exp, setup=setup)
case("plugins", "env_wrong_arch", ["plugins", "--describe", "bad"],
     ["bad.so", "not a plugin for this machine", "AArch64"], env=ENVP,
     setup=ADAMW + "\nprintf '\\267\\000' | dd of=\"$CASE\"/bad.so bs=1 seek=18 conv=notrunc 2>/dev/null")
case("plugins", "env_not_elf", ["plugins", "--describe", "bad"], ["bad.so", "not an ELF shared object"], env=ENVP,
     files={"bad.so": "#!/bin/sh\necho not a plugin\n"})
case("plugins", "env_truncated", ["plugins", "--describe", "bad"], ["bad.so", "truncated"], env=ENVP,
     setup=ADAMW + "\ntruncate -s 4000 \"$CASE\"/bad.so")
case("plugins", "recipe_wrong_arch", RUN, ["recipe.lua:2", "a file of that name was refused", "bad.so",
                                           "not a plugin for this machine"], env=ENVP,
     files={"recipe.lua": MT + "mt.plugin('optimizer', 'bad', {})\n"},
     setup=ADAMW + "\nprintf '\\267\\000' | dd of=\"$CASE\"/bad.so bs=1 seek=18 conv=notrunc 2>/dev/null")
case("plugins", "recipe_no_entry", RUN, ["recipe.lua:2", "bad.so", "entry symbol"], env=ENVP,
     files={"recipe.lua": MT + "mt.plugin('optimizer', 'bad', {})\n"},
     setup="cp \"$BUILD\"/test_plugins/bad_no_entry.so \"$CASE\"/bad.so")
case("plugins", "kind_unknown", ["plugins", "--kind", "wizard"], ["--kind", "wizard"])
case("plugins", "describe_unknown", ["plugins", "--describe", "nosuch"], ["nosuch"])

# ---- checkpoints, more: `--resume PATH` on a damaged copy, loaded by path --------------------------
LOADP = ["run", "@CASE@/recipe.lua", "--resume", "@CKPT@"]
ckpts2 = {
    "path_weights_flipped": ("printf 'X' | dd of=\"$CKPT\"/weights.safetensors bs=1 seek=300 conv=notrunc 2>/dev/null",
                             ["weights.safetensors", "SHA-256 mismatch"]),
    "path_weights_truncated": ("truncate -s 1000 \"$CKPT\"/weights.safetensors", ["weights.safetensors", "size mismatch"]),
    "path_weights_missing": ("rm \"$CKPT\"/weights.safetensors", ["weights.safetensors"]),
    "path_optimizer_missing": ("rm \"$CKPT\"/optimizer.safetensors", ["optimizer.safetensors"]),
    "path_sum_other_file": ("sed -i 's/state.json/other.json/' \"$CKPT\"/state.json.sha256", ["state.json.sha256"]),
    "path_state_edited": ("sed -i 's/\"step\": 4/\"step\": 5/' \"$CKPT\"/state.json", ["state.json", "SHA-256 mismatch"]),
}
for name, (setup, exp) in ckpts2.items():
    case("checkpoints", name, LOADP, exp, {"recipe.lua": LOAD}, setup=setup)
case("checkpoints", "path_is_runs_directory", ["run", "@CASE@/recipe.lua", "--resume", "@PREV@/checkpoints"],
     ["checkpoints"], {"recipe.lua": LOAD})
case("checkpoints", "path_is_a_file", ["run", "@CASE@/recipe.lua", "--resume", "@PREV@/metrics.jsonl"],
     ["metrics.jsonl"], {"recipe.lua": LOAD})
case("checkpoints", "path_missing", ["run", "@CASE@/recipe.lua", "--resume", "@CASE@/none"], ["none"],
     {"recipe.lua": LOAD})
# a recipe that never reads arg.resume: a --resume PATH that does not exist must not start a fresh run
case("checkpoints", "path_missing_not_read_by_recipe", RESUME[:-2] + ["--set", "out_dir=fresh", "--resume", "@CASE@/none"],
     ["none"])

# ---- command-line values, more ----------------------------------------------------------------
G = ["generate", "--model", M, "--prompt", "hi"]
clis2 = {
    "data_batch_huge": (["data", H, "--tokenizer", M, "--batch", "4294967297"], ["--batch", "4294967297"]),
    "data_heldout_nan": (["data", H, "--tokenizer", M, "--heldout", "nan"], ["--heldout", "nan"]),
    "data_heldout_negative": (["data", H, "--tokenizer", M, "--heldout", "-0.5"], ["--heldout", "-0.5"]),
    "data_truncation_unknown": (["data", H, "--tokenizer", M, "--truncation", "sideways"], ["--truncation", "sideways"]),
    "data_on_bad_record_unknown": (["data", H, "--tokenizer", M, "--on-bad-record", "ignore"], ["--on-bad-record", "ignore"]),
    "data_format_unknown": (["data", H, "--tokenizer", M, "--format", "yaml"], ["--format", "yaml"]),
    "data_heldout_file_missing": (["data", H, "--tokenizer", M, "--heldout-file", "@CASE@/none.jsonl"], ["none.jsonl"]),
    "data_template_unknown": (["data", H, "--tokenizer", M, "--template", "nosuch"], ["nosuch"]),
    "data_tokenizer_missing": (["data", H, "--tokenizer", "@CASE@/none"], ["none"]),
    "data_no_tokenizer": (["data", H], ["--tokenizer"]),
    "bench_steps_zero": (["bench", "--steps", "0"], ["--steps"]),
    "bench_steps_huge": (["bench", "--steps", "4294967297"], ["--steps", "4294967297"]),
    "bench_warmup_negative": (["bench", "--warmup", "-1"], ["--warmup", "-1"]),
    "bench_shape_unknown": (["bench", "--shape", "gpt5"], ["gpt5"]),
    "bench_config_missing": (["bench", "--config", "@CASE@/none/config.json"], ["none/config.json"]),
    "bench_config_bad": (["bench", "--config", "@CASE@/config.json"], ["config.json", "key \"hidden_size\""]),
    "bench_mode_unknown": (["bench", "--mode", "turbo"], ["--mode", "turbo"]),
    "bench_adapter_unknown": (["bench", "--adapter", "nosuch"], ["nosuch"]),
    "bench_adapter_option_type": (["bench", "--adapter", "lora", "--adapter-option", "r=abc"], ["option 'r'"]),
    "bench_adapter_option_no_value": (["bench", "--adapter", "lora", "--adapter-option", "r"], ["--adapter-option"]),
    "bench_batch_huge": (["bench", "--batch", "4294967297"], ["--batch", "4294967297"]),
    "gen_max_new_negative": (G + ["--max-new-tokens", "-1"], ["--max-new-tokens", "-1"]),
    "gen_max_new_fraction": (G + ["--max-new-tokens", "1.5"], ["--max-new-tokens", "1.5"]),
    "gen_temperature_negative": (G + ["--temperature", "-1"], ["--temperature", "-1"]),
    "gen_temperature_overflow": (G + ["--temperature", "1e400"], ["--temperature", "1e400"]),
    "gen_top_p_subnormal": (G + ["--top-p", "0x1p-2000"], ["--top-p"]),
    "gen_top_k_empty": (G + ["--top-k", ""], ["--top-k"]),
    "gen_threads_space": (G + ["--threads", " 4"], ["--threads"]),
    "gen_template_unknown": (G + ["--template", "nosuch"], ["nosuch"]),
    "gen_no_prompt": (["generate", "--model", M], ["--prompt"]),
    "gen_stop_empty": (G + ["--stop", ""], ["--stop"]),
    "gen_prompt_too_long": (["generate", "--model", M, "--prompt", "word " * 400], ["1209 tokens", "context of 256"]),
    "gen_model_gguf_missing": (["generate", "--model", "@CASE@/none.gguf", "--prompt", "hi"], ["none.gguf"]),
    "eval_threads_negative": (["eval", "--model", M, "--threads", "-1", H], ["--threads", "-1"]),
    "eval_format_unknown": (["eval", "--model", M, "--format", "yaml", H], ["--format", "yaml"]),
    "eval_no_files": (["eval", "--model", M], ["FILE.jsonl"]),
    "eval_model_is_file": (["eval", "--model", "@FIX@/tiny_chat/model.safetensors", H], ["model.safetensors"]),
    "eval_seq_past_context": (["eval", "--model", M, H], ["512", "max_position_embeddings 256"]),
    "run_no_recipe": (["run"], ["usage"]),
    "run_set_lr_inf": (["run", "@SRC@/tests/run/tiny_lora.lua", "--set", "fixtures=@FIX@", "--set", "lr=inf",
                        "--set", "out_dir=new"], ["lr=inf"]),
}
for name, (cmd, exp) in clis2.items():
    files = {"config.json": cfg_with(hidden_size="big")} if name == "bench_config_bad" else None
    case("cli", name, cmd, exp, files)

total = sum(count.values())
print("bad_input corpus:", ", ".join(f"{k} {v}" for k, v in sorted(count.items())), f"= {total} cases")
