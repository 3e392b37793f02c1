"""Data-parallel benchmark: 1 rank vs N ranks (``quant --nproc N``, gloo on the CPU) on the same cores.

    python bench/distributed.py [--ranks 2 --iters 50 --nsamples 16 --seqlen 128 --batch_size 8]

For the 22.7M-parameter bench model (bench/engine_speed.py builds it) and the generic adapter's tiny
example, it runs ``quant`` once with one process (all cores' threads) and once with N ranks (one
thread each), and prints: time per tuning iteration and total tuning time, KL divergence of each
export to the fp model on held-out text, the share of identical 4-bit codes, the bytes all-reduced
per iteration per block, and a projected speedup for a 31B model on 8 GPUs (see ``project``).
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine_speed import build, heldout  # noqa: E402
from cli_args import run_parser  # noqa: E402

from blockquant.resources.distributed import split_batch  # noqa: E402

QUANT = os.path.join(os.path.dirname(sys.executable), "quant")
# The projection's model: a dense 31B transformer, 60 blocks holding ~95% of the weights.
BIG = dict(blocks=60, weights_per_block=31e9 * 0.95 / 60, group_size=128)
# One GPU's time per iteration for that model: the measured run (Gemma 4 31B, 512 x 2048
# samples, 2000 iterations, batch 8: 6.4 hours, the second GPU mostly holding layers) over 60 x 2000.
BIG_SECONDS_PER_ITER = 6.4 * 3600 / (60 * 2000)
LINKS = {"one node, NVLink (NCCL bus bandwidth ~300 GB/s)": 300e9,
         "two nodes x 4 GPUs, 200 Gb/s InfiniBand (~22 GB/s)": 22e9}


def run_quant(model: str | None, out: str, ranks: int, args, threads: int, seed: int = 0) -> dict:
    cmd = [QUANT] + ([model] if model else []) + [
        "--adapter", "generic", "-o", out, "--iters", str(args.iters), "--nsamples", str(args.nsamples),
        "--seqlen", str(args.seqlen), "--batch_size", str(args.batch_size), "--group_size", str(args.group_size),
        "--device", "cpu", "--seed", str(seed)]
    if ranks > 1:
        cmd += ["--nproc", str(ranks)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with open(os.path.join(out, "blockquant_report.json")) as f:
        report = json.load(f)
    blocks = len(report["blocks"])
    return {"tuning_s": report["tuning_seconds"], "per_iter_s": report["tuning_seconds"] / (blocks * args.iters),
            "blocks": blocks}


def kl_to_fp(fp_model, out: str, ids) -> float:
    from blockquant import load_quantized

    with torch.no_grad():
        ref = fp_model(input_ids=ids).logits.double()
        got = load_quantized(out)(input_ids=ids).logits.double()
    p, q = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    return torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum").item() / ids.numel()


def codes(out: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    packed = {k: v for f in sorted(glob.glob(os.path.join(out, "*.safetensors")))
              for k, v in load_file(f).items() if k.endswith(".qweight")}
    return {k: torch.stack([(v >> (4 * i)) & 15 for i in range(8)]) for k, v in packed.items()}


def same_codes(a: str, b: str) -> float:
    ca, cb = codes(a), codes(b)
    return sum((ca[k] == cb[k]).sum().item() for k in ca) / sum(v.numel() for v in ca.values())


def reduced_bytes(out: str, group_size: int) -> int:
    """Gradient bytes all-reduced per iteration for the first block: fp32 rounding offsets (one per
    weight) and min/max clipping factors (two per group of each quantized layer), as reduce_grads sends."""
    from safetensors.torch import load_file

    total = 0
    for f in sorted(glob.glob(os.path.join(out, "*.safetensors"))):
        for k, v in load_file(f).items():
            if k.endswith(".qweight") and ".0." in k.split("layers")[-1][:3]:
                in_f, out_f = v.shape[0] * 8, v.shape[1]         # auto_round packs 8 4-bit codes per int32 row
                groups = in_f // group_size if group_size > 0 else 1
                total += 4 * out_f * in_f + 2 * 4 * out_f * groups
    return total


def imbalance(nsamples: int, batch: int, ranks: int) -> float:
    """The busiest rank's part of a mini-batch over an even share (batch / ranks), samples held round-robin."""
    return max(split_batch(batch, [len(range(r, nsamples, ranks)) for r in range(ranks)])) / (batch / ranks)


