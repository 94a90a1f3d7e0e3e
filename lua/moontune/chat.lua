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

return M
