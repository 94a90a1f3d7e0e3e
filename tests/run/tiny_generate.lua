-- Greedy generation on the tiny chat model, one prompt alone and seven prompts decoded
-- 3 at a time with continuous batching, printed as hex so that two devices' outputs
-- compare byte for byte (tests/run/check_device_train.sh).
local mt = require("moontune")
local cfg = mt.config({ fixtures = "", model = "" })
local dir = cfg.model ~= "" and cfg.model or cfg.fixtures .. "/tiny_chat"
local model = mt.model(dir)
local tok = mt.tokenizer(dir)
model:set_training(false)
local function hex(s) return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end)) end
local one = mt.generate(model, tok, "Name three colours.", { max_new_tokens = 24 })
print("one " .. hex(one))
local prompts = {}
for i = 1, 7 do prompts[i] = string.rep("word ", i) .. "then tell me a story number " .. i end
local texts = mt.generate(model, tok, prompts, { max_new_tokens = 16, batch = 3 })
for i, t in ipairs(texts) do print(string.format("batched %d %s", i, hex(t))) end
