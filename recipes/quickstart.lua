-- quickstart.lua — the whole workflow on a real model, in minutes on a CPU: teach
-- SmolLM2-135M-Instruct to turn a free-text meeting request into one fixed JSON schema
-- (data/quickstart, made by data/quickstart/generate.py), show on held-out requests
-- that it now does, check that it has not forgotten general text, and export the result.
--
--   scripts/main-job                     # builds, fetches the model, runs this recipe
--   moontune run recipes/quickstart.lua --set model=path/to/model.gguf
--
-- Steps:
--   1. before training, on the base model (the adapter is attached after): held-out
--      loss, held-out task accuracy (exact match of the greedy answer with the
--      reference JSON), perplexity on a general text set (data/general, written for
--      this check), and a few sample answers
--   2. LoRA fine-tuning with AdamW and a cosine schedule, evaluating the held-out
--      loss every eval_every steps; early stopping on it (patience), the best
--      checkpoint restored at the end
--   3. after training: the same numbers side by side with the ones before, a warning
--      when the general perplexity worsened by more than max_general_regression
--   4. exports under out_dir: adapter/ (PEFT), merged/ (transformers), model.gguf
--      (F16, tokenizer and chat template included) — and a check that moontune loads
--      the GGUF back and answers the first held-out request as the trained model does
--   The numbers also land in out_dir/summary.json.
--
-- Settings (override with --set key=value):
--   model, data, heldout, general   the model (.gguf or Hugging Face directory) and
--                  the training, held-out and general-text JSONL files
--   max_general_regression   warn when general perplexity rises by more than this
--                  fraction (0.10 = 10%)
--   seq_len, batch, grad_accum, epochs, lr, warmup_ratio, lora.*   as in lora_sft.lua
--   eval_every, patience   held-out loss every N steps; early stopping after
--                  `patience` evaluations without improvement (0 = never)
--   gen_batch, max_new_tokens   sequences generated together, answer length cap
--   stop_on_mismatch   a held-out answer ends as soon as it can no longer equal its
--                  reference exactly: the same accuracy without generating the rest of
--                  wrong answers (the printed samples run to their end; false: every
--                  answer to its end; docs/speed.md)
--   gen_int8       generate with int8 weight products where the CPU has them (false:
--                  fp32 throughout; docs/speed.md)
--   recompute      what backward recomputes instead of keeping: "norms" (the norms'
--                  outputs and SwiGLU's product: a third less activation memory, about
--                  1% slower), "layers" (gradient checkpointing: each layer's forward
--                  again in backward; a fifth slower, a sixth of the activations) or
--                  "off"; the gradients are the same bits (docs/speed.md)
--   train_int8     the frozen base's products in int8 in training steps where the CPU
--                  has AVX512-VNNI (or AVX2, with a Q4 base): "forward" (the forward products), "all" (the input
--                  gradients too: faster, and on the quickstart as exact on average
--                  but spread wider from run to run) or "off" (fp32); LoRA stays fp32 (docs/speed.md)
--   eval_int8      evaluate (held-out loss, general perplexity, before, during and after
--                  training) through the same int8 forward as the training steps where
--                  train_int8 is on: the held-out loss is the function training
--                  optimises, as a Trainer evaluates in its training precision; about
--                  1.4x faster, the base's losses 0.4-0.8% higher (false: fp32; docs/speed.md)
--   samples        sample answers printed before and after
--   export         write the PEFT adapter, merged model and GGUF (false: skip)
local mt = require("moontune")
local tasks = require("moontune.tasks")

local cfg = mt.config({
  model = "",
  data = "data/quickstart/train.jsonl",
  heldout = "data/quickstart/heldout.jsonl",
  general = "data/general/general.jsonl",
  max_general_regression = 0.10,
  seq_len = 256,
  batch = 4,
  grad_accum = 1,
  epochs = 1,
  lr = 1e-3,
  warmup_ratio = 0.05,
  lora = { r = 16, alpha = 32, dropout = 0.0, target_modules = "all-linear" },
  eval_every = 25,
  patience = 2,
  gen_batch = 32,
  max_new_tokens = 64,
  stop_on_mismatch = true,
  gen_int8 = true,
  train_int8 = "forward",
  eval_int8 = true,
  samples = 3,
  export = true,
  recompute = "norms",
  out_dir = "runs/quickstart",
  seed = 42,
})
assert(cfg.model ~= "", "quickstart: set the model: --set model=path/to/model (scripts/fetch-model prints the default)")

