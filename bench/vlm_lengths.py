"""Tuning time per iteration of a tiny VLM with images of three sizes vs one size.

    python bench/vlm_lengths.py [--iters 20 --nsamples 12 --batch_size 4 --rounds 2] [--vision]
                                [--adapter qwen_vl|gemma4]

The model is the qwen_vl adapter's example (``quant --adapter qwen_vl``: 4 text blocks of width 128), or with
``--adapter gemma4`` the gemma4 adapter's multimodal example (4 text blocks of width 64, all of them storing
or reading shared keys/values, whose samples join through the state view of core/run/sample_state.py).
Every sample has the same caption; only the image size changes its length.  Three runs per round, all
in this process on the CPU, the same settings otherwise:

- ``one size``: every image 112x56 (all samples of one length: stacked as they are);
- ``three sizes``: 56x56, 112x56 and 112x112 in turn (three lengths: one right-padded forward per
  mini-batch, core/run/padding.py);
- ``three sizes, one by one``: the same data with padding turned off (the sample-by-sample path).

Prints the tuning milliseconds per iteration per block (all blocks' tune_block time / iterations /
blocks, first iterations included; the fastest of ``--rounds``) and the ratios to ``one size``.
``--vision``: the vision blocks are quantized too (group size 32: their width), and the figures are theirs (each vision block's time
in the report, fp targets and outputs included, / iterations); their samples are packed along the
patches with joined ``cu_seqlens`` (core/run/packed_samples.py), or run one by one without it.
"""
from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vs_autoround import timed  # noqa: E402
from cli_args import run_parser  # noqa: E402

SIZES = {"one size": ((112, 56),), "three sizes": ((56, 56), (112, 56), (112, 112))}
CAPTION = "a red circle on a blue background"


def images(folder: str, sizes, n: int) -> str:
    from blockquant.data.image_data import draw_shape

    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        draw_shape("circle", "red", "blue", sizes[i % len(sizes)]).save(os.path.join(folder, f"{i:03d}.png"))
        with open(os.path.join(folder, f"{i:03d}.txt"), "w") as f:
            f.write(CAPTION)
    return folder


def one_run(model: str, data: str, pad: bool, args) -> tuple[float, list[int]]:
    """Tuning ms per iteration per block, and the samples' lengths."""
    from blockquant import api
    from blockquant.run import loop
    from blockquant.run.replay import Replayer

    class Unpadded(Replayer):
        def __init__(self, *a, **kw):
            kw["pad"] = False
            super().__init__(*a, **kw)

    spent = {"tuning_s": 0.0, "tuning_cpu_s": 0.0}
    saved = loop.tune_block, loop.Replayer
    timed(loop, "tune_block", spent, "cpu")
    if not pad:
        loop.Replayer = Unpadded
    try:
        vision = {"quant_vision": args.vision} if args.adapter == "qwen_vl" else {}
        result = api.quantize(model, adapter=args.adapter, images=data, format="fake", keep_blocks=True, seed=0,
                              device="cpu", iters=args.iters, nsamples=args.nsamples, seqlen=128,
                              batch_size=args.batch_size, **vision,
                              # the qwen_vl vision width is 32; the gemma4 example's text width is 64
                              **({"group_size": 32} if args.vision or args.adapter == "gemma4" else {}))
    finally:
        loop.tune_block, loop.Replayer = saved
    if not args.vision:
        lengths = [s["hidden_states"].shape[1] for s in result.run.stores[0].streams]
        return spent["tuning_s"] / (args.iters * len(result.report.blocks)) * 1000, lengths
    # the vision blocks' own time (targets, tuning and outputs) from the report; their samples are packed
    vision = [b for b in result.report.blocks if ".visual." in f".{b.name}."]
    store = next(st for st, chain in zip(result.run.stores, result.run.groups) if ".visual." in f".{chain[0].ref.path}.")
    lengths = [s["hidden_states"].shape[0] for s in store.streams]
    return sum(b.seconds for b in vision) / (args.iters * len(vision)) * 1000, lengths


def main():
    ap = run_parser(iters=20, nsamples=12, seqlen=None, batch_size=4, group_size=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--adapter", choices=("qwen_vl", "gemma4"), default="qwen_vl")
    ap.add_argument("--vision", action="store_true",
                    help="quantize the vision blocks too and time them (their images are packed, not padded)")
    args = ap.parse_args()
    if args.vision and args.adapter != "qwen_vl":
        ap.error("--vision times the qwen_vl example's vision blocks")

    if args.adapter == "gemma4":
        from blockquant.adapters.gemma4 import example_multimodal as example_model
    else:
        from blockquant.adapters.qwen_vl import example_model

    runs = {"one size": ("one size", True), "three sizes": ("three sizes", True),
            "three sizes, one by one": ("three sizes", False)}
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        example_model().save(model)
        data = {k: images(os.path.join(tmp, k.replace(" ", "-")), v, args.nsamples) for k, v in SIZES.items()}
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, (sizes, pad) in runs.items():
                ms, lengths = one_run(model, data[sizes], pad, args)
                best[name] = min(best.get(name, ms), ms)
                print(f"  {name:<24} {ms:7.1f} ms per iteration per block  (sample lengths {sorted(set(lengths))})")
    print(f"iters {args.iters}, {args.nsamples} samples, batch {args.batch_size}, fastest of {args.rounds} round(s):")
    for name, ms in best.items():
        print(f"{name:<24} {ms:7.1f} ms   ratio to one size {ms / best['one size']:.2f}x")


if __name__ == "__main__":
    main()
