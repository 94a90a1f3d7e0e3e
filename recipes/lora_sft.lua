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
--                  (under mpirun -np N, batch is the global batch: N ranks take batch/N
--                  rows each; docs/distributed.md)
--   shard_optimizer  ZeRO-1 under mpirun: each rank keeps 1/N of the optimizer state
--   epochs         passes over the data ...
--   max_steps      ... or an optimizer-step budget (0 = use epochs; > 0 wins)
--   lr             peak learning rate (LoRA tolerates a high one: 2e-4)
--   optimizer, scheduler, loss   the plugins by name with their options, validated by
--                  the plugin (`moontune plugins --describe NAME` lists them):
--                  --set optimizer=lion, --set scheduler.warmup_ratio=0.1; the default
--                  is AdamW, a linear warmup then cosine decay to lr * min_lr_ratio,
--                  and cross-entropy on the replies
--   max_grad_norm  gradient clipping (0 = none)
--   lora           r (rank), alpha (scale alpha / r), dropout, target_modules
--                  ("all-linear" or a comma list: "q_proj,k_proj,v_proj,o_proj,...")
--   eval_every     evaluate on the held-out set every N steps (and at the end)
--   patience       early stopping: evaluations without a better eval_loss before
--                  training stops (0 = never stop early); the best checkpoint is
--                  restored at the end
--   early_stopping_metric  "eval_loss" (held-out loss, lower is better) or
--                  "task_accuracy" (the held-out generation metric at each evaluation)
--   general        general-text JSONL ("text" records) whose perplexity is measured
--                  before, at each evaluation and after ("" = none): forgetting shows
--                  as a rise; max_general_regression: the rise accepted (0.10 = 10%);
--                  on_general_regression: "warn", "stop" (and restore the best
--                  checkpoint within the bound) or "restore" (train on; when the
--                  run ends beyond the bound, restore that checkpoint)
--   task_eval      generate an answer for each held-out chat request before and after
--                  training and report the exact-match accuracy; task_samples: how
--                  many (0 = all); max_new_tokens, gen_batch: answer length, batch;
--                  gen_int8 = false: generate in fp32 (default: int8 weight products
--                  where the CPU has them)
--   recompute      what backward recomputes instead of keeping: "norms" (the norms'
--                  outputs and SwiGLU's product: a third less activation memory, about
--                  1% slower), "layers" (gradient checkpointing: each layer's forward
--                  again in backward; a fifth slower, a sixth of the activations) or
--                  "off"; the gradients are the same bits (docs/speed.md)
--   train_int8     the frozen base's products in int8 in training steps where the CPU
--                  has AVX512-VNNI (or AVX2, with a Q4 base): "forward" (the forward products), "all" (the input
--                  gradients too: faster, and on the quickstart as exact on average
--                  but spread wider from run to run) or "off" (fp32); the adapter stays fp32 (docs/speed.md)
--   eval_int8      where train_int8 is on, evaluations (held-out loss before, during and
--                  after training, general text) through the same int8 forward: the
--                  held-out loss is the function training optimises (false: fp32)
--   allow_leakage  accept held-out examples that also occur in the training data (the
--                  data checks refuse them otherwise)
--   export         what the trained model becomes under out_dir/export/, a comma list:
--                  "peft" (adapter directory for peft/transformers; LoRA and QLoRA),
--                  "merged" (transformers model directory, adapter folded in), "gguf"
--                  (llama.cpp, export_dtype "f16" or "f32"); "" = nothing
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
  shard_optimizer = false,
  epochs = 3,
  max_steps = 0,
  lr = 2e-4,
  optimizer = { name = "adamw", weight_decay = 0.0 },
  scheduler = { name = "cosine", warmup_ratio = 0.03, min_lr_ratio = 0.0 },
  loss = { name = "cross_entropy" },
  max_grad_norm = 1.0,
  lora = { r = 16, alpha = 32, dropout = 0.0, target_modules = "all-linear" },
  eval_every = 50,
  patience = 3,
  early_stopping_metric = "eval_loss",
  general = "data/general/general.jsonl",
  max_general_regression = 0.10,
  on_general_regression = "warn",
  task_eval = true,
  task_samples = 0,
  max_new_tokens = 128,
  gen_batch = 16,
  gen_int8 = true,
  train_int8 = "forward",
  eval_int8 = true,
  allow_leakage = false,
  export = "peft,merged",
  export_dtype = "f16",
  save_every = 100,
  keep_last = 2,
  recompute = "norms",
  out_dir = "runs/lora_sft",
  seed = 42,
})
local sft = require("moontune.sft")

-- data: the chat records rendered with the template, masked to the replies
local train, heldout, _, data = sft.examples(mt, cfg, "lora_sft")

-- the model with a LoRA adapter on its projections
local model = mt.model(cfg.model)
model:attach(mt.plugin("adapter", "lora", {
  r = cfg.lora.r, alpha = cfg.lora.alpha, dropout = cfg.lora.dropout,
  target_modules = cfg.lora.target_modules, seed = cfg.seed,
}))

-- train: AdamW, cosine schedule, evaluation, early stopping, checkpoints (moontune.sft)
sft.train(mt, cfg, model, train, heldout, "lora_sft", data)