local started = mt.now()
local out = mt.output_dir(cfg.out_dir)
local tok = mt.tokenizer(cfg.model)
local opts = { template = "auto", seq_len = cfg.seq_len, train_on_inputs = false }
local train = mt.examples(cfg.data, tok, opts)
local heldout = mt.examples(cfg.heldout, tok, opts)
local general = mt.examples(cfg.general, tok, { format = "text", seq_len = cfg.seq_len })
local items = tasks.items(mt.records(cfg.heldout))
print(string.format("quickstart: %d training examples, %d held out, %d general-text paragraphs",
                    train:count(), heldout:count(), general:count()))

local model = mt.model(cfg.model)
-- evaluations in the precision of the training steps (eval_int8)
local eval_int8 = cfg.eval_int8 and cfg.train_int8 ~= "off"
local lora = mt.plugin("adapter", "lora", {
  r = cfg.lora.r, alpha = cfg.lora.alpha, dropout = cfg.lora.dropout,
  target_modules = cfg.lora.target_modules, seed = cfg.seed,
})
model:plan(cfg.batch, cfg.seq_len)
-- the frozen base's int8 copies, made once for the "before" evaluations and kept for
-- the training steps (the trainer frees them when it ends)
if eval_int8 then model:int8_training(cfg.train_int8) end
-- the adapter is attached after the "before" measurements: a new LoRA adds exactly
-- nothing (B = 0), so they are the base model's numbers either way, and without it the
-- base runs alone, without the adapter's products (the plan does not depend on it)

