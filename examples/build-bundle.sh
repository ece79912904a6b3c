#!/bin/sh
# Build NAME.keter from a bundle folder: ./examples/build-bundle.sh examples/hello
# (the bundle's name is the folder's name; copy the result into ROOT/incoming/).
set -eu
dir=${1:?usage: build-bundle.sh BUNDLE_DIR [OUTPUT.keter]}
out=${2:-$(basename "$dir").keter}
test -f "$dir/config/keter.yaml" || { echo "no config/keter.yaml in $dir" >&2; exit 1; }
tar czf "$out" -C "$dir" --owner=0 --group=0 .
echo "$out"
