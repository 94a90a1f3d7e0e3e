local mt = require("moontune")
mt.plugin('optimizer', 'adamw', {lr = 'fast'})
