#!/usr/bin/env bash
# Get a dataset into the project's layout: DEST/<name>/{sketches,photos}/<class>/, train_labels.txt, test_labels.txt.
#
#   bash download_data.sh demo [DEST]                   # the built-in procedural demo dataset (no download)
#   bash download_data.sh sketchy|tuberlin|quickdraw|all [DEST] [--exclude_invalid] [--from FOLDER]
#
# The real benchmarks are downloaded (each archive's known sources in turn, partial downloads resumed,
# checksums verified) or taken from FOLDER, unpacked into DEST/<name>/raw/ and linked into the layout
# with every standard split by prepare_data.py; docs/datasets.md describes them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
usage() { echo "usage: bash download_data.sh demo|sketchy|tuberlin|quickdraw|all [DEST] [--exclude_invalid] [--from FOLDER]   (DEST defaults to data/)" >&2; }

if [ $# -lt 1 ]; then usage; exit 2; fi
name="$1"
shift
# DEST is the first argument after the name unless it is a flag: `sketchy --from DIR` keeps DEST at data/.
dest=data
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then dest="$1"; shift; fi
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
elif [ -x "$here/.venv/bin/python" ]; then py="$here/.venv/bin/python"
else py=python3; fi

get_demo() {
  "$py" "$here/demo_data.py" --output_dir "$dest/demo" ${DEMO_ARGS:-}
}

case "$name" in
  demo)
    if [ $# -gt 0 ]; then echo "error: the demo dataset takes no options (got $*); run: bash download_data.sh demo [DEST]" >&2; exit 2; fi
    get_demo ;;
  sketchy|tuberlin|quickdraw|all) "$py" "$here/prepare_data.py" "$name" --output_dir "$dest" "$@" ;;
  *) echo "error: unknown dataset '$name'; choose demo, sketchy, tuberlin, quickdraw or all" >&2; exit 2 ;;
esac
