local mt = require("moontune")
mt.plugin('optimiser', 'adamw', {})