-- held-out loss, task accuracy and general perplexity of the model as it is now;
-- heldout_loss, when given, is the trainer's evaluation of this very model (no rerun)
local function measure(label, heldout_loss)
  local t = mt.now()
  heldout_loss = heldout_loss or mt.evaluate(model, heldout, { int8 = eval_int8 }).loss
  local gen = mt.evaluate(model, general, { int8 = eval_int8 })
  -- the samples and the first answer (the exported GGUF's check) run to their end
  local task = tasks.evaluate(mt, model, tok, items, { max_new_tokens = cfg.max_new_tokens,
                                                      batch = cfg.gen_batch, int8 = cfg.gen_int8,
                                                      stop_on_mismatch = cfg.stop_on_mismatch,
                                                      full_answers = math.max(cfg.samples, 1) })
  print(string.format("%s: held-out loss %.4f, task accuracy %.1f%% (%d/%d exact), " ..
                      "general perplexity %.3f  [%.0f s; losses %s; generation %.0f tokens/s, %s%s]",
                      label, heldout_loss, 100 * task.accuracy, task.correct, task.n,
                      gen.perplexity, mt.now() - t, gen.int8 > 0 and "int8 forward" or "fp32",
                      task.tokens_per_second, task.int8 > 0 and "int8 weights" or "fp32",
                      task.cut > 0 and string.format(", %d wrong answers ended at their first wrong character", task.cut) or ""))
  for i = 1, math.min(cfg.samples, #items) do
    print(string.format("  [%s] %s\n    -> %s", task.passed[i] and "ok" or "wrong",
                        items[i].prompt, task.outputs[i]))
  end
  return { heldout_loss = heldout_loss, accuracy = task.accuracy, correct = task.correct,
           general_perplexity = gen.perplexity, outputs = task.outputs, int8 = gen.int8 > 0 }
end

-- the recipe's text and plugins go into every checkpoint, to say what made it
local function recipe_text()
  local f = arg and arg[0] and io.open(arg[0], "rb")
  if not f then return nil end
  local text = f:read("a")
  f:close()
  return text
end
local loss = mt.plugin("loss", "cross_entropy", {})
local optimizer = mt.plugin("optimizer", "adamw", { weight_decay = 0.0 })
local scheduler = mt.plugin("scheduler", "cosine", { warmup_ratio = cfg.warmup_ratio })
local trainer_cfg = {
  model = model,
  loss = loss,
  optimizer = optimizer,
  scheduler = scheduler,
  recipe = recipe_text(),
  plugins = { lora, loss, optimizer, scheduler },
  batcher = mt.batcher(train, { batch = cfg.batch, seq_len = cfg.seq_len, seed = cfg.seed }),
  train_examples = train,
  eval_examples = heldout,
  eval_every = cfg.eval_every,
  early_stopping = cfg.patience > 0 and
    { metric = "eval_loss", mode = "min", patience = cfg.patience } or nil,
  lr = cfg.lr,
  epochs = cfg.epochs,
  grad_accum = cfg.grad_accum,
  int8 = cfg.train_int8,
  eval_int8 = eval_int8,
  recompute = cfg.recompute,
  save_every = 0,
  out_dir = out,
}
if mt.validating() then -- `moontune validate`: the trainer reports; nothing is generated or trained
  model:attach(lora)
  mt.trainer.run(trainer_cfg, mt)
  return
end

local before = measure("before")
model:attach(lora)

local train_started = mt.now()
local result = mt.trainer.run(trainer_cfg, mt)
local train_seconds = mt.now() - train_started

-- the trainer evaluated the held-out loss of the model it leaves (the best checkpoint
-- when early stopping restored it, else the final step)
local after = measure("after", result.metrics and result.metrics.eval_loss)

local change = tasks.relative_change(before.general_perplexity, after.general_perplexity)
print("")
print(string.format("%-28s %12s %12s%s", "", "before", "after",
                    after.int8 and "  (losses through training's int8 forward)" or ""))
print(string.format("%-28s %12.4f %12.4f", "held-out loss", before.heldout_loss, after.heldout_loss))
print(string.format("%-28s %11.1f%% %11.1f%%", "held-out task accuracy", 100 * before.accuracy,
                    100 * after.accuracy))
print(string.format("%-28s %12.3f %12.3f  (%+.1f%%)", "general-text perplexity",
                    before.general_perplexity, after.general_perplexity, 100 * change))
if change > cfg.max_general_regression then
  print(string.format("WARNING: general-text perplexity worsened by %.1f%%, more than the %.0f%% " ..
                      "this recipe allows (max_general_regression): the model may be forgetting",
                      100 * change, 100 * cfg.max_general_regression))
end
print(string.format("training: %d steps%s, %.0f s (evaluations included); %d tokens in %.0f s " ..
                    "of training steps: %.0f tokens/s", result.steps,
                    result.stopped_early and " (stopped early)" or "", train_seconds, result.tokens,
                    result.step_seconds, result.tokens_per_second))

local exports = {}
if cfg.export then
  local t = mt.now()
  exports.adapter = model:export_peft(out .. "/adapter")
  exports.merged = model:export_merged(out .. "/merged", { tokenizer = tok })
  exports.gguf = model:export_gguf(out .. "/model.gguf", { tokenizer = tok, dtype = "f16" })
  print(string.format("exported in %.0f s: %s (PEFT adapter), %s (transformers), %s (GGUF)",
                      mt.now() - t, exports.adapter, exports.merged, exports.gguf))
  -- the GGUF as another tool would see it: loaded afresh, asked the first request
  local reloaded <close> = mt.model(exports.gguf)
  local rtok <close> = mt.tokenizer(exports.gguf)
  local answer = mt.generate(reloaded, rtok, items[1].prompt,
                             { system = items[1].system, max_new_tokens = cfg.max_new_tokens })
  print(string.format("model.gguf reloaded: %s\n  -> %s", answer == after.outputs[1] and
                      "answers the first held-out request as the trained model does" or
                      "answers the first held-out request differently (F16 rounding)", answer))
  print(string.format("try it:\n  moontune generate --model %s --adapter %s --system %q --prompt %q\n" ..
                      "  moontune generate --model %s --system %q --prompt %q",
                      cfg.model, exports.adapter, items[1].system or "", items[1].prompt,
                      exports.gguf, items[1].system or "", items[1].prompt))
end

local total = mt.now() - started
print(string.format("quickstart: done in %.0f s, peak memory %.0f MiB", total,
                    mt.peak_memory() / 1048576))

if mt.rank() == 0 then -- one summary per job (data parallel: docs/distributed.md)
  local f = assert(io.open(out .. "/summary.json", "w"))
  f:write(string.format('{"before": {"heldout_loss": %.6f, "accuracy": %.4f, "general_perplexity": %.4f}, ' ..
                        '"after": {"heldout_loss": %.6f, "accuracy": %.4f, "general_perplexity": %.4f}, ' ..
                        '"general_change": %.4f, "eval_int8": %s, "steps": %d, "stopped_early": %s, ' ..
                        '"train_seconds": %.1f, "train_tokens": %d, "train_tokens_per_second": %.1f, ' ..
                        '"total_seconds": %.1f, "peak_memory_bytes": %d}\n',
                        before.heldout_loss, before.accuracy, before.general_perplexity,
                        after.heldout_loss, after.accuracy, after.general_perplexity, change,
                        tostring(after.int8), result.steps, tostring(result.stopped_early), train_seconds, result.tokens,
                        result.tokens_per_second, total, mt.peak_memory()))
  f:close()
end
