-- Generation with the SmolLM2-135M-Instruct GGUF (model and tokenizer from one file).
local mt = require("moontune")
local function check(cond, msg) if not cond then error(msg, 2) end end

local model <close> = mt.model(SMOLLM2_GGUF)
local tok <close> = mt.tokenizer(SMOLLM2_GGUF)
check(model:info().vocab == 49152, "vocab")
local text, info = mt.generate(model, tok, "What is the capital of France?",
  { max_new_tokens = 12, temperature = 0 })
check(type(text) == "string" and #text > 0, "no text")
check(info.new_tokens > 0 and info.new_tokens <= 12 and info.prompt_tokens > 5, "info")
-- greedy is deterministic
local again = mt.generate(model, tok, "What is the capital of France?", { max_new_tokens = 12 })
check(again == text, "greedy differs")
local raw = mt.generate(model, tok, "The capital of France is", { template = "none", max_new_tokens = 4 })
check(type(raw) == "string", "raw prompt")
local ok, err = pcall(mt.generate, model, tok, "x", { template = "none", system = "s" })
check(not ok and err:find("system", 1, true), "system without template")
-- a list of prompts: decoded together (2 slots for 3 prompts: a slot is refilled);
-- each text and info as the single form gives them (greedy)
local prompts = { "What is the capital of France?", "Name a colour.", "What is 2 + 2?" }
local texts, infos = mt.generate(model, tok, prompts, { max_new_tokens = 12, batch = 2 })
check(#texts == 3 and #infos == 3, "one text and one info per prompt")
for i, p in ipairs(prompts) do
  local one, one_info = mt.generate(model, tok, p, { max_new_tokens = 12 })
  check(texts[i] == one, string.format("prompt %d: batched %q, alone %q", i, texts[i], one))
  check(infos[i].new_tokens == one_info.new_tokens and infos[i].reason == one_info.reason
        and infos[i].prompt_tokens == one_info.prompt_tokens, "prompt " .. i .. ": info")
  check(infos[i].prefill_seconds > 0 and infos[i].decode_seconds >= 0, "times")
end
check(texts[1] == text, "the first prompt as above")
-- a stop string and template = "none" apply to every prompt; an empty list gives empty lists
local raws = mt.generate(model, tok, { "The capital of France is", "One, two," },
  { template = "none", max_new_tokens = 6, stop = { "," } })
check(#raws == 2 and not raws[2]:find(",", 1, true), "stop string in a batch")
local none, none_info = mt.generate(model, tok, {}, {})
check(#none == 0 and #none_info == 0, "no prompts")
ok, err = pcall(mt.generate, model, tok, { "a", 7 }, {})
check(not ok and err:find("prompt 2", 1, true), "a prompt that is not a string")
ok, err = pcall(mt.generate, model, tok, { "a" }, { batch = 0 })
check(not ok and err:find("batch", 1, true), "batch = 0")
ok, err = pcall(mt.generate, model, tok, { "" }, { template = "none" })
check(not ok and err:find("prompt 1", 1, true), "an empty prompt")
-- evaluation through int8 training's forward (mt.evaluate's int8) on the real Q4 base:
-- every projection of the 30 layers (7 each: Q4 codes, which AVX2 multiplies in int8
-- too) and none of the Q8_0 output layer, whose codes lie on no grid of 16; the loss
-- near fp32's (activations rounded to 8 bits) but not equal
local sentences = { "The quick brown fox jumps over the lazy dog near the river bank.",
                    "Paris is the capital of France, and Berlin is the capital of Germany.",
                    "Water boils at one hundred degrees Celsius at sea level." }
local rows = {}
for i, sentence in ipairs(sentences) do
  local ids = tok:encode(sentence)
  local trainable = {}
  for j = 1, #ids do trainable[j] = j > 3 end
  rows[i] = { ids = ids, trainable = trainable }
end
local texts_ex = mt.examples_from_ids(rows, { seq_len = 64 })
model:plan(2, 64)
local fp = mt.evaluate(model, texts_ex)
local q8 = mt.evaluate(model, texts_ex, { int8 = true })
local has_cpu_flags = dofile(FIXTURE_DIR .. "/../lua/cpu_flags.lua")
check(fp.int8 == 0, "fp32 by default: " .. fp.int8)
if has_cpu_flags("avx2", "fma") then
  check(q8.int8 >= 30 * 7, "int8 evaluation: " .. q8.int8 .. " projections in int8")
  local rel = math.abs(q8.loss - fp.loss) / fp.loss
  check(rel > 0 and rel < 0.02, string.format("int8 evaluation loss %.6f against fp32 %.6f", q8.loss, fp.loss))
  print(string.format("evaluate: int8 loss %.6f against fp32 %.6f (%.2e), %d projections", q8.loss, fp.loss,
                      rel, q8.int8))
else
  check(q8.int8 == 0 and q8.loss == fp.loss, "no int8 products on this CPU: fp32")
end
check(mt.evaluate(model, texts_ex, { int8 = false }).loss == fp.loss, "int8 = false: fp32 again")
print(string.format("generate: %q (%s); batched: %q, %q", text, info.reason, texts[2], texts[3]))

-- expect: an answer ends at its first token that cannot equal the expected text
local cut, cut_info = mt.generate(model, tok, prompts[1], { max_new_tokens = 12, expect = "The capital is Rome." })
check(cut_info.reason == "mismatch" and cut_info.new_tokens < info.new_tokens and
      text:sub(1, #cut) == cut, string.format("expect: %q (%s) against %q", cut, cut_info.reason, text))
local same, same_info = mt.generate(model, tok, prompts[1], { max_new_tokens = 12, expect = "\n " .. text .. " " })
check(same == text and same_info.reason == info.reason, "expecting its own answer: as without")
ok, err = pcall(mt.generate, model, tok, prompts, { max_new_tokens = 4, expect = { "a", "b" } })
check(not ok and err:find("2 entries for 3 prompts", 1, true), "expect: one entry per prompt: " .. tostring(err))
ok, err = pcall(mt.generate, model, tok, prompts, { max_new_tokens = 4, expect = { "a", 7, false } })
check(not ok and err:find("option 'expect': item 2: expected a string or false", 1, true),
      "expect: an entry that is not a string: " .. tostring(err))
ok, err = pcall(mt.generate, model, tok, prompts[1], { expect = { "a" } })
check(not ok and err:find("expect", 1, true), "expect: a list for one prompt")

-- tasks.evaluate's stop_on_mismatch scores as whole answers do: references that are the
-- model's own answers (right), ones that differ late and early (wrong), with answers cut
-- only where they are wrong and past full_answers
local tasks = require("moontune.tasks")
local items = {}
for i, p in ipairs(prompts) do items[i] = { prompt = p, reference = texts[i] } end
items[4] = { prompt = prompts[2], reference = texts[2]:sub(1, -2) .. "#" }
items[5] = { prompt = prompts[3], reference = "No." }
items[6] = { prompt = prompts[1], reference = "Rome" }
local whole = tasks.evaluate(mt, model, tok, items, { max_new_tokens = 12, batch = 3 })
local stopped = tasks.evaluate(mt, model, tok, items, { max_new_tokens = 12, batch = 3,
                                                       stop_on_mismatch = true, full_answers = 4 })
check(whole.correct == 3 and stopped.correct == 3 and whole.cut == 0, "three right answers of six")
for i = 1, #items do
  check(whole.passed[i] == stopped.passed[i], "item " .. i .. ": the same score")
  local kept = i <= 4 or whole.passed[i]
  check((stopped.outputs[i] == whole.outputs[i]) == kept,
        string.format("item %d: %q against %q", i, stopped.outputs[i], whole.outputs[i]))
end
check(stopped.cut == 2 and stopped.new_tokens < whole.new_tokens,
      string.format("two answers cut: %d, %d tokens against %d", stopped.cut, stopped.new_tokens, whole.new_tokens))
ok, err = pcall(tasks.evaluate, mt, model, tok, items, { stop_on_mismatch = true,
                                                         metric = function() return true end })
check(not ok and err:find("exact_match", 1, true), "stop_on_mismatch with another metric")
print(string.format("stop_on_mismatch: %d of %d right either way, %d answers cut, %d tokens against %d",
                    stopped.correct, #items, stopped.cut, stopped.new_tokens, whole.new_tokens))
return "ok"
