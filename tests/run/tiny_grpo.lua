-- The recipe of the GRPO test (tests/run/check_grpo.sh): GRPO with a LoRA on the tiny chat
-- model, rewards written here, driven by moontune.trainer with checkpoints, so that a
-- run stopped and resumed can be compared with an uninterrupted one, and a reward that
-- misbehaves at a chosen step can be seen to stop the run with its line named.
local mt = require("moontune")
local grpo = require("moontune.grpo")

local cfg = mt.config({
  fixtures = "",
  out_dir = "grpo-out",
  steps = 6,
  save_every = 0,
  stop_at = 0,        -- > 0: save and stop after this step (to resume later)
  resume = false,
  beta = 0.04,
  loss_type = "grpo",
  bad_reward = "",    -- "error" | "string" | "nan": the reward misbehaves from bad_at on
  bad_at = 0,
  n_prompts = 5,
  num_iterations = 1,
})
local out = mt.output_dir(cfg.out_dir, { resume = cfg.resume })
local dir = cfg.fixtures .. "/tiny_chat"
local model = mt.model(dir)
local tok = mt.tokenizer(dir)
local lora = mt.plugin("adapter", "lora", { r = 4, alpha = 8, target_modules = "all-linear", seed = 3 })
model:attach(lora)
model:plan(8, 96)

local prompts = {}
for i = 1, cfg.n_prompts do
  prompts[i] = { prompt = string.format("Say something about the number %d.", i), record = { n = i },
                 system = i % 2 == 0 and "Be brief." or nil }
end
local step = 0
-- the share of vowels: any completion scores, and a group's completions differ
local function vowels(_, completion, record)
  if cfg.bad_reward ~= "" and step >= cfg.bad_at then
    if cfg.bad_reward == "error" then error("tiny_grpo: this reward fails on purpose") end
    if cfg.bad_reward == "string" then return "high" end
    if cfg.bad_reward == "nan" then return 0 / 0 end
  end
  local n = select(2, completion:gsub("[aeiouAEIOU]", ""))
  return n / math.max(1, #completion) + 0.01 * record.n
end
local function short(_, completion) return -#completion / 100 end

local rollouts = grpo.rollouts(mt, {
  model = model, tokenizer = tok, prompts = prompts,
  rewards = { { name = "vowels", fn = vowels }, { name = "short", fn = short, weight = 0.5 } },
  prompts_per_step = 2, group_size = 3, max_new_tokens = 10, temperature = 1.0, seed = 11,
  generate_batch = 4, samples_logged = 6, num_iterations = cfg.num_iterations,
})
local result = mt.trainer.run({
  model = model, optimizer = mt.plugin("optimizer", "adamw", {}), batcher = rollouts,
  loss = mt.plugin("loss", "grpo", { beta = cfg.beta, loss_type = cfg.loss_type, max_completion_length = 10 }),
  lr = 0.02, max_steps = cfg.steps, out_dir = out, save_every = cfg.save_every, resume = cfg.resume or nil,
  progress = false, log_every = 1,
  callbacks = { on_step_end = function(state, control)
    step = state.step
    if cfg.stop_at > 0 and state.step == cfg.stop_at then control:save(); control:stop() end
  end },
}, mt)
print(string.format("tiny_grpo: %d steps", result.steps))
