-- moontune.jinja — a sandboxed Jinja2 renderer for chat templates, written for moontune.
--
-- It implements the subset of Jinja2 that models' chat templates use, with the
-- environment transformers' apply_chat_template renders them in
-- (ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) with the
-- loopcontrols extension, a `{% generation %}` tag, and the globals raise_exception,
-- strftime_now, dict, namespace and a tojson filter that is Python's json.dumps with
-- ensure_ascii=False and insertion-ordered keys). docs/chat_templates.md lists what is
-- supported and what is not.
--
--   local jinja = require("moontune.jinja")
--   local tpl, err = jinja.compile(source)          -- nil, message on a syntax error
--   local text, err, info = tpl:render(vars, opts)  -- nil, message, info on an error
--
-- vars: a table name -> value; Lua values are converted (jinja.from_lua), values made by
--       jinja.json_decode / jinja.list / jinja.dict are used as they are (they keep
--       JSON's key order, which tojson reproduces).
-- opts: max_steps (default 1,000,000 evaluation steps), max_output (default 16 MiB, also
--       the largest string a template may build), now (seconds since the epoch, UTC, for
--       strftime_now; default: the local clock), spans (true: also return the byte
--       ranges of `{% generation %}` blocks as a third result).
-- info: {kind = "syntax" | "raise" | "undefined" | "type" | "limit" | "security" | "internal",
--        message = the bare message, line, col}. kind "raise" is raise_exception(message).
--
-- The sandbox: a template sees only data (strings, numbers, booleans, none, lists,
-- dicts, namespaces) and the functions listed here. It never reaches a Lua global, a
-- Lua function or a metatable: attribute access reads dict keys and a fixed table of
-- methods per type; names starting with "_" are undefined (''.__class__ renders ""),
-- as in Jinja's sandbox; methods that modify a list or dict (append, update, ...) are
-- refused, as in Jinja's immutable sandbox. Work is bounded by max_steps (each
-- expression, statement and loop iteration is a step), output and strings by
-- max_output, and macro recursion by a depth of 64.

local M = {}

local TAG = {} -- private key: the type of a value table (never reachable from a template)
local NONE = { [TAG] = "none" }
M.none = NONE

local floor, huge, mtype = math.floor, math.huge, math.type
local sfmt, ssub, sbyte, sfind, srep = string.format, string.sub, string.byte, string.find, string.rep
local concat = table.concat
local os_date = os and os.date

-- ---------------------------------------------------------------------------
-- errors

local function raise(kind, msg, node)
  error({ jinja = true, kind = kind, message = msg, line = node and node.line, col = node and node.col }, 0)
end

-- ---------------------------------------------------------------------------
-- values

