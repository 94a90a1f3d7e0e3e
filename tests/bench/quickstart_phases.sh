#!/usr/bin/env bash
# quickstart_phases.sh — the quickstart's wall time, phase by phase, for two commits,
# measured one after the other on this machine.
#
#   tests/bench/quickstart_phases.sh OLD_REV NEW_REV [--set key=value ...]
#
# Each commit is checked out into its own git worktree under $WORK (default
# /tmp/moontune-phases), built in Release without CUDA, MPI and tests, and runs
# recipes/quickstart.lua on the default model (scripts/fetch-model, or $MODEL) with the
# extra arguments. The phases are the recipe's own timings: "before" (held-out loss,
# general perplexity and task generation of the base model), "training" (the steps and
# the held-out evaluations between them), "after" (the same as before, on the trained
# model), "export", and the whole recipe. Accuracy before and after comes from each
# run's summary.json. OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are removed from both
# runs' environment, so each commit runs the OpenBLAS kernels it would choose itself.
# With REUSE=1, a commit whose run already finished under $WORK is not run again.
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
fi
old_rev=$1 new_rev=$2
shift 2
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${WORK:-/tmp/moontune-phases}
model=${MODEL:-$("$repo/scripts/fetch-model")}
mkdir -p "$work"

# build REV into $work/REV (a worktree at that commit) and echo the directory
build_rev() {
    local rev=$1 sha dir
    sha=$(git -C "$repo" rev-parse --verify "$rev^{commit}")
    dir=$work/$sha
    if [ ! -d "$dir" ]; then
        git -C "$repo" worktree add --detach "$dir" "$sha" >&2
    fi
    cmake -S "$dir" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release -DMT_CUDA=OFF -DMT_MPI=OFF \
        -DMT_BUILD_TESTS=OFF >&2
    cmake --build "$dir/build" -j "$(nproc)" >&2
    echo "$dir"
}

# the first group of the pattern in the first line of the log that starts with the prefix
field() {
    local log=$1 prefix=$2 pattern=$3
    grep -E "^$prefix" "$log" | head -1 | sed -nE "s/.*$pattern.*/\1/p"
}

run_rev() {
    local rev=$1 dir log
    shift
    dir=$(build_rev "$rev")
    log=$work/$(basename "$dir").log
    echo "== $rev ($(git -C "$dir" log -1 --format='%h %s'))" >&2
    if [ "${REUSE:-0}" = 1 ] && grep -q '^quickstart: done' "$log" 2>/dev/null; then
        echo "   (its earlier run: $log)" >&2
    elif ! (cd "$dir" && env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE build/moontune run \
            recipes/quickstart.lua --set model="$model" --set out_dir=runs/phases --overwrite "$@") \
            >"$log" 2>&1; then
        tail -20 "$log" >&2
        echo "quickstart_phases: $rev failed ($log)" >&2
        exit 1
    fi
    printf '%s %s %s %s %s %s %s\n' "$rev" \
        "$(field "$log" 'before:' '\[([0-9]+) s')" \
        "$(field "$log" 'training:' ', ([0-9]+) s \(evaluations')" \
        "$(field "$log" 'after:' '\[([0-9]+) s')" \
        "$(field "$log" 'exported in' 'exported in ([0-9]+) s')" \
        "$(field "$log" 'quickstart: done' 'done in ([0-9]+) s')" \
        "$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print("%.1f%%->%.1f%%" % (100*s["before"]["accuracy"], 100*s["after"]["accuracy"]))' "$dir/runs/phases/summary.json")"
}

echo "CPU: $(lscpu | sed -nE 's/^Model name: +//p'), $(nproc) cores" >&2
old=$(run_rev "$old_rev" "$@")
new=$(run_rev "$new_rev" "$@")
python3 - "$old" "$new" <<'EOF'
import sys
rows = [line.split() for line in sys.argv[1:]]
names = ["before", "training", "after", "export", "total"]
print("%-12s" % "phase (s)" + "".join("%14s" % r[0][:12] for r in rows) + "%10s" % "new/old")
for i, name in enumerate(names, start=1):
    old, new = float(rows[0][i]), float(rows[1][i])
    print("%-12s%14.0f%14.0f%10s" % (name, old, new, "%.2f" % (new / old) if old else "-"))
print("%-12s%14s%14s" % ("accuracy", rows[0][6], rows[1][6]))
EOF
