local mt = require("moontune")
local cfg = mt.config({ lr = 1 })
