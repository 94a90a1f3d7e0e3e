-- moontune.preference — the preference-training workflow the DPO recipes share: pairs
-- (prompt, chosen, rejected) rendered with the model's chat template, the reference
-- model's log-probabilities (the base with adapters disabled, or computed once before
-- training and kept in the run directory), a reference-free pair accuracy to compare
-- models, and the trainer with the dpo loss, held-out preference metrics, early
-- stopping and checkpoints. Copy these functions into a recipe to change what they do.
--
--     local pref = require("moontune.preference")
--     local train, heldout = pref.examples(mt, tok, cfg, "dpo")
--     pref.reference(mt, cfg, model, { train = train, heldout = heldout }, out, "dpo")
--     local result = pref.train(mt, cfg, model, train, heldout, out, "dpo")
--
-- cfg keys read here (recipes/dpo.lua documents them): data, heldout, heldout_fraction,
-- template, seq_len, on_bad_record, rejected_until, seed, reference, batch, grad_accum, epochs,
-- max_steps, lr, warmup_ratio, max_grad_norm, beta, loss_type, label_smoothing,
-- rpo_alpha, eval_every, patience, early_stopping_metric, save_every, keep_last,
-- general, max_general_regression.
local M = {}

-- The training and held-out pairs (Examples whose items are pairs), read with the
-- model's chat template. A held-out file wins over a split of the training pairs.
function M.examples(mt, tok, cfg, name)
  local opts = { format = "preference", template = cfg.template or "auto", seq_len = cfg.seq_len,
                 on_bad_record = cfg.on_bad_record or "error", truncation = cfg.truncation or "left",
                 rejected_until = cfg.rejected_until or "end" }
  local train, heldout
  if (cfg.heldout or "") ~= "" then
    train = mt.examples(cfg.data, tok, opts)
    heldout = mt.examples(cfg.heldout, tok, opts)
  else
    train, heldout = mt.examples(cfg.data, tok, opts):split(cfg.heldout_fraction or 0.1, cfg.seed)
  end
  local st = train:stats()
  print(string.format("%s: %d training pairs, %d held out; %d tokens, longest sequence %d of %d; " ..
                      "%d prompts truncated, %d replies cut, %d pairs dropped (too long), " ..
                      "%d records skipped", name, train:count(), heldout:count(), st.tokens, st.max_len,
                      st.seq_len, st.truncated_prompt, st.truncated_response, st.dropped_too_long,
                      st.bad_skipped))
  return train, heldout
end

-- Where the reference comes from: "adapters_off" (the model with its adapters disabled:
-- no extra memory or pass, but the base must be frozen and the adapter new) or
-- "precomputed" (the model as it is before preference training, computed once over
-- the data: full fine-tuning, or continuing an SFT adapter). "auto" picks precomputed
-- when base parameters train or the adapter was loaded (`continuing`), else adapters_off.
function M.reference_mode(cfg, model, continuing)
  local mode = cfg.reference or "auto"
  if mode ~= "auto" and mode ~= "adapters_off" and mode ~= "precomputed" then
    error(string.format("reference: expected \"auto\", \"adapters_off\" or \"precomputed\", found \"%s\"",
                        tostring(mode)), 0)
  end
  if mode ~= "auto" then return mode end
  local base_trains = false
  for _, p in ipairs(model:trainable()) do
    if not p.name:find("lora_", 1, true) then base_trains = true; break end
  end
  return (base_trains or continuing) and "precomputed" or "adapters_off"
end

