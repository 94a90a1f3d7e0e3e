-- tests/lua/jinja.lua — moontune's Jinja engine (lua/moontune/jinja.lua) and the chat
-- templates built on it (chat.jinja in lua/moontune/chat.lua):
--
--   1. parity: every template of tests/fixtures/jinja (real models' chat_template
--      strings, see manifest.json) on every conversation of reference.json renders
--      byte for byte what transformers' apply_chat_template rendered
--      (tests/parity/make_jinja_reference.py); expected errors are errors here too,
--      raise_exception ones with the same message;
--   2. the sandbox: budget, output cap, no way out to Lua, errors with positions;
--   3. spans: for the hand-written families of chat.lua, the model's own template
--      through the engine gives the same text and the same training spans on every
--      conversation of tests/fixtures/chat/reference.json, and the quickstart data
--      renders and masks the same through SmolLM2's template as through `smollm2`.
--
-- Run by ctest `jinja_templates` as `moontune run tests/lua/jinja.lua --unsafe` (it
-- reads fixture files); also runs under a plain `lua5.4 tests/lua/jinja.lua`.

local script = debug.getinfo(1, "S").source:gsub("^@", "")
local root = script:match("^(.*)/tests/lua/[^/]*$") or "."
package.path = root .. "/lua/?.lua;" .. package.path

local jinja = require("moontune.jinja")
local chat = require("moontune.chat")

