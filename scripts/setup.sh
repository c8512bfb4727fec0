#!/usr/bin/env bash
# Create .venv with torch and the project (editable, with test extras). Idempotent.
# CPU machines get torch==2.13.0 (CPU build, from the local wheel where there is one); a machine
# with an NVIDIA driver keeps whatever CUDA torch >= 2.11 it can get. Never the CUDA build on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
[ -d /opt/wheels ] && PIP+=(--find-links /opt/wheels)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" "torch>=2.11"
  else
    wheel=$(ls /opt/wheels/torch-2.13.0*cpu*.whl 2>/dev/null | head -n 1 || true)
    if [ -n "$wheel" ]; then
      "${PIP[@]}" "$wheel"
    else  # the CPU index, never PyPI's CUDA build
      "${PIP[@]}" --timeout 30 --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" || {
        echo "setup: no CPU wheel of torch 2.13.0 found; install it into .venv by hand" >&2; exit 1; }
    fi
  fi
fi
"${PIP[@]}" -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, segquant_compile; print('segquant-compile ready: torch', torch.__version__)"
touch .venv/.ready
