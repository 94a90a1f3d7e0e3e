-- trainer_fake.lua — a fake `moontune` module for the trainer tests, plus small asserts.
--
-- fake.new{ per_epoch = 4, losses = {...} or function(step, lr, batches), evals = {...},
--           general = {...}, step_metrics = function(step) -> {name = value},
--           eval_metrics = { {name = value}, ... } }
-- returns mt, log. The batcher hands out batches { id = epoch * 100 + position } with
-- 10 tokens each; train_step returns the scripted loss (NaN entries are reported as
-- skipped); evaluate returns the scripted eval losses in order (the last one repeats),
-- and for the examples "general" the scripted general perplexities;
-- checkpoints are kept in memory (log.saved[path] = a copy of the state) and every
-- call is recorded in log.calls / log.lrs / log.steps.

local F = {}

local function copy(t)
  if type(t) ~= "table" then return t end
  local c = {}
  for k, v in pairs(t) do c[k] = copy(v) end
  return c
end

function F.new(o)
  o = o or {}
  local per_epoch = o.per_epoch or 4
  local log = { calls = {}, lrs = {}, steps = {}, batches = {}, saved = {}, loads = {}, prunes = {}, evals = 0 }
  local pos, epoch = 0, 1
  local batcher = {}
  function batcher:next()
    pos = pos + 1
    if pos > per_epoch then pos, epoch = 1, epoch + 1 end
    return { id = epoch * 100 + pos }, { examples = 1, tokens = 10, targets = 9, epoch = epoch, epoch_end = pos == per_epoch }
  end
  function batcher:cursor() return { epoch = epoch, position = pos } end
  function batcher:set_cursor(c) epoch, pos = c.epoch, c.position end
  function batcher:batches_per_epoch() return per_epoch end

  -- JSON is the real core's (test_trainer_lua.c preloads moontune.core): the one encoder
  local core = require("moontune.core")
  local mt = { batcher_obj = batcher, json_encode = core.json_encode }
  function mt.train_step(model, loss, optimizer, batches, opts)
    assert(model == "model" and loss == "loss" and optimizer == "optimizer", "objects passed through")
    log.calls[#log.calls + 1] = "train_step"
    log.lrs[#log.lrs + 1] = opts.lr
    log.steps[#log.steps + 1] = opts.step
    local ids = {}
    for i, b in ipairs(batches) do ids[i] = b.id end
    log.batches[#log.batches + 1] = ids
    local l
    if type(o.losses) == "function" then l = o.losses(opts.step, opts.lr, batches)
    elseif o.losses then l = o.losses[opts.step] or 1.0
    else l = 1.0 / opts.step end
    local skipped = l ~= l
    return { loss = l, grad_norm = 0.5, lr = opts.lr, tokens = 10 * #batches, skipped = skipped,
             metrics = o.step_metrics and o.step_metrics(opts.step) or {} }
  end
  function mt.evaluate(model, examples, opts)
    if examples == "general" then -- general text: the scripted perplexities in order
      log.general_evals = (log.general_evals or 0) + 1
      local g = o.general or { 10.0 }
      local p = g[math.min(log.general_evals, #g)]
      log.calls[#log.calls + 1] = "general"
      log.general_opts = opts
      return { loss = math.log(p), perplexity = p, tokens = 100, examples = 5, seconds = 0.1,
               tokens_per_second = 1000 }
    end
    log.evals = log.evals + 1
    log.calls[#log.calls + 1] = "evaluate"
    local evals = o.evals or { 1.0 }
    local l = evals[math.min(log.evals, #evals)]
    log.eval_opts = opts
    local em = o.eval_metrics and o.eval_metrics[math.min(log.evals, #o.eval_metrics)]
    return { loss = l, perplexity = em and 0 / 0 or math.exp(l), tokens = 100, examples = 5, seconds = 0.1,
             tokens_per_second = 1000, metrics = em }
  end
  function mt.schedule(sched, step, total, base) -- step from 0, as the plugins count
    return base * (1 - step / total)
  end
  local nsave = 0
  function mt.checkpoint_save(dir, model, optimizer, state)
    nsave = nsave + 1
    -- what core/lua/bindings.c accepts: metrics map names to numbers, at most 16
    local nm = 0
    for k, v in pairs(state.metrics or {}) do
      assert(type(k) == "string" and #k < 64 and type(v) == "number", "checkpoint metric " .. tostring(k))
      nm = nm + 1
    end
    assert(nm <= 16, "at most 16 checkpoint metrics")
    assert(math.type(state.step) == "integer", "integer step")
    local path = F.ckpt(state.step, dir)
    log.saved[path] = copy(state)
    log.saved_order = log.saved_order or {}
    log.saved_order[#log.saved_order + 1] = state.step
    log.latest = path
    log.calls[#log.calls + 1] = "save:" .. state.step
    return path
  end
  function mt.checkpoint_load(path, model, optimizer)
    log.loads[#log.loads + 1] = path
    log.calls[#log.calls + 1] = "load:" .. path
    local s = log.saved[path] or (o.store and o.store[path])
    assert(s, "no checkpoint " .. tostring(path))
    local c = copy(s)
    c.path = path
    return c
  end
  function mt.checkpoint_latest(dir) return log.latest or o.latest end
  function mt.checkpoint_prune(dir, keep_last, best_step)
    log.prunes[#log.prunes + 1] = { keep_last = keep_last, best_step = best_step }
    return 0
  end
  return mt, log
end

-- The path of step N's checkpoint, named as core/store/checkpoint.c names it.
function F.ckpt(step, dir)
  return string.format("%s/checkpoints/step-%08d", dir or OUT_DIR, step)
end

-- A cfg with the fake's objects; `extra` overrides.
function F.cfg(mt, extra)
  local c = { model = "model", loss = "loss", optimizer = "optimizer", batcher = mt.batcher_obj, lr = 0.1,
              out_dir = OUT_DIR, output = { write = function() end, flush = function() end }, plot = false }
  for k, v in pairs(extra or {}) do c[k] = v end
  return c
end

function F.eq(a, b, what)
  if a ~= b then error(string.format("%s: expected %s, got %s", what, tostring(b), tostring(a)), 2) end
end

function F.near(a, b, what)
  if math.abs(a - b) > 1e-12 * math.max(1, math.abs(b)) then
    error(string.format("%s: expected %.17g, got %.17g", what, b, a), 2)
  end
end

return F