-- Computes the reference log-probabilities of every set in `sets` (name -> Examples)
-- with the model as it is now, and keeps them in <out>/reference_logps.json; a resumed
-- run (resume) reads them back instead, since its model has trained since.
function M.reference(mt, cfg, model, sets, out, name, resume)
  local path = out .. "/reference_logps.json"
  local names = {}
  for k in pairs(sets) do names[#names + 1] = k end
  table.sort(names)
  local f = resume and io.open(path, "r")
  if f then
    local saved = mt.json_decode(f:read("a"), path)
    f:close()
    for _, k in ipairs(names) do
      if type(saved[k]) ~= "table" then error(string.format("%s: no reference for the %s pairs", path, k), 0) end
      sets[k]:set_ref_logps(saved[k])
    end
    print(string.format("%s: reference log-probabilities read from %s", name, path))
    return
  elseif resume then
    error(string.format("%s: resuming needs the reference log-probabilities of the first run (%s), " ..
                        "which are missing", name, path), 0)
  end
  local t = mt.now()
  local saved, shared, n = {}, 0, 0
  for _, k in ipairs(names) do
    shared = shared + mt.reference_logps(model, sets[k], { batch = cfg.batch * 2, seq_len = cfg.seq_len })
    n = n + sets[k]:count()
    saved[k] = sets[k]:ref_logps()
  end
  mt.write_file(path, mt.json_encode(saved) .. "\n")
  print(string.format("%s: reference log-probabilities of %s computed in %.0f s (%d of %d rejected replies " ..
                      "scored from their chosen row's pass), kept in %s", name, table.concat(names, " and "),
                      mt.now() - t, shared, n, path))
end

-- Reference-free preference accuracy of the model as it is: the share of pairs whose
-- chosen reply is more likely than the rejected one, and the mean log-probability
-- margin. `pairs` is a scratch copy of the pairs (its reference slots are overwritten).
function M.pair_accuracy(mt, model, pairs, opts)
  mt.reference_logps(model, pairs, opts)
  return M.pair_stats(pairs:ref_logps())
end

-- The same from per-sequence log-probabilities (chosen, rejected, chosen, ...), e.g. the
-- reference ones pairs:ref_logps() holds after M.reference.
function M.pair_stats(lp)
  local wins, margin = 0, 0
  for i = 1, #lp, 2 do
    if lp[i] > lp[i + 1] then wins = wins + 1 end
    margin = margin + (lp[i] - lp[i + 1])
  end
  local n = #lp // 2
  return { accuracy = n > 0 and wins / n or 0, margin = n > 0 and margin / n or 0, pairs = n }
end

-- Preference records from a model's own mistakes: for each item (tasks.items) whose
-- answer in `result` (tasks.evaluate) failed its metric, {prompt = the item's system
-- and user messages, chosen = the reference, rejected = the answer}. Blank answers and a
-- (prompt, answer) already in `seen` (optional; it grows, so that several passes keep
-- each mistake once) are left out.
function M.pairs_from_mistakes(items, result, seen)
  seen = seen or {}
  local records = {}
  for i, it in ipairs(items) do
    local text = result.outputs[i]
    local key = (it.system or "") .. "\0" .. it.prompt .. "\0" .. text
    if not result.passed[i] and text:match("%S") and not seen[key] then
      seen[key] = true
      local prompt = {}
      if it.system then prompt[#prompt + 1] = { role = "system", content = it.system } end
      prompt[#prompt + 1] = { role = "user", content = it.prompt }
      records[#records + 1] = { prompt = prompt, chosen = it.reference, rejected = text }
    end
  end
  return records
end

-- The dpo loss plugin with the config's options.
function M.loss(mt, cfg)
  return mt.plugin("loss", "dpo", { beta = cfg.beta, loss_type = cfg.loss_type,
                                     label_smoothing = cfg.label_smoothing, rpo_alpha = cfg.rpo_alpha })
end

-- Trains with the dpo loss; evaluates the held-out pairs (eval_loss and TRL's metrics as
-- eval_rewards/accuracies, ...) every eval_every steps; early stopping on any of them.
-- Returns the trainer's result.
function M.train(mt, cfg, model, train, heldout, out, name, extra)
  extra = extra or {}
  local batcher = mt.batcher(train, { batch = 2 * cfg.batch, seq_len = cfg.seq_len, seed = cfg.seed })
  local loss = extra.loss or M.loss(mt, cfg)
  local optimizer = mt.plugin("optimizer", "adamw", { weight_decay = 0.0 })
  local scheduler = mt.plugin("scheduler", "cosine", { warmup_ratio = cfg.warmup_ratio or 0.1 })
  local metric = cfg.early_stopping_metric or "eval_loss"
  local max_steps = (cfg.max_steps or 0) > 0 and cfg.max_steps or nil
  return mt.trainer.run({
    model = model,
    loss = loss,
    optimizer = optimizer,
    scheduler = scheduler,
    plugins = { loss, optimizer, scheduler },
    recipe = extra.recipe,
    batcher = batcher,
    train_examples = train,
    eval_examples = heldout,
    -- the held-out pairs are evaluated with `loss` (the trainer's loss); general text not
    eval_opts = { batch = 2 * cfg.batch, seq_len = cfg.seq_len },
    eval_every = cfg.eval_every,
    general_examples = extra.general,
    max_general_regression = cfg.max_general_regression,
    early_stopping = (cfg.patience or 0) > 0 and
      { metric = metric, mode = (metric == "eval_loss" or metric:find("rejected", 1, true)) and "min" or "max",
        patience = cfg.patience } or nil,
    lr = cfg.lr,
    epochs = cfg.epochs,
    max_steps = max_steps,
    grad_accum = cfg.grad_accum or 1,
    max_grad_norm = (cfg.max_grad_norm or 1.0) > 0 and (cfg.max_grad_norm or 1.0) or false,
    save_every = cfg.save_every or 0,
    keep_last = cfg.keep_last,
    out_dir = out,
    resume = extra.resume,
  }, mt)
end

return M
