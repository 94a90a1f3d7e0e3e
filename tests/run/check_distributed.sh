#!/usr/bin/env bash
# Data parallel over MPI (docs/distributed.md), on the tiny test model
# (tests/run/tiny_dp.lua), 2 ranks against 1 process:
#   - 2 ranks x 2 rows = 1 process with 2 micro-batches of the same 2 rows: the same
#     losses, weights and optimizer state, bit for bit with LoRA (the sum of two
#     gradients does not depend on which process adds them), within 1e-5 with full
#     fine-tuning;
#   - 2 ranks x 2 rows against 1 process x 4 rows (one product over all rows): every
#     step's loss and gradient norm within 1e-5 relative (fp32 reduction order);
#   - ZeRO-1 (shard_optimizer) = plain data parallel, bit for bit, LoRA and full;
#   - GRPO (tests/run/tiny_grpo.lua) shares a step's prompt groups out: the same steps as
#     one process within 1e-5;
#   - DPO (recipes/dpo.lua) keeps each pair on one rank: every step's loss and gradient
#     norm within 1e-6 of 1 process accumulating the same pairs;
#   - rank 0 alone writes metrics.jsonl (each step once) and the checkpoints;
#   - a 2-rank run stopped and resumed on 2 ranks ends bit for bit as the uninterrupted
#     one; a ZeRO-1 checkpoint resumes on 1 rank (its state was gathered whole);
#   - mt.broadcast / mt.all_sum, task accuracy with the requests shared out, the
#     held-out loss over the ranks' batches and a rank-0 export give one process's
#     results (tests/run/dp_collectives.lua);
#   - a rank that raises an error, and a rank killed with SIGKILL, end the job with a
#     non-zero status in bounded time, the error's message shown.
#   check_distributed.sh <moontune> <source dir> <st_compare>
set -euo pipefail
moontune=$1; source_dir=$2; st_compare=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
export OMP_NUM_THREADS=1
recipe=$source_dir/tests/run/tiny_dp.lua
fix=(--set fixtures="$source_dir/tests/fixtures")
mpi=(mpirun --allow-run-as-root --oversubscribe -np 2)
fails=0
fail() { echo "FAIL: $*" >&2; fails=$((fails + 1)); }
one() { local out=$1; shift; "$moontune" run "$recipe" "${fix[@]}" --set out_dir="$out" "$@" > "$out.txt" 2>&1 || { cat "$out.txt" >&2; fail "$out did not finish"; }; }
two() { local out=$1; shift; timeout 300 "${mpi[@]}" "$moontune" run "$recipe" "${fix[@]}" --set out_dir="$out" "$@" > "$out.txt" 2>&1 || { cat "$out.txt" >&2; fail "$out (2 ranks) did not finish"; }; }
last() { ls -d "$1"/checkpoints/step-* | sort | tail -n 1; }
same() { # same(A, B, rtol, what): weights and optimizer state of the last checkpoints
  for f in weights optimizer; do
    if ! r=$("$st_compare" "$(last "$1")/$f.safetensors" "$(last "$2")/$f.safetensors" "$3"); then
      fail "$4: $f: $r"
    else
      echo "data-parallel: $4: $f: ${r#st_compare: }"
    fi
  done
}
steps_of() { grep '"type":"step"' "$1/metrics.jsonl" | sed 's/.*"grad_norm":\([^,]*\).*"loss":\([^,]*\).*"step":\([0-9]*\).*/\3 \2 \1/'; }
close_steps() { # close_steps A B rtol what [floor]: every step's loss and gradient norm
  "$source_dir/tests/run/compare_steps.py" "$1/metrics.jsonl" "$2/metrics.jsonl" "$3" "data-parallel: $4" "${5:-1e-30}" ||
    fail "$4: steps differ beyond $3"
}

# LoRA: 1 process x 4 rows, 1 process x 2 x 2 rows, 2 ranks x 2 rows, 2 ranks ZeRO-1
one one4
one one2x2 --set batch=2 --set accum=2
two two4
two two4z --set shard=true
same two4 one2x2 0 "2 ranks = 1 process accumulating the same rows"
diff <(steps_of two4) <(steps_of one2x2) > /dev/null || fail "2 ranks and 1 process accumulating log other steps"
close_steps one4 two4 1e-5 "2 ranks x 2 rows against 1 process x 4 rows"
same two4z two4 0 "ZeRO-1 = plain data parallel (LoRA)"
[ "$(grep -c '"type":"step"' two4/metrics.jsonl)" = 10 ] || fail "metrics.jsonl of 2 ranks does not hold each of the 10 steps once"
[ "$(grep -c 'tiny_dp: rank' two4.txt)" = 1 ] || fail "the recipe's print came from more than rank 0"

