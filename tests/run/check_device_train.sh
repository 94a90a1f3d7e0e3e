#!/usr/bin/env bash
# The CUDA backend end to end against the CPU backend, on the tiny test models: the same
# recipe run with --device cpu and --device cuda must give the same training.
#   - LoRA, QLoRA and full fine-tuning (tests/run/tiny_dp.lua, 10 AdamW steps with a
#     held-out evaluation): every step's loss and gradient norm within 1e-4 relative, the
#     final weights within 1e-2 of each tensor's largest value (st_compare: fp32 products
#     sum in other orders on the GPU, and AdamW at lr 0.02 moves an element whose gradient
#     is near zero by up to 2 lr a step whichever way its last bits point: two H200 runs
#     measured 3.3e-4 and 1.8e-3 for LoRA);
#   - DPO (recipes/dpo.lua, the reference as the model with adapters disabled): the same;
#   - GRPO (tests/run/tiny_grpo.lua): the same sampled completions, then the same steps;
#   - greedy generation, one prompt alone and seven decoded 3 at a time with continuous
#     batching (tests/run/tiny_generate.lua, on tiny_chat with its weights scaled so the
#     next token is clear): the same bytes.
# Without a usable GPU it exits 77 (skipped), unless MT_REQUIRE_CUDA=1.
#   check_device_train.sh <moontune> <source dir> <st_compare>
set -uo pipefail
moontune=$(realpath "$1"); source_dir=$(realpath "$2"); st_compare=$(realpath "$3")
# MT_DEVICE_TRAIN_OTHER=cpu compares the CPU with itself: a check of this script
other=${MT_DEVICE_TRAIN_OTHER:-cuda}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work" || exit 1
fix=$source_dir/tests/fixtures

if ! probe=$("$moontune" bench --device "$other" --shape tiny --steps 1 --warmup 0 2>&1); then
  echo "device-train: cuda backend not run: $(echo "$probe" | tail -n 1)"
  [ "${MT_REQUIRE_CUDA:-0}" = 1 ] && exit 1
  exit 77
fi

fails=0
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }
close_steps() { # close_steps A B rtol what [floor]: every step's loss and gradient norm
  "$source_dir/tests/run/compare_steps.py" "$1/metrics.jsonl" "$2/metrics.jsonl" "$3" "device-train: $4" "${5:-1e-30}" ||
    fail "$4: steps differ beyond $3"
}
last() { ls -d "$1"/checkpoints/step-* | sort | tail -n 1; }
same_weights() {
  if ! r=$("$st_compare" "$(last "$1")/weights.safetensors" "$(last "$2")/weights.safetensors" "$3"); then
    fail "$4: weights: $r"
  else
    echo "device-train: $4: weights: ${r#st_compare: }"
  fi
}
backtrace() { # a run that died of a signal, again under cuda-gdb (where there is one)
  command -v cuda-gdb >/dev/null || return 0
  echo "device-train: backtrace of: moontune run $*"
  timeout 120 cuda-gdb -q -batch -ex run -ex bt -ex "info threads" --args "$moontune" run "$@" 2>&1 |
    grep -E '^#|signal|Thread|^\*' | head -n 40
}
both() { # both NAME ARGS...: the run on the CPU into NAME-ref, on the other device into NAME-dev
  local name=$1; shift
  local -a runs=("ref cpu" "dev $other")
  local r
  for r in "${runs[@]}"; do
    "$moontune" run "$@" --device "${r#* }" --set out_dir="$name-${r%% *}" >"$name-${r%% *}.txt" 2>&1
    local rc=$?
    if ((rc)); then
      tail -n 20 "$name-${r%% *}.txt"; fail "$name on ${r#* } did not finish (exit $rc)"
      ((rc > 128)) && backtrace "$@" --device "${r#* }" --set out_dir="$name-${r%% *}-bt"
      return 1
    fi
  done
}

for adapter in lora qlora full; do
  if both "$adapter" "$source_dir/tests/run/tiny_dp.lua" --set fixtures="$fix" --set adapter="$adapter" \
       --set save_every=10; then
    close_steps "$adapter-ref" "$adapter-dev" 1e-4 "$adapter"
    same_weights "$adapter-ref" "$adapter-dev" 1e-2 "$adapter"
  fi
done

if both dpo "$source_dir/recipes/dpo.lua" --set model="$fix/tiny_chat" \
     --set data="$fix/data/tiny_prefs.jsonl" --set heldout="$fix/data/tiny_prefs.jsonl" \
     --set general= --set seq_len=128 --set max_steps=4 --set eval_every=2 --set lr=0.01 --set batch=2; then
  close_steps dpo-ref dpo-dev 1e-4 "dpo"
fi

# GRPO (tests/run/tiny_grpo.lua: sampling, Lua rewards, the grpo loss with its KL to the
# adapters-disabled model): the same samples, then the same steps
if both grpo "$source_dir/tests/run/tiny_grpo.lua" --set fixtures="$fix" --set steps=3; then
  samples() { grep '"type":"sample"' "$1/metrics.jsonl" | sed 's/"advantage":[^,]*,//; s/"reward[^}]*}//'; }
  if diff <(samples grpo-ref) <(samples grpo-dev) >/dev/null; then
    echo "device-train: grpo: the same $(samples grpo-dev | wc -l) sampled completions on both devices"
    # GRPO's loss is -sum(A ratio) / N with advantages of mean 0 per group: near 0 (1e-3)
    close_steps grpo-ref grpo-dev 1e-4 "grpo" 1e-2
  else
    fail "grpo: the devices sampled different completions"
  fi
fi

# a model whose next token is clear: tiny_chat's matrices times 10
python3 - "$fix/tiny_chat" sharp <<'PY' || fail "could not write the sharpened model"
import shutil, sys
from safetensors.numpy import load_file, save_file
shutil.copytree(sys.argv[1], sys.argv[2])
w = load_file(sys.argv[1] + "/model.safetensors")
save_file({k: (v if "norm" in k else v * 10) for k, v in w.items()}, sys.argv[2] + "/model.safetensors",
          metadata={"format": "pt"})
PY
gen() { "$moontune" run "$source_dir/tests/run/tiny_generate.lua" --set model="$work/sharp" --device "$1" \
          2>&1 >"gen-$2.txt" | tail -n 20; }
gen cpu ref || fail "generation on the cpu did not finish"
if ! gen "$other" dev; then
  fail "generation on $other did not finish"
  backtrace "$source_dir/tests/run/tiny_generate.lua" --set model="$work/sharp" --device "$other"
fi
if diff <(grep -E '^(one|batched) ' gen-ref.txt) <(grep -E '^(one|batched) ' gen-dev.txt) >gen.diff &&
   [ "$(grep -cE '^(one|batched) ' gen-dev.txt)" = 8 ]; then
  echo "device-train: greedy generation: 8 texts, the same bytes on both devices"
else
  fail "greedy generation differs between the devices: $(wc -l <gen.diff) diff lines"; head -n 6 gen.diff
fi

if ((fails)); then echo "device-train: $fails FAILED"; exit 1; fi
echo "device-train: PASS"
