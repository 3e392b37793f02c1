#!/usr/bin/env bash
# The gemma4 adapter on the OLD side of its supported transformers range (5.5.4): build a virtual
# environment with torch 2.13.0 (CPU) + transformers 5.5.4 + blockquant's other dependencies, install
# blockquant into it (editable, --no-deps), and run tests/test_gemma4*.py there.
#
#   .ci/gemma4-compat.sh PYTHON VENV_DIR [pytest args...]
#
# VENV_DIR is created when missing and reused otherwise (pip skips what is already installed);
# delete it to start from scratch.  The main suite covers the new side (transformers 5.23).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: .ci/gemma4-compat.sh PYTHON VENV_DIR [pytest args...]}
VENV=${2:?usage: .ci/gemma4-compat.sh PYTHON VENV_DIR [pytest args...]}
shift 2
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

TRANSFORMERS="transformers==5.5.4"
# blockquant's dependencies and test needs, pinned as verified with transformers 5.5.4
DEPS=(accelerate==1.15.0 pluggy==1.7.0 safetensors==0.8.0 "tokenizers>=0.22,<0.23" packaging psutil
      pytest Pillow pyarrow sentencepiece)

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" "torch==2.13.0"                 # first and alone: any other torch spec pulls the CUDA build
"${PIP[@]}" "torch==2.13.0" "$TRANSFORMERS" "${DEPS[@]}"
"${PIP[@]}" --no-deps -e .
"$VENV/bin/python" - <<'PY'
import torch, transformers
assert transformers.__version__ == "5.5.4", transformers.__version__
print(f"gemma4 compat: torch {torch.__version__}, transformers {transformers.__version__}")
PY
exec "$VENV/bin/python" -m pytest -q tests/test_gemma4*.py "$@"
