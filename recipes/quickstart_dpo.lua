-- quickstart_dpo.lua — supervised fine-tuning, then preference training (DPO) on the
-- quickstart task: SmolLM2-135M-Instruct learns to turn a meeting request into one JSON
-- line (as recipes/quickstart.lua), then DPO on near-miss pairs turns it away from its
-- commonest mistake: for an afternoon said on the 12-hour clock ("5:45 pm") the SFT
-- model answers 13 or 14 whatever the hour. Each pair holds the right answer and the
-- same answer with another afternoon hour, scored up to where the two part
-- (data/quickstart/prefs_nearmiss_train.jsonl, from the SFT training requests). Other
-- pairs: dpo.data = "data/quickstart/prefs_train.jsonl" (scripted mistakes of every
-- kind: 12-hour times, attendees out of order, wrong action words, missing fields), or
-- "onpolicy", the SFT model's own wrong answers to 800 new requests of the task
-- (data/quickstart/extra.jsonl, none in the training or held-out sets). What each
-- gains: docs/dpo.md.
--
--   moontune run recipes/quickstart_dpo.lua --set model=path/to/model.gguf
--
-- Steps:
--   1. SFT: LoRA, cross-entropy on the replies, as the quickstart (same data, settings
--      and seed) but at lr 8e-4, not 1e-3; exact-match accuracy on the held-out requests
--      after it
--   2. the pairs: dpo.data, a JSONL file of pairs (data/quickstart/generate_preferences.py
--      writes the near-miss and the scripted ones); or "onpolicy": the
--      SFT model's greedy answers to dpo.prompts, each wrong one a pair (written to
--      out_dir/dpo/pairs.jsonl)
--   3. the reference: the SFT model's log-probabilities of every training and held-out
--      pair, computed once (DPO continues the SFT adapter, so "adapters disabled" would
--      be the base model, not the SFT model)
--   4. DPO: the same adapter trained on the pairs with the dpo loss; TRL's metrics
--      (rewards/accuracies, rewards/margins, ...) on the held-out pairs every eval_every
--      steps
--   5. after: exact-match accuracy, held-out preference metrics, general-text
--      perplexity against the base model's (the bound: max_general_regression)
--   The numbers land in out_dir/summary.json; each stage's metrics.jsonl and
--   checkpoints in out_dir/sft and out_dir/dpo.
--
-- Settings (override with --set key=value): as quickstart.lua for the SFT stage; the DPO
-- stage's under dpo.* (batch counts pairs; beta, loss_type, label_smoothing, rpo_alpha
-- as `moontune plugins --describe dpo`).
local mt = require("moontune")
local tasks = require("moontune.tasks")
local pref = require("moontune.preference")

