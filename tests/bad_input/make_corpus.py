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
nan_file = real[:off] + struct.pack("<f", float("nan")) + real[off + 4:]
case("safetensors", "nan_weight", EVAL, ["model.safetensors", name0, "non-finite"],
     {"model.safetensors": nan_file}, setup=COPY_CHAT)

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
    "truncated_elf": (ADAMW + "\ntruncate -s 300 \"$CASE\"/bad.so", None, ["bad.so"]),
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
    "state_future_version": ("sed -i 's/\"format_version\": 2/\"format_version\": 9/' \"$CKPT\"/state.json && "
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

total = sum(count.values())
print("bad_input corpus:", ", ".join(f"{k} {v}" for k, v in sorted(count.items())), f"= {total} cases")
