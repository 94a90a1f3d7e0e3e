-- moontune — the library recipes get from require("moontune") (docs/lua_api.md):
-- the C core's objects and mechanism calls (moontune.core), plus the Lua workflow
-- modules: chat templates (moontune.chat), the trainer (moontune.trainer), task
-- evaluation (moontune.tasks) and the data checks (moontune.checks).
local core = require("moontune.core")

local M = {}
for k, v in pairs(core) do M[k] = v end
M.chat = require("moontune.chat")
M.trainer = require("moontune.trainer")
M.tasks = require("moontune.tasks")
M.checks = require("moontune.checks")

return M
