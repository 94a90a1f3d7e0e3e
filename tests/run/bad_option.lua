-- An option of the wrong type: moontune validate must refuse it, naming the option.
local mt = require("moontune")
local cfg = mt.config({ plugins = "" })
mt.plugin("adapter", "lora", { r = "eight" }, { paths = { cfg.plugins } })
