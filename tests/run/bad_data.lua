-- Data that does not exist: moontune validate must refuse it, naming the file.
local mt = require("moontune")
local cfg = mt.config({ tokenizer = "", data = "missing.jsonl" })
local tok = mt.tokenizer(cfg.tokenizer)
mt.examples({ cfg.data }, tok, { seq_len = 64 })
