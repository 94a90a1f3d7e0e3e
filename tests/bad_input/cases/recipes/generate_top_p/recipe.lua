local mt = require("moontune")
local m = mt.model('@FIX@/tiny_chat')
local t = mt.tokenizer('@FIX@/tiny_chat')
mt.generate(m, t, 'hi', {top_p = 5})
