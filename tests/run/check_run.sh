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
sets=(--set fixtures="$source_dir/tests/fixtures" --set plugins="$build_dir/plugins")

"$moontune" run "$recipe" "${sets[@]}" --set steps=8 --set lora.r=2 | tee out.txt
grep -q "tiny_lora: 8 steps" out.txt
test -s run-out/metrics.jsonl && test -s run-out/loss.svg
ls -d run-out/checkpoints/step-* > /dev/null

# a wrong --set key and a wrong type are refused, naming the key
if "$moontune" run "$recipe" "${sets[@]}" --set lora.rank=2 2> err.txt; then exit 1; fi
grep -q "lora.rank" err.txt
if "$moontune" run "$recipe" "${sets[@]}" --set steps=2.5 2> err.txt; then exit 1; fi
grep -q "steps" err.txt

# the sandbox refuses os.execute and says how to trust a recipe; --unsafe lifts it
if "$moontune" run "$source_dir/tests/run/escape.lua" 2> err.txt; then exit 1; fi
grep -q "os.execute is not allowed" err.txt && grep -q "escape.lua:2" err.txt
"$moontune" run --unsafe "$source_dir/tests/run/escape.lua" | grep -q escaped
echo "moontune run: all checks passed"
