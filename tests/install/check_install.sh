#!/usr/bin/env bash
# Installs the build tree into a temporary prefix, then builds and runs a program
# against it using nothing but pkg-config, and runs the installed command.
set -euo pipefail
build_dir=$1
source_dir=$(cd "$(dirname "$0")/../.." && pwd)
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT
cmake --install "$build_dir" --prefix "$prefix" > /dev/null
pc_dir=$(dirname "$(find "$prefix" -name moontune.pc | head -n 1)")
export PKG_CONFIG_PATH="$pc_dir"
# the .pc file was configured for the build's prefix; point it at the temporary one
cc -std=c11 -Wall -Wextra -Werror "$source_dir/tests/install/consumer.c" -o "$prefix/consumer" \
   $(pkg-config --define-variable=prefix="$prefix" --cflags --libs moontune) \
   -Wl,-rpath,"$(pkg-config --define-variable=prefix="$prefix" --variable=libdir moontune)"
"$prefix/consumer"
test -f "$prefix/include/moontune/moontune.h"
"$prefix/bin/moontune" version

# An out-of-tree plugin (docs/plugins.md): built against the installed header through
# pkg-config alone, dropped into a directory on MOONTUNE_PLUGIN_PATH, found by name.
mkdir -p "$prefix/my-plugins"
cc -std=c11 -Wall -Wextra -Werror -shared -fPIC -fvisibility=hidden \
   $(pkg-config --define-variable=prefix="$prefix" --cflags moontune) \
   "$source_dir/examples/plugins/inverse_sqrt.c" -o "$prefix/my-plugins/inverse_sqrt.so" -lm
described=$(MOONTUNE_PLUGIN_PATH="$prefix/my-plugins" "$prefix/bin/moontune" plugins --describe inverse_sqrt)
echo "$described"
grep -q "timescale" <<<"$described"
grep -q "$prefix/my-plugins/inverse_sqrt.so" <<<"$described"
# the installed command finds the standard plugins in the installed plugin directory
listed=$("$prefix/bin/moontune" plugins)
echo "$listed"
for name in adamw sgd lion constant linear cosine wsd cross_entropy full; do
  grep -qw "$name" <<<"$listed" || { echo "installed moontune does not list $name"; exit 1; }
done
