#!/usr/bin/env bash
# GPU check, unattended on a 1-GPU machine in about 10 minutes (see bench/README.md, "gpu.sh"):
#   1. the CUDA tests (the suite's tests skipped without CUDA, and the device-selection tests);
#   2. blockquant vs auto-round 0.16.1 side by side on a generated ~0.6B-parameter Qwen3-style model
#      (random weights, built offline), W4 g128, printing tuning time, peak VRAM per device and KL;
#   3. blockquant's --compile on vs off on the same model (30 iters, 150 s each at most): does the compiled step pay off on CUDA?
# Needs a Python with a CUDA build of torch, transformers, auto-round==0.16.1 and this repository
# installed (PYTHON=..., default .venv/bin/python, else python3).  Nothing is downloaded.
#   bash bench/gpu.sh [--iters 200 --nsamples 64 --seqlen 512 ...]   (extra args go to vs_autoround.py)
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    PY=.venv/bin/python
  else
    PY=python3
  fi
fi
OUT=${OUT:-$(mktemp -d)}
status=0

"$PY" - <<'EOF' || { echo "gpu.sh: no usable CUDA torch in $PY; set PYTHON=... to one" >&2; exit 2; }
import sys, torch, transformers
print(f"python {sys.version.split()[0]}  torch {torch.__version__}  transformers {transformers.__version__}")
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name} {p.total_memory / 2**30:.0f} GiB")
try:
    import auto_round
    print("auto-round", auto_round.__version__)
except ImportError:
    print("auto-round not installed: the side-by-side runs blockquant only")
EOF

echo "== 1. CUDA tests"
timeout 240 "$PY" -m pytest -q -x -p no:randomly -p no:cacheprovider \
  tests/test_tuning.py::test_tuning_on_cuda tests/test_quantizers.py::test_cuda_matches_cpu \
  tests/test_export_formats.py::test_quant_linear_on_cuda \
  tests/test_reliability.py::test_cuda_oom_in_calibration_falls_back_to_cpu tests/test_report.py \
  || status=1

echo "== 2. side by side, Qwen3-style ~0.6B, cuda"
tools=blockquant,autoround
"$PY" -c 'import auto_round' 2>/dev/null || tools=blockquant
timeout 420 "$PY" bench/vs_autoround.py --shape 0.6b --device cuda --iters 200 --nsamples 64 --seqlen 512 \
  --batch_size 8 --repeats 1 --tools "$tools" --keep "$OUT" "$@" || status=1
echo "== 3. blockquant's compiled step (--compile on vs off; compilation counted), Qwen3-style ~0.6B, cuda"
for c in off on; do
  timeout 150 "$PY" bench/vs_autoround.py --shape 0.6b --device cuda --iters 30 --nsamples 64 --seqlen 512 \
    --batch_size 8 --repeats 1 --tools blockquant --compile $c --keep "$OUT" || status=1
done
echo "gpu.sh: exit $status"
exit $status
