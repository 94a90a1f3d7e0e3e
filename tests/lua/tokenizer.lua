-- The real SmolLM2 tokenizer and the quickstart data.
local mt = require("moontune")
local function check(cond, msg) if not cond then error(msg, 2) end end

local tok <close> = mt.tokenizer(FIXTURE_DIR .. "/tokenizer/smollm2")
local ids = tok:encode("Hello world", false)
check(#ids > 0 and tok:decode(ids) == "Hello world", "round trip")
check(tok:eos() ~= nil, "eos")
-- special tokens stay unless asked to skip them (docs/lua_api.md)
local with_eos = { table.unpack(ids) }
with_eos[#with_eos + 1] = tok:eos()
local kept = tok:decode(with_eos)
check(kept ~= "Hello world" and kept:sub(1, 11) == "Hello world", "decode without the flag keeps specials: " .. kept)
check(tok:decode(with_eos, false) == kept, "decode(ids, false) keeps specials")
check(tok:decode(with_eos, true) == "Hello world", "decode(ids, true) skips specials")
local ex <close> = mt.examples(ROOT .. "/data/quickstart/heldout.jsonl", tok, { seq_len = 512 })
local st = ex:stats()
check(st.examples == 120, "examples " .. st.examples)
check(st.records == 120 and st.trained_tokens > 0, "records/trained")

-- a template given as a function
local calls = 0
local ex2 <close> = mt.examples(ROOT .. "/data/quickstart/heldout.jsonl", tok, {
  seq_len = 512,
  template = function(messages, opts)
    calls = calls + 1
    local text = messages[#messages].content
    return text, { { 0, #text } }
  end,
})
check(calls == 120 and ex2:count() == 120, "function template")
return "ok"