local cfg = mt.config({
  model = "",
  sft_adapter = "", -- a PEFT adapter of an earlier run's SFT stage (out_dir/sft/adapter): skip stage 1
  data = "data/quickstart/train.jsonl",
  heldout = "data/quickstart/heldout.jsonl",
  general = "data/general/general.jsonl",
  max_general_regression = 0.10,
  seq_len = 256,
  batch = 4,
  epochs = 1,
  -- below the quickstart's 1e-3, so that SFT + DPO stay within max_general_regression of
  -- the base on general text (docs/dpo.md, "Under the 10% bound")
  lr = 8e-4,
  warmup_ratio = 0.05,
  lora = { r = 16, alpha = 32, dropout = 0.0, target_modules = "all-linear" },
  eval_every = 25,
  patience = 2,
  dpo = {
    -- near-miss pairs: the right afternoon hour against other hours, scored where the
    -- replies part (docs/dpo.md, "Near-miss pairs"); prefs_train.jsonl: scripted mistakes
    -- of every kind; "onpolicy": the SFT model's own wrong answers to dpo.prompts
    data = "data/quickstart/prefs_nearmiss_train.jsonl",
    prompts = "data/quickstart/extra.jsonl", -- the requests the on-policy pairs come from
    heldout = "data/quickstart/prefs_nearmiss_heldout.jsonl",
    batch = 4,
    epochs = 1,
    max_steps = 0,
    lr = 1e-4,
    warmup_ratio = 0.1,
    beta = 2.0,
    loss_type = "sigmoid",
    label_smoothing = 0.0,
    -- the chosen answers' NLL beside the preference term (RPO): with whole rejected replies
    -- DPO without it made the chosen answers less likely too and the exact answers broke
    -- (0% at lr 1e-4); on the near-miss pairs it adds 3 points (docs/dpo.md)
    rpo_alpha = 1.0,
    -- "first_difference": a rejected reply is scored up to where it parts from the chosen
    -- one (docs/dpo.md, "Where the replies part"); "end": the whole reply, as TRL
    rejected_until = "first_difference",
    eval_every = 0,
    patience = 0,
    early_stopping_metric = "eval_rewards/accuracies",
  },
  gen_batch = 32,
  max_new_tokens = 64,
  out_dir = "runs/quickstart_dpo",
  seed = 42,
})
assert(cfg.model ~= "", "quickstart_dpo: set the model: --set model=path/to/model (scripts/fetch-model prints the default)")

local started = mt.now()
local out = mt.output_dir(cfg.out_dir)
local sft_out, dpo_out = mt.output_dir(cfg.out_dir .. "/sft"), mt.output_dir(cfg.out_dir .. "/dpo")
local tok = mt.tokenizer(cfg.model)
local opts = { template = "auto", seq_len = cfg.seq_len }
local train = mt.examples(cfg.data, tok, opts)
local heldout = mt.examples(cfg.heldout, tok, opts)
local general = mt.examples(cfg.general, tok, { format = "text", seq_len = cfg.seq_len })
local items = tasks.items(mt.records(cfg.heldout))
local d = cfg.dpo
d.seq_len, d.seed, d.max_general_regression = cfg.seq_len, cfg.seed, cfg.max_general_regression
local onpolicy = d.data == "onpolicy"
-- read now, so that a bad file stops the run before the SFT stage
local prompt_items = onpolicy and tasks.items(mt.records(d.prompts)) or nil
local pairs, pairs_heldout
if not onpolicy then pairs, pairs_heldout = pref.examples(mt, tok, d, "quickstart_dpo") end
-- a second copy of the held-out pairs for the reference-free pair accuracy after DPO
local pairs_probe = mt.examples(d.heldout, tok, { format = "preference", seq_len = cfg.seq_len })

local model = mt.model(cfg.model)
local lora
if cfg.sft_adapter ~= "" then
  lora = model:attach_peft(cfg.sft_adapter)
else
  lora = mt.plugin("adapter", "lora", {
    r = cfg.lora.r, alpha = cfg.lora.alpha, dropout = cfg.lora.dropout,
    target_modules = cfg.lora.target_modules, seed = cfg.seed,
  })
  model:attach(lora)
end
model:plan(2 * d.batch > cfg.batch and 2 * d.batch or cfg.batch, cfg.seq_len)

local function recipe_text()
  local f = arg and arg[0] and io.open(arg[0], "rb")
  if not f then return nil end
  local text = f:read("a")
  f:close()
  return text
end

local function task_accuracy(label)
  local t = mt.now()
  local r = tasks.evaluate(mt, model, tok, items, { max_new_tokens = cfg.max_new_tokens, batch = cfg.gen_batch })
  print(string.format("%s: task accuracy %.1f%% (%d/%d exact) [%.0f s]", label, 100 * r.accuracy, r.correct,
                      r.n, mt.now() - t))
  return r
end

-- the share of held-out pairs whose chosen answer is the more likely one under the model
-- (reference-free, so it compares models), from per-sequence log-probabilities
local function pair_accuracy(label, logps)
  local r = pref.pair_stats(logps)
  print(string.format("%s: held-out pairs: the chosen answer is the more likely one in %.1f%% " ..
                      "(mean log-probability margin %.2f)", label, 100 * r.accuracy, r.margin))
  return r
