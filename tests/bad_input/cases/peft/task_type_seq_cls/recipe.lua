local mt = require("moontune")
local m = mt.model('@FIX@/tiny_gqa')
m:attach_peft('@CASE@/adapter')
