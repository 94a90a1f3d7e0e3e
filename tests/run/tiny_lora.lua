-- A recipe run by `moontune run` in the test suite (tests/run/check_run.sh): LoRA on the
-- tiny test model through moontune.trainer, with evaluation, early stopping and
-- checkpoints, inside the sandbox. The paths come from --set.
local mt = require("moontune")

local cfg = mt.config({
  fixtures = "",      -- tests/fixtures
  out_dir = "run-out",
  steps = 12,
  lr = 0.02,
  optimizer = "adamw",
  stop_at = 0,        -- > 0: a callback stops the run after this step (a "killed" run)
  spike_at = 0,       -- > 0: a callback raises the learning rate to 1 after this step, so the
                      -- held-out loss gets worse and early stopping must restore the best
  patience = 2,       -- early stopping's evaluations without improvement
  resume = false,
  save_every = 4,
  lora = { r = 4, alpha = 8 },
})
local out = mt.output_dir(cfg.out_dir, { resume = cfg.resume })
-- plugins come from the built-in directory (next to the moontune binary)
local PLUGINS = {}

-- token-id examples for the tiny model's vocabulary of 96: a pattern it can learn
local items = {}
for i = 1, 32 do
  local ids, trainable = {}, {}
  for t = 1, 8 + (i % 5) do
    ids[t] = 3 + ((i + t * 7) % 90)
    trainable[t] = t > 3
  end
  items[#items + 1] = { ids = ids, trainable = trainable }
end
local examples = mt.examples_from_ids(items, { seq_len = 16 })
local train, heldout = examples:split(0.25, 7)

local model = mt.model(cfg.fixtures .. "/tiny_gqa")
model:attach(mt.plugin("adapter", "lora", { r = cfg.lora.r, alpha = cfg.lora.alpha,
                                            target_modules = "all-linear" }, PLUGINS))
model:plan(2, 16)

local result = mt.trainer.run({
  model = model,
  loss = mt.plugin("loss", "cross_entropy", {}, PLUGINS),
  optimizer = mt.plugin("optimizer", cfg.optimizer, { weight_decay = 0.0 }, PLUGINS),
  scheduler = mt.plugin("scheduler", "cosine", { warmup_steps = 2 }, PLUGINS),
  batcher = mt.batcher(train, { batch = 2, seq_len = 16, seed = 1 }),
  train_examples = train,
  eval_examples = heldout,
  resume = cfg.resume or nil,
  callbacks = { on_step_end = function(state, control)
    if cfg.stop_at > 0 and state.step == cfg.stop_at then control:save(); control:stop() end
    if cfg.spike_at > 0 and state.step == cfg.spike_at then control:set_lr(1.0) end
  end },
  eval_every = 4,
  lr = cfg.lr,
  max_steps = cfg.steps,
  out_dir = out,
  save_every = cfg.save_every,
  early_stopping = { metric = "eval_loss", mode = "min", patience = cfg.patience },
  progress = false,
}, mt)
print(string.format("tiny_lora: %d steps, best eval_loss %.4f at step %d%s", result.steps,
                    result.best and result.best.value or -1, result.best and result.best.step or -1,
                    result.stopped_early and ", stopped early" or ""))
-- the weights now in the model are the best checkpoint's: evaluating them again gives
-- exactly the best held-out loss
local again = mt.evaluate(model, heldout)
print(string.format("tiny_lora: best %.17g, evaluated again %.17g",
                    result.best and result.best.value or -1, again.loss))
