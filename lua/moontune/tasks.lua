-- moontune.tasks — task evaluation on held-out records: generate an answer for each
-- prompt and score it against the reference with a Lua metric (exact match by
-- default), plus the before/after comparison a fine-tuning run reports.
--
--     local tasks = require("moontune.tasks")
--     local items = tasks.items(mt.records("heldout.jsonl"))
--     local r = tasks.evaluate(mt, model, tok, items, { max_new_tokens = 64 })
--     print(r.accuracy)            -- share of items whose metric returned true
--
-- mt is the moontune module (an argument so that tests can pass a fake).
local M = {}

local function trim(s)
  return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end

-- The default metric: the generated text equals the reference, ignoring surrounding
-- whitespace.
function M.exact_match(output, reference)
  return trim(output) == trim(reference)
end

-- Items {system=, prompt=, reference=} from chat records (mt.records): the prompt is
-- the last user message before the final assistant reply, the reference that reply,
-- the system message the first one (or nil). Records without an assistant reply after
-- a user message raise an error naming the file and line.
function M.items(records)
  local items = {}
  for i, rec in ipairs(records) do
    local msgs = rec.messages or {}
    local last = msgs[#msgs]
    local user = msgs[#msgs - 1]
    if not (last and last.role == "assistant" and user and user.role == "user") then
      error(string.format("%s:%d: record %d does not end with a user message and an " ..
                          "assistant reply", rec.file or "?", rec.line or 0, i), 2)
    end
    items[#items + 1] = {
      system = msgs[1].role == "system" and msgs[1].content or nil,
      prompt = user.content,
      reference = last.content,
    }
  end
  return items
end

-- Generates greedily for every item (batched; items sharing a system prompt go
-- together) and scores each with opts.metric(output, reference) (default exact_match).
-- opts: metric, max_new_tokens (default 128), batch (sequences decoded together,
-- default 16), template, int8 (default true: int8 weight products where the CPU has
-- them, mt.generate); temperature and seed sample instead (mt.generate: the item at
-- position j of its system-prompt group draws with seed + j - 1). Adapters are put in
-- evaluation mode for the pass and back in training mode after it. In a data-parallel
-- job each rank generates for every world_size-th item and the ranks exchange their
-- answers, so every rank returns the whole result.
-- opts.stop_on_mismatch (default false; only with the exact_match metric): an answer
-- ends as soon as it can no longer equal its reference (mt.generate's expect), so a
-- wrong answer costs the tokens up to its first wrong character instead of
-- max_new_tokens. The scores are those of whole answers; the outputs of wrong answers
-- are cut there, except for the first opts.full_answers items (default 0), which run to
-- their end (to be shown).
-- Returns { accuracy, correct, n, outputs = {text...}, passed = {bool...}, seconds,
--           new_tokens, tokens_per_second, int8 (projections multiplied in int8),
--           cut (answers ended at a mismatch) }.
function M.evaluate(mt, model, tok, items, opts)
  opts = opts or {}
  local metric = opts.metric or M.exact_match
  local stop_on_mismatch = opts.stop_on_mismatch and true or false
  if stop_on_mismatch and metric ~= M.exact_match then
    error("tasks.evaluate: stop_on_mismatch needs the exact_match metric (an answer cut at " ..
          "its first wrong character is only known to fail exact match)", 2)
  end
  local full_answers = opts.full_answers or 0
  local t0 = mt.now()
  local groups, order = {}, {}
  local rank = type(mt.rank) == "function" and mt.rank() or 0
  local world = type(mt.world_size) == "function" and mt.world_size() or 1
  for i, item in ipairs(items) do
    if (i - 1) % world ~= rank then goto next_item end
    local key = item.system or "\0none"
    if not groups[key] then
      groups[key] = { system = item.system, prompts = {}, index = {}, expect = {} }
      order[#order + 1] = key
    end
    local g = groups[key]
    g.prompts[#g.prompts + 1] = item.prompt
    g.index[#g.index + 1] = i
    -- a reference that is not text gets no expectation (the metric then reports it)
    g.expect[#g.expect + 1] = stop_on_mismatch and i > full_answers and
                              type(item.reference) == "string" and item.reference or false
    ::next_item::
  end
  model:set_training(false)
  local outputs, new_tokens, int8, cut = {}, 0, 0, 0
  local ok, err = pcall(function()
    for _, key in ipairs(order) do
      local g = groups[key]
      local texts, infos = mt.generate(model, tok, g.prompts, {
        system = g.system, template = opts.template,
        max_new_tokens = opts.max_new_tokens or 128, batch = opts.batch or 16,
        temperature = opts.temperature, seed = opts.seed, int8 = opts.int8 ~= false,
        expect = stop_on_mismatch and g.expect or nil,
      })
      for j, text in ipairs(texts) do
        outputs[g.index[j]] = text
        if infos[j].reason == "mismatch" then cut = cut + 1 end
        new_tokens = new_tokens + infos[j].new_tokens
        int8 = math.max(int8, infos[j].int8)
      end
    end
  end)
  model:set_training(true)
  if not ok then error(err, 0) end
  if world > 1 then -- every rank's answers on every rank
    for r = 0, world - 1 do -- texts as they are (any bytes), one at a time
      for i = r + 1, #items, world do outputs[i] = mt.broadcast(r == rank and outputs[i] or "", r) end
    end
    new_tokens = mt.all_sum(new_tokens)
    cut = mt.all_sum(cut)
  end
  local correct, passed = 0, {}
  for i, item in ipairs(items) do
    passed[i] = metric(outputs[i], item.reference) and true or false
    if passed[i] then correct = correct + 1 end
  end
  local seconds = mt.now() - t0
  return {
    accuracy = #items > 0 and correct / #items or 0,
    correct = correct, n = #items, outputs = outputs, passed = passed,
    seconds = seconds, new_tokens = new_tokens,
    tokens_per_second = seconds > 0 and new_tokens / seconds or 0, int8 = int8, cut = cut,
  }
end

-- The relative change of a "lower is better" number (perplexity): (after - before) /
-- before; 0.1 = 10% worse.
function M.relative_change(before, after)
  return (after - before) / before
end

return M
