#!/usr/bin/env bash
# The bad-input corpus (tests/bad_input/cases/<category>/<case>/, see README.md): every
# case runs through the real `moontune` command and must end with a non-zero exit (no
# signal, no time-out, no sanitizer report), print every line of its `expect` file on
# stderr (the first names the bad file, and the field, line or offset where there is
# one), and leave every file that existed before it ran unchanged — the case's inputs
# and a previous run's output directory with its checkpoints.
#   run.sh <moontune> <source dir> <build dir> [case-dir-pattern]
set -uo pipefail
moontune=$(cd "$(dirname "$1")" && pwd)/$(basename "$1"); src=$(cd "$2" && pwd); build=$(cd "$3" && pwd); only=${4:-}
fix=$src/tests/fixtures
cases_dir=$src/tests/bad_input/cases
bound=${MT_BAD_INPUT_SECONDS:-60}
: "${ASAN_OPTIONS:=detect_leaks=1:abort_on_error=1}"
: "${UBSAN_OPTIONS:=print_stacktrace=1:halt_on_error=1}"
export ASAN_OPTIONS UBSAN_OPTIONS OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# a previous run: what a failing command must never touch
prev_sets=(--set fixtures="$fix" --set steps=4 --set save_every=2)
(cd "$work" && "$moontune" run "$src/tests/run/tiny_lora.lua" "${prev_sets[@]}" --set out_dir=prev > prev.txt 2>&1) || {
  echo "bad_input: the previous run could not be made:"; cat "$work/prev.txt"; exit 1; }

# a tiny GGUF model (the tiny chat model exported), which the gguf_model cases damage
(cd "$work" && "$moontune" run "$src/tests/bad_input/make_gguf.lua" --set fixtures="$fix" --set out_dir=gguf \
  > gguf.txt 2>&1) || { echo "bad_input: the GGUF model could not be made:"; cat "$work/gguf.txt"; exit 1; }
gguf=$work/gguf/model.gguf

snapshot() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 -r sha256sum); }

passed=0 failed=0
while IFS= read -r dir; do
  rel=${dir#"$cases_dir"/}
  if [ -n "$only" ] && [[ "$rel" != *$only* ]]; then continue; fi
  s=$work/scratch
  rm -rf "$s"
  mkdir -p "$s/case"
  cp -r "$work/prev" "$s/prev"
  ckpt=$(ls -d "$s"/prev/checkpoints/step-* | sort | tail -n 1)
  subst() { sed -e "s|@CASE@|$s/case|g" -e "s|@PREV@|$s/prev|g" -e "s|@CKPT@|$ckpt|g" -e "s|@FIX@|$fix|g" \
                -e "s|@SRC@|$src|g" -e "s|@BUILD@|$build|g" -e "s|@GGUF@|$gguf|g" "$1"; }
  why=""
  if [ -f "$dir/setup" ]; then
    (cd "$s" && CASE=$s/case CASEDIR=$dir PREV=$s/prev CKPT=$ckpt FIX=$fix SRC=$src BUILD=$build GGUF=$gguf \
       bash -e "$dir/setup") \
      > "$s/setup.log" 2>&1 || why="setup failed: $(tail -n 3 "$s/setup.log")"
  fi
  for f in "$dir"/*; do
    case $(basename "$f") in cmd|expect|env|setup) continue ;; esac
    cp -r "$f" "$s/case/"
  done
  for f in "$s"/case/*.lua "$s"/case/*.json; do [ -f "$f" ] && subst "$f" > "$f.tmp" && mv "$f.tmp" "$f"; done
  mapfile -t args < <(subst "$dir/cmd")
  envs=()
  [ -f "$dir/env" ] && mapfile -t envs < <(subst "$dir/env")
  before=$(snapshot "$s")
  start=$(date +%s%N)
  (cd "$s" && env "${envs[@]}" timeout -s KILL "$bound" "$moontune" "${args[@]}" > out.txt 2> err.txt)
  rc=$?
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  after=$(cd "$s" && find . -type f ! -name out.txt ! -name err.txt -print0 | sort -z | xargs -0 -r sha256sum)
  if [ -z "$why" ]; then
    if [ "$rc" -eq 0 ]; then why="exit status 0"
    elif [ "$rc" -ge 124 ]; then why="exit status $rc (a signal or the ${bound} s bound)"
    elif grep -qE "runtime error:|AddressSanitizer|LeakSanitizer" "$s/err.txt"; then why="sanitizer report"
    elif [ "${rel%%/*}" = cli ] && [ "${args[0]}" != run ] && grep -q "stack traceback" "$s/err.txt"; then
      # (a recipe's errors, --set ones included, come with the recipe's traceback)
      why="a command-line mistake answered with a Lua traceback"
    else
      while IFS= read -r want; do
        [ -z "$want" ] && continue
        want=$(printf '%s' "$want" | sed -e "s|@CASE@|$s/case|g" -e "s|@PREV@|$s/prev|g" -e "s|@CKPT@|$ckpt|g" -e "s|@FIX@|$fix|g")
        grep -qF -- "$want" "$s/err.txt" || { why="stderr lacks: $want"; break; }
      done < "$dir/expect"
    fi
  fi
  if [ -z "$why" ]; then
    changed=$(diff <(echo "$before" | grep -v -e ' ./setup.log$') <(echo "$after" | grep -v -e ' ./setup.log$') | grep '^<' | head -n 3)
    [ -n "$changed" ] && why="an earlier file changed or vanished: $changed"
  fi
  if [ -z "$why" ]; then
    passed=$((passed + 1))
    if [ -n "${MT_BAD_INPUT_SHOW:-}" ]; then
      echo "ok   $rel (${ms} ms, exit $rc)"
      sed 's/^/    | /' "$s/err.txt" | head -n 4
    fi
  else
    failed=$((failed + 1))
    echo "FAIL $rel (${ms} ms): $why"
    sed 's/^/    | /' "$s/err.txt" | head -n 8
  fi
done < <(find "$cases_dir" -mindepth 2 -maxdepth 2 -type d | sort)
echo "bad_input: $((passed + failed)) cases"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
