local mt = require("moontune")
local tok = mt.tokenizer('@FIX@/tiny_chat')
mt.examples('@FIX@/data/tiny_chat_heldout.jsonl', tok, {format = 'yaml'})
