#!/usr/bin/env bash
# `moontune run` end to end: a recipe trains the tiny model through moontune.trainer in
# the sandbox, with --set overrides; the sandbox refuses a forbidden call; a --set key
# the recipe does not have is refused; a recipe error names the file and line.
set -euo pipefail
moontune=$1; source_dir=$2; build_dir=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
recipe=$source_dir/tests/run/tiny_lora.lua
sets=(--set fixtures="$source_dir/tests/fixtures")

"$moontune" run "$recipe" "${sets[@]}" --set steps=8 --set lora.r=2 | tee out.txt
grep -q "tiny_lora: 8 steps" out.txt
test -s run-out/metrics.jsonl && test -s run-out/loss.svg
ls -d run-out/checkpoints/step-* > /dev/null

# early stopping on a held-out loss that gets worse after a callback raises the learning
# rate: training stops and the best weights come back (evaluated again: the same loss).
# Patience 1: after the spike the loss recovers slowly, and with 2 the run's end depends
# on rounding (it differs between the release and the sanitizer build)
"$moontune" run "$recipe" "${sets[@]}" --set steps=40 --set spike_at=4 --set patience=1 \
  --set out_dir=spike | tee out.txt
grep -q "tiny_lora: 8 steps, best eval_loss [0-9.]* at step 4, stopped early" out.txt
best=$(sed -n 's/.*best \([^,]*\), evaluated again \(.*\)/\1/p' out.txt)
again=$(sed -n 's/.*best \([^,]*\), evaluated again \(.*\)/\2/p' out.txt)
test -n "$best" && test "$best" = "$again"

# generate/eval --adapter: a PEFT directory made for another model (tiny_gqa's) is refused,
# naming the file and the tensor (test_peft and tests/lua/export.lua load good ones)
for cmd in "generate --prompt hi" "eval $source_dir/tests/fixtures/data/tiny_chat_heldout.jsonl"; do
  if "$moontune" $cmd --model "$source_dir/tests/fixtures/tiny_chat" \
       --adapter "$source_dir/tests/fixtures/peft_adapter" 2> err.txt; then exit 1; fi
  grep -q "adapter_model.safetensors: tensor base_model.model.model.layers.0" err.txt
done

# validate: everything short of training, then stop
"$moontune" validate "$recipe" "${sets[@]}" --set out_dir=validate-out | tee out.txt
grep -q "validate: ok" out.txt && grep -q "memory estimate" out.txt && grep -q "training data: 24 examples" out.txt
test ! -e validate-out/metrics.jsonl
# ... and refuses a wrong plugin name, a wrong option type, a missing data file
if "$moontune" validate "$recipe" "${sets[@]}" --set optimizer=adamx --set out_dir=adamx 2> err.txt; then exit 1; fi
grep -q "no optimizer plugin named 'adamx'" err.txt
if "$moontune" validate "$source_dir/tests/run/bad_option.lua" 2> err.txt; then exit 1; fi
grep -q "option 'r': expected an integer" err.txt
if "$moontune" validate "$source_dir/tests/run/bad_data.lua" \
     --set tokenizer="$source_dir/tests/fixtures/tokenizer/smollm2" 2> err.txt; then exit 1; fi
grep -q "missing.jsonl" err.txt

