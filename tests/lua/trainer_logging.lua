-- Logging: metrics.jsonl lines parse as JSON, loss.svg is well-formed, progress output.
local fake = require("trainer_fake")
local trainer = require("moontune.trainer")
local eq = fake.eq

-- A tiny JSON parser: enough to check the shape of every line.
local function parse(s)
  local i = 1
  local function ws() i = s:find("[^ \t\r\n]", i) or #s + 1 end
  local value
  local function str()
    assert(s:sub(i, i) == '"', "string expected at " .. i)
    local out, j = {}, i + 1
    while true do
      local c = s:sub(j, j)
      if c == "" then error("unterminated string") end
      if c == '"' then break end
      if c == "\\" then
        local e = s:sub(j + 1, j + 1)
        if e == "u" then out[#out + 1] = utf8.char(tonumber(s:sub(j + 2, j + 5), 16)); j = j + 6
        else out[#out + 1] = ({ n = "\n", r = "\r", t = "\t", ['"'] = '"', ["\\"] = "\\", ["/"] = "/" })[e]; j = j + 2 end
      else
        assert(c:byte() >= 32, "control character in string")
        out[#out + 1] = c; j = j + 1
      end
    end
    i = j + 1
    return table.concat(out)
  end
  function value()
    ws()
    local c = s:sub(i, i)
    if c == "{" then
      local t = {}
      i = i + 1; ws()
      if s:sub(i, i) == "}" then i = i + 1; return t end
      while true do
        ws(); local k = str(); ws()
        assert(s:sub(i, i) == ":", "':' expected at " .. i); i = i + 1
        t[k] = value(); ws()
        local d = s:sub(i, i); i = i + 1
        if d == "}" then return t end
        assert(d == ",", "',' expected")
      end
    elseif c == "[" then
      local t = {}
      i = i + 1; ws()
      if s:sub(i, i) == "]" then i = i + 1; return t end
      while true do
        t[#t + 1] = value(); ws()
        local d = s:sub(i, i); i = i + 1
        if d == "]" then return t end
        assert(d == ",", "',' expected")
      end
    elseif c == '"' then return str()
    elseif s:sub(i, i + 3) == "true" then i = i + 4; return true
    elseif s:sub(i, i + 4) == "false" then i = i + 5; return false
    elseif s:sub(i, i + 3) == "null" then i = i + 4; return nil
    else
      local num = s:match("^-?%d+%.?%d*[eE]?[-+]?%d*", i)
      assert(num and #num > 0, "value expected at " .. i .. " in " .. s)
      i = i + #num
      return assert(tonumber(num))
    end
  end
  local v = value(); ws()
  assert(i == #s + 1, "trailing text in " .. s)
  return v
end

local out = {}
local sink = { write = function(self, ...) for _, x in ipairs({ ... }) do out[#out + 1] = x end end, flush = function() end }
local losses = { 2.5, 2.25, 2.0, 0 / 0, 1.5, 1.25, 1.0, 0.9 }
local mt = fake.new{ per_epoch = 4, losses = losses, evals = { 2.0, 1.7, 1.5, 1.4 } }
local r = trainer.run(fake.cfg(mt, { epochs = 2, eval_every = 2, eval_examples = "h", plot = true,
  output = sink, is_tty = false, log_every = 1, recipe = 'a "quoted"\n\trecipe' }), mt)
eq(r.steps, 8, "steps")

local f = assert(io.open(OUT_DIR .. "/metrics.jsonl"))
local steps, evals, ckpts = 0, 0, 0
for line in f:lines() do
  local rec = parse(line)
  assert(type(rec) == "table", "object per line")
  if rec.type == "step" then
    steps = steps + 1
    assert(math.type(rec.step) == "integer" and rec.lr and rec.grad_norm and rec.tokens_per_second, "step fields: " .. line)
    if rec.step == 4 then
      eq(rec.loss, nil, "NaN is written as null")
      eq(rec.skipped, true, "skipped flag")
    else
      eq(rec.loss, losses[rec.step], "loss round-trips exactly")
      eq(rec.skipped, false, "not skipped")
    end
  elseif rec.type == "eval" then
    evals = evals + 1
    assert(rec.eval_loss and rec.eval_perplexity and rec.eval_tokens_per_second, "eval fields: " .. line)
  elseif rec.type == "checkpoint" then
    ckpts = ckpts + 1
  else
    error("unknown record type in " .. line)
  end
end
f:close()
eq(steps, 8, "a line per step")
eq(evals, 4, "a line per evaluation")
eq(ckpts, 1, "final checkpoint")

-- JSON escaping
local enc = mt.json_encode({ s = 'a "q"\n\1', n = 0.1, i = 3, b = true, l = { 1, 2 } })
local back = parse(enc)
eq(back.s, 'a "q"\n\1', "string escapes")
eq(back.n, 0.1, "%.17g round-trip")
eq(back.i, 3, "integer")
eq(back.l[2], 2, "array")

-- plain log lines and the summary
local text = table.concat(out)
assert(not text:find("\r", 1, true), "no carriage returns off a terminal")
assert(text:find("step 1/8 epoch 1 loss 2.5000", 1, true), "plain step line:\n" .. text)
assert(text:find("skipped: non-finite", 1, true), "skipped step reported")
assert(text:find("eval step 2:", 1, true), "eval line")
assert(text:find("best eval_loss 1.4 at step 8", 1, true), "summary best:\n" .. text)
assert(text:find("outputs in " .. OUT_DIR, 1, true), "summary outputs")

-- loss.svg: well-formed, two polylines
local sf = assert(io.open(OUT_DIR .. "/loss.svg"))
local svg = sf:read("a")
sf:close()
assert(svg:sub(1, 4) == "<svg", "starts with <svg")
local polys = 0
for pts in svg:gmatch('<polyline[^>]-points="([^"]*)"') do
  polys = polys + 1
  assert(#pts > 0, "non-empty polyline")
end
eq(polys, 2, "two polylines")
local stack = {}
for close, name, selfclose in svg:gmatch("<(/?)([%w]+)[^>]-(/?)>") do
  if close == "/" then
    eq(table.remove(stack), name, "closing tag")
  elseif selfclose ~= "/" then
    stack[#stack + 1] = name
  end
end
eq(#stack, 0, "all tags closed")
assert(not svg:gsub("&%a+;", ""):find("&", 1, true), "no bare &")

-- progress bar on a terminal
out = {}
local mt2 = fake.new{ per_epoch = 4 }
trainer.run(fake.cfg(mt2, { epochs = 1, output = sink, is_tty = true }), mt2)
text = table.concat(out)
assert(text:find("\r[#####...............] 1/4 loss", 1, true), "progress bar:\n" .. text)
assert(text:find("ETA", 1, true) and text:find("tok/s", 1, true) and text:find("lr 1.00e-01", 1, true), "bar fields")
assert(text:find("\ntrained 4 steps of 4", 1, true), "summary on its own line")

-- progress = false on a terminal: plain lines
out = {}
local mt3 = fake.new{ per_epoch = 4 }
trainer.run(fake.cfg(mt3, { epochs = 1, output = sink, is_tty = true, progress = false }), mt3)
assert(not table.concat(out):find("\r", 1, true), "progress = false")

-- the plot with an empty eval series still has two polylines
local plot = require("moontune.plot")
local t = plot.loss_svg_text({ { step = 1, loss = 1 } }, {})
local n = 0
for _ in t:gmatch("<polyline") do n = n + 1 end
eq(n, 2, "two polylines with one point")
