local mt = require("moontune")
mt.model('@CASE@/no-model')