local failures = {}
local checks = 0
local function check(ok, what)
  checks = checks + 1
  if not ok then failures[#failures + 1] = what end
end

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

local function show(s)
  if s == nil then return "nil" end
  s = tostring(s)
  if #s > 400 then s = s:sub(1, 400) .. "..." end
  return string.format("%q", s)
end

-- ---------------------------------------------------------------------------
-- 1. parity with transformers

local fix = root .. "/tests/fixtures/jinja/"
local manifest = assert(jinja.json_decode(read(fix .. "manifest.json")))
local ref = assert(jinja.json_decode(read(fix .. "reference.json")))
local now = ref.map.now

local templates = {}
for _, m in ipairs(manifest.items) do
  local name = m.map.name
  local src = read(fix .. m.map.file)
  local tpl, err = jinja.compile(src, { name = name })
  check(tpl ~= nil, "compile " .. name .. ": " .. tostring(err))
  templates[name] = tpl or false
end

local per_template = {}
local passed, total = 0, 0
for _, c in ipairs(ref.map.cases.items) do
  local m = c.map
  local name = m.template
  total = total + 1
  local tpl = templates[name]
  local ok, why = false, "template did not compile"
  if tpl then
    local vars = {
      messages = m.messages,
      tools = m.tools or jinja.none,
      documents = m.documents or jinja.none,
      add_generation_prompt = m.add_generation_prompt,
      bos_token = m.bos_token,
      eos_token = m.eos_token,
    }
    if m.kwargs then
      for _, k in ipairs(m.kwargs.keys) do vars[k] = m.kwargs.map[k] end
    end
    local text, err, info = tpl:render(vars, { now = now })
    if m.text then
      ok = text == m.text
      if not ok then
        why = text and ("got " .. show(text) .. "\n    want " .. show(m.text)) or ("error " .. tostring(err))
      end
    else
      local want = m.error.map
      if text then
        why = "rendered " .. show(text) .. " where transformers raised " .. want.kind .. ": " .. want.message
      elseif want.kind == "raise" then
        ok = info.kind == "raise" and info.message == want.message
        why = "error " .. tostring(err) .. "; want raise_exception(" .. show(want.message) .. ")"
      else
        ok = true
      end
    end
  end
  per_template[name] = per_template[name] or { pass = 0, total = 0 }
  per_template[name].total = per_template[name].total + 1
  if ok then
    passed = passed + 1
    per_template[name].pass = per_template[name].pass + 1
  end
  check(ok, "parity " .. name .. "/" .. m.case .. ": " .. why)
end
local n_templates, n_full = 0, 0
for _, t in pairs(per_template) do
  n_templates = n_templates + 1
  if t.pass == t.total then n_full = n_full + 1 end
end
print(string.format("jinja parity: %d/%d cases byte for byte, %d/%d templates fully", passed, total, n_full, n_templates))
check(n_templates >= 25, "at least 25 templates in the parity fixtures")

-- ---------------------------------------------------------------------------
-- 2. the sandbox and errors

local function render(src, vars, opts)
  return jinja.render(src, vars or {}, opts)
end

local function expect_error(src, vars, kind, pattern, opts)
  local text, err, info = render(src, vars, opts)
  check(text == nil, "expected an error from " .. show(src) .. ", got " .. show(text))
  if text == nil then
    check(info and info.kind == kind, "error kind of " .. show(src) .. ": want " .. kind .. ", got "
      .. tostring(info and info.kind) .. " (" .. tostring(err) .. ")")
    if pattern then
      check(err:find(pattern) ~= nil, "error of " .. show(src) .. ": " .. show(err) .. " lacks " .. show(pattern))
    end
  end
  return err, info
end

local function expect(src, vars, want, opts)
  local text, err = render(src, vars, opts)
  check(text == want, "render " .. show(src) .. ": got " .. show(text or err) .. ", want " .. show(want))
end

-- budget: an endless loop stops with a clear error, quickly
expect_error("{% for x in range(10**9) %}{% endfor %}", nil, "limit", "more than %d+ steps")
expect_error("{% for x in range(10**9) %}{{ x }}{% endfor %}", nil, "limit", nil, { max_steps = 10000 })
expect_error("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", nil, "limit", "nested more than")
-- long lists and splits are counted before they are built
expect_error("{{ ([1] * 100000000) | length }}", nil, "limit", "steps")
expect_error("{{ ('a,' * 5000000).split(',') | length }}", nil, "limit", "steps")
expect_error("{% for c in 'x' * 16000000 %}{% endfor %}", nil, "limit", "steps")
-- output and string size caps
expect_error("{{ 'a' * 100000000 }}", nil, "limit", "bytes")
expect_error("{% for i in range(100) %}{{ 'x' * 1000 }}{% endfor %}", nil, "limit", "output exceeds",
  { max_output = 10000 })
expect_error("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", nil, "limit", nil)
-- no way out of the data: Python dunder attributes and Lua internals are undefined
expect("{{ ''.__class__ }}|{{ messages.__class__ }}|{{ ''.__class__ is defined }}", { messages = {} }, "||False")
expect("{{ x._G }}|{{ _G }}|{{ string }}|{{ os }}|{{ require }}", { x = { a = 1 } }, "||||")
expect("{{ (messages|first).__init__ }}", { messages = { { role = "user" } } }, "")
expect_error("{{ ''.__class__.__mro__[1] }}", nil, "undefined")
expect_error("{{ messages.append(1) }}", { messages = {} }, "undefined", "unsafe")
expect_error("{{ d.update({'a': 2}) }}", { d = { a = 1 } }, "undefined", "unsafe")
expect_error("{% set ns = namespace() %}{% set ns._x = 1 %}", nil, "security")
expect("{{ 'abc'.upper.__self__ }}", nil, "")
-- errors name the position (line:column) and what failed
local err, info = expect_error("line one\n{{ 1 +* 2 }}", nil, "syntax")
check(info and info.line == 2 and info.col == 7, "syntax error position: " .. tostring(err))
err, info = expect_error("{% for m in messages %}\n  {{ m.content.strip() }}\n{% endfor %}", { messages = { 5 } },
  "undefined", "has no attribute 'content'")
check(info and info.line == 2, "runtime error line: " .. tostring(err))
err, info = expect_error("{% if x %}\nunclosed", nil, "syntax", "endif")
check(info and info.line == 1 and info.col == 4, "unclosed block points at its opening: " .. tostring(err))
expect_error("{{ raise_exception('No tools, please') }}", nil, "raise", "No tools, please")
expect_error("{% include 'x' %}", nil, "syntax", "not supported")
expect_error("{{ foo(1) }}", nil, "undefined", "'foo' is undefined")
expect_error("{{ 1 + 'a' }}", nil, "type", "unsupported operand")
expect_error("{{ x | nosuchfilter }}", nil, "syntax", "no filter named")
expect_error("{{ 'a' ", nil, "syntax", "missing")
-- tojson keeps the key order of JSON input and Python's separators
local tools = assert(jinja.json_decode('[{"type": "function", "function": {"name": "f", "parameters": {"z": 1, "a": [1.0, 2.5e-7, null, true, "é\\n"]}}}]'))
expect("{{ tools[0] | tojson }}", { tools = tools },
  '{"type": "function", "function": {"name": "f", "parameters": {"z": 1, "a": [1.0, 2.5e-07, null, true, "é\\n"]}}}')
expect("{{ tools[0].function.parameters | tojson(indent=2) }}", { tools = tools },
  '{\n  "z": 1,\n  "a": [\n    1.0,\n    2.5e-07,\n    null,\n    true,\n    "é\\n"\n  ]\n}')
expect("{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}", nil, '{"a": 2, "b": 1}')
-- Python semantics the templates rely on
expect("{{ 7 / 2 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ 2 ** 10 }} {{ 1.0 }} {{ 'ab' * 2 }}", nil, "3.5 3 -4 1 1024 1.0 abab")
expect("{{ [] or 'e' }}{{ {} and 'x' }}{{ '' if '' else 'empty' }}", nil, "e{}empty")
expect("{{ messages[1:] | length }} {{ messages[-1].content }} {{ (messages | map(attribute='role') | list)[::-1] }}",
  { messages = { { role = "system", content = "s" }, { role = "user", content = "u" } } }, "1 u ['user', 'system']")
expect("{% for k, v in d.items() %}{{ loop.index }}{{ k }}={{ v }}{% if not loop.last %}, {% endif %}{% endfor %}",
  { d = assert(jinja.json_decode('{"b": 1, "a": 2}')) }, "1b=1, 2a=2")
expect("{{ 'a b  c'.split() }} {{ 'a,b'.split(',') }} {{ ' x '.strip() }}|{{ 'xxhixx'.strip('x') }} {{ 'hi'.startswith(('a', 'h')) }}",
  nil, "['a', 'b', 'c'] ['a', 'b'] x|hi True")
expect("{{ x is defined }} {{ none is none }} {{ 3 is odd }} {{ 4 is divisibleby 2 }} {{ 'a' is string }} {{ {} is mapping }}",
  nil, "False True True True True True")
expect("{{ strftime_now('%d %b %Y') }}", nil, "26 Jul 2024", { now = 1721995200 })
expect("  {% if true %}\n  kept\n  {% endif %}\n", nil, "  kept\n")
expect("{%- if true -%}\n  a  \n{%- endif %}  b{# c #}\n", nil, "a  b")

-- ---------------------------------------------------------------------------
-- 3. spans: the model's own template through the engine against chat.lua

local chat_ref = assert(jinja.json_decode(read(root .. "/tests/fixtures/chat/reference.json")))
local known = {}
for _, k in ipairs(chat_ref.map.templates.map.known.items) do known[k.map.family] = k.map.template end
local span_cases, span_pass = 0, 0
for _, c in ipairs(chat_ref.map.cases.items) do
  local m = c.map
  local family = m.family
  if family ~= "alpaca" then -- alpaca has no Jinja template (chat.lua documents it)
    span_cases = span_cases + 1
    local messages = jinja.to_lua(m.messages)
    local opts = jinja.to_lua(m.options)
    local t1, s1 = chat[family](messages, opts)
    local render = chat.jinja(known[family], { name = family })
    local ok2, t2, s2 = pcall(render, messages, opts)
    local same = ok2 and t1 == t2 and #s1 == #s2
    if same then
      for i = 1, #s1 do
        if s1[i][1] ~= s2[i][1] or s1[i][2] ~= s2[i][2] then same = false end
      end
    end
    if same then span_pass = span_pass + 1 end
    local got = {}
    if ok2 and type(s2) == "table" then
      for i, s in ipairs(s2) do got[i] = s[1] .. "-" .. s[2] end
    end
    local want = {}
    for i, s in ipairs(s1) do want[i] = s[1] .. "-" .. s[2] end
    check(same, string.format("spans %s/%s: jinja %s [%s], chat.lua [%s]", family, m.variant,
      ok2 and "" or ("error " .. tostring(t2)), table.concat(got, " "), table.concat(want, " ")))
  end
end
print(string.format("jinja spans: %d/%d chat fixture cases equal to the hand-written templates", span_pass, span_cases))

-- "auto" keeps the hand-written function for these templates (with the family's own
-- BOS/EOS, as the tokenizer gives them), and "jinja" forces the engine
do
  local specials = {}
  for _, c in ipairs(chat_ref.map.cases.items) do
    local o = c.map.options
    specials[c.map.family] = { o and o.map.bos, o and o.map.eos }
  end
  for family, template in pairs(known) do
    if family ~= "alpaca" then
      local sp = specials[family] or {}
      local render, resolved = chat.resolve("auto", template, sp[1], sp[2])
      check(render == chat[family] and resolved == family,
        "auto on " .. family .. "'s template resolves to " .. tostring(resolved))
      local _, forced = chat.resolve("jinja", template, sp[1], sp[2])
      check(forced == "jinja", "jinja forces the engine for " .. family)
    end
  end
  local r, name = chat.resolve("auto", read(fix .. "templates/axolotl_gemma3.jinja"), "<bos>", "<eos>")
  check(type(r) == "function" and name == "jinja", "auto on Gemma 3 uses the engine: " .. tostring(name))
  -- a ChatML-looking template that differs from the hand-written chatml (it trims
  -- contents) is detected as chatml but rendered by the engine
  local trimmed = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
  check(chat.detect(trimmed) == "chatml", "the trimming template looks like chatml")
  local _, name2 = chat.resolve("auto", trimmed, "<s>", "</s>")
  check(name2 == "jinja", "auto does not trust detect() alone: " .. tostring(name2))
  local none, why = chat.resolve("auto", nil)
  check(none == nil and tostring(why):find("no chat_template", 1, true), "no template: " .. tostring(why))
  local bad, why2 = chat.resolve("jinja", "{% for %}")
  check(bad == nil and tostring(why2):find("syntax error", 1, true), "a broken template: " .. tostring(why2))
  local unknown, why3 = chat.resolve("nosuch", "x")
  check(unknown == nil and tostring(why3):find("unknown chat template", 1, true), "unknown name: " .. tostring(why3))
end

-- the quickstart data through SmolLM2's own template
local quick = root .. "/data/quickstart/train.jsonl"
local f = io.open(quick, "rb")
if f then
  local render = chat.jinja(known.smollm2, { name = "smollm2" })
  local n, same = 0, 0
  for line in f:lines() do
    local rec = jinja.json_decode(line)
    if rec and rec.map and rec.map.messages then
      n = n + 1
      local messages = jinja.to_lua(rec.map.messages)
      local opts = { bos = "<|im_start|>", eos = "<|im_end|>" }
      local t1, s1 = chat.smollm2(messages, opts)
      local t2, s2 = render(messages, opts)
      local eq = t1 == t2 and #s1 == #s2
      for i = 1, eq and #s1 or 0 do
        if s1[i][1] ~= s2[i][1] or s1[i][2] ~= s2[i][2] then eq = false end
      end
      if eq then same = same + 1 end
    end
  end
  f:close()
  check(n > 0 and same == n, string.format("quickstart: %d/%d records render and mask the same", same, n))
  print(string.format("jinja quickstart: %d/%d records identical to smollm2", same, n))
end

-- spans from {% generation %} blocks, and a template that is not prefix-stable
do
  local tpl = "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}{{ m.content }}</s>{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}"
  local text, spans = chat.jinja(tpl)({ { role = "user", content = "hi" }, { role = "assistant", content = "yo" } })
  check(text == "<user>hi<assistant>yo</s>", "generation text " .. show(text))
  check(#spans == 1 and text:sub(spans[1][1] + 1, spans[1][2]) == "yo</s>", "generation span")
  local unstable = "{% for m in messages %}{% if loop.last %}[{{ m.content }}]{% else %}{{ m.content }}{% endif %}{% endfor %}"
  local ok, e = pcall(chat.jinja(unstable), { { role = "user", content = "a" }, { role = "assistant", content = "b" }, { role = "user", content = "c" } })
  local _ = ok
  ok, e = pcall(chat.jinja(unstable), { { role = "user", content = "a" }, { role = "assistant", content = "b" }, { role = "user", content = "c" }, { role = "assistant", content = "d" } })
  check(not ok and tostring(e):find("prefix", 1, true) ~= nil, "a template that is not prefix-stable is refused: " .. tostring(e))
end

-- every parity template either gives one span per reply, each holding the reply, or
-- refuses the conversation with a clear message (its own raise_exception, or "not
-- prefix-stable"); a few are pinned
do
  local conv = {
    { role = "system", content = "You are terse." }, { role = "user", content = "Two plus two?" },
    { role = "assistant", content = "Four." }, { role = "user", content = "And in French?" },
    { role = "assistant", content = "Quatre." } }
  local pinned = {
    ref_llama2 = "Four. </s>", axolotl_gemma3 = "Four.<end_of_turn>", axolotl_phi_35 = "Four.<|end|>",
    axolotl_deepseek_v3 = "Four.<\u{FF5C}end\u{2581}of\u{2581}sentence\u{FF5C}>", axolotl_exaone = "Four.[|endofturn|]",
    cz_zephyr = "Four.</s>", cz_vicuna = "Four.</s>", axolotl_metharme = "Four.",
    axolotl_llama3_2_vision = "Four.<|eot_id|>", minja_qwen3_coder = "Four.<|im_end|>",
    axolotl_command_a = "Four.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
    gpt4all_deepseek_r1_distill_qwen = "Four.<\u{FF5C}end\u{2581}of\u{2581}sentence\u{FF5C}>",
    axolotl_command_a_rag = "<|START_RESPONSE|>Four.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
  }
  local with_spans, refused = 0, 0
  for _, m in ipairs(manifest.items) do
    local name = m.map.name
    local r = chat.jinja(read(fix .. m.map.file), { name = name })
    for _, c in ipairs({ conv, { table.unpack(conv, 2) } }) do
      local ok, text, spans = pcall(r, c, { bos = "<s>", eos = "</s>", now = now })
      if ok then
        with_spans = with_spans + 1
        check(#spans == 2, name .. ": one span per reply")
        for i, reply in ipairs({ "Four.", "Quatre." }) do
          local sp = spans[i]
          local body = sp and text:sub(sp[1] + 1, sp[2]) or ""
          local at = body:find(reply, 1, true)
          -- the reply, preceded at most by markers the generation prompt leaves to the
          -- reply (Command-A's <|START_RESPONSE|>), never by other text
          check(at and not body:sub(1, at - 1):gsub("<[^<>]*>", ""):find("%S"),
            name .. ": span " .. i .. " holds its reply: " .. show(body))
          check(not body:find("START_OF_TURN", 1, true) and not body:find("<|start_header_id|>", 1, true),
            name .. ": span " .. i .. " holds no turn opener: " .. show(body))
        end
        if pinned[name] and c == conv then
          check(text:sub(spans[1][1] + 1, spans[1][2]) == pinned[name], name .. ": pinned span "
            .. show(text:sub(spans[1][1] + 1, spans[1][2])))
        end
      else
        refused = refused + 1
        local msg = tostring(text)
        check(msg:find("raise_exception", 1, true) or msg:find("not prefix-stable", 1, true),
          name .. ": unclear refusal " .. msg)
      end
    end
  end
  print(string.format("jinja spans on the parity templates: %d conversations with spans, %d refused", with_spans, refused))
end

-- the commands' path (core/lua/chat_render.c through mt.examples) when running under
-- moontune: a tokenizer whose chat_template no hand-written family matches
local has_mt, mt = pcall(require, "moontune")
if has_mt and type(mt) == "table" and mt.tokenizer and mt.examples and os and os.tmpname then
  local tiny = root .. "/tests/fixtures/tiny_chat/"
  local data = root .. "/tests/fixtures/data/tiny_chat_heldout.jsonl"
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p '" .. dir .. "'"))
  local function write(path, text)
    local out = assert(io.open(path, "wb"))
    out:write(text)
    out:close()
  end
  local zephyr = read(fix .. "templates/cz_zephyr.jinja")
  write(dir .. "/tokenizer.json", read(tiny .. "tokenizer.json"))
  local cfg = assert(jinja.json_decode(read(tiny .. "tokenizer_config.json")))
  check(cfg.map.chat_template ~= nil, "tiny_chat has a chat_template to replace")
  cfg.map.chat_template = zephyr
  write(dir .. "/tokenizer_config.json", jinja.dumps(cfg))
  local ok, err = pcall(function()
    local tok <close> = mt.tokenizer(dir)
    check(tok:chat_template() == zephyr, "the tokenizer carries the template")
    check(select(2, chat.detect(zephyr)) ~= nil, "no hand-written family for zephyr")
    local render = chat.jinja(zephyr)
    local calls = 0
    local function stats(template)
      local ex <close> = mt.examples(data, tok, { template = template, seq_len = 512 })
      return ex:stats()
    end
    local a = stats("auto")
    local j = stats("jinja")
    local f = stats(function(m, o)
      calls = calls + 1
      return render(m, o)
    end)
    check(calls > 0 and a.examples == f.examples and a.trained_tokens == f.trained_tokens
      and j.trained_tokens == f.trained_tokens and a.trained_tokens > 0,
      string.format("auto/jinja through C = chat.jinja: %s/%s/%s trained tokens",
        tostring(a.trained_tokens), tostring(j.trained_tokens), tostring(f.trained_tokens)))
    -- the original tiny_chat template (ChatML): auto picks the hand-written chatml,
    -- which masks exactly like the engine
    local tok2 <close> = mt.tokenizer(tiny:sub(1, -2))
    local ex1 <close> = mt.examples(data, tok2, { template = "auto", seq_len = 512 })
    local ex2 <close> = mt.examples(data, tok2, { template = "jinja", seq_len = 512 })
    local s1, s2 = ex1:stats(), ex2:stats()
    check(s1.trained_tokens == s2.trained_tokens and s1.examples == s2.examples,
      "tiny_chat: auto (hand-written) and jinja train the same tokens")
    local bad, why = pcall(mt.examples, data, tok2, { template = "nosuch", seq_len = 512 })
    check(not bad and tostring(why):find("unknown chat template", 1, true), "unknown name: " .. tostring(why))
    -- generation renders its prompt through the same resolution
    if mt.model and mt.generate then
      local model <close> = mt.model(tiny:sub(1, -2))
      model:set_training(false)
      local _, info_auto = mt.generate(model, tok, "Hello?", { template = "auto", max_new_tokens = 1 })
      local _, info_fn = mt.generate(model, tok, "Hello?", { max_new_tokens = 1,
        template = function(m, o) return render(m, o) end })
      check(info_auto.prompt_tokens > 0 and info_auto.prompt_tokens == info_fn.prompt_tokens,
        string.format("generation prompt through the engine: %s vs %s tokens",
          tostring(info_auto.prompt_tokens), tostring(info_fn.prompt_tokens)))
    end
  end)
  check(ok, "examples through the engine: " .. tostring(err))
  -- the quickstart model's own template (MOONTUNE_SMOLLM2_GGUF): the one the span
  -- acceptance above used, and "auto" keeps the hand-written smollm2 for it
  local gguf = os.getenv("MOONTUNE_SMOLLM2_GGUF")
  if gguf and gguf ~= "" and io.open(gguf, "rb") then
    local ok2, err2 = pcall(function()
      local tok <close> = mt.tokenizer(gguf)
      local t = tok:chat_template()
      check(t == known.smollm2, "the GGUF's chat_template is the fixture's smollm2 template")
      local bos = tok:bos() and tok:decode({ tok:bos() }, false) or nil
      local eos = tok:eos() and tok:decode({ tok:eos() }, false) or nil
      local _, resolved = chat.resolve("auto", t, bos, eos)
      check(resolved == "smollm2", "auto on the quickstart model: " .. tostring(resolved))
    end)
    check(ok2, "quickstart model: " .. tostring(err2))
    print("jinja: the quickstart model's template checked")
  end
  os.remove(dir .. "/tokenizer.json")
  os.remove(dir .. "/tokenizer_config.json")
  os.remove(dir)
  print("jinja through the commands' path (mt.examples): checked")
end

-- ---------------------------------------------------------------------------

if #failures > 0 then
  for i = 1, math.min(#failures, 60) do io.stderr:write("FAIL ", failures[i], "\n") end
  if #failures > 60 then io.stderr:write(string.format("... and %d more\n", #failures - 60)) end
  error(string.format("tests/lua/jinja.lua: %d of %d checks failed", #failures, checks), 0)
end
print(string.format("tests/lua/jinja.lua: all %d checks passed", checks))
return "ok"