end

if mt.validating() then
  print("quickstart_dpo: validated (data, model, adapter); nothing is trained")
  return
end

-- ---- 1. SFT ----------------------------------------------------------------------
-- the base model's general-text perplexity: the bound after DPO is against it (with an
-- SFT adapter given, the base is loaded once more without it, for this pass only)
local general_base
if cfg.sft_adapter == "" then
  general_base = mt.evaluate(model, general).perplexity
else
  local base <close> = mt.model(cfg.model)
  base:plan(cfg.batch, cfg.seq_len)
  general_base = mt.evaluate(base, general).perplexity
end
print(string.format("base model: general-text perplexity %.3f", general_base))
local t_sft = mt.now()
local sft_steps = 0
if cfg.sft_adapter == "" then
  local sft_loss = mt.plugin("loss", "cross_entropy", {})
  local sft_opt = mt.plugin("optimizer", "adamw", { weight_decay = 0.0 })
  local sft_sched = mt.plugin("scheduler", "cosine", { warmup_ratio = cfg.warmup_ratio })
  local sft = mt.trainer.run({
    model = model, loss = sft_loss, optimizer = sft_opt, scheduler = sft_sched, recipe = recipe_text(),
    plugins = { lora, sft_loss, sft_opt, sft_sched },
    batcher = mt.batcher(train, { batch = cfg.batch, seq_len = cfg.seq_len, seed = cfg.seed }),
    eval_examples = heldout, eval_every = cfg.eval_every,
    early_stopping = cfg.patience > 0 and { metric = "eval_loss", mode = "min", patience = cfg.patience } or nil,
    lr = cfg.lr, epochs = cfg.epochs, save_every = 0, out_dir = sft_out,
  }, mt)
  sft_steps = sft.steps
  -- the SFT adapter as it is before DPO (recipes/dpo.lua --set adapter=... continues it;
  -- this recipe --set sft_adapter=... starts from it)
  print(string.format("quickstart_dpo: SFT adapter saved to %s", model:export_peft(sft_out .. "/adapter")))
else
  print(string.format("quickstart_dpo: SFT stage skipped: the adapter %s", cfg.sft_adapter))
end
local sft_seconds = mt.now() - t_sft
local after_sft = task_accuracy("after SFT")

