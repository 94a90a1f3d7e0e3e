-- onpolicy_pairs.lua — preference pairs from a model's own mistakes: the SFT model
-- answers the requests (greedy, then `passes - 1` sampled passes), and every answer
-- that is not the reference becomes a pair {prompt, chosen = reference, rejected = the
-- model's answer}, written to <out_dir>/pairs.jsonl (recipes/quickstart_dpo.lua makes
-- the same pairs itself, from data/quickstart/extra.jsonl). docs/dpo.md gives what DPO on
-- such pairs measured.
--
--   moontune run data/quickstart/onpolicy_pairs.lua --set model=M.gguf \
--       --set adapter=runs/quickstart_dpo/sft/adapter
local mt = require("moontune")
local tasks = require("moontune.tasks")
local pref = require("moontune.preference")

local cfg = mt.config({
  model = "", adapter = "", data = "data/quickstart/extra.jsonl", out_dir = "runs/onpolicy_pairs",
  passes = 1, temperature = 0.8, seed = 7, batch = 32, max_new_tokens = 64,
})
assert(cfg.model ~= "" and cfg.adapter ~= "", "onpolicy_pairs: set model= and adapter= (the SFT adapter)")
local out = mt.output_dir(cfg.out_dir)
local tok = mt.tokenizer(cfg.model)
local items = tasks.items(mt.records(cfg.data))
local model = mt.model(cfg.model)
model:attach_peft(cfg.adapter)
model:plan(cfg.batch, 256)

local lines, seen = {}, {}
for pass = 1, cfg.passes do
  local r = tasks.evaluate(mt, model, tok, items, {
    max_new_tokens = cfg.max_new_tokens, batch = cfg.batch,
    temperature = pass == 1 and 0 or cfg.temperature, seed = cfg.seed + 1000 * pass })
  local records = pref.pairs_from_mistakes(items, r, seen)
  for _, rec in ipairs(records) do lines[#lines + 1] = mt.json_encode(rec) end
  print(string.format("onpolicy_pairs: pass %d (%s): %d new wrong answers of %d [%.0f s]", pass,
                      pass == 1 and "greedy" or "sampled", #records, #items, r.seconds))
end
assert(#lines > 0, "onpolicy_pairs: the model answered every request exactly: no pairs")
mt.write_file(out .. "/pairs.jsonl", table.concat(lines, "\n") .. "\n")
print(string.format("onpolicy_pairs: %d pairs in %s/pairs.jsonl", #lines, out))