def project(ranks_measured: int, one: dict, many: dict, args) -> None:
    n = 8
    weights = BIG["weights_per_block"]
    grad_bytes = 4 * weights + 2 * 4 * weights / BIG["group_size"]
    load = imbalance(512, 8, n)
    print(f"\nprojection: 31B dense model ({BIG['blocks']} blocks, {weights / 1e6:.0f}M weights per block), 8 GPUs, "
          f"512 samples, batch 8")
    print(f"  measured here: {ranks_measured} ranks ran an iteration in {many['per_iter_s'] / one['per_iter_s']:.2f}x "
          f"the one-process time ({args.threads} thread(s)) on {os.cpu_count()} shared cores")
    print(f"  one GPU: {BIG_SECONDS_PER_ITER:.3f} s per iteration (the issue's 6.4 h run / 60 blocks / 2000 iterations)")
    print(f"  all-reduce per iteration: {grad_bytes / 1e9:.2f} GB of gradients; a ring all-reduce moves "
          f"2(N-1)/N = {2 * (n - 1) / n:.2f}x that per GPU")
    print(f"  busiest rank: {load:.2f}x its even share of a batch of 8 (each rank draws its share from its samples)")
    for label, bandwidth in LINKS.items():
        comm = grad_bytes * 2 * (n - 1) / n / bandwidth
        t = BIG_SECONDS_PER_ITER * load / n + comm
        print(f"  {label}: {t:.3f} s per iteration = {BIG_SECONDS_PER_ITER / t:.1f}x (communication {comm * 1e3:.0f} ms)")
    print("  how: time = one-GPU compute x busiest share / 8 + gradient bytes x 2(N-1)/N / bandwidth; capture, "
          "targets and outputs (full passes) split evenly; assumes compute scales with samples per rank")


def main():
    ap = run_parser(iters=50, nsamples=16, seqlen=128, batch_size=8)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads of the one-process run (default 1; see bench/README)")
    args = ap.parse_args()
    cores = os.cpu_count()
    print(f"{cores} cores (shared with other work: compare the ratios within one run); 1 process x {args.threads} "
          f"thread(s) vs {args.ranks} ranks x {max(1, cores // args.ranks)} thread(s), gloo")
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "model")
        params = build(folder)
        rows = []
        for name, model, group in ((f"bench model {params / 1e6:.1f}M", folder, args.group_size),
                                   ("generic example", None, 32)):
            setattr(args, "group_size", group)
            outs = {r: os.path.join(tmp, f"{len(rows)}-{r}") for r in (1, args.ranks, "seed1")}
            one = run_quant(model, outs[1], 1, args, args.threads)
            run_quant(model, outs["seed1"], 1, args, args.threads, seed=1)   # the spread of one process's result
            many = run_quant(model, outs[args.ranks], args.ranks, args, max(1, cores // args.ranks))
            fp_folder = model or _example_folder(tmp)
            fp = AutoModelForCausalLM.from_pretrained(fp_folder).eval()
            ids = heldout(fp_folder, n=4, seqlen=128) if model else torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(0))
            kl1, kln, kls = (kl_to_fp(fp, outs[k], ids) for k in (1, args.ranks, "seed1"))
            rows.append((name, one, many, kl1, kln, same_codes(outs[1], outs[args.ranks]),
                         reduced_bytes(outs[1], group), kls, same_codes(outs[1], outs["seed1"])))
            if model:
                big = (one, many)
        print(f"\n{'model':<22}{'ranks':>6}{'s/iter':>9}{'tuning s':>10}{'KL to fp':>11}{'KL vs 1':>9}{'same codes':>12}"
              f"{'bytes/iter/block':>18}")
        for name, one, many, kl1, kln, same, nbytes, kls, same_seed in rows:
            print(f"{name:<22}{1:>6}{one['per_iter_s']:>9.4f}{one['tuning_s']:>10.1f}{kl1:>11.3e}{'':>9}{'':>12}{nbytes:>18,}")
            print(f"{'  (seed 1)':<22}{1:>6}{'':>9}{'':>10}{kls:>11.3e}{(kls - kl1) / kl1:>+9.1%}{same_seed:>12.1%}")
            print(f"{'':<22}{args.ranks:>6}{many['per_iter_s']:>9.4f}{many['tuning_s']:>10.1f}{kln:>11.3e}"
                  f"{(kln - kl1) / kl1:>+9.1%}{same:>12.1%}{nbytes:>18,}")
        project(args.ranks, *big, args)


def _example_folder(tmp: str) -> str:
    from blockquant.adapters.generic import example_model

    folder = os.path.join(tmp, "example")
    example_model().save(folder)
    return folder


if __name__ == "__main__":
    main()
