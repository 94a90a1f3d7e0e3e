-- The Lua API accepts the numbers the commands accept (core/base/numparse.c's limits):
-- generation options, schedules and thread counts out of range are refused by name.
local mt = require("moontune")
local function refused(what, want, f, ...)
  local ok, err = pcall(f, ...)
  if ok then error(what .. " was accepted", 2) end
  if not tostring(err):find(want, 1, true) then error(what .. ": " .. tostring(err), 2) end
end
local model <close> = mt.model(FIXTURE_DIR .. "/tiny_chat")
local tok <close> = mt.tokenizer(FIXTURE_DIR .. "/tiny_chat")
local bad = {
  { { top_p = 5 }, "option 'top_p': 5 is out of range" },
  { { top_p = 0 }, "option 'top_p': 0 is out of range" },
  { { top_k = -1 }, "option 'top_k': -1 is out of range" },
  { { top_k = 4294967296 }, "option 'top_k': 4294967296 is out of range" },
  { { temperature = 1 / 0 }, "option 'temperature': inf is not finite" },
  { { temperature = 0 / 0 }, "is not finite" },
  { { temperature = -1 }, "option 'temperature': -1 is out of range" },
  { { max_new_tokens = 4294967296 }, "option 'max_new_tokens': 4294967296 is out of range" },
  { { max_new_tokens = -1 }, "option 'max_new_tokens': -1 is out of range" },
  { { batch = 0 }, "option 'batch': 0 is out of range" },
  { { top_p = 1e-50 }, "option 'top_p': 1e-50 is out of range for a 32-bit float" }, -- would be 0
  { { temperature = 1000.1 }, "option 'temperature': 1000.1 is out of range (expected a number >= 0 and <= 1000)" },
  { { seed = -1 }, "option 'seed': -1 is out of range (expected an integer from 0 to 18446744073709551615)" },
  { { seed = "18446744073709551616" }, "option 'seed': '18446744073709551616' is not an unsigned integer" },
  { { seed = 1.5 }, "option 'seed': expected an integer or a decimal string, found number" },
}
for _, case in ipairs(bad) do refused("generate " .. case[2], case[2], mt.generate, model, tok, "hi", case[1]) end
-- the accepted edges; seeds past 2^63 - 1 as decimal strings, as `--seed` takes them
mt.generate(model, tok, "hi", { top_p = 1, top_k = 0, temperature = 0, max_new_tokens = 0 })
mt.generate(model, tok, "hi", { top_p = 1e-30, temperature = 1000, max_new_tokens = 1, seed = "18446744073709551615" })
mt.generate(model, tok, "hi", { max_new_tokens = 1, seed = math.maxinteger })
-- sizes and seeds of the other bindings: nothing is cut to 32 bits or wrapped
refused("plan batch", "plan: batch: 4294967297 is out of range (expected an integer from 1 to 65536)",
        model.plan, model, 4294967297, 16)
refused("plan seq", "plan: sequence length: 4294967298 is out of range", model.plan, model, 2, 4294967298)
refused("plan chunk", "plan: chunk: -1 is out of range", model.plan, model, 2, 16, -1)
model:plan(2, 16)
local ex <close> = mt.examples_from_ids({ { ids = { 1, 2, 3, 4 }, trainable = { 0, 1, 1, 1 } },
                                          { ids = { 5, 6, 7 }, trainable = { 0, 1, 1 } } }, { seq_len = 8 })
refused("batcher seed", "option 'seed': -1 is out of range", mt.batcher, ex, { batch = 1, seq_len = 8, seed = -1 })
refused("batcher batch", "option 'batch': 4294967297 is out of range", mt.batcher, ex, { batch = 4294967297 })
refused("split seed", "split: seed: -1 is out of range", ex.split, ex, 0.5, -1)
local b <close> = mt.batcher(ex, { batch = 1, seq_len = 8, seed = "18446744073709551615" })
local tr, ho = ex:split(0.5, "18446744073709551615")
assert(tr and ho)
local s = mt.plugin("scheduler", "cosine", {})
refused("negative step", "schedule: step -1 is out of range", mt.schedule, s, -1, 10, 0.1)
refused("step past the total", "schedule: step 11 is out of range", mt.schedule, s, 11, 10, 0.1)
refused("zero total", "schedule: total steps 0", mt.schedule, s, 0, 0, 0.1)
refused("negative lr", "schedule: base learning rate", mt.schedule, s, 1, 10, -0.1)
refused("infinite lr", "schedule: base learning rate", mt.schedule, s, 1, 10, 1 / 0)
assert(mt.schedule(s, 0, 10, 0.1) >= 0 and mt.schedule(s, 10, 10, 0.1) >= 0)
refused("threads", "option 'threads': 100000 is out of range", mt.model, FIXTURE_DIR .. "/tiny_chat", { threads = 100000 })
print("numbers: the Lua API refuses what the commands refuse")
return "ok"
