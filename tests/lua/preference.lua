-- Preference pairs end to end on tiny_chat: records through the chat template into
-- pairs, batches of rows 2i/2i+1, the split, the reference pass, DPO training steps with
-- TRL's metrics, held-out evaluation through the loss, and the refusals.
local mt = require("moontune")
local pref = require("moontune.preference")
local PLUGINS = { paths = { BUILD_DIR .. "/plugins" } }
local MODEL = FIXTURE_DIR .. "/tiny_chat"
local DATA = FIXTURE_DIR .. "/data/tiny_prefs.jsonl"

local function check(cond, msg) if not cond then error(msg, 2) end end
local function raises(f, needle)
  local ok, err = pcall(f)
  check(not ok, "expected an error with: " .. needle)
  check(tostring(err):find(needle, 1, true), "error '" .. tostring(err) .. "' lacks: " .. needle)
end

local tok = mt.tokenizer(MODEL)
local pairs_ex = mt.examples(DATA, tok, { format = "preference", seq_len = 128 })
check(pairs_ex:paired(), "paired")
check(pairs_ex:count() == 6, "6 pairs, found " .. pairs_ex:count())
local st = pairs_ex:stats()
check(st.pairs == 6 and st.examples == 12, "stats: " .. st.pairs .. " pairs, " .. st.examples .. " sequences")

-- rows 2i and 2i+1: the same prompt, then each reply; targets on the replies only
local batcher = mt.batcher(pairs_ex, { batch = 4, seq_len = 128, shuffle = false })
check(batcher:batches_per_epoch() == 3, "3 batches of 2 pairs")
local batch, info = batcher:next()
check(info.pairs == 2 and info.examples == 4, "pairs in the first batch: " .. info.pairs)
local B, T = batch:shape()
-- as wide as the longest sequence of the batch, not seq_len: the padding columns go
check(B == 4 and T < 128 and T >= 90, "shape " .. B .. " x " .. T)
local wide = mt.batcher(pairs_ex, { batch = 4, seq_len = 128, shuffle = false, narrow = false })
local wide_batch = wide:next()
local _, T_wide = wide_batch:shape()
check(T_wide == 128, "narrow = false keeps seq_len")
local wt = wide_batch:tokens()
for r = 0, 3 do
  for t = 1, T do check(wt[r * 128 + t] == batch:tokens()[r * T + t], "narrowed batch: the same tokens") end
end
wide:close()
local toks, tgts = batch:tokens(), batch:targets()
for pair = 0, 1 do
  local c, r = 2 * pair * T, (2 * pair + 1) * T
  local first_c, first_r
  for t = 1, T do
    if not first_c and tgts[c + t] >= 0 then first_c = t end
    if not first_r and tgts[r + t] >= 0 then first_r = t end
  end
  check(first_c and first_c == first_r, "both replies start after the same prompt")
  for t = 1, first_c do check(toks[c + t] == toks[r + t], "shared prompt token " .. t) end
  local differs = false
  for t = first_c, T do if tgts[c + t] ~= tgts[r + t] then differs = true end end
  check(differs, "the replies differ")
end
batcher:close()
raises(function() mt.batcher(pairs_ex, { batch = 3 }) end, "even batch")
raises(function() mt.batcher(pairs_ex, { batch = 4, pack = true }) end, "pack = false")
raises(function() mt.batcher(pairs_ex, { batch = 4, share_prefix = true }) end, "share_prefix needs packed single examples")

-- the split keeps pairs whole
local a, b = pairs_ex:split(0.34, 3)
check(a:count() + b:count() == 6 and b:count() == 2 and a:paired() and b:paired(), "split of pairs")

-- rejected_until = "first_difference": each rejected row's targets end at the first one
-- that differs from its chosen row's; the chosen rows are unchanged
local cut = mt.examples(DATA, tok, { format = "preference", seq_len = 128, rejected_until = "first_difference" })
check(cut:count() == 6, "the same pairs when the rejected replies are cut")
local whole_b = mt.batcher(pairs_ex, { batch = 12, seq_len = 128, shuffle = false, narrow = false })
local cut_b = mt.batcher(cut, { batch = 12, seq_len = 128, shuffle = false, narrow = false })
local wb, cb = whole_b:next(), cut_b:next()
local wtg, ctg = wb:targets(), cb:targets()
local shortened = 0
for pair = 0, 5 do
  local c, r = 2 * pair * 128, (2 * pair + 1) * 128
  for t = 1, 128 do check(ctg[c + t] == wtg[c + t], "the chosen row is whole") end
  local first_diff
  for t = 1, 128 do
    if wtg[r + t] >= 0 and wtg[r + t] ~= wtg[c + t] then first_diff = t; break end
  end
  check(first_diff, "pair " .. pair .. ": the replies differ")
  for t = 1, 128 do
    local want = t <= first_diff and wtg[r + t] or -100
    check(ctg[r + t] == want, string.format("pair %d, column %d: target %d, want %d", pair, t, ctg[r + t], want))
  end
  for t = first_diff + 1, 128 do if wtg[r + t] >= 0 then shortened = shortened + 1; break end end
