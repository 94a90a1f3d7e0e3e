local mt = require("moontune")
mt.model('@FIX@/data/tiny_chat_heldout.jsonl')
