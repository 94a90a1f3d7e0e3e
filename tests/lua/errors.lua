-- Errors carry the core's message; __close frees at once.
local mt = require("moontune")
local PLUGINS = { paths = { BUILD_DIR .. "/plugins" } }
local function check(cond, msg) if not cond then error(msg, 2) end end

local ok, err = pcall(mt.plugin, "optimizer", "adamx", {}, PLUGINS)
check(not ok and err:find("adamx", 1, true) and err:find("adamw", 1, true),
  "unknown plugin: " .. tostring(err))

ok, err = pcall(mt.plugin, "adapter", "lora", { r = "eight" }, PLUGINS)
check(not ok and err:find("'r'", 1, true), "bad option type: " .. tostring(err))
check(not ok and err:find("lora", 1, true), "bad option names the plugin: " .. tostring(err))

ok, err = pcall(mt.plugin, "gadget", "x", {}, PLUGINS)
check(not ok and err:find("gadget", 1, true), "bad kind: " .. tostring(err))

ok, err = pcall(mt.model, FIXTURE_DIR .. "/does-not-exist")
check(not ok and err:find("does-not-exist", 1, true), "missing model: " .. tostring(err))

ok, err = pcall(mt.examples_from_ids, { { ids = { 1, 2 }, trainable = { 1 } } }, { seq_len = 8 })
check(not ok and err:find("trainable", 1, true), "trainable length: " .. tostring(err))

ok, err = pcall(mt.batcher, mt.examples_from_ids({ { ids = { 1, 2, 3 } } }), { batch = "two" })
check(not ok and err:find("batch", 1, true), "option type: " .. tostring(err))

-- <close>: objects are released at the end of the block; using them after is an error
local m_ref, ex_ref, b_ref, p_ref
do
  local m <close> = mt.model(FIXTURE_DIR .. "/tiny_gqa")
  local lora <close> = mt.plugin("adapter", "lora", {}, PLUGINS)
  m:attach(lora)
  local ex <close> = mt.examples_from_ids({ { ids = { 5, 6, 7, 8 } } }, { seq_len = 8 })
  local b <close> = mt.batcher(ex, { batch = 1 })
  local ok2, err2 = pcall(ex.close, ex)
  check(not ok2 and err2:find("batcher", 1, true), "examples in use: " .. tostring(err2))
  m_ref, ex_ref, b_ref, p_ref = m, ex, b, lora
end
ok, err = pcall(m_ref.info, m_ref)
check(not ok and err:find("closed", 1, true), "closed model: " .. tostring(err))
ok = pcall(ex_ref.count, ex_ref)
check(not ok, "closed examples")
ok = pcall(b_ref.next, b_ref)
check(not ok, "closed batcher")
ok = pcall(p_ref.describe, p_ref)
check(not ok, "adapter freed with its model")

-- attaching a non-adapter is refused
local m2 <close> = mt.model(FIXTURE_DIR .. "/tiny_gqa")
local sgd <close> = mt.plugin("optimizer", "sgd", {}, PLUGINS)
ok, err = pcall(m2.attach, m2, sgd)
check(not ok and err:find("not an adapter", 1, true), "attach: " .. tostring(err))

-- objects left to the garbage collector (and lua_close) are freed too
local _ = mt.model(FIXTURE_DIR .. "/tiny_gqa")
local a2 = mt.plugin("adapter", "lora", {}, PLUGINS)
_:attach(a2)
collectgarbage()
return "ok"
