#!/usr/bin/env bash
# The layout check (tools/check_layers.py): the tree keeps to it, and each kind of
# violation, planted in a copy of the tree, makes it fail with a line naming the file.
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
check="$src/tools/check_layers.py"
python3 "$check" --root "$src"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
# plant FILE LINE EXPECTED: a copy of the tree with LINE appended to FILE must fail
# with EXPECTED in the output; the copy is rebuilt for each case.
plant() {
    local file=$1 line=$2 expected=$3
    rm -rf "$tmp/tree" && mkdir "$tmp/tree"
    cp -r "$src/core" "$src/kernels" "$src/plugins" "$src/tools" "$tmp/tree/"
    mkdir -p "$(dirname "$tmp/tree/$file")"
    printf '%s\n' "$line" >> "$tmp/tree/$file"
    if out=$(python3 "$check" --root "$tmp/tree" 2>&1); then
        echo "FAIL: planting '$line' in $file passed the check"; fails=$((fails + 1))
    elif ! grep -qF -- "$expected" <<<"$out"; then
        echo "FAIL: planting '$line' in $file: no line with '$expected' in:"; echo "$out"
        fails=$((fails + 1))
    else
        echo "ok: $file: $(grep -F -- "$expected" <<<"$out" | head -1)"
    fi
}
plant kernels/cpu/cpu_kernels.c '#include "base/internal.h"' 'kernels/cpu/cpu_kernels.c'
plant kernels/cuda/cuda_backend.cu '#include "model/model.h"' 'kernels/cuda/cuda_backend.cu'
plant core/model/model.c '#include <lua.h>' 'core/model knows nothing of Lua'
plant core/formats/gguf.c '#include <lauxlib.h>' 'core/formats knows nothing of Lua'
plant core/formats/gguf.c '#include "model/model.h"' 'core/formats may not include core/model'
plant core/model/model.c '#include "lua/sandbox.h"' 'core/model may not include core/lua'
plant core/store/peft.c '#include "cli/bench.h"' 'core/store may not include core/cli'
plant core/plugin/options.c '#include "model/model.h"' 'core/plugin may not include core/model'
plant core/model/host_table.c '#include "cpu/cpu_kernels.h"' 'reaches a backend only through backend.h'
plant core/model/model.c '#include "../../plugins/adapter/lora.c"' 'never includes a plugin'
plant core/text/tokenizer.c '#include "gguf.h"' 'name their subsystem'
plant core/loose.c '/* a file outside the subsystems */' 'core/loose.c'
plant core/include/moontune/plugin.h '#include "base/internal.h"' 'public header'
plant plugins/optim/sgd.c '#include "base/internal.h"' 'plugins/optim/sgd.c'
plant core/model/train.c 'static const char *favourite = "adamw";' 'names the plugin "adamw"'
# a name in a comment is not a use
rm -rf "$tmp/tree" && mkdir "$tmp/tree" && cp -r "$src/core" "$src/kernels" "$src/plugins" "$src/tools" "$tmp/tree/"
printf '/* as "adamw" does */\n' >> "$tmp/tree/core/model/train.c"
python3 "$check" --root "$tmp/tree" >/dev/null || { echo "FAIL: a plugin name in a comment was refused"; fails=$((fails + 1)); }
[ "$fails" -eq 0 ] && echo "check_layers_test: all planted violations caught"
exit "$fails"
