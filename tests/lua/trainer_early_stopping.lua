-- Early stopping: plateau + patience, min_delta, mode max, best checkpoint restored.
local fake = require("trainer_fake")
local trainer = require("moontune.trainer")
local eq = fake.eq

-- min_delta 0.05: improvements at evals 1..3 (step 6); 0.7, 0.69 (< min_delta), 0.7 → stop at step 12.
do
  local mt, log = fake.new{ per_epoch = 4, evals = { 1.0, 0.8, 0.7, 0.7, 0.69, 0.7 } }
  local r = trainer.run(fake.cfg(mt, { epochs = 5, eval_every = 2, eval_examples = "heldout",
    early_stopping = { metric = "eval_loss", mode = "min", patience = 3, min_delta = 0.05, restore_best = true } }), mt)
  eq(r.stopped_early, true, "stopped early")
  eq(r.steps, 12, "steps before stopping")
  eq(#log.steps, 12, "train_step calls")
  eq(r.best.step, 6, "best step")
  eq(r.best.value, 0.7, "best value")
  eq(log.evals, 6, "evaluations")
  eq(#log.loads, 1, "one load")
  eq(log.loads[1], fake.ckpt(6), "best checkpoint restored")
  eq(r.metrics.eval_loss, 0.7, "the result's metrics are the restored best's evaluation")
  eq(log.calls[#log.calls], "load:" .. fake.ckpt(6), "restore is the last call")
  -- best checkpoints saved at each improvement, prune keeps the best
  assert(log.saved[fake.ckpt(2)] and log.saved[fake.ckpt(4)], "saved at improvements")
  eq(log.saved[fake.ckpt(12)].step, 12, "final checkpoint")
  eq(log.prunes[#log.prunes].best_step, 6, "prune keeps the best")
  eq(log.prunes[#log.prunes].keep_last, 2, "keep_last default")
  eq(log.saved[fake.ckpt(6)].metrics.eval_loss, 0.7, "best checkpoint carries its metric")
  eq(#r.history.eval, 6, "eval history")
end

-- min_delta 0: 0.69 at step 10 counts as an improvement; then 3 plateaued evals → stop at 16.
do
  local mt, log = fake.new{ per_epoch = 4, evals = { 1.0, 0.8, 0.7, 0.7, 0.69, 0.7 } }
  local r = trainer.run(fake.cfg(mt, { epochs = 5, eval_every = 2, eval_examples = "heldout",
    early_stopping = { patience = 3 } }), mt)
  eq(r.stopped_early, true, "stopped early (min_delta 0)")
  eq(r.steps, 16, "steps (min_delta 0)")
  eq(r.best.step, 10, "best step (min_delta 0)")
  eq(log.loads[1], fake.ckpt(10), "restored (min_delta 0)")
end

-- mode max on a recipe metric, no eval_examples: mt.evaluate is never called.
do
  local accs = { 0.1, 0.3, 0.5, 0.4, 0.5, 0.9 }
  local n = 0
  local seen_step = {}
  local mt, log = fake.new{ per_epoch = 4 }
  local r = trainer.run(fake.cfg(mt, { epochs = 5, eval_every = 2,
    metrics = { acc = function(state) n = n + 1; seen_step[n] = state.step; return accs[n] end },
    early_stopping = { metric = "acc", mode = "max", patience = 2 } }), mt)
  eq(log.evals, 0, "no mt.evaluate without eval_examples")
  eq(r.stopped_early, true, "stopped early (max)")
  eq(r.steps, 10, "steps (max)")
  eq(r.best.value, 0.5, "best acc")
  eq(r.best.step, 6, "best step (max)")
  eq(seen_step[1], 2, "metric sees the state")
  eq(log.loads[1], fake.ckpt(6), "restored (max)")
end

-- restore_best = false: nothing loaded; no plateau: runs to the end, no early stop.
do
  local mt, log = fake.new{ per_epoch = 4, evals = { 1.0, 0.9, 0.9, 0.9 } }
  local r = trainer.run(fake.cfg(mt, { epochs = 5, eval_every = 2, eval_examples = "heldout",
    early_stopping = { patience = 3, restore_best = false } }), mt)
  eq(r.steps, 10, "steps (no restore)")
  eq(#log.loads, 0, "no restore")

  local mt2, log2 = fake.new{ per_epoch = 4, evals = { 1.0, 0.9, 0.8, 0.7, 0.6, 0.5 } }
  local r2 = trainer.run(fake.cfg(mt2, { epochs = 2, eval_every = 3, eval_examples = "heldout",
    early_stopping = { patience = 1 } }), mt2)
  eq(r2.stopped_early, false, "improving: no early stop")
  eq(r2.steps, 8, "all steps")
  eq(log2.evals, 3, "evals at 3, 6 and the end")
  eq(r2.best.step, 8, "best at the end")
  eq(#log2.loads, 0, "best is the final state: nothing to load")
end

-- a bad metric name is an error naming it
do
  local mt = fake.new{ per_epoch = 4 }
  local ok, err = pcall(trainer.run, fake.cfg(mt, { epochs = 1, eval_every = 2, eval_examples = "heldout",
    early_stopping = { metric = "nope" } }), mt)
  assert(not ok and err:find("'nope'", 1, true), "unknown metric: " .. tostring(err))
end
