-- Writes the tiny chat model (tests/fixtures/tiny_chat) as one F32 GGUF file with its
-- tokenizer: run once per test run by run.sh, so that the gguf_model cases can damage
-- copies of a real model file (its bytes are located by key and tensor name, not offset).
local mt = require("moontune")
local cfg = mt.config({ fixtures = "", out_dir = "gguf" })
local out = mt.output_dir(cfg.out_dir)
local model = mt.model(cfg.fixtures .. "/tiny_chat")
model:export_gguf(out .. "/model.gguf", { tokenizer = mt.tokenizer(cfg.fixtures .. "/tiny_chat"), dtype = "f32" })
