local mt = require("moontune")
mt.checkpoint_load(arg.resume)
