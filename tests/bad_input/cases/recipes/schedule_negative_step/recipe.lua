local mt = require("moontune")
local s = mt.plugin('scheduler', 'cosine', {})
print(mt.schedule(s, -1, 10, 0.1))
