-- Resume: continue from the saved step and cursor; per-step losses equal an uninterrupted run.
local fake = require("trainer_fake")
local trainer = require("moontune.trainer")
local eq = fake.eq

-- The loss depends on the batches and the lr, so a wrong cursor or step shows.
local function loss(step, lr, batches)
  local s = 0
  for _, b in ipairs(batches) do s = s + b.id end
  return s / 1000 + lr
end
local base = { epochs = 4, grad_accum = 2, scheduler = "linear", recipe = "-- recipe text", plugins = { "p" } }
local function with(t)
  local c = {}
  for k, v in pairs(base) do c[k] = v end
  for k, v in pairs(t) do c[k] = v end
  return c
end

local mtA, logA = fake.new{ per_epoch = 4, losses = loss }
local rA = trainer.run(fake.cfg(mtA, with{}), mtA)
eq(rA.steps, 8, "uninterrupted steps")

-- interrupted at step 5 (checkpoints at 3 and 5)
local mtB, logB = fake.new{ per_epoch = 4, losses = loss }
trainer.run(fake.cfg(mtB, with{ save_every = 3,
  callbacks = { on_step_end = function(s, c) if s.step == 5 then c:stop() end end } }), mtB)
local ck5 = logB.saved[fake.ckpt(5)]
eq(ck5.step, 5, "saved step")
eq(ck5.cursor.epoch, 3, "saved cursor epoch")
eq(ck5.cursor.position, 2, "saved cursor position")
eq(ck5.recipe, "-- recipe text", "recipe in the checkpoint")
eq(ck5.plugins[1], "p", "plugins in the checkpoint")
eq(ck5.total_steps, 8, "total in the checkpoint")
fake.near(ck5.lr, logB.lrs[5], "lr in the checkpoint")

-- resume = true → latest (step 5)
local mtC, logC = fake.new{ per_epoch = 4, losses = loss, store = logB.saved, latest = logB.latest }
local rC = trainer.run(fake.cfg(mtC, with{ resume = true }), mtC)
eq(logC.loads[1], fake.ckpt(5), "loaded the latest")
eq(logC.steps[1], 6, "continued from step 6")
eq(rC.steps, 8, "ran to the end")
for i = 1, 3 do
  eq(logC.batches[i][1], logA.batches[5 + i][1], "same batches at step " .. (5 + i))
  eq(rC.history.train[i].loss, rA.history.train[5 + i].loss, "same loss at step " .. (5 + i))
end

-- resume = path of step 3
local mtD, logD = fake.new{ per_epoch = 4, losses = loss, store = logB.saved }
local rD = trainer.run(fake.cfg(mtD, with{ resume = fake.ckpt(3) }), mtD)
eq(logD.steps[1], 4, "continued from step 4")
for i = 1, 5 do eq(rD.history.train[i].loss, rA.history.train[3 + i].loss, "same loss at step " .. (3 + i)) end

