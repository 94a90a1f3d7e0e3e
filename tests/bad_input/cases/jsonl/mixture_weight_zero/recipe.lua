local mt = require("moontune")
mt.records({ {file = '@FIX@/data/alpaca.jsonl', weight = 0} })
