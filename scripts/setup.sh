#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project into it. Idempotent and quick when
# everything is already there.
#   TORCH_SPEC  what to install for torch when the venv has none
#               (default torch==2.13.0: the CPU wheel; GPU users: TORCH_SPEC=torch
#               takes PyPI's CUDA build, or install your own build into .venv first)
#   PYTHON      interpreter for the venv (default python3, >= 3.10)
#   EXTRAS      the project's extras to install (default dev,plots; `make test` adds
#               cluster: the joblib, Ray and submitit launchers its tests run)
#   SYSTEM_DEPS=1  also the system packages the tests use (scripts/system-deps.sh: installed as
#               root with apt, otherwise named once and their tests skipped); `make test` sets it
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev,plots}
if [ "${SYSTEM_DEPS:-0}" = 1 ]; then
  bash scripts/system-deps.sh
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
fi
if ! log=$(.venv/bin/python -m pip install -q -e ".[$EXTRAS]" 2>&1); then
  echo "$log" >&2
  exit 1
fi
echo "$log" | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, transformers, harness; print('ready: torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"
