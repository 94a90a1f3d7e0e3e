-- TensorBoard events beside metrics.jsonl, and progress output decided by isatty. Run by
-- tests/unit/test_tfevents.c (test_trainer_events) with OUT_DIR a fresh directory; the
-- fake model comes from trainer_fake.lua, the events writer and reader, isatty and JSON
-- from the real core (moontune.core).
local fake = require("trainer_fake")
local trainer = require("moontune.trainer")
local core = require("moontune.core")
local eq = fake.eq

local function with_core(mt)
  for _, k in ipairs({ "tensorboard_open", "tensorboard_read", "isatty", "json_decode", "write_file" }) do
    mt[k] = core[k]
  end
  return mt
end

local function f32(x) return (string.unpack("f", string.pack("f", x))) end

-- The scalars metrics.jsonl holds: every number of every record but its step, tags in
-- sorted order within a record, as float32: { {step, tag, value}, ... }
local function jsonl_scalars(dir)
  local out = {}
  local f = assert(io.open(dir .. "/metrics.jsonl"))
  for line in f:lines() do
    local rec = core.json_decode(line)
    local tags = {}
    for k, v in pairs(rec) do
      if k ~= "step" and type(v) == "number" then tags[#tags + 1] = k end
    end
    table.sort(tags)
    for _, k in ipairs(tags) do out[#out + 1] = { rec.step, k, f32(rec[k]) } end
  end
  f:close()
  return out
end

-- The scalars of the events files of dir as TensorBoard's EventAccumulator sees them: in
-- file-name order, a SessionLog START at step S dropping what came before at steps >= S.
-- `raw` keeps everything (no purge), to show that the purge mattered.
local function event_scalars(dir, raw)
  local events, torn = core.tensorboard_read(dir)
  assert(torn == nil, torn)
  local out, files, first_of = {}, 0, {}
  for _, ev in ipairs(events) do
    if not first_of[ev.file] then
      first_of[ev.file] = true
      files = files + 1
      eq(ev.kind, "file_version", "first event of " .. ev.file)
      eq(ev.file_version, "brain.Event:2", "file_version")
    elseif ev.kind == "session_log" and ev.session_status == "start" and not raw then
      local kept = {}
      for _, s in ipairs(out) do if s[1] < ev.step then kept[#kept + 1] = s end end
      out = kept
    elseif ev.kind == "summary" then
      for _, v in ipairs(ev.values) do out[#out + 1] = { ev.step, v.tag, v.value } end
    end
  end
  return out, files, events
end

local function same(got, want, what)
  eq(#got, #want, what .. ": number of scalars")
  for i = 1, #want do
    local g, w = got[i], want[i]
    if g[1] ~= w[1] or g[2] ~= w[2] or g[3] ~= w[3] then
      error(string.format("%s: scalar %d is step %s %s = %.9g, metrics.jsonl has step %s %s = %.9g", what, i,
                          tostring(g[1]), g[2], g[3], tostring(w[1]), w[2], w[3]), 2)
    end
  end
end

local function has_tag(list, tag)
  for _, s in ipairs(list) do if s[2] == tag then return true end end
  return false
end

-- 1. a run with a skipped (NaN) step, loss metrics and evaluations; output to a file
do
  local dir = core.output_dir(OUT_DIR .. "/fresh")
  local losses = { 2.5, 2.25, 2.0, 0 / 0, 1.5, 1.25, 1.0, 0.9 }
  local mt = with_core(fake.new{ per_epoch = 4, losses = losses, evals = { 2.0, 1.7, 1.5, 1.4 },
                                 step_metrics = function(step) return { ["rewards/accuracies"] = step / 10 } end })
  local log = assert(io.open(dir .. "/log.txt", "w"))
  local cfg = fake.cfg(mt, { out_dir = dir, epochs = 2, eval_every = 2, eval_examples = "h", output = log,
                             log_every = 1 })
  local r = trainer.run(cfg, mt)
  log:close()
  eq(r.steps, 8, "steps")
  assert(type(r.tensorboard) == "string" and r.tensorboard:find(dir .. "/events.out.tfevents.", 1, true) == 1,
         "result names the events file: " .. tostring(r.tensorboard))

  local want = jsonl_scalars(dir)
  local got, files, events = event_scalars(dir)
  eq(files, 1, "one events file")
  same(got, want, "fresh run")
  for _, tag in ipairs({ "loss", "lr", "grad_norm", "tokens", "eval_loss", "eval_perplexity", "train_loss",
                         "rewards/accuracies", "epoch" }) do
    assert(has_tag(got, tag), "tag " .. tag .. " written")
  end
  -- the NaN step: no loss scalar at step 4 (metrics.jsonl writes null), its other values are there
  for _, s in ipairs(got) do assert(not (s[1] == 4 and s[2] == "loss"), "no loss at the skipped step") end
  local step4 = false
  for _, s in ipairs(got) do if s[1] == 4 and s[2] == "grad_norm" then step4 = true end end
  assert(step4, "the skipped step's grad_norm")
  -- values as written: the loss of step 2 and the lr of step 1, float32
  for _, s in ipairs(got) do
    if s[1] == 2 and s[2] == "loss" then eq(s[3], f32(2.25), "loss at step 2") end
    if s[1] == 1 and s[2] == "lr" then eq(s[3], f32(0.1), "lr at step 1") end
  end
  -- wall times are the real clock, in order
  local prev = 0
  for _, ev in ipairs(events) do
    assert(ev.wall_time >= prev and math.abs(ev.wall_time - os.time()) < 600, "wall_time " .. ev.wall_time)
    prev = ev.wall_time
  end

  -- a log file (not a terminal): plain lines, no carriage returns
  local f = assert(io.open(dir .. "/log.txt"))
  local text = f:read("a")
  f:close()
  assert(not text:find("\r", 1, true), "no carriage returns in a log file:\n" .. text)
  assert(text:find("step 1/8 epoch 1 loss 2.5000", 1, true), "plain step lines:\n" .. text)
  assert(text:find("TensorBoard events", 1, true), "the summary names the events:\n" .. text)
end

-- 2. tensorboard = false: no events file
do
  local dir = core.output_dir(OUT_DIR .. "/off")
  local mt = with_core(fake.new{ per_epoch = 4 })
  local r = trainer.run(fake.cfg(mt, { out_dir = dir, epochs = 1, tensorboard = false }), mt)
  eq(r.tensorboard, nil, "no events file named")
  eq(#core.tensorboard_read(dir), 0, "no events written")
  local ok, err = pcall(trainer.run, fake.cfg(mt, { out_dir = dir, tensorboard = "yes" }), mt)
  assert(not ok and err:find("cfg.tensorboard must be true or false", 1, true), tostring(err))
  local bare = fake.new{ per_epoch = 4 } -- a module without tensorboard_open
  ok, err = pcall(trainer.run, fake.cfg(bare, { out_dir = dir, tensorboard = true }), bare)
  assert(not ok and err:find("no tensorboard_open", 1, true), tostring(err))
end

-- 3. resume: the run goes on from the checkpoint at step 4 with other losses for the steps
-- it repeats; a second file tells TensorBoard to drop steps >= 5 of the first, so what
-- TensorBoard shows equals the rewound metrics.jsonl
do
  local dir = core.output_dir(OUT_DIR .. "/resumed")
  local phase = 0
  local mt = with_core(fake.new{ per_epoch = 4, evals = { 2.0, 1.8, 1.6, 1.5 },
                                 losses = function(step) return phase * 10 + 1 / step end })
  trainer.run(fake.cfg(mt, { out_dir = dir, epochs = 2, save_every = 4, eval_every = 2, eval_examples = "h" }), mt)
  phase = 1
  local r = trainer.run(fake.cfg(mt, { out_dir = dir, epochs = 2, save_every = 4, eval_every = 2, eval_examples = "h",
                                       resume = fake.ckpt(4, dir) }), mt)
  eq(r.steps, 8, "resumed run's steps")
  local want = jsonl_scalars(dir)
  local got, files, events = event_scalars(dir)
  eq(files, 2, "a new events file for the resumed run")
  same(got, want, "resumed run")
  for _, s in ipairs(got) do
    if s[2] == "loss" then eq(s[3], f32((s[1] > 4 and 10 or 0) + 1 / s[1]), "loss at step " .. s[1]) end
  end
  -- the second file begins with the file version and a SessionLog START at step 5
  local second
  for _, ev in ipairs(events) do if ev.file == r.tensorboard then second = second or {}; second[#second + 1] = ev end end
  eq(second[1].kind, "file_version", "second file: version")
  eq(second[2].kind, "session_log", "second file: session log")
  eq(second[2].session_status, "start", "SessionLog START")
  eq(second[2].step, 5, "START at the first step the resumed run writes")
  -- without the purge the steps 5..8 would be there twice: the START event is needed
  local raw = event_scalars(dir, true)
  assert(#raw > #want, "the first file holds the steps the resumed run repeated")
end

-- 4. isatty: a pseudo-terminal is one (where the system has them), a file is not
do
  local pt = io.open("/dev/ptmx", "r")
  if pt then
    eq(core.isatty(pt), true, "isatty on a pseudo-terminal")
    pt:close()
  end
  local f = assert(io.open(OUT_DIR .. "/plain.txt", "w"))
  eq(core.isatty(f), false, "isatty on a file")
  f:close()
end
