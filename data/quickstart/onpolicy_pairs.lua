-- onpolicy_pairs.lua — preference pairs from a model's own mistakes: the SFT model
-- answers the training requests (greedy, then `passes - 1` sampled passes), and every
-- answer that is not the reference becomes a pair {prompt, chosen = reference,
-- rejected = the model's answer}, written to <out_dir>/pairs.jsonl for
-- recipes/quickstart_dpo.lua (--set dpo.data=<out_dir>/pairs.jsonl). docs/dpo.md gives
-- what DPO on these pairs measured.
--
--   moontune run data/quickstart/onpolicy_pairs.lua --set model=M.gguf \
--       --set adapter=runs/quickstart_dpo/sft/adapter
local mt = require("moontune")
local tasks = require("moontune.tasks")

local cfg = mt.config({
  model = "", adapter = "", data = "data/quickstart/train.jsonl", out_dir = "runs/onpolicy_pairs",
  passes = 1, temperature = 0.8, seed = 7, batch = 32, max_new_tokens = 64,
})
assert(cfg.model ~= "" and cfg.adapter ~= "", "onpolicy_pairs: set model= and adapter= (the SFT adapter)")
local out = mt.output_dir(cfg.out_dir)
local tok = mt.tokenizer(cfg.model)
local items = tasks.items(mt.records(cfg.data))
local model = mt.model(cfg.model)
model:attach_peft(cfg.adapter)
model:plan(cfg.batch, 256)
model:set_training(false)

local lines, seen = {}, {}
for pass = 1, cfg.passes do
  local t = mt.now()
  local by_system = {}
  for i, it in ipairs(items) do
    local key = it.system or ""
    by_system[key] = by_system[key] or { system = it.system, prompts = {}, index = {} }
    local g = by_system[key]
    g.prompts[#g.prompts + 1], g.index[#g.index + 1] = it.prompt, i
  end
  local wrong = 0
  for _, g in pairs(by_system) do
    local texts = mt.generate(model, tok, g.prompts, {
      system = g.system, max_new_tokens = cfg.max_new_tokens, batch = cfg.batch,
      temperature = pass == 1 and 0 or cfg.temperature, seed = cfg.seed + 1000 * pass })
    for j, text in ipairs(texts) do
      local it = items[g.index[j]]
      local key = g.index[j] .. "\0" .. text
      if not tasks.exact_match(text, it.reference) and text:match("%S") and not seen[key] then
        seen[key] = true
        wrong = wrong + 1
        local prompt = {}
        if it.system then prompt[#prompt + 1] = { role = "system", content = it.system } end
        prompt[#prompt + 1] = { role = "user", content = it.prompt }
        lines[#lines + 1] = mt.json_encode({ prompt = prompt, chosen = it.reference, rejected = text })
      end
    end
  end
  print(string.format("onpolicy_pairs: pass %d (%s): %d new wrong answers of %d [%.0f s]", pass,
                      pass == 1 and "greedy" or "sampled", wrong, #items, mt.now() - t))
end
assert(#lines > 0, "onpolicy_pairs: the model answered every request exactly: no pairs")
mt.write_file(out .. "/pairs.jsonl", table.concat(lines, "\n") .. "\n")
print(string.format("onpolicy_pairs: %d pairs in %s/pairs.jsonl", #lines, out))
