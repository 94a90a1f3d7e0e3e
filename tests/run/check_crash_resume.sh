#!/usr/bin/env bash
# Crash safety: a real training run (tests/run/tiny_lora.lua, a checkpoint after every
# step) is killed with SIGKILL at random moments — during steps, evaluations and
# checkpoint writes — and resumed until it finishes. Every resumed run must end exactly
# as the uninterrupted one: the same per-step and held-out losses (bit for bit, as
# logged), each step exactly once in metrics.jsonl, byte-identical final weights and
# optimizer state, and no leftovers of an interrupted save.
#   check_crash_resume.sh <moontune> <source dir> <build dir> [kills] [seed]
# The ctest runs 12 kills; run it with more for a longer trial, e.g. 200.
set -euo pipefail
moontune=$1; source_dir=$2; build_dir=$3; kills_wanted=${4:-12}; seed=${5:-$$}
: "$build_dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
recipe=$source_dir/tests/run/tiny_lora.lua
sets=(--set fixtures="$source_dir/tests/fixtures" --set steps=16 --set save_every=1 --set resume=true)
RANDOM=$seed
echo "crash-resume: seed $seed, $kills_wanted kills"

now_ms() { date +%s%3N; }
steps_of() { grep '"type":"step"' "$1/metrics.jsonl" | sed 's/.*"loss":\([^,]*\).*"step":\([0-9]*\).*/\2 \1/'; }
evals_of() { grep '"type":"eval"' "$1/metrics.jsonl" | sed 's/.*"eval_loss":\([^,]*\).*"step":\([0-9]*\).*/\2 \1/' | sort -n | uniq; }
final_sums() {
  local last
  last=$(ls -d "$1"/checkpoints/step-* | sort | tail -n 1)
  (cd "$last" && sha256sum weights.safetensors optimizer.safetensors)
}

# the uninterrupted run, and how long it takes
t0=$(now_ms)
"$moontune" run "$recipe" "${sets[@]}" --set out_dir=reference > reference.txt
duration=$(( $(now_ms) - t0 ))
echo "crash-resume: the uninterrupted run takes ${duration} ms"

kills=0 trial=0
while [ "$kills" -lt "$kills_wanted" ]; do
  trial=$((trial + 1))
  dir=trial-$trial
  per_trial=$(( 1 + RANDOM % 3 ))
  attempt=0
  while :; do
    attempt=$((attempt + 1))
    if [ "$attempt" -gt 50 ]; then echo "crash-resume: $dir never finished" >&2; exit 1; fi
    "$moontune" run "$recipe" "${sets[@]}" --set out_dir="$dir" > "$dir.$attempt.txt" 2>&1 &
    pid=$!
    if [ "$per_trial" -gt 0 ] && [ "$kills" -lt "$kills_wanted" ]; then
      delay=$(( RANDOM % (duration + duration / 5 + 1) ))
      sleep "$(printf '%d.%03d' $((delay / 1000)) $((delay % 1000)))"
      if kill -KILL "$pid" 2> /dev/null; then
        wait "$pid" 2> /dev/null || true
        kills=$((kills + 1)); per_trial=$((per_trial - 1))
        echo "crash-resume: $dir attempt $attempt killed after ${delay} ms"
        continue
      fi
    fi
    if ! wait "$pid"; then
      echo "crash-resume: $dir attempt $attempt failed:" >&2
      cat "$dir.$attempt.txt" >&2
      exit 1
    fi
    break
  done
  # the attempts that got as far as loading a checkpoint name it (a partial one would
  # have been refused by its checksums, failing the attempt)
  resumed=$(sed -n 's/^resumed from .*\/\(step-[0-9]*\) at step .*/\1/p' "$dir".*.txt | tr '\n' ' ')
  # each step exactly once, with the uninterrupted run's loss
  if [ -n "$(steps_of "$dir" | cut -d' ' -f1 | sort -n | uniq -d)" ]; then
    echo "crash-resume: $dir: a step appears twice in metrics.jsonl" >&2; exit 1
  fi
  diff <(steps_of reference | sort -n) <(steps_of "$dir" | sort -n)
  diff <(evals_of reference) <(evals_of "$dir")
  diff <(final_sums reference) <(final_sums "$dir")
  if ls -d "$dir"/checkpoints/.tmp-* > /dev/null 2>&1; then
    echo "crash-resume: $dir: leftovers of an interrupted save remain" >&2; exit 1
  fi
  cmp reference/loss.svg "$dir/loss.svg" # the whole run's curves, not the last segment's
  echo "crash-resume: $dir finished after $attempt attempts (resumed from: ${resumed:-none}): identical to the uninterrupted run"
done
echo "crash-resume: $kills kills over $trial runs, every run identical to the uninterrupted one"
