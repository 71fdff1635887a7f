#!/usr/bin/env bash
# Location independence (a step of `make test`): clone this repository's committed HEAD into a fresh temporary
# directory, with nothing beside it (no sibling data folders, no runs/), and run the fast suite there, importing the
# clone's code (PYTHONPATH; checked below) with the given interpreter (default .venv/bin/python).
#   bash scripts/test_from_clone.sh [PYTHON] [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
python_arg="${1:-.venv/bin/python}"
PYTHON="$(cd "$(dirname "$python_arg")" && pwd)/$(basename "$python_arg")"  # absolute, venv symlink kept
shift || true
workdir="$(mktemp -d "${TMPDIR:-/tmp}/opsd-clone.XXXXXX")"
trap 'rm -rf "$workdir"' EXIT
git clone --quiet --no-local "$PWD" "$workdir/megatron_opsd"
cd "$workdir/megatron_opsd"
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1
imported="$("$PYTHON" -c 'import megatron_opsd; print(megatron_opsd.__file__)')"
if [[ "$imported" != "$PWD/megatron_opsd/"* ]]; then
    echo "test_from_clone: python imports $imported, not the clone in $PWD" >&2
    exit 1
fi
echo "test_from_clone: fast suite in $PWD (commit $(git rev-parse --short HEAD))"
start=$SECONDS
"$PYTHON" -m pytest -m "not slow" -p no:cacheprovider -q "$@"
echo "test_from_clone: passed in $((SECONDS - start)) s"
