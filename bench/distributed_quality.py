"""Quality of data-parallel tuning: KL to the fp model of 1-process and N-rank runs over several seeds.

    python bench/distributed_quality.py [--ranks 2 --seeds 3 --iters 100 --nsamples 32 --seqlen 128]

One process and N ranks compute the same mini-batch loss and gradients up to float summation order, but
SignSGD follows the sign of each gradient entry, so entries near zero flip and the two runs drift apart
like two seeds do.  A single pair of runs therefore says little; this script runs ``--seeds`` seeds of
each on engine_speed.py's 22.7M-parameter model and compares the mean KL divergence (held-out text), with
the spread over seeds and the share of identical 4-bit codes between same-seed runs.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from distributed import kl_to_fp, run_quant, same_codes  # noqa: E402
from engine_speed import build, heldout  # noqa: E402
from cli_args import run_parser  # noqa: E402


def main():
    ap = run_parser(iters=100, nsamples=32, seqlen=128, batch_size=8)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first_seed", type=int, default=0)
    ap.add_argument("--one_process_kl", default="", help="comma-separated KLs of the 1-process runs of seeds 0.. "
                    "from an earlier run of this script (they are deterministic): only the N-rank runs run")
    args = ap.parse_args()
    reused = [float(x) for x in args.one_process_kl.split(",") if x]
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "model")
        params = build(folder)
        fp = AutoModelForCausalLM.from_pretrained(folder).eval()
        ids = heldout(folder, n=8, seqlen=256)
        kl = {1: [], args.ranks: []}
        same = []
        for n, seed in enumerate(range(args.first_seed, args.first_seed + args.seeds)):
            outs = {}
            for ranks in (1, args.ranks):
                if ranks == 1 and reused:
                    kl[1].append(reused[n])
                    continue
                outs[ranks] = os.path.join(tmp, f"s{seed}-r{ranks}")
                run_quant(folder, outs[ranks], ranks, args, threads=1, seed=seed)
                kl[ranks].append(kl_to_fp(fp, outs[ranks], ids))
            same.append(same_codes(outs[1], outs[args.ranks]) if not reused else float("nan"))
            print(f"seed {seed}: KL 1 process {kl[1][-1]:.4e}, {args.ranks} ranks {kl[args.ranks][-1]:.4e} "
                  f"({kl[args.ranks][-1] / kl[1][-1] - 1:+.1%}), identical codes {same[-1]:.1%}", flush=True)
        m1, mn = statistics.mean(kl[1]), statistics.mean(kl[args.ranks])
        print(f"\n{params / 1e6:.1f}M model, W4 g{args.group_size}, {args.iters} iters, {args.nsamples} x {args.seqlen} "
              f"tokens, batch {args.batch_size}, {args.seeds} seeds")
        print(f"mean KL: 1 process {m1:.4e} (seed spread {statistics.pstdev(kl[1]) / m1:.1%}), {args.ranks} ranks "
              f"{mn:.4e} (spread {statistics.pstdev(kl[args.ranks]) / mn:.1%}); ratio {mn / m1:.4f} ({mn / m1 - 1:+.2%})")
        print(f"identical codes, same seed: mean {statistics.mean(same):.1%}")


if __name__ == "__main__":
    main()