end
check(shortened > 0, "some rejected reply was longer than its first difference")
whole_b:close()
cut_b:close()
raises(function() mt.examples(DATA, tok, { format = "preference", rejected_until = "middle" }) end,
       "option 'rejected_until': expected \"end\" or \"first_difference\"")

-- pairs from a model's mistakes: failed answers only, blank ones and repeats left out
local items = {
  { system = "S", prompt = "p1", reference = "r1" },
  { prompt = "p2", reference = "r2" },
  { prompt = "p3", reference = "r3" },
  { prompt = "p4", reference = "r4" },
}
local seen = {}
local recs = pref.pairs_from_mistakes(items, { outputs = { "w1", "r2", "  ", "w4" },
                                              passed = { false, true, false, false } }, seen)
check(#recs == 2, "two mistakes, found " .. #recs)
check(recs[1].chosen == "r1" and recs[1].rejected == "w1" and #recs[1].prompt == 2 and
      recs[1].prompt[1].role == "system" and recs[1].prompt[2].content == "p1", "pair 1: system, prompt, replies")
check(recs[2].rejected == "w4" and #recs[2].prompt == 1, "pair 2: no system message")
local again = pref.pairs_from_mistakes(items, { outputs = { "w1", "x", "y", "w4b" },
                                               passed = { false, false, false, false } }, seen)
check(#again == 3 and again[1].rejected == "x" and again[3].rejected == "w4b", "a repeated mistake is kept once")

-- bad preference data names file and line
local bad = TMP .. "/bad.jsonl"
local f = assert(io.open(bad, "w"))
f:write('{"prompt": "Schedule roadmap.", "chosen": "yes", "rejected": "no"}\n')
f:write('{"prompt": "Schedule roadmap.", "chosen": "same", "rejected": "same"}\n')
f:close()
raises(function() mt.examples(bad, tok, { seq_len = 64 }) end, "bad.jsonl:2: fields 'chosen' and 'rejected'")
local skipped = mt.examples(bad, tok, { seq_len = 64, on_bad_record = "skip" })
check(skipped:count() == 1 and skipped:stats().bad_skipped == 1, "the bad pair skipped")
raises(function() mt.examples(DATA, tok, { seq_len = 24, truncation = "drop" }) end,
       "tiny_prefs.jsonl:1: the preference pair needs")
local short = mt.examples(DATA, tok, { seq_len = 24, truncation = "drop", on_bad_record = "skip" })
check(short:count() == 0 and short:stats().dropped_too_long == 6, "all pairs too long, skipped")
raises(function() mt.examples(DATA, tok, { seq_len = 128, train_on_inputs = true }) end,
       "train_on_inputs does not apply to preference pairs")

-- a model with a new LoRA adapter: the reference is the model with it disabled
local model = mt.model(MODEL)
local lora = mt.plugin("adapter", "lora", { r = 4, alpha = 8, target_modules = "all-linear", seed = 1 }, PLUGINS)
model:attach(lora)
model:plan(4, 128)
check(pref.reference_mode({ reference = "auto" }, model, false) == "adapters_off", "auto: adapters off")
check(pref.reference_mode({ reference = "auto" }, model, true) == "precomputed", "auto: continuing")
local dpo = mt.plugin("loss", "dpo", { beta = 0.5 }, PLUGINS)
local ce = mt.plugin("loss", "cross_entropy", {}, PLUGINS)
local opt = mt.plugin("optimizer", "adamw", { weight_decay = 0.0 }, PLUGINS)

-- before any step LoRA's B = 0: policy = reference, every reward 0, loss log 2
local e0 = mt.evaluate(model, pairs_ex, { loss = dpo, batch = 4 })
check(math.abs(e0.loss - math.log(2)) < 1e-6, "initial DPO loss log 2: " .. e0.loss)
check(e0.tokens == 6 and e0.perplexity ~= e0.perplexity, "6 pairs evaluated, no perplexity")
check(e0.metrics["rewards/accuracies"] == 0 and math.abs(e0.metrics["rewards/margins"]) < 1e-9, "rewards 0")
raises(function() mt.evaluate(model, pairs_ex) end, "tiny_prefs.jsonl:1: evaluation: the set holds preference pairs")

-- the reference computed once equals the adapters-off pass: the same loss
local scratch = mt.examples(DATA, tok, { seq_len = 128 })
check(scratch:ref_logps() == nil, "no reference before the pass")
mt.reference_logps(model, scratch, { batch = 4 })
local lp = scratch:ref_logps()
check(#lp == 12, "a reference per sequence")
for i = 1, 12 do check(lp[i] < 0, "log-probability < 0") end
local e1 = mt.evaluate(model, scratch, { loss = dpo, batch = 4 })
check(math.abs(e1.loss - e0.loss) < 1e-6, "precomputed reference: the same loss")

-- rejected replies cut at the first difference are prefixes of their chosen rows: the
-- pass runs the chosen rows alone and scores both from them, with the values of the
-- plain pass (every row through the forward) up to rounding; whole rejected replies
-- part from the chosen ones before their end and go through the plain pass
local function cut_pairs() return mt.examples(DATA, tok, { seq_len = 128, rejected_until = "first_difference" }) end
local cut_shared, cut_plain = cut_pairs(), cut_pairs()
check(mt.reference_logps(model, cut_shared, { batch = 4 }) == 6, "every rejected reply scored from its chosen row")
check(mt.reference_logps(model, cut_plain, { batch = 4, share_prefix = false }) == 0, "share_prefix = false")
check(mt.reference_logps(model, cut_pairs(), { batch = 6 }) == 6, "batches of 3 pairs: an odd number of chosen rows")
local lp_shared, lp_plain = cut_shared:ref_logps(), cut_plain:ref_logps()
for i = 1, 12 do
  check(math.abs(lp_shared[i] - lp_plain[i]) <= 1e-5 * math.max(1, math.abs(lp_plain[i])),
        string.format("sequence %d: shared %.8f, plain %.8f", i, lp_shared[i], lp_plain[i]))
end
for i = 1, 12, 2 do
  -- the chosen rows are the whole pairs' chosen rows; the cut rejected ones score less
  check(math.abs(lp_shared[i] - lp[i]) <= 1e-5 * math.max(1, math.abs(lp[i])), "chosen " .. i .. " as uncut")
  check(lp_shared[i + 1] > lp[i + 1], "rejected " .. i + 1 .. " cut: fewer tokens, higher log-probability")
end
check(mt.reference_logps(model, mt.examples(DATA, tok, { seq_len = 128 }), { batch = 4 }) == 0,
      "whole rejected replies: the plain pass")
local e_cut = mt.evaluate(model, cut_shared, { loss = dpo, batch = 4 })
check(math.abs(e_cut.loss - math.log(2)) < 1e-6, "shared reference = the policy at B = 0: loss log 2, " .. e_cut.loss)

-- training steps: the loss falls, the metrics come back; cross-entropy refuses pairs
local tb = mt.batcher(pairs_ex, { batch = 4, seq_len = 128, seed = 5 })
local first, last
for step = 1, 12 do
  local bt = tb:next()
  local r = mt.train_step(model, dpo, opt, { bt }, { lr = 2e-2, step = step })
  check(not r.skipped, "step " .. step .. " skipped")
  check(type(r.metrics["rewards/margins"]) == "number" and r.tokens == 2, "step metrics")
  first = first or r.loss
  last = r.loss
  if step == 1 then
    raises(function() mt.train_step(model, ce, opt, { bt }, { lr = 1e-3, step = 2 }) end,
           "cross_entropy: the batch holds preference pairs")
  end
end
local e2 = mt.evaluate(model, pairs_ex, { loss = dpo, batch = 4 })
check(e2.loss < e0.loss and e2.metrics["rewards/accuracies"] > 0.5,
      string.format("DPO learned the pairs: loss %.4f -> %.4f, accuracy %.2f", e0.loss, e2.loss,
                    e2.metrics["rewards/accuracies"]))
-- the SFT data path refuses preference examples in an SFT loss batch, and set_ref_logps checks
raises(function() scratch:set_ref_logps({ 1, 2 }) end, "2 values for 12 sequences")
local probe = pref.pair_accuracy(mt, model, scratch, { batch = 4 })
check(probe.pairs == 6 and probe.accuracy >= 0 and probe.accuracy <= 1, "pair accuracy")
return "ok"