# a run stopped after a checkpoint and resumed gives the uninterrupted run's losses
"$moontune" run "$recipe" "${sets[@]}" --set steps=8 --set out_dir=full > /dev/null
"$moontune" run "$recipe" "${sets[@]}" --set steps=8 --set out_dir=killed --set stop_at=4 > /dev/null
# the stop_at hook differs from the first run's config: a resume refuses the change
# unless told --allow-changes, and then says what changed and which checkpoint it loaded
if "$moontune" run "$recipe" "${sets[@]}" --set steps=8 --set out_dir=killed --set resume=true 2> err.txt; then exit 1; fi
grep -q "stop_at: 4 -> 0" err.txt && grep -q "allow-changes" err.txt
"$moontune" run "$recipe" "${sets[@]}" --set steps=8 --set out_dir=killed --set resume=true --allow-changes > out.txt
grep -q "resumed from .*killed/checkpoints/step-00000004 at step 4 of 8" out.txt
grep -q "changed since the checkpoint: config.stop_at: 4 -> 0" out.txt
losses() { grep '"type":"step"' "$1/metrics.jsonl" | sed 's/.*"loss":\([^,]*\).*"step":\([0-9]*\).*/\2 \1/' | sort -n; }
diff <(losses full) <(losses killed)
cmp full/loss.svg killed/loss.svg # the plot covers the steps before the resume too
echo "resume: per-step losses equal the uninterrupted run's, each step once"

# a fresh run into a directory holding an earlier run is refused, and changes nothing;
# --overwrite moves the earlier run aside (nothing deleted) and starts afresh
sum_before=$(find full -type f | sort | xargs sha256sum)
if "$moontune" run "$recipe" "${sets[@]}" --set steps=8 --set out_dir=full 2> err.txt; then exit 1; fi
grep -q "holds an earlier run; continue it with --resume, or start over with --overwrite" err.txt
test "$sum_before" = "$(find full -type f | sort | xargs sha256sum)"
"$moontune" run "$recipe" "${sets[@]}" --set steps=8 --set out_dir=full --overwrite 2> err.txt > /dev/null
grep -q "moved the earlier run" err.txt
old=$(ls -d full.old-*)
test "$(echo "$sum_before" | sed 's| full/| X/|')" = "$(find "$old" -type f | sort | xargs sha256sum | sed "s| $old/| X/|")"
diff <(losses "$old") <(losses full)

# the output directory is never the working directory or one with the user's files
cat > here.lua <<'LUA'
local mt = require("moontune")
mt.output_dir(".")
LUA
if "$moontune" run here.lua 2> err.txt; then exit 1; fi
grep -q "here.lua:2: output_dir: '.' is the directory moontune runs in" err.txt
mkdir -p users && echo keep > users/notes.txt
cat > users.lua <<'LUA'
local mt = require("moontune")
mt.output_dir("users")
LUA
if "$moontune" run --unsafe users.lua 2> err.txt; then exit 1; fi
grep -q "users holds files that moontune did not write" err.txt
test "$(cat users/notes.txt)" = keep
# a run killed while writing its marker left only the marker's temporary file: the
# directory is moontune's, and the next run takes it (the crash test found this)
mkdir -p half-marked && echo '{"format": "moont' > half-marked/.moontune-run.tmp.4242
"$moontune" run "$recipe" "${sets[@]}" --set steps=2 --set out_dir=half-marked > /dev/null
test -f half-marked/.moontune-run && test ! -e half-marked/.moontune-run.tmp.4242

# a recipe that is a precompiled Lua chunk is refused before anything runs
printf '\033LuaT\000\031\223\r\n\032\n' > binary.lua
if "$moontune" run binary.lua 2> err.txt; then exit 1; fi
grep -q "binary.lua: is a precompiled (binary) Lua chunk" err.txt

# a wrong --set key and a wrong type are refused, naming the key
if "$moontune" validate "$recipe" "${sets[@]}" --set lora.rank=2 2> err.txt; then exit 1; fi
grep -q "lora.rank" err.txt
if "$moontune" run "$recipe" "${sets[@]}" --set steps=2.5 2> err.txt; then exit 1; fi
grep -q "steps" err.txt

