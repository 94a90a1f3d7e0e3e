-- An option of the wrong type: moontune validate must refuse it, naming the option.
local mt = require("moontune")
mt.plugin("adapter", "lora", { r = "eight" })
