"""RTN (--iters 0) speed: quantizing straight from the streamed weights vs the calibrated path.

    python bench/rtn_speed.py [--nsamples 128 --seqlen 2048]

Builds engine_speed.py's ~20M-parameter Llama-style model, stored like a published checkpoint (bfloat16,
two shards + index), and runs `quant MODEL --iters 0` twice, each in its own interpreter:

- weights only: what `--iters 0` does now (no calibration data, no capture, no replay);
- calibrated: the path every RTN run took before - the offline default corpus written to a .txt and passed
  as --dataset, which keeps capture and replay (--nsamples x --seqlen tokens, default 128 x 2048).

Prints wall time, peak RSS (the child's VmHWM) and whether the two outputs are byte-identical.
"""
from __future__ import annotations

import argparse
import filecmp
import glob
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHILD = """
import sys, time
from blockquant.frame.cli import main
start = time.time()
rc = main(sys.argv[1:])
wall = time.time() - start
peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))
print(f'RESULT {rc} {wall:.2f} {peak / 1024:.0f}')
"""


def run(folder: str, out: str, extra: list[str]) -> tuple[float, float]:
    argv = [folder, "--adapter", "generic", "--iters", "0", "-o", out, "--overwrite"] + extra
    done = subprocess.run([sys.executable, "-c", CHILD] + argv, capture_output=True, text=True, check=True)
    rc, wall, peak = done.stdout.strip().splitlines()[-1].split()[1:]
    assert rc == "0", done.stderr[-2000:]
    return float(wall), float(peak)


def main():
    from engine_speed import SHAPE, build

    from blockquant.data.corpus import stdlib_paragraphs
    from blockquant.model.published import publish_like

    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "model")
        params = build(folder)
        publish_like(folder)
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w") as f:
            f.write("\n\n".join(stdlib_paragraphs("train")))
        sizes = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
        direct = run(folder, os.path.join(tmp, "direct"), sizes)
        calibrated = run(folder, os.path.join(tmp, "calibrated"), sizes + ["--dataset", corpus])
        a = sorted(glob.glob(os.path.join(tmp, "direct", "*.safetensors")))
        same = bool(a) and all(filecmp.cmp(p, p.replace("/direct/", "/calibrated/"), shallow=False) for p in a)
        print(f"model: {params / 1e6:.1f}M parameters {SHAPE}, bf16 in 2 shards; W4 g128; "
              f"calibrated path: {args.nsamples} x {args.seqlen} tokens")
        print(f"{'RTN path':<28}{'wall s':>8}{'peak RSS MiB':>14}")
        print(f"{'calibrated (before)':<28}{calibrated[0]:>8.1f}{calibrated[1]:>14.0f}")
        print(f"{'weights only (now)':<28}{direct[0]:>8.1f}{direct[1]:>14.0f}")
        print(f"outputs byte-identical: {same}")


if __name__ == "__main__":
    main()
