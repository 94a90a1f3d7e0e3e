-- The recipe of the data-parallel test (tests/run/check_distributed.sh): LoRA or full
-- fine-tuning of the tiny test model through moontune.trainer, run on one process and
-- under `mpirun -np 2`, with the knobs the test turns from --set. `batch` is the global
-- batch: on N ranks each takes batch / N rows of it.
local mt = require("moontune")

local cfg = mt.config({
  fixtures = "",         -- tests/fixtures
  out_dir = "dp-out",
  steps = 10,
  batch = 4,             -- global rows per micro-batch
  accum = 1,             -- micro-batches per step
  pack = false,          -- one example per row: the rows of a 4-row batch are those of two 2-row ones
  adapter = "lora",      -- or "qlora", "full"
  shard = false,         -- ZeRO-1: the optimizer state sharded over the ranks
  save_every = 0,
  stop_at = 0,           -- > 0: save and stop after this step (to resume later)
  resume = false,
  fail_rank = -1,        -- this rank raises an error at step fail_at
  fail_at = 0,
  slow = 0.0,            -- seconds each step sleeps (the kill test needs time to aim)
})
local out = mt.output_dir(cfg.out_dir, { resume = cfg.resume })

local items = {}
for i = 1, 40 do
  local ids, trainable = {}, {}
  for t = 1, 6 + (i % 7) do
    ids[t] = 3 + ((i * 5 + t * 7) % 90)
    trainable[t] = t > 2
  end
  items[#items + 1] = { ids = ids, trainable = trainable }
end
local examples = mt.examples_from_ids(items, { seq_len = 16 })
local train, heldout = examples:split(0.2, 3)

local model = mt.model(cfg.fixtures .. "/tiny_gqa")
if cfg.adapter == "lora" or cfg.adapter == "qlora" then
  model:attach(mt.plugin("adapter", cfg.adapter, { r = 4, alpha = 8, target_modules = "all-linear" }))
else
  model:attach(mt.plugin("adapter", "full", {}))
end
model:plan(cfg.batch, 16)

local result = mt.trainer.run({
  model = model,
  loss = mt.plugin("loss", "cross_entropy", {}),
  optimizer = mt.plugin("optimizer", "adamw", { weight_decay = 0.01 }),
  scheduler = mt.plugin("scheduler", "cosine", { warmup_steps = 2 }),
  batcher = mt.batcher(train, { batch = cfg.batch, seq_len = 16, seed = 5, pack = cfg.pack }),
  grad_accum = cfg.accum,
  shard_optimizer = cfg.shard,
  eval_examples = heldout,
  eval_every = 4,
  lr = cfg.adapter == "full" and 0.002 or 0.02,
  max_steps = cfg.steps,
  out_dir = out,
  save_every = cfg.save_every,
  resume = cfg.resume or nil,
  progress = false,
  callbacks = { on_step_end = function(state, control)
    if cfg.slow > 0 then local t = mt.now() + cfg.slow; while mt.now() < t do end end
    if state.step == cfg.fail_at and mt.rank() == cfg.fail_rank then
      error(string.format("tiny_dp: rank %d fails on purpose at step %d", mt.rank(), state.step))
    end
    if cfg.stop_at > 0 and state.step == cfg.stop_at then control:save(); control:stop() end
  end },
}, mt)
print(string.format("tiny_dp: rank %d of %d, %d steps, eval_loss %.17g", mt.rank(), mt.world_size(),
                    result.steps, result.metrics and result.metrics.eval_loss or -1))
