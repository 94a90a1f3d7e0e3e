-- moontune.trainer — the training workflow: policy in Lua, one C call per step.
--
--     local trainer = require("moontune.trainer")
--     local result = trainer.run(cfg, mt)
--
-- mt is the moontune module (require("moontune")); it is an argument so that tests can
-- pass a fake. The loop calls, per optimizer step, batcher:next() grad_accum times and
-- then mt.train_step once; Lua never runs per token.
--
-- cfg (a plain table; * = required). train_examples (optional) only feeds the
-- statistics `moontune validate` prints.
-- cfg (a plain table; * = required):
--   model*, loss*, optimizer*   the core objects handed to mt.train_step and checkpoints
--   batcher*                    mt.batcher(...): next(), cursor(), set_cursor(),
--                               batches_per_epoch(); or any object with those (the GRPO
--                               rollouts of moontune.grpo), whose next() may add to its
--                               info table `metrics` (name -> number: averaged over the
--                               step's micro-batches, logged with the step's record and
--                               shown with the loss plugin's) and `records` (tables
--                               written to metrics.jsonl as {type = "sample", step, ...});
--                               a batcher with state() / set_state(s) has that state (a
--                               JSON-able value) kept in checkpoints beside its cursor
--   lr*                         the base learning rate
--   out_dir*                    run directory (must exist): metrics.jsonl, loss.svg and
--                               the checkpoints go here
--   epochs = 1                  passes over the data ...
--   max_steps = nil             ... or a step budget; when given it wins over epochs
--   grad_accum = 1              micro-batches per optimizer step
--   max_grad_norm = 1.0         gradient clipping (false = none)
--   int8 = false                "forward": in training steps the frozen weights' forward
--                               products (the base under LoRA) run in 8 bits where the
--                               CPU has AVX512-VNNI (or AVX2, for a Q4 base); "all" (or true): their input
--                               gradients too (model:int8_training, docs/speed.md);
--                               "off" (or false): fp32. The first step's log line
--                               says how many projections did
--   eval_int8 = nil             evaluations (held-out loss, general text) through the
--                               same int8 forward as the training steps (mt.evaluate's
--                               int8): the held-out loss is then the function training
--                               optimises, as with the Trainer, whose evaluation runs
--                               in the training's precision. nil: when int8 is on;
--                               false: fp32 evaluations; true: int8 even when the
--                               steps are fp32. eval_opts.int8, when given, wins
--   recompute = nil             what backward recomputes instead of keeping
--                               (model:recompute): "off", "norms" (the norms' outputs
--                               and SwiGLU's product: a third less activation memory,
--                               no products) or "layers" (gradient checkpointing:
--                               every layer's input only, each layer's forward again
--                               in backward); the gradients are the same bits. nil:
--                               the model's as it is ("norms" from its creation)
--   scheduler = nil             a scheduler Plugin: lr = mt.schedule(scheduler, step - 1, total, lr)
--                               (plugins count steps from 0, as transformers' lr_lambda)
--   schedule = nil              or a Lua function(step, total, base_lr) -> lr, step from 1;
--                               neither: constant lr
--   eval_examples = nil         held-out Examples for mt.evaluate; held-out preference pairs
--                               are evaluated with the training loss (eval_opts.loss
--                               defaults to cfg.loss for them), whose metrics become
--                               eval_<name> (eval_rewards/accuracies, ...)
--   eval_opts = {}              options for mt.evaluate ({batch=, seq_len=, loss=})
--   eval_every = nil            evaluate every N steps (nil or 0: only at the end; always at the end when
--                               eval_examples or metrics are given)
--   general_examples = nil      Examples of general text (data/general for chat models):
--                               their perplexity before training, at each evaluation
--                               (metrics general_perplexity and general_change, the
--                               relative change) and after; guards against forgetting
--   max_general_regression = 0.10   the largest general_change accepted
--   on_general_regression = "warn"  beyond it: "warn"; "stop" training (the best
--                               checkpoint within the bound is restored); or "restore":
--                               train on, but only evaluations within the bound count
--                               as best, and when the run ends beyond the bound the
--                               best is restored
--   metrics = {}                name -> function(state) -> number, run at each evaluation
--                               after mt.evaluate; the value lands in state.metrics[name]
--   early_stopping = nil        { metric = "eval_loss", mode = "min" | "max", patience = 3,
--                                 min_delta = 0, restore_best = true }
--                               An evaluation improves when the metric beats the best by
--                               more than min_delta; after `patience` evaluations in a row
--                               without improvement training stops. Each improvement
--                               saves a checkpoint (the best); with restore_best it is
--                               loaded back at the end.
--   callbacks = nil             { on_train_begin=, on_step_end=, on_evaluate=, on_save=,
--                                 on_train_end= } or a list of such tables (see below)
--   max_bad_steps = 5           non-finite / skipped steps in a row before an error
--   save_every = nil            checkpoint every N steps (nil or 0: only at the end; always at the end)
--   keep_last = 2               checkpoints kept by mt.checkpoint_prune besides the best
--   shard_optimizer = false     ZeRO-1 in a data-parallel job (mpirun -np N): each rank
--                               keeps and updates the optimizer state of its share of the
--                               parameters only (optimizer memory / N); checkpoints hold
--                               the whole state and resume with any number of ranks
--   resume = nil                a checkpoint path, or true = mt.checkpoint_latest(out_dir)
--                               (true with no checkpoint starts fresh). A resume refuses a
--                               checkpoint whose recipe text or settings (the resolved
--                               mt.config table and this cfg's lr, step budget,
--                               accumulation, clipping, intervals, early stopping, batches
--                               per epoch, int8) differ from this run's, listing the
--                               differences
--   allow_changes = nil         resume anyway and log the differences (default: the
--                               command line's --allow-changes)
--   recipe = nil, plugins = nil, rng = nil   stored in every checkpoint as they are (recipe
--                               defaults to the text of the recipe `moontune run` runs)
--   progress = true             a \r progress bar on a terminal; false = plain lines
--   is_tty = nil                override terminal detection (default: mt.isatty(output),
--                               i.e. isatty(3) on the stream the bar would go to, and
--                               $TERM not "dumb"; output to a file, a pipe, nohup or a
--                               batch system gets plain lines, never \r)
--   log_every = 10              plain log line every N steps (not on a terminal); it
--                               shows every metric the loss reports
--   progress_metrics = { "rewards/accuracies", "rewards/margins" }   the loss metrics
--                               the progress bar shows, when the loss reports them
--   output = io.stdout          where progress and log lines go (anything with :write)
--   clock = mt.now or os.clock  function() -> seconds, for tokens/s, ETA and time
--   plot = true                 write <out_dir>/loss.svg at the end
--   tensorboard = true          write TensorBoard events beside metrics.jsonl
--                               (<out_dir>/events.out.tfevents.<time>.<host>,
--                               docs/tensorboard.md): every finite number of every
--                               metrics.jsonl record but its step becomes a scalar tagged
--                               with its key (loss, lr, eval_loss, rewards/accuracies, ...)
--                               at the record's step, float32. Each record reaches the
--                               file at once; a resumed run starts a new file that tells
--                               TensorBoard to drop the earlier files' steps from the
--                               resumed one on. false = none; nil = when mt offers
--                               mt.tensorboard_open (true insists on it)
--
-- Callbacks: each hook is called as hook(state, control [, extra]); on_save gets the
-- checkpoint path as extra. state (read it, do not replace its fields):
--   step, total_steps, epoch, loss, lr, grad_norm, tokens, step_metrics (the loss
--   plugin's metrics of the last step: rewards/accuracies, ... for dpo), metrics (the latest
--   evaluation: eval_loss, eval_perplexity, eval_tokens_per_second and the cfg.metrics),
--   best = { metric, value, step, path } or nil, bad_steps, stopped_early
-- control:
--   control:stop()        stop after this step (after any requested evaluate/save)
--   control:set_lr(x)     ABSOLUTE learning rate used from the next step on, replacing
--                         the schedule for the rest of the run (saved in checkpoints)
--   control:evaluate()    evaluate after this step
--   control:save()        save a checkpoint after this step
--
-- Result: { steps, best, stopped_early, history = { train = {{step, loss}...},
--           eval = {{step, metrics}...} }, out_dir, seconds, restored_best,
--           tensorboard (the events file this run wrote, or nil),
--           general = { before, after, change } (with general_examples),
--           metrics (the evaluation of the model it leaves: the restored best's, or the
--           last one when made at the final step; nil otherwise),
--           tokens, step_seconds, tokens_per_second }
-- tokens counts what the model ran in training steps (prompt and reply tokens, no
-- padding; the batcher's info.tokens), step_seconds the time inside those steps (not
-- evaluations or checkpoints), and tokens_per_second is their ratio — as in the progress
-- line and metrics.jsonl ("tokens" there is the step's loss tokens, "input_tokens" what
-- it ran).
--
-- A checkpoint keeps the last evaluation's numbers as its metrics and the trainer's own
-- state (early stopping's count and best, a set_lr override) as one JSON object,
-- state.trainer, so that a resumed run goes on exactly where it stopped. Checkpoints of
-- earlier versions kept that state in trainer_* metrics; a resume still reads them.
--
-- Data parallel (docs/distributed.md): under `mpirun -np N` every rank runs this loop on
-- its rows of each global batch (the batcher shards it), and mt.train_step sums the
-- gradients, so every rank holds the same model. Rank 0 alone writes metrics.jsonl,
-- TensorBoard events, the plot and checkpoints (mt.checkpoint_save is collective);
-- evaluations are sharded and summed; what callbacks and early stopping decide is
-- rank 0's, broadcast to the others after each step and evaluation, so every rank
-- stops, evaluates and saves together.
--
-- JSON goes through mt.json_encode (the core's encoder, jansson), the one encoder of
-- metrics.jsonl and checkpoints.

local M = {}

local function is_finite(x)
  return type(x) == "number" and x == x and x ~= math.huge and x ~= -math.huge
end

-- ---------------------------------------------------------------------------
-- helpers

local function fail(fmt, ...)
  error("trainer: " .. string.format(fmt, ...), 0)
end

local function hooks_of(callbacks)
  if callbacks == nil then return {} end
  if type(callbacks) ~= "table" then fail("cfg.callbacks must be a table, got %s", type(callbacks)) end
  local list = (#callbacks > 0) and callbacks or { callbacks }
  for i, cb in ipairs(list) do
    if type(cb) ~= "table" then fail("cfg.callbacks[%d] must be a table of hooks", i) end
  end
  return list
end

local function format_time(s)
  s = math.max(0, math.floor(s + 0.5))
  return string.format("%d:%02d:%02d", s // 3600, (s % 3600) // 60, s % 60)
end

local function fmt_num(x, f)
  if not is_finite(x) then return tostring(x) end
  return string.format(f, x)
end

-- Is `v` better than `best` by more than min_delta under mode?
local function improves(v, best, mode, min_delta)
  if best == nil then return true end
  if mode == "max" then return v > best + min_delta end
  return v < best - min_delta
end

-- Flattens nested tables into "a.b.c" -> scalar (JSON-like values only).
local function flatten(t, prefix, out)
  out = out or {}
  if type(t) ~= "table" then
    out[prefix] = t
    return out
  end
  for k, v in pairs(t) do
    local key = prefix and (prefix .. "." .. tostring(k)) or tostring(k)
    if type(v) == "table" then flatten(v, key, out)
    elseif type(v) ~= "function" and type(v) ~= "userdata" then out[key] = v end
  end
  return out
end

local function show(v)
  if v == nil then return "(none)" end
  if type(v) == "string" then return string.format("%q", v) end
  return tostring(v)
end

-- The differences between the settings a checkpoint recorded and this run's, as lines
-- "key: old -> new", sorted.
local function setting_changes(old, new)
  local a, b = flatten(old or {}), flatten(new or {})
  local keys, seen = {}, {}
  for k in pairs(a) do keys[#keys + 1] = k; seen[k] = true end
  for k in pairs(b) do if not seen[k] then keys[#keys + 1] = k end end
  table.sort(keys)
  local out = {}
  for _, k in ipairs(keys) do
    local x, y = a[k], b[k]
    local same = x == y or (type(x) == "number" and type(y) == "number" and x ~= x and y ~= y)
    if not same then out[#out + 1] = string.format("%s: %s -> %s", k, show(x), show(y)) end
  end
  return out
end

-- On resume from `last_step`: keeps the records of metrics.jsonl up to that step (the
-- steps after the checkpoint will run again) and drops a line torn by a kill, rewriting
-- the file atomically. Returns the kept records (nil when mt cannot decode JSON).
local function rewind_metrics(mt, mpath, last_step)
  if not (mt.json_decode and mt.write_file) then return nil end
  local f = io.open(mpath, "r")
  if not f then return {} end
  local text = f:read("a")
  f:close()
  local kept, records, torn, lineno = {}, {}, 0, 0
  for line in text:gmatch("[^\n]+") do
    lineno = lineno + 1
    local ok, rec = pcall(mt.json_decode, line, mpath .. ":" .. lineno)
    if not ok or type(rec) ~= "table" then
      torn = torn + 1
    elseif not (math.type(rec.step) == "integer" and rec.step > last_step) then
      kept[#kept + 1] = line
      records[#records + 1] = rec
    end
  end
  mt.write_file(mpath, #kept > 0 and table.concat(kept, "\n") .. "\n" or "")
  return records, torn
end

-- ---------------------------------------------------------------------------
-- the run, in named steps. `R` holds what the checks resolved from cfg (read only);
-- `T` is the run in progress: state, history, early stopping, outputs, hooks.

-- Checks cfg and resolves its defaults; fails with a message naming the key.
local function resolve(cfg, mt)
  if type(cfg) ~= "table" then fail("run(cfg, mt): cfg must be a table") end
  if type(mt) ~= "table" then fail("run(cfg, mt): mt must be the moontune module") end
  for _, key in ipairs({ "model", "loss", "optimizer", "batcher", "lr", "out_dir" }) do
    if cfg[key] == nil then fail("cfg.%s is required", key) end
  end
  if type(mt.json_encode) ~= "function" then fail("mt.json_encode is required (the moontune module's JSON encoder)") end
  if type(cfg.lr) ~= "number" or cfg.lr <= 0 then fail("cfg.lr must be a positive number, got %s", tostring(cfg.lr)) end
  if cfg.schedule ~= nil and type(cfg.schedule) ~= "function" then
    fail("cfg.schedule must be a function(step, total, base_lr), got %s", type(cfg.schedule))
  end
  local int8_modes = { [false] = false, off = false, forward = "forward", all = "all", [true] = "all" }
  if cfg.int8 ~= nil and int8_modes[cfg.int8] == nil then
    fail("cfg.int8 must be \"off\", \"forward\" or \"all\" (false, true: off, all), got %s", tostring(cfg.int8))
  end
  if cfg.recompute ~= nil and cfg.recompute ~= "off" and cfg.recompute ~= "norms" and cfg.recompute ~= "layers" then
    fail("cfg.recompute must be \"off\", \"norms\" or \"layers\", got %s", tostring(cfg.recompute))
  end
  if cfg.tensorboard ~= nil and type(cfg.tensorboard) ~= "boolean" then
    fail("cfg.tensorboard must be true or false, got %s", type(cfg.tensorboard))
  end
  if cfg.tensorboard == true and type(mt.tensorboard_open) ~= "function" then
    fail("cfg.tensorboard is true but mt has no tensorboard_open (pass the moontune module)")
  end
  local R = { batcher = cfg.batcher, out_dir = cfg.out_dir, grad_accum = cfg.grad_accum or 1,
              max_grad_norm = cfg.max_grad_norm, max_bad = cfg.max_bad_steps or 5,
              keep_last = cfg.keep_last or 2,
              -- wall-clock seconds from the core when it offers them (os.clock is CPU time,
              -- which counts every thread and so overstates a multi-threaded step)
              clock = cfg.clock or mt.now or os.clock, output = cfg.output or io.stdout,
              metric_fns = cfg.metrics or {}, hooks = hooks_of(cfg.callbacks),
              progress_metrics = cfg.progress_metrics or { "rewards/accuracies", "rewards/margins" } }
  if R.max_grad_norm == nil then R.max_grad_norm = 1.0 end
  R.int8 = cfg.int8 ~= nil and int8_modes[cfg.int8] or false
  if cfg.eval_int8 ~= nil and type(cfg.eval_int8) ~= "boolean" then
    fail("cfg.eval_int8 must be true or false, got %s", type(cfg.eval_int8))
  end
  R.eval_int8 = cfg.eval_int8
  if cfg.eval_opts and cfg.eval_opts.int8 ~= nil then R.eval_int8 = cfg.eval_opts.int8 == true end
  if R.eval_int8 == nil then R.eval_int8 = R.int8 ~= false end
  R.rank = type(mt.rank) == "function" and mt.rank() or 0
  R.world = type(mt.world_size) == "function" and mt.world_size() or 1
  R.main = R.rank == 0
  if cfg.shard_optimizer ~= nil and type(cfg.shard_optimizer) ~= "boolean" then
    fail("cfg.shard_optimizer must be true or false, got %s", type(cfg.shard_optimizer))
  end
  R.shard_optimizer = cfg.shard_optimizer == true and R.world > 1
  if math.type(R.grad_accum) ~= "integer" or R.grad_accum < 1 then
    fail("cfg.grad_accum must be an integer >= 1, got %s", tostring(R.grad_accum))
  end
  -- intervals: a positive integer, or nil / 0 for "only at the end"
  local function interval(key)
    local v = cfg[key]
    if v == nil or v == 0 then return nil end
    if math.type(v) ~= "integer" or v < 0 then
      fail("cfg.%s must be an integer >= 0 (0 or nil: only at the end), got %s", key, tostring(v))
    end
    return v
  end
  R.eval_every, R.save_every = interval("eval_every"), interval("save_every")

  local es = cfg.early_stopping
  if es ~= nil then
    if type(es) ~= "table" then fail("cfg.early_stopping must be a table") end
    es = { metric = es.metric or "eval_loss", mode = es.mode or "min", patience = es.patience or 3,
           min_delta = es.min_delta or 0, restore_best = es.restore_best ~= false }
    if es.mode ~= "min" and es.mode ~= "max" then
      fail("cfg.early_stopping.mode must be \"min\" or \"max\", got %s", tostring(es.mode))
    end
  end
  R.es = es
  R.best_metric = es and es.metric or "eval_loss"
  R.best_mode = es and es.mode or "min"
  R.best_delta = es and es.min_delta or 0
  if cfg.general_examples ~= nil then
    local action = cfg.on_general_regression or "warn"
    if action ~= "warn" and action ~= "stop" and action ~= "restore" then
      fail("cfg.on_general_regression must be \"warn\", \"stop\" or \"restore\", got %s", tostring(action))
    end
    local bound = cfg.max_general_regression or 0.10
    if not is_finite(bound) or bound < 0 then
      fail("cfg.max_general_regression must be a number >= 0, got %s", tostring(bound))
    end
    R.general = { examples = cfg.general_examples, bound = bound, action = action,
                  guard = action ~= "warn" }
  end
  R.has_eval = cfg.eval_examples ~= nil or next(R.metric_fns) ~= nil or R.general ~= nil
  if es and not R.has_eval then fail("cfg.early_stopping needs cfg.eval_examples or cfg.metrics") end

  -- the step budget
  R.bpe = R.batcher:batches_per_epoch()
  local steps_per_epoch = math.max(1, R.bpe // R.grad_accum)
  R.total = cfg.max_steps or (cfg.epochs or 1) * steps_per_epoch
  if math.type(R.total) ~= "integer" or R.total < 1 then
    fail("the step budget must be an integer >= 1, got %s", tostring(R.total))
  end
  return R
end

-- `moontune validate`: everything has been checked; report and stop short of training.
local function validate_report(cfg, R)
  local output = R.output
  local mib = function(b) return (b or 0) / 1048576 end
  local info = cfg.model:info()
  output:write(string.format("validate: %s model, %d parameters, %d layers, vocabulary %d\n",
                             info.model_type, info.params, info.layers, info.vocab))
  for _, kind in ipairs({ "loss", "optimizer", "scheduler" }) do
    local p = cfg[kind]
    if p and p.describe then
      local d = p:describe()
      output:write(string.format("validate: %s %s %s (%s)\n", d.kind, d.name, d.version, d.file))
    end
  end
  output:write(string.format("validate: %d optimizer steps (%d batches per epoch, accumulation %d)\n",
                             R.total, R.bpe, R.grad_accum))
  for name, ex in pairs({ training = cfg.train_examples, ["held-out"] = cfg.eval_examples }) do
    if ex and ex.stats then
      local st = ex:stats()
      output:write(string.format("validate: %s data: %d examples, %d tokens (mean %.1f, max %d), " ..
                                 "%d trained (%.1f%%), %d truncated, %d dropped\n", name,
                                 st.examples, st.tokens, st.mean_len, st.max_len, st.trained_tokens,
                                 100 * st.trained_fraction, st.truncated_prompt + st.truncated_response,
                                 st.dropped_too_long + st.dropped_no_target))
    end
  end
  -- AdamW keeps two moments per trained value
  local total_bytes = info.param_bytes + 3 * info.trainable_bytes + info.activation_bytes
  output:write(string.format("validate: memory estimate %.0f MiB (parameters %.0f, trainable and " ..
                             "optimizer state %.0f, activations %.0f)\n", mib(total_bytes),
                             mib(info.param_bytes), mib(3 * info.trainable_bytes),
                             mib(info.activation_bytes)))
  output:write("validate: ok\n")
  return { validated = true, steps = 0, total_steps = R.total }
end

-- What this run is: the recipe's text and the settings a resume must find unchanged.
local function run_identity(cfg, mt, R)
  local info = mt.run_info and mt.run_info() or {}
  local allow_changes = cfg.allow_changes
  if allow_changes == nil then allow_changes = info.allow_changes end
  -- the config's own resume switch is the one setting a resume changes by design, and
  -- sharding the optimizer state over the ranks changes no result
  local config = info.config
  if type(config) == "table" and (config.resume ~= nil or config.shard_optimizer ~= nil) then
    local c = {}
    for k, v in pairs(config) do if k ~= "resume" and k ~= "shard_optimizer" then c[k] = v end end
    config = c
  end
  local es = R.es
  local settings = {
    config = config,
    trainer = { lr = cfg.lr, total_steps = R.total, grad_accum = R.grad_accum,
                max_grad_norm = R.max_grad_norm or false, epochs = cfg.epochs or 1,
                max_steps = cfg.max_steps or false, batches_per_epoch = R.bpe,
                eval_every = R.eval_every or 0,
                -- int8 training changes the numbers; absent when off, as in checkpoints
                -- written before it existed
                int8 = R.int8 or nil,
                -- so do int8 evaluations (the early-stopping metric); absent when fp32
                eval_int8 = R.eval_int8 or nil,
                early_stopping = es and { metric = es.metric, mode = es.mode, patience = es.patience,
                                          min_delta = es.min_delta, restore_best = es.restore_best } or false },
  }
  return { recipe_text = cfg.recipe or info.recipe_text, allow_changes = allow_changes, settings = settings }
end

-- The trainer's own state as a checkpoint keeps it (state.trainer), and back.
local function trainer_state(T, R)
  local best = T.state.best
  return { bad_evals = T.bad_evals, lr_override = T.lr_override, general_before = T.general_before,
           best = best and { metric = best.metric, value = best.value, step = best.step,
                             saved = best.path ~= nil } or nil,
           -- a batcher's own state beyond its cursor (GRPO's rollout in use), as JSON
           batcher = R.batcher.state and R.batcher:state() or nil }
end

-- From a checkpoint's state.trainer, or from the trainer_* metrics of the checkpoints
-- written before it existed.
local function restore_trainer_state(st)
  if type(st.trainer) == "table" then return st.trainer end
  local m = st.metrics or {}
  return { bad_evals = m.trainer_bad_evals, lr_override = m.trainer_lr_override,
           best = m.trainer_best_value and { value = m.trainer_best_value,
                                             step = math.tointeger(m.trainer_best_step),
                                             saved = m.trainer_best_saved == 1 } or nil }
end

-- Loads the checkpoint cfg.resume names (true: the latest) and refuses one made with
-- other settings unless changes are allowed. Sets T.start_step, T.resumed_from, T.changes.
local function resume(cfg, mt, R, T)
  T.start_step = 1
  if not cfg.resume then return end
  local path = cfg.resume
  if path == true then path = mt.checkpoint_latest(R.out_dir) end
  if not path then return end
  local st = mt.checkpoint_load(path, cfg.model, cfg.optimizer, cfg.loss)
  if type(st) ~= "table" or math.type(st.step) ~= "integer" then fail("checkpoint %s has no step", tostring(path)) end
  local changes = st.run and setting_changes(st.run, T.identity.settings) or {}
  local recipe_text = T.identity.recipe_text
  if recipe_text and st.recipe and st.recipe ~= "" and st.recipe ~= recipe_text then
    table.insert(changes, 1, string.format("recipe text: sha256 %s -> %s (the checkpoint holds the old one in recipe.lua)",
                                           st.recipe_sha256 and st.recipe_sha256:sub(1, 12) or "?",
                                           mt.sha256 and mt.sha256(recipe_text):sub(1, 12) or "?"))
  end
  if #changes > 0 and not T.identity.allow_changes then
    -- the weights are restored already but nothing was written: refusing is safe
    fail("resume: %s was made with other settings than this run:\n  %s\n" ..
         "resuming would silently change the result; undo the changes, or pass --allow-changes " ..
         "(cfg.allow_changes) to resume with them", tostring(path), table.concat(changes, "\n  "))
  end
  local saved_state = restore_trainer_state(st)
  if st.cursor then R.batcher:set_cursor(st.cursor) end
  if R.batcher.set_state then R.batcher:set_state(saved_state.batcher) end
  T.start_step = st.step + 1
  local state = T.state
  state.step, state.epoch = st.step, st.epoch or 1
  for k, v in pairs(st.metrics or {}) do
    if not k:match("^trainer_") then state.metrics[k] = v end
  end
  T.lr_override = saved_state.lr_override
  T.bad_evals = saved_state.bad_evals or 0
  T.general_before = saved_state.general_before
  local best = saved_state.best
  if best and best.value ~= nil then
    state.best = { metric = R.best_metric, value = best.value, step = best.step }
    -- checkpoints are <run_dir>/checkpoints/step-%08d (core/store/checkpoint.c): the best
    -- one is the resumed one's sibling
    local parent = tostring(path):match("^(.-)step%-%d+/?$")
    if R.es and best.step and best.saved and parent then
      state.best.path = parent .. string.format("step-%08d", best.step)
    end
  end
  T.saved[st.step] = path
  T.resumed_from, T.changes = path, changes
end

-- Opens metrics.jsonl (rewound to the resumed step), the progress output and the
-- history the plot draws; announces a resume.
local function open_outputs(cfg, mt, R, T)
  local mpath = R.out_dir .. "/metrics.jsonl"
  local rewound, torn = nil, 0
  if not R.main then -- one set of outputs per job: rank 0's
    function T.log_json() end
    function T.close_outputs() end
    function T.say() end
    return
  end
  if T.start_step > 1 then rewound, torn = rewind_metrics(mt, mpath, T.start_step - 1) end
  local mfile, merr = io.open(mpath, T.start_step > 1 and "a" or "w")
  if not mfile then fail("cannot write %s: %s (does out_dir exist?)", mpath, tostring(merr)) end
  T.mfile = mfile
  -- TensorBoard: a new events file per run segment; a resumed one first tells readers
  -- to drop what earlier files hold from its first step on (as metrics.jsonl was rewound)
  local tb = nil
  if cfg.tensorboard ~= false and type(mt.tensorboard_open) == "function" then
    tb = mt.tensorboard_open(R.out_dir, T.start_step > 1 and { restart_step = T.start_step } or nil)
    T.tb, T.tb_path = tb, tb:path()
  end
  function T.log_json(rec)
    mfile:write(mt.json_encode(rec), "\n")
    mfile:flush()
    if tb and math.type(rec.step) == "integer" then
      -- the record's finite numbers (what metrics.jsonl holds as numbers, not null)
      local values, any = {}, false
      for k, v in pairs(rec) do
        if k ~= "step" and type(k) == "string" and is_finite(v) then values[k] = v; any = true end
      end
      if any then tb:scalars(rec.step, values) end
    end
  end
  function T.close_outputs()
    mfile:close()
    if T.tb then T.tb:close(); T.tb = nil end
  end
  -- the \r progress bar only on a terminal: isatty on the stream it writes to (a log
  -- file under nohup or a batch system gets plain lines, whatever $TERM says)
  local tty = cfg.is_tty
  -- under mpirun a rank's output reaches the launcher through a pseudo-terminal,
  -- whatever the launcher's own output is: a job of several ranks logs plain lines
  if tty == nil and R.world > 1 then tty = false end
  if tty == nil then
    local term = os.getenv("TERM")
    tty = type(mt.isatty) == "function" and mt.isatty(R.output) and term ~= "dumb" or false
  end
  T.bar = cfg.progress ~= false and tty
  T.bar_shown = false
  function T.say(line)
    if T.bar_shown then R.output:write("\n"); T.bar_shown = false end
    R.output:write(line, "\n")
  end
  if rewound then
    -- the plot and the history cover the whole run, not only this segment
    for _, rec in ipairs(rewound) do
      if rec.type == "step" and not rec.skipped and type(rec.loss) == "number" then
        T.history.train[#T.history.train + 1] = { step = rec.step, loss = rec.loss }
      elseif rec.type == "eval" then
        local em = {}
        for k, v in pairs(rec) do
          if type(v) == "number" and k ~= "step" and k ~= "epoch" then em[k] = v end
        end
        T.history.eval[#T.history.eval + 1] = { step = rec.step, metrics = em }
      end
    end
  end
  if T.resumed_from then
    T.say(string.format("resumed from %s at step %d of %d%s", tostring(T.resumed_from), T.start_step - 1, R.total,
                        (torn or 0) > 0 and string.format(" (dropped %d unreadable line(s) of metrics.jsonl)", torn) or ""))
    for _, c in ipairs(T.changes or {}) do T.say("resume: changed since the checkpoint: " .. c) end
    T.log_json({ type = "resume", step = T.start_step - 1, path = tostring(T.resumed_from),
                 changes = (T.changes and #T.changes > 0) and T.changes or nil })
  end
end

-- The control handed to callbacks, and fire(hook) to call them.
local function make_control(mt, R, T)
  local req = { stop = false, evaluate = false, save = false }
  local control = {}
  function control:stop() req.stop = true end
  function control:set_lr(x)
    if not is_finite(x) or x < 0 then error("control:set_lr: want a finite lr >= 0, got " .. tostring(x), 2) end
    T.lr_override = x
  end
  function control:evaluate() req.evaluate = true end
  function control:save() req.save = true end
  T.req = req
  function T.fire(name, extra)
    for _, cb in ipairs(R.hooks) do
      local f = cb[name]
      if f then f(T.state, control, extra) end
    end
  end
  -- data parallel: rank 0's decisions on every rank (callbacks may read clocks or
  -- files that differ between ranks), so that all of them evaluate, save and stop at
  -- the same steps and no collective call waits for a rank that went another way
  function T.agree()
    if R.world == 1 then return end
    local d = mt.broadcast({ stop = req.stop, evaluate = req.evaluate, save = req.save, lr = T.lr_override,
                             stopped = T.state.stopped_early })
    req.stop, req.evaluate, req.save = d.stop, d.evaluate, d.save
    T.lr_override, T.state.stopped_early = d.lr, d.stopped
  end
end

-- Saves a checkpoint of the current step (once per step), then prunes.
local function save(cfg, mt, R, T)
  local state = T.state
  if T.saved[state.step] then return T.saved[state.step] end
  local m = {}
  for k, v in pairs(state.metrics) do
    if type(v) == "number" then m[k] = v end
  end
  local path = mt.checkpoint_save(R.out_dir, cfg.model, cfg.optimizer, {
    step = state.step, epoch = state.epoch, cursor = R.batcher:cursor(), rng = cfg.rng, lr = state.lr,
    total_steps = R.total, metrics = m, recipe = T.identity.recipe_text, plugins = cfg.plugins,
    run = T.identity.settings, trainer = trainer_state(T, R) })
  T.saved[state.step] = path
  T.log_json({ type = "checkpoint", step = state.step, path = path })
  T.fire("on_save", path)
  mt.checkpoint_prune(R.out_dir, R.keep_last, R.es and state.best and state.best.step or nil)
  return path
end

-- The options of an evaluation: eval_opts with the run's int8 choice; without its loss
-- plugin for general text (measured by its perplexity, whatever the training loss).
local function eval_options(cfg, R, with_loss)
  local o = {}
  for k, v in pairs(cfg.eval_opts or {}) do if with_loss or k ~= "loss" then o[k] = v end end
  o.int8 = R.eval_int8
  return o
end

local function general_opts(cfg, R) return eval_options(cfg, R, false) end

-- Runs the held-out evaluation and the metrics, logs them, and applies early stopping.
local function evaluate(cfg, mt, R, T)
  local state = T.state
  local m = {}
  state.metrics = m
  if cfg.eval_examples ~= nil then
    local opts = eval_options(cfg, R, true)
    local ex = cfg.eval_examples
    if opts.loss == nil and type(ex) == "userdata" and ex:paired() then
      -- held-out pairs: the preference loss and its metrics (perplexity means nothing)
      opts.loss = cfg.loss
    end
    local r = mt.evaluate(cfg.model, ex, opts)
    m.eval_loss = r.loss
    if is_finite(r.perplexity) then m.eval_perplexity = r.perplexity end
    m.eval_tokens_per_second = r.tokens_per_second
    for k, v in pairs(r.metrics or {}) do m["eval_" .. k] = v end
  end
  local over = false -- general text worsened beyond the bound
  if R.general then
    m.general_perplexity = mt.evaluate(cfg.model, R.general.examples, general_opts(cfg, R)).perplexity
    m.general_change = (m.general_perplexity - T.general_before) / T.general_before
    over = m.general_change > R.general.bound
  end
  for name, f in pairs(R.metric_fns) do
    local v = f(state)
    if type(v) ~= "number" then fail("metric '%s' returned %s, want a number", name, type(v)) end
    m[name] = v
  end
  if R.world > 1 then -- decisions below follow rank 0's numbers on every rank
    m = mt.broadcast(m)
    state.metrics = m
    over = R.general and m.general_change ~= nil and m.general_change > R.general.bound or false
  end
  T.history.eval[#T.history.eval + 1] = { step = state.step, metrics = m }
  local rec = { type = "eval", step = state.step, epoch = state.epoch }
  for k, v in pairs(m) do rec[k] = v end
  -- overfitting: the training loss since the last evaluation beside the held-out loss
  local train_loss = T.train_n > 0 and T.train_sum / T.train_n or nil
  T.train_sum, T.train_n = 0, 0
  if train_loss and m.eval_loss then
    rec.train_loss, rec.loss_gap = train_loss, m.eval_loss - train_loss
  end
  T.log_json(rec)
  local parts = {}
  for k, v in pairs(m) do parts[#parts + 1] = string.format("%s %.6g", k, v) end
  table.sort(parts)
  T.say(string.format("eval step %d: %s%s", state.step, table.concat(parts, ", "),
                      rec.loss_gap and string.format(" (training loss %.6g, gap %.6g)", train_loss, rec.loss_gap) or ""))
  if m.eval_loss and train_loss then
    local prev = T.last_losses
    if prev and m.eval_loss > prev.eval and train_loss < prev.train then T.rising = T.rising + 1
    else T.rising = 0 end
    T.last_losses = { eval = m.eval_loss, train = train_loss }
    local patience = R.es and R.es.patience or 3
    if T.rising >= patience and not T.overfit_warned then
      T.overfit_warned = true
      T.say(string.format("WARNING: overfitting: the held-out loss rose for %d evaluations while the " ..
                          "training loss fell; the best checkpoint is %s", T.rising,
                          state.best and state.best.path and string.format("step %d", state.best.step) or
                          (state.best and string.format("step %d (not saved: set early_stopping to keep it)", state.best.step) or "none")))
    end
  end
  if over then
    T.say(string.format("WARNING: general-text perplexity %.6g is %.1f%% above %.6g before training, more than " ..
                        "max_general_regression (%.0f%%): the model may be forgetting%s", m.general_perplexity,
                        100 * m.general_change, T.general_before, 100 * R.general.bound,
                        R.general.action == "stop" and "; stopping" or ""))
    if R.general.action == "stop" then state.stopped_early = true end
  end
  T.general_over = over

  local v = m[R.best_metric]
  local improved = false
  if v ~= nil then
    if R.general and R.general.guard and over then
      T.bad_evals = T.bad_evals + 1 -- beyond the general bound nothing counts as best
    elseif improves(v, state.best and state.best.value, R.best_mode, R.best_delta) then
      improved = true
      state.best = { metric = R.best_metric, value = v, step = state.step }
      T.bad_evals = 0
    else
      T.bad_evals = T.bad_evals + 1
    end
  elseif R.es then
    fail("early_stopping.metric '%s' is not among the evaluation's metrics", R.best_metric)
  end
  local es = R.es
  if improved and not es and R.general and R.general.guard then state.best.path = save(cfg, mt, R, T) end
  if es then
    if improved then state.best.path = save(cfg, mt, R, T) end
    if not improved and T.bad_evals >= es.patience then
      state.stopped_early = true
      T.say(string.format("early stopping at step %d: %s has not improved by more than %g for %d evaluations (%s)",
                          state.step, R.best_metric, es.min_delta, T.bad_evals,
                          state.best and string.format("best %.6g at step %d", state.best.value, state.best.step) or
                          "no evaluation within max_general_regression"))
    end
  end
  T.fire("on_evaluate")
end

-- One optimizer step: the learning rate, grad_accum micro-batches, mt.train_step, the
-- NaN guard, metrics.jsonl and the progress output.
local function train_step(cfg, mt, R, T, step)
  local state, total = T.state, R.total
  local lr
  if T.lr_override then lr = T.lr_override
  elseif cfg.schedule then lr = cfg.schedule(step, total, cfg.lr)
  elseif cfg.scheduler then lr = mt.schedule(cfg.scheduler, step - 1, total, cfg.lr) -- 0-based
  else lr = cfg.lr end
  if not is_finite(lr) then fail("the schedule gave lr %s at step %d", tostring(lr), step) end

  local step_started = R.clock()
  local batches, epoch, input_tokens = {}, state.epoch, 0
  -- a batcher's own numbers (a GRPO rollout's rewards: info.metrics, averaged over the
  -- micro-batches) and records for metrics.jsonl (its samples: info.records)
  local batch_metrics, batch_records = {}, {}
  for i = 1, R.grad_accum do
    local b, info = R.batcher:next()
    batches[i] = b
    if info and info.epoch then epoch = info.epoch end
    input_tokens = input_tokens + (info and info.tokens or 0)
    for k, v in pairs(info and info.metrics or {}) do
      batch_metrics[k] = (batch_metrics[k] or 0) + v / R.grad_accum
    end
    for _, rec in ipairs(info and info.records or {}) do batch_records[#batch_records + 1] = rec end
  end
  local r = mt.train_step(cfg.model, cfg.loss, cfg.optimizer, batches,
                          { lr = lr, step = step, max_grad_norm = R.max_grad_norm or nil })
  T.step_seconds = T.step_seconds + (R.clock() - step_started)
  local bad = r.skipped or not is_finite(r.loss)
  state.step, state.epoch = step, epoch
  state.loss, state.grad_norm, state.lr = r.loss, r.grad_norm, r.lr or lr
  state.tokens = r.tokens or 0
  state.step_metrics = r.metrics or {}
  for k, v in pairs(batch_metrics) do
    if state.step_metrics[k] == nil then state.step_metrics[k] = v end
  end
  T.tokens_run = T.tokens_run + input_tokens
  if bad then
    state.bad_steps = state.bad_steps + 1
    if state.bad_steps >= R.max_bad then
      T.close_outputs()
      error(string.format("%d non-finite steps in a row at step %d: stopping (lower the learning rate or check the data)",
                          state.bad_steps, step), 0)
    end
  else
    state.bad_steps = 0
    T.history.train[#T.history.train + 1] = { step = step, loss = r.loss }
    T.train_sum, T.train_n = T.train_sum + r.loss, T.train_n + 1
  end

  local elapsed = R.clock() - T.t0
  local tps = T.step_seconds > 0 and T.tokens_run / T.step_seconds or 0
  local rec = { type = "step", step = step, epoch = epoch, loss = r.loss, lr = state.lr, grad_norm = r.grad_norm,
                tokens = state.tokens, input_tokens = input_tokens, tokens_per_second = tps,
                skipped = bad and true or false }
  -- the loss plugin's metrics under their own names (TRL's for dpo: rewards/margins, ...)
  local names = {}
  for k, v in pairs(state.step_metrics) do
    if rec[k] == nil then rec[k] = v; names[#names + 1] = k end
  end
  table.sort(names)
  T.log_json(rec)
  for _, extra in ipairs(batch_records) do
    local out = { type = "sample", step = step }
    for k, v in pairs(extra) do if out[k] == nil or k == "type" then out[k] = v end end
    T.log_json(out)
  end
  local done = step - T.start_step + 1
  local eta = elapsed / done * (total - step)
  if step == T.start_step and R.int8 then
    T.say(string.format("int8: %d frozen projections multiply in 8 bits in training steps (%s)%s%s", r.int8 or 0,
                        R.int8 == "forward" and "forward" or "forward and input gradients",
                        (r.int8 or 0) == 0 and " (none: this CPU has no int8 products for these weights, " ..
                          "or nothing is frozen)" or "",
                        R.eval_int8 and "; evaluations through the same int8 forward" or "; evaluations in fp32"))
  end
  if T.bar then
    local width, filled = 20, math.floor(20 * step / total)
    local shown = {}
    for _, k in ipairs(R.progress_metrics) do
      local v = state.step_metrics[k]
      if v ~= nil then shown[#shown + 1] = string.format(" %s %s", k, fmt_num(v, "%.3f")) end
    end
    R.output:write(string.format("\r[%s%s] %d/%d loss %s%s lr %s %.0f tok/s ETA %s   ",
                                 string.rep("#", filled), string.rep(".", width - filled), step, total,
                                 fmt_num(r.loss, "%.4f"), table.concat(shown), fmt_num(state.lr, "%.2e"), tps,
                                 format_time(eta)))
    R.output:flush()
    T.bar_shown = true
  elseif step == T.start_step or step % (cfg.log_every or 10) == 0 or step == total or bad then
    local shown = {}
    for _, k in ipairs(names) do shown[#shown + 1] = string.format(" %s %s", k, fmt_num(state.step_metrics[k], "%.4g")) end
    T.say(string.format("step %d/%d epoch %d loss %s%s lr %s grad_norm %s %.0f tok/s ETA %s%s", step, total, epoch,
                        fmt_num(r.loss, "%.4f"), table.concat(shown), fmt_num(state.lr, "%.2e"),
                        fmt_num(r.grad_norm or 0 / 0, "%.3f"), tps, format_time(eta), bad and " (skipped: non-finite)" or ""))
  end
end

-- The end: final evaluation and checkpoint, the best restored, the plot and summary.
local function finish(cfg, mt, R, T)
  local state = T.state
  if R.has_eval and T.last_eval ~= state.step and state.step >= T.start_step then evaluate(cfg, mt, R, T) end
  if state.step >= T.start_step then save(cfg, mt, R, T) end
  local restored = false
  local es = R.es
  local restore = (es and es.restore_best) or (R.general and R.general.guard and T.general_over)
  if restore and state.best and state.best.path and state.best.step ~= state.step then
    mt.checkpoint_load(state.best.path, cfg.model, cfg.optimizer, cfg.loss)
    restored = true
  end
  T.close_outputs()

  local seconds = R.clock() - T.t0
  if cfg.plot ~= false and R.main then
    local plot = require("moontune.plot")
    local evals = {}
    for _, e in ipairs(T.history.eval) do
      if e.metrics.eval_loss then evals[#evals + 1] = { step = e.step, loss = e.metrics.eval_loss } end
    end
    plot.loss_svg(R.out_dir .. "/loss.svg", T.history.train, evals)
  end

  T.fire("on_train_end")
  local lines = { string.format("trained %d steps of %d in %s%s", state.step, R.total, format_time(seconds),
                                state.stopped_early and " (stopped early)" or (T.req.stop and " (stopped by a callback)" or "")) }
  if state.best then
    lines[#lines + 1] = string.format("best %s %.6g at step %d%s", state.best.metric, state.best.value, state.best.step,
                                      restored and " (restored)" or "")
  end
  -- the evaluation of the model the trainer leaves: the restored best's, or the last
  -- one when it was made at the final step
  local left = nil
  local left_step = restored and state.best.step or state.step
  for i = #T.history.eval, 1, -1 do
    if T.history.eval[i].step == left_step then left = T.history.eval[i].metrics; break end
  end
  local general = nil
  if R.general and left and left.general_perplexity then
    general = { before = T.general_before, after = left.general_perplexity, change = left.general_change }
    lines[#lines + 1] = string.format("general-text perplexity %.6g before, %.6g after (%+.1f%%%s)",
                                      T.general_before, left.general_perplexity, 100 * left.general_change,
                                      left.general_change > R.general.bound and
                                        ", beyond max_general_regression" or "")
  end
  lines[#lines + 1] = string.format("outputs in %s: metrics.jsonl%s%s, checkpoints", R.out_dir,
                                    cfg.plot ~= false and ", loss.svg" or "",
                                    T.tb_path and ", TensorBoard events" or "")
  for _, l in ipairs(lines) do T.say(l) end

  return { steps = state.step, best = state.best, stopped_early = state.stopped_early, history = T.history,
           out_dir = R.out_dir, seconds = seconds, restored_best = restored, general = general,
           tensorboard = T.tb_path,
           metrics = left,
           tokens = T.tokens_run, step_seconds = T.step_seconds,
           tokens_per_second = T.step_seconds > 0 and T.tokens_run / T.step_seconds or 0 }
end

function M.run(cfg, mt)
  local R = resolve(cfg, mt)
  if mt.validating and mt.validating() then return validate_report(cfg, R) end

  local T = { state = { step = 0, total_steps = R.total, epoch = 1, loss = nil, lr = cfg.lr, grad_norm = nil,
                        tokens = 0, metrics = {}, best = nil, bad_steps = 0, stopped_early = false },
              history = { train = {}, eval = {} }, lr_override = nil, bad_evals = 0, saved = {},
              identity = run_identity(cfg, mt, R),
              -- throughput counts the tokens the model ran (prompt and reply, no padding)
              -- over the time spent in training steps, so evaluations and checkpoints do
              -- not dilute it
              tokens_run = 0, step_seconds = 0, last_eval = nil,
              -- the training loss since the last evaluation, and rises of the held-out
              -- loss while it falls (overfitting)
              train_sum = 0, train_n = 0, rising = 0 }
  if R.shard_optimizer then cfg.optimizer:shard_state(true) end
  resume(cfg, mt, R, T)
  -- the remains of a run killed while saving or pruning go before anything else
  if mt.checkpoint_prune then
    mt.checkpoint_prune(R.out_dir, R.keep_last, R.es and T.state.best and T.state.best.step or nil)
  end
  open_outputs(cfg, mt, R, T)
  make_control(mt, R, T)
  -- int8 copies of the frozen weights for this run's steps (and evaluations), freed
  -- when it ends, also by an error (their memory goes back before anything else runs)
  local int8_copies <close> = R.int8 and setmetatable({}, {
    __close = function() cfg.model:int8_training("off") end }) or nil
  if R.int8 then cfg.model:int8_training(R.int8) end
  if R.general and not T.general_before then -- a resumed run keeps the first run's
    T.general_before = mt.evaluate(cfg.model, R.general.examples, general_opts(cfg, R)).perplexity
    T.say(string.format("general text: perplexity %.6g before training", T.general_before))
    T.log_json({ type = "general", step = T.start_step - 1, general_perplexity = T.general_before })
  end
  if cfg.recompute then cfg.model:recompute(cfg.recompute) end

  T.t0 = R.clock()
  T.fire("on_train_begin")
  local req = T.req
  local step = T.start_step
  while step <= R.total and not req.stop and not T.state.stopped_early do
    train_step(cfg, mt, R, T, step)
    T.fire("on_step_end")
    T.agree()
    if R.has_eval and (req.evaluate or (R.eval_every and step % R.eval_every == 0)) then
      evaluate(cfg, mt, R, T)
      T.last_eval = step
      T.agree()
    elseif req.evaluate then
      T.say(string.format("step %d: evaluation requested but there is nothing to evaluate (no eval_examples or metrics)", step))
    end
    if req.save or (R.save_every and step % R.save_every == 0) then save(cfg, mt, R, T) end
    req.evaluate, req.save = false, false
    step = step + 1
  end
  return finish(cfg, mt, R, T)
end

return M
