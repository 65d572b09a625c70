#!/usr/bin/env bash
# A SEPARATE virtual env for the TRL peer benchmark (bench/trl_peer.py): TRL 1.16.0's GRPOTrainer on the CPU
# torch 2.13.0 wheel. TRL is never a dependency of dynamo_mega; this env imports nothing from the package.
#   bash bench/trl_venv.sh        # creates bench/.venv-trl (idempotent: a stamp records this script's hash)
# torch first (the local CPU wheel, ../shared/ENVIRONMENT.md), so nothing later pulls a multi-GB CUDA build;
# transformers 5.17.0 as in the trainer's venv (TRL 1.16 accepts it); math-verify 0.9.0 scores like rl/reward.py.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if ! "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  echo "trl_venv.sh: Python 3.11 is required (the torch 2.13.0 CPU wheel is cp311); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
VENV=.venv-trl
stamp_want=$(sha256sum trl_venv.sh | cut -d' ' -f1)
if [ -f "$VENV/.setup-stamp" ] && [ "$(cat "$VENV/.setup-stamp")" = "$stamp_want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input -q)
export PIP_PROGRESS_BAR=off
"${PIP[@]}" install --upgrade "pip>=24" wheel
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install "trl==1.16.0" "torch==2.13.0" "transformers==5.17.0" "math-verify==0.9.0" "numpy<2.5"
"$VENV/bin/python" -c "import torch, trl, transformers, math_verify; print('trl', trl.__version__, 'transformers', \
transformers.__version__, 'torch', torch.__version__)" \
  || { echo "trl_venv.sh: installed packages failed to import (see above)" >&2; exit 1; }
echo "$stamp_want" > "$VENV/.setup-stamp"
