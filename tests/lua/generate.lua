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
print(string.format("generate: %q (%s)", text, info.reason))
return "ok"