-- ---- 2. the pairs (dpo.data = "onpolicy": the SFT model's own mistakes) ------------
local t_dpo = mt.now()
local n_onpolicy
if onpolicy then
  local r = tasks.evaluate(mt, model, tok, prompt_items, { max_new_tokens = cfg.max_new_tokens, batch = cfg.gen_batch })
  local records = pref.pairs_from_mistakes(prompt_items, r)
  -- no pair at all: every wrong answer was blank (a repeated one follows a first that
  -- made a pair), so the counts say why
  if #records == 0 then
    error(string.format("quickstart_dpo: no pairs from dpo.prompts: of %d requests the SFT model " ..
                        "answered %d exactly and %d with no text (nothing to reject)",
                        r.n, r.correct, r.n - r.correct), 0)
  end
  local lines = {}
  for i, rec in ipairs(records) do lines[i] = mt.json_encode(rec) end
  d.data = dpo_out .. "/pairs.jsonl"
  -- every rank has every answer (tasks.evaluate): rank 0 writes, the others read after it
  if mt.rank() == 0 then mt.write_file(d.data, table.concat(lines, "\n") .. "\n") end
  mt.broadcast(true)
  n_onpolicy = { pairs = #records, requests = r.n, accuracy = r.accuracy, seconds = r.seconds }
  print(string.format("quickstart_dpo: on-policy pairs: the SFT model got %d of %d new requests wrong [%.0f s]; " ..
                      "%d pairs (blank answers left out) in %s", r.n - r.correct, r.n, r.seconds, #records, d.data))
  pairs, pairs_heldout = pref.examples(mt, tok, d, "quickstart_dpo")
end

-- ---- 3. the reference: the SFT model, computed once ----------------------------------
pref.reference(mt, d, model, { train = pairs, heldout = pairs_heldout }, dpo_out, "quickstart_dpo")
local probe_before = pair_accuracy("after SFT", pairs_heldout:ref_logps())

-- ---- 4. DPO ------------------------------------------------------------------------
-- before it, the policy is the reference: every reward is 0 (rewards/accuracies counts
-- the pairs whose chosen reward is strictly the higher one: none)
local dpo = pref.train(mt, d, model, pairs, pairs_heldout, dpo_out, "quickstart_dpo",
                       { recipe = recipe_text(), general = general })
local dpo_seconds = mt.now() - t_dpo
local after_pairs = dpo.metrics -- the trainer's evaluation of the model it leaves

-- ---- 5. after ----------------------------------------------------------------------
local after_dpo = task_accuracy("after SFT+DPO")
mt.reference_logps(model, pairs_probe, { batch = 2 * d.batch, seq_len = cfg.seq_len })
local probe_after = pair_accuracy("after SFT+DPO", pairs_probe:ref_logps())
local general_sft, general_dpo = dpo.general.before, dpo.general.after
local change = tasks.relative_change(general_base, general_dpo)

print("")
print(string.format("%-44s %12s %12s", "", "after SFT", "after DPO"))
print(string.format("%-44s %11.1f%% %11.1f%%", "held-out task accuracy (exact match)", 100 * after_sft.accuracy,
                    100 * after_dpo.accuracy))
print(string.format("%-44s %11.1f%% %11.1f%%", "held-out pairs: rewards/accuracies", 0.0,
                    100 * after_pairs["eval_rewards/accuracies"]))
print(string.format("%-44s %12.4f %12.4f", "held-out pairs: rewards/margins", 0.0,
                    after_pairs["eval_rewards/margins"]))
print(string.format("%-44s %11.1f%% %11.1f%%", "held-out pairs: chosen more likely", 100 * probe_before.accuracy,
                    100 * probe_after.accuracy))
print(string.format("%-44s %12.3f %12.3f  (base %.3f; %+.1f%% after DPO)", "general-text perplexity", general_sft,
                    general_dpo, general_base, 100 * change))
print("(rewards/* compare with the reference, the SFT model itself: 0 before DPO by construction)")
if change > cfg.max_general_regression then
  print(string.format("WARNING: general-text perplexity is %.1f%% above the base model's, more than the %.0f%% " ..
                      "this recipe allows (max_general_regression)", 100 * change, 100 * cfg.max_general_regression))
end
local total = mt.now() - started
print(string.format("quickstart_dpo: SFT %d steps in %.0f s, DPO %d steps in %.0f s (reference pass and " ..
                    "evaluation included), done in %.0f s, peak memory %.0f MiB",
                    sft_steps, sft_seconds, dpo.steps, dpo_seconds, total, mt.peak_memory() / 1048576))

if mt.rank() == 0 then -- one summary per job (data parallel: docs/distributed.md)
  local f = assert(io.open(out .. "/summary.json", "w"))
  f:write(mt.json_encode({
    sft = { accuracy = after_sft.accuracy, general_perplexity = general_sft, steps = sft_steps, seconds = sft_seconds },
    dpo = { accuracy = after_dpo.accuracy, general_perplexity = general_dpo, steps = dpo.steps, seconds = dpo_seconds,
            heldout_after = after_pairs, onpolicy_pairs = n_onpolicy,
            pair_accuracy_before = probe_before.accuracy, pair_accuracy_after = probe_after.accuracy },
    base = { general_perplexity = general_base }, general_change = change, total_seconds = total,
    peak_memory_bytes = mt.peak_memory(),
  }) .. "\n")
  f:close()
end