# the sandbox refuses os.execute and says how to trust a recipe; --unsafe lifts it
if "$moontune" run "$source_dir/tests/run/escape.lua" 2> err.txt; then exit 1; fi
grep -q "os.execute is not allowed" err.txt && grep -q "escape.lua:2" err.txt
"$moontune" run --unsafe "$source_dir/tests/run/escape.lua" | grep -q escaped
# a recipe may not load plugins from directories it names (native code) unless trusted
cat > plugin_path.lua <<'LUA'
local mt = require("moontune")
mt.plugin("optimizer", "adamw", {}, { paths = { "." } })
LUA
if "$moontune" run plugin_path.lua 2> err.txt; then exit 1; fi
grep -q "cannot name plugin directories" err.txt
"$moontune" run --unsafe plugin_path.lua
# the shipped recipes: listed, and copied for editing (never over an existing file)
"$moontune" ls | tee out.txt
grep -q "lora_sft" out.txt && grep -q "qlora_sft" out.txt && grep -q "full_sft" out.txt
"$moontune" cp lora_sft mine.lua && cmp mine.lua "$source_dir/recipes/lora_sft.lua"
if "$moontune" cp lora_sft mine.lua 2> err.txt; then exit 1; fi
grep -q "exists" err.txt
# errors say where in the recipe: error() with a table, a stack overflow inside C
# functions, and (outside the sanitizer build, whose allocator ignores ulimit) a memory error
printf 'local x = 1\nerror({code = 7})\n' > err_table.lua
if "$moontune" run err_table.lua 2> err.txt; then exit 1; fi
grep -q "err_table.lua:2: an error was raised with a table value instead of a message" err.txt
printf 'local t = setmetatable({}, {__tostring = function(t) return tostring(t) end})\nprint(tostring(t))\n' > err_overflow.lua
if "$moontune" run err_overflow.lua 2> err.txt; then exit 1; fi
grep -q "err_overflow.lua:1: C stack overflow" err.txt
libs=$(ldd "$moontune") # not piped into grep -q: with pipefail, ldd's SIGPIPE would count
if [[ "$libs" != *libasan* ]]; then
  printf 'local t = {}\nfor i = 1, 1e9 do t[i] = i end\n' > err_memory.lua
  if (ulimit -v 2000000; "$moontune" run err_memory.lua) 2> err.txt; then exit 1; fi
  grep -q "err_memory.lua:2: not enough memory (a request for [0-9.]* MiB failed)" err.txt
fi
# --device: cpu works everywhere; a wrong name is refused naming the choices (exit 2);
# cuda works where the default is cuda (mt.device() says which) and otherwise fails at
# once with the reason and a non-zero exit, never falling back to the CPU
fix=$source_dir/tests/fixtures
heldout=$fix/data/tiny_chat_heldout.jsonl
"$moontune" eval --device cpu --model "$fix/tiny_chat" "$heldout" --seq 64 > out.txt
grep -q "tokens/s on cpu)" out.txt
# --int8: the frozen base through int8 training's forward where the CPU multiplies these
# weights in int8 (VNNI: any; AVX2: a Q4 base's codes, not the tiny model's), and says
# which; the loss stays within a percent of fp32's
loss_fp32=$(sed -n 's/^  loss \([^ ]*\) .*/\1/p' out.txt)
"$moontune" eval --device cpu --model "$fix/tiny_chat" "$heldout" --seq 64 --int8 > out.txt
grep -Eq "tokens/s on cpu, (frozen products in int8|fp32: no int8 products here)\)" out.txt
loss_int8=$(sed -n 's/^  loss \([^ ]*\) .*/\1/p' out.txt)
awk -v a="$loss_int8" -v b="$loss_fp32" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(b > 0 && d <= 0.01 * b) }'
"$moontune" generate --device=cpu --model "$fix/tiny_chat" --prompt hi --max-new-tokens 2 \
  > /dev/null 2> err.txt
grep -q ", on cpu (" err.txt
"$moontune" bench --device cpu --shape tiny --batch 1 --seq 16 --steps 1 --warmup 0 \
  --mode frozen > out.txt
