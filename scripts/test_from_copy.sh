#!/usr/bin/env bash
# `make test` runs the suite here: in a copy of this working tree (tracked and untracked-not-ignored files,
# uncommitted edits included) at a fresh temporary path with nothing beside it (no sibling data folders, no runs/,
# no build outputs), importing the copy's code (PYTHONPATH; checked below) with the given interpreter. The suite
# thereby proves that the checkout's location and what lies beside it do not matter, at no extra test time.
#   bash scripts/test_from_copy.sh [PYTHON] [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
python_arg="${1:-.venv/bin/python}"
PYTHON="$(cd "$(dirname "$python_arg")" && pwd)/$(basename "$python_arg")"  # absolute, venv symlink kept
shift || true
workdir="$(mktemp -d "${TMPDIR:-/tmp}/opsd-copy.XXXXXX")"
trap 'rm -rf "$workdir"' EXIT
copy="$workdir/megatron_opsd"
mkdir "$copy"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$copy"
cd "$copy"
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1
imported="$("$PYTHON" -c 'import megatron_opsd; print(megatron_opsd.__file__)')"
if [[ "$imported" != "$PWD/megatron_opsd/"* ]]; then
    echo "test_from_copy: python imports $imported, not the copy in $PWD" >&2
    exit 1
fi
echo "test_from_copy: running the suite in $PWD"
"$PYTHON" -m pytest -p no:cacheprovider "$@"
