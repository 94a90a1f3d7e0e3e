-- The data checks (moontune.checks) on small record sets: each warning, the leakage
-- refusal, and silence on clean data.
local checks = require("moontune.checks")

local function chat(user, reply, line)
  return { file = "t.jsonl", line = line, messages = { { role = "user", content = user },
                                                       { role = "assistant", content = reply } } }
end
local function find(list, pattern)
  for _, s in ipairs(list) do if s:find(pattern) then return s end end
  return nil
end

-- clean data of 600 examples: no warning, no note about the count
local clean = {}
for i = 1, 600 do clean[i] = chat("question " .. i, "answer " .. i, i) end
local r = checks.data(clean, { chat("other question", "other answer", 1) }, { steps = 150, batch = 4 })
assert(#r.warnings == 0, "clean data warns: " .. table.concat(r.warnings, "; "))
assert(r.duplicates == 0 and r.near_duplicates == 0 and r.leaked == 0, "clean counts")
assert(find(r.notes, "budget: 150 optimizer steps = 1.0 passes over 600 examples"),
       table.concat(r.notes, "; "))
-- with packing the batcher's steps per epoch decide, not the examples per step
local rp = checks.data(clean, nil, { steps = 75, steps_per_epoch = 75, batch = 4 })
assert(find(rp.notes, "budget: 75 optimizer steps = 1.0 passes over 600 examples"), table.concat(rp.notes, "; "))
checks.refuse_leakage(r) -- nothing leaked: no error

-- too few examples warn; a few hundred get a note
assert(find(checks.data({ chat("a", "b", 1) }, nil, {}).warnings, "only 1 training examples"), "few")
local some = {}
for i = 1, 200 do some[i] = chat("q" .. i, "a" .. i, i) end
assert(find(checks.data(some, nil, {}).notes, "200 training examples: 500 or more"), "some")

-- duplicates: exact, and near (case, punctuation, spacing)
local dup = {}
for i = 1, 150 do dup[i] = chat("question " .. i, "answer " .. i, i) end
dup[151] = chat("question 1", "answer 1", 151)          -- exact
dup[152] = chat("Question  2!", "Answer 2.", 152)       -- near
local rd = checks.data(dup, nil, {})
assert(rd.duplicates == 1, "exact duplicates: " .. rd.duplicates)
assert(rd.near_duplicates == 1, "near duplicates: " .. rd.near_duplicates)
assert(find(rd.warnings, "1 training examples are exact duplicates"), table.concat(rd.warnings, "; "))
assert(find(rd.warnings, "t.jsonl:152 repeats t.jsonl:2"), table.concat(rd.warnings, "; "))

-- empty and repeated responses
local resp = {}
for i = 1, 150 do resp[i] = chat("q" .. i, i <= 30 and "I cannot help with that." or ("a" .. i), i) end
resp[151] = chat("q151", "   ", 151)
local rr = checks.data(resp, nil, {})
assert(rr.empty_responses == 1, "empty responses")
assert(find(rr.warnings, "1 training examples have an empty response"), "empty warning")
assert(rr.repeated_response and rr.repeated_response.count == 30, "repeated response")
assert(find(rr.warnings, "30 of 151 responses are the same text"), table.concat(rr.warnings, "; "))

-- leakage: held-out examples found (up to normalisation) in the training set are refused
local held = { chat("QUESTION 7", "answer 7", 1), chat("fresh", "new", 2), chat("question 9", "answer 9.", 3) }
local rl = checks.data(clean, held, {})
assert(rl.leaked == 2, "leaked: " .. rl.leaked)
local ok, err = pcall(checks.refuse_leakage, rl)
assert(not ok and err:find("2 held%-out examples also occur in the training data %(t.jsonl:1, t.jsonl:3%)"),
       tostring(err))
assert(err:find("allow_leakage = true"), "says how to allow it")
checks.refuse_leakage(rl, true) -- allowed

-- truncation and the budget come from the examples' statistics
local fake_examples = { stats = function() return { examples = 100, truncated_prompt = 6, truncated_response = 4,
                                                     trained_tokens = 5000 } end }
local rt = checks.data(clean, nil, { train = fake_examples, steps = 10, batch = 4 })
assert(find(rt.warnings, "10%% of the training examples are truncated"), table.concat(rt.warnings, "; "))
assert(find(rt.warnings, "the step budget covers only 7%% of the training examples once"), table.concat(rt.warnings, "; "))

-- the printed report: a summary line, then one line per finding
local lines = {}
checks.print(rd, { write = function(_, s) lines[#lines + 1] = s end }, "lora_sft")
assert(lines[1]:find("^lora_sft: 152 training examples, 0 held out; 1 duplicates, 1 near%-duplicates"), lines[1])
assert(find(lines, "^lora_sft: WARNING: 1 training examples are exact duplicates"), "warning line")
