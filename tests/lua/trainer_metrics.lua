-- A loss's own metrics (dpo's rewards/*): in metrics.jsonl and the plain log line per
-- step, on the progress bar, as eval_<name> at each evaluation (no perplexity when the
-- evaluation has none), and early stopping on one of them.
local fake = require("trainer_fake")
local trainer = require("moontune.trainer")
local eq = fake.eq

local function step_metrics(step)
  return { ["rewards/accuracies"] = step / 10, ["rewards/margins"] = step / 100, ["logps/chosen"] = -step }
end
-- held-out accuracy rises, then stalls: the best is the third evaluation
local accs = { 0.5, 0.6, 0.75, 0.7, 0.75, 0.74 }
local evals = {}
for i, a in ipairs(accs) do evals[i] = { ["rewards/accuracies"] = a, ["rewards/margins"] = a / 10 } end

local out = {}
local sink = { write = function(self, ...) for _, x in ipairs({ ... }) do out[#out + 1] = x end end, flush = function() end }
local mt, log = fake.new{ per_epoch = 4, step_metrics = step_metrics, eval_metrics = evals,
                          evals = { 0.69, 0.6, 0.5, 0.55, 0.5, 0.5 } }
local r = trainer.run(fake.cfg(mt, { epochs = 5, eval_every = 2, eval_examples = "pairs", output = sink,
  is_tty = false, log_every = 1,
  early_stopping = { metric = "eval_rewards/accuracies", mode = "max", patience = 2 } }), mt)
eq(r.stopped_early, true, "stopped early on a loss metric")
eq(r.best.metric, "eval_rewards/accuracies", "best metric")
eq(r.best.value, 0.75, "best value")
eq(r.best.step, 6, "best step")
eq(r.steps, 10, "two evaluations without improvement after the best")
eq(log.loads[1], fake.ckpt(6), "best restored")
eq(r.metrics["eval_rewards/margins"], 0.075, "the restored evaluation's metrics")
eq(r.metrics.eval_perplexity, nil, "no perplexity where the evaluation has none")

local decode = require("moontune.core").json_decode
local rec, ev
for line in io.lines(OUT_DIR .. "/metrics.jsonl") do
  local x = decode(line)
  if x.type == "step" and x.step == 3 then rec = x end
  if x.type == "eval" and not ev then ev = x end
end
eq(rec["rewards/accuracies"], 0.3, "step metric in metrics.jsonl")
eq(rec["logps/chosen"], -3, "every step metric in metrics.jsonl")
eq(ev["eval_rewards/accuracies"], 0.5, "eval metric in metrics.jsonl")
eq(ev.eval_perplexity, nil, "no eval_perplexity in metrics.jsonl")

local lines = table.concat(out)
assert(lines:find("step 3/20 epoch 1 loss 0.3333 logps/chosen -3 rewards/accuracies 0.3 rewards/margins 0.03 lr", 1, true),
       "plain line with the metrics:\n" .. lines)
assert(lines:find("eval_rewards/accuracies 0.75", 1, true), "eval line")

-- the progress bar shows progress_metrics
out = {}
local mt2 = fake.new{ per_epoch = 4, step_metrics = step_metrics }
trainer.run(fake.cfg(mt2, { epochs = 1, output = sink, is_tty = true }), mt2)
lines = table.concat(out)
assert(lines:find("1/4 loss 1.0000 rewards/accuracies 0.100 rewards/margins 0.010 lr", 1, true), "bar:\n" .. lines)
return "ok"
