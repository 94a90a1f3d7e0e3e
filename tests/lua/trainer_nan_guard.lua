-- NaN guard: skipped / non-finite steps are counted; max_bad_steps in a row is an error.
local fake = require("trainer_fake")
local trainer = require("moontune.trainer")
local eq = fake.eq
local nan, inf = 0 / 0, math.huge

do
  local mt, log = fake.new{ per_epoch = 10, losses = { 1.0, nan, nan, 0.5, nan, inf, nan, 0.1 } }
  local ok, err = pcall(trainer.run, fake.cfg(mt, { epochs = 1, max_bad_steps = 3 }), mt)
  assert(not ok, "expected an error")
  eq(err, "3 non-finite steps in a row at step 7: stopping (lower the learning rate or check the data)", "message")
  eq(#log.steps, 7, "stopped at step 7")
end

do -- default max_bad_steps = 5
  local mt = fake.new{ per_epoch = 10, losses = function(step) return step >= 3 and nan or 1.0 end }
  local ok, err = pcall(trainer.run, fake.cfg(mt, { epochs = 1 }), mt)
  assert(not ok, "expected an error (default)")
  eq(err, "5 non-finite steps in a row at step 7: stopping (lower the learning rate or check the data)", "message (default)")
end

do -- fewer than max in a row: the run completes, bad steps are left out of the history
  local mt, log = fake.new{ per_epoch = 5, losses = { 1.0, nan, 0.5, inf, 0.4 } }
  local badseen = {}
  local r = trainer.run(fake.cfg(mt, { epochs = 1, max_bad_steps = 2,
    callbacks = { on_step_end = function(s) badseen[s.step] = s.bad_steps end } }), mt)
  eq(r.steps, 5, "completed")
  eq(#r.history.train, 3, "finite steps in the history")
  eq(badseen[2], 1, "counted")
  eq(badseen[3], 0, "reset by a good step")
  eq(badseen[4], 1, "inf counted")
end
