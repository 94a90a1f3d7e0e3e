-- moontune.sft — the supervised fine-tuning steps the shipped recipes share: the chat
-- data rendered with the model's template and masked to the replies, then the trainer
-- with AdamW, a cosine schedule, evaluation, early stopping and checkpoints. A recipe
-- picks the model and its adapter in between; copy these two functions into a recipe to
-- change what they do. Both read the standard settings of the recipes' config table
-- (documented at the top of recipes/lora_sft.lua).
local M = {}

-- Returns the training and held-out examples (and the tokenizer).
function M.examples(mt, cfg, name)
  assert(cfg.model ~= "", name .. ": set the model: --set model=path/to/model")
  local tok = mt.tokenizer(cfg.model)
  local opts = { template = cfg.template, seq_len = cfg.seq_len,
                 train_on_inputs = cfg.train_on_inputs }
  local train, heldout
  if cfg.heldout ~= "" then
    train = mt.examples(cfg.data, tok, opts)
    heldout = mt.examples(cfg.heldout, tok, opts)
  else
    train, heldout = mt.examples(cfg.data, tok, opts):split(cfg.heldout_fraction, cfg.seed)
  end
  print(string.format("%s: %d training examples, %d held out", name, train:count(),
                      heldout:count()))
  return train, heldout, tok
end

-- Plans the model and trains it; prints and returns the trainer's result.
function M.train(mt, cfg, model, train, heldout, name)
  local out = mt.output_dir(cfg.out_dir)
  model:plan(cfg.batch, cfg.seq_len)
  local result = mt.trainer.run({
    model = model,
    loss = mt.plugin("loss", "cross_entropy", {}),
    optimizer = mt.plugin("optimizer", "adamw", { weight_decay = cfg.weight_decay }),
    scheduler = mt.plugin("scheduler", "cosine", { warmup_ratio = cfg.warmup_ratio,
                                                   min_lr_ratio = cfg.min_lr_ratio }),
    batcher = mt.batcher(train, { batch = cfg.batch, seq_len = cfg.seq_len, seed = cfg.seed }),
    train_examples = train,
    eval_examples = heldout,
    eval_opts = { batch = cfg.batch, seq_len = cfg.seq_len },
    eval_every = cfg.eval_every,
    early_stopping = cfg.patience > 0 and
      { metric = "eval_loss", mode = "min", patience = cfg.patience } or nil,
    lr = cfg.lr,
    epochs = cfg.epochs,
    max_steps = cfg.max_steps > 0 and cfg.max_steps or nil,
    grad_accum = cfg.grad_accum,
    max_grad_norm = cfg.max_grad_norm > 0 and cfg.max_grad_norm or false,
    save_every = cfg.save_every,
    keep_last = cfg.keep_last,
    out_dir = out,
    resume = arg and arg.resume or nil,
  }, mt)
  print(string.format("%s: %d steps%s, best eval_loss %s, run in %s", name, result.steps,
                      result.stopped_early and " (stopped early)" or "",
                      result.best and string.format("%.4f at step %d", result.best.value,
                                                    result.best.step) or "n/a",
                      result.out_dir or out))
  return result
end

return M
