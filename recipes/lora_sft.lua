-- lora_sft.lua — supervised fine-tuning of a chat model with LoRA.
--
--   moontune run recipes/lora_sft.lua --set model=path/to/SmolLM2-135M-Instruct
--
-- Copy this file and edit the values below, or override any of them on the command
-- line with --set key=value (nested keys as --set lora.r=8). Resume an interrupted run
-- with `moontune run recipes/lora_sft.lua --resume` (the latest checkpoint in out_dir).
--
-- What you would change:
--   model          Hugging Face model directory or .gguf file. "" = must come from
--                  --set model=...
--   data           training data: a JSONL file (chat "messages", alpaca, sharegpt,
--                  prompt/completion or text records; the format is detected)
--   heldout        held-out JSONL for evaluation ("" = split heldout_fraction off data)
--   heldout_fraction  share of the training examples held out when heldout is ""
--   template       chat template: "auto" (the tokenizer's own), or a name such as
--                  "chatml", "llama3", "qwen2", "mistral"
--   train_on_inputs  false = loss on the assistant replies only
--   seq_len        tokens per example (longer ones are truncated on the left)
--   batch          rows per micro-batch; grad_accum micro-batches per optimizer step
--   epochs         passes over the data ...
--   max_steps      ... or an optimizer-step budget (0 = use epochs; > 0 wins)
--   lr             peak learning rate (LoRA tolerates a high one: 2e-4)
--   warmup_ratio   linear warmup as a fraction of the steps, then cosine decay ...
--   min_lr_ratio   ... down to lr * min_lr_ratio
--   weight_decay   AdamW weight decay; max_grad_norm: gradient clipping (0 = none)
--   lora           r (rank), alpha (scale alpha / r), dropout, target_modules
--                  ("all-linear" or a comma list: "q_proj,k_proj,v_proj,o_proj,...")
--   eval_every     evaluate on the held-out set every N steps (and at the end)
--   patience       early stopping: evaluations without a better eval_loss before
--                  training stops (0 = never stop early); the best checkpoint is
--                  restored at the end
--   save_every     checkpoint every N steps (and at the end); keep_last: how many
--                  recent checkpoints are kept besides the best
--   out_dir        run directory (under the current directory): metrics.jsonl,
--                  loss.svg and checkpoints/
--   seed           data order and LoRA initialisation
local mt = require("moontune")

local cfg = mt.config({
  model = "",
  data = "data/quickstart/train.jsonl",
  heldout = "data/quickstart/heldout.jsonl",
  heldout_fraction = 0.1,
  template = "auto",
  train_on_inputs = false,
  seq_len = 512,
  batch = 4,
  grad_accum = 4,
  epochs = 3,
  max_steps = 0,
  lr = 2e-4,
  warmup_ratio = 0.03,
  min_lr_ratio = 0.0,
  weight_decay = 0.0,
  max_grad_norm = 1.0,
  lora = { r = 16, alpha = 32, dropout = 0.0, target_modules = "all-linear" },
  eval_every = 50,
  patience = 3,
  save_every = 100,
  keep_last = 2,
  out_dir = "runs/lora_sft",
  seed = 42,
})
assert(cfg.model ~= "", "lora_sft: set the model: --set model=path/to/model")
local out = mt.output_dir(cfg.out_dir)

-- data: the chat records rendered with the template, masked to the replies
local tok = mt.tokenizer(cfg.model)
local data_opts = { template = cfg.template, seq_len = cfg.seq_len,
                    train_on_inputs = cfg.train_on_inputs }
local train, heldout
if cfg.heldout ~= "" then
  train = mt.examples(cfg.data, tok, data_opts)
  heldout = mt.examples(cfg.heldout, tok, data_opts)
else
  train, heldout = mt.examples(cfg.data, tok, data_opts):split(cfg.heldout_fraction, cfg.seed)
end
print(string.format("lora_sft: %d training examples, %d held out",
                    train:count(), heldout:count()))

-- the model with a LoRA adapter on its projections
local model = mt.model(cfg.model)
model:attach(mt.plugin("adapter", "lora", {
  r = cfg.lora.r, alpha = cfg.lora.alpha, dropout = cfg.lora.dropout,
  target_modules = cfg.lora.target_modules, seed = cfg.seed,
}))
model:plan(cfg.batch, cfg.seq_len)

local result = mt.trainer.run({
  model = model,
  loss = mt.plugin("loss", "cross_entropy", {}),
  optimizer = mt.plugin("optimizer", "adamw", { weight_decay = cfg.weight_decay }),
  scheduler = mt.plugin("scheduler", "cosine", { warmup_ratio = cfg.warmup_ratio,
                                                 min_lr_ratio = cfg.min_lr_ratio }),
  batcher = mt.batcher(train, { batch = cfg.batch, seq_len = cfg.seq_len, seed = cfg.seed }),
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

print(string.format("lora_sft: %d steps%s, best eval_loss %s, run in %s", result.steps,
                    result.stopped_early and " (stopped early)" or "",
                    result.best and string.format("%.4f at step %d", result.best.value,
                                                  result.best.step) or "n/a",
                    result.out_dir or out))
