-- The Lua API accepts the numbers the commands accept (core/numparse.c's limits):
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
}
for _, case in ipairs(bad) do refused("generate " .. case[2], case[2], mt.generate, model, tok, "hi", case[1]) end
-- the accepted edges
mt.generate(model, tok, "hi", { top_p = 1, top_k = 0, temperature = 0, max_new_tokens = 0 })
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
