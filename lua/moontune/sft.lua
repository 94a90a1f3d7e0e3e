-- moontune.sft — the supervised fine-tuning workflow the shipped recipes share: the chat
-- data rendered with the model's template and masked to the replies, checked before
-- training (moontune.checks); held-out task accuracy and general-text perplexity before
-- and after (catastrophic forgetting); the trainer with the optimizer, scheduler and
-- loss the config names, evaluation, early stopping and checkpoints. A recipe picks the
-- model and its adapter in between; copy these functions into a recipe to change what
-- they do. Both read the standard settings of the recipes' config table (documented at
-- the top of recipes/lora_sft.lua).
local checks = require("moontune.checks")
local tasks = require("moontune.tasks")

local M = {}

-- Returns the training and held-out examples, the tokenizer, and `data`: the records
-- (for the checks and the task evaluation) and the general-text examples.
function M.examples(mt, cfg, name)
  assert(cfg.model ~= "", name .. ": set the model: --set model=path/to/model")
  local tok = mt.tokenizer(cfg.model)
  local opts = { template = cfg.template, seq_len = cfg.seq_len,
                 train_on_inputs = cfg.train_on_inputs }
  local data = { tok = tok, train_records = mt.records(cfg.data) }
  local train, heldout
  if cfg.heldout ~= "" then
    train = mt.examples(cfg.data, tok, opts)
    heldout = mt.examples(cfg.heldout, tok, opts)
    data.heldout_records = mt.records(cfg.heldout)
  else
    train, heldout = mt.examples(cfg.data, tok, opts):split(cfg.heldout_fraction, cfg.seed)
  end
  if (cfg.general or "") ~= "" then
    data.general = mt.examples(cfg.general, tok, { format = "text", seq_len = cfg.seq_len })
  end
  print(string.format("%s: %d training examples, %d held out%s", name, train:count(),
                      heldout:count(), data.general and
                        string.format(", %d general-text paragraphs", data.general:count()) or ""))
  data.train, data.heldout = train, heldout
  return train, heldout, tok, data
end

-- A plugin the config chooses: { name = "adamw", option = value, ... } (or a name).
function M.plugin(mt, kind, choice)
  if type(choice) == "string" then return mt.plugin(kind, choice, {}) end
  assert(type(choice) == "table" and type(choice.name) == "string",
         kind .. ": expected { name = \"...\", options... } in the config")
  local opts = {}
  for k, v in pairs(choice) do if k ~= "name" then opts[k] = v end end
  return mt.plugin(kind, choice.name, opts)
end

