local mt = require("moontune")
local tok = mt.tokenizer('@FIX@/tiny_chat')
mt.examples('@CASE@/p.jsonl', tok, {seq_len = 48, truncation = 'drop'})
