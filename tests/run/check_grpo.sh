#!/usr/bin/env bash
# GRPO end to end on the tiny chat model (tests/run/tiny_grpo.lua, moontune.grpo with the
# grpo loss plugin, driven by moontune.trainer):
#   - with two optimizer steps per rollout, a run stopped between them resumes on the
#     same rollout: the same samples and, bit for bit, the same weights; the second step's
#     ratio has left 1 and the clip acts;
#   - a run stopped after step 3 and resumed draws the same samples (the "sample" records
#     of metrics.jsonl: prompt, completion, rewards, advantage) and ends with the same
#     weights and optimizer state, bit for bit, as the uninterrupted run;
#   - the reward metrics (reward, rewards/<name>/mean, frac_reward_zero_std, ...) and the
#     loss plugin's (kl, clip ratios) are in every step record;
#   - a reward function that raises an error, returns a string or returns NaN stops the
#     run with a non-zero status and an error naming the reward and the recipe line that
#     defines it; the checkpoints written before stay, and the run resumes from them.
#   check_grpo.sh <moontune> <source dir> <st_compare>
set -uo pipefail
moontune=$(realpath "$1"); source_dir=$(realpath "$2"); st_compare=$(realpath "$3")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work" || exit 1
recipe=$source_dir/tests/run/tiny_grpo.lua
fix=(--set fixtures="$source_dir/tests/fixtures")
fails=0
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }
run() { local out=$1; shift; "$moontune" run "$recipe" "${fix[@]}" --set out_dir="$out" "$@" >"$out.txt" 2>&1; }
last() { ls -d "$1"/checkpoints/step-* | sort | tail -n 1; }
same_end() { # same_end A B what: the last checkpoints' weights and optimizer state, bit for bit
  local f r
  for f in weights optimizer; do
    if r=$("$st_compare" "$(last "$1")/$f.safetensors" "$(last "$2")/$f.safetensors" 0); then
      echo "grpo: $3: $f: ${r#st_compare: }"
    else
      fail "$3: $f: $r"
    fi
  done
}
samples() { grep '"type":"sample"' "$1/metrics.jsonl" | sed 's/"seconds":[^,]*,//'; }

run whole || { tail -n 20 whole.txt; fail "the uninterrupted run did not finish"; }
run cut --set stop_at=3 || { tail -n 20 cut.txt; fail "the first half did not finish"; }
run cut --set stop_at=3 --set resume=true || { tail -n 20 cut.txt; fail "the resumed half did not finish"; }
# 5 prompts, 2 a step: steps of 2, 2 and 1 prompts an epoch, 3 completions each
if [ "$(samples whole | wc -l)" != 30 ]; then
  fail "expected 30 sample records (2 epochs of 2 + 2 + 1 prompts x 3 completions), found $(samples whole | wc -l)"
fi
if diff <(samples whole) <(samples cut) >samples.diff; then
  echo "grpo: resumed after step 3: the same $(samples cut | wc -l) samples as the uninterrupted run"
else
  fail "the resumed run drew other samples: $(wc -l <samples.diff) diff lines"; head -n 4 samples.diff
fi
same_end whole cut "resumed after step 3"
# two optimizer steps on each rollout (num_iterations = 2), stopped after step 3, between
# the two steps on the second rollout: the resumed run goes on with that rollout
mu=(--set num_iterations=2)
run whole2 "${mu[@]}" || { tail -n 20 whole2.txt; fail "the uninterrupted num_iterations=2 run did not finish"; }
run cut2 "${mu[@]}" --set stop_at=3 || { tail -n 20 cut2.txt; fail "num_iterations=2: the first half did not finish"; }
run cut2 "${mu[@]}" --set stop_at=3 --set resume=true || { tail -n 20 cut2.txt; fail "num_iterations=2: the resumed half did not finish"; }
# 6 steps = 3 rollouts of 2, 2 and 1 prompts
if [ "$(samples whole2 | wc -l)" != 15 ] || ! diff <(samples whole2) <(samples cut2) >/dev/null; then
  fail "num_iterations=2: expected the same 15 samples after the resume, found $(samples cut2 | wc -l)"
fi
same_end whole2 cut2 "num_iterations=2, resumed between a rollout's two steps"
# the second step on a rollout sees a policy that moved: the ratio leaves 1 and the clip acts
python3 - whole2/metrics.jsonl <<'PY' || fail "num_iterations=2: the clip never acted on a second step"
import json, sys
steps = [r for r in map(json.loads, open(sys.argv[1])) if r.get("type") == "step"]
clipped = [r["step"] for r in steps if r.get("clip_ratio/region_mean", 0) > 0]
print(f"grpo: num_iterations=2: the clip acted at steps {clipped}")
sys.exit(0 if clipped and all(s % 2 == 0 for s in clipped) else 1)
PY

step=$(grep '"type":"step"' whole/metrics.jsonl | tail -n 1)
for key in reward reward_std frac_reward_zero_std 'rewards/vowels/mean' 'rewards/short/std' \
           'completions/mean_length' 'completions/clipped_ratio' kl 'clip_ratio/region_mean'; do
  grep -q "\"$key\":" <<<"$step" || fail "the step record has no $key: $step"
done

line=$(grep -n '^local function vowels' "$recipe" | cut -d: -f1)
for bad in error string nan; do
  if run "bad-$bad" --set bad_reward="$bad" --set bad_at=2 --set save_every=1; then
    fail "a reward that returns $bad did not stop the run"; continue
  fi
  msg=$(grep -m1 "grpo: reward 'vowels'" "bad-$bad.txt")
  case $bad in
    error) want="failed on .*tiny_grpo.lua:[0-9]*: tiny_grpo: this reward fails on purpose" ;;
    string) want="returned string" ;;
    nan) want="returned -*nan" ;;
  esac
  if grep -q "tiny_grpo.lua:$line: grpo: reward 'vowels'" <<<"$msg" && grep -qE "$want" <<<"$msg"; then
    echo "grpo: a reward that returns $bad: $msg"
  else
    fail "a reward that returns $bad: expected its line ($line) and /$want/, got: $(tail -n 3 "bad-$bad.txt")"
  fi
  [ -d "bad-$bad/checkpoints/step-00000002" ] || fail "$bad: the checkpoint of step 2 is gone"
done
# the run resumes from what the failed one left (the reward mended: --allow-changes)
if run bad-string --set resume=true --set save_every=1 --allow-changes && grep -q "tiny_grpo: 6 steps" bad-string.txt; then
  echo "grpo: the failed run resumed from its step-2 checkpoint and finished"
else
  tail -n 20 bad-string.txt; fail "the failed run did not resume from its checkpoint"
fi

if ((fails)); then echo "grpo: $fails FAILED"; exit 1; fi
echo "grpo: PASS"