-- The held-out task items (chat records ending in an assistant reply), at most
-- cfg.task_samples of them (0: all); nil when task_eval is off or impossible (said).
local function task_items(cfg, data, name)
  if not cfg.task_eval then return nil end
  if not (data and data.heldout_records) then
    print(name .. ": note: no task accuracy: it needs a held-out file (heldout), not a split")
    return nil
  end
  local ok, items = pcall(tasks.items, data.heldout_records)
  if not ok or #items == 0 then
    print(string.format("%s: note: no task accuracy: %s", name,
                        ok and "the held-out file has no records" or tostring(items)))
    return nil
  end
  local n = (cfg.task_samples or 0) > 0 and math.min(cfg.task_samples, #items) or #items
  local chosen = {}
  for i = 1, n do chosen[i] = items[i] end
  return chosen
end

-- Plans the model, checks the data, measures before, trains, measures after; prints
-- and returns the trainer's result (with .before and .after when measured).
-- Deployment: cfg.export lists what the trained model becomes under <out>/export/:
-- "peft" (the adapter as a PEFT directory: adapters that save one), "merged" (a
-- transformers model directory with the adapter folded in) and "gguf" (one GGUF file,
-- cfg.export_dtype "f32", "f16", "bf16" or "q8_0"). "" exports nothing. Returns the written paths.
function M.export(mt, cfg, model, tok, out, name)
  local paths = {}
  local wanted = cfg.export or ""
  if type(wanted) == "table" then wanted = table.concat(wanted, ",") end
  for kind in string.gmatch(wanted, "[^,%s]+") do
    local path
    if kind == "peft" then
      path = model:export_peft(out .. "/export/adapter")
    elseif kind == "merged" then
      path = model:export_merged(out .. "/export/merged", { tokenizer = tok })
    elseif kind == "gguf" then
      path = model:export_gguf(out .. "/export/model.gguf",
                               { tokenizer = tok, dtype = cfg.export_dtype or "f16" })
    else
      error(string.format("%s: export: unknown kind \"%s\" (expected peft, merged or gguf)", name, kind), 0)
    end
    paths[kind] = path
    print(string.format("%s: exported %s to %s", name, kind, path))
  end
  return paths
end

function M.train(mt, cfg, model, train, heldout, name, data)
  local out = mt.output_dir(cfg.out_dir)
  model:plan(cfg.batch, cfg.seq_len)
  local batcher = mt.batcher(train, { batch = cfg.batch, seq_len = cfg.seq_len, seed = cfg.seed })
  local max_steps = cfg.max_steps > 0 and cfg.max_steps or nil
  local steps_per_epoch = math.max(1, batcher:batches_per_epoch() // cfg.grad_accum)
  local steps = max_steps or cfg.epochs * steps_per_epoch

  -- the data checks, before anything runs (and in `moontune validate`)
  if data then
    local report = checks.data(data.train_records, data.heldout_records,
                               { train = train, steps = steps, steps_per_epoch = steps_per_epoch })
    checks.print(report, io.stdout, name)
    checks.refuse_leakage(report, cfg.allow_leakage)
  end

  local items = task_items(cfg, data, name)
  local function task_accuracy(label)
    -- only the score is used: a wrong answer ends at its first wrong character
    local r = tasks.evaluate(mt, model, data.tok, items, { max_new_tokens = cfg.max_new_tokens,
                                                          batch = cfg.gen_batch, template = cfg.template,
                                                          int8 = cfg.gen_int8, stop_on_mismatch = true })
    print(string.format("%s: %s: task accuracy %.1f%% (%d/%d exact) [%.0f s]", name, label,
                        100 * r.accuracy, r.correct, r.n, r.seconds))
    return r.accuracy
  end
  local es_metric = cfg.early_stopping_metric or "eval_loss"
  local metrics = nil
  if es_metric == "task_accuracy" then
    assert(items, name .. ": early_stopping_metric = \"task_accuracy\" needs task_eval and a chat held-out file")
    metrics = { task_accuracy = function() return task_accuracy("evaluation") end }
  end

  -- evaluations in the training steps' precision (eval_int8, default on where
  -- train_int8 is): the held-out loss is then the function training optimises
  local eval_int8 = cfg.eval_int8 ~= false and (cfg.train_int8 or "off") ~= "off"
  local eval_opts = { batch = cfg.batch, seq_len = cfg.seq_len, int8 = eval_int8 }
  local before = nil
  if not mt.validating() then
    before = { heldout_loss = mt.evaluate(model, heldout, eval_opts).loss }
    if items then before.accuracy = task_accuracy("before training") end
  end

  local loss = M.plugin(mt, "loss", cfg.loss or "cross_entropy")
  local optimizer = M.plugin(mt, "optimizer", cfg.optimizer)
  local scheduler = M.plugin(mt, "scheduler", cfg.scheduler)
  local result = mt.trainer.run({
    model = model,
    loss = loss,
    optimizer = optimizer,
    scheduler = scheduler,
    plugins = { loss, optimizer, scheduler },
    batcher = batcher,
    train_examples = train,
    eval_examples = heldout,
    eval_opts = eval_opts,
    eval_every = cfg.eval_every,
    metrics = metrics,
    general_examples = data and data.general or nil,
    max_general_regression = cfg.max_general_regression,
    on_general_regression = cfg.on_general_regression,
    early_stopping = cfg.patience > 0 and
      { metric = es_metric, mode = es_metric == "eval_loss" and "min" or "max",
        patience = cfg.patience } or nil,
    lr = cfg.lr,
    epochs = cfg.epochs,
    max_steps = max_steps,
    grad_accum = cfg.grad_accum,
    int8 = cfg.train_int8, -- "forward", "all", "off" or nil (off)
    recompute = cfg.recompute, -- "off", "norms", "layers" or nil (the model's)
    shard_optimizer = cfg.shard_optimizer,
    max_grad_norm = cfg.max_grad_norm > 0 and cfg.max_grad_norm or false,
    save_every = cfg.save_every,
    keep_last = cfg.keep_last,
    out_dir = out,
    resume = arg and arg.resume or nil,
  }, mt)
  if result.validated then return result end

  -- after: the model the trainer leaves (the best checkpoint when it restored one),
  -- whose held-out loss the trainer has measured already
  local after = { heldout_loss = result.metrics and result.metrics.eval_loss or
                                 mt.evaluate(model, heldout, eval_opts).loss }
  if items then after.accuracy = task_accuracy("after training") end
  result.before, result.after = before, after
  print(string.format("%-28s %12s %12s", "", "before", "after"))
  print(string.format("%-28s %12.4f %12.4f", "held-out loss", before.heldout_loss, after.heldout_loss))
  if items then
    print(string.format("%-28s %11.1f%% %11.1f%%", "held-out task accuracy", 100 * before.accuracy,
                        100 * after.accuracy))
  end
  if result.general then
    print(string.format("%-28s %12.3f %12.3f  (%+.1f%%)", "general-text perplexity", result.general.before,
                        result.general.after, 100 * result.general.change))
  end
  result.exports = M.export(mt, cfg, model, data and data.tok, out, name)
  print(string.format("%s: %d steps%s, best %s %s, run in %s", name, result.steps,
                      result.stopped_early and " (stopped early)" or "",
                      result.best and result.best.metric or es_metric,
                      result.best and string.format("%.4f at step %d", result.best.value,
                                                    result.best.step) or "n/a",
                      result.out_dir or out))
  return result
end

return M
