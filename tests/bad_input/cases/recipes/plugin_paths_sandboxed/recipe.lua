local mt = require("moontune")
mt.plugin('optimizer', 'adamw', {}, {paths = '@CASE@'})
