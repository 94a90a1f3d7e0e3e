local mt = require("moontune")
mt.plugin('optimizer', 'adamw', {learning_rate = 1})
