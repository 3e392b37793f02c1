"""Per-iteration cost of AutoRound tuning on three kinds of block, with an optional profile.

    python bench/tuning_profile.py [--shape demo|small|4b-block] [--iters N] [--profile cprofile|torch]
                                   [--rows 25] [--threads N] [--keep DIR] [--compile auto|on|off]

- ``demo``: the gemma4 adapter's example model (four tiny Gemma 4 blocks, hidden 64) at the README
  demo's settings (50 iters, 16 x 128 tokens, group size 32, batch 8).
- ``small``: the 22.7M-parameter Qwen3-style model of vs_autoround.py (4 blocks of 512/1536) at
  32 x 256 tokens, batch 8.
- ``4b-block``: one block of Qwen3-4B proportions (2560/9728, 32 heads / 8 KV heads of 128), at
  2 x 128 tokens, batch 2.

Prints the tuning seconds per iteration, wall and CPU (all blocks' tune_block time / iterations /
blocks, first iterations included) and the run's wall time; with ``--profile`` the top functions (cProfile) or
operators (torch.profiler, self CPU time).  Everything runs in this process on the CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vs_autoround import build, timed  # noqa: E402

SETTINGS = {
    "demo": dict(adapter="gemma4", iters=50, nsamples=16, seqlen=128, batch_size=8, group_size=32),
    "small": dict(adapter="generic", iters=20, nsamples=32, seqlen=256, batch_size=8, group_size=128),
    "4b-block": dict(adapter="generic", iters=4, nsamples=2, seqlen=128, batch_size=2, group_size=128),
}
MODELS = {
    "small": dict(layers=4, hidden=512, intermediate=1536, heads=8, kv_heads=4, head_dim=64, vocab=19776),
    "4b-block": dict(layers=1, hidden=2560, intermediate=9728, heads=32, kv_heads=8, head_dim=128, vocab=1024),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SETTINGS), default="small")
    ap.add_argument("--iters", type=int)
    ap.add_argument("--profile", choices=("cprofile", "torch"))
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--keep", help="generate the model here and keep it")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="the engine's --compile (compilation time counts as tuning time)")
    args = ap.parse_args()
    settings = dict(SETTINGS[args.shape])
    if args.iters is not None:
        settings["iters"] = args.iters
    settings["compile"] = args.compile
    with tempfile.TemporaryDirectory() as tmp:
        folder = None
        if args.shape in MODELS:
            folder = os.path.join(args.keep or tmp, f"qwen3-{args.shape}")
            if not os.path.exists(os.path.join(folder, "config.json")):
                build(folder, MODELS[args.shape])
        run(folder, settings, args)


def run(folder, settings, args):
    import torch

    from blockquant import api
    from blockquant.run import loop

    if args.threads:
        torch.set_num_threads(args.threads)
    spent = {"tuning_s": 0.0, "tuning_cpu_s": 0.0}
    timed(loop, "tune_block", spent, "cpu")

    def go():
        return api.quantize(folder, format="fake", keep_blocks=True, seed=0, device="cpu", **settings)

    start = time.perf_counter()
    if args.profile == "cprofile":
        import cProfile
        import pstats

        prof = cProfile.Profile()
        result = prof.runcall(go)
        stats = pstats.Stats(prof)
    elif args.profile == "torch":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            result = go()
    else:
        result = go()
    wall = time.perf_counter() - start
    steps = settings["iters"] * len(result.report.blocks)
    print(f"shape {args.shape}: {settings}; {len(result.report.blocks)} blocks, torch threads {torch.get_num_threads()}")
    print(f"tuning {spent['tuning_s']:.2f} s (cpu {spent['tuning_cpu_s']:.2f} s) = {spent['tuning_s'] / steps * 1000:.1f} ms "
          f"(cpu {spent['tuning_cpu_s'] / steps * 1000:.1f} ms) per iteration per block; wall {wall:.1f} s")
    if args.profile == "cprofile":
        stats.sort_stats("tottime").print_stats(args.rows)
    elif args.profile == "torch":
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
