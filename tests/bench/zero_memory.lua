-- Peak memory of full fine-tuning per rank, with and without ZeRO-1 (docs/distributed.md):
--   mpirun -np 2 moontune run tests/bench/zero_memory.lua --unsafe --set model=M.gguf [--set shard=true]
-- Two AdamW steps of full fine-tuning on short random sequences, then each rank writes
-- its peak resident memory to standard error (rank 0's standard output is the only one
-- shown). Numbers are reported, never asserted.
local mt = require("moontune")
local cfg = mt.config({ model = "", shard = false, seq = 64, batch = 2 })
local model = mt.model(cfg.model)
model:attach(mt.plugin("adapter", "full", {}))
model:plan(cfg.batch // mt.world_size(), cfg.seq)
local items = {}
for i = 1, 8 do
  local ids, trainable = {}, {}
  for t = 1, cfg.seq do ids[t] = 1 + (i * 7919 + t * 104729) % 40000; trainable[t] = true end
  items[i] = { ids = ids, trainable = trainable }
end
local examples = mt.examples_from_ids(items, { seq_len = cfg.seq })
local batcher = mt.batcher(examples, { batch = cfg.batch, seq_len = cfg.seq, pack = false })
local loss = mt.plugin("loss", "cross_entropy", {})
local opt = mt.plugin("optimizer", "adamw", {})
if cfg.shard then opt:shard_state(true) end
local t0 = mt.now()
for step = 1, 2 do
  local b = batcher:next()
  mt.train_step(model, loss, opt, { b }, { lr = 1e-5, step = step })
end
io.stderr:write(string.format("zero_memory: rank %d of %d, shard %s: peak memory %.0f MiB (2 steps in %.1f s)\n",
                              mt.rank(), mt.world_size(), tostring(cfg.shard), mt.peak_memory() / 1048576,
                              mt.now() - t0))
