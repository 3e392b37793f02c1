#!/usr/bin/env bash
# The gemma4 adapter's tests on one transformers release in an environment of their own: CI runs them on
# the oldest supported release (5.5.4), the newest one installable here with its dependencies (5.24.0) and
# the newest release (5.25.0), the main suite on the pin of .ci/constraints.txt.
#
#   .ci/gemma4-compat.sh PYTHON VENV_DIR TRANSFORMERS_VERSION [--deps-of VERSION] [pytest args...]
#
# --deps-of V installs transformers V with its dependencies, then TRANSFORMERS_VERSION without them: 5.25.0
# requires kernels>=0.19.1, which this package index does not have (transformers imports without it; only
# hub kernels, which the tests turn off, need it).
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
DEPS_OF=$VERSION
if [ "${1:-}" = "--deps-of" ]; then DEPS_OF=${2:?$usage}; shift 2; fi
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# the main constraints with this transformers release; 5.5.x needs the tokenizers of its time
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
sed "s/^transformers==.*/transformers==$DEPS_OF/" .ci/constraints.txt > "$CONSTRAINTS"
EXTRA=()
case "$DEPS_OF" in 5.5.*) EXTRA=("tokenizers>=0.22,<0.23");; esac

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS")
"${PIP[@]}" "torch==2.13.0"                 # first and alone: any other torch spec pulls the CUDA build
"${PIP[@]}" "transformers==$DEPS_OF" ${EXTRA[@]+"${EXTRA[@]}"} accelerate pluggy safetensors packaging psutil \
    pytest Pillow pyarrow sentencepiece
[ "$DEPS_OF" = "$VERSION" ] || "$VENV/bin/python" -m pip install -q --no-deps "transformers==$VERSION"
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" - "$VERSION" <<'PY'
import sys, torch, transformers
assert transformers.__version__ == sys.argv[1], transformers.__version__
print(f"gemma4 compat: torch {torch.__version__}, transformers {transformers.__version__}")
PY
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_gemma4*.py "$@"
