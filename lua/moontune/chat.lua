-- moontune.chat — chat templates: conversation -> text + the byte spans to train on.
--
-- Every template is a function
--
--     render(messages, opts) -> text, spans
--
-- messages  array of { role = "system" | "user" | "assistant", content = "..." }
--           (alpaca also reads an optional `input` field on a user message)
-- opts      optional table:
--             add_generation_prompt  (bool) end with the header of an assistant turn
--             bos, eos               token strings; default: the family's own
--             default_system         (chatml family only) system prompt inserted when
--                                    the first message is not a system message;
--                                    false = none. Default: the family's own.
-- text      exactly what transformers' apply_chat_template(tokenize=False) returns with
--           the family's reference chat_template (tests/fixtures/chat/reference.json,
--           made by tests/parity/make_chat_reference.py)
-- spans     array of { start, stop }: 0-based byte offsets into text, stop exclusive,
--           one per assistant message, in order. A span covers the assistant's content
--           as rendered plus the end-of-turn marker that closes it, so the model learns
--           to emit that marker ("the EOS of each response is trained on"). Everything
--           else (system, user, role headers, BOS, separators) is prompt: masked.
--
-- The end-of-turn marker per family (all of it inside the span, nothing after it):
--   chatml, smollm2, qwen2   "<|im_end|>"  — the "\n" that follows is NOT trained: it
--                             is the separator before the next turn's <|im_start|>, and
--                             generation stops at <|im_end|> (the instruct models' EOS).
--   llama3                    "<|eot_id|>"
--   llama2                    " " .. eos    — the template writes content .. " </s>"; the
--                             space belongs to the response (SentencePiece "▁").
--   mistral, mistral_legacy   eos           — (legacy writes a " " after the EOS; not trained)
--   alpaca                    eos
--
-- Whitespace: llama3 applies Jinja's `trim` and llama2 Python's `strip()` to contents,
-- as their reference templates do. Here both strip ASCII whitespace (space, \t, \n,
-- \v, \f, \r); Python would also strip Unicode spaces such as U+00A0 — a difference
-- only for contents that begin or end with such a character.
--
-- Recipes: `chat.get("llama3")` or `chat.get(function(messages, opts) ... end)`;
-- `chat.detect(template_string)` names the family of a tokenizer's Jinja template or
-- returns nil and a message asking the recipe to name one. It never guesses.
--
-- Any other model's template: `chat.jinja(template_string)` returns a render function
-- that runs the model's own Jinja chat_template through moontune's engine
-- (moontune.jinja) and derives the training spans (see chat.jinja below and
-- docs/chat_templates.md). `chat.resolve(name, template, bos, eos)` is what
-- `template = "auto"` does: the hand-written function when detect() names a family
-- and that function renders probe conversations exactly as the model's template does,
-- the model's own template through the engine otherwise; `template = "jinja"` always
-- uses the engine.

local M = {}

-- ---------------------------------------------------------------------------
-- helpers

-- A growing text with a running byte length, so span offsets come for free.
local function buffer()
  local b = { parts = {}, len = 0, spans = {} }
  function b.add(s)
    b.parts[#b.parts + 1] = s
    b.len = b.len + #s
  end
  -- Adds trained text: a span from here to the end of `s`.
  function b.train(s)
    local start = b.len
    b.add(s)
    b.spans[#b.spans + 1] = { start, b.len }
  end
  function b.finish()
    return table.concat(b.parts), b.spans
  end
  return b
end

local function strip(s)
  return (s:gsub("^[ \t\n\v\f\r]+", ""):gsub("[ \t\n\v\f\r]+$", ""))
end

local function check_messages(messages, family)
  if type(messages) ~= "table" then
    error(string.format("chat template '%s': messages must be an array of {role=, content=}, got %s",
                        family, type(messages)), 3)
  end
  for i, m in ipairs(messages) do
    if type(m) ~= "table" or type(m.role) ~= "string" or type(m.content) ~= "string" then
      error(string.format("chat template '%s': message %d must be {role=<string>, content=<string>}",
                          family, i), 3)
    end
  end
end

local function opt(opts, key, default)
  if opts == nil or opts[key] == nil then return default end
  return opts[key]
end

-- Splits off a leading system message and checks that the rest alternates
-- user/assistant/user/..., as the Llama 2 and Mistral reference templates require.
local function split_alternating(messages, family, allow_system)
  local system, first = nil, 1
  if messages[1] and messages[1].role == "system" then
    if not allow_system then
      error(string.format("chat template '%s' has no system role (its reference template raises "
                          .. "'Only user and assistant roles are supported!')", family), 3)
    end
    system, first = messages[1].content, 2
  end
  local rest = {}
  for i = first, #messages do
    local m = messages[i]
    local want = (#rest % 2 == 0) and "user" or "assistant"
    if m.role ~= want then
      error(string.format("chat template '%s': message %d has role '%s', expected '%s': after "
                          .. "the optional system message, roles must alternate user/assistant/...",
                          family, i, m.role, want), 3)
    end
    rest[#rest + 1] = m
  end
  return system, rest
end

-- ---------------------------------------------------------------------------
-- ChatML: <|im_start|>ROLE\nCONTENT<|im_end|>\n per message.
--
-- "chatml" is the plain template (teknium/OpenHermes-2.5-Mistral-7B's): no default
-- system prompt. "smollm2" and "qwen2" are the same format with their models' defaults,
-- inserted as a system turn when messages[1] is not a system message (their reference
-- templates do exactly this). Any of the three takes opts.default_system to change it.

local SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
local QWEN2_SYSTEM = "You are a helpful assistant."

local function chatml_with(family, family_default)
  return function(messages, opts)
    check_messages(messages, family)
    local default_system = opt(opts, "default_system", family_default)
    local b = buffer()
    if default_system and #messages > 0 and messages[1].role ~= "system" then
      b.add("<|im_start|>system\n" .. default_system .. "<|im_end|>\n")
    end
    for _, m in ipairs(messages) do
      b.add("<|im_start|>" .. m.role .. "\n")
      if m.role == "assistant" then
        b.train(m.content .. "<|im_end|>")
        b.add("\n")
      else
        b.add(m.content .. "<|im_end|>\n")
      end
    end
    if opt(opts, "add_generation_prompt", false) then
      b.add("<|im_start|>assistant\n")
    end
    return b.finish()
  end
end

M.chatml = chatml_with("chatml", false)
M.smollm2 = chatml_with("smollm2", SMOLLM2_SYSTEM)
M.qwen2 = chatml_with("qwen2", QWEN2_SYSTEM)

-- ---------------------------------------------------------------------------
-- Llama 3 (Meta-Llama-3-8B-Instruct's template): BOS, then per message
-- <|start_header_id|>ROLE<|end_header_id|>\n\nTRIM(CONTENT)<|eot_id|>. No default system.
-- (Llama 3.1+ templates add a "Cutting Knowledge Date" system block; detect() refuses them.)

function M.llama3(messages, opts)
  check_messages(messages, "llama3")
  local bos = opt(opts, "bos", "<|begin_of_text|>")
  local b = buffer()
  for i, m in ipairs(messages) do
    if i == 1 then b.add(bos) end
    b.add("<|start_header_id|>" .. m.role .. "<|end_header_id|>\n\n")
    if m.role == "assistant" then
      b.train(strip(m.content) .. "<|eot_id|>")
    else
      b.add(strip(m.content) .. "<|eot_id|>")
    end
  end
  if opt(opts, "add_generation_prompt", false) then
    b.add("<|start_header_id|>assistant<|end_header_id|>\n\n")
  end
  return b.finish()
end

-- ---------------------------------------------------------------------------
-- Llama 2 chat (meta-llama/Llama-2-*-chat-hf): each user turn is
-- BOS [INST] STRIP(CONTENT) [/INST], each answer " STRIP(CONTENT) EOS". A system message
-- goes inside the first [INST] as <<SYS>>\nSYSTEM\n<</SYS>>\n\n. No default system
-- prompt (the reference template has none). add_generation_prompt changes nothing: the
-- text after a user turn already ends with [/INST].

function M.llama2(messages, opts)
  check_messages(messages, "llama2")
  local bos, eos = opt(opts, "bos", "<s>"), opt(opts, "eos", "</s>")
  local system, turns = split_alternating(messages, "llama2", true)
  local b = buffer()
  for i, m in ipairs(turns) do
    local content = m.content
    if i == 1 and system then
      content = "<<SYS>>\n" .. system .. "\n<</SYS>>\n\n" .. content
    end
    if m.role == "user" then
      b.add(bos .. "[INST] " .. strip(content) .. " [/INST]")
    else
      b.add(" ")
      b.train(strip(content) .. " " .. eos)
    end
  end
  return b.finish()
end

-- ---------------------------------------------------------------------------
-- Mistral 7B Instruct v0.1/v0.2 as now published on the Hub (the "v1" template with a
-- system prompt): BOS, then " [INST] USER [/INST]" and " ASSISTANT EOS"; a system
-- message is prepended to the first user message as SYSTEM\n\n. Contents unstripped.
-- No default system prompt. add_generation_prompt changes nothing.

function M.mistral(messages, opts)
  check_messages(messages, "mistral")
  local bos, eos = opt(opts, "bos", "<s>"), opt(opts, "eos", "</s>")
  local system, turns = split_alternating(messages, "mistral", true)
  local b = buffer()
  b.add(bos)
  for i, m in ipairs(turns) do
    if m.role == "user" then
      local content = m.content
      if i == 1 and system then content = system .. "\n\n" .. content end
      b.add(" [INST] " .. content .. " [/INST]")
    else
      b.add(" ")
      b.train(m.content .. eos)
    end
  end
  return b.finish()
end

-- The original Mistral-7B-Instruct-v0.1 template (still in many converted and quantized
-- copies): BOS[INST] USER [/INST]ASSISTANT EOS" " ... No system role: a system message
-- is an error, as in the reference template.

function M.mistral_legacy(messages, opts)
  check_messages(messages, "mistral_legacy")
  local bos, eos = opt(opts, "bos", "<s>"), opt(opts, "eos", "</s>")
  local _, turns = split_alternating(messages, "mistral_legacy", false)
  local b = buffer()
  b.add(bos)
  for _, m in ipairs(turns) do
    if m.role == "user" then
      b.add("[INST] " .. m.content .. " [/INST]")
    else
      b.train(m.content .. eos)
      b.add(" ")
    end
  end
  return b.finish()
end

-- ---------------------------------------------------------------------------
-- Alpaca (Stanford Alpaca's PROMPT_DICT; there is no official Jinja template).
-- One turn is exactly Stanford's training text:
--   PREAMBLE\n\n### Instruction:\nUSER\n\n[### Input:\nINPUT\n\n]### Response:\nASSISTANT EOS
-- where PREAMBLE is Stanford's sentence (the "with input" one when the first user
-- message has an `input` field) and ASSISTANT EOS is trained. Extensions, ours:
--   * a system message replaces the preamble;
--   * more turns repeat "\n\n### Instruction:\n..." after the previous EOS;
--   * "### Response:\n" is written when an assistant message follows or
--     add_generation_prompt is set; a trailing user turn otherwise ends with "\n\n".
-- No BOS in the text: Stanford's tokenizer adds it (add_bos_token), so does ours.

local ALPACA_PREAMBLE = "Below is an instruction that describes a task. "
  .. "Write a response that appropriately completes the request."
local ALPACA_PREAMBLE_INPUT = "Below is an instruction that describes a task, paired with an "
  .. "input that provides further context. Write a response that appropriately completes the request."

function M.alpaca(messages, opts)
  check_messages(messages, "alpaca")
  local eos = opt(opts, "eos", "</s>")
  local system, turns = split_alternating(messages, "alpaca", true)
  local b = buffer()
  if not system then
    system = (turns[1] and turns[1].input) and ALPACA_PREAMBLE_INPUT or ALPACA_PREAMBLE
  end
  b.add(system .. "\n\n")
  local gen = opt(opts, "add_generation_prompt", false)
  for i, m in ipairs(turns) do
    if m.role == "user" then
      if i > 1 then b.add("\n\n") end
      b.add("### Instruction:\n" .. m.content .. "\n\n")
      if m.input then
        if type(m.input) ~= "string" then
          error(string.format("chat template 'alpaca': message input must be a string, got %s",
                              type(m.input)), 2)
        end
        b.add("### Input:\n" .. m.input .. "\n\n")
      end
      if turns[i + 1] or gen then b.add("### Response:\n") end
    else
      b.train(m.content .. eos)
    end
  end
  return b.finish()
end

-- ---------------------------------------------------------------------------
-- registry

M.names = { "chatml", "smollm2", "qwen2", "llama3", "llama2", "mistral", "mistral_legacy", "alpaca" }

M.templates = {}
for _, name in ipairs(M.names) do M.templates[name] = M[name] end

-- The render function for a name, or the recipe's own function unchanged; nil and
-- the reason for anything else (the commands report it as it is).
function M.lookup(name_or_function)
  local t = type(name_or_function)
  if t == "function" then return name_or_function end
  if t == "string" and M.templates[name_or_function] then
    return M.templates[name_or_function]
  end
  return nil, string.format("unknown chat template %s; known templates: %s "
                            .. "(or pass a function(messages, opts) -> text, spans)",
                            t == "string" and ("'" .. name_or_function .. "'") or ("(a " .. t .. ")"),
                            table.concat(M.names, ", "))
end

-- The same, raising the reason as an error at the caller.
function M.get(name_or_function)
  local render, why = M.lookup(name_or_function)
  if not render then error(why, 2) end
  return render
end

-- ---------------------------------------------------------------------------
-- detection: names the family of a Jinja chat_template string, or returns nil and why.
-- Markers, checked in this order:
--   <|im_start|>         ChatML. The literal "<|im_start|>system" (a built-in default
--                        system turn) must be SmolLM2's or Qwen2's; templates with tools,
--                        <think> or another default are refused.
--   <|start_header_id|>  Llama 3; refused when it carries Llama 3.1+'s "Cutting Knowledge
--                        Date" system block or tools.
--   [INST] + <<SYS>>     Llama 2.
--   [INST]               Mistral: the v0.2 form (" [INST] ", system_message) or the
--                        legacy v0.1 form (eos_token + ' '); other [INST] templates
--                        (Mixtral, v0.3 with tools, ...) render differently: refused.
--   ### Instruction: + ### Response:   Alpaca.

local function has(s, pat) return s:find(pat, 1, true) ~= nil end

local function refuse(why)
  return nil, why .. "; moontune does not guess a chat template: name one in the recipe "
    .. "(chat_template = \"<name>\" or a function(messages, opts) -> text, spans); known: "
    .. table.concat(M.names, ", ")
end

function M.detect(template)
  if type(template) ~= "string" or template == "" then
    return refuse("no chat_template string (got " .. type(template) .. ")")
  end
  local s = template
  if has(s, "<|im_start|>") then
    if has(s, "tools") or has(s, "<think>") then
      return refuse("ChatML template with tool calls or reasoning blocks")
    end
    if has(s, "<|im_start|>system\\n" .. SMOLLM2_SYSTEM .. "<|im_end|>")
      or has(s, "<|im_start|>system\n" .. SMOLLM2_SYSTEM .. "<|im_end|>") then
      return "smollm2"
    end
    if has(s, "<|im_start|>system\\n" .. QWEN2_SYSTEM .. "<|im_end|>")
      or has(s, "<|im_start|>system\n" .. QWEN2_SYSTEM .. "<|im_end|>") then
      return "qwen2"
    end
    if has(s, "<|im_start|>system") then
      return refuse("ChatML template with a built-in default system prompt moontune does not know")
    end
    return "chatml"
  end
  if has(s, "<|start_header_id|>") then
    if has(s, "Cutting Knowledge Date") or has(s, "tools") then
      return refuse("Llama 3.1+ template (date header / tools), not the Llama 3 format")
    end
    return "llama3"
  end
  if has(s, "[INST]") then
    if has(s, "<<SYS>>") then return "llama2" end
    if has(s, "AVAILABLE_TOOLS") or has(s, "tools") then
      return refuse("[INST] template with tools (Mistral v0.3 or later)")
    end
    if has(s, "' [INST] '") and has(s, "system_message") and has(s, "loop.first") then
      return "mistral"
    end
    if has(s, "'[INST] '") and has(s, "eos_token + ' '") and not has(s, "system") then
      return "mistral_legacy"
    end
    return refuse("[INST] template that matches neither Mistral v0.2 nor the original v0.1")
  end
  if has(s, "### Instruction:") and has(s, "### Response:") then
    return "alpaca"
  end
  return refuse("chat template of an unknown family (no <|im_start|>, <|start_header_id|>, "
                .. "[INST] or ### Instruction: marker)")
end

-- ---------------------------------------------------------------------------
-- any model's own Jinja template (moontune.jinja)
--
-- chat.jinja(template, settings) -> render(messages, opts) -> text, spans
--
-- settings (optional): name (for messages), max_steps, max_output (see moontune.jinja).
-- The template sees messages (each message's fields as given: role and content first,
-- then the other keys sorted; an empty table is an empty list), add_generation_prompt,
-- bos_token and eos_token (opts.bos / opts.eos; undefined when not given), tools and
-- documents (opts.tools / opts.documents; none when not given, as transformers passes
-- them), and the entries of opts.vars. opts.now pins strftime_now (seconds, UTC).
--
-- Spans, one per assistant message:
--   * a template with {% generation %} blocks: the blocks' byte ranges, when there is
--     one per assistant message;
--   * otherwise by incremental rendering. For assistant message k:
--       P = render(messages[1..k-1], add_generation_prompt=true)   the prompt
--       F = render(messages[1..k],   add_generation_prompt=false)  the turn
--     P must be a prefix of F and of the full text (up to whitespace). The span starts
--     after P and ends where F and the full text part (the turn's own closing marker
--     is in both, the next turn is not; after the last message, what the template
--     writes there, such as Phi-3's eos_token, stays in), with
--     whitespace trimmed at the end (the separator before the next turn) and at the
--     start (the separator the template writes there even for a content without
--     leading whitespace, such as Llama 2's " "; found by one more rendering when the
--     content begins with whitespace), never inside a marker (<|...|>, [|...|]) and
--     without markers that open the next turn (Command-A's <|START_OF_TURN_TOKEN|>).
--     The span must hold the end of the message's content as rendered;
--     a template that re-renders earlier turns differently (e.g. drops their reasoning)
--     fails these checks and is refused with a message naming the message: name a
--     hand-written template or add {% generation %} blocks to it.

local jinja_mod

local function is_space_byte(b) return b == 32 or (b >= 9 and b <= 13) end

-- The pieces of s: markers (<...>, [...]) and other runs, whitespace left out, with
-- their positions.
local function pieces(s)
  local out, i, n = {}, 1, #s
  while i <= n do
    local b = s:byte(i)
    if is_space_byte(b) then
      i = i + 1
    else
      local m = s:match("^<[^<>\n]*>", i) or s:match("^%[[^%[%]\n]*%]", i)
      if m then
        out[#out + 1] = { text = m, at = i, marker = true }
        i = i + #m
      else
        local j = i
        while j <= n and not is_space_byte(s:byte(j)) and s:byte(j) ~= 60 and s:byte(j) ~= 91 do j = j + 1 end
        if j == i then j = i + 1 end
        out[#out + 1] = { text = s:sub(i, j - 1), at = i, marker = false }
        i = j
      end
    end
  end
  return out
end

-- A template may close a turn and then start the next one with a marker every turn
-- starts with (Command-A writes <|START_OF_TURN_TOKEN|> after <|END_OF_TURN_TOKEN|>,
-- and even after the last message), which the turn alone and the whole conversation
-- share, or write the assistant header after the last message whatever
-- add_generation_prompt says (a Llama 3.1 GGUF template). The end of the closing,
-- from a marker on, that the prompt also shows right after the same marker (between
-- the previous message and the reply: the next turn's opening) is cut. Returns the
-- new end.
local function cut_next_opener(text, tail_end, e, prompt, prev_content)
  local closing = text:sub(tail_end + 1, e)
  local ps = pieces(closing)
  if #ps < 2 then return e end
  local from = math.max(1, #prompt - 400)
  if type(prev_content) == "string" then
    local tail = strip(prev_content):sub(-32)
    if tail ~= "" then
      local x = 1
      while true do
        local a, b = prompt:find(tail, x, true)
        if not a then break end
        from, x = b + 1, a + 1
      end
    end
  end
  local between = prompt:sub(from):gsub("[ \t\n\r\f\v]", "")
  for i = 2, #ps do
    if ps[i - 1].marker and ps[i].marker then
      local parts = { ps[i - 1].text }
      for j = i, #ps do parts[#parts + 1] = ps[j].text end
      if between:find(table.concat(parts), 1, true) then return tail_end + ps[i].at - 1 end
    end
  end
  return e
end

-- How many bytes of b the text a covers when a is a prefix of b up to whitespace
-- (a template may write a separator before its generation prompt that it writes
-- elsewhere around a turn, e.g. "\n" after the loop); nil when it is not.
local function align(a, b)
  if b:sub(1, #a) == a then return #a end
  local i, j, na = 1, 1, #a
  while i <= na do
    local ca, cb = a:byte(i), b:byte(j)
    if ca == cb then
      i, j = i + 1, j + 1
    elseif is_space_byte(ca) then
      i = i + 1
    elseif cb and is_space_byte(cb) then
      j = j + 1
    else
      return nil
    end
  end
  return j - 1
end

function M.jinja(template, settings)
  jinja_mod = jinja_mod or require("moontune.jinja")
  local J = jinja_mod
  settings = settings or {}
  local name = settings.name or "chat_template"
  local tpl, err = J.compile(template, { name = name })
  if not tpl then error(err, 0) end -- the message names the template, line and column
  local limits = { max_steps = settings.max_steps, max_output = settings.max_output }

  local function render_once(list, gen, opts, want_spans)
    local vars = {
      messages = list,
      add_generation_prompt = gen,
      tools = opts.tools ~= nil and opts.tools or J.none,
      documents = opts.documents ~= nil and opts.documents or J.none,
    }
    if opts.bos ~= nil then vars.bos_token = opts.bos end
    if opts.eos ~= nil then vars.eos_token = opts.eos end
    if type(opts.vars) == "table" then
      for k, v in pairs(opts.vars) do vars[k] = v end
    end
    local text, spans_or_err = tpl:render(vars, { now = opts.now, spans = want_spans,
      max_steps = limits.max_steps, max_output = limits.max_output })
    if text == nil then error(spans_or_err, 0) end
    return text, spans_or_err
  end

  return function(messages, opts)
    opts = opts or {}
    if type(messages) ~= "table" then
      error(string.format("chat template '%s': messages must be an array of {role=, content=}, got %s",
                          name, type(messages)), 2)
    end
    for i, m in ipairs(messages) do
      if type(m) ~= "table" or type(m.role) ~= "string" then
        error(string.format("chat template '%s': message %d must be a table with a string role", name, i), 2)
      end
    end
    local all = J.from_lua(messages)
    local n = all.n
    local gen = opts.add_generation_prompt and true or false
    local text, gen_spans = render_once(all, gen, opts, tpl.has_generation)
    local assistants = {}
    for i = 1, n do
      if messages[i].role == "assistant" then assistants[#assistants + 1] = i end
    end
    local spans = {}
    if #assistants == 0 then return text, spans end
    if tpl.has_generation and gen_spans and #gen_spans == #assistants then
      for i, s in ipairs(gen_spans) do spans[i] = { s[1], s[2] } end
      return text, spans
    end
    local function sub(k)
      local items = {}
      for i = 1, k do items[i] = all.items[i] end
      return J.list(items)
    end
    local function unstable(k, why)
      error(string.format("chat template '%s' is not prefix-stable at message %d (assistant): %s; "
        .. "moontune cannot tell which characters are the reply. Name a hand-written template "
        .. "(chat_template = \"<name>\") or mark replies with {%% generation %%} blocks", name, k, why), 0)
    end
    local prev_end = 0
    for _, k in ipairs(assistants) do
      local ok, p = pcall(render_once, sub(k - 1), true, opts, false)
      if not ok then unstable(k, "rendering the messages before it failed: " .. tostring(p)) end
      local f = render_once(sub(k), false, opts, false)
      if not align(p, f) then unstable(k, "the prompt rendered with add_generation_prompt is not a prefix of the turn") end
      local s = align(p, text)
      if not s then unstable(k, "the prompt before it renders differently in the whole conversation") end
      if s < prev_end then unstable(k, "its prompt ends inside the previous reply") end
      -- the end: where the turn alone and the whole conversation part
      local e, lim = 0, math.min(#f, #text)
      while e < lim and f:byte(e + 1) == text:byte(e + 1) do e = e + 1 end
      if e < s then unstable(k, "the turn renders differently in the whole conversation") end
      local content = messages[k].content
      local own, tail_end = 0, s
      local lead = 0
      while s + lead < e and is_space_byte(text:byte(s + lead + 1)) do lead = lead + 1 end
      local start = s + lead -- the first non-space byte the turn adds
      if type(content) == "string" then
        while own < #content and is_space_byte(content:byte(own + 1)) do own = own + 1 end
        local stripped = strip(content)
        local tail = stripped:sub(-32)
        if tail ~= "" then
          local from, found = s + 1, nil
          while true do
            local x, y = text:find(tail, from, true)
            if not x or y > e then break end
            found, from = y, x + 1
          end
          if not found then unstable(k, "the end of its content is not inside the text the turn adds") end
          tail_end = found
        end
      end
      if own > 0 then
        -- which of the whitespace before the reply is the template's separator: what
        -- it writes when the content has no leading whitespace (Llama 2 strips the
        -- content and writes " "; Mistral writes " " and the content as it is)
        local copy = {}
        for key, v in pairs(messages[k]) do copy[key] = v end
        copy.content = content:sub(own + 1)
        local items = {}
        for i = 1, k - 1 do items[i] = all.items[i] end
        items[k] = J.from_lua(copy)
        local ok2, f2 = pcall(render_once, J.list(items), false, opts, false)
        local s2 = ok2 and align(p, f2)
        if s2 then
          local sep = 0
          while s2 + sep < #f2 and is_space_byte(f2:byte(s2 + sep + 1)) do sep = sep + 1 end
          start = s + math.min(sep, lead)
        else
          start = s + math.max(0, lead - own)
        end
      end
      -- never end inside a marker such as <|...|> or [|...|] after the content
      local closing = text:sub(tail_end + 1, e)
      local lt_, gt_ = closing:match(".*()<"), closing:match(".*()>")
      if lt_ and (not gt_ or gt_ < lt_) then e = tail_end + lt_ - 1 end
      local lb, rb = closing:match(".*()%["), closing:match(".*()%]")
      if lb and (not rb or rb < lb) and tail_end + lb - 1 < e then e = tail_end + lb - 1 end
      e = cut_next_opener(text, tail_end, e, p, k > 1 and messages[k - 1].content or nil)
      while e > start and is_space_byte(text:byte(e)) do e = e - 1 end
      if e < tail_end then e = tail_end end
      spans[#spans + 1] = { start, e }
      prev_end = e
    end
    return text, spans
  end
end

M.JINJA = "jinja" -- the name chat.resolve returns for the engine (kept here: C reads it)

-- Conversations that must render the same through a hand-written function and the
-- model's template before "auto" picks the hand-written one.
local PROBES = {
  { { role = "system", content = "Be brief." }, { role = "user", content = "Hi there." },
    { role = "assistant", content = " Hello!\n" }, { role = "user", content = "Bye \"now\"." },
    { role = "assistant", content = "Goodbye, café." } },
  { { role = "user", content = "One?" }, { role = "assistant", content = "Two." }, { role = "user", content = "Three?" } },
  { { role = "user", content = "Just one question." } },
}

local function same_rendering(hand, engine, bos, eos)
  for _, msgs in ipairs(PROBES) do
    for _, gen in ipairs({ false, true }) do
      local opts = { add_generation_prompt = gen, bos = bos, eos = eos }
      local ok1, t1, s1 = pcall(hand, msgs, opts)
      local ok2, t2, s2 = pcall(engine, msgs, opts)
      if ok1 ~= ok2 then return false end
      if ok1 then
        if t1 ~= t2 or #s1 ~= #s2 then return false end
        for i = 1, #s1 do
          if s1[i][1] ~= s2[i][1] or s1[i][2] ~= s2[i][2] then return false end
        end
      end
    end
  end
  return true
end

-- Resolves a template choice for the commands (core/lua/chat_render.c):
--   name: a hand-written template's name, "jinja" (the model's template through the
--         engine) or "auto"/nil;
--   template, bos, eos: the tokenizer's chat_template and special tokens (may be nil).
-- Returns render, resolved_name or nil, why.
function M.resolve(name, template, bos, eos)
  if name == nil or name == "auto" or name == M.JINJA then
    if type(template) ~= "string" or template == "" then
      return nil, "the tokenizer carries no chat_template: name a template (" .. table.concat(M.names, ", ") .. ")"
    end
    local ok, engine = pcall(M.jinja, template, { name = "the model's chat_template" })
    if not ok then
      local family = name ~= M.JINJA and M.detect(template)
      if family then return M.templates[family], family end
      return nil, tostring(engine)
    end
    if name ~= M.JINJA then
      local family = M.detect(template)
      if family and same_rendering(M.templates[family], engine, bos, eos) then
        return M.templates[family], family
      end
    end
    return engine, M.JINJA
  end
  local render, why = M.lookup(name)
  if not render then return nil, why end
  for _, known in ipairs(M.names) do
    if known == name then return render, known end
  end
  return render, name
end

return M
