-- moontune.checks — the data checks every recipe runs before it trains: too few
-- examples, duplicates, held-out examples that leak from the training set, empty or
-- repeated responses, truncation, and the token budget against the step budget.
--
--     local checks = require("moontune.checks")
--     local report = checks.data(mt.records(train_file), mt.records(heldout_file),
--                                { train = train_examples, epochs = 3, steps = 120 })
--     checks.print(report, io.stdout)     -- one line per finding
--     checks.refuse_leakage(report)       -- error unless report.leaked == 0
--
-- Records are mt.records' normalised records ({messages = ...} or {text = ...}); a
-- record's text is its messages' contents joined (or its text), its response the last
-- assistant message. Two records are near-duplicates when their texts are equal after
-- normalising: lower case, punctuation dropped, white space collapsed.
local M = {}

-- Below these counts the report warns, then notes (the usual advice is 500+).
M.FEW_EXAMPLES = 100
M.SOME_EXAMPLES = 500
-- A response shared by more than this share of the examples (and at least 3) is
-- reported as repeated: the model learns to answer it whatever the question.
M.REPEATED_SHARE = 0.10
-- Truncating more than this share of the examples is reported.
M.TRUNCATED_SHARE = 0.05

local function record_text(rec)
  if rec.messages then
    local parts = {}
    for i, m in ipairs(rec.messages) do parts[i] = (m.role or "") .. ": " .. (m.content or "") end
    return table.concat(parts, "\n")
  end
  return rec.text or ""
end

local function record_response(rec)
  local msgs = rec.messages
  if not msgs then return nil end
  for i = #msgs, 1, -1 do
    if msgs[i].role == "assistant" then return msgs[i].content or "" end
  end
  return nil
end

-- Lower case, punctuation dropped, white space collapsed and trimmed.
function M.normalise(text)
  return (text:lower():gsub("%p", " "):gsub("%s+", " "):gsub("^ ", ""):gsub(" $", ""))
end

local function where(rec)
  return string.format("%s:%s", rec.file or "?", tostring(rec.line or "?"))
end

