#!/usr/bin/env bash
# `moontune export` round trips: a LoRA run on the tiny chat model, exported from its
# run directory and from one checkpoint as a PEFT adapter, a merged Hugging Face
# directory and GGUF files of every type, each reloaded by `moontune eval` with the
# held-out loss the run measured at that step. Then the refusals: another base model, a
# damaged checkpoint, a run without checkpoints, a checkpoint that does not record its
# adapter's options (given again with --adapter-option, it exports the same weights).
#   check_export.sh <moontune binary> <source dir> <build dir>
set -euo pipefail
moontune=$1; source_dir=$2; build_dir=$3
: "$build_dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
fixtures=$source_dir/tests/fixtures
base=$fixtures/tiny_chat
heldout=$fixtures/data/tiny_chat_heldout.jsonl

"$moontune" run "$source_dir/recipes/lora_sft.lua" \
  --set model="$base" --set data="$fixtures/data/tiny_chat_train.jsonl" \
  --set heldout="$heldout" --set general="$fixtures/data/text.jsonl" --set max_new_tokens=4 \
  --set max_steps=6 --set seq_len=64 --set batch=2 --set grad_accum=1 --set lr=0.01 \
  --set eval_every=3 --set save_every=3 --set patience=0 --set out_dir=run > run.txt 2>&1 ||
  { cat run.txt; exit 1; }

# the held-out loss the run measured after step $1
run_loss() { grep '"eval_loss"' run/metrics.jsonl | grep "\"step\":$1[,}]" | sed 's/.*"eval_loss":\([^,}]*\).*/\1/'; }
# the loss `moontune eval` measures with the given model arguments
eval_loss() { "$moontune" eval "$@" --seq 64 "$heldout" 2> /dev/null | sed -n 's/^  loss \([^ ]*\) .*/\1/p'; }
# |a - b| <= tol
close() { awk -v a="$1" -v b="$2" -v t="$3" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= t) }'; }
check() { # what, measured, expected, tolerance
  echo "$1: held-out loss $2 (the run's $3)"
  close "$2" "$3" "$4" || { echo "FAIL: $1 differs by more than $4"; exit 1; }
}

final=$(run_loss 6); early=$(run_loss 3)
test -n "$final" && test -n "$early"
close "$final" "$early" 0.00005 && { echo "FAIL: training did not change the held-out loss"; exit 1; }

# from the run directory: its newest checkpoint (step 6, the final weights)
"$moontune" export --model "$base" --run run --to peft out-peft | tee out.txt
grep -q "run/checkpoints/step-00000006 (adapter lora)" out.txt
cmp out-peft/adapter_model.safetensors run/export/adapter/adapter_model.safetensors
check "peft" "$(eval_loss --model "$base" --adapter out-peft)" "$final" 0.0001
"$moontune" export --model "$base" --run run --to merged out-merged > /dev/null
check "merged" "$(eval_loss --model out-merged)" "$final" 0.0001
for type in f32 f16 bf16 q8_0; do
  "$moontune" export --model "$base" --run run --to gguf --type "$type" "out-$type.gguf" > /dev/null
  case $type in f32) tol=0.0001 ;; *) tol=0.02 ;; esac
  check "gguf $type" "$(eval_loss --model "out-$type.gguf")" "$final" "$tol"
done
# the base model alone, converted (no adapter): the base's loss
"$moontune" export --model "$base" --to gguf --type f32 base.gguf > /dev/null
check "base gguf" "$(eval_loss --model base.gguf)" "$(eval_loss --model "$base")" 0.0001

# from an earlier checkpoint: the loss of that step
"$moontune" export --model "$base" --checkpoint run/checkpoints/step-00000003 --to peft out-3 > /dev/null
check "checkpoint 3" "$(eval_loss --model "$base" --adapter out-3)" "$early" 0.0001

# refusals, each naming what is wrong, nothing written
refused() { # pattern, command...
  local pattern=$1; shift
  if "$@" > /dev/null 2> err.txt; then echo "FAIL: accepted: $*"; exit 1; fi
  grep -q -- "$pattern" err.txt || { echo "FAIL: expected '$pattern' in:"; cat err.txt; exit 1; }
  echo "refused: $(head -c 200 err.txt)"
}
refused "trained from another base model" \
  "$moontune" export --model "$fixtures/tiny_gqa" --run run --to peft wrong-base
test ! -e wrong-base
cp -r run/checkpoints/step-00000006 damaged
printf 'X' | dd of=damaged/weights.safetensors bs=1 seek=200 conv=notrunc 2> /dev/null
refused "weights.safetensors" "$moontune" export --model "$base" --checkpoint damaged --to peft d
test ! -e d
mkdir -p empty-run
refused "no checkpoint" "$moontune" export --model "$base" --run empty-run --to peft e
refused "needs an adapter" "$moontune" export --model "$base" --to peft f
refused "--type expects" "$moontune" export --model "$base" --to gguf --type q4_0 g.gguf

# a checkpoint written before adapters' options were recorded: the defaults do not fit
# its weights; the options given again export the same adapter
old=old-run/checkpoints/step-00000006
mkdir -p old-run/checkpoints && cp -r run/checkpoints/step-00000006 "$old"
python3 - "$old/state.json" << 'EOF'
import json, sys
path = sys.argv[1]
state = json.load(open(path))
for plugin in state["plugins"]:
    plugin.pop("options", None)
open(path, "w").write(json.dumps(state, indent=2))
EOF
(cd "$old" && sha256sum state.json > state.json.sha256)
refused "lora_A" "$moontune" export --model "$base" --run old-run --to peft old-default
"$moontune" export --model "$base" --run old-run --adapter-option r=16 --adapter-option alpha=32 \
  --adapter-option target_modules=all-linear \
  --to peft old-given > /dev/null 2>&1
cmp old-given/adapter_model.safetensors out-peft/adapter_model.safetensors
echo "export: every round trip reloads with the run's held-out loss"
