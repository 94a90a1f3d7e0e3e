local mt = require("moontune")
mt.plugin('optimizer', 'adamx', {})
