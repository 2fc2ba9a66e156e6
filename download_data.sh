#!/usr/bin/env bash
# Get a dataset into the project's layout: DEST/<name>/{sketches,photos}/<class>/, train_labels.txt, test_labels.txt.
#
#   bash download_data.sh demo [DEST]     # generate the built-in procedural demo dataset (no download)
#
# Real benchmarks (sketchy, tuberlin, quickdraw) slot in as further cases of the dispatch below,
# each a function that fetches, verifies and prepares its archives.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
usage() { echo "usage: bash download_data.sh demo [DEST]   (DEST defaults to data/)" >&2; }

if [ $# -lt 1 ]; then usage; exit 2; fi
name="$1"
dest="${2:-data}"
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
elif [ -x "$here/.venv/bin/python" ]; then py="$here/.venv/bin/python"
else py=python3; fi

get_demo() {
  "$py" "$here/demo_data.py" --out "$dest/demo" ${DEMO_ARGS:-}
}

case "$name" in
  demo) get_demo ;;
  sketchy|tuberlin|quickdraw|all)
    echo "error: downloading $name is not implemented yet; use 'demo' for now" >&2; exit 2 ;;
  *) echo "error: unknown dataset '$name'; choose demo" >&2; usage; exit 2 ;;
esac
