-- The guards of every run: general-text perplexity before, at each evaluation and after
-- (warn, stop or restore beyond max_general_regression), and the overfitting warning.
local fake = require("trainer_fake")
local trainer = require("moontune.trainer")
local eq = fake.eq

local function capture()
  local lines = {}
  return { write = function(_, ...) for _, s in ipairs({ ... }) do lines[#lines + 1] = s end end,
           flush = function() end }, lines
end
local function has(lines, pattern)
  return table.concat(lines):find(pattern) ~= nil
end

-- warn: training goes on; the before/after line and the warning are printed
do
  local mt, log = fake.new{ per_epoch = 4, evals = { 1.0, 0.9, 0.8 }, general = { 10, 10.5, 12, 13 } }
  local out, lines = capture()
  local r = trainer.run(fake.cfg(mt, { epochs = 2, eval_every = 3, eval_examples = "heldout",
    general_examples = "general", max_general_regression = 0.10, output = out }), mt)
  eq(r.steps, 8, "warn trains to the end")
  eq(log.calls[1], "general", "general text measured before the first step")
  eq(log.general_evals, 4, "before + three evaluations")
  eq(r.history.eval[1].metrics.general_perplexity, 10.5, "general perplexity in the metrics")
  fake.near(r.history.eval[2].metrics.general_change, 0.2, "general_change is relative to before")
  assert(has(lines, "general text: perplexity 10 before training"), table.concat(lines))
  assert(has(lines, "WARNING: general%-text perplexity 12 is 20.0%% above 10"), table.concat(lines))
  assert(has(lines, "general%-text perplexity 10 before, 13 after %(%+30.0%%, beyond max_general_regression%)"),
         table.concat(lines))
  eq(#log.loads, 0, "warn restores nothing")
  eq(r.metrics.general_perplexity, 13, "the result's metrics are the final evaluation's")
  eq(r.general.after, 13, "general after: the final evaluation")
end

-- stop: training stops at the first evaluation beyond the bound and the best
-- checkpoint within it is restored
do
  local mt, log = fake.new{ per_epoch = 4, evals = { 1.0, 0.9, 0.8 }, general = { 10, 10.5, 10.8, 12 } }
  local out, lines = capture()
  local r = trainer.run(fake.cfg(mt, { epochs = 4, eval_every = 2, eval_examples = "heldout",
    general_examples = "general", on_general_regression = "stop", output = out }), mt)
  eq(r.steps, 6, "stopped at the evaluation beyond the bound")
  eq(r.stopped_early, true, "reported as stopped early")
  eq(r.best.step, 4, "the best is within the bound, not the better eval_loss beyond it")
  eq(log.loads[#log.loads], fake.ckpt(4), "the best within the bound restored")
  eq(r.restored_best, true, "restored")
  eq(r.metrics.general_perplexity, 10.8, "the result's metrics are the restored best's")
  eq(r.general.after, 10.8, "general after: the restored best's")
  assert(has(lines, "; stopping"), table.concat(lines))
end

-- restore: training goes on; only evaluations within the bound count as best, and the
-- best is restored when the run ends beyond the bound
do
  local mt, log = fake.new{ per_epoch = 4, evals = { 1.0, 0.9, 0.5, 0.4 }, general = { 10, 10.2, 10.4, 12, 12 } }
  local r = trainer.run(fake.cfg(mt, { epochs = 2, eval_every = 2, eval_examples = "heldout",
    general_examples = "general", on_general_regression = "restore" }), mt)
  eq(r.steps, 8, "restore trains to the end")
  eq(r.best.step, 4, "evaluations beyond the bound are never best")
  eq(log.loads[#log.loads], fake.ckpt(4), "best within the bound restored at the end")
end

-- a resume keeps the first run's "before" (the trainer state of the checkpoint)
do
  local mtA, logA = fake.new{ per_epoch = 4, evals = { 1.0 }, general = { 10, 10.1, 10.2 } }
  trainer.run(fake.cfg(mtA, { epochs = 2, eval_every = 2, save_every = 2, eval_examples = "heldout",
    general_examples = "general", callbacks = { on_step_end = function(s, c) if s.step == 4 then c:stop() end end } }), mtA)
  eq(logA.saved[fake.ckpt(4)].trainer.general_before, 10, "general_before in state.trainer")
  local mtB, logB = fake.new{ per_epoch = 4, evals = { 1.0 }, general = { 10.3 }, store = logA.saved, latest = logA.latest }
  local rB = trainer.run(fake.cfg(mtB, { epochs = 2, eval_every = 2, save_every = 2, eval_examples = "heldout",
    general_examples = "general", resume = true }), mtB)
  eq(logB.calls[1], "load:" .. fake.ckpt(4), "resumed")
  eq(logB.calls[2], "train_step", "no new 'before' measurement after a resume")
  fake.near(rB.history.eval[#rB.history.eval].metrics.general_change, 0.03, "change against the first run's before")
end

-- overfitting: held-out loss rising while the training loss falls, `patience` times
do
  local mt, _ = fake.new{ per_epoch = 4, losses = function(step) return 2.0 / step end,
                          evals = { 1.0, 1.1, 1.2, 1.3 } }
  local out, lines = capture()
  trainer.run(fake.cfg(mt, { epochs = 2, eval_every = 2, eval_examples = "heldout", output = out }), mt)
  assert(has(lines, "WARNING: overfitting: the held%-out loss rose for 3 evaluations while the training loss fell"),
         table.concat(lines))
  assert(has(lines, "training loss"), "the gap is printed")
end
do -- and not when both fall
  local mt, _ = fake.new{ per_epoch = 4, losses = function(step) return 2.0 / step end,
                          evals = { 1.0, 0.9, 0.8, 0.7 } }
  local out, lines = capture()
  trainer.run(fake.cfg(mt, { epochs = 2, eval_every = 2, eval_examples = "heldout", output = out }), mt)
  assert(not has(lines, "overfitting"), table.concat(lines))
end

-- every evaluation beyond the bound, with early stopping: it stops without a best
do
  local mt, _ = fake.new{ per_epoch = 4, evals = { 1.0, 0.9, 0.8 }, general = { 10, 12, 13, 14 } }
  local out, lines = capture()
  local r = trainer.run(fake.cfg(mt, { epochs = 4, eval_every = 2, eval_examples = "heldout",
    general_examples = "general", on_general_regression = "restore",
    early_stopping = { patience = 2 }, output = out }), mt)
  eq(r.best, nil, "no best beyond the bound")
  eq(r.stopped_early, true, "patience ran out")
  assert(has(lines, "no evaluation within max_general_regression"), table.concat(lines))
end

-- evaluations run in the training steps' precision (eval_int8): with int8 training,
-- held-out and general text through the int8 forward, the model's int8 copies made
-- before the first evaluation (general text before training) and freed at the end;
-- eval_int8 = false keeps them fp32, and without int8 training they are fp32 unless asked
do
  -- the fake's model is the string "model": its int8_training is recorded here
  local modes = {}
  local strings = getmetatable("").__index
  strings.int8_training = function(self, mode) modes[#modes + 1] = self .. ":" .. tostring(mode) end
  local function run(extra)
    local mt, log = fake.new{ per_epoch = 4, evals = { 1.0 }, general = { 10 } }
    modes = {}
    local c = { epochs = 1, eval_every = 2, eval_examples = "heldout", general_examples = "general",
                output = capture() }
    for k, v in pairs(extra) do c[k] = v end
    local order = {}
    local evaluate = mt.evaluate
    function mt.evaluate(model, examples, opts)
      order[#order + 1] = string.format("%s int8=%s after %d modes", examples, tostring(opts.int8), #modes)
      return evaluate(model, examples, opts)
    end
    trainer.run(fake.cfg(mt, c), mt)
    return log, order
  end
  local log, order = run{ int8 = "forward" }
  eq(log.eval_opts.int8, true, "held-out evaluation through int8 when training is")
  eq(log.general_opts.int8, true, "general text through int8 when training is")
  eq(order[1], "general int8=true after 1 modes", "the copies are made before the general text's first evaluation")
  eq(table.concat(modes, " "), "model:forward model:off", "int8 on for the run, off at its end")
  log = run{ int8 = "forward", eval_int8 = false }
  eq(log.eval_opts.int8, false, "eval_int8 = false: held-out in fp32")
  eq(log.general_opts.int8, false, "eval_int8 = false: general text in fp32")
  log = run{}
  eq(log.eval_opts.int8, false, "fp32 training: fp32 evaluations")
  eq(#modes, 0, "fp32 training: no int8 copies")
  log = run{ eval_int8 = true }
  eq(log.eval_opts.int8, true, "eval_int8 = true without int8 training")
  log = run{ int8 = "all", eval_opts = { int8 = false } }
  eq(log.eval_opts.int8, false, "eval_opts.int8 wins")
  local mtX = fake.new{}
  local ok, err = pcall(trainer.run, fake.cfg(mtX, { eval_int8 = "yes" }), mtX)
  assert(not ok and tostring(err):find("eval_int8 must be true or false", 1, true), tostring(err))
  strings.int8_training = nil
end
