local mt = require("moontune")
local tok = mt.tokenizer('@FIX@/tiny_chat')
mt.examples('@CASE@/d.jsonl', tok, {})
