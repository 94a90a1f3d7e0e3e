-- The collectives recipes see and the sharded evaluations, run by the data-parallel
-- test (tests/run/check_distributed.sh) on 1 process and under mpirun -np 2:
-- mt.broadcast (tables, any bytes, from any root), mt.all_sum, mt.output_dir prepared by
-- rank 0, task accuracy with the requests shared out (every rank gets every answer, the
-- same as one rank generating them all), held-out loss summed over the ranks' batches,
-- and an export written once. Prints the numbers the test compares across runs.
local mt = require("moontune")
local tasks = require("moontune.tasks")
local cfg = mt.config({ fixtures = "", out_dir = "dp-collectives" })
local out = mt.output_dir(cfg.out_dir)
local rank, world = mt.rank(), mt.world_size()
local function check(cond, msg) if not cond then error(string.format("rank %d: %s", rank, msg), 2) end end

-- broadcast: a table from rank 0, raw bytes and nil from the last rank
local t = mt.broadcast(rank == 0 and { a = 1, b = { "x", 2.5 }, c = true } or { a = 9 })
check(t.a == 1 and t.b[1] == "x" and t.b[2] == 2.5 and t.c == true, "broadcast of a table")
local bytes = "\255\0bytes\n" .. string.rep("z", 3000)
local got = mt.broadcast(rank == world - 1 and bytes or "other", world - 1)
check(got == bytes, "broadcast of raw bytes from the last rank")
check(mt.broadcast(nil) == nil, "broadcast of nil")
-- all_sum: integers stay integers, floats sum
local s = mt.all_sum(rank + 1)
check(s == world * (world + 1) // 2 and math.type(s) == "integer", "all_sum of integers: " .. tostring(s))
local l = mt.all_sum({ 0.5, rank, 2 })
check(l[1] == 0.5 * world and l[2] == (world - 1) * world / 2 and l[3] == 2 * world, "all_sum of a list")
local ok, err = pcall(mt.broadcast, 1, world)
check(not ok and err:find("not a rank"), "broadcast from a rank that does not exist: " .. tostring(err))

-- task accuracy, shared out over the ranks
local model_dir = cfg.fixtures .. "/tiny_chat"
local tok = mt.tokenizer(model_dir)
local model = mt.model(model_dir)
local recs = mt.records(cfg.fixtures .. "/data/tiny_chat_heldout.jsonl")
local items = tasks.items(recs)
local r = tasks.evaluate(mt, model, tok, items, { max_new_tokens = 12, batch = 4 })
check(#r.outputs == #items, "every answer on every rank")
-- every rank holds rank 0's answers
for i, text in ipairs(r.outputs) do check(mt.broadcast(text) == text, "answer " .. i .. " differs between ranks") end
local digest = mt.sha256(table.concat(r.outputs, "\0"))
print(string.format("dp_collectives: answers %s correct %d of %d new_tokens %d", digest, r.correct, r.n, r.new_tokens))

-- held-out loss over the ranks' batches
local heldout = mt.examples(cfg.fixtures .. "/data/tiny_chat_heldout.jsonl", tok, { template = "auto", seq_len = 96 })
model:plan(2, 96)
local e = mt.evaluate(model, heldout, { batch = 2, seq_len = 96 })
print(string.format("dp_collectives: eval loss %.17g tokens %d examples %d", e.loss, e.tokens, e.examples))

-- an export, written by rank 0 once
model:attach(mt.plugin("adapter", "lora", { r = 2, alpha = 4, target_modules = "all-linear", seed = 1 }))
local dir = model:export_peft(out .. "/adapter")
check(dir == out .. "/adapter", "export_peft returns its directory on every rank")
local f = io.open(out .. "/adapter/adapter_config.json", "r")
check(f ~= nil, "the exported adapter is there for every rank after the call")
f:close()
print("dp_collectives: ok")
