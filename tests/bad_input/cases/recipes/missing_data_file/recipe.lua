local mt = require("moontune")
local tok = mt.tokenizer('@FIX@/tokenizer/smollm2')
mt.examples('@CASE@/missing.jsonl', tok, {})