-- resume = true with no checkpoint starts fresh
local mtE, logE = fake.new{ per_epoch = 4, losses = loss }
trainer.run(fake.cfg(mtE, with{ resume = true }), mtE)
eq(logE.steps[1], 1, "fresh start")
eq(#logE.loads, 0, "nothing loaded")

-- set_lr survives a resume; early-stopping state too
local mtF, logF = fake.new{ per_epoch = 4, losses = loss, evals = { 1.0, 0.9, 0.95 } }
trainer.run(fake.cfg(mtF, with{ eval_every = 2, eval_examples = "h", early_stopping = { patience = 2 },
  callbacks = { on_step_end = function(s, c)
    if s.step == 2 then c:set_lr(0.003) end
    if s.step == 6 then c:stop() end end } }), mtF)
local mtG, logG = fake.new{ per_epoch = 4, losses = loss, evals = { 0.95 }, store = logF.saved, latest = logF.latest }
local rG = trainer.run(fake.cfg(mtG, with{ resume = true, eval_every = 2, eval_examples = "h",
  early_stopping = { patience = 2 } }), mtG)
eq(logG.lrs[1], 0.003, "lr override restored")
eq(logG.steps[1], 7, "resumed at 7")
eq(rG.stopped_early, true, "patience carried over: one more bad eval stops")
eq(rG.best.step, 4, "best carried over")
eq(logG.loads[2], fake.ckpt(4), "best restored after resume")

-- that state is the checkpoint's trainer object, not smuggled through its metrics
local ck6 = logF.saved[fake.ckpt(6)]
eq(ck6.trainer.lr_override, 0.003, "lr override in state.trainer")
eq(ck6.trainer.bad_evals, 1, "bad evaluations in state.trainer")
eq(ck6.trainer.best.step, 4, "best step in state.trainer")
eq(ck6.trainer.best.saved, true, "best saved in state.trainer")
for k in pairs(ck6.metrics) do
  assert(not k:match("^trainer_"), "no trainer_ metric in a checkpoint: " .. k)
end

-- a checkpoint of an earlier version kept that state in trainer_* metrics: it still resumes
local old = {}
for path, s in pairs(logF.saved) do
  local c = {}
  for k, v in pairs(s) do c[k] = v end
  if c.trainer then
    local t = c.trainer
    c.metrics = { eval_loss = s.metrics.eval_loss, trainer_lr_override = t.lr_override,
                  trainer_bad_evals = t.bad_evals, trainer_best_value = t.best and t.best.value,
                  trainer_best_step = t.best and t.best.step, trainer_best_saved = t.best and t.best.saved and 1 or 0 }
    c.trainer = nil
  end
  old[path] = c
end
local mtH, logH = fake.new{ per_epoch = 4, losses = loss, evals = { 0.95 }, store = old, latest = logF.latest }
local rH = trainer.run(fake.cfg(mtH, with{ resume = true, eval_every = 2, eval_examples = "h",
  early_stopping = { patience = 2 } }), mtH)
eq(logH.lrs[1], 0.003, "old format: lr override restored")
eq(rH.stopped_early, true, "old format: patience carried over")
eq(rH.best.step, 4, "old format: best carried over")
eq(logH.loads[2], fake.ckpt(4), "old format: best restored after resume")

-- a resume with other settings or another recipe text is refused, naming what changed;
-- allow_changes resumes and reports the changes
local function refused(extra, want)
  local mt, _ = fake.new{ per_epoch = 4, losses = loss, store = logB.saved, latest = logB.latest }
  local ok, err = pcall(trainer.run, fake.cfg(mt, with(extra)), mt)
  if ok then error("resume with " .. want .. " was accepted", 2) end
  if not tostring(err):find(want, 1, true) then error("refusal does not name " .. want .. ": " .. tostring(err), 2) end
  if not tostring(err):find("--allow-changes", 1, true) then error("refusal does not say how to proceed: " .. tostring(err), 2) end
end
refused({ resume = true, lr = 0.2 }, "trainer.lr: 0.1 -> 0.2")
refused({ resume = true, epochs = 5 }, "trainer.total_steps: 8 -> 10")
refused({ resume = true, grad_accum = 1 }, "trainer.grad_accum: 2 -> 1")
refused({ resume = true, recipe = "-- edited recipe text" }, "recipe text")
refused({ resume = true, int8 = "forward" }, "trainer.int8")
local said = {}
local out = { write = function(_, ...) for _, s in ipairs({ ... }) do said[#said + 1] = s end end, flush = function() end }
local mtH, logH = fake.new{ per_epoch = 4, losses = loss, store = logB.saved, latest = logB.latest }
local cfgH = fake.cfg(mtH, with{ resume = true, lr = 0.2, allow_changes = true })
cfgH.output = out
trainer.run(cfgH, mtH)
eq(logH.steps[1], 6, "allow_changes resumes")
local text = table.concat(said)
assert(text:find("resumed from " .. fake.ckpt(5) .. " at step 5 of 8", 1, true), "says which checkpoint: " .. text)
assert(text:find("changed since the checkpoint: trainer.lr: 0.1 -> 0.2", 1, true), "logs the change: " .. text)
-- a checkpoint of a run with save_every differs in nothing that changes the result
local mtI, logI = fake.new{ per_epoch = 4, losses = loss, store = logB.saved, latest = logB.latest }
trainer.run(fake.cfg(mtI, with{ resume = true, save_every = 2 }), mtI)
eq(logI.steps[1], 6, "save_every is not a change")
