-- Data files through the bindings: CSV and TSV read as their JSONL twins (the fixtures
-- Python's csv module wrote), mixture entries {file=, weight=} in mt.records and
-- mt.examples, the same seed the same sample, and the refusals naming the file.
local mt = require("moontune")
local DATA = FIXTURE_DIR .. "/data"

local function check(cond, msg) if not cond then error(msg, 2) end end
local function raises(f, needle)
  local ok, err = pcall(f)
  check(not ok, "expected an error with: " .. needle)
  check(tostring(err):find(needle, 1, true), "error '" .. tostring(err) .. "' lacks: " .. needle)
end
local function contents(records)
  local out = {}
  for i, r in ipairs(records) do
    local parts = {}
    for _, m in ipairs(r.messages) do parts[#parts + 1] = m.role .. ":" .. m.content end
    out[i] = table.concat(parts, "|")
  end
  return out
end

local want = contents(mt.records(DATA .. "/mixed_fields.jsonl"))
for _, name in ipairs({ "mixed_fields.csv", "mixed_fields.tsv" }) do
  local got = contents(mt.records(DATA .. "/" .. name))
  check(#got == #want, name .. ": " .. #got .. " records")
  for i = 1, #want do check(got[i] == want[i], name .. " record " .. i .. ": " .. got[i]) end
end
local chat = mt.records(DATA .. "/chat_messages.csv")
check(chat[2].messages[3].content == "yes" and chat[2].format == "chat", "messages column")

-- mixtures: counts, the sample fixed by mix_seed
local mix = mt.records({ { file = DATA .. "/mixed_fields.csv", weight = 2 },
                         { file = DATA .. "/alpaca.jsonl", weight = 0.5 },
                         DATA .. "/chat_messages.csv" }, { mix_seed = 3 })
check(#mix == 12 + 2 + 2, "mixture of 12 + 2 + 2 records, found " .. #mix)
check(mix[13].file == DATA .. "/alpaca.jsonl" and mix[15].file == DATA .. "/chat_messages.csv", "files in order")
local function sample(seed)
  local r = mt.records({ { file = DATA .. "/mixed_fields.jsonl", weight = 0.5 } }, { mix_seed = seed })
  local lines = {}
  for i, x in ipairs(r) do lines[i] = x.line end
  return table.concat(lines, ",")
end
check(sample(1) == sample(1), "the same seed, the same sample")
local differs = false
for seed = 2, 9 do differs = differs or sample(seed) ~= sample(1) end
check(differs, "other seeds choose other records")

local tok = mt.tokenizer(FIXTURE_DIR .. "/tiny_chat")
local ex = mt.examples({ { file = DATA .. "/tiny_chat_train.jsonl", weight = 3 } }, tok, { seq_len = 64 })
local once = mt.examples(DATA .. "/tiny_chat_train.jsonl", tok, { seq_len = 64 })
check(ex:count() == 3 * once:count(), "weight 3 triples the examples: " .. ex:count() .. " vs " .. once:count())

raises(function() mt.records({ { file = DATA .. "/alpaca.jsonl", weight = 0 } }) end, "alpaca.jsonl: a mixture weight")
raises(function() mt.records({ { file = DATA .. "/alpaca.jsonl", weight = "2" } }) end, "'weight' must be a number")
raises(function() mt.records({ { path = DATA .. "/alpaca.jsonl" } }) end, "unknown key 'path'")
raises(function() mt.records({ 7 }) end, "expected a path or {file=, weight=}")
-- the tokenized-example cache (MOONTUNE_CACHE_DIR is a fresh directory for this test):
-- a second read of the same inputs comes from it, equal to the first; a change of any
-- input misses
local function batches(ex)
  local b <close> = mt.batcher(ex, { batch = 2, seq_len = 64, seed = 5 })
  local out = {}
  for _ = 1, 3 do
    local batch = b:next()
    out[#out + 1] = table.concat(batch:tokens(), ",") .. ";" .. table.concat(batch:targets(), ",")
  end
  return table.concat(out, "/")
end
local function stats_text(ex)
  local st = ex:stats()
  return table.concat({ st.examples, st.tokens, st.trained_tokens, st.truncated_prompt,
                        st.dropped_no_target }, ",")
end
local TRAIN = DATA .. "/tiny_chat_train.jsonl"
local first = mt.examples(TRAIN, tok, { seq_len = 48 })
check(not first:stats().cached, "the first read tokenizes")
local again = mt.examples(TRAIN, tok, { seq_len = 48 })
check(again:stats().cached, "the second read comes from the cache")
check(stats_text(again) == stats_text(first), "cached stats " .. stats_text(again) .. " vs " .. stats_text(first))
check(batches(again) == batches(first), "cached batches equal the tokenized ones")
check(not mt.examples(TRAIN, tok, { seq_len = 40 }):stats().cached, "seq_len is in the key")
check(not mt.examples(TRAIN, tok, { seq_len = 48, template = "chatml" }):stats().cached, "the template is in the key")
check(not mt.examples(TRAIN, tok, { seq_len = 48, train_on_inputs = true }):stats().cached, "train_on_inputs")
check(not mt.examples({ { file = TRAIN, weight = 2 } }, tok, { seq_len = 48 }):stats().cached, "the weight")
check(not mt.examples(TRAIN, tok, { seq_len = 48, cache = false }):stats().cached, "cache = false")
-- another tokenizer with the same vocabulary size is another key
local tok2 = mt.tokenizer(FIXTURE_DIR .. "/tokenizer/smollm2")
check(not mt.examples(DATA .. "/alpaca.jsonl", tok2, { seq_len = 48 }):stats().cached, "tok2 first")
check(mt.examples(DATA .. "/alpaca.jsonl", tok2, { seq_len = 48 }):stats().cached, "tok2 second")
-- a data file whose bytes change misses, even at the same path and size
local copy = TMP .. "/train_copy.jsonl"
local src = assert(io.open(TRAIN, "rb")):read("a")
local f = assert(io.open(copy, "wb")); f:write(src); f:close()
-- the key is the content, not the path: the same bytes elsewhere hit
check(mt.examples(copy, tok, { seq_len = 48 }):stats().cached, "the same bytes at another path")
local changed = src:gsub('("content": ")(%a)', function(p, c) return p .. (c == "X" and "Y" or "X") end, 1)
check(#changed == #src and changed ~= src, "one letter changed")
f = assert(io.open(copy, "wb")); f:write(changed); f:close()
check(not mt.examples(copy, tok, { seq_len = 48 }):stats().cached, "changed data misses")
return "ok"