# full fine-tuning: 2 ranks against 1 process accumulating, and ZeRO-1
one full2x2 --set adapter=full --set batch=2 --set accum=2 --set steps=4
two full4 --set adapter=full --set steps=4
two full4z --set adapter=full --set steps=4 --set shard=true
# (not bit for bit here: the base's weight gradients accumulate inside the product,
# C += A B, where the ranks add two finished products)
same full4 full2x2 1e-5 "2 ranks = 1 process accumulating (full fine-tuning)"
same full4z full4 0 "ZeRO-1 = plain data parallel (full fine-tuning)"

# resume on 2 ranks, and a ZeRO-1 checkpoint resumed on 1 rank
two cut --set stop_at=5
two cut --set stop_at=5 --set resume=true
same cut two4 0 "2 ranks stopped at step 5 and resumed = uninterrupted"
two cutz2 --set stop_at=5 --set shard=true
two cutz2 --set stop_at=5 --set shard=true --set resume=true
same cutz2 two4 0 "ZeRO-1 on 2 ranks stopped at step 5 and resumed on 2 ranks = uninterrupted"
two cutz --set stop_at=5 --set shard=true
one cutz --set resume=true --allow-changes
diff <(steps_of cutz | head -n 5) <(steps_of two4 | head -n 5) > /dev/null || fail "cutz: the first 5 steps differ from the uninterrupted run"
close_steps two4 cutz 1e-5 "ZeRO-1 on 2 ranks, resumed on 1 process"

# DPO (recipes/dpo.lua): a pair's two rows stay on one rank; 2 ranks x 1 pair against
# 1 process accumulating the same pairs, and against 1 process x 2 pairs
dpo=(run "$source_dir/recipes/dpo.lua" --set model="$source_dir/tests/fixtures/tiny_chat"
     --set data="$source_dir/tests/fixtures/data/tiny_prefs.jsonl"
     --set heldout="$source_dir/tests/fixtures/data/tiny_prefs.jsonl" --set general=
     --set seq_len=128 --set max_steps=4 --set eval_every=2 --set lr=0.01)
"$moontune" "${dpo[@]}" --set batch=1 --set grad_accum=2 --set out_dir=dpo1x2 > dpo1x2.txt 2>&1 || { cat dpo1x2.txt >&2; fail "dpo (1 process, accumulating)"; }
"$moontune" "${dpo[@]}" --set batch=2 --set out_dir=dpo2 > dpo2.txt 2>&1 || { cat dpo2.txt >&2; fail "dpo (1 process)"; }
timeout 300 "${mpi[@]}" "$moontune" "${dpo[@]}" --set batch=2 --set out_dir=dpo2r > dpo2r.txt 2>&1 || { cat dpo2r.txt >&2; fail "dpo (2 ranks)"; }
# (not bit for bit: with these longer rows the weight gradients' product sums its
# inner dimension, rows x tokens, in more than one block, each added to the gradient
# buffer in turn (C += A B), which one process does on top of the first micro-batch's
# gradient; Adam then magnifies the last-bit differences of gradient elements near zero)
close_steps dpo1x2 dpo2r 1e-6 "DPO: 2 ranks x 1 pair against 1 process accumulating the same pairs"
close_steps dpo2 dpo2r 1e-5 "DPO: 2 ranks x 1 pair against 1 process x 2 pairs"
same dpo2r dpo1x2 1e-3 "DPO: 2 ranks against 1 process accumulating the same pairs"
grep -q '"eval_rewards/accuracies"' dpo2r/metrics.jsonl || fail "DPO on 2 ranks: no held-out preference metrics"