local function new_list(items, n, tuple)
  return { [TAG] = "list", items = items, n = n or #items, tuple = tuple or nil }
end
local function new_dict() return { [TAG] = "dict", keys = {}, map = {} } end
local function dict_set(d, k, v)
  if d.map[k] == nil then d.keys[#d.keys + 1] = k end
  d.map[k] = v
end
local function new_undef(hint) return { [TAG] = "undef", hint = hint } end
local function new_func(name, fn) return { [TAG] = "func", name = name, fn = fn } end

M.list = function(items) return new_list(items or {}, nil) end
M.dict = function(pairs_in)
  local d = new_dict()
  for _, kv in ipairs(pairs_in or {}) do dict_set(d, kv[1], kv[2]) end
  return d
end

local function tagof(v)
  local t = type(v)
  if t == "table" then return v[TAG] or "lua" end
  return t
end

-- Python's type names, for messages
local function pytype(v)
  local t = tagof(v)
  if t == "string" then return "str" end
  if t == "number" then return mtype(v) == "integer" and "int" or "float" end
  if t == "boolean" then return "bool" end
  if t == "none" then return "NoneType" end
  if t == "list" then return v.tuple and "tuple" or "list" end
  if t == "undef" then return "Undefined" end
  if t == "func" then return "function" end
  if t == "ns" then return "Namespace" end
  if t == "loop" then return "LoopContext" end
  return t
end

-- Converts a plain Lua value to a template value. Arrays (and empty tables) become
-- lists, other tables dicts with keys in a fixed order: the usual message keys first,
-- then the rest sorted. nil becomes none.
local KEY_ORDER = { "role", "content", "name", "tool_calls", "tool_call_id", "type", "function", "arguments" }
local KEY_RANK = {}
for i, k in ipairs(KEY_ORDER) do KEY_RANK[k] = i end

local function from_lua(v, depth)
  depth = depth or 0
  if depth > 100 then raise("limit", "data nested more than 100 levels deep") end
  local t = type(v)
  if t == "nil" then return NONE end
  if t == "string" or t == "number" or t == "boolean" then return v end
  if t ~= "table" then raise("type", "cannot pass a Lua " .. t .. " to a template") end
  if v[TAG] then return v end
  local n = #v
  if n > 0 or next(v) == nil then
    local items = {}
    for i = 1, n do items[i] = from_lua(v[i], depth + 1) end
    return new_list(items, n)
  end
  local keys = {}
  for k in pairs(v) do
    if type(k) ~= "string" and type(k) ~= "number" then
      raise("type", "cannot pass a table with " .. type(k) .. " keys to a template")
    end
    keys[#keys + 1] = k
  end
  table.sort(keys, function(a, b)
    local ra, rb = KEY_RANK[a] or 1000, KEY_RANK[b] or 1000
    if ra ~= rb then return ra < rb end
    if type(a) ~= type(b) then return type(a) == "number" end
    return a < b
  end)
  local d = new_dict()
  for _, k in ipairs(keys) do dict_set(d, k, from_lua(v[k], depth + 1)) end
  return d
end
M.from_lua = from_lua

-- Converts a template value back to plain Lua (lists to arrays, dicts to tables, none
-- to nil): for tests and callers.
local function to_lua(v)
  local t = tagof(v)
  if t == "none" or t == "undef" then return nil end
  if t == "list" then
    local out = {}
    for i = 1, v.n do out[i] = to_lua(v.items[i]) end
    return out
  end
  if t == "dict" or t == "ns" then
    local out = {}
    for _, k in ipairs(v.keys) do out[k] = to_lua(v.map[k]) end
    return out
  end
  return v
end
M.to_lua = to_lua

-- ---------------------------------------------------------------------------
-- UTF-8 helpers (Python strings index by code point)

local function is_ascii(s) return not sfind(s, "[\128-\255]") end

local function chars(s)
  local out, n = {}, 0
  if is_ascii(s) then
    for i = 1, #s do out[i] = ssub(s, i, i) end
    return out, #s
  end
  for ch in s:gmatch("[\0-\127\192-\255][\128-\191]*") do
    n = n + 1
    out[n] = ch
  end
  return out, n
end

local function ulen(s)
  if is_ascii(s) then return #s end
  local ok, n = pcall(utf8.len, s)
  if ok and n then return n end
  local _, c = chars(s)
  return c
end

-- ---------------------------------------------------------------------------
-- Python str() and repr()

local function pyfloat(x)
  if x ~= x then return "nan" end
  if x == huge then return "inf" end
  if x == -huge then return "-inf" end
  if x == 0 then return (1 / x < 0) and "-0.0" or "0.0" end
  local digits, exp
  for p = 0, 16 do
    local s = sfmt("%." .. p .. "e", x)
    if tonumber(s) == x then
      local m, e = s:match("^(-?[%d%.]+)e([-+]%d+)$")
      digits, exp = m, tonumber(e)
      break
    end
  end
  if not digits then
    local s = sfmt("%.16e", x)
    local m, e = s:match("^(-?[%d%.]+)e([-+]%d+)$")
    digits, exp = m, tonumber(e)
  end
  local neg = digits:sub(1, 1) == "-"
  if neg then digits = digits:sub(2) end
  digits = digits:gsub("%.", "")
  digits = digits:gsub("0+$", "")
  if digits == "" then digits = "0" end
  local decpt = exp + 1
  local out
  if decpt > 16 or decpt < -3 then
    local mant = digits:sub(1, 1)
    if #digits > 1 then mant = mant .. "." .. digits:sub(2) end
    out = sfmt("%se%s%02d", mant, exp < 0 and "-" or "+", math.abs(exp))
  elseif decpt <= 0 then
    out = "0." .. srep("0", -decpt) .. digits
  elseif decpt >= #digits then
    out = digits .. srep("0", decpt - #digits) .. ".0"
  else
    out = digits:sub(1, decpt) .. "." .. digits:sub(decpt + 1)
  end
  return neg and ("-" .. out) or out
end

local pystr, pyrepr

local function repr_string(s)
  local q = "'"
  if s:find("'", 1, true) and not s:find('"', 1, true) then q = '"' end
  local out = s:gsub("[%c\\'\"]", function(c)
    if c == "\\" then return "\\\\" end
    if c == q then return "\\" .. c end
    if c == "'" or c == '"' then return c end
    if c == "\n" then return "\\n" end
    if c == "\r" then return "\\r" end
    if c == "\t" then return "\\t" end
    return sfmt("\\x%02x", sbyte(c))
  end)
  return q .. out .. q
end

function pyrepr(v)
  local t = tagof(v)
  if t == "string" then return repr_string(v) end
  return pystr(v, true)
end

function pystr(v, in_repr)
  local t = tagof(v)
  if t == "string" then return v end
  if t == "number" then
    if mtype(v) == "integer" then return sfmt("%d", v) end
    return pyfloat(v)
  end
  if t == "boolean" then return v and "True" or "False" end
  if t == "none" then return "None" end
  if t == "undef" then return "" end
  if t == "list" then
    local parts = {}
    for i = 1, v.n do parts[i] = pyrepr(v.items[i]) end
    if v.tuple then
      if v.n == 1 then return "(" .. parts[1] .. ",)" end
      return "(" .. concat(parts, ", ") .. ")"
    end
    return "[" .. concat(parts, ", ") .. "]"
  end
  if t == "dict" then
    local parts = {}
    for i, k in ipairs(v.keys) do parts[i] = pyrepr(k) .. ": " .. pyrepr(v.map[k]) end
    return "{" .. concat(parts, ", ") .. "}"
  end
  if t == "ns" then
    local parts = {}
    for i, k in ipairs(v.keys) do parts[i] = pyrepr(k) .. ": " .. pyrepr(v.map[k]) end
    return "<Namespace {" .. concat(parts, ", ") .. "}>"
  end
  if t == "range" then
    if v.step == 1 then return sfmt("range(%d, %d)", v.start, v.stop) end
    return sfmt("range(%d, %d, %d)", v.start, v.stop, v.step)
  end
  if t == "func" then return "<function " .. v.name .. ">" end
  if t == "loop" then return "<LoopContext " .. v.i .. "/" .. v.n .. ">" end
  if t == "markup" then return v.s end
  return "<" .. tostring(t) .. ">"
end
M.pystr = pystr

-- ---------------------------------------------------------------------------
-- JSON (Python's json.dumps, and an order-keeping decoder)

local function json_string(s, ensure_ascii)
  local out = s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    if c == "\n" then return "\\n" end
    if c == "\r" then return "\\r" end
    if c == "\t" then return "\\t" end
    if c == "\b" then return "\\b" end
    if c == "\f" then return "\\f" end
    return sfmt("\\u%04x", sbyte(c))
  end)
  if ensure_ascii and not is_ascii(out) then
    local parts = {}
    for _, ch in ipairs((chars(out))) do
      if #ch == 1 then
        parts[#parts + 1] = ch
      else
        local ok, cp = pcall(utf8.codepoint, ch)
        if not ok then cp = 0xFFFD end
        if cp >= 0x10000 then
          local v = cp - 0x10000
          parts[#parts + 1] = sfmt("\\u%04x\\u%04x", 0xD800 + (v >> 10), 0xDC00 + (v & 0x3FF))
        else
          parts[#parts + 1] = sfmt("\\u%04x", cp)
        end
      end
    end
    out = concat(parts)
  end
  return '"' .. out .. '"'
end

-- o: {indent = nil | string, ensure_ascii, sort_keys, item_sep, key_sep}
local function json_dump(v, o, level, out, node)
  local t = tagof(v)
  if t == "string" then
    out[#out + 1] = json_string(v, o.ensure_ascii)
  elseif t == "number" then
    if mtype(v) == "integer" then
      out[#out + 1] = sfmt("%d", v)
    elseif v ~= v then
      out[#out + 1] = "NaN"
    elseif v == huge then
      out[#out + 1] = "Infinity"
    elseif v == -huge then
      out[#out + 1] = "-Infinity"
    else
      out[#out + 1] = pyfloat(v)
    end
  elseif t == "boolean" then
    out[#out + 1] = v and "true" or "false"
  elseif t == "none" then
    out[#out + 1] = "null"
  elseif t == "list" or t == "dict" then
    if level > 200 then raise("limit", "tojson: value nested too deeply", node) end
    local is_list = t == "list"
    local count = is_list and v.n or #v.keys
    if count == 0 then
      out[#out + 1] = is_list and "[]" or "{}"
      return
    end
    out[#out + 1] = is_list and "[" or "{"
    local nl, inner = nil, nil
    if o.indent then
      inner = "\n" .. srep(o.indent, level + 1)
      nl = "\n" .. srep(o.indent, level)
    end
    local keys = v.keys
    if not is_list and o.sort_keys then
      keys = {}
      for i, k in ipairs(v.keys) do keys[i] = k end
      table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
    end
    for i = 1, count do
      if i > 1 then out[#out + 1] = o.item_sep end
      if inner then out[#out + 1] = inner end
      if is_list then
        json_dump(v.items[i], o, level + 1, out, node)
      else
        local k = keys[i]
        local ks
        if type(k) == "string" then
          ks = k
        elseif type(k) == "boolean" then
          ks = k and "true" or "false"
        elseif type(k) == "number" then
          ks = pystr(k)
        elseif k == NONE then
          ks = "null"
        else
          raise("type", "keys must be str, int, float, bool or None, not " .. pytype(k), node)
        end
        out[#out + 1] = json_string(ks, o.ensure_ascii)
        out[#out + 1] = o.key_sep
        json_dump(v.map[k], o, level + 1, out, node)
      end
    end
    if nl then out[#out + 1] = nl end
    out[#out + 1] = is_list and "]" or "}"
  elseif t == "range" then
    local items = {}
    for x = v.start, v.stop - (v.step > 0 and 1 or -1), v.step do items[#items + 1] = x end
    json_dump(new_list(items), o, level, out, node)
  else
    raise("type", "Object of type " .. pytype(v) .. " is not JSON serializable", node)
  end
end

local function dumps(v, opts, node)
  local o = { ensure_ascii = opts.ensure_ascii, sort_keys = opts.sort_keys }
  local indent = opts.indent
  if indent ~= nil and indent ~= NONE then
    if type(indent) == "number" then
      o.indent = srep(" ", math.max(0, floor(indent)))
    elseif type(indent) == "string" then
      o.indent = indent
    else
      raise("type", "tojson: indent must be an int or a string", node)
    end
  end
  o.item_sep = o.indent and "," or ", "
  o.key_sep = ": "
  if opts.separators ~= nil and opts.separators ~= NONE then
    local s = opts.separators
    if tagof(s) ~= "list" or s.n ~= 2 then raise("type", "tojson: separators must be a pair of strings", node) end
    o.item_sep, o.key_sep = pystr(s.items[1]), pystr(s.items[2])
  end
  local out = {}
  json_dump(v, o, 0, out, node)
  return concat(out)
end
M.dumps = function(v, opts) return dumps(from_lua(v), opts or {}) end

-- The decoder keeps object key order and tells integers (1) from floats (1.0).
local function json_decode(s)
  local pos = 1
  local function fail(msg) error(sfmt("JSON: %s at byte %d", msg, pos), 0) end
  local function ws() pos = s:find("[^ \t\r\n]", pos) or (#s + 1) end
  local value
  local escapes = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r", t = "\t" }
  local function str()
    pos = pos + 1
    local parts = {}
    while true do
      local a = s:find('["\\]', pos)
      if not a then fail("unterminated string") end
      parts[#parts + 1] = s:sub(pos, a - 1)
      if s:sub(a, a) == '"' then
        pos = a + 1
        break
      end
      local e = s:sub(a + 1, a + 1)
      if escapes[e] then
        parts[#parts + 1] = escapes[e]
        pos = a + 2
      elseif e == "u" then
        local h = s:sub(a + 2, a + 5)
        if not h:match("^%x%x%x%x$") then fail("bad \\u escape") end
        local cp = tonumber(h, 16)
        pos = a + 6
        if cp >= 0xD800 and cp <= 0xDBFF and s:sub(pos, pos + 1) == "\\u" then
          local lo = tonumber(s:sub(pos + 2, pos + 5), 16)
          if lo and lo >= 0xDC00 and lo <= 0xDFFF then
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
            pos = pos + 6
          end
        end
        parts[#parts + 1] = utf8.char(cp)
      else
        fail("bad escape")
      end
    end
    return concat(parts)
  end
  function value(depth)
    if depth > 200 then fail("nested too deeply") end
    ws()
    local c = s:sub(pos, pos)
    if c == "{" then
      pos = pos + 1
      local d = new_dict()
      ws()
      if s:sub(pos, pos) == "}" then
        pos = pos + 1
        return d
      end
      while true do
        ws()
        if s:sub(pos, pos) ~= '"' then fail("expected a key") end
        local k = str()
        ws()
        if s:sub(pos, pos) ~= ":" then fail("expected ':'") end
        pos = pos + 1
        dict_set(d, k, value(depth + 1))
        ws()
        local c2 = s:sub(pos, pos)
        pos = pos + 1
        if c2 == "}" then return d end
        if c2 ~= "," then fail("expected ',' or '}'") end
      end
    elseif c == "[" then
      pos = pos + 1
      local items, n = {}, 0
      ws()
      if s:sub(pos, pos) == "]" then
        pos = pos + 1
        return new_list(items, 0)
      end
      while true do
        n = n + 1
        items[n] = value(depth + 1)
        ws()
        local c2 = s:sub(pos, pos)
        pos = pos + 1
        if c2 == "]" then return new_list(items, n) end
        if c2 ~= "," then fail("expected ',' or ']'") end
      end
    elseif c == '"' then
      return str()
    elseif s:sub(pos, pos + 3) == "true" then
      pos = pos + 4
      return true
    elseif s:sub(pos, pos + 4) == "false" then
      pos = pos + 5
      return false
    elseif s:sub(pos, pos + 3) == "null" then
      pos = pos + 4
      return NONE
    else
      local num = s:match("^-?%d+%.?%d*[eE]?[-+]?%d*", pos)
      if not num or num == "" or num == "-" then fail("unexpected character") end
      pos = pos + #num
      local v
      if num:find("[.eE]") then v = tonumber(num) + 0.0 else v = math.tointeger(tonumber(num)) or tonumber(num) end
      if not v then fail("bad number") end
      return v
    end
  end
  local ok, res = pcall(function()
    local v = value(0)
    ws()
    if pos <= #s then fail("trailing data") end
    return v
  end)
  if not ok then return nil, res end
  return res
end
M.json_decode = json_decode

-- ---------------------------------------------------------------------------
-- lexer

local function is_ws_byte(b) return b == 32 or (b >= 9 and b <= 13) or (b >= 28 and b <= 31) end

local function rstrip_ws(s)
  local i = #s
  while i > 0 and is_ws_byte(sbyte(s, i)) do i = i - 1 end
  return s:sub(1, i)
end

local OPS2 = { ["//"] = true, ["**"] = true, ["=="] = true, ["!="] = true, ["<="] = true, [">="] = true }
local OPS1 = {}
for c in ("+-/*%~[](){}<>=.:|,;"):gmatch(".") do OPS1[c] = true end

local STR_ESC = { n = "\n", t = "\t", r = "\r", ["\\"] = "\\", ["'"] = "'", ['"'] = '"', a = "\a", b = "\b", f = "\f", v = "\v", ["\n"] = "" }

local function unescape(body)
  if not body:find("\\", 1, true) then return body end
  local out, i, n = {}, 1, #body
  while i <= n do
    local c = body:sub(i, i)
    if c ~= "\\" or i == n then
      out[#out + 1] = c
      i = i + 1
    else
      local e = body:sub(i + 1, i + 1)
      if STR_ESC[e] then
        out[#out + 1] = STR_ESC[e]
        i = i + 2
      elseif e == "x" and body:sub(i + 2, i + 3):match("^%x%x$") then
        out[#out + 1] = utf8.char(tonumber(body:sub(i + 2, i + 3), 16))
        i = i + 4
      elseif e == "u" and body:sub(i + 2, i + 5):match("^%x%x%x%x$") then
        out[#out + 1] = utf8.char(tonumber(body:sub(i + 2, i + 5), 16))
        i = i + 6
      elseif e == "U" and body:sub(i + 2, i + 9):match("^%x%x%x%x%x%x%x%x$") then
        out[#out + 1] = utf8.char(tonumber(body:sub(i + 2, i + 9), 16))
        i = i + 10
      elseif e:match("[0-7]") then
        local o = body:match("^[0-7][0-7]?[0-7]?", i + 1)
        out[#out + 1] = utf8.char(tonumber(o, 8))
        i = i + 1 + #o
      else
        out[#out + 1] = "\\" .. e
        i = i + 2
      end
    end
  end
  return concat(out)
end

local function lex(src)
  src = src:gsub("\r\n", "\n"):gsub("\r", "\n")
  if src:sub(-1) == "\n" then src = src:sub(1, -2) end -- keep_trailing_newline=False
  -- line starts, for positions
  local line_starts = { 1 }
  for p in src:gmatch("()\n") do line_starts[#line_starts + 1] = p + 1 end
  local function where(p)
    local lo, hi = 1, #line_starts
    while lo < hi do
      local mid = (lo + hi + 1) // 2
      if line_starts[mid] <= p then lo = mid else hi = mid - 1 end
    end
    return lo, p - line_starts[lo] + 1
  end
  local toks = {}
  local function push(t, v, p)
    local l, c = where(p)
    toks[#toks + 1] = { t = t, v = v, line = l, col = c }
  end
  local function lexfail(msg, p)
    local l, c = where(p)
    error({ jinja = true, kind = "syntax", message = msg, line = l, col = c }, 0)
  end
  local i, n = 1, #src
  local line_starting = true
  while i <= n do
    local j = src:find("{[{%%#]", i)
    if not j then
      push("data", src:sub(i), i)
      break
    end
    local kind = src:sub(j + 1, j + 1)
    local text = src:sub(i, j - 1)
    local sign = src:sub(j + 2, j + 2)
    if sign ~= "-" and sign ~= "+" then sign = "" end
    -- raw blocks
    local raw_open = kind == "%" and src:match("^{%%[-+]?%s*raw%s*[-+]?%%}", j)
    if sign == "-" then
      text = rstrip_ws(text)
    elseif sign ~= "+" and kind ~= "{" then
      local lpos = 0
      for p in text:gmatch("()\n") do lpos = p end
      if lpos > 0 or line_starting then
        local rest = text:sub(lpos + 1)
        if #rest > 0 and rest:match("^[ \t\f\v\r\28-\31]+$") then text = text:sub(1, lpos) end
      end
    end
    if #text > 0 then push("data", text, i) end
    if raw_open then
      local after = j + #raw_open
      if raw_open:sub(-3, -3) == "-" then
        after = src:find("[^ \t\n\r\f\v]", after) or (n + 1)
      end
      local a, b = src:find("{%%[-+]?%s*endraw%s*[-+]?%%}", after)
      if not a then lexfail("missing endraw (opened here)", j) end
      local body = src:sub(after, a - 1)
      local closer = src:sub(a, b)
      if closer:sub(3, 3) == "-" then body = rstrip_ws(body) end
      if #body > 0 then push("data", body, after) end
      i = b + 1
      if closer:sub(-3, -3) == "-" then
        i = src:find("[^ \t\n\r\f\v]", i) or (n + 1)
      elseif closer:sub(-3, -3) ~= "+" and src:sub(i, i) == "\n" then
        i = i + 1
      end
      line_starting = src:sub(i - 1, i - 1) == "\n"
      goto continue
    end
    if kind == "#" then
      local a = src:find("#}", j + 2, true)
      if not a then lexfail("missing end of comment tag", j) end
      local mod = src:sub(a - 1, a - 1)
      i = a + 2
      if mod == "-" and a - 1 > j + 1 then
        i = src:find("[^ \t\n\r\f\v]", i) or (n + 1)
      elseif mod ~= "+" and src:sub(i, i) == "\n" then
        i = i + 1
      end
      line_starting = src:sub(i - 1, i - 1) == "\n"
      goto continue
    end
    do
      local is_block = kind == "%"
      push(is_block and "block_begin" or "var_begin", nil, j)
      i = j + 2 + (sign ~= "" and 1 or 0)
      local depth = 0
      while true do
        i = src:find("[^ \t\n\r\f\v]", i) or (n + 1)
        if i > n then lexfail(is_block and "unexpected end of template: missing '%}'" or "unexpected end of template: missing '}}'", j) end
        if depth == 0 then
          if is_block then
            local s3 = src:sub(i, i + 2)
            if s3 == "-%}" then
              push("block_end", nil, i)
              i = src:find("[^ \t\n\r\f\v]", i + 3) or (n + 1)
              break
            elseif s3 == "+%}" then
              push("block_end", nil, i)
              i = i + 3
              break
            elseif src:sub(i, i + 1) == "%}" then
              push("block_end", nil, i)
              i = i + 2
              if src:sub(i, i) == "\n" then i = i + 1 end
              break
            end
          else
            if src:sub(i, i + 2) == "-}}" then
              push("var_end", nil, i)
              i = src:find("[^ \t\n\r\f\v]", i + 3) or (n + 1)
              break
            elseif src:sub(i, i + 1) == "}}" then
              push("var_end", nil, i)
              i = i + 2
              break
            end
          end
        end
        local c = src:sub(i, i)
        if c:match("%d") then
          local prev = src:sub(i - 1, i - 1)
          local num = src:match("^%d[%d_]*", i)
          local fl = nil
          if prev ~= "." then
            fl = src:match("^%d[%d_]*%.%d[%d_]*[eE][-+]?%d[%d_]*", i)
              or src:match("^%d[%d_]*[eE][-+]?%d[%d_]*", i)
              or src:match("^%d[%d_]*%.%d[%d_]*", i)
          end
          if fl then
            push("float", tonumber((fl:gsub("_", ""))) + 0.0, i)
            i = i + #fl
          else
            local v = math.tointeger(tonumber((num:gsub("_", ""))))
            if not v then lexfail("integer literal too large", i) end
            push("int", v, i)
            i = i + #num
          end
        elseif c:match("[%a_]") then
          local name = src:match("^[%a_][%w_]*", i)
          push("name", name, i)
          i = i + #name
        elseif c == "'" or c == '"' then
          local k = i + 1
          while true do
            local a = src:find("[\\" .. c .. "]", k)
            if not a then lexfail("unterminated string", i) end
            if src:sub(a, a) == "\\" then
              k = a + 2
            else
              push("string", unescape(src:sub(i + 1, a - 1)), i)
              i = a + 1
              break
            end
          end
        else
          local two = src:sub(i, i + 1)
          if OPS2[two] then
            push("op", two, i)
            i = i + 2
          elseif OPS1[c] then
            if c == "(" or c == "[" or c == "{" then
              depth = depth + 1
            elseif c == ")" or c == "]" or c == "}" then
              if depth == 0 then lexfail("unexpected '" .. c .. "'", i) end
              depth = depth - 1
            end
            push("op", c, i)
            i = i + 1
          else
            lexfail("unexpected character '" .. c .. "'", i)
          end
        end
      end
      line_starting = src:sub(i - 1, i - 1) == "\n"
    end
    ::continue::
  end
  push("eof", nil, n + 1)
  return toks
end

-- ---------------------------------------------------------------------------
-- parser

local Parser = {}
Parser.__index = Parser

local function pfail(tok, msg)
  error({ jinja = true, kind = "syntax", message = msg, line = tok.line, col = tok.col }, 0)
end

function Parser:peek(k) return self.toks[self.pos + (k or 0)] end
function Parser:next()
  local t = self.toks[self.pos]
  self.pos = self.pos + 1
  return t
end
function Parser:is_op(v, k)
  local t = self:peek(k)
  return t.t == "op" and t.v == v
end
function Parser:is_name(v, k)
  local t = self:peek(k)
  return t.t == "name" and t.v == v
end
function Parser:expect_op(v)
  local t = self:next()
  if t.t ~= "op" or t.v ~= v then
    pfail(t, "expected '" .. v .. "', got " .. (t.v and ("'" .. tostring(t.v) .. "'") or t.t))
  end
  return t
end
function Parser:expect_name(v)
  local t = self:next()
  if t.t ~= "name" or (v and t.v ~= v) then
    pfail(t, "expected " .. (v and ("'" .. v .. "'") or "a name") .. ", got " .. (t.v and ("'" .. tostring(t.v) .. "'") or t.t))
  end
  return t
end
function Parser:expect_block_end()
  local t = self:next()
  if t.t ~= "block_end" then pfail(t, "expected the end of the statement ('%}'), got " .. (t.v and ("'" .. tostring(t.v) .. "'") or t.t)) end
end

local function node(k, tok, fields)
  fields.k = k
  fields.line, fields.col = tok.line, tok.col
  return fields
end

function Parser:enter(tok)
  self.depth = self.depth + 1
  if self.depth > 200 then pfail(tok, "template nested too deeply") end
end
function Parser:leave() self.depth = self.depth - 1 end

-- expressions
function Parser:parse_expression(no_cond)
  if no_cond then return self:parse_or() end
  return self:parse_condexpr()
end

function Parser:parse_condexpr()
  local tok = self:peek()
  local e = self:parse_or()
  while self:is_name("if") do
    self:next()
    local c = self:parse_or()
    local other = nil
    if self:is_name("else") then
      self:next()
      other = self:parse_condexpr()
    end
    e = node("cond", tok, { test = c, a = e, b = other })
  end
  return e
end

function Parser:parse_or()
  local tok = self:peek()
  local e = self:parse_and()
  while self:is_name("or") do
    self:next()
    e = node("or", tok, { a = e, b = self:parse_and() })
  end
  return e
end

function Parser:parse_and()
  local tok = self:peek()
  local e = self:parse_not()
  while self:is_name("and") do
    self:next()
    e = node("and", tok, { a = e, b = self:parse_not() })
  end
  return e
end

function Parser:parse_not()
  local tok = self:peek()
  if self:is_name("not") then
    self:next()
    self:enter(tok)
    local e = node("not", tok, { e = self:parse_not() })
    self:leave()
    return e
  end
  return self:parse_compare()
end

local CMP = { ["=="] = true, ["!="] = true, ["<"] = true, ["<="] = true, [">"] = true, [">="] = true }

function Parser:parse_compare()
  local tok = self:peek()
  local e = self:parse_math1()
  local ops = {}
  while true do
    local t = self:peek()
    if t.t == "op" and CMP[t.v] then
      self:next()
      ops[#ops + 1] = { t.v, self:parse_math1() }
    elseif self:is_name("in") then
      self:next()
      ops[#ops + 1] = { "in", self:parse_math1() }
    elseif self:is_name("not") and self:is_name("in", 1) then
      self:next()
      self:next()
      ops[#ops + 1] = { "notin", self:parse_math1() }
    else
      break
    end
  end
  if #ops == 0 then return e end
  return node("cmp", tok, { first = e, ops = ops })
end

function Parser:parse_math1()
  local tok = self:peek()
  local e = self:parse_concat()
  while self:is_op("+") or self:is_op("-") do
    local op = self:next().v
    e = node("bin", tok, { op = op, a = e, b = self:parse_concat() })
  end
  return e
end

function Parser:parse_concat()
  local tok = self:peek()
  local parts = { self:parse_math2() }
  while self:is_op("~") do
    self:next()
    parts[#parts + 1] = self:parse_math2()
  end
  if #parts == 1 then return parts[1] end
  return node("concat", tok, { parts = parts })
end

function Parser:parse_math2()
  local tok = self:peek()
  local e = self:parse_pow()
  while self:is_op("*") or self:is_op("/") or self:is_op("//") or self:is_op("%") do
    local op = self:next().v
    e = node("bin", tok, { op = op, a = e, b = self:parse_pow() })
  end
  return e
end

function Parser:parse_pow()
  local tok = self:peek()
  local e = self:parse_unary(true)
  while self:is_op("**") do
    self:next()
    e = node("bin", tok, { op = "**", a = e, b = self:parse_unary(true) })
  end
  return e
end

function Parser:parse_unary(with_filter)
  local tok = self:peek()
  local e
  self:enter(tok)
  if self:is_op("-") then
    self:next()
    e = node("neg", tok, { e = self:parse_unary(false) })
  elseif self:is_op("+") then
    self:next()
    e = node("pos", tok, { e = self:parse_unary(false) })
  else
    e = self:parse_primary()
  end
  e = self:parse_postfix(e)
  if with_filter then e = self:parse_filter_expr(e) end
  self:leave()
  return e
end

function Parser:parse_primary()
  local tok = self:next()
  if tok.t == "name" then
    local v = tok.v
    if v == "true" or v == "True" then return node("const", tok, { v = true }) end
    if v == "false" or v == "False" then return node("const", tok, { v = false }) end
    if v == "none" or v == "None" then return node("const", tok, { v = NONE }) end
    return node("name", tok, { n = v })
  elseif tok.t == "string" then
    local parts = { tok.v }
    while self:peek().t == "string" do parts[#parts + 1] = self:next().v end
    return node("const", tok, { v = concat(parts) })
  elseif tok.t == "int" or tok.t == "float" then
    return node("const", tok, { v = tok.v })
  elseif tok.t == "op" and tok.v == "(" then
    self:enter(tok)
    local e = self:parse_tuple(false, true)
    self:expect_op(")")
    self:leave()
    return e
  elseif tok.t == "op" and tok.v == "[" then
    self:enter(tok)
    local items = {}
    while not self:is_op("]") do
      if #items > 0 then
        self:expect_op(",")
        if self:is_op("]") then break end
      end
      items[#items + 1] = self:parse_expression()
    end
    self:expect_op("]")
    self:leave()
    return node("list", tok, { items = items })
  elseif tok.t == "op" and tok.v == "{" then
    self:enter(tok)
    local pairs_ = {}
    while not self:is_op("}") do
      if #pairs_ > 0 then
        self:expect_op(",")
        if self:is_op("}") then break end
      end
      local key = self:parse_expression()
      self:expect_op(":")
      pairs_[#pairs_ + 1] = { key, self:parse_expression() }
    end
    self:expect_op("}")
    self:leave()
    return node("dict", tok, { pairs = pairs_ })
  end
  pfail(tok, "unexpected " .. (tok.v and ("'" .. tostring(tok.v) .. "'") or tok.t) .. " in an expression")
end

-- parses expr[, expr...]: a tuple when there is a comma (or for "()")
function Parser:parse_tuple(no_cond, explicit_parens)
  local tok = self:peek()
  local items = {}
  local comma = false
  while true do
    if #items > 0 then
      if not self:is_op(",") then break end
      self:next()
      comma = true
    end
    local t = self:peek()
    if t.t == "block_end" or t.t == "var_end" or (t.t == "op" and t.v == ")") or (t.t == "name" and (t.v == "if" or t.v == "recursive") and no_cond) then
      break
    end
    if t.t == "op" and t.v == "=" then break end
    items[#items + 1] = self:parse_expression(no_cond)
  end
  if #items == 0 then
    if explicit_parens then return node("tuple", tok, { items = items }) end
    pfail(tok, "expected an expression")
  end
  if not comma then return items[1] end
  return node("tuple", tok, { items = items })
end

function Parser:parse_call_args()
  local args, kwargs = {}, {}
  self:expect_op("(")
  while not self:is_op(")") do
    if #args > 0 or #kwargs > 0 or args.dyn or kwargs.dyn then
      self:expect_op(",")
      if self:is_op(")") then break end
    end
    if self:is_op("*") then
      self:next()
      args.dyn = self:parse_expression()
    elseif self:is_op("**") then
      self:next()
      kwargs.dyn = self:parse_expression()
    elseif self:peek().t == "name" and self:is_op("=", 1) then
      local key = self:next().v
      self:next()
      kwargs[#kwargs + 1] = { key, self:parse_expression() }
    else
      if #kwargs > 0 then pfail(self:peek(), "positional argument after a keyword argument") end
      args[#args + 1] = self:parse_expression()
    end
  end
  self:expect_op(")")
  return args, kwargs
end

function Parser:parse_postfix(e)
  while true do
    local tok = self:peek()
    if self:is_op(".") then
      self:next()
      local t = self:next()
      if t.t == "name" then
        e = node("getattr", tok, { obj = e, attr = t.v })
      elseif t.t == "int" then
        e = node("getitem", tok, { obj = e, key = node("const", t, { v = t.v }) })
      else
        pfail(t, "expected an attribute name after '.'")
      end
    elseif self:is_op("[") then
      self:next()
      self:enter(tok)
      local parts, is_slice = { nil, nil, nil }, false
      local idx = 1
      while not self:is_op("]") do
        if self:is_op(":") then
          self:next()
          is_slice = true
          idx = idx + 1
          if idx > 3 then pfail(tok, "too many ':' in a slice") end
        else
          if parts[idx] then pfail(self:peek(), "expected ']'") end
          parts[idx] = self:parse_expression()
        end
      end
      self:expect_op("]")
      self:leave()
      if is_slice then
        e = node("slice", tok, { obj = e, start = parts[1], stop = parts[2], step = parts[3] })
      else
        if not parts[1] then pfail(tok, "expected a subscript") end
        e = node("getitem", tok, { obj = e, key = parts[1] })
      end
    elseif self:is_op("(") then
      local args, kwargs = self:parse_call_args()
      e = node("call", tok, { fn = e, args = args, kwargs = kwargs })
    else
      return e
    end
  end
end

function Parser:parse_filter_expr(e)
  while true do
    local tok = self:peek()
    if self:is_op("|") then
      self:next()
      local name = self:expect_name().v
      while self:is_op(".") do
        self:next()
        name = name .. "." .. self:expect_name().v
      end
      local args, kwargs = {}, {}
      if self:is_op("(") then args, kwargs = self:parse_call_args() end
      e = node("filter", tok, { e = e, name = name, args = args, kwargs = kwargs })
    elseif self:is_name("is") then
      self:next()
      local neg = false
      if self:is_name("not") then
        self:next()
        neg = true
      end
      local name = self:expect_name().v
      while self:is_op(".") do
        self:next()
        name = name .. "." .. self:expect_name().v
      end
      local args, kwargs = {}, {}
      local t = self:peek()
      if self:is_op("(") then
        args, kwargs = self:parse_call_args()
      elseif (t.t == "name" or t.t == "string" or t.t == "int" or t.t == "float" or (t.t == "op" and (t.v == "[" or t.v == "{")))
        and not (t.t == "name" and (t.v == "else" or t.v == "or" or t.v == "and")) then
        if t.t == "name" and t.v == "is" then pfail(t, "you cannot chain multiple tests with is") end
        args = { self:parse_postfix(self:parse_primary()) }
      end
      e = node("test", tok, { e = e, name = name, args = args, kwargs = kwargs, neg = neg })
    elseif self:is_op("(") then
      local args, kwargs = self:parse_call_args()
      e = node("call", tok, { fn = e, args = args, kwargs = kwargs })
    else
      return e
    end
  end
end

-- statements
function Parser:parse_assign_target(allow_attr)
  local tok = self:peek()
  local names = {}
  local parens = false
  if self:is_op("(") then
    self:next()
    parens = true
  end
  while true do
    local t = self:expect_name()
    if allow_attr and self:is_op(".") then
      self:next()
      local attr = self:expect_name().v
      if parens or #names > 0 then pfail(t, "cannot assign to an attribute inside a tuple") end
      return node("nsattr", tok, { n = t.v, attr = attr })
    end
    names[#names + 1] = t.v
    if self:is_op(",") then
      self:next()
    else
      break
    end
  end
  if parens then self:expect_op(")") end
  if #names == 1 and not parens then return node("target", tok, { n = names[1] }) end
  return node("targets", tok, { names = names })
end

-- Parses statements until a block whose first name is in `ends`; returns the body and
-- the name found (the block_begin and the name are consumed).
function Parser:parse_body(ends, opener)
  local body = {}
  while true do
    local t = self:peek()
    if t.t == "eof" then
      if ends then
        local want = {}
        for k in pairs(ends) do want[#want + 1] = "'" .. k .. "'" end
        table.sort(want)
        pfail(opener or t, "unexpected end of template: the block opened here needs " .. concat(want, " or "))
      end
      return body, nil
    elseif t.t == "data" then
      self:next()
      body[#body + 1] = node("data", t, { s = t.v })
    elseif t.t == "var_begin" then
      self:next()
      local e = self:parse_tuple(false, false)
      local te = self:next()
      if te.t ~= "var_end" then pfail(te, "expected '}}', got " .. (te.v and ("'" .. tostring(te.v) .. "'") or te.t)) end
      body[#body + 1] = node("output", t, { e = e })
    elseif t.t == "block_begin" then
      local nt = self:peek(1)
      if nt.t ~= "name" then pfail(nt, "expected a statement name after '{%'") end
      if ends and ends[nt.v] then
        self:next()
        self:next()
        return body, nt.v
      end
      self:next()
      body[#body + 1] = self:parse_statement()
    else
      pfail(t, "unexpected " .. t.t)
    end
  end
end

local UNSUPPORTED = { include = true, import = true, from = true, extends = true, block = true, ["do"] = true, autoescape = true, trans = true }

function Parser:parse_statement()
  local tok = self:next()
  local name = tok.v
  self:enter(tok)
  local res
  if name == "if" then
    local tests = {}
    local cond = self:parse_tuple(false, false)
    self:expect_block_end()
    local else_body
    while true do
      local body, ended = self:parse_body({ elif = true, ["else"] = true, endif = true }, tok)
      tests[#tests + 1] = { cond, body }
      if ended == "elif" then
        cond = self:parse_tuple(false, false)
        self:expect_block_end()
      elseif ended == "else" then
        self:expect_block_end()
        else_body = self:parse_body({ endif = true }, tok)
        self:expect_block_end()
        break
      else
        self:expect_block_end()
        break
      end
    end
    res = node("if", tok, { tests = tests, else_ = else_body })
  elseif name == "for" then
    local target = self:parse_assign_target(false)
    self:expect_name("in")
    local iter = self:parse_tuple(true, false)
    local cond
    if self:is_name("if") then
      self:next()
      cond = self:parse_expression()
    end
    if self:is_name("recursive") then pfail(self:peek(), "recursive loops are not supported") end
    self:expect_block_end()
    local body, ended = self:parse_body({ endfor = true, ["else"] = true }, tok)
    local else_body
    if ended == "else" then
      self:expect_block_end()
      else_body = self:parse_body({ endfor = true }, tok)
    end
    self:expect_block_end()
    res = node("for", tok, { target = target, iter = iter, cond = cond, body = body, else_ = else_body })
  elseif name == "set" then
    local target = self:parse_assign_target(true)
    if self:is_op("=") then
      self:next()
      local e = self:parse_tuple(false, false)
      self:expect_block_end()
      res = node("set", tok, { target = target, e = e })
    else
      local filters = {}
      while self:is_op("|") do
        self:next()
        local fname = self:expect_name().v
        local args, kwargs = {}, {}
        if self:is_op("(") then args, kwargs = self:parse_call_args() end
        filters[#filters + 1] = { fname, args, kwargs }
      end
      self:expect_block_end()
      local body = self:parse_body({ endset = true }, tok)
      self:expect_block_end()
      res = node("setblock", tok, { target = target, body = body, filters = filters })
    end
  elseif name == "macro" then
    local mname = self:expect_name().v
    local params, defaults = {}, {}
    self:expect_op("(")
    while not self:is_op(")") do
      if #params > 0 then
        self:expect_op(",")
        if self:is_op(")") then break end
      end
      local p = self:expect_name().v
      params[#params + 1] = p
      if self:is_op("=") then
        self:next()
        defaults[p] = self:parse_expression()
      end
    end
    self:expect_op(")")
    self:expect_block_end()
    local body = self:parse_body({ endmacro = true }, tok)
    if self:peek().t == "name" and self:peek().v == mname then self:next() end
    self:expect_block_end()
    res = node("macro", tok, { name = mname, params = params, defaults = defaults, body = body })
  elseif name == "call" then
    local params, defaults = {}, {}
    if self:is_op("(") then
      self:next()
      while not self:is_op(")") do
        if #params > 0 then
          self:expect_op(",")
          if self:is_op(")") then break end
        end
        local p = self:expect_name().v
        params[#params + 1] = p
        if self:is_op("=") then
          self:next()
          defaults[p] = self:parse_expression()
        end
      end
      self:expect_op(")")
    end
    local call = self:parse_expression()
    if call.k ~= "call" then pfail(tok, "expected a call after 'call'") end
    self:expect_block_end()
    local body = self:parse_body({ endcall = true }, tok)
    self:expect_block_end()
    res = node("callblock", tok, { call = call, params = params, defaults = defaults, body = body })
  elseif name == "filter" then
    local filters = {}
    repeat
      if #filters > 0 then self:next() end
      local fname = self:expect_name().v
      local args, kwargs = {}, {}
      if self:is_op("(") then args, kwargs = self:parse_call_args() end
      filters[#filters + 1] = { fname, args, kwargs }
    until not self:is_op("|")
    self:expect_block_end()
    local body = self:parse_body({ endfilter = true }, tok)
    self:expect_block_end()
    res = node("filterblock", tok, { filters = filters, body = body })
  elseif name == "generation" then
    self:expect_block_end()
    local body = self:parse_body({ endgeneration = true }, tok)
    self:expect_block_end()
    res = node("generation", tok, { body = body })
  elseif name == "with" then
    local assigns = {}
    while not (self:peek().t == "block_end") do
      if #assigns > 0 then self:expect_op(",") end
      local target = self:parse_assign_target(false)
      self:expect_op("=")
      assigns[#assigns + 1] = { target, self:parse_expression() }
    end
    self:expect_block_end()
    local body = self:parse_body({ endwith = true }, tok)
    self:expect_block_end()
    res = node("with", tok, { assigns = assigns, body = body })
  elseif name == "break" or name == "continue" then
    if self.loops == 0 then pfail(tok, "'" .. name .. "' outside of a loop") end
    self:expect_block_end()
    res = node(name, tok, {})
  elseif UNSUPPORTED[name] then
    pfail(tok, "the '" .. name .. "' tag is not supported in chat templates")
  else
    pfail(tok, "unknown tag '" .. tostring(name) .. "'")
  end
  self:leave()
  return res
end

-- loop depth for break/continue checks: counted around for bodies
local orig_parse_statement = Parser.parse_statement
function Parser:parse_statement()
  if self:peek().t == "name" and self:peek().v == "for" then
    self.loops = self.loops + 1
    local ok, res = pcall(orig_parse_statement, self)
    self.loops = self.loops - 1
    if not ok then error(res, 0) end
    return res
  elseif self:peek().t == "name" and self:peek().v == "macro" then
    local saved = self.loops
    self.loops = 0
    local ok, res = pcall(orig_parse_statement, self)
    self.loops = saved
    if not ok then error(res, 0) end
    return res
  end
  return orig_parse_statement(self)
end

-- ---------------------------------------------------------------------------
-- evaluation

local eval, exec_body, getattr_v, getitem_v, call_value

local function step(S, nd)
  local s = S.steps + 1
  S.steps = s
  if s > S.max_steps then
    raise("limit", sfmt("the template ran for more than %d steps (an endless or very long loop?)", S.max_steps), nd)
  end
end

local function check_size(S, len, nd)
  if len > S.max_output then
    raise("limit", sfmt("the template built a string or output of more than %d bytes", S.max_output), nd)
  end
end

-- Counts n steps of work at once (building a long list or string piece by piece),
-- before the work is done.
local function charge(S, n, nd)
  S.steps = S.steps + n
  if S.steps > S.max_steps then step(S, nd) end
end

local function out_write(S, s)
  if s == "" then return end
  local o = S.out
  o.len = o.len + #s
  S.total = S.total + #s
  if S.total > S.max_output then
    raise("limit", sfmt("the template's output exceeds %d bytes", S.max_output), S.node)
  end
  o.n = o.n + 1
  o.parts[o.n] = s
end

local function capture(S, fn)
  local saved = S.out
  S.out = { parts = {}, n = 0, len = 0 }
  local ok, err = pcall(fn)
  local res = concat(S.out.parts, "", 1, S.out.n)
  S.out = saved
  if not ok then error(err, 0) end
  return res
end

local function truthy(v)
  if v == nil or v == false or v == NONE then return false end
  local t = type(v)
  if t == "number" then return v ~= 0 end
  if t == "string" then return v ~= "" end
  if t == "table" then
    local g = v[TAG]
    if g == "undef" then return false end
    if g == "list" then return v.n > 0 end
    if g == "dict" then return #v.keys > 0 end
    if g == "range" then return v.len > 0 end
  end
  return true
end
M.truthy = truthy

local function undef_fail(u, nd)
  raise("undefined", u.hint or "undefined value", nd)
end

local function num_of(v)
  if type(v) == "number" then return v end
  if type(v) == "boolean" then return v and 1 or 0 end
  return nil
end

local eq
function eq(a, b)
  if a == b then return true end
  local ta, tb = tagof(a), tagof(b)
  if (ta == "number" or ta == "boolean") and (tb == "number" or tb == "boolean") then
    return num_of(a) == num_of(b)
  end
  if ta ~= tb then return false end
  if ta == "list" then
    if (a.tuple or false) ~= (b.tuple or false) or a.n ~= b.n then return false end
    for i = 1, a.n do
      if not eq(a.items[i], b.items[i]) then return false end
    end
    return true
  end
  if ta == "dict" then
    if #a.keys ~= #b.keys then return false end
    for _, k in ipairs(a.keys) do
      local bv = b.map[k]
      if bv == nil or not eq(a.map[k], bv) then return false end
    end
    return true
  end
  if ta == "undef" then return true end
  if ta == "range" then return a.start == b.start and a.len == b.len and (a.len <= 1 or a.step == b.step) end
  return false
end

local function lt(a, b, nd)
  local na, nb = num_of(a), num_of(b)
  if na and nb then return na < nb end
  local ta, tb = tagof(a), tagof(b)
  if ta == "string" and tb == "string" then return a < b end
  if ta == "list" and tb == "list" then
    local n = math.min(a.n, b.n)
    for i = 1, n do
      if not eq(a.items[i], b.items[i]) then return lt(a.items[i], b.items[i], nd) end
    end
    return a.n < b.n
  end
  if ta == "undef" then undef_fail(a, nd) end
  if tb == "undef" then undef_fail(b, nd) end
  raise("type", sfmt("'<' not supported between instances of '%s' and '%s'", pytype(a), pytype(b)), nd)
end

-- iteration: an array of values and its count
local function range_items(S, r, nd)
  local items = {}
  local n = 0
  for x = r.start, r.stop - (r.step > 0 and 1 or -1), r.step do
    n = n + 1
    if n % 64 == 0 then
      S.steps = S.steps + 64
      if S.steps > S.max_steps then step(S, nd) end
    end
    items[n] = x
  end
  return items, n
end

local function iterate(S, v, nd)
  local t = tagof(v)
  if t == "list" then return v.items, v.n end
  if t == "dict" or t == "ns" then return v.keys, #v.keys end
  if t == "string" then
    charge(S, #v // 4, nd)
    return chars(v)
  end
  if t == "range" then return range_items(S, v, nd) end
  if t == "undef" then return {}, 0 end
  raise("type", sfmt("'%s' object is not iterable", pytype(v)), nd)
end

local function contains(S, container, item, nd)
  local t = tagof(container)
  if t == "string" then
    if type(item) ~= "string" then
      raise("type", sfmt("'in <string>' requires string as left operand, not %s", pytype(item)), nd)
    end
    return sfind(container, item, 1, true) ~= nil
  end
  if t == "dict" or t == "ns" then
    if type(item) == "string" or type(item) == "number" or type(item) == "boolean" then
      return container.map[item] ~= nil
    end
    return false
  end
  if t == "list" then
    for i = 1, container.n do
      if eq(container.items[i], item) then return true end
    end
    return false
  end
  if t == "range" then
    local x = num_of(item)
    if not x or x ~= floor(x) then return false end
    if container.step > 0 then
      return x >= container.start and x < container.stop and (x - container.start) % container.step == 0
    else
      return x <= container.start and x > container.stop and (container.start - x) % (-container.step) == 0
    end
  end
  if t == "undef" then return false end
  raise("type", sfmt("argument of type '%s' is not iterable", pytype(container)), nd)
end

-- arithmetic
local function arith(S, op, a, b, nd)
  local ta, tb = tagof(a), tagof(b)
  if ta == "undef" then undef_fail(a, nd) end
  if tb == "undef" then undef_fail(b, nd) end
  local na, nb = num_of(a), num_of(b)
  if na and nb then
    if op == "+" then return na + nb end
    if op == "-" then return na - nb end
    if op == "*" then return na * nb end
    if op == "/" then
      if nb == 0 then raise("type", "division by zero", nd) end
      return na / nb
    end
    if op == "//" then
      if nb == 0 then raise("type", "integer division or modulo by zero", nd) end
      return na // nb
    end
    if op == "%" then
      if nb == 0 then raise("type", "integer division or modulo by zero", nd) end
      return na % nb
    end
    if op == "**" then
      if mtype(na) == "integer" and mtype(nb) == "integer" and nb >= 0 then
        local r = 1
        for _ = 1, nb do
          r = r * na
          if r > 2 ^ 62 or r < -2 ^ 62 then raise("limit", "integer result too large", nd) end
        end
        return r
      end
      return (na + 0.0) ^ nb
    end
  end
  if op == "+" then
    if ta == "string" and tb == "string" then
      check_size(S, #a + #b, nd)
      return a .. b
    end
    if ta == "list" and tb == "list" and (a.tuple or false) == (b.tuple or false) then
      local items = {}
      for i = 1, a.n do items[i] = a.items[i] end
      for i = 1, b.n do items[a.n + i] = b.items[i] end
      return new_list(items, a.n + b.n, a.tuple)
    end
    if ta == "string" then
      raise("type", sfmt('can only concatenate str (not "%s") to str', pytype(b)), nd)
    end
  elseif op == "*" then
    local s, k = nil, nil
    if ta == "string" and mtype(b) == "integer" then s, k = a, b end
    if tb == "string" and mtype(a) == "integer" then s, k = b, a end
    if s then
      if k <= 0 then return "" end
      check_size(S, #s * k, nd)
      return srep(s, k)
    end
    local l = nil
    if ta == "list" and mtype(b) == "integer" then l, k = a, b end
    if tb == "list" and mtype(a) == "integer" then l, k = b, a end
    if l then
      charge(S, l.n * math.max(k, 0), nd)
      local items, n = {}, 0
      for _ = 1, k do
        for i = 1, l.n do
          n = n + 1
          items[n] = l.items[i]
        end
      end
      return new_list(items, n, l.tuple)
    end
  end
  raise("type", sfmt("unsupported operand type(s) for %s: '%s' and '%s'", op, pytype(a), pytype(b)), nd)
end

-- string helpers
-- Python's str.isspace() beyond ASCII, as UTF-8 sequences
local UNICODE_SPACE = {}
for _, cp in ipairs({ 0x85, 0xA0, 0x1680, 0x2000, 0x2001, 0x2002, 0x2003, 0x2004, 0x2005, 0x2006, 0x2007,
  0x2008, 0x2009, 0x200A, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000 }) do
  UNICODE_SPACE[utf8.char(cp)] = true
end

local function strip_chars(s, cs, left, right)
  if cs == nil or cs == NONE then
    local i, j = 1, #s
    while true do
      local moved = false
      if left then
        while i <= j and is_ws_byte(sbyte(s, i)) do i = i + 1 end
        local b = sbyte(s, i)
        if b and b >= 0xC2 then
          local len = b >= 0xE0 and 3 or 2
          if i + len - 1 <= j and UNICODE_SPACE[s:sub(i, i + len - 1)] then
            i = i + len
            moved = true
          end
        end
      end
      if right then
        while j >= i and is_ws_byte(sbyte(s, j)) do j = j - 1 end
        for len = 2, 3 do
          if j - len + 1 >= i and UNICODE_SPACE[s:sub(j - len + 1, j)] then
            j = j - len
            moved = true
            break
          end
        end
      end
      if not moved then break end
    end
    return s:sub(i, j)
  end
  if type(cs) ~= "string" then raise("type", "strip arg must be None or str") end
  local set = {}
  for _, c in ipairs((chars(cs))) do set[c] = true end
  local arr, n = chars(s)
  local i, j = 1, n
  if left then while i <= j and set[arr[i]] do i = i + 1 end end
  if right then while j >= i and set[arr[j]] do j = j - 1 end end
  return concat(arr, "", i, j)
end

local function py_split(s, sep, maxsplit)
  local out = {}
  maxsplit = (maxsplit == nil or maxsplit == NONE) and -1 or maxsplit
  if sep == nil or sep == NONE then
    local i, n = 1, #s
    while true do
      while i <= n and is_ws_byte(sbyte(s, i)) do i = i + 1 end
      if i > n then break end
      if maxsplit >= 0 and #out >= maxsplit then
        local rest = s:sub(i)
        local k = #rest
        while k > 0 and is_ws_byte(sbyte(rest, k)) do k = k - 1 end
        out[#out + 1] = rest:sub(1, k)
        break
      end
      local j = i
      while j <= n and not is_ws_byte(sbyte(s, j)) do j = j + 1 end
      out[#out + 1] = s:sub(i, j - 1)
      i = j
    end
    return out
  end
  if sep == "" then raise("type", "empty separator") end
  local i = 1
  while true do
    if maxsplit >= 0 and #out >= maxsplit then break end
    local a, b = sfind(s, sep, i, true)
    if not a then break end
    out[#out + 1] = s:sub(i, a - 1)
    i = b + 1
  end
  out[#out + 1] = s:sub(i)
  return out
end

local function py_rsplit(s, sep, maxsplit)
  maxsplit = (maxsplit == nil or maxsplit == NONE) and -1 or maxsplit
  if maxsplit < 0 then return py_split(s, sep, -1) end
  if sep == nil or sep == NONE then
    -- split from the right on whitespace
    local parts = py_split(s, nil, -1)
    if #parts <= maxsplit + 1 then return parts end
    local keep = #parts - maxsplit
    -- the head is the original text up to the end of word `keep`
    local count, i, n = 0, 1, #s
    local head_end = n
    while i <= n do
      while i <= n and is_ws_byte(sbyte(s, i)) do i = i + 1 end
      if i > n then break end
      local j = i
      while j <= n and not is_ws_byte(sbyte(s, j)) do j = j + 1 end
      count = count + 1
      if count == keep then
        head_end = j - 1
        break
      end
      i = j
    end
    local head = s:sub(1, head_end)
    local k = 1
    while k <= #head and is_ws_byte(sbyte(head, k)) do k = k + 1 end
    local out = { head:sub(k) }
    for x = keep + 1, #parts do out[#out + 1] = parts[x] end
    return out
  end
  local all = py_split(s, sep, -1)
  if #all <= maxsplit + 1 then return all end
  local keep = #all - maxsplit
  local head = concat(all, sep, 1, keep)
  local out = { head }
  for x = keep + 1, #all do out[#out + 1] = all[x] end
  return out
end

local function py_replace(S, s, old, new, count, nd)
  if type(old) ~= "string" or type(new) ~= "string" then raise("type", "replace() arguments must be str", nd) end
  count = (count == nil or count == NONE) and -1 or count
  local parts, i, done = {}, 1, 0
  if old == "" then
    local arr, n = chars(s)
    local out = {}
    for k = 1, n do
      if count < 0 or done < count then
        out[#out + 1] = new
        done = done + 1
      end
      out[#out + 1] = arr[k]
    end
    if count < 0 or done < count then out[#out + 1] = new end
    local r = concat(out)
    check_size(S, #r, nd)
    return r
  end
  local total = 0
  while count < 0 or done < count do
    local a, b = sfind(s, old, i, true)
    if not a then break end
    parts[#parts + 1] = s:sub(i, a - 1)
    parts[#parts + 1] = new
    total = total + (a - i) + #new
    check_size(S, total, nd)
    i = b + 1
    done = done + 1
  end
  parts[#parts + 1] = s:sub(i)
  return concat(parts)
end

-- Upper and lower case beyond ASCII for the common alphabets (Latin-1, Latin
-- Extended-A, Greek, Cyrillic), as Python's str.upper()/lower() do.
local TO_UPPER, TO_LOWER = {}, {}
local function case_pair(lo, up)
  TO_UPPER[utf8.char(lo)] = utf8.char(up)
  TO_LOWER[utf8.char(up)] = utf8.char(lo)
end
for cp = 0xE0, 0xFE do if cp ~= 0xF7 then case_pair(cp, cp - 0x20) end end
for cp = 0x100, 0x12E, 2 do case_pair(cp + 1, cp) end
for cp = 0x132, 0x136, 2 do case_pair(cp + 1, cp) end
for cp = 0x139, 0x147, 2 do case_pair(cp + 1, cp) end
for cp = 0x14A, 0x176, 2 do case_pair(cp + 1, cp) end
for cp = 0x179, 0x17D, 2 do case_pair(cp + 1, cp) end
case_pair(0xFF, 0x178)
case_pair(0x3CA, 0x3AA)
case_pair(0x3CB, 0x3AB)
case_pair(0x3AC, 0x386)
for cp = 0x3AD, 0x3AF do case_pair(cp, cp - 0x25) end
case_pair(0x3CC, 0x38C)
case_pair(0x3CD, 0x38E)
case_pair(0x3CE, 0x38F)
TO_UPPER[utf8.char(0x149)] = utf8.char(0x2BC) .. "N"
TO_UPPER[utf8.char(0xDF)] = "SS"
TO_UPPER[utf8.char(0x131)] = "I"
TO_UPPER[utf8.char(0x17F)] = "S"
TO_UPPER[utf8.char(0xB5)] = utf8.char(0x39C)
TO_LOWER[utf8.char(0x130)] = "i" .. utf8.char(0x307)
for cp = 0x3B1, 0x3C9 do if cp ~= 0x3C2 then case_pair(cp, cp - 0x20) end end
TO_UPPER[utf8.char(0x3C2)] = utf8.char(0x3A3)
for cp = 0x430, 0x44F do case_pair(cp, cp - 0x20) end
for cp = 0x450, 0x45F do case_pair(cp, cp - 0x50) end

local function py_upper(s)
  s = s:upper()
  if is_ascii(s) then return s end
  return (s:gsub("[\192-\223][\128-\191]", TO_UPPER))
end
local function py_lower(s)
  s = s:lower()
  if is_ascii(s) then return s end
  return (s:gsub("[\192-\223][\128-\191]", TO_LOWER))
end

local function is_alpha_byte(b) return (b >= 65 and b <= 90) or (b >= 97 and b <= 122) end

local function py_title(s)
  local out, prev_cased = {}, false
  for i = 1, #s do
    local c = s:sub(i, i)
    local b = sbyte(c)
    if is_alpha_byte(b) then
      out[i] = prev_cased and c:lower() or c:upper()
      prev_cased = true
    else
      out[i] = c
      prev_cased = b >= 128 and prev_cased or false
    end
  end
  return concat(out)
end

local function py_capitalize(s)
  if s == "" then return s end
  local arr, n = chars(s)
  return py_upper(arr[1]) .. py_lower(concat(arr, "", 2, n))
end

local function to_index(i, n)
  if i < 0 then i = i + n end
  return i
end

local function slice_indices(len, start, stop, step, nd)
  step = (step == nil or step == NONE) and 1 or step
  if mtype(step) ~= "integer" then raise("type", "slice indices must be integers or None", nd) end
  if step == 0 then raise("type", "slice step cannot be zero", nd) end
  local function norm(x, default, lo, hi)
    if x == nil or x == NONE then return default end
    if mtype(x) ~= "integer" then raise("type", "slice indices must be integers or None", nd) end
    if x < 0 then
      x = x + len
      if x < lo then x = lo end
    elseif x > hi then
      x = hi
    end
    return x
  end
  local idx = {}
  if step > 0 then
    local a = norm(start, 0, 0, len)
    local b = norm(stop, len, 0, len)
    local i = a
    while i < b do
      idx[#idx + 1] = i
      i = i + step
    end
  else
    local a = norm(start, len - 1, -1, len - 1)
    local b = norm(stop, -1, -1, len - 1)
    local i = a
    while i > b do
      idx[#idx + 1] = i
      i = i + step
    end
  end
  return idx
end

-- Python's str.format: {} {0} {name} and {{ }}, with conversions !s !r and simple
-- format specs left out (refused).
local function py_format(s, args, kwargs, nd)
  local auto = 0
  local res, i, n = {}, 1, #s
  while i <= n do
    local c = s:sub(i, i)
    if c == "{" then
      if s:sub(i + 1, i + 1) == "{" then
        res[#res + 1] = "{"
        i = i + 2
      else
        local j = s:find("}", i, true)
        if not j then raise("type", "Single '{' encountered in format string", nd) end
        local field = s:sub(i + 1, j - 1)
        local name, conv = field:match("^([^!:]*)!?([rs]?)$")
        if not name then raise("type", "format specs in str.format are not supported", nd) end
        local v
        if name == "" then
          auto = auto + 1
          v = args[auto]
        elseif name:match("^%d+$") then
          v = args[tonumber(name) + 1]
        else
          v = kwargs[name]
        end
        if v == nil then raise("type", "str.format: no value for field {" .. field .. "}", nd) end
        res[#res + 1] = conv == "r" and pyrepr(v) or pystr(v)
        i = j + 1
      end
    elseif c == "}" then
      if s:sub(i + 1, i + 1) == "}" then
        res[#res + 1] = "}"
        i = i + 2
      else
        raise("type", "Single '}' encountered in format string", nd)
      end
    else
      local j = s:find("[{}]", i) or (n + 1)
      res[#res + 1] = s:sub(i, j - 1)
      i = j
    end
  end
  return concat(res)
end

-- arguments: args is an array of values, kwargs a table name -> value. bind() maps them
-- onto named parameters.
local function bind(fname, params, args, kwargs, nd)
  local out = {}
  for i, v in ipairs(args) do
    if i > #params then raise("type", sfmt("%s() takes at most %d arguments (%d given)", fname, #params, #args), nd) end
    out[params[i]] = v
  end
  for k, v in pairs(kwargs) do
    local known = false
    for _, p in ipairs(params) do if p == k then known = true end end
    if not known then raise("type", sfmt("%s() got an unexpected keyword argument '%s'", fname, k), nd) end
    out[k] = v
  end
  return out
end

local function want_str(v, what, nd)
  if type(v) ~= "string" then raise("type", sfmt("%s must be a string, not %s", what, pytype(v)), nd) end
  return v
end
local function want_int(v, what, nd)
  if mtype(v) ~= "integer" then
    if type(v) == "boolean" then return v and 1 or 0 end
    raise("type", sfmt("%s must be an integer, not %s", what, pytype(v)), nd)
  end
  return v
end

local function method(name, fn) return new_func(name, fn) end

local STR_METHODS = {}
STR_METHODS.strip = function(s, a) return strip_chars(s, a[1], true, true) end
STR_METHODS.lstrip = function(s, a) return strip_chars(s, a[1], true, false) end
STR_METHODS.rstrip = function(s, a) return strip_chars(s, a[1], false, true) end
STR_METHODS.upper = function(s) return py_upper(s) end
STR_METHODS.lower = function(s) return py_lower(s) end
STR_METHODS.title = function(s) return py_title(s) end
STR_METHODS.capitalize = function(s) return py_capitalize(s) end
STR_METHODS.swapcase = function(s)
  return (s:gsub("%a", function(c) return c:match("%l") and c:upper() or c:lower() end))
end
local function affix_test(s, a, nd, at_end)
  local x = a[1]
  local cands
  if tagof(x) == "list" then cands = x.items else cands = { x } end
  for _, p in ipairs(cands) do
    want_str(p, at_end and "endswith argument" or "startswith argument", nd)
    if at_end then
      if p == "" or s:sub(-#p) == p then return true end
    else
      if s:sub(1, #p) == p then return true end
    end
  end
  return false
end
STR_METHODS.startswith = function(s, a, _, nd) return affix_test(s, a, nd, false) end
STR_METHODS.endswith = function(s, a, _, nd) return affix_test(s, a, nd, true) end
STR_METHODS.split = function(s, a, k, nd, S)
  local sep = a[1] or k.sep
  if sep ~= nil and sep ~= NONE then want_str(sep, "separator", nd) end
  -- count the parts first (up to what the budget allows), so a huge split fails
  -- before it is built
  local left, count, i = S.max_steps - S.steps + 1, 0, 1
  while count <= left do
    local x, y
    if sep ~= nil and sep ~= NONE and sep ~= "" then
      x, y = sfind(s, sep, i, true)
    else
      x, y = sfind(s, "%S+", i)
    end
    if not x then break end
    count, i = count + 1, y + 1
  end
  charge(S, count, nd)
  return new_list(py_split(s, sep, a[2] or k.maxsplit))
end
STR_METHODS.rsplit = function(s, a, k, nd)
  local sep = a[1] or k.sep
  if sep ~= nil and sep ~= NONE then want_str(sep, "separator", nd) end
  return new_list(py_rsplit(s, sep, a[2] or k.maxsplit))
end
STR_METHODS.splitlines = function(s)
  local out = {}
  for line in (s .. "\n"):gmatch("(.-)\r?\n") do out[#out + 1] = line end
  if s == "" or s:sub(-1) == "\n" then out[#out] = nil end
  return new_list(out)
end
STR_METHODS.replace = function(s, a, k, nd, S) return py_replace(S, s, a[1], a[2], a[3] or k.count, nd) end
STR_METHODS.find = function(s, a, _, nd)
  local i = sfind(s, want_str(a[1], "find argument", nd), 1, true)
  if not i then return -1 end
  return ulen(s:sub(1, i - 1))
end
STR_METHODS.rfind = function(s, a, _, nd)
  local sub = want_str(a[1], "rfind argument", nd)
  local last = nil
  local i = 1
  while true do
    local x = sfind(s, sub, i, true)
    if not x then break end
    last = x
    i = x + 1
  end
  if not last then return -1 end
  return ulen(s:sub(1, last - 1))
end
STR_METHODS.count = function(s, a, _, nd)
  local sub = want_str(a[1], "count argument", nd)
  if sub == "" then return ulen(s) + 1 end
  local c, i = 0, 1
  while true do
    local x, y = sfind(s, sub, i, true)
    if not x then break end
    c = c + 1
    i = y + 1
  end
  return c
end
STR_METHODS.join = function(s, a, _, nd, S)
  local items, n = iterate(S, a[1], nd)
  local parts = {}
  for i = 1, n do
    if type(items[i]) ~= "string" then
      raise("type", sfmt("sequence item %d: expected str instance, %s found", i - 1, pytype(items[i])), nd)
    end
    parts[i] = items[i]
  end
  local r = concat(parts, s)
  check_size(S, #r, nd)
  return r
end
STR_METHODS.format = function(s, a, k, nd) return py_format(s, a, k, nd) end
STR_METHODS.isdigit = function(s) return s ~= "" and not s:find("%D") end
STR_METHODS.isalpha = function(s) return s ~= "" and not s:find("%A") end
STR_METHODS.isalnum = function(s) return s ~= "" and not s:find("%W") end
STR_METHODS.isspace = function(s) return s ~= "" and not s:find("[^ \t\n\r\f\v]") end
STR_METHODS.islower = function(s) return s:find("%l") ~= nil and not s:find("%u") end
STR_METHODS.isupper = function(s) return s:find("%u") ~= nil and not s:find("%l") end
STR_METHODS.zfill = function(s, a, _, nd)
  local w = want_int(a[1], "zfill width", nd)
  local n = ulen(s)
  if n >= w then return s end
  local sign = ""
  if s:sub(1, 1) == "+" or s:sub(1, 1) == "-" then
    sign, s = s:sub(1, 1), s:sub(2)
  end
  return sign .. srep("0", w - n) .. s
end

local DICT_METHODS = {}
DICT_METHODS.items = function(d)
  local items = {}
  for i, k in ipairs(d.keys) do items[i] = new_list({ k, d.map[k] }, 2, true) end
  return new_list(items, #d.keys)
end
DICT_METHODS.keys = function(d)
  local items = {}
  for i, k in ipairs(d.keys) do items[i] = k end
  return new_list(items, #d.keys)
end
DICT_METHODS.values = function(d)
  local items = {}
  for i, k in ipairs(d.keys) do items[i] = d.map[k] end
  return new_list(items, #d.keys)
end
DICT_METHODS.get = function(d, a)
  local k = a[1]
  local v = (type(k) == "string" or type(k) == "number" or type(k) == "boolean") and d.map[k] or nil
  if v == nil then
    if a[2] ~= nil then return a[2] end
    return NONE
  end
  return v
end
DICT_METHODS.copy = function(d)
  local c = new_dict()
  for _, k in ipairs(d.keys) do dict_set(c, k, d.map[k]) end
  return c
end

local LIST_METHODS = {}
LIST_METHODS.index = function(l, a, _, nd)
  for i = 1, l.n do
    if eq(l.items[i], a[1]) then return i - 1 end
  end
  raise("type", pyrepr(a[1]) .. " is not in list", nd)
end
LIST_METHODS.count = function(l, a)
  local c = 0
  for i = 1, l.n do if eq(l.items[i], a[1]) then c = c + 1 end end
  return c
end
LIST_METHODS.copy = function(l)
  local items = {}
  for i = 1, l.n do items[i] = l.items[i] end
  return new_list(items, l.n)
end

-- methods refused by Jinja's ImmutableSandboxedEnvironment
local UNSAFE = {
  list = { append = true, clear = true, extend = true, insert = true, pop = true, remove = true, reverse = true, sort = true },
  dict = { clear = true, pop = true, popitem = true, setdefault = true, update = true },
}

local function bound(S, name, self_v, fn)
  return method(name, function(args, kwargs, nd) return fn(self_v, args, kwargs, nd, S) end)
end

local LOOP_FIELDS

function getattr_v(S, obj, name, nd)
  local t = tagof(obj)
  if t == "undef" then undef_fail(obj, nd) end
  if type(name) == "string" and name:sub(1, 1) == "_" then
    return new_undef(sfmt("access to attribute '%s' of '%s' object is unsafe", name, pytype(obj)))
  end
  if t == "dict" then
    if DICT_METHODS[name] then return bound(S, name, obj, DICT_METHODS[name]) end
    if UNSAFE.dict[name] then
      return new_undef(sfmt("access to attribute '%s' of 'dict' object is unsafe", name))
    end
    local v = obj.map[name]
    if v ~= nil then return v end
    return new_undef(sfmt("'dict object' has no attribute '%s'", name))
  elseif t == "ns" then
    local v = obj.map[name]
    if v ~= nil then return v end
    return new_undef(sfmt("'Namespace' object has no attribute '%s'", name))
  elseif t == "string" then
    if STR_METHODS[name] then return bound(S, name, obj, STR_METHODS[name]) end
    return new_undef(sfmt("'str object' has no attribute '%s'", name))
  elseif t == "list" then
    if LIST_METHODS[name] then return bound(S, name, obj, LIST_METHODS[name]) end
    if UNSAFE.list[name] then
      return new_undef(sfmt("access to attribute '%s' of 'list' object is unsafe", name))
    end
    return new_undef(sfmt("'%s object' has no attribute '%s'", pytype(obj), name))
  elseif t == "loop" then
    local f = LOOP_FIELDS[name]
    if f then return f(obj, S) end
    return new_undef(sfmt("'LoopContext' object has no attribute '%s'", name))
  end
  return new_undef(sfmt("'%s object' has no attribute '%s'", pytype(obj), tostring(name)))
end

function getitem_v(S, obj, key, nd)
  local t = tagof(obj)
  if t == "undef" then undef_fail(obj, nd) end
  if t == "list" then
    if mtype(key) == "integer" or type(key) == "boolean" then
      local i = to_index(num_of(key), obj.n)
      if i >= 0 and i < obj.n then return obj.items[i + 1] end
      return new_undef(sfmt("%s object has no element %s", pytype(obj), pystr(key)))
    end
  elseif t == "string" then
    if mtype(key) == "integer" then
      local arr, n = chars(obj)
      local i = to_index(key, n)
      if i >= 0 and i < n then return arr[i + 1] end
      return new_undef(sfmt("str object has no element %d", key))
    end
  elseif t == "dict" or t == "ns" then
    if type(key) == "string" or type(key) == "number" or type(key) == "boolean" then
      local k = key
      if type(k) == "boolean" then k = k and 1 or 0 end
      local v = obj.map[k]
      if v ~= nil then return v end
    end
  elseif t == "range" then
    if mtype(key) == "integer" then
      local i = to_index(key, obj.len)
      if i >= 0 and i < obj.len then return obj.start + i * obj.step end
    end
  elseif t == "loop" then
    if type(key) == "string" then return getattr_v(S, obj, key, nd) end
  end
  if type(key) == "string" then
    local v = getattr_v(S, obj, key, nd)
    if tagof(v) ~= "undef" then return v end
    if t == "dict" then return new_undef(sfmt("'dict object' has no attribute '%s'", key)) end
    return v
  end
  return new_undef(sfmt("'%s object' has no element %s", pytype(obj), pystr(key)))
end

local function do_slice(S, obj, a, b, c, nd)
  local t = tagof(obj)
  if t == "undef" then undef_fail(obj, nd) end
  if t == "list" then
    local idx = slice_indices(obj.n, a, b, c, nd)
    local items = {}
    for i, x in ipairs(idx) do items[i] = obj.items[x + 1] end
    return new_list(items, #idx, obj.tuple)
  elseif t == "string" then
    if is_ascii(obj) and (c == nil or c == NONE or c == 1) then
      local idx = slice_indices(#obj, a, b, 1, nd)
      if #idx == 0 then return "" end
      return obj:sub(idx[1] + 1, idx[#idx] + 1)
    end
    local arr, n = chars(obj)
    local idx = slice_indices(n, a, b, c, nd)
    local parts = {}
    for i, x in ipairs(idx) do parts[i] = arr[x + 1] end
    return concat(parts)
  elseif t == "range" then
    local items = range_items(S, obj, nd)
    return do_slice(S, new_list(items), a, b, c, nd)
  end
  raise("type", sfmt("'%s' object is not subscriptable", pytype(obj)), nd)
end

-- loop objects
LOOP_FIELDS = {
  index = function(l) return l.i end,
  index0 = function(l) return l.i - 1 end,
  revindex = function(l) return l.n - l.i + 1 end,
  revindex0 = function(l) return l.n - l.i end,
  first = function(l) return l.i == 1 end,
  last = function(l) return l.i == l.n end,
  length = function(l) return l.n end,
  depth = function() return 1 end,
  depth0 = function() return 0 end,
  previtem = function(l)
    if l.i > 1 then return l.items[l.i - 1] end
    return new_undef("there is no previous item")
  end,
  nextitem = function(l)
    if l.i < l.n then return l.items[l.i + 1] end
    return new_undef("there is no next item")
  end,
  cycle = function(l)
    return method("cycle", function(args, _, nd)
      if #args == 0 then raise("type", "no items for cycling given", nd) end
      return args[(l.i - 1) % #args + 1]
    end)
  end,
  changed = function(l)
    return method("changed", function(args)
      local v = new_list(args, #args)
      if l.last_changed ~= nil and eq(l.last_changed, v) then return false end
      l.last_changed = v
      return true
    end)
  end,
}

-- scopes
local function lookup(scope, name)
  while scope do
    local v = scope.vars[name]
    if v ~= nil then return v end
    scope = scope.parent
  end
  return nil
end

local function assign(scope, target, value, nd, S)
  if target.k == "target" then
    scope.vars[target.n] = value
  elseif target.k == "targets" then
    local items, n = iterate(S, value, nd)
    if n ~= #target.names then
      raise("type", sfmt("cannot unpack %d values into %d names", n, #target.names), nd)
    end
    for i, name in ipairs(target.names) do scope.vars[name] = items[i] end
  elseif target.k == "nsattr" then
    local ns = lookup(scope, target.n)
    if tagof(ns) ~= "ns" then
      raise("type", "cannot assign attribute on non-namespace object", nd)
    end
    if target.attr:sub(1, 1) == "_" then
      raise("security", "chat templates cannot store underscore-prefixed attributes on a namespace", nd)
    end
    dict_set(ns, target.attr, value)
  end
end

local FILTERS, TESTS = {}, {}

local function eval_args(S, scope, nd_args, nd_kwargs)
  local args, kwargs = {}, {}
  for i, a in ipairs(nd_args) do args[i] = eval(S, scope, a) end
  if nd_args.dyn then
    local items, n = iterate(S, eval(S, scope, nd_args.dyn), nd_args.dyn)
    for i = 1, n do args[#args + 1] = items[i] end
  end
  for _, kv in ipairs(nd_kwargs) do kwargs[kv[1]] = eval(S, scope, kv[2]) end
  if nd_kwargs.dyn then
    local d = eval(S, scope, nd_kwargs.dyn)
    if tagof(d) ~= "dict" then raise("type", "argument after ** must be a mapping, not " .. pytype(d), nd_kwargs.dyn) end
    for _, k in ipairs(d.keys) do
      if type(k) ~= "string" then raise("type", "keywords must be strings", nd_kwargs.dyn) end
      kwargs[k] = d.map[k]
    end
  end
  return args, kwargs
end

local function apply_filter(S, name, v, args, kwargs, nd)
  local f = FILTERS[name]
  if not f then raise("syntax", "no filter named '" .. name .. "'", nd) end
  step(S, nd)
  return f(S, v, args, kwargs, nd)
end

local function apply_test(S, name, v, args, kwargs, nd)
  local f = TESTS[name]
  if not f then raise("syntax", "no test named '" .. name .. "'", nd) end
  return f(S, v, args, kwargs, nd)
end

function call_value(S, fn, args, kwargs, nd)
  local t = tagof(fn)
  if t == "func" then
    step(S, nd)
    return fn.fn(args, kwargs, nd)
  end
  if t == "undef" then undef_fail(fn, nd) end
  raise("type", sfmt("'%s' object is not callable", pytype(fn)), nd)
end

local EVAL = {}
EVAL.const = function(_, _, nd) return nd.v end
EVAL.name = function(S, scope, nd)
  local v = lookup(scope, nd.n)
  if v == nil then return new_undef(sfmt("'%s' is undefined", nd.n)) end
  return v
end
EVAL.list = function(S, scope, nd)
  local items = {}
  for i, e in ipairs(nd.items) do items[i] = eval(S, scope, e) end
  return new_list(items, #nd.items)
end
EVAL.tuple = function(S, scope, nd)
  local items = {}
  for i, e in ipairs(nd.items) do items[i] = eval(S, scope, e) end
  return new_list(items, #nd.items, true)
end
EVAL.dict = function(S, scope, nd)
  local d = new_dict()
  for _, kv in ipairs(nd.pairs) do
    local k = eval(S, scope, kv[1])
    local tk = type(k)
    if tk == "boolean" then k = k and 1 or 0 end
    if tk ~= "string" and tk ~= "number" and tk ~= "boolean" then
      raise("type", "dict keys must be strings or numbers here, not " .. pytype(k), nd)
    end
    dict_set(d, k, eval(S, scope, kv[2]))
  end
  return d
end
EVAL.getattr = function(S, scope, nd) return getattr_v(S, eval(S, scope, nd.obj), nd.attr, nd) end
EVAL.getitem = function(S, scope, nd) return getitem_v(S, eval(S, scope, nd.obj), eval(S, scope, nd.key), nd) end
EVAL.slice = function(S, scope, nd)
  local obj = eval(S, scope, nd.obj)
  local a = nd.start and eval(S, scope, nd.start) or nil
  local b = nd.stop and eval(S, scope, nd.stop) or nil
  local c = nd.step and eval(S, scope, nd.step) or nil
  return do_slice(S, obj, a, b, c, nd)
end
EVAL.call = function(S, scope, nd)
  local fn = eval(S, scope, nd.fn)
  local args, kwargs = eval_args(S, scope, nd.args, nd.kwargs)
  return call_value(S, fn, args, kwargs, nd)
end
EVAL.filter = function(S, scope, nd)
  local v = eval(S, scope, nd.e)
  local args, kwargs = eval_args(S, scope, nd.args, nd.kwargs)
  return apply_filter(S, nd.name, v, args, kwargs, nd)
end
EVAL.test = function(S, scope, nd)
  local v = eval(S, scope, nd.e)
  local args, kwargs = eval_args(S, scope, nd.args, nd.kwargs)
  local r = apply_test(S, nd.name, v, args, kwargs, nd)
  if nd.neg then return not r end
  return r
end
EVAL.bin = function(S, scope, nd)
  return arith(S, nd.op, eval(S, scope, nd.a), eval(S, scope, nd.b), nd)
end
EVAL.concat = function(S, scope, nd)
  local parts, total = {}, 0
  for i, e in ipairs(nd.parts) do
    parts[i] = pystr(eval(S, scope, e))
    total = total + #parts[i]
  end
  check_size(S, total, nd)
  return concat(parts)
end
EVAL["and"] = function(S, scope, nd)
  local a = eval(S, scope, nd.a)
  if not truthy(a) then return a end
  return eval(S, scope, nd.b)
end
EVAL["or"] = function(S, scope, nd)
  local a = eval(S, scope, nd.a)
  if truthy(a) then return a end
  return eval(S, scope, nd.b)
end
EVAL["not"] = function(S, scope, nd) return not truthy(eval(S, scope, nd.e)) end
EVAL.neg = function(S, scope, nd)
  local v = eval(S, scope, nd.e)
  local x = num_of(v)
  if not x then
    if tagof(v) == "undef" then undef_fail(v, nd) end
    raise("type", "bad operand type for unary -: '" .. pytype(v) .. "'", nd)
  end
  return -x
end
EVAL.pos = function(S, scope, nd)
  local v = eval(S, scope, nd.e)
  local x = num_of(v)
  if not x then raise("type", "bad operand type for unary +: '" .. pytype(v) .. "'", nd) end
  return x
end
EVAL.cmp = function(S, scope, nd)
  local a = eval(S, scope, nd.first)
  for _, o in ipairs(nd.ops) do
    local op, b = o[1], eval(S, scope, o[2])
    local r
    if op == "==" then
      r = eq(a, b)
    elseif op == "!=" then
      r = not eq(a, b)
    elseif op == "<" then
      r = lt(a, b, nd)
    elseif op == ">" then
      r = lt(b, a, nd)
    elseif op == "<=" then
      r = eq(a, b) or lt(a, b, nd)
    elseif op == ">=" then
      r = eq(a, b) or lt(b, a, nd)
    elseif op == "in" then
      r = contains(S, b, a, nd)
    else
      r = not contains(S, b, a, nd)
    end
    if not r then return false end
    a = b
  end
  return true
end
EVAL.cond = function(S, scope, nd)
  if truthy(eval(S, scope, nd.test)) then return eval(S, scope, nd.a) end
  if nd.b then return eval(S, scope, nd.b) end
  return new_undef("the inline if-expression evaluated to false and no else section was defined")
end

function eval(S, scope, nd)
  local s = S.steps + 1
  S.steps = s
  if s > S.max_steps then step(S, nd) end
  S.node = nd
  return EVAL[nd.k](S, scope, nd)
end

-- macros
local function make_macro(S, def_scope, nd, caller)
  return new_func(nd.name or "caller", function(args, kwargs, cnd)
    S.depth = S.depth + 1
    if S.depth > 64 then raise("limit", "macro calls nested more than 64 deep", cnd) end
    local scope = { vars = {}, parent = def_scope }
    local nparams = #nd.params
    if #args > nparams then
      raise("type", sfmt("macro '%s' takes not more than %d argument(s)", nd.name or "caller", nparams), cnd)
    end
    for i, p in ipairs(nd.params) do
      local v = args[i]
      if v == nil then v = kwargs[p] end
      if v == nil then
        if nd.defaults[p] then
          v = eval(S, scope, nd.defaults[p])
        else
          v = new_undef(sfmt("parameter '%s' was not provided", p))
        end
      end
      scope.vars[p] = v
    end
    for k in pairs(kwargs) do
      local known = k == "caller"
      for _, p in ipairs(nd.params) do if p == k then known = true end end
      if not known then raise("type", sfmt("macro '%s' takes no keyword argument '%s'", nd.name or "caller", k), cnd) end
    end
    if caller then scope.vars.caller = caller end
    if kwargs.caller and not caller then scope.vars.caller = kwargs.caller end
    local res = capture(S, function() exec_body(S, scope, nd.body) end)
    S.depth = S.depth - 1
    return res
  end)
end

-- statements
local EXEC = {}
EXEC.data = function(S, _, nd) out_write(S, nd.s) end
EXEC.output = function(S, scope, nd) out_write(S, pystr(eval(S, scope, nd.e))) end
EXEC["if"] = function(S, scope, nd)
  for _, t in ipairs(nd.tests) do
    if truthy(eval(S, scope, t[1])) then return exec_body(S, scope, t[2]) end
  end
  if nd.else_ then return exec_body(S, scope, nd.else_) end
end
EXEC["for"] = function(S, scope, nd)
  local items, n = iterate(S, eval(S, scope, nd.iter), nd)
  if nd.cond then
    local kept, m = {}, 0
    for i = 1, n do
      step(S, nd)
      local s2 = { vars = {}, parent = scope }
      assign(s2, nd.target, items[i], nd, S)
      if truthy(eval(S, s2, nd.cond)) then
        m = m + 1
        kept[m] = items[i]
      end
    end
    items, n = kept, m
  end
  if n == 0 then
    if nd.else_ then return exec_body(S, scope, nd.else_) end
    return
  end
  local loop = { [TAG] = "loop", items = items, n = n, i = 0 }
  for i = 1, n do
    step(S, nd)
    loop.i = i
    local s2 = { vars = { loop = loop }, parent = scope }
    assign(s2, nd.target, items[i], nd, S)
    local ctl = exec_body(S, s2, nd.body)
    if ctl == "break" then break end
  end
end
EXEC.set = function(S, scope, nd) assign(scope, nd.target, eval(S, scope, nd.e), nd, S) end
EXEC.setblock = function(S, scope, nd)
  local v = capture(S, function() exec_body(S, scope, nd.body) end)
  for _, f in ipairs(nd.filters) do
    local args, kwargs = eval_args(S, scope, f[2], f[3])
    v = apply_filter(S, f[1], v, args, kwargs, nd)
  end
  assign(scope, nd.target, v, nd, S)
end
EXEC.macro = function(S, scope, nd) scope.vars[nd.name] = make_macro(S, scope, nd) end
EXEC.callblock = function(S, scope, nd)
  local caller = make_macro(S, scope, { name = "caller", params = nd.params, defaults = nd.defaults, body = nd.body })
  local fn = eval(S, scope, nd.call.fn)
  local args, kwargs = eval_args(S, scope, nd.call.args, nd.call.kwargs)
  kwargs.caller = caller
  out_write(S, pystr(call_value(S, fn, args, kwargs, nd)))
end
EXEC.filterblock = function(S, scope, nd)
  local v = capture(S, function() exec_body(S, scope, nd.body) end)
  for _, f in ipairs(nd.filters) do
    local args, kwargs = eval_args(S, scope, f[2], f[3])
    v = apply_filter(S, f[1], v, args, kwargs, nd)
  end
  out_write(S, pystr(v))
end
EXEC.generation = function(S, scope, nd)
  local tracked = S.out == S.root
  local start = S.root.len
  local ctl = exec_body(S, scope, nd.body)
  if tracked then S.gen_spans[#S.gen_spans + 1] = { start, S.root.len } end
  return ctl
end
EXEC.with = function(S, scope, nd)
  local s2 = { vars = {}, parent = scope }
  for _, a in ipairs(nd.assigns) do assign(s2, a[1], eval(S, scope, a[2]), nd, S) end
  return exec_body(S, s2, nd.body)
end
EXEC["break"] = function() return "break" end
EXEC["continue"] = function() return "continue" end

function exec_body(S, scope, body)
  for i = 1, #body do
    local nd = body[i]
    step(S, nd)
    S.node = nd
    local ctl = EXEC[nd.k](S, scope, nd)
    if ctl then return ctl end
  end
end

-- ---------------------------------------------------------------------------
-- filters

local function attr_getter(S, attribute, nd)
  if attribute == nil or attribute == NONE then return function(x) return x end end
  local parts = {}
  if type(attribute) == "number" then
    parts = { attribute }
  else
    for p in pystr(attribute):gmatch("[^.]+") do parts[#parts + 1] = math.tointeger(tonumber(p)) or p end
  end
  return function(x)
    for _, p in ipairs(parts) do x = getitem_v(S, x, p, nd) end
    return x
  end
end

local function seq_items(S, v, nd)
  local items, n = iterate(S, v, nd)
  local copy = {}
  for i = 1, n do copy[i] = items[i] end
  return copy, n
end

local function select_impl(S, v, args, kwargs, nd, by_attr, keep)
  local items, n = iterate(S, v, nd)
  local getter, test, targs = nil, nil, {}
  local a = 1
  if by_attr then
    getter = attr_getter(S, args[1], nd)
    a = 2
  else
    getter = function(x) return x end
  end
  test = args[a]
  for k = a + 1, #args do targs[#targs + 1] = args[k] end
  local out, m = {}, 0
  for i = 1, n do
    step(S, nd)
    local x = getter(items[i])
    local ok
    if test == nil then
      ok = truthy(x)
    else
      ok = apply_test(S, pystr(test), x, targs, kwargs, nd)
    end
    if ok == keep then
      m = m + 1
      out[m] = items[i]
    end
  end
  return new_list(out, m)
end

FILTERS.trim = function(S, v, a, k, nd)
  local chars_ = a[1] or k.chars
  return strip_chars(pystr(v), chars_, true, true)
end
FILTERS.tojson = function(S, v, a, k, nd)
  local p = bind("tojson", { "ensure_ascii", "indent", "separators", "sort_keys" }, a, k, nd)
  local r = dumps(v, { ensure_ascii = truthy(p.ensure_ascii or false), indent = p.indent, separators = p.separators, sort_keys = truthy(p.sort_keys or false) }, nd)
  check_size(S, #r, nd)
  return r
end
local function length(S, v, nd)
  local t = tagof(v)
  if t == "string" then return ulen(v) end
  if t == "list" then return v.n end
  if t == "dict" or t == "ns" then return #v.keys end
  if t == "range" then return v.len end
  if t == "undef" then return 0 end
  raise("type", sfmt("object of type '%s' has no len()", pytype(v)), nd)
end
FILTERS.length = function(S, v, _, _, nd) return length(S, v, nd) end
FILTERS.count = FILTERS.length
FILTERS.default = function(S, v, a, k, nd)
  local p = bind("default", { "default_value", "boolean" }, a, k, nd)
  local dv = p.default_value
  if dv == nil then dv = "" end
  if tagof(v) == "undef" or (truthy(p.boolean or false) and not truthy(v)) then return dv end
  return v
end
FILTERS.d = FILTERS.default
FILTERS.items = function(S, v, _, _, nd)
  local t = tagof(v)
  if t == "undef" then return new_list({}, 0) end
  if t ~= "dict" and t ~= "ns" then raise("type", "can only get item pairs from a mapping", nd) end
  return DICT_METHODS.items(v)
end
FILTERS.first = function(S, v, _, _, nd)
  local items, n = iterate(S, v, nd)
  if n == 0 then return new_undef("No first item, sequence was empty.") end
  return items[1]
end
FILTERS.last = function(S, v, _, _, nd)
  local items, n = iterate(S, v, nd)
  if n == 0 then return new_undef("No last item, sequence was empty.") end
  return items[n]
end
FILTERS.join = function(S, v, a, k, nd)
  local p = bind("join", { "d", "attribute" }, a, k, nd)
  local items, n = iterate(S, v, nd)
  local get = attr_getter(S, p.attribute, nd)
  local parts = {}
  local total = 0
  for i = 1, n do
    parts[i] = pystr(get(items[i]))
    total = total + #parts[i]
  end
  local sep = p.d == nil and "" or pystr(p.d)
  check_size(S, total + #sep * n, nd)
  return concat(parts, sep)
end
FILTERS.lower = function(S, v) return py_lower(pystr(v)) end
FILTERS.upper = function(S, v) return py_upper(pystr(v)) end
FILTERS.capitalize = function(S, v) return py_capitalize(pystr(v)) end
FILTERS.title = function(S, v)
  local s = pystr(v)
  local out = {}
  local start = true
  for _, ch in ipairs((chars(s))) do
    if ch:match("^[-%s%(%[{]$") then
      out[#out + 1] = ch
      start = true
    elseif start then
      out[#out + 1] = py_upper(ch)
      start = false
    else
      out[#out + 1] = py_lower(ch)
    end
  end
  return concat(out)
end
FILTERS.replace = function(S, v, a, k, nd)
  local p = bind("replace", { "old", "new", "count" }, a, k, nd)
  return py_replace(S, pystr(v), pystr(p.old), pystr(p.new), p.count, nd)
end
FILTERS.selectattr = function(S, v, a, k, nd) return select_impl(S, v, a, k, nd, true, true) end
FILTERS.rejectattr = function(S, v, a, k, nd) return select_impl(S, v, a, k, nd, true, false) end
FILTERS.select = function(S, v, a, k, nd) return select_impl(S, v, a, k, nd, false, true) end
FILTERS.reject = function(S, v, a, k, nd) return select_impl(S, v, a, k, nd, false, false) end
FILTERS.map = function(S, v, a, k, nd)
  local items, n = iterate(S, v, nd)
  local out = {}
  if k.attribute ~= nil or #a == 0 then
    local get = attr_getter(S, k.attribute, nd)
    for i = 1, n do
      local x = get(items[i])
      if tagof(x) == "undef" and k.default ~= nil then x = k.default end
      out[i] = x
    end
  else
    local fname = pystr(a[1])
    local rest = {}
    for i = 2, #a do rest[#rest + 1] = a[i] end
    for i = 1, n do out[i] = apply_filter(S, fname, items[i], rest, k, nd) end
  end
  return new_list(out, n)
end
FILTERS.list = function(S, v, _, _, nd)
  local items, n = seq_items(S, v, nd)
  return new_list(items, n)
end
FILTERS.string = function(S, v) return pystr(v) end
FILTERS.safe = function(S, v) return pystr(v) end
FILTERS.escape = function(S, v)
  return (pystr(v):gsub("[&<>\"']", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&#34;", ["'"] = "&#39;" }))
end
FILTERS.e = FILTERS.escape
FILTERS.int = function(S, v, a, k, nd)
  local p = bind("int", { "default", "base" }, a, k, nd)
  local dflt = p.default == nil and 0 or p.default
  local base = p.base == nil and 10 or p.base
  if mtype(v) == "integer" then return v end
  if type(v) == "boolean" then return v and 1 or 0 end
  if type(v) == "number" then
    if v ~= v or v == huge or v == -huge then return dflt end
    return math.tointeger(v >= 0 and floor(v) or -floor(-v)) or dflt
  end
  if type(v) == "string" then
    local s = strip_chars(v, nil, true, true):gsub("_", "")
    local r = tonumber(s, base)
    if r and mtype(r) == "integer" then return r end
    local f = tonumber(s)
    if f then return math.tointeger(f >= 0 and floor(f) or -floor(-f)) or dflt end
  end
  return dflt
end
FILTERS.float = function(S, v, a, k, nd)
  local p = bind("float", { "default" }, a, k, nd)
  local dflt = p.default == nil and 0.0 or p.default
  if type(v) == "number" then return v + 0.0 end
  if type(v) == "boolean" then return v and 1.0 or 0.0 end
  if type(v) == "string" then
    local f = tonumber(strip_chars(v, nil, true, true))
    if f then return f + 0.0 end
  end
  return dflt
end
FILTERS.abs = function(S, v, _, _, nd)
  local x = num_of(v)
  if not x then raise("type", "bad operand type for abs(): '" .. pytype(v) .. "'", nd) end
  return math.abs(x)
end
FILTERS.round = function(S, v, a, k, nd)
  local p = bind("round", { "precision", "method" }, a, k, nd)
  local prec = p.precision == nil and 0 or p.precision
  local meth = p.method == nil and "common" or p.method
  local x = num_of(v)
  if not x then raise("type", "round needs a number", nd) end
  local m = 10 ^ prec
  local y = x * m
  local r
  if meth == "common" then
    local f = floor(y)
    local diff = y - f
    if diff > 0.5 then r = f + 1
    elseif diff < 0.5 then r = f
    else r = (f % 2 == 0) and f or f + 1 end
  elseif meth == "ceil" then
    r = math.ceil(y)
  elseif meth == "floor" then
    r = floor(y)
  else
    raise("type", "method must be common, ceil or floor", nd)
  end
  if mtype(x) == "integer" and meth == "common" and prec >= 0 then return x end
  return (r / m) + 0.0
end
FILTERS.indent = function(S, v, a, k, nd)
  local p = bind("indent", { "width", "first", "blank" }, a, k, nd)
  local width = p.width == nil and 4 or p.width
  local pad = type(width) == "string" and width or srep(" ", width)
  local s = pystr(v)
  local lines = {}
  local start = 1
  while true do
    local a2 = s:find("\n", start, true)
    if not a2 then
      lines[#lines + 1] = s:sub(start)
      break
    end
    lines[#lines + 1] = s:sub(start, a2 - 1)
    start = a2 + 1
  end
  local out = {}
  for i, line in ipairs(lines) do
    if i == 1 then
      out[i] = truthy(p.first or false) and (pad .. line) or line
    elseif line == "" and not truthy(p.blank or false) then
      out[i] = line
    else
      out[i] = pad .. line
    end
  end
  local r = concat(out, "\n")
  check_size(S, #r, nd)
  return r
end
FILTERS.unique = function(S, v, a, k, nd)
  local p = bind("unique", { "case_sensitive", "attribute" }, a, k, nd)
  local items, n = iterate(S, v, nd)
  local get = attr_getter(S, p.attribute, nd)
  local cs = truthy(p.case_sensitive or false)
  local seen, out = {}, {}
  for i = 1, n do
    local key = get(items[i])
    if type(key) == "string" and not cs then key = key:lower() end
    local dup = false
    for _, s in ipairs(seen) do if eq(s, key) then dup = true break end end
    if not dup then
      seen[#seen + 1] = key
      out[#out + 1] = items[i]
    end
  end
  return new_list(out, #out)
end
FILTERS.reverse = function(S, v, _, _, nd)
  if type(v) == "string" then
    local arr, n = chars(v)
    local out = {}
    for i = n, 1, -1 do out[#out + 1] = arr[i] end
    return concat(out)
  end
  local items, n = iterate(S, v, nd)
  local out = {}
  for i = n, 1, -1 do out[#out + 1] = items[i] end
  return new_list(out, n)
end
FILTERS.sort = function(S, v, a, k, nd)
  local p = bind("sort", { "reverse", "case_sensitive", "attribute" }, a, k, nd)
  local items, n = seq_items(S, v, nd)
  local get = attr_getter(S, p.attribute, nd)
  local cs = truthy(p.case_sensitive or false)
  local keyed = {}
  for i = 1, n do
    local key = get(items[i])
    if type(key) == "string" and not cs then key = key:lower() end
    keyed[i] = { key, items[i], i }
  end
  local rev = truthy(p.reverse or false)
  table.sort(keyed, function(x, y)
    if eq(x[1], y[1]) then return x[3] < y[3] end
    local r = lt(x[1], y[1], nd)
    if rev then return not r end
    return r
  end)
  local out = {}
  for i = 1, n do out[i] = keyed[i][2] end
  return new_list(out, n)
end
FILTERS.sum = function(S, v, a, k, nd)
  local p = bind("sum", { "attribute", "start" }, a, k, nd)
  local items, n = iterate(S, v, nd)
  local get = attr_getter(S, p.attribute, nd)
  local total = p.start == nil and 0 or p.start
  for i = 1, n do total = arith(S, "+", total, get(items[i]), nd) end
  return total
end
local function minmax(S, v, a, k, nd, want_max)
  local p = bind(want_max and "max" or "min", { "case_sensitive", "attribute" }, a, k, nd)
  local items, n = iterate(S, v, nd)
  if n == 0 then return new_undef("No aggregated item, sequence was empty.") end
  local get = attr_getter(S, p.attribute, nd)
  local cs = truthy(p.case_sensitive or false)
  local function key(x)
    local kx = get(x)
    if type(kx) == "string" and not cs then kx = kx:lower() end
    return kx
  end
  local best, bk = items[1], key(items[1])
  for i = 2, n do
    local kx = key(items[i])
    if (want_max and lt(bk, kx, nd)) or (not want_max and lt(kx, bk, nd)) then best, bk = items[i], kx end
  end
  return best
end
FILTERS.max = function(S, v, a, k, nd) return minmax(S, v, a, k, nd, true) end
FILTERS.min = function(S, v, a, k, nd) return minmax(S, v, a, k, nd, false) end
FILTERS.center = function(S, v, a, k, nd)
  local p = bind("center", { "width" }, a, k, nd)
  local s = pystr(v)
  local w = p.width == nil and 80 or p.width
  local n = ulen(s)
  if n >= w then return s end
  local total = w - n
  local left = total // 2 + (total & w & 1)
  return srep(" ", left) .. s .. srep(" ", total - left)
end
FILTERS.wordcount = function(S, v)
  local c = 0
  for _ in pystr(v):gmatch("%w+") do c = c + 1 end
  return c
end
FILTERS.dictsort = function(S, v, a, k, nd)
  local p = bind("dictsort", { "case_sensitive", "by", "reverse" }, a, k, nd)
  if tagof(v) ~= "dict" then raise("type", "dictsort needs a mapping", nd) end
  local pairs_ = DICT_METHODS.items(v)
  local by = p.by == nil and "key" or p.by
  local idx = by == "value" and 2 or 1
  local cs = truthy(p.case_sensitive or false)
  local items = pairs_.items
  table.sort(items, function(x, y)
    local kx, ky = x.items[idx], y.items[idx]
    if type(kx) == "string" and not cs then kx, ky = kx:lower(), pystr(ky):lower() end
    local r = lt(kx, ky, nd)
    if truthy(p.reverse or false) then return lt(ky, kx, nd) end
    return r
  end)
  return pairs_
end

-- tests
TESTS.defined = function(_, v) return tagof(v) ~= "undef" end
TESTS.undefined = function(_, v) return tagof(v) == "undef" end
TESTS.none = function(_, v) return v == NONE end
TESTS.string = function(_, v) return type(v) == "string" end
TESTS.mapping = function(_, v) return tagof(v) == "dict" end
TESTS.iterable = function(_, v)
  local t = tagof(v)
  return t == "string" or t == "list" or t == "dict" or t == "range" or t == "undef" or t == "ns"
end
TESTS.sequence = function(_, v)
  local t = tagof(v)
  return t == "string" or t == "list" or t == "dict" or t == "range"
end
TESTS.number = function(_, v) return type(v) == "number" or type(v) == "boolean" end
TESTS.integer = function(_, v) return mtype(v) == "integer" end
TESTS.float = function(_, v) return mtype(v) == "float" end
TESTS.boolean = function(_, v) return type(v) == "boolean" end
TESTS["true"] = function(_, v) return v == true end
TESTS["false"] = function(_, v) return v == false end
TESTS.callable = function(_, v) return tagof(v) == "func" end
TESTS.odd = function(_, v, _, _, nd) return want_int(num_of(v) or v, "odd test value", nd) % 2 == 1 end
TESTS.even = function(_, v, _, _, nd) return want_int(num_of(v) or v, "even test value", nd) % 2 == 0 end
TESTS.divisibleby = function(_, v, a, _, nd)
  local d = num_of(a[1])
  if not d or d == 0 then raise("type", "divisibleby needs a non-zero number", nd) end
  return (num_of(v) or 0) % d == 0
end
TESTS.equalto = function(_, v, a) return eq(v, a[1]) end
TESTS.eq = TESTS.equalto
TESTS["=="] = TESTS.equalto
TESTS.ne = function(_, v, a) return not eq(v, a[1]) end
TESTS["!="] = TESTS.ne
TESTS.lt = function(_, v, a, _, nd) return lt(v, a[1], nd) end
TESTS.lessthan = TESTS.lt
TESTS["<"] = TESTS.lt
TESTS.gt = function(_, v, a, _, nd) return lt(a[1], v, nd) end
TESTS.greaterthan = TESTS.gt
TESTS[">"] = TESTS.gt
TESTS.le = function(_, v, a, _, nd) return eq(v, a[1]) or lt(v, a[1], nd) end
TESTS["<="] = TESTS.le
TESTS.ge = function(_, v, a, _, nd) return eq(v, a[1]) or lt(a[1], v, nd) end
TESTS[">="] = TESTS.ge
TESTS["in"] = function(S, v, a, _, nd) return contains(S, a[1], v, nd) end
TESTS.sameas = function(_, v, a)
  local b = a[1]
  if type(v) == "table" or type(b) == "table" then return rawequal(v, b) end
  return v == b and mtype(v) == mtype(b)
end
TESTS.lower = function(_, v) return type(v) == "string" and py_lower(v) == v end
TESTS.upper = function(_, v) return type(v) == "string" and py_upper(v) == v end
TESTS.escaped = function() return false end

-- ---------------------------------------------------------------------------
-- globals

local function make_globals(S, opts)
  local g = {}
  g.range = new_func("range", function(a, _, nd)
    local start, stop, stp = 0, nil, 1
    for i = 1, #a do want_int(a[i], "range() argument", nd) end
    if #a == 1 then
      stop = a[1]
    elseif #a == 2 then
      start, stop = a[1], a[2]
    elseif #a == 3 then
      start, stop, stp = a[1], a[2], a[3]
    else
      raise("type", "range expected 1 to 3 integer arguments", nd)
    end
    if stp == 0 then raise("type", "range() arg 3 must not be zero", nd) end
    local len
    if stp > 0 then len = stop > start and (stop - start + stp - 1) // stp or 0
    else len = start > stop and (start - stop - stp - 1) // (-stp) or 0 end
    return { [TAG] = "range", start = start, stop = stop, step = stp, len = len }
  end)
  g.dict = new_func("dict", function(a, k, nd)
    local d = new_dict()
    if a[1] ~= nil then
      local t = tagof(a[1])
      if t == "dict" then
        for _, key in ipairs(a[1].keys) do dict_set(d, key, a[1].map[key]) end
      else
        local items, n = iterate(S, a[1], nd)
        for i = 1, n do
          local p, m = iterate(S, items[i], nd)
          if m ~= 2 then raise("type", "dict() needs pairs", nd) end
          dict_set(d, p[1], p[2])
        end
      end
    end
    local names = {}
    for key in pairs(k) do names[#names + 1] = key end
    table.sort(names)
    for _, key in ipairs(names) do dict_set(d, key, k[key]) end
    return d
  end)
  g.namespace = new_func("namespace", function(a, k, nd)
    local ns = { [TAG] = "ns", keys = {}, map = {} }
    if a[1] ~= nil then
      if tagof(a[1]) ~= "dict" then raise("type", "namespace() takes a mapping", nd) end
      for _, key in ipairs(a[1].keys) do dict_set(ns, key, a[1].map[key]) end
    end
    local names = {}
    for key in pairs(k) do names[#names + 1] = key end
    table.sort(names)
    for _, key in ipairs(names) do
      if key:sub(1, 1) == "_" then raise("security", "chat templates cannot store underscore-prefixed attributes on a namespace", nd) end
      dict_set(ns, key, k[key])
    end
    return ns
  end)
  g.raise_exception = new_func("raise_exception", function(a, _, nd)
    error({ jinja = true, kind = "raise", message = pystr(a[1] == nil and NONE or a[1]), line = nd and nd.line, col = nd and nd.col }, 0)
  end)
  g.strftime_now = new_func("strftime_now", function(a, _, nd)
    local fmt = want_str(a[1], "strftime_now format", nd)
    if not os_date then raise("type", "strftime_now: no clock available", nd) end
    local ok, r
    if opts.now then
      ok, r = pcall(os_date, "!" .. fmt, opts.now)
    else
      ok, r = pcall(os_date, fmt)
    end
    if not ok then raise("type", "strftime_now: bad format " .. repr_string(fmt), nd) end
    return r
  end)
  return g
end

-- ---------------------------------------------------------------------------
-- templates

local Template = {}
Template.__index = Template

local function format_error(e, name)
  if type(e) == "table" and e.jinja then
    local where = name or "template"
    if e.line then where = sfmt("%s:%d:%d", where, e.line, e.col or 0) end
    local what = e.kind == "raise" and "raise_exception: " or (e.kind == "syntax" and "syntax error: " or "")
    return where .. ": " .. what .. tostring(e.message), e
  end
  local msg = tostring(e)
  return (name or "template") .. ": internal error: " .. msg, { kind = "internal", message = msg }
end

function M.compile(source, opts)
  opts = opts or {}
  if type(source) ~= "string" then return nil, "jinja.compile: the template must be a string" end
  local name = opts.name or "chat template"
  local ok, res = pcall(function()
    local toks = lex(source)
    local p = setmetatable({ toks = toks, pos = 1, depth = 0, loops = 0 }, Parser)
    local body = p:parse_body(nil)
    return body
  end)
  if not ok then
    local msg, info = format_error(res, name)
    return nil, msg, info
  end
  return setmetatable({ body = res, name = name, source = source,
    has_generation = source:find("{%%[-+]?%s*generation%s*[-+]?%%}") ~= nil }, Template)
end

-- Renders with vars (name -> value). Returns text (and the generation spans when
-- opts.spans), or nil, message, info.
function Template:render(vars, opts)
  opts = opts or {}
  local S = {
    steps = 0, max_steps = opts.max_steps or 1000000,
    max_output = opts.max_output or (16 * 1024 * 1024),
    total = 0, depth = 0, gen_spans = {},
  }
  S.root = { parts = {}, n = 0, len = 0 }
  S.out = S.root
  local ok, err = pcall(function()
    local globals = { vars = make_globals(S, opts), parent = nil }
    local top = { vars = {}, parent = globals }
    for k, v in pairs(vars or {}) do
      if type(k) ~= "string" then raise("type", "template variable names must be strings") end
      top.vars[k] = from_lua(v)
    end
    local scope = { vars = {}, parent = top }
    exec_body(S, scope, self.body)
  end)
  if not ok then
    if type(err) == "table" and err.jinja and not err.line and S.node then
      err.line, err.col = S.node.line, S.node.col
    end
    if type(err) ~= "table" then
      local msg = tostring(err)
      if msg:find("stack overflow", 1, true) or msg:find("C stack", 1, true) then
        err = { jinja = true, kind = "limit", message = "the template nests too deeply", line = S.node and S.node.line, col = S.node and S.node.col }
      elseif msg:find("not enough memory", 1, true) then
        err = { jinja = true, kind = "limit", message = "not enough memory", line = S.node and S.node.line, col = S.node and S.node.col }
      else
        err = { jinja = true, kind = "internal", message = msg, line = S.node and S.node.line, col = S.node and S.node.col }
      end
    end
    local msg, info = format_error(err, self.name)
    return nil, msg, info
  end
  local text = concat(S.root.parts, "", 1, S.root.n)
  if opts.spans then return text, S.gen_spans end
  return text
end

-- One-shot helper: compile and render.
function M.render(source, vars, opts)
  local tpl, msg, info = M.compile(source, opts)
  if not tpl then return nil, msg, info end
  return tpl:render(vars, opts)
end

return M
