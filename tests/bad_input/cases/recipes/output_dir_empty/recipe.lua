local mt = require("moontune")
mt.output_dir('')
