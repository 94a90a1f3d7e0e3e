-- moontune.grpo — group relative policy optimisation (GRPO, as TRL's GRPOTrainer and
-- DeepSeek-R1 train): sample several completions per prompt, score each with reward
-- functions written in Lua, and push the model towards the completions that scored
-- above their group's mean.
--
--     local grpo = require("moontune.grpo")
--     local rollouts = grpo.rollouts(mt, { model = model, tokenizer = tok, prompts = items,
--                                           rewards = { valid_json = fn, ... } })
--     mt.trainer.run({ model = model, batcher = rollouts,
--                      loss = mt.plugin("loss", "grpo", { beta = 0.04 }), ... }, mt)
--
-- The rollouts object is a batcher for moontune.trainer, so GRPO gets the trainer's
-- checkpoints, resume, callbacks, early stopping and metrics unchanged. Each next()
-- takes the next `prompts_per_step` prompts, generates `group_size` completions for
-- each (batched, sampling), scores them, computes the group-normalised advantages and
-- returns mt.rl_batch of the completions with the log-probabilities they were sampled
-- with: the `grpo` loss plugin's input. num_iterations optimizer steps are taken on each
-- rollout (TRL's num_iterations, default 1: the ratio to the sampling policy then differs
-- from 1 only by the numerics between the decoder and the training pass; with more, the
-- policy moves away from the one that sampled and the clip acts). The rollout in use is
-- kept in checkpoints (state / set_state), so a resume between its steps goes on with it.
--
-- Determinism: the prompts' order is a seeded shuffle per epoch, and completion g of the
-- prompt at position p of epoch e samples with seed + ((e - 1) * N + p) * G + g. The
-- cursor (epoch, position) is what checkpoints keep, so a resumed run draws the samples
-- the uninterrupted one drew.
--
-- cfg (* = required):
--   model*, tokenizer*     the policy (its adapter attached) and its tokenizer
--   prompts*               list of { prompt = text, system = text or nil, record = any }
--                          (record goes to the reward functions as it is)
--   rewards*               name -> function(prompt, completion, record) -> number, or a
--                          list of { name =, fn =, weight = 1 }; the reward is the
--                          weighted sum. A function that raises an error, or returns
--                          anything but a finite number, stops the run with an error
--                          naming it and the recipe line where it is defined
--   prompts_per_step = 4   P: prompts per micro-batch; a batch holds P * G rows
--   num_iterations = 1     optimizer steps on each rollout (each a batcher:next())
--   group_size = 4         G: completions per prompt (>= 2)
--   max_new_tokens = 128, temperature = 1.0, top_p = 1.0, top_k = 0
--   template, stop         as mt.generate takes them
--   generate_batch = 16    sequences decoded together
--   int8 = false           rollouts with int8 weight products (mt.generate): faster, but
--                          the sampling log-probabilities (the loss's old_logps) then
--                          come from another model than the policy the loss computes
--   seed = 0, shuffle = true
--   scale_rewards = true   advantage = (r - mean) / (std + 1e-4) over the group (std with
--                          Bessel's correction, as torch.std); false: r - mean (Dr. GRPO)
--   samples_logged = 2     completions per step written to metrics.jsonl with their rewards
--   seq_len = nil          the longest prompt + completion a batch may hold
--
-- Metrics each step (beside the loss plugin's kl and clip ratios): reward, reward_std (the
-- mean over groups of the group's std), rewards/<name>/mean and /std,
-- frac_reward_zero_std (groups whose completions all scored the same: no signal),
-- completions/mean_length, completions/clipped_ratio (completions that hit
-- max_new_tokens), and "sample" records with prompt, completion, rewards, advantage.
local M = {}

-- A seeded permutation of 1..n (Fisher-Yates with a 64-bit linear congruential
-- generator; Lua 5.4 integers wrap, as the generator wants).
local function permutation(n, seed)
  local order = {}
  for i = 1, n do order[i] = i end
  local x = seed * 2654435761 + 1
  for i = n, 2, -1 do
    x = x * 6364136223846793005 + 1442695040888963407
    local j = (x >> 33) % i + 1 -- >> is a logical shift: 0 <= x >> 33 < 2^31
    order[i], order[j] = order[j], order[i]
  end
  return order
end

local function is_finite(x)
  return type(x) == "number" and x == x and x ~= math.huge and x ~= -math.huge
end

-- The reward functions as a list of { name, fn, weight }, in a fixed order.
local function reward_list(mt, rewards)
  local list = {}
  if type(rewards) ~= "table" then error("grpo: rewards must be a table of functions", 3) end
  if #rewards > 0 then
    for i, r in ipairs(rewards) do
      if type(r) ~= "table" or type(r.fn) ~= "function" then
        error(string.format("grpo: rewards[%d] must be { name =, fn = function, weight = }", i), 3)
      end
      list[i] = { name = r.name or ("reward" .. i), fn = r.fn, weight = r.weight or 1 }
    end
  else
    for name, fn in pairs(rewards) do
      if type(fn) ~= "function" then error(string.format("grpo: reward '%s' is not a function", tostring(name)), 3) end
      list[#list + 1] = { name = tostring(name), fn = fn, weight = 1 }
    end
    table.sort(list, function(a, b) return a.name < b.name end)
  end
  if #list == 0 then error("grpo: no reward functions", 3) end
  for _, r in ipairs(list) do
    if not is_finite(r.weight) then error(string.format("grpo: reward '%s' has weight %s", r.name, tostring(r.weight)), 3) end
    r.where = mt.where and mt.where(r.fn) or "?"
  end
  return list
end

-- Mean and standard deviation (Bessel's correction; 0 for one value) of xs[i..i+n-1].
local function mean_std(xs, i, n)
  local s = 0
  for k = i, i + n - 1 do s = s + xs[k] end
  local mean = s / n
  if n < 2 then return mean, 0 end
  local v = 0
  for k = i, i + n - 1 do v = v + (xs[k] - mean) ^ 2 end
  return mean, math.sqrt(v / (n - 1))
end

-- One reward function on one completion: a finite number, or an error that names it.
local function score(r, prompt, completion, record, which)
  local ok, v = pcall(r.fn, prompt, completion, record)
  -- the message starts at the reward's definition in the recipe
  if not ok then
    error(string.format("%s: grpo: reward '%s' failed on %s: %s", r.where, r.name, which, tostring(v)), 0)
  end
  if not is_finite(v) then
    error(string.format("%s: grpo: reward '%s' returned %s on %s: want a finite number", r.where, r.name,
                        type(v) == "number" and tostring(v) or type(v), which), 0)
  end
  return v
end

function M.rollouts(mt, cfg)
  for _, key in ipairs({ "model", "tokenizer", "prompts", "rewards" }) do
    if cfg[key] == nil then error("grpo.rollouts: cfg." .. key .. " is required", 2) end
  end
  local prompts = cfg.prompts
  if #prompts == 0 then error("grpo.rollouts: no prompts", 2) end
  for i, p in ipairs(prompts) do
    if type(p) ~= "table" or type(p.prompt) ~= "string" then
      error(string.format("grpo.rollouts: prompts[%d] must be { prompt = text, ... }", i), 2)
    end
  end
  local P = cfg.prompts_per_step or 4
  local G = cfg.group_size or 4
  if math.type(P) ~= "integer" or P < 1 then error("grpo.rollouts: prompts_per_step must be an integer >= 1", 2) end
  if math.type(G) ~= "integer" or G < 2 then
    error("grpo.rollouts: group_size must be an integer >= 2 (advantages compare a group's completions)", 2)
  end
  local mu = cfg.num_iterations or 1
  if math.type(mu) ~= "integer" or mu < 1 then error("grpo.rollouts: num_iterations must be an integer >= 1", 2) end
  local R = {
    cfg = cfg, rewards = reward_list(mt, cfg.rewards), P = P, G = G, N = #prompts, mu = mu,
    pending = nil, iteration = 0, -- the rollout in use and the optimizer steps taken on it
    seed = cfg.seed or 0, shuffle = cfg.shuffle ~= false, scale = cfg.scale_rewards ~= false,
    epoch = 1, position = 0, order = nil, order_epoch = nil,
  }

  local function order_of(epoch)
    if R.order_epoch ~= epoch then
      if R.shuffle then R.order = permutation(R.N, R.seed + epoch)
      else
        R.order = {}
        for i = 1, R.N do R.order[i] = i end
      end
      R.order_epoch = epoch
    end
    return R.order
  end

  -- One process, or each rank of a data-parallel job: a step's P prompts are shared out
  -- (rank r takes prompts r + 1, r + 1 + W, ...); a group stays on one rank, so its
  -- advantages need no exchange, and the loss sums over the ranks. Then every step takes
  -- P prompts (an epoch's remainder is left out) and P must be a multiple of W.
  R.rank = type(mt.rank) == "function" and mt.rank() or 0
  R.world = type(mt.world_size) == "function" and mt.world_size() or 1
  if R.world > 1 and (P % R.world ~= 0 or R.N < P) then
    error(string.format("grpo.rollouts: prompts_per_step %d must be a multiple of the %d ranks and at most the %d prompts",
                        P, R.world, R.N), 2)
  end
  if R.world > 1 and mu > 1 then
    -- rank 0 alone writes checkpoints, so the other ranks' rollouts in use would be lost
    error("grpo.rollouts: num_iterations > 1 is not supported in a data-parallel job", 2)
  end

  -- one batch per optimizer step: num_iterations of them per rollout
  function R:batches_per_epoch()
    if self.world > 1 then return self.N // self.P end
    return (self.N + self.P - 1) // self.P * self.mu
  end
  -- the rollout in use, kept in checkpoints by the trainer so that a run stopped between
  -- two optimizer steps on one rollout resumes on the same completions
  function R:state()
    if not self.pending or self.iteration >= self.mu then return nil end
    return { iteration = self.iteration, rows = self.pending.rows, info = self.pending.info }
  end
  function R:set_state(st)
    if st == nil then self.pending, self.iteration = nil, 0; return end
    if type(st) ~= "table" or math.type(st.iteration) ~= "integer" or type(st.rows) ~= "table" then
      error("grpo: the checkpoint's rollout state is malformed", 2)
    end
    self.pending, self.iteration = { rows = st.rows, info = st.info or {} }, st.iteration
  end
  function R:cursor() return { epoch = self.epoch, position = self.position } end
  function R:set_cursor(c)
    if math.type(c.epoch) ~= "integer" or c.epoch < 1 or math.type(c.position) ~= "integer" or
       c.position < 0 or c.position > self.N then
      error(string.format("grpo: cursor {epoch = %s, position = %s} does not fit %d prompts",
                          tostring(c.epoch), tostring(c.position), self.N), 2)
    end
    self.epoch, self.position = c.epoch, c.position
  end

  function R:next()
    if self.pending and self.iteration < self.mu then -- another optimizer step on the rollout
      self.iteration = self.iteration + 1
      return mt.rl_batch(self.pending.rows, { seq_len = self.cfg.seq_len }), self.pending.info
    end
    local full = self.world > 1 -- every step P prompts
    if self.position >= self.N or (full and self.N - self.position < self.P) then
      self.epoch, self.position = self.epoch + 1, 0
    end
    local order = order_of(self.epoch)
    local first = self.position
    local n = math.min(self.P, self.N - first)
    -- this process's prompts of the step: step index gi, the item
    local mine, picked = {}, {}
    for gi = 1, n do
      if (gi - 1) % self.world == self.rank then
        mine[#mine + 1] = gi
        picked[#picked + 1] = prompts[order[first + gi]]
      end
    end
    local nl = #mine
    -- local row (k - 1) * G + g + 1 is completion g of picked[k], whose seed is
    -- s0 + (mine[k] - 1) * G + g. A run of rows with consecutive seeds whose prompts share
    -- the system message is one batched mt.generate call (prompt j of a call samples
    -- with seed + j - 1), so every completion keeps its own seed.
    local s0 = self.seed + ((self.epoch - 1) * self.N + first) * G
    local function seed_of(row) return s0 + (mine[(row - 1) // G + 1] - 1) * G + (row - 1) % G end
    local function item_of(row) return picked[(row - 1) // G + 1] end
    local texts, infos = {}, {}
    local c = self.cfg
    c.model:set_training(false)
    local ok, err = pcall(function()
      local row = 1
      while row <= nl * G do
        local system = item_of(row).system
        local list, last = {}, row
        while last <= nl * G and item_of(last).system == system and seed_of(last) == seed_of(row) + (last - row) do
          list[#list + 1] = item_of(last).prompt
          last = last + 1
        end
        local out, info = mt.generate(c.model, c.tokenizer, list, {
          system = system, template = c.template, stop = c.stop,
          max_new_tokens = c.max_new_tokens or 128, temperature = c.temperature or 1.0,
          top_p = c.top_p or 1.0, top_k = c.top_k or 0, batch = c.generate_batch or 16, ids = true,
          seed = seed_of(row), int8 = c.int8 == true,
        })
        for j = 1, #list do texts[row + j - 1], infos[row + j - 1] = out[j], info[j] end
        row = last
      end
    end)
    c.model:set_training(true)
    if not ok then error(err, 0) end
    self.position = first + n
    n = nl

    -- rewards, per function and weighted
    local total, per, rw = {}, {}, self.rewards
    for k = 1, #rw do per[k] = {} end
    for row = 1, n * G do
      local i = (row - 1) // G + 1
      local which = string.format("completion %d of prompt %d (position %d, epoch %d)", (row - 1) % G + 1,
                                  order[first + mine[i]], first + mine[i], self.epoch)
      local sum = 0
      for k, r in ipairs(rw) do
        local v = score(r, picked[i].prompt, texts[row], picked[i].record, which)
        per[k][row] = v
        sum = sum + r.weight * v
      end
      total[row] = sum
    end
    -- group-normalised advantages
    local metrics, adv, std_sum, zero_std = {}, {}, 0, 0
    for i = 1, n do
      local at = (i - 1) * G + 1
      local mean, std = mean_std(total, at, G)
      std_sum = std_sum + std
      if std == 0 then zero_std = zero_std + 1 end
      for row = at, at + G - 1 do
        adv[row] = self.scale and (total[row] - mean) / (std + 1e-4) or total[row] - mean
      end
    end
    local rows, rows_n, tokens, targets, clipped, length = {}, n * G, 0, 0, 0, 0
    for row = 1, rows_n do
      local info = infos[row]
      rows[row] = { prompt_ids = info.prompt_ids, ids = info.ids, logps = info.logps, advantage = adv[row] }
      tokens = tokens + #info.prompt_ids + #info.ids
      targets = targets + #info.ids
      length = length + #info.ids
      if info.reason == "length" then clipped = clipped + 1 end
    end
    metrics.reward = mean_std(total, 1, rows_n)
    metrics.reward_std = std_sum / n
    metrics.frac_reward_zero_std = zero_std / n
    for k, r in ipairs(rw) do
      local m, s = mean_std(per[k], 1, rows_n)
      metrics["rewards/" .. r.name .. "/mean"] = m
      metrics["rewards/" .. r.name .. "/std"] = s
    end
    metrics["completions/mean_length"] = length / rows_n
    metrics["completions/clipped_ratio"] = clipped / rows_n
    local records = {}
    for row = 1, math.min(c.samples_logged or 2, rows_n) do
      local i = (row - 1) // G + 1
      local rec = { prompt = picked[i].prompt, completion = texts[row], reward = total[row], advantage = adv[row],
                    rewards = {} }
      for k, r in ipairs(rw) do rec.rewards[r.name] = per[k][row] end
      records[row] = rec
    end
    local batch = mt.rl_batch(rows, { seq_len = c.seq_len })
    local info = {
      examples = rows_n, rows = rows_n, tokens = tokens, targets = targets, epoch = self.epoch,
      epoch_end = self.position >= self.N, metrics = metrics, records = records,
    }
    -- the rollout in use: its info without the samples, which are logged once, now
    local again = {}
    for k, v in pairs(info) do if k ~= "records" then again[k] = v end end
    self.pending, self.iteration = { rows = rows, info = again }, 1
    return batch, info
  end

  return R
end

return M
