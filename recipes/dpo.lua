-- dpo.lua — preference training (DPO and its variants) with LoRA, on a model or on an
-- SFT adapter, from pairs of a prompt with a chosen and a rejected answer.
--
--   moontune run recipes/dpo.lua --set model=path/to/model
--   moontune run recipes/dpo.lua --set model=path/to/model --set adapter=runs/sft/export/adapter
--
-- The data: JSONL records {"prompt": ..., "chosen": ..., "rejected": ...}, where the
-- prompt is a string (one user message) or a list of messages, and each answer a string
-- (one assistant message) or a list of messages ending in an assistant's; or
-- {"chosen": [...], "rejected": [...]} whole conversations sharing their first
-- messages (the prompt). Both answers are rendered after the same prompt with the
-- model's chat template; the loss sees the answers' tokens only.
--
-- Settings (override with --set key=value):
--   model          Hugging Face model directory or .gguf file
--   adapter        "" = a new LoRA adapter (lora.*); a PEFT adapter directory (an SFT
--                  run's export) = continue training that adapter
--   data, heldout  training and held-out pairs ("" heldout: split heldout_fraction off)
--   template       chat template ("auto": the tokenizer's own)
--   seq_len        tokens per sequence; a longer pair loses the same prompt tokens on both
--                  sides (truncation "left") or is a bad record (truncation "drop")
--   on_bad_record  "error" or "skip" (empty or identical answers, pairs that cannot fit)
--   rejected_until "end" (TRL's DPO: both whole replies) or "first_difference": the
--                  rejected reply is scored up to its first token that differs from the
--                  chosen reply only (docs/dpo.md, "Where the replies part")
--   batch          pairs per micro-batch (2 * batch sequences); grad_accum, epochs,
--                  max_steps, lr, warmup_ratio, max_grad_norm as in lora_sft.lua
--   beta           how far from the reference the policy may move (TRL's default 0.1;
--                  higher = closer to the reference)
--   loss_type      "sigmoid" (DPO), "ipo", "hinge", "robust"; label_smoothing (cDPO and
--                  robust: the share of pairs assumed mislabelled); rpo_alpha (> 0 adds
--                  the chosen answers' NLL, which keeps their likelihood from falling)
--   reference      "auto", "adapters_off" (the model with its adapters disabled: no extra
--                  memory; a new adapter only) or "precomputed" (the model before DPO, one
--                  pass over the data before training, kept in out_dir; needed to continue
--                  an SFT adapter). auto: precomputed when continuing, else adapters_off
--   eval_every, patience, early_stopping_metric   held-out pairs every N steps; early
--                  stopping on eval_loss or any of TRL's metrics (eval_rewards/accuracies,
--                  eval_rewards/margins, ...)
--   general, max_general_regression   general-text perplexity before, at each
--                  evaluation and after: forgetting shows as a rise
--   export         "peft", "merged", "gguf" (a comma list) under out_dir/export/
--   out_dir, seed
local mt = require("moontune")
local pref = require("moontune.preference")
local sft = require("moontune.sft")

local cfg = mt.config({
  model = "",
  adapter = "",
  data = "data/quickstart/prefs_train.jsonl",
  heldout = "data/quickstart/prefs_heldout.jsonl",
  heldout_fraction = 0.1,
  template = "auto",
  seq_len = 256,
  on_bad_record = "error",
  rejected_until = "end",
  batch = 4,
  grad_accum = 1,
  epochs = 1,
  max_steps = 0,
  lr = 1e-4,
  warmup_ratio = 0.1,
  max_grad_norm = 1.0,
  beta = 0.1,
  loss_type = "sigmoid",
  label_smoothing = 0.0,
  rpo_alpha = 0.0,
  reference = "auto",
  lora = { r = 16, alpha = 32, dropout = 0.0, target_modules = "all-linear" },
  eval_every = 25,
  patience = 0,
  early_stopping_metric = "eval_loss",
  general = "data/general/general.jsonl",
  max_general_regression = 0.10,
  export = "",
  save_every = 0,
  keep_last = 2,
  out_dir = "runs/dpo",
  seed = 42,
})
assert(cfg.model ~= "", "dpo: set the model: --set model=path/to/model")

local out = mt.output_dir(cfg.out_dir)
local tok = mt.tokenizer(cfg.model)
local train, heldout = pref.examples(mt, tok, cfg, "dpo")
local general = (cfg.general or "") ~= "" and
  mt.examples(cfg.general, tok, { format = "text", seq_len = cfg.seq_len }) or nil

local model = mt.model(cfg.model)
local continuing = cfg.adapter ~= ""
if continuing then
  model:attach_peft(cfg.adapter)
else
  model:attach(mt.plugin("adapter", "lora", {
    r = cfg.lora.r, alpha = cfg.lora.alpha, dropout = cfg.lora.dropout,
    target_modules = cfg.lora.target_modules, seed = cfg.seed,
  }))
end
model:plan(2 * cfg.batch, cfg.seq_len)
local mode = pref.reference_mode(cfg, model, continuing)
print(string.format("dpo: reference model: %s", mode == "precomputed" and
                    "the model before DPO, log-probabilities computed once" or
                    "the base model with the adapter disabled"))
if mt.validating() then
  pref.train(mt, cfg, model, train, heldout, out, "dpo", { general = general })
  return
end
local resume = arg and arg.resume or nil
if mode == "precomputed" then
  pref.reference(mt, cfg, model, { train = train, heldout = heldout }, out, "dpo", resume)
end

local result = pref.train(mt, cfg, model, train, heldout, out, "dpo", { general = general, resume = resume })
local m = result.metrics or {}
print(string.format("dpo: %d steps%s; held-out eval_loss %.4f, rewards/accuracies %.3f, rewards/margins %.4f",
                    result.steps, result.stopped_early and " (stopped early)" or "", m.eval_loss or 0 / 0,
                    m["eval_rewards/accuracies"] or 0 / 0, m["eval_rewards/margins"] or 0 / 0))
sft.export(mt, cfg, model, tok, out, "dpo")