grep -q "(cpu backend)" out.txt
# bench --generate: 3 prompts of 5 ids, 4 tokens each (12 generated, 9 of them decoded)
"$moontune" bench --device cpu --shape tiny --batch 3 --seq 5 --generate 4 > out.txt
grep -Eq "^generate: 3 prompts of 5 ids, 12 tokens in .* decoding [0-9.]+ tokens/s \(3 rows a step\)" out.txt
# int8 products by default where the CPU has AVX512-VNNI, or AVX2 and FMA (every
# projection: the tiny shape's 2 layers x 7 + lm_head), none with --fp32
cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo)
if [[ " $cpu_flags " == *" avx512_vnni "* ]] ||
   [[ " $cpu_flags " == *" avx2 "* && " $cpu_flags " == *" fma "* ]]; then want=15; else want=0; fi
grep -q "; $want projections in int8;" out.txt
"$moontune" bench --device cpu --shape tiny --batch 3 --seq 5 --generate 4 --fp32 > out.txt
grep -q "; 0 projections in int8;" out.txt
# bench --model: a real model's weights (tiny_chat, 2 layers) in place of a shape
"$moontune" bench --device cpu --model "$fix/tiny_chat" --batch 2 --seq 5 --generate 3 > out.txt
grep -q "^moontune bench: $fix/tiny_chat, " out.txt
grep -Eq "^generate: 2 prompts of 5 ids, 6 tokens in .*; $want projections in int8;" out.txt
"$moontune" bench --device cpu --model "$fix/tiny_chat" --batch 1 --seq 8 --steps 1 --warmup 0 \
  --adapter lora > out.txt
grep -q "adapter lora" out.txt
rc=0; "$moontune" bench --model "$fix/no_such_model" > /dev/null 2> err.txt || rc=$?
test "$rc" != 0
grep -q "no_such_model" err.txt
"$moontune" generate --device=cpu --model "$fix/tiny_chat" --prompt hi --max-new-tokens 2 --fp32 \
  > /dev/null 2> err.txt
grep -q "; 0 projections in int8" err.txt
for cmd in "eval --model $fix/tiny_chat $heldout --seq 64" "generate --model $fix/tiny_chat --prompt hi" \
           "bench" "run $recipe"; do
  rc=0; "$moontune" $cmd --device gpu > /dev/null 2> err.txt || rc=$?
  test "$rc" = 2
  grep -q -- '--device: expected cpu or cuda, got "gpu"' err.txt
done
cat > device.lua <<'LUA'
local mt = require("moontune")
local cfg = mt.config({ model = "", device = "" })
print("run device " .. mt.device())
local m <close> = mt.model(cfg.model, { device = cfg.device ~= "" and cfg.device or nil })
print("model device " .. m:info().device)
LUA
"$moontune" run device.lua --device cpu --set model="$fix/tiny_chat" > out.txt
grep -qx "run device cpu" out.txt && grep -qx "model device cpu" out.txt
"$moontune" run device.lua --set model="$fix/tiny_chat" > out.txt # the default
default=$(sed -n 's/^run device //p' out.txt)
grep -qx "model device $default" out.txt
if [ "$default" = cpu ]; then
  for cmd in "eval --model $fix/tiny_chat $heldout --seq 64" "generate --model $fix/tiny_chat --prompt hi" \
             "bench --steps 1"; do
    rc=0; "$moontune" $cmd --device cuda > out.txt 2> err.txt || rc=$?
    test "$rc" = 1 && test ! -s out.txt
    grep -Eq -- '^moontune [a-z]+: --device cuda: (no CUDA device|this moontune was built without the CUDA backend \(nvcc was not found at build time\))' err.txt
  done
  # run: mt.device() reports the command line's choice; the model it cannot place fails
  rc=0; "$moontune" run device.lua --device cuda --set model="$fix/tiny_chat" > out.txt 2> err.txt || rc=$?
  test "$rc" = 1 && grep -qx "run device cuda" out.txt
  grep -q -- "device.lua:4: --device cuda: " err.txt
  # ... unless the recipe names the device of the model itself
  "$moontune" run device.lua --device cuda --set model="$fix/tiny_chat" --set device=cpu > out.txt
  grep -qx "model device cpu" out.txt
