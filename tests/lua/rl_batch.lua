-- mt.generate(..., {ids = true}) and mt.rl_batch: what GRPO's rollouts are made of.
local mt = require("moontune")
local function check(cond, msg) if not cond then error(msg, 2) end end

local dir = FIXTURE_DIR .. "/tiny_chat"
local model <close> = mt.model(dir)
local tok <close> = mt.tokenizer(dir)
model:plan(4, 64)

-- sampling at temperature 1 records each drawn token's log-probability; they must be what
-- the training forward pass gives: the mean NLL of the completion (mt.evaluate on the same
-- ids, the completion trainable) is minus their mean
local texts, infos = mt.generate(model, tok, { "Tell me a story.", "Count to three." },
                                 { max_new_tokens = 9, temperature = 1.0, seed = 5, ids = true })
check(#texts == 2, "two texts")
for i, info in ipairs(infos) do
  check(#info.prompt_ids == info.prompt_tokens and #info.ids == info.new_tokens and #info.logps == #info.ids,
        "prompt " .. i .. ": ids and logps as long as the counts")
  local ids, trainable, sum = {}, {}, 0
  for _, id in ipairs(info.prompt_ids) do ids[#ids + 1] = id; trainable[#trainable + 1] = false end
  for j, id in ipairs(info.ids) do
    check(info.logps[j] <= 0, "a log-probability above 0")
    ids[#ids + 1] = id; trainable[#trainable + 1] = true
    sum = sum + info.logps[j]
  end
  local ex = mt.examples_from_ids({ { ids = ids, trainable = trainable } }, { seq_len = 64 })
  local r = mt.evaluate(model, ex, { batch = 1, seq_len = 64 })
  local mean = -sum / #info.ids
  check(math.abs(r.loss - mean) <= 1e-4 * math.abs(mean),
        string.format("prompt %d: the recorded logps give NLL %.7g, the training pass %.7g", i, mean, r.loss))
end
-- at a temperature the logps are of the softened distribution: greedy (temperature 0)
-- records T = 1 and picks the most likely token, so its logp is the largest
local _, g = mt.generate(model, tok, "Tell me a story.", { max_new_tokens = 3, ids = true })
check(#g.logps == g.new_tokens, "greedy logps")
local _, hot = mt.generate(model, tok, "Tell me a story.", { max_new_tokens = 3, ids = true, temperature = 4.0 })
check(hot.logps[1] < g.logps[1], "a hotter distribution gives its tokens less probability")
local _, plain = mt.generate(model, tok, "Tell me a story.", { max_new_tokens = 3 })
check(plain.ids == nil and plain.logps == nil, "without ids = true the info has no ids")

-- rl_batch: the prompt then the completion per row; targets on the completion tokens,
-- each at the position before it; old logps aligned with them; padding as the batcher's
local rows = {
  { prompt_ids = { 5, 6, 7 }, ids = { 8, 9 }, logps = { -0.5, -1.5 }, advantage = 0.75 },
  { prompt_ids = { 5, 6 }, ids = { 10, 11, 12, 13 }, logps = { -1, -2, -3, -4 }, advantage = -1.25 },
  { prompt_ids = { 4 }, ids = {}, logps = {}, advantage = 0 },
}
local b = mt.rl_batch(rows, { seq_len = 16 })
local B, T = b:shape()
check(B == 3 and T == 6, string.format("shape %dx%d, want 3x6 (the longest row)", B, T))
local tokens, targets = b:tokens(), b:targets()
local want_tokens = { 5, 6, 7, 8, 9, 0, 5, 6, 10, 11, 12, 13, 4, 0, 0, 0, 0, 0 }
local I = -100
local want_targets = { I, I, 8, 9, I, I, I, 10, 11, 12, 13, I, I, I, I, I, I, I }
for k = 1, B * T do
  check(tokens[k] == want_tokens[k], string.format("tokens[%d] = %d, want %d", k, tokens[k], want_tokens[k]))
  check(targets[k] == want_targets[k], string.format("targets[%d] = %d, want %d", k, targets[k], want_targets[k]))
end
local function refuses(rows_, opts, needle)
  local ok, err = pcall(mt.rl_batch, rows_, opts)
  check(not ok and tostring(err):find(needle, 1, true), string.format("expected an error with %q, got %s", needle, tostring(err)))
end
refuses({ { prompt_ids = { 1 }, ids = { 2 }, logps = {}, advantage = 1 } }, {}, "one log-probability per completion token")
refuses({ { prompt_ids = { 1 }, ids = { 2 }, logps = { -1 }, advantage = 0 / 0 } }, {}, "'advantage' must be a finite number")
refuses({ { prompt_ids = { 1 }, ids = { 2 }, logps = { 0.5 }, advantage = 1 } }, {}, "is not a log-probability")
refuses({ { prompt_ids = {}, ids = { 2 }, logps = { -1 }, advantage = 1 } }, {}, "empty prompt")
refuses({ { prompt_ids = { 1, 2, 3 }, ids = { 2 }, logps = { -1 }, advantage = 1 } }, { seq_len = 3 }, "more than seq_len")
refuses({ { prompt_ids = { 1, -2 }, ids = { 2 }, logps = { -1 }, advantage = 1 } }, {}, "is not a token id")
refuses({}, {}, "rl_batch: 0 rows")
print("rl_batch: generate ids and logps match the training pass; rl_batch lays out rows and refuses bad ones")
return "ok"
