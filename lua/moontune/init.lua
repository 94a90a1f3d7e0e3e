-- moontune — the library recipes get from require("moontune") (docs/lua_api.md):
-- the C core's objects and mechanism calls (moontune.core), plus the Lua workflow
-- modules: chat templates (moontune.chat), the trainer (moontune.trainer), task
-- evaluation (moontune.tasks), the data checks (moontune.checks) and preference
-- training (moontune.preference).
local core = require("moontune.core")

local M = {}
for k, v in pairs(core) do M[k] = v end
M.chat = require("moontune.chat")
M.trainer = require("moontune.trainer")
M.tasks = require("moontune.tasks")
M.checks = require("moontune.checks")
M.preference = require("moontune.preference")

return M
