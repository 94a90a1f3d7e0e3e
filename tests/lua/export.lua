-- mt.records, moontune.tasks and the model's export methods on the tiny chat model:
-- after a few LoRA steps (so the adapter is not zero), the merged transformers export
-- and the F32 GGUF export, loaded back, give the adapted model's held-out loss and its
-- greedy answers; the F16 GGUF is close; the PEFT directory has PEFT's files and, loaded
-- back with model:attach_peft, gives the adapted model's loss and answers. A full
-- fine-tune (adapter "full") exports merged and as an F32 GGUF that reload with its
-- held-out loss, and refuses export_peft (it has no adapter directory).
local mt = require("moontune")
local tasks = require("moontune.tasks")
local PLUGINS = { paths = { BUILD_DIR .. "/plugins" } }
local MODEL = FIXTURE_DIR .. "/tiny_chat"
local DATA = FIXTURE_DIR .. "/data"

local function check(cond, msg) if not cond then error(msg, 2) end end
local function close_to(a, b, tol, what)
  check(math.abs(a - b) <= tol * math.max(1, math.abs(b)),
        string.format("%s: %.9g vs %.9g (tolerance %g)", what, a, b, tol))
end
local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

-- records: normalised messages with their file and line
local recs = mt.records(DATA .. "/tiny_chat_heldout.jsonl")
check(#recs > 0, "no records")
check(recs[1].format == "chat" and recs[1].line == 1, "format/line " .. tostring(recs[1].format))
check(recs[2].file:find("tiny_chat_heldout.jsonl", 1, true), "file " .. recs[2].file)
check(#recs[1].messages == 3 and recs[1].messages[3].role == "assistant", "messages")
local alpaca = mt.records(DATA .. "/alpaca.jsonl")
local m1 = alpaca[1].messages
check(m1[#m1].role == "assistant" and m1[#m1 - 1].role == "user", "alpaca as messages")
local text = mt.records(DATA .. "/text.jsonl")
check(type(text[1].text) == "string" and text[1].messages == nil, "text records")
local ok, err = pcall(mt.records, DATA .. "/mixed_bad.jsonl")
check(not ok and err:find("mixed_bad.jsonl:%d+"), "bad record error: " .. tostring(err))
local skipped = mt.records(DATA .. "/mixed_bad.jsonl", { on_bad_record = "skip" })
check(#skipped > 0, "skip keeps the good records")
ok, err = pcall(mt.records, DATA .. "/no_such_file.jsonl")
check(not ok and err:find("no_such_file"), "missing file: " .. tostring(err))

-- task items and the exact-match metric
local items = tasks.items(recs)
check(#items == #recs, "items")
check(items[1].system == recs[1].messages[1].content, "system")
check(items[1].prompt == recs[1].messages[2].content, "prompt")
check(items[1].reference == recs[1].messages[3].content, "reference")
check(tasks.exact_match(" {\"a\": 1}\n", "{\"a\": 1}"), "exact match trims")
check(not tasks.exact_match("{\"a\": 2}", "{\"a\": 1}"), "exact match compares")
ok, err = pcall(tasks.items, { { file = "x.jsonl", line = 7, messages = { { role = "user", content = "hi" } } } })
check(not ok and err:find("x.jsonl:7"), "items error names the line: " .. tostring(err))
close_to(tasks.relative_change(10, 11), 0.1, 1e-12, "relative change")

-- a few LoRA steps
local tok = mt.tokenizer(MODEL)
local opts = { template = "auto", seq_len = 96 }
local train = mt.examples(DATA .. "/tiny_chat_train.jsonl", tok, opts)
local heldout = mt.examples(DATA .. "/tiny_chat_heldout.jsonl", tok, opts)
local model = mt.model(MODEL)
local ok_peft, perr = pcall(model.export_peft, model, TMP .. "/none")
check(not ok_peft and perr:find("no adapter"), "export_peft without an adapter: " .. tostring(perr))
model:attach(mt.plugin("adapter", "lora", { r = 4, alpha = 8, target_modules = "all-linear", seed = 3 }, PLUGINS))
model:plan(2, 96)
local loss = mt.plugin("loss", "cross_entropy", {}, PLUGINS)
local opt = mt.plugin("optimizer", "adamw", { weight_decay = 0.0 }, PLUGINS)
local batcher = mt.batcher(train, { batch = 2, seq_len = 96, seed = 1 })
local base_loss = mt.evaluate(model, heldout).loss
for step = 1, 4 do
  local b = batcher:next()
  mt.train_step(model, loss, opt, b, { lr = 1e-2, step = step })
end
local adapted = mt.evaluate(model, heldout).loss
check(math.abs(adapted - base_loss) > 1e-3, "training moved the loss: " .. base_loss .. " -> " .. adapted)
model:set_training(false)
local prompts = {}
for i = 1, 3 do prompts[i] = items[i].prompt end
local function answers(m, t)
  local out = {}
  for i = 1, #prompts do
    out[i] = mt.generate(m, t, prompts[i], { system = items[i].system, max_new_tokens = 12 })
  end
  return out
end
local want = answers(model, tok)
model:set_training(true)

-- PEFT adapter directory
check(model:export_peft(TMP .. "/adapter") == TMP .. "/adapter", "export_peft returns the directory")
local cfgtext = read(TMP .. "/adapter/adapter_config.json")
check(cfgtext:find('"peft_type": *"LORA"') and cfgtext:find('"r": *4') and cfgtext:find('"lora_alpha": *8'),
      "adapter_config.json: " .. cfgtext)
check(cfgtext:find("tiny_chat", 1, true), "base model path in adapter_config.json")
check(read(TMP .. "/adapter/adapter_model.safetensors"):find("lora_A.weight", 1, true), "PEFT tensor names")
model:export_peft(TMP .. "/adapter2", { base_model = "org/base" })
check(read(TMP .. "/adapter2/adapter_config.json"):find("org/base", 1, true), "base_model option")

-- merged transformers directory and GGUF: the adapted model's loss and answers
model:export_merged(TMP .. "/merged", { tokenizer = tok })
model:export_gguf(TMP .. "/m32.gguf", { tokenizer = tok, dtype = "f32" })
model:export_gguf(TMP .. "/m16.gguf", { tokenizer = tok })
close_to(mt.evaluate(model, heldout).loss, adapted, 1e-6, "exports leave the model unchanged")
local function reload(path, tol, what, same_answers)
  local m <close> = mt.model(path)
  local t <close> = mt.tokenizer(path)
  m:plan(2, 96)
  local ex <close> = mt.examples(DATA .. "/tiny_chat_heldout.jsonl", t, opts)
  close_to(mt.evaluate(m, ex).loss, adapted, tol, what .. " loss")
  if same_answers then
    local got = answers(m, t)
    for i = 1, #want do check(got[i] == want[i], what .. " answer " .. i .. ": " .. got[i] .. " vs " .. want[i]) end
  end
end
reload(TMP .. "/merged", 1e-5, "merged", true)
reload(TMP .. "/m32.gguf", 1e-5, "GGUF f32", true)
reload(TMP .. "/m16.gguf", 2e-2, "GGUF f16", false)
-- the PEFT directory loaded onto the base model again: the adapted model's loss and answers
do
  local m <close> = mt.model(MODEL)
  local a = m:attach_peft(TMP .. "/adapter")
  check(tostring(a):find("lora", 1, true), "attach_peft returns the lora Plugin: " .. tostring(a))
  m:plan(2, 96)
  close_to(mt.evaluate(m, heldout).loss, adapted, 1e-6, "attach_peft loss")
  local got = answers(m, tok)
  for i = 1, #want do check(got[i] == want[i], "attach_peft answer " .. i) end
  local ok_again, aerr = pcall(m.attach_peft, m, TMP .. "/adapter")
  check(not ok_again and aerr:find("already has an adapter"), "second attach_peft: " .. tostring(aerr))
end
local ok_dt, derr = pcall(model.export_gguf, model, TMP .. "/bad.gguf", { dtype = "q4" })
check(not ok_dt and derr:find("dtype"), "bad dtype: " .. tostring(derr))
-- the PEFT directory loaded by the adapter named
do
  local m <close> = mt.model(MODEL)
  local ok_full, ferr = pcall(m.attach_peft, m, TMP .. "/adapter", { adapter = "full" })
  check(not ok_full and ferr:find("cannot load a PEFT adapter directory", 1, true),
        "attach_peft with full: " .. tostring(ferr))
  m:attach_peft(TMP .. "/adapter", { adapter = "lora" })
  m:plan(2, 96)
  close_to(mt.evaluate(m, heldout).loss, adapted, 1e-6, "attach_peft {adapter = lora} loss")
end

-- a full fine-tune: every weight trains, and the exports are the trained model itself
do
  local fm <close> = mt.model(MODEL)
  fm:attach(mt.plugin("adapter", "full", {}, PLUGINS))
  fm:plan(2, 96)
  local fopt = mt.plugin("optimizer", "adamw", { weight_decay = 0.0 }, PLUGINS)
  local fbatch = mt.batcher(train, { batch = 2, seq_len = 96, seed = 2 })
  for step = 1, 3 do
    mt.train_step(fm, loss, fopt, fbatch:next(), { lr = 1e-3, step = step })
  end
  local trained = mt.evaluate(fm, heldout).loss
  check(math.abs(trained - base_loss) > 1e-3, "full training moved the loss: " .. base_loss .. " -> " .. trained)
  local ok_fp, fperr = pcall(fm.export_peft, fm, TMP .. "/full_peft")
  check(not ok_fp and fperr:find("cannot be saved as an adapter directory", 1, true),
        "export_peft of a full fine-tune: " .. tostring(fperr))
  fm:export_merged(TMP .. "/full_merged", { tokenizer = tok })
  fm:export_gguf(TMP .. "/full32.gguf", { tokenizer = tok, dtype = "f32" })
  close_to(mt.evaluate(fm, heldout).loss, trained, 1e-6, "full: exports leave the model unchanged")
  for _, path in ipairs({ TMP .. "/full_merged", TMP .. "/full32.gguf" }) do
    local m <close> = mt.model(path)
    local t <close> = mt.tokenizer(path)
    m:plan(2, 96)
    local ex <close> = mt.examples(DATA .. "/tiny_chat_heldout.jsonl", t, opts)
    close_to(mt.evaluate(m, ex).loss, trained, 1e-5, "full fine-tune reloaded from " .. path)
  end
end
return "ok"