# GRPO (tests/run/tiny_grpo.lua, 2 prompts a step): on 2 ranks each samples and scores
# one prompt's group with the seeds one process gives it, and the loss sums over the
# ranks: the same step losses and gradient norms as one process (no padding step: 4
# prompts, 2 a step)
grpo=(run "$source_dir/tests/run/tiny_grpo.lua" "${fix[@]}" --set steps=4 --set n_prompts=4)
"$moontune" "${grpo[@]}" --set out_dir=grpo1 > grpo1.txt 2>&1 || { cat grpo1.txt >&2; fail "grpo (1 process)"; }
timeout 300 "${mpi[@]}" "$moontune" "${grpo[@]}" --set out_dir=grpo2 > grpo2.txt 2>&1 || { cat grpo2.txt >&2; fail "grpo (2 ranks)"; }
# (GRPO's loss sums zero-mean advantages times ratios near 1: near 0, compared relative to 1e-2)
close_steps grpo1 grpo2 1e-5 "GRPO: 2 ranks x 1 prompt's group against 1 process x 2" 1e-2
same grpo2 grpo1 1e-4 "GRPO: 2 ranks against 1 process"

# the collectives recipes see, task accuracy with the requests shared out, the held-out
# loss over the ranks' batches and a rank-0 export: the same numbers as one process
collect=(run "$source_dir/tests/run/dp_collectives.lua" --unsafe "${fix[@]}")
"$moontune" "${collect[@]}" --set out_dir=col1 > col1.txt 2>&1 || { cat col1.txt >&2; fail "dp_collectives (1 process)"; }
timeout 300 "${mpi[@]}" "$moontune" "${collect[@]}" --set out_dir=col2 > col2.txt 2>&1 || { cat col2.txt >&2; fail "dp_collectives (2 ranks)"; }
grep -q "dp_collectives: ok" col2.txt || fail "dp_collectives did not finish on 2 ranks"
diff <(grep "answers" col1.txt) <(grep "answers" col2.txt) || fail "task answers on 2 ranks differ from 1 process"
python3 - col1.txt col2.txt <<'PY' || fail "the held-out loss on 2 ranks differs from 1 process"
import re, sys
a, b = (re.search(r"eval loss (\S+) tokens (\d+) examples (\d+)", open(f).read()).groups() for f in sys.argv[1:])
assert a[1:] == b[1:], (a, b)
assert abs(float(a[0]) - float(b[0])) <= 1e-9 * abs(float(a[0])), (a, b)
print(f"data-parallel: held-out loss {a[0]} (1 process), {b[0]} (2 ranks)")
PY

# a rank that fails ends the job with its message
start=$(date +%s)
if timeout 120 "${mpi[@]}" "$moontune" run "$recipe" "${fix[@]}" --set out_dir=failing --set fail_rank=1 --set fail_at=3 > failing.txt 2>&1; then
  fail "a job whose rank 1 raised an error exited 0"
fi
grep -q "tiny_dp: rank 1 fails on purpose at step 3" failing.txt || { cat failing.txt >&2; fail "the failing rank's message is not shown"; }
grep -q "rank 1 of 2 failed" failing.txt || fail "the job does not say which rank failed"
echo "data-parallel: a failing rank ended the job in $(( $(date +%s) - start )) s"

# a rank killed with SIGKILL ends the job in bounded time
start=$(date +%s)
# a name no other test's command line has: pgrep below must find this job's ranks only
# (ctest runs check_run.sh beside it, whose runs use out_dir=killed)
timeout 120 "${mpi[@]}" "$moontune" run "$recipe" "${fix[@]}" --set out_dir=dp-rank-killed --set slow=0.5 --set steps=60 > killed.txt 2>&1 &
launcher=$!
for _ in $(seq 100); do
  grep -qs '"step":2,' dp-rank-killed/metrics.jsonl && break
  sleep 0.2
done
victim=$( (pgrep -f -- "out_dir=dp-rank-killed" || true) | while read -r p; do
  if [ "$p" != "$launcher" ] && ! grep -qa mpirun "/proc/$p/cmdline" 2> /dev/null; then echo "$p"; fi
done | tail -n 1)
[ -n "$victim" ] || fail "found no rank to kill"
kill -KILL "$victim" 2> /dev/null || true
if wait "$launcher"; then rc=0; else rc=$?; fi
[ "$rc" != 0 ] || fail "the job went on after a rank was killed"
[ "$rc" != 124 ] || fail "the job hung after a rank was killed"
grep -qi "signal 9\|killed" killed.txt || { cat killed.txt >&2; fail "the launcher does not report the killed rank"; }
echo "data-parallel: a killed rank ended the job in $(( $(date +%s) - start )) s (exit $rc)"

if [ "$fails" -gt 0 ]; then echo "data-parallel: $fails failure(s)" >&2; exit 1; fi
echo "data-parallel: all checks passed"
