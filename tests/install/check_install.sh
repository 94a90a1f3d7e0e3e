#!/usr/bin/env bash
# Installs the build tree into a temporary prefix, then, with nothing but that prefix and
# plain pkg-config (the .pc file is relocatable: no --define-variable):
# - builds and runs a program against the library;
# - builds every installed example plugin (optimizer, loss, scheduler, adapter) with
#   -Werror from the installed headers alone, and checks that the installed command
#   finds and describes each one;
# - checks that the installed command lists the standard plugins.
set -euo pipefail
build_dir=$1
source_dir=$(cd "$(dirname "$0")/../.." && pwd)
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT
cmake --install "$build_dir" --prefix "$prefix" > /dev/null
pc_file=$(find "$prefix" -name moontune.pc | head -n 1)
test -n "$pc_file" || { echo "the installation has no moontune.pc"; exit 1; }
export PKG_CONFIG_PATH
PKG_CONFIG_PATH=$(dirname "$pc_file")
# pkg-config must not find another moontune (a system one) first
unset PKG_CONFIG_LIBDIR || true

# Every directory the .pc file names lies inside the temporary prefix.
real_prefix=$(cd "$prefix" && pwd -P)
inside() { # inside DIR: DIR, resolved, is under the prefix
  local dir
  dir=$(cd "$1" 2> /dev/null && pwd -P) || { echo "pkg-config names $1, which does not exist"; return 1; }
  case "$dir/" in
    "$real_prefix"/*) return 0 ;;
    *) echo "pkg-config names $1 ($dir), outside the prefix $real_prefix"; return 1 ;;
  esac
}
cflags=$(pkg-config --cflags moontune)
libdir=$(pkg-config --variable=libdir moontune)
includedir=$(pkg-config --variable=includedir moontune)
plugindir=$(pkg-config --variable=plugindir moontune)
examplesdir=$(pkg-config --variable=examplesdir moontune)
echo "pkg-config --cflags moontune: $cflags"
for dir in "$libdir" "$includedir" "$plugindir" "$examplesdir"; do inside "$dir"; done
for flag in $cflags; do
  case "$flag" in -I*) inside "${flag#-I}" ;; esac
done
test "$(pkg-config --variable=plugin_abi moontune)" = "$(sed -n 's/^#define MT_PLUGIN_ABI_VERSION \([0-9]*\).*/\1/p' "$includedir/moontune/plugin.h")"

cc -std=c11 -Wall -Wextra -Werror "$source_dir/tests/install/consumer.c" -o "$prefix/consumer" \
   $(pkg-config --cflags --libs moontune) -Wl,-rpath,"$libdir"
"$prefix/consumer"
test -f "$includedir/moontune/moontune.h"
"$prefix/bin/moontune" version

# The example plugins (docs/plugins.md), as a plugin author gets them: the installed
# sources, built against the installed headers through pkg-config alone, dropped into a
# directory on MOONTUNE_PLUGIN_PATH, found by name. name:kind:an option it declares
examples="inverse_sqrt:scheduler:timescale heavy_ball:optimizer:momentum focal:loss:gamma
added_bias:adapter:target_modules"
mkdir -p "$prefix/my-plugins"
for entry in $examples; do
  IFS=: read -r name kind option <<< "$entry"
  src="$examplesdir/$name.c"
  test -f "$src" || { echo "example $name.c is not installed in $examplesdir"; exit 1; }
  cc -std=c11 -Wall -Wextra -Werror -Wmissing-prototypes -shared -fPIC -fvisibility=hidden \
     $(pkg-config --cflags moontune) "$src" -o "$prefix/my-plugins/$name.so" -lm
  described=$(MOONTUNE_PLUGIN_PATH="$prefix/my-plugins" \
              "$prefix/bin/moontune" plugins --describe "$name" --kind "$kind")
  echo "$described"
  grep -q "kind: *$kind" <<< "$described" || { echo "$name: not described as a $kind"; exit 1; }
  grep -q "$option" <<< "$described" || { echo "$name: option $option not described"; exit 1; }
  grep -q "$prefix/my-plugins/$name.so" <<< "$described" \
    || { echo "$name: not found in $prefix/my-plugins"; exit 1; }
done

# `moontune plugin check` on the out-of-tree plugins: the optimizer's descent and state
# restore, the loss' gradient against finite differences on the built-in tiny model, the
# adapter's gradient and merge, the scheduler's rates. Then a copy of the loss whose
# gradient misses half of its target term must fail the check.
for name in heavy_ball focal added_bias inverse_sqrt; do
  "$prefix/bin/moontune" plugin check "$prefix/my-plugins/$name.so"
done
grep -q 'c\[2\] = (float)(a \* dloss)' "$examplesdir/focal.c" \
  || { echo "focal.c no longer has the line the wrong-gradient copy edits"; exit 1; }
sed 's/c\[2\] = (float)(a \* dloss)/c[2] = (float)(0.5 * a * dloss)/' \
  "$examplesdir/focal.c" > "$prefix/focal_wrong.c"
cc -std=c11 -Wall -Wextra -Werror -shared -fPIC -fvisibility=hidden \
   $(pkg-config --cflags moontune) "$prefix/focal_wrong.c" -o "$prefix/focal_wrong.so" -lm
if "$prefix/bin/moontune" plugin check "$prefix/focal_wrong.so" > "$prefix/wrong.out" 2>&1; then
  cat "$prefix/wrong.out"
  echo "plugin check passed a loss with a wrong gradient"
  exit 1
fi
grep -q "FAIL  gradient: derivative along the gradient" "$prefix/wrong.out"
echo "plugin check refuses the wrong gradient:"
grep FAIL "$prefix/wrong.out"

# every standard plugin passes the same checks
checked=0
for so in "$prefix"/lib*/moontune/plugins/*.so "$prefix"/lib/*/moontune/plugins/*.so; do
  [ -e "$so" ] || continue
  "$prefix/bin/moontune" plugin check "$so" > "$prefix/check.out" 2>&1 \
    || { cat "$prefix/check.out"; echo "plugin check failed on $so"; exit 1; }
  checked=$((checked + 1))
done
echo "plugin check passed on $checked standard plugins"
[ "$checked" -ge 12 ] || { echo "expected the 12 standard plugins"; exit 1; }

# the installed command finds the standard plugins in the installed plugin directory
listed=$("$prefix/bin/moontune" plugins)
echo "$listed"
for name in adamw sgd lion constant linear cosine wsd cross_entropy full; do
  grep -qw "$name" <<< "$listed" || { echo "installed moontune does not list $name"; exit 1; }
done
