-- moontune.trainer — the training workflow: policy in Lua, one C call per step.
--
--     local trainer = require("moontune.trainer")
--     local result = trainer.run(cfg, mt)
--
-- mt is the moontune module (require("moontune")); it is an argument so that tests can
-- pass a fake. The loop calls, per optimizer step, batcher:next() grad_accum times and
-- then mt.train_step once; Lua never runs per token.
--
-- cfg (a plain table; * = required). train_examples (optional) only feeds the
-- statistics `moontune validate` prints.
-- cfg (a plain table; * = required):
--   model*, loss*, optimizer*   the core objects handed to mt.train_step and checkpoints
--   batcher*                    mt.batcher(...): next(), cursor(), set_cursor(),
--                               batches_per_epoch()
--   lr*                         the base learning rate
--   out_dir*                    run directory (must exist): metrics.jsonl, loss.svg and
--                               the checkpoints go here
--   epochs = 1                  passes over the data ...
--   max_steps = nil             ... or a step budget; when given it wins over epochs
--   grad_accum = 1              micro-batches per optimizer step
--   max_grad_norm = 1.0         gradient clipping (false = none)
--   scheduler = nil             a scheduler Plugin: lr = mt.schedule(scheduler, step, total, lr)
--   schedule = nil              or a Lua function(step, total, base_lr) -> lr;
--                               neither: constant lr
--   eval_examples = nil         held-out Examples for mt.evaluate
--   eval_opts = {}              options for mt.evaluate ({batch=, seq_len=})
--   eval_every = nil            evaluate every N steps (nil or 0: only at the end; always at the end when
--                               eval_examples or metrics are given)
--   metrics = {}                name -> function(state) -> number, run at each evaluation
--                               after mt.evaluate; the value lands in state.metrics[name]
--   early_stopping = nil        { metric = "eval_loss", mode = "min" | "max", patience = 3,
--                                 min_delta = 0, restore_best = true }
--                               An evaluation improves when the metric beats the best by
--                               more than min_delta; after `patience` evaluations in a row
--                               without improvement training stops. Each improvement
--                               saves a checkpoint (the best); with restore_best it is
--                               loaded back at the end.
--   callbacks = nil             { on_train_begin=, on_step_end=, on_evaluate=, on_save=,
--                                 on_train_end= } or a list of such tables (see below)
--   max_bad_steps = 5           non-finite / skipped steps in a row before an error
--   save_every = nil            checkpoint every N steps (nil or 0: only at the end; always at the end)
--   keep_last = 2               checkpoints kept by mt.checkpoint_prune besides the best
--   resume = nil                a checkpoint path, or true = mt.checkpoint_latest(out_dir)
--                               (true with no checkpoint starts fresh). A resume refuses a
--                               checkpoint whose recipe text or settings (the resolved
--                               mt.config table and this cfg's lr, step budget,
--                               accumulation, clipping, intervals, early stopping, batches
--                               per epoch) differ from this run's, listing the differences
--   allow_changes = nil         resume anyway and log the differences (default: the
--                               command line's --allow-changes)
--   recipe = nil, plugins = nil, rng = nil   stored in every checkpoint as they are (recipe
--                               defaults to the text of the recipe `moontune run` runs)
--   progress = true             a \r progress bar on a terminal; false = plain lines
--   is_tty = nil                override terminal detection (default: $TERM set and
--                               not "dumb")
--   log_every = 10              plain log line every N steps (not on a terminal)
--   output = io.stdout          where progress and log lines go (anything with :write)
--   clock = mt.now or os.clock  function() -> seconds, for tokens/s, ETA and time
--   plot = true                 write <out_dir>/loss.svg at the end
--
-- Callbacks: each hook is called as hook(state, control [, extra]); on_save gets the
-- checkpoint path as extra. state (read it, do not replace its fields):
--   step, total_steps, epoch, loss, lr, grad_norm, tokens, metrics (the latest
--   evaluation: eval_loss, eval_perplexity, eval_tokens_per_second and the cfg.metrics),
--   best = { metric, value, step, path } or nil, bad_steps, stopped_early
-- control:
--   control:stop()        stop after this step (after any requested evaluate/save)
--   control:set_lr(x)     ABSOLUTE learning rate used from the next step on, replacing
--                         the schedule for the rest of the run (saved in checkpoints)
--   control:evaluate()    evaluate after this step
--   control:save()        save a checkpoint after this step
--
-- Result: { steps, best, stopped_early, history = { train = {{step, loss}...},
--           eval = {{step, metrics}...} }, out_dir, seconds, restored_best,
--           tokens, step_seconds, tokens_per_second }
-- tokens counts what the model ran in training steps (prompt and reply tokens, no
-- padding; the batcher's info.tokens), step_seconds the time inside those steps (not
-- evaluations or checkpoints), and tokens_per_second is their ratio — as in the progress
-- line and metrics.jsonl ("tokens" there is the step's loss tokens, "input_tokens" what
-- it ran).
--
-- Checkpoint metrics carry, besides the evaluation's numbers, trainer_bad_evals,
-- trainer_lr_override, trainer_best_value/_step/_saved so that a resumed run keeps its
-- early-stopping state and set_lr (the core keeps at most 16 metrics in all).

local M = {}

-- ---------------------------------------------------------------------------
-- JSON (just enough for metrics.jsonl)

local function is_finite(x)
  return type(x) == "number" and x == x and x ~= math.huge and x ~= -math.huge
end

local function json_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    local named = { ['"'] = '\\"', ['\\'] = '\\\\', ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t' }
    return named[c] or string.format("\\u%04x", c:byte())
  end) .. '"'
end

local function json_encode(v)
  local t = type(v)
  if t == "number" then
    if math.type(v) == "integer" then return string.format("%d", v) end
    if not is_finite(v) then return "null" end
    return string.format("%.17g", v)
  elseif t == "string" then
    return json_string(v)
  elseif t == "boolean" then
    return tostring(v)
  elseif t == "table" then
    if #v > 0 then
      local out = {}
      for i = 1, #v do out[i] = json_encode(v[i]) end
      return "[" .. table.concat(out, ",") .. "]"
    end
    local keys = {}
    for k in pairs(v) do
      if type(k) == "string" then keys[#keys + 1] = k end
    end
    table.sort(keys)
    local out = {}
    for i, k in ipairs(keys) do out[i] = json_string(k) .. ":" .. json_encode(v[k]) end
    return "{" .. table.concat(out, ",") .. "}"
  end
  return "null"
end
M.json_encode = json_encode

-- ---------------------------------------------------------------------------
-- helpers

local function fail(fmt, ...)
  error("trainer: " .. string.format(fmt, ...), 0)
end

local function hooks_of(callbacks)
  if callbacks == nil then return {} end
  if type(callbacks) ~= "table" then fail("cfg.callbacks must be a table, got %s", type(callbacks)) end
  local list = (#callbacks > 0) and callbacks or { callbacks }
  for i, cb in ipairs(list) do
    if type(cb) ~= "table" then fail("cfg.callbacks[%d] must be a table of hooks", i) end
  end
  return list
end

local function format_time(s)
  s = math.max(0, math.floor(s + 0.5))
  return string.format("%d:%02d:%02d", s // 3600, (s % 3600) // 60, s % 60)
end

local function fmt_num(x, f)
  if not is_finite(x) then return tostring(x) end
  return string.format(f, x)
end

-- Is `v` better than `best` by more than min_delta under mode?
local function improves(v, best, mode, min_delta)
  if best == nil then return true end
  if mode == "max" then return v > best + min_delta end
  return v < best - min_delta
end

-- Flattens nested tables into "a.b.c" -> scalar (JSON-like values only).
local function flatten(t, prefix, out)
  out = out or {}
  if type(t) ~= "table" then
    out[prefix] = t
    return out
  end
  for k, v in pairs(t) do
    local key = prefix and (prefix .. "." .. tostring(k)) or tostring(k)
    if type(v) == "table" then flatten(v, key, out)
    elseif type(v) ~= "function" and type(v) ~= "userdata" then out[key] = v end
  end
  return out
end

local function show(v)
  if v == nil then return "(none)" end
  if type(v) == "string" then return string.format("%q", v) end
  return tostring(v)
end

-- The differences between the settings a checkpoint recorded and this run's, as lines
-- "key: old -> new", sorted.
local function setting_changes(old, new)
  local a, b = flatten(old or {}), flatten(new or {})
  local keys, seen = {}, {}
  for k in pairs(a) do keys[#keys + 1] = k; seen[k] = true end
  for k in pairs(b) do if not seen[k] then keys[#keys + 1] = k end end
  table.sort(keys)
  local out = {}
  for _, k in ipairs(keys) do
    local x, y = a[k], b[k]
    local same = x == y or (type(x) == "number" and type(y) == "number" and x ~= x and y ~= y)
    if not same then out[#out + 1] = string.format("%s: %s -> %s", k, show(x), show(y)) end
  end
  return out
end

-- On resume from `last_step`: keeps the records of metrics.jsonl up to that step (the
-- steps after the checkpoint will run again) and drops a line torn by a kill, rewriting
-- the file atomically. Returns the kept records (nil when mt cannot decode JSON).
local function rewind_metrics(mt, mpath, last_step)
  if not (mt.json_decode and mt.write_file) then return nil end
  local f = io.open(mpath, "r")
  if not f then return {} end
  local text = f:read("a")
  f:close()
  local kept, records, torn, lineno = {}, {}, 0, 0
  for line in text:gmatch("[^\n]+") do
    lineno = lineno + 1
    local ok, rec = pcall(mt.json_decode, line, mpath .. ":" .. lineno)
    if not ok or type(rec) ~= "table" then
      torn = torn + 1
    elseif not (math.type(rec.step) == "integer" and rec.step > last_step) then
      kept[#kept + 1] = line
      records[#records + 1] = rec
    end
  end
  mt.write_file(mpath, #kept > 0 and table.concat(kept, "\n") .. "\n" or "")
  return records, torn
end

-- ---------------------------------------------------------------------------
-- the loop

function M.run(cfg, mt)
  if type(cfg) ~= "table" then fail("run(cfg, mt): cfg must be a table") end
  if type(mt) ~= "table" then fail("run(cfg, mt): mt must be the moontune module") end
  for _, key in ipairs({ "model", "loss", "optimizer", "batcher", "lr", "out_dir" }) do
    if cfg[key] == nil then fail("cfg.%s is required", key) end
  end
  if type(cfg.lr) ~= "number" or cfg.lr <= 0 then fail("cfg.lr must be a positive number, got %s", tostring(cfg.lr)) end
  if cfg.schedule ~= nil and type(cfg.schedule) ~= "function" then
    fail("cfg.schedule must be a function(step, total, base_lr), got %s", type(cfg.schedule))
  end

  local batcher = cfg.batcher
  local out_dir = cfg.out_dir
  local grad_accum = cfg.grad_accum or 1
  local max_grad_norm = cfg.max_grad_norm
  if max_grad_norm == nil then max_grad_norm = 1.0 end
  local max_bad = cfg.max_bad_steps or 5
  local keep_last = cfg.keep_last or 2
  -- wall-clock seconds from the core when it offers them (os.clock is CPU time, which
  -- counts every thread and so overstates the time of a multi-threaded step)
  local clock = cfg.clock or mt.now or os.clock
  local output = cfg.output or io.stdout
  local metric_fns = cfg.metrics or {}
  local hooks = hooks_of(cfg.callbacks)
  if math.type(grad_accum) ~= "integer" or grad_accum < 1 then
    fail("cfg.grad_accum must be an integer >= 1, got %s", tostring(grad_accum))
  end
  -- intervals: a positive integer, or nil / 0 for "only at the end"
  local function interval(key)
    local v = cfg[key]
    if v == nil or v == 0 then return nil end
    if math.type(v) ~= "integer" or v < 0 then
      fail("cfg.%s must be an integer >= 0 (0 or nil: only at the end), got %s", key, tostring(v))
    end
    return v
  end
  local eval_every, save_every = interval("eval_every"), interval("save_every")

  local es = cfg.early_stopping
  if es ~= nil then
    if type(es) ~= "table" then fail("cfg.early_stopping must be a table") end
    es = { metric = es.metric or "eval_loss", mode = es.mode or "min", patience = es.patience or 3,
           min_delta = es.min_delta or 0, restore_best = es.restore_best ~= false }
    if es.mode ~= "min" and es.mode ~= "max" then
      fail("cfg.early_stopping.mode must be \"min\" or \"max\", got %s", tostring(es.mode))
    end
  end
  local best_metric = es and es.metric or "eval_loss"
  local best_mode = es and es.mode or "min"
  local best_delta = es and es.min_delta or 0

  local has_eval = cfg.eval_examples ~= nil or next(metric_fns) ~= nil
  if es and not has_eval then fail("cfg.early_stopping needs cfg.eval_examples or cfg.metrics") end

  -- total steps
  local bpe = batcher:batches_per_epoch()
  local steps_per_epoch = math.max(1, bpe // grad_accum)
  local total = cfg.max_steps or (cfg.epochs or 1) * steps_per_epoch
  if math.type(total) ~= "integer" or total < 1 then fail("the step budget must be an integer >= 1, got %s", tostring(total)) end

  -- `moontune validate`: everything above has been checked; report and stop short of training
  if mt.validating and mt.validating() then
    local mib = function(b) return (b or 0) / 1048576 end
    local info = cfg.model:info()
    output:write(string.format("validate: %s model, %d parameters, %d layers, vocabulary %d\n",
                               info.model_type, info.params, info.layers, info.vocab))
    for _, kind in ipairs({ "loss", "optimizer", "scheduler" }) do
      local p = cfg[kind]
      if p and p.describe then
        local d = p:describe()
        output:write(string.format("validate: %s %s %s (%s)\n", d.kind, d.name, d.version, d.file))
      end
    end
    output:write(string.format("validate: %d optimizer steps (%d batches per epoch, accumulation %d)\n",
                               total, bpe, grad_accum))
    for name, ex in pairs({ training = cfg.train_examples, ["held-out"] = cfg.eval_examples }) do
      if ex and ex.stats then
        local st = ex:stats()
        output:write(string.format("validate: %s data: %d examples, %d tokens (mean %.1f, max %d), " ..
                                   "%d trained (%.1f%%), %d truncated, %d dropped\n", name,
                                   st.examples, st.tokens, st.mean_len, st.max_len, st.trained_tokens,
                                   100 * st.trained_fraction, st.truncated_prompt + st.truncated_response,
                                   st.dropped_too_long + st.dropped_no_target))
      end
    end
    -- AdamW keeps two moments per trained value
    local total_bytes = info.param_bytes + 3 * info.trainable_bytes + info.activation_bytes
    output:write(string.format("validate: memory estimate %.0f MiB (parameters %.0f, trainable and " ..
                               "optimizer state %.0f, activations %.0f)\n", mib(total_bytes),
                               mib(info.param_bytes), mib(3 * info.trainable_bytes),
                               mib(info.activation_bytes)))
    output:write("validate: ok\n")
    return { validated = true, steps = 0, total_steps = total }
  end

  local state = { step = 0, total_steps = total, epoch = 1, loss = nil, lr = cfg.lr, grad_norm = nil,
                  tokens = 0, metrics = {}, best = nil, bad_steps = 0, stopped_early = false }
  local history = { train = {}, eval = {} }
  local lr_override = nil
  local bad_evals = 0
  local saved = {} -- step -> path

  -- what this run is: the recipe's text and the settings a resume must find unchanged
  local info = mt.run_info and mt.run_info() or {}
  local allow_changes = cfg.allow_changes
  if allow_changes == nil then allow_changes = info.allow_changes end
  local recipe_text = cfg.recipe or info.recipe_text
  -- the config's own resume switch is the one setting a resume changes by design
  local config = info.config
  if type(config) == "table" and config.resume ~= nil then
    local c = {}
    for k, v in pairs(config) do if k ~= "resume" then c[k] = v end end
    config = c
  end
  local run_settings = {
    config = config,
    trainer = { lr = cfg.lr, total_steps = total, grad_accum = grad_accum,
                max_grad_norm = max_grad_norm or false, epochs = cfg.epochs or 1,
                max_steps = cfg.max_steps or false, batches_per_epoch = bpe,
                eval_every = eval_every or 0,
                early_stopping = es and { metric = es.metric, mode = es.mode, patience = es.patience,
                                          min_delta = es.min_delta, restore_best = es.restore_best } or false },
  }
  local resumed_from, changes, rewound = nil, nil, nil

  -- resume
  local start_step = 1
  if cfg.resume then
    local path = cfg.resume
    if path == true then path = mt.checkpoint_latest(out_dir) end
    if path then
      local st = mt.checkpoint_load(path, cfg.model, cfg.optimizer)
      if type(st) ~= "table" or math.type(st.step) ~= "integer" then fail("checkpoint %s has no step", tostring(path)) end
      changes = {}
      if st.run then
        changes = setting_changes(st.run, run_settings)
      end
      if recipe_text and st.recipe and st.recipe ~= "" and st.recipe ~= recipe_text then
        table.insert(changes, 1, string.format("recipe text: sha256 %s -> %s (the checkpoint holds the old one in recipe.lua)",
                                               st.recipe_sha256 and st.recipe_sha256:sub(1, 12) or "?",
                                               mt.sha256 and mt.sha256(recipe_text):sub(1, 12) or "?"))
      end
      if #changes > 0 and not allow_changes then
        -- the weights are restored already but nothing was written: refusing is safe
        fail("resume: %s was made with other settings than this run:\n  %s\n" ..
             "resuming would silently change the result; undo the changes, or pass --allow-changes " ..
             "(cfg.allow_changes) to resume with them", tostring(path), table.concat(changes, "\n  "))
      end
      if st.cursor then batcher:set_cursor(st.cursor) end
      start_step = st.step + 1
      state.step, state.epoch = st.step, st.epoch or 1
      local m = st.metrics or {}
      for k, v in pairs(m) do
        if not k:match("^trainer_") then state.metrics[k] = v end
      end
      lr_override = m.trainer_lr_override
      bad_evals = m.trainer_bad_evals or 0
      if m.trainer_best_value then
        local bstep = math.tointeger(m.trainer_best_step)
        state.best = { metric = best_metric, value = m.trainer_best_value, step = bstep }
        -- checkpoints are <run_dir>/checkpoints/step-%08d (core/store/checkpoint.c): the best
        -- one is the resumed one's sibling
        local parent = tostring(path):match("^(.-)step%-%d+/?$")
        if es and bstep and m.trainer_best_saved == 1 and parent then
          state.best.path = parent .. string.format("step-%08d", bstep)
        end
      end
      saved[st.step] = path
      resumed_from = path
    end
  end
  -- the remains of a run killed while saving or pruning go before anything else
  if mt.checkpoint_prune then
    mt.checkpoint_prune(out_dir, keep_last, es and state.best and state.best.step or nil)
  end

  -- output
  local mode = start_step > 1 and "a" or "w"
  local mpath = out_dir .. "/metrics.jsonl"
  local torn = 0
  if start_step > 1 then rewound, torn = rewind_metrics(mt, mpath, start_step - 1) end
  local mfile, merr = io.open(mpath, mode)
  if not mfile then fail("cannot write %s: %s (does out_dir exist?)", mpath, tostring(merr)) end
  local function log_json(rec)
    mfile:write(json_encode(rec), "\n")
    mfile:flush()
  end
  local tty = cfg.is_tty
  if tty == nil then
    local term = os.getenv("TERM")
    tty = term ~= nil and term ~= "" and term ~= "dumb"
  end
  local bar = cfg.progress ~= false and tty
  local bar_shown = false
  local function say(line)
    if bar_shown then output:write("\n"); bar_shown = false end
    output:write(line, "\n")
  end

  if rewound then
    -- the plot and the history cover the whole run, not only this segment
    for _, rec in ipairs(rewound) do
      if rec.type == "step" and not rec.skipped and type(rec.loss) == "number" then
        history.train[#history.train + 1] = { step = rec.step, loss = rec.loss }
      elseif rec.type == "eval" then
        local em = {}
        for k, v in pairs(rec) do
          if type(v) == "number" and k ~= "step" and k ~= "epoch" then em[k] = v end
        end
        history.eval[#history.eval + 1] = { step = rec.step, metrics = em }
      end
    end
  end
  if resumed_from then
    say(string.format("resumed from %s at step %d of %d%s", tostring(resumed_from), start_step - 1, total,
                      (torn or 0) > 0 and string.format(" (dropped %d unreadable line(s) of metrics.jsonl)", torn) or ""))
    for _, c in ipairs(changes or {}) do say("resume: changed since the checkpoint: " .. c) end
    log_json({ type = "resume", step = start_step - 1, path = tostring(resumed_from),
               changes = (changes and #changes > 0) and changes or nil })
  end

  -- control
  local req = { stop = false, evaluate = false, save = false }
  local control = {}
  function control:stop() req.stop = true end
  function control:set_lr(x)
    if not is_finite(x) or x < 0 then error("control:set_lr: want a finite lr >= 0, got " .. tostring(x), 2) end
    lr_override = x
  end
  function control:evaluate() req.evaluate = true end
  function control:save() req.save = true end
  local function fire(name, extra)
    for _, cb in ipairs(hooks) do
      local f = cb[name]
      if f then f(state, control, extra) end
    end
  end

  local function checkpoint_state()
    local m = {}
    for k, v in pairs(state.metrics) do
      if type(v) == "number" then m[k] = v end
    end
    m.trainer_bad_evals = bad_evals
    m.trainer_lr_override = lr_override
    if state.best then
      m.trainer_best_value = state.best.value
      m.trainer_best_step = state.best.step
      m.trainer_best_saved = state.best.path and 1 or 0
    end
    return { step = state.step, epoch = state.epoch, cursor = batcher:cursor(), rng = cfg.rng, lr = state.lr,
             total_steps = total, metrics = m, recipe = recipe_text, plugins = cfg.plugins,
             run = run_settings }
  end

  local function save()
    if saved[state.step] then return saved[state.step] end
    local path = mt.checkpoint_save(out_dir, cfg.model, cfg.optimizer, checkpoint_state())
    saved[state.step] = path
    log_json({ type = "checkpoint", step = state.step, path = path })
    fire("on_save", path)
    local best_step = es and state.best and state.best.step or nil
    mt.checkpoint_prune(out_dir, keep_last, best_step)
    return path
  end

  local function evaluate()
    local m = {}
    state.metrics = m
    if cfg.eval_examples ~= nil then
      local r = mt.evaluate(cfg.model, cfg.eval_examples, cfg.eval_opts or {})
      m.eval_loss = r.loss
      m.eval_perplexity = r.perplexity
      m.eval_tokens_per_second = r.tokens_per_second
    end
    for name, f in pairs(metric_fns) do
      local v = f(state)
      if type(v) ~= "number" then fail("metric '%s' returned %s, want a number", name, type(v)) end
      m[name] = v
    end
    history.eval[#history.eval + 1] = { step = state.step, metrics = m }
    local rec = { type = "eval", step = state.step, epoch = state.epoch }
    for k, v in pairs(m) do rec[k] = v end
    log_json(rec)
    local parts = {}
    for k, v in pairs(m) do parts[#parts + 1] = string.format("%s %.6g", k, v) end
    table.sort(parts)
    say(string.format("eval step %d: %s", state.step, table.concat(parts, ", ")))

    local v = m[best_metric]
    local improved = false
    if v ~= nil then
      if improves(v, state.best and state.best.value, best_mode, best_delta) then
        improved = true
        state.best = { metric = best_metric, value = v, step = state.step }
        bad_evals = 0
      else
        bad_evals = bad_evals + 1
      end
    elseif es then
      fail("early_stopping.metric '%s' is not among the evaluation's metrics", best_metric)
    end
    if es then
      if improved then state.best.path = save() end
      if not improved and bad_evals >= es.patience then
        state.stopped_early = true
        say(string.format("early stopping at step %d: %s has not improved by more than %g for %d evaluations (best %.6g at step %d)",
                          state.step, best_metric, es.min_delta, bad_evals, state.best.value, state.best.step))
      end
    end
    fire("on_evaluate")
  end

  local t0 = clock()
  -- throughput counts the tokens the model ran (prompt and reply, no padding) over the
  -- time spent in training steps, so evaluations and checkpoints do not dilute it
  local tokens_run, step_seconds = 0, 0
  local last_eval = nil
  fire("on_train_begin")

  local step = start_step
  while step <= total and not req.stop and not state.stopped_early do
    local lr
    if lr_override then lr = lr_override
    elseif cfg.schedule then lr = cfg.schedule(step, total, cfg.lr)
    elseif cfg.scheduler then lr = mt.schedule(cfg.scheduler, step, total, cfg.lr)
    else lr = cfg.lr end
    if not is_finite(lr) then fail("the schedule gave lr %s at step %d", tostring(lr), step) end

    local step_started = clock()
    local batches, epoch, input_tokens = {}, state.epoch, 0
    for i = 1, grad_accum do
      local b, info = batcher:next()
      batches[i] = b
      if info and info.epoch then epoch = info.epoch end
      input_tokens = input_tokens + (info and info.tokens or 0)
    end
    local r = mt.train_step(cfg.model, cfg.loss, cfg.optimizer, batches,
                            { lr = lr, step = step, max_grad_norm = max_grad_norm or nil })
    step_seconds = step_seconds + (clock() - step_started)
    local bad = r.skipped or not is_finite(r.loss)
    state.step, state.epoch = step, epoch
    state.loss, state.grad_norm, state.lr = r.loss, r.grad_norm, r.lr or lr
    state.tokens = r.tokens or 0
    tokens_run = tokens_run + input_tokens
    if bad then
      state.bad_steps = state.bad_steps + 1
      if state.bad_steps >= max_bad then
        mfile:close()
        error(string.format("%d non-finite steps in a row at step %d: stopping (lower the learning rate or check the data)",
                            state.bad_steps, step), 0)
      end
    else
      state.bad_steps = 0
      history.train[#history.train + 1] = { step = step, loss = r.loss }
    end

    local elapsed = clock() - t0
    local tps = step_seconds > 0 and tokens_run / step_seconds or 0
    log_json({ type = "step", step = step, epoch = epoch, loss = r.loss, lr = state.lr, grad_norm = r.grad_norm,
               tokens = state.tokens, input_tokens = input_tokens, tokens_per_second = tps,
               skipped = bad and true or false })
    local done = step - start_step + 1
    local eta = elapsed / done * (total - step)
    if bar then
      local width, filled = 20, math.floor(20 * step / total)
      output:write(string.format("\r[%s%s] %d/%d loss %s lr %s %.0f tok/s ETA %s   ",
                                 string.rep("#", filled), string.rep(".", width - filled), step, total,
                                 fmt_num(r.loss, "%.4f"), fmt_num(state.lr, "%.2e"), tps, format_time(eta)))
      output:flush()
      bar_shown = true
    elseif step == start_step or step % (cfg.log_every or 10) == 0 or step == total or bad then
      say(string.format("step %d/%d epoch %d loss %s lr %s grad_norm %s %.0f tok/s ETA %s%s", step, total, epoch,
                        fmt_num(r.loss, "%.4f"), fmt_num(state.lr, "%.2e"), fmt_num(r.grad_norm or 0 / 0, "%.3f"),
                        tps, format_time(eta), bad and " (skipped: non-finite)" or ""))
    end

    fire("on_step_end")
    if has_eval and (req.evaluate or (eval_every and step % eval_every == 0)) then
      evaluate()
      last_eval = step
    elseif req.evaluate then
      say(string.format("step %d: evaluation requested but there is nothing to evaluate (no eval_examples or metrics)", step))
    end
    if req.save or (save_every and step % save_every == 0) then save() end
    req.evaluate, req.save = false, false
    step = step + 1
  end

  -- the end: final evaluation, final checkpoint, best restored
  if has_eval and last_eval ~= state.step and state.step >= start_step then evaluate() end
  if state.step >= start_step then save() end
  local restored = false
  if es and es.restore_best and state.best and state.best.path and state.best.step ~= state.step then
    mt.checkpoint_load(state.best.path, cfg.model, cfg.optimizer)
    restored = true
  end
  mfile:close()

  local seconds = clock() - t0
  if cfg.plot ~= false then
    local plot = require("moontune.plot")
    local evals = {}
    for _, e in ipairs(history.eval) do
      if e.metrics.eval_loss then evals[#evals + 1] = { step = e.step, loss = e.metrics.eval_loss } end
    end
    plot.loss_svg(out_dir .. "/loss.svg", history.train, evals)
  end

  fire("on_train_end")
  local lines = { string.format("trained %d steps of %d in %s%s", state.step, total, format_time(seconds),
                                state.stopped_early and " (stopped early)" or (req.stop and " (stopped by a callback)" or "")) }
  if state.best then
    lines[#lines + 1] = string.format("best %s %.6g at step %d%s", state.best.metric, state.best.value, state.best.step,
                                      restored and " (restored)" or "")
  end
  lines[#lines + 1] = string.format("outputs in %s: metrics.jsonl%s, checkpoints", out_dir, cfg.plot ~= false and ", loss.svg" or "")
  for _, l in ipairs(lines) do say(l) end

  return { steps = state.step, best = state.best, stopped_early = state.stopped_early, history = history,
           out_dir = out_dir, seconds = seconds, restored_best = restored,
           tokens = tokens_run, step_seconds = step_seconds,
           tokens_per_second = step_seconds > 0 and tokens_run / step_seconds or 0 }
end

return M
