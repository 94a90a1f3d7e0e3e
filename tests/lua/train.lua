-- End to end on the tiny model: LoRA, AdamW, cosine schedule, evaluation, checkpoints.
local mt = require("moontune")
local PLUGINS = { paths = { BUILD_DIR .. "/plugins" } }

local function check(cond, msg) if not cond then error(msg, 2) end end

-- token-id examples for a vocabulary of 96: a repeating pattern the model can learn
local items = {}
for i = 1, 24 do
  local ids, trainable = {}, {}
  local n = 8 + (i % 5)
  for t = 1, n do
    ids[t] = 3 + ((i + t * 7) % 90)
    trainable[t] = t > 3
  end
  items[#items + 1] = { ids = ids, trainable = trainable }
end
local examples <close> = mt.examples_from_ids(items, { seq_len = 16 })
check(examples:count() == 24, "count " .. examples:count())
local st = examples:stats()
check(st.examples == 24 and st.seq_len == 16, "stats")
local train, heldout = examples:split(0.25, 7)
check(train:count() == 18 and heldout:count() == 6, "split " .. train:count() .. "/" .. heldout:count())

local function rig()
  local model = mt.model(FIXTURE_DIR .. "/tiny_gqa")
  local info = model:info()
  check(info.vocab == 96 and info.layers == 2 and info.kv_heads == 2, "info")
  local lora = mt.plugin("adapter", "lora", { r = 4, alpha = 8, target_modules = { "q_proj", "v_proj" } }, PLUGINS)
  model:attach(lora)
  model:plan(2, 16)
  local loss = mt.plugin("loss", "cross_entropy", {}, PLUGINS)
  local opt = mt.plugin("optimizer", "adamw", { weight_decay = 0.0 }, PLUGINS)
  return model, loss, opt, lora
end

local model, loss, opt, lora = rig()
local trainable = model:trainable()
check(#trainable == 8, "trainable tensors: " .. #trainable) -- 2 layers x (q,v) x (A,B)
for _, p in ipairs(trainable) do check(p.name:find("lora_"), p.name) end
check(lora:describe().kind == "adapter" and lora:describe().name == "lora", "describe")
local sched = mt.plugin("scheduler", "cosine", { warmup_steps = 2 }, PLUGINS)

local batcher <close> = mt.batcher(train, { batch = 2, seq_len = 16, seed = 1 })
check(batcher:batches_per_epoch() >= 1, "batches_per_epoch")
local total, base_lr = 20, 0.02
local first, last
model:set_training(true)
for step = 1, total do
  local b1 = batcher:next()
  local b2 = batcher:next()
  local lr = mt.schedule(sched, step - 1, total, base_lr)
  local r = mt.train_step(model, loss, opt, { b1, b2 }, { lr = lr, step = step, max_grad_norm = 1.0 })
  check(r.loss == r.loss and not r.skipped, "step " .. step)
  check(math.abs(r.lr - lr) < 1e-12, "lr applied")
  first = first or r.loss
  last = r.loss
end
check(last < first, string.format("loss did not decrease: %.4f -> %.4f", first, last))
print(string.format("train: loss %.4f -> %.4f over %d steps", first, last, total))

local ev = mt.evaluate(model, heldout, { batch = 2, seq_len = 16 })
check(ev.loss == ev.loss and ev.loss < math.huge and ev.examples == 6, "evaluate")
model:set_training(true)

-- checkpoint round trip: the next step's loss after loading equals the one without
local cursor = batcher:cursor()
local path = mt.checkpoint_save(TMP, model, opt, {
  step = total, epoch = cursor.epoch, cursor = cursor, rng = { 1, -2 }, lr = 0.01,
  total_steps = 40, metrics = { eval_loss = ev.loss }, recipe = "-- test", plugins = { opt, lora },
})
check(mt.checkpoint_latest(TMP) == path, "latest")
local b1, b2 = batcher:next(), batcher:next()
local want = mt.train_step(model, loss, opt, { b1, b2 }, { lr = 0.01, step = total + 1, max_grad_norm = 1.0 }).loss

local model2, loss2, opt2 = rig()
local state = mt.checkpoint_load(path, model2, opt2)
check(state.step == total and state.total_steps == 40 and state.recipe == "-- test", "state")
check(state.rng[1] == 1 and state.rng[2] == -2, "rng")
check(state.metrics.eval_loss == ev.loss, "metrics")
check(state.plugins[1].name == "adamw" and state.plugins[2].name == "lora", "plugins")
local batcher2 <close> = mt.batcher(train, { batch = 2, seq_len = 16, seed = 1 })
batcher2:set_cursor(state.cursor)
model2:set_training(true)
local c1, c2 = batcher2:next(), batcher2:next()
local got = mt.train_step(model2, loss2, opt2, { c1, c2 },
  { lr = 0.01, step = total + 1, max_grad_norm = 1.0 }).loss
check(got == want, string.format("resumed loss %.17g ~= %.17g", got, want))

-- the frozen base's products in int8 during training steps (model:int8_training): on a
-- CPU with AVX512-VNNI every frozen projection (2 layers x 7 and lm_head) multiplies in
-- 8 bits and the loss stays near fp32's; elsewhere all stay fp32
local has_cpu_flags = dofile(FIXTURE_DIR .. "/../lua/cpu_flags.lua")
local projections = has_cpu_flags("avx512bw", "avx512_vnni") and 2 * 7 + 1 or 0
local d1, d2 = batcher2:next(), batcher2:next()
local fp = mt.train_step(model2, loss2, opt2, { d1, d2 }, { lr = 0, step = total + 2 })
check(fp.int8 == 0, "int8 is off unless asked: " .. fp.int8)
model2:int8_training(true)
local q8 = mt.train_step(model2, loss2, opt2, { d1, d2 }, { lr = 0, step = total + 3 })
check(q8.int8 == projections, string.format("%d projections in int8, expected %d", q8.int8, projections))
check(math.abs(q8.loss - fp.loss) <= 3e-3 * fp.loss, string.format("int8 loss %.6f, fp32 %.6f", q8.loss, fp.loss))
model2:int8_training("off")
check(mt.train_step(model2, loss2, opt2, { d1, d2 }, { lr = 0, step = total + 4 }).int8 == 0, "int8 off again")
check(not pcall(model2.int8_training, model2, 1), "int8_training takes a boolean or a mode")
check(not pcall(model2.int8_training, model2, "backward"), "int8_training's modes")
-- the forward alone: the same projections, another loss (fp32 input gradients do not
-- change the loss, so it is the "all" step's)
model2:int8_training("forward")
local f8 = mt.train_step(model2, loss2, opt2, { d1, d2 }, { lr = 0, step = total + 5 })
check(f8.int8 == projections and f8.loss == q8.loss, string.format("forward only: %d, loss %.9g against %.9g",
                                                                   f8.int8, f8.loss, q8.loss))
model2:int8_training(false)
print(string.format("train: int8 step loss %.6f against fp32 %.6f, %d projections", q8.loss, fp.loss, q8.int8))

-- model:recompute: whole layers recomputed in backward give the step of the default
-- ("norms") to the bit (lr 0: the same weights); unknown modes are refused
model2:recompute("layers")
local ck = mt.train_step(model2, loss2, opt2, { d1, d2 }, { lr = 0, step = total + 6 })
model2:recompute("norms")
local nm = mt.train_step(model2, loss2, opt2, { d1, d2 }, { lr = 0, step = total + 7 })
check(ck.loss == nm.loss and ck.grad_norm == nm.grad_norm,
      string.format("recompute layers: loss %.9g, norm %.9g against %.9g, %.9g", ck.loss, ck.grad_norm,
                    nm.loss, nm.grad_norm))
check(not pcall(model2.recompute, model2, "everything"), "recompute's modes")

-- the trainer's int8 option: its first step says how many projections, and the copies
-- go when the run ends
local said = {}
local sink = { write = function(_, s) said[#said + 1] = s end, flush = function() end }
local run_cfg = { model = model2, loss = loss2, optimizer = opt2, batcher = batcher2, lr = 0.01,
                  max_steps = 2, out_dir = TMP .. "/int8_run", int8 = "forward", output = sink,
                  progress = false, plot = false, tensorboard = false }
os.execute("mkdir -p " .. run_cfg.out_dir)
mt.trainer.run(run_cfg, mt)
local text = table.concat(said)
check(text:find(string.format("int8: %d frozen projections multiply in 8 bits in training steps (forward)",
                              projections), 1, true), "trainer's int8 line: " .. text)
check(mt.train_step(model2, loss2, opt2, { d1, d2 }, { lr = 0, step = 99 }).int8 == 0, "int8 ends with the run")
run_cfg.int8 = "yes"
local ok, err = pcall(mt.trainer.run, run_cfg, mt)
check(not ok and tostring(err):find('cfg.int8 must be "off", "forward" or "all"', 1, true),
      "bad int8: " .. tostring(err))
run_cfg.int8, run_cfg.recompute = nil, "all"
ok, err = pcall(mt.trainer.run, run_cfg, mt)
check(not ok and tostring(err):find('cfg.recompute must be "off", "norms" or "layers"', 1, true),
      "bad recompute: " .. tostring(err))
run_cfg.recompute = nil

check(mt.checkpoint_prune(TMP, 1) == 0, "prune")
check(#mt.sha256("abc") == 64, "sha256")
check(mt.sha256("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "sha256 value")
model:close(); model2:close()
return "ok"