-- The report on the training records (and the held-out ones, when given).
-- opts: train (Examples, for truncation and token counts), steps (the optimizer-step
-- budget) with steps_per_epoch (the batcher's batches per epoch over the
-- accumulation: exact when examples are packed), or else batch (examples per step).
function M.data(train_records, heldout_records, opts)
  opts = opts or {}
  local r = { examples = #train_records, heldout = heldout_records and #heldout_records or 0,
              warnings = {}, notes = {}, duplicates = 0, near_duplicates = 0, leaked = 0,
              empty_responses = 0, leaked_at = {} }
  local function warn(fmt, ...) r.warnings[#r.warnings + 1] = string.format(fmt, ...) end
  local function note(fmt, ...) r.notes[#r.notes + 1] = string.format(fmt, ...) end

  if r.examples < M.FEW_EXAMPLES then
    warn("only %d training examples: under %d a model rarely learns a task reliably; 500 or more is the usual advice",
         r.examples, M.FEW_EXAMPLES)
  elseif r.examples < M.SOME_EXAMPLES then
    note("%d training examples: 500 or more is the usual advice", r.examples)
  end

  -- duplicates: exact (same text) and near (same normalised text)
  local exact, near, first_near = {}, {}, nil
  local responses, n_responses = {}, 0
  for _, rec in ipairs(train_records) do
    local text = record_text(rec)
    local exact_dup = exact[text]
    if exact_dup then r.duplicates = r.duplicates + 1 else exact[text] = true end
    local key = M.normalise(text)
    if near[key] then
      r.near_duplicates = r.near_duplicates + 1
      if not exact_dup and not first_near then
        first_near = string.format("%s repeats %s", where(rec), near[key])
      end
    else
      near[key] = where(rec)
    end
    local resp = record_response(rec)
    if resp then
      n_responses = n_responses + 1
      if resp:match("^%s*$") then r.empty_responses = r.empty_responses + 1
      else responses[resp] = (responses[resp] or 0) + 1 end
    end
  end
  r.near_duplicates = r.near_duplicates - r.duplicates -- the exact ones counted once
  if r.duplicates > 0 then
    warn("%d training examples are exact duplicates of earlier ones (they weigh double)", r.duplicates)
  end
  if r.near_duplicates > 0 then
    warn("%d more training examples repeat an earlier one but for case, punctuation or spacing (first: %s)",
         r.near_duplicates, first_near or "?")
  end
  if r.empty_responses > 0 then
    warn("%d training examples have an empty response: the model learns to answer nothing", r.empty_responses)
  end
  local top, top_n = nil, 0
  for resp, n in pairs(responses) do
    if n > top_n or (n == top_n and top and resp < top) then top, top_n = resp, n end
  end
  r.repeated_response = top_n >= 3 and n_responses > 0 and top_n / n_responses > M.REPEATED_SHARE and
                        { text = top, count = top_n } or nil
  if r.repeated_response then
    warn("%d of %d responses are the same text (%q): the model learns to give it whatever the question",
         top_n, n_responses, #top > 60 and top:sub(1, 57) .. "..." or top)
  end

  -- leakage: held-out examples whose normalised text is in the training set
  for _, rec in ipairs(heldout_records or {}) do
    if near[M.normalise(record_text(rec))] then
      r.leaked = r.leaked + 1
      if #r.leaked_at < 3 then r.leaked_at[#r.leaked_at + 1] = where(rec) end
    end
  end

  -- truncation and the budget, from the rendered examples
  local st = opts.train and opts.train.stats and opts.train:stats()
  if st then
    local truncated = st.truncated_prompt + st.truncated_response
    r.truncated_share = st.examples > 0 and truncated / st.examples or 0
    if r.truncated_share > M.TRUNCATED_SHARE then
      warn("%.0f%% of the training examples are truncated to seq_len (%d of %d): raise seq_len or shorten them",
           100 * r.truncated_share, truncated, st.examples)
    end
    r.trained_tokens = st.trained_tokens
  end
  if opts.steps then
    local passes
    if opts.steps_per_epoch and opts.steps_per_epoch > 0 then passes = opts.steps / opts.steps_per_epoch
    else passes = r.examples > 0 and opts.steps * (opts.batch or 1) / r.examples or 0 end
    r.budget = { steps = opts.steps, passes = passes }
    note("budget: %d optimizer steps = %.1f passes over %d examples%s", opts.steps, passes, r.examples,
         r.trained_tokens and string.format(" (%d trained tokens per pass)", r.trained_tokens) or "")
    if r.budget.passes < 0.5 then
      warn("the step budget covers only %.0f%% of the training examples once", 100 * r.budget.passes)
    end
  end
  return r
end

-- Prints the report, one line per finding, each prefixed with `label`.
function M.print(r, out, label)
  out = out or io.stdout
  label = label or "data"
  out:write(string.format("%s: %d training examples, %d held out; %d duplicates, %d near-duplicates, " ..
                          "%d leaked into the held-out set, %d empty responses%s\n", label, r.examples,
                          r.heldout, r.duplicates, r.near_duplicates, r.leaked, r.empty_responses,
                          r.truncated_share and string.format(", %.1f%% truncated", 100 * r.truncated_share) or ""))
  for _, w in ipairs(r.warnings) do out:write(string.format("%s: WARNING: %s\n", label, w)) end
  for _, n in ipairs(r.notes) do out:write(string.format("%s: note: %s\n", label, n)) end
end

-- Raises an error when held-out examples also occur in the training set: the held-out
-- numbers would measure memory, not learning.
function M.refuse_leakage(r, allow)
  if r.leaked == 0 or allow then return end
  error(string.format("data: %d held-out examples also occur in the training data (%s): held-out " ..
                      "numbers would measure memory, not learning; remove them, or set " ..
                      "allow_leakage = true", r.leaked, table.concat(r.leaked_at, ", ")), 0)
end

return M
