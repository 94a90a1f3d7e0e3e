-- cpu_flags.lua — for the Lua tests: a function(flag, ...) that says whether this CPU
-- has every named flag of /proc/cpuinfo (false where the file cannot be read).
--   local has = dofile(FIXTURE_DIR .. "/../lua/cpu_flags.lua")
--   if has("avx512bw", "avx512_vnni") then ... end
return function(...)
  local f = io.open("/proc/cpuinfo", "r")
  if not f then return false end
  local text = f:read("a")
  f:close()
  for _, flag in ipairs({ ... }) do
    if not text:find(" " .. flag .. "%f[%s]") then return false end
  end
  return true
end
