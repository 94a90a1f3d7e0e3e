local mt = require("moontune")
mt.plugin('optimizer', 'bad', {})
