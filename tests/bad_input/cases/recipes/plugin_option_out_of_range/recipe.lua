local mt = require("moontune")
mt.plugin('optimizer', 'adamw', {beta1 = 7})
