#!/usr/bin/env bash
# The gemma4 adapter's tests on one transformers release in an environment of their own: CI runs them on
# the oldest supported release (5.5.4) and on the newest one installable here (5.24.0; 5.25.0 needs a
# `kernels` release the registry does not have), the main suite runs on the pin of .ci/constraints.txt.
#
#   .ci/gemma4-compat.sh PYTHON VENV_DIR TRANSFORMERS_VERSION [pytest args...]
#
# VENV_DIR is created when missing and reused otherwise (pip skips what is already installed);
# delete it to start from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: .ci/gemma4-compat.sh PYTHON VENV_DIR TRANSFORMERS_VERSION [pytest args...]"
PY=${1:?$usage}
VENV=${2:?$usage}
VERSION=${3:?$usage}
shift 3
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# the main constraints with this transformers release; 5.5.x needs the tokenizers of its time
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
sed "s/^transformers==.*/transformers==$VERSION/" .ci/constraints.txt > "$CONSTRAINTS"
EXTRA=()
case "$VERSION" in 5.5.*) EXTRA=("tokenizers>=0.22,<0.23");; esac

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS")
"${PIP[@]}" "torch==2.13.0"                 # first and alone: any other torch spec pulls the CUDA build
"${PIP[@]}" "transformers==$VERSION" ${EXTRA[@]+"${EXTRA[@]}"} accelerate pluggy safetensors packaging psutil \
    pytest Pillow pyarrow sentencepiece
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" - "$VERSION" <<'PY'
import sys, torch, transformers
assert transformers.__version__ == sys.argv[1], transformers.__version__
print(f"gemma4 compat: torch {torch.__version__}, transformers {transformers.__version__}")
PY
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_gemma4*.py "$@"
