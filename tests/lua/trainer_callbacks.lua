-- Callbacks and control: stop, set_lr, evaluate, save; lists of callback tables.
local fake = require("trainer_fake")
local trainer = require("moontune.trainer")
local eq = fake.eq

-- stop at step 3
do
  local mt, log = fake.new{ per_epoch = 4 }
  local ends = 0
  local r = trainer.run(fake.cfg(mt, { epochs = 3, callbacks = {
    on_step_end = function(state, control) if state.step == 3 then control:stop() end end,
    on_train_end = function(state) ends = ends + 1; eq(state.step, 3, "state at the end") end } }), mt)
  eq(r.steps, 3, "stopped at 3")
  eq(#log.steps, 3, "three train steps")
  eq(r.stopped_early, false, "a callback stop is not early stopping")
  eq(ends, 1, "on_train_end once")
  eq(log.calls[#log.calls], "save:3", "final checkpoint")
end

-- set_lr is absolute and overrides the schedule from the next step on
do
  local mt, log = fake.new{ per_epoch = 4 }
  trainer.run(fake.cfg(mt, { epochs = 2, scheduler = "cosine", callbacks = {
    on_step_end = function(state, control) if state.step == 2 then control:set_lr(0.01) end end } }), mt)
  fake.near(log.lrs[1], 0.1, "step 1 lr from mt.schedule")
  fake.near(log.lrs[2], 0.1 * (1 - 1 / 8), "step 2 lr from mt.schedule")
  for s = 3, 8 do eq(log.lrs[s], 0.01, "lr after set_lr at step " .. s) end
  local ok = pcall(function()
    local m2 = fake.new{}
    trainer.run(fake.cfg(m2, { max_steps = 2, callbacks = { on_step_end = function(_, c) c:set_lr(0 / 0) end } }), m2)
  end)
  assert(not ok, "set_lr(NaN) is an error")
end

-- a Lua schedule function gets (step, total, base_lr)
do
  local mt, log = fake.new{ per_epoch = 4 }
  local seen = {}
  trainer.run(fake.cfg(mt, { max_steps = 3, epochs = 10, lr = 1.0,
    schedule = function(step, total, base) seen[#seen + 1] = total; return base / step end }), mt)
  eq(#log.steps, 3, "max_steps wins over epochs")
  eq(seen[1], 3, "total steps passed to the schedule")
  fake.near(log.lrs[3], 1 / 3, "schedule function lr")
end

-- control:evaluate() and control:save() after step 2; a list of callback tables
do
  local mt, log = fake.new{ per_epoch = 4, evals = { 0.5, 0.4 } }
  local saves, evals, begins = {}, {}, 0
  local r = trainer.run(fake.cfg(mt, { epochs = 1, eval_examples = "heldout", callbacks = {
    { on_train_begin = function() begins = begins + 1 end,
      on_step_end = function(state, control) if state.step == 2 then control:evaluate(); control:save() end end },
    { on_train_begin = function() begins = begins + 1 end,
      on_save = function(state, control, path) saves[#saves + 1] = path end,
      on_evaluate = function(state) evals[#evals + 1] = state.step; eq(state.metrics.eval_loss, evals[1] == state.step and 0.5 or 0.4, "metrics in state") end } } }), mt)
  eq(begins, 2, "both on_train_begin")
  -- calls: train, train, evaluate, save:2, train, train, evaluate, save:4
  local want = { "train_step", "train_step", "evaluate", "save:2", "train_step", "train_step", "evaluate", "save:4" }
  for i, w in ipairs(want) do eq(log.calls[i], w, "call " .. i) end
  eq(#log.calls, #want, "call count")
  eq(saves[1], fake.ckpt(2), "on_save path")
  eq(#saves, 2, "two saves")
  eq(evals[1], 2, "requested evaluation at step 2")
  eq(evals[2], 4, "final evaluation")
  eq(r.best.value, 0.4, "best tracked without early stopping")
end

-- grad_accum: batches per step, total steps from batches_per_epoch
do
  local mt, log = fake.new{ per_epoch = 6 }
  local r = trainer.run(fake.cfg(mt, { epochs = 2, grad_accum = 3 }), mt)
  eq(r.steps, 4, "6 batches / 3 per step * 2 epochs")
  eq(#log.batches[1], 3, "grad_accum micro-batches")
  eq(log.batches[2][3], 106, "batches in order")
  eq(log.batches[3][1], 201, "second epoch")
end