else
  "$moontune" eval --device cuda --model "$fix/tiny_chat" "$heldout" --seq 64 > out.txt
  grep -q "tokens/s on cuda)" out.txt
fi
echo "--device: checked (the default here is $default)"
echo "moontune run: all checks passed"

# `moontune plugin check` on the build's plugins (this test also runs in the sanitizer
# build, which the install test skips): every standard plugin passes, a plugin of ABI 1
# is refused with the reason
for so in "$build_dir"/plugins/*.so; do
  "$moontune" plugin check "$so" > check.txt 2>&1 || { cat check.txt; exit 1; }
  grep -q "all checks passed" check.txt
done
# a LoRA whose backward leaves out dA: the whole-model directions barely see it (dB
# dominates), the per-tensor ones must
mkdir -p nodA
cp "$source_dir/plugins/adapter/lora.c" "$source_dir/plugins/adapter/lora_peft.h" nodA/
grep -q 'host->matmul(&L->dA, &g, src, 1, 0, s, 1.0f);' nodA/lora.c
sed -i 's/host->matmul(&L->dA, &g, src, 1, 0, s, 1.0f);/(void)src;/' nodA/lora.c
cc -std=c11 -O1 -shared -fPIC -fvisibility=hidden -I"$source_dir/core/include" nodA/lora.c \
   -o nodA/lora_nodA.so -lm
if "$moontune" plugin check nodA/lora_nodA.so > nodA.txt 2>&1; then cat nodA.txt; exit 1; fi
grep -q "FAIL  gradient of model.layers.0.self_attn.q_proj.lora_A.weight alone" nodA.txt
# LoRA with dropout 0.1 by default: its replay keeps the pass, so a step with every layer
# recomputed gives the same gradients; a copy that counts a pass while replaying draws
# other masks in the second forward and must fail
mkdir -p replay
cp "$source_dir/plugins/adapter/lora.c" "$source_dir/plugins/adapter/lora_peft.h" replay/
grep -q '{"dropout", MT_OPT_FLOAT, "0", 0, 1, NULL,' replay/lora.c
grep -q 'if (drops && !lo->replaying) L->pass++;' replay/lora.c
sed -i 's/{"dropout", MT_OPT_FLOAT, "0", 0, 1, NULL,/{"dropout", MT_OPT_FLOAT, "0.1", 0, 1, NULL,/' replay/lora.c
cp replay/lora.c replay/lora_noreplay.c
sed -i 's/if (drops \&\& !lo->replaying) L->pass++;/if (drops) L->pass++;/' replay/lora_noreplay.c
for v in lora lora_noreplay; do
  cc -std=c11 -O1 -shared -fPIC -fvisibility=hidden -I"$source_dir/core/include" replay/$v.c \
     -o replay/$v.so -lm
done
"$moontune" plugin check replay/lora.so > replay.txt 2>&1 || { cat replay.txt; exit 1; }
grep -q "pass  gradient checkpointing: a training step with every layer recomputed" replay.txt
if "$moontune" plugin check replay/lora_noreplay.so > noreplay.txt 2>&1; then cat noreplay.txt; exit 1; fi
grep -q "FAIL  gradient checkpointing: a training step with every layer recomputed" noreplay.txt
if "$moontune" plugin check "$build_dir/test_plugins/bad_abi1.so" 2> abi1.txt; then exit 1; fi
grep -q "built for plugin ABI 1" abi1.txt
if "$moontune" plugin check 2> usage.txt; then exit 1; fi
grep -q "usage: moontune plugin check" usage.txt
echo "plugin check: ok"
