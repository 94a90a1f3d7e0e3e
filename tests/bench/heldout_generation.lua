-- heldout_generation.lua — the quickstart's held-out generation on its own: the base
-- model (or the model with a PEFT adapter) answers the 120 held-out requests greedily,
-- batch 32, as recipes/quickstart.lua's "before" and "after" phases do, and the rate,
-- the accuracy and the wall time are printed. For timing generation changes between
-- two builds in minutes rather than through whole quickstart runs:
--
--   env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE build/moontune run \
--       tests/bench/heldout_generation.lua --set model=$(scripts/fetch-model) [--set adapter=DIR]
--       [--set int8=false]
local mt = require("moontune")
local tasks = require("moontune.tasks")

local cfg = mt.config({
  model = "",
  adapter = "",
  heldout = "data/quickstart/heldout.jsonl",
  gen_batch = 32,
  max_new_tokens = 64,
  int8 = true,
})
assert(cfg.model ~= "", "heldout_generation: set the model: --set model=path/to/model")

local tok = mt.tokenizer(cfg.model)
local items = tasks.items(mt.records(cfg.heldout))
local model = mt.model(cfg.model)
if cfg.adapter ~= "" then model:attach_peft(cfg.adapter) end
local t = mt.now()
local task = tasks.evaluate(mt, model, tok, items, { max_new_tokens = cfg.max_new_tokens,
                                                    batch = cfg.gen_batch, int8 = cfg.int8 })
print(string.format("heldout_generation: %d requests, accuracy %.1f%% (%d/%d exact), " ..
                    "%.1f s, generation %.1f tokens/s, %s",
                    task.n, 100 * task.accuracy, task.correct, task.n, mt.now() - t,
                    task.tokens_per_second, task.int8 > 0 and "int8 weights" or "fp32"))
