"""blockquant vs auto-round, side by side: the same generated model, data and settings, one script run.

    python bench/vs_autoround.py [--shape small|0.6b|4b-block] [--device cpu|cuda] [--iters 200 --nsamples 32
                                 --seqlen 256 --batch_size 8 --bits 4 --group_size 128] [--repeats 2]
                                 [--tools blockquant,autoround] [--threads N] [--parallel] [--keep DIR]

A random-weight Qwen3-style model is generated offline (``small``: 4 blocks of hidden 512, 22.7M
parameters; ``0.6b``: Qwen3-0.6B proportions, for the GPU check; ``4b-block``: one block of Qwen3-4B
proportions).  Both tools get the same calibration
tokens (the engine's default corpus cut by ``build_token_samples``), W4 g128 symmetric
quantization, the same iterations, samples, sequence length and batch size, and no lm_head.

Every run is its own child process; runs alternate (blockquant, auto-round, auto-round, blockquant, ...)
so that a noisy machine affects both alike.  Per run: the tuning time (blockquant: the report's
tuning_seconds, the sum of tune_block; auto-round: the sum of its SignRoundQuantizer.quantize_block,
torch.compile included), the quantization wall time (model load included, export excluded), the
process CPU time over it, peak RSS / peak VRAM per device, and the KL divergence of the final logits
to the fp model on held-out text (8 x 256 tokens of the corpus' held-out split).  Ratios are
blockquant's medians over auto-round's.  ``--threads N`` sets both tools' torch threads;
``--parallel`` runs the two at the same time.  On the CPU, the run ends with the GEMM floor: the
seconds the tuned layers' matrix products alone take on this machine (``gemm_floor``), which bounds
how fast any exact AutoRound can tune here.  On a shared, overloaded machine, ``--threads 1
--parallel`` gives the most stable comparison: both see the same load, and the CPU seconds of a
one-thread run hardly depend on it.  Requires ``auto-round`` (pip install -c
.ci/constraints.txt auto-round==0.16.1); nothing downloads.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from cli_args import run_parser  # noqa: E402

SHAPES = {
    # 4 x (0.79M attention + 2.36M MLP) + a 19776 x 512 tied embedding = 22.7M parameters
    "small": dict(layers=4, hidden=512, intermediate=1536, heads=8, kv_heads=4, head_dim=64, vocab=19776),
    # Qwen3-0.6B proportions: 28 x 1024/3072, 16 heads / 8 KV heads of 128, 152k tied vocabulary
    "0.6b": dict(layers=28, hidden=1024, intermediate=3072, heads=16, kv_heads=8, head_dim=128, vocab=151936),
    # one block of Qwen3-4B proportions (2560/9728, 32 heads / 8 KV heads of 128): 99.6M tuned weights
    "4b-block": dict(layers=1, hidden=2560, intermediate=9728, heads=32, kv_heads=8, head_dim=128, vocab=1024),
}


def build(folder: str, shape: dict) -> int:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from blockquant.data.tiny import tiny_tokenizer

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = Qwen3ForCausalLM(cfg).eval()
    if shape["layers"] > 8:          # the large shape is stored like a real checkpoint, in bf16
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    tiny_tokenizer(min(shape["vocab"], 32000)).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def calibration(folder: str, args):
    """The token samples blockquant's default calibration builds (same seed): auto-round gets these."""
    from transformers import AutoTokenizer

    from blockquant.data.calibration_data import build_token_samples, load_texts

    tok = AutoTokenizer.from_pretrained(folder)
    return [s["input_ids"] for s in build_token_samples(tok, load_texts(None), args.nsamples, args.seqlen, 0)]


def heldout(folder: str, n=8, seqlen=256):
    import torch
    from transformers import AutoTokenizer

    from blockquant.data.corpus import stdlib_paragraphs

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("\n\n".join(stdlib_paragraphs("heldout")), return_tensors="pt").input_ids[0]
    return torch.stack([ids[i * seqlen:(i + 1) * seqlen] for i in range(n)])


def kl_to_fp(folder: str, model, device) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    ids = heldout(folder).to(device)
    fp = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    model = model.to(device, torch.float32).eval()
    with torch.no_grad():
        kl = 0.0
        for row in ids.split(2):     # a few rows at a time: the 152k-vocabulary logits are large
            p = torch.log_softmax(fp(input_ids=row).logits.double(), -1)
            q = torch.log_softmax(model(input_ids=row).logits.double(), -1)
            kl += torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum").item()
    return kl / ids.numel()


def timed(owner, name: str, spent: dict, device: str) -> None:
    """Wrap ``owner.name`` so that its wall and CPU seconds add up in ``spent``."""
    inner = getattr(owner, name)

    def wrapper(*a, **kw):
        import torch

        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return inner(*a, **kw)
        finally:
            if device != "cpu":
                torch.cuda.synchronize()
            spent["tuning_s"] += time.perf_counter() - t0
            spent["tuning_cpu_s"] += time.process_time() - c0

    setattr(owner, name, wrapper)


def run_blockquant(folder: str, args):
    from blockquant import api
    from blockquant.run import loop

    spent = {"tuning_s": 0.0, "tuning_cpu_s": 0.0}
    timed(loop, "tune_block", spent, args.device)      # the block loop's tune_block
    result = api.quantize(folder, adapter="generic", iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen,
                          batch_size=args.batch_size, bits=args.bits, group_size=args.group_size, device=args.device,
                          format="fake", keep_blocks=True, seed=0, compile=args.compile)
    return result.model, spent


def run_autoround(folder: str, args):
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from auto_round.algorithms.quantization.sign_round.quantizer import SignRoundQuantizer

    spent = {"tuning_s": 0.0, "tuning_cpu_s": 0.0}
    timed(SignRoundQuantizer, "quantize_block", spent, args.device)   # the peer's counterpart of tune_block
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    ar = AutoRound(model, tok, bits=args.bits, group_size=args.group_size, sym=True, iters=args.iters,
                   nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, seed=0,
                   dataset=calibration(folder, args), device_map=args.device)
    ar.quantize()
    return ar.model, {**spent, "compiled": bool(getattr(ar, "enable_torch_compile", False))}


def gemm_floor(shape: dict, args) -> float:
    """Seconds that the tuned layers' matrix products alone take over the whole run, timed here with
    the run's threads: per block and iteration, every layer's forward (x W^T) and weight gradient
    (dY^T x), and the input gradient (dY W) of every layer but q/k/v (their input, the normed block
    input, needs none); the last iteration has no backward.  Both tools compute exactly these products,
    so no exact AutoRound on this machine can tune faster (CPU only)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    h, inter = shape["hidden"], shape["intermediate"]
    q, kv = shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    layers = [(q, h, False), (kv, h, False), (kv, h, False), (h, q, True), (inter, h, True), (inter, h, True),
              (h, inter, True)]
    tokens = min(args.batch_size, args.nsamples) * args.seqlen
    forward = backward = 0.0
    for out_f, in_f, needs_input_grad in layers:
        x, w, gy = torch.randn(tokens, in_f), torch.randn(out_f, in_f), torch.randn(tokens, out_f)
        forward += _fastest(lambda: torch.nn.functional.linear(x, w))
        backward += _fastest(lambda: gy.t() @ x) + (_fastest(lambda: gy @ w) if needs_input_grad else 0.0)
    return shape["layers"] * (args.iters * forward + (args.iters - 1) * backward)


def _fastest(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def grid_check(model) -> int:
    """Distinct values in the first group of the first block's q_proj (a quantized layer has <= 2^bits)."""
    w = model.model.layers[0].self_attn.q_proj.weight
    return int(w[0, :128].float().unique().numel())


def child(tool: str, folder: str, args) -> dict:
    import torch

    from blockquant.resources.memory import peak_rss_bytes, peak_vram_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu0, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    model, extra = (run_blockquant if tool == "blockquant" else run_autoround)(folder, args)
    if args.device != "cpu":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    row = {"tool": tool, "wall_s": wall, "cpu_s": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
           "peak_rss_mib": peak_rss_bytes() / 2 ** 20,
           "peak_vram_mib": {k: v / 2 ** 20 for k, v in peak_vram_bytes().items()}, **extra}
    row["grid_values"] = grid_check(model)
    row["kl"] = kl_to_fp(folder, model, args.device)
    return row


def main():
    ap = run_parser(iters=200, nsamples=32, seqlen=256, batch_size=8, bits=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2, help="runs per tool, alternating (default 2)")
    ap.add_argument("--tools", default="blockquant,autoround")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="blockquant's --compile (compilation time counts as tuning time)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads for both tools (default: torch's)")
    ap.add_argument("--parallel", action="store_true",
                    help="run the tools at the same time (a loaded machine: both see the same load; compare CPU seconds)")
    ap.add_argument("--keep", help="generate the model here and keep it (default: a temporary folder)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], args.child[1], args)), flush=True)
        return
    tools = args.tools.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(args.keep or tmp, f"qwen3-{args.shape}")
        if not os.path.exists(os.path.join(folder, "config.json")):
            params = build(folder, SHAPES[args.shape])
        else:
            params = None
        print(f"model: Qwen3-style {args.shape} {SHAPES[args.shape]}"
              + (f", {params / 1e6:.1f}M parameters" if params else "")
              + f"; W{args.bits} g{args.group_size} sym, {args.iters} iters, {args.nsamples} x {args.seqlen} tokens, "
              f"batch {args.batch_size}, device {args.device}, torch threads {args.threads or _threads()}", flush=True)
        rows = []
        for r in range(args.repeats):
            order = tools if r % 2 == 0 else tools[::-1]
            waves = [order] if args.parallel else [[t] for t in order]
            for wave in waves:
                procs = [(tool, subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", tool, folder]
                                                 + _pass(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
                         for tool in wave]
                for tool, proc in procs:
                    stdout, stderr = proc.communicate()
                    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
                    if proc.returncode or not lines:
                        sys.stderr.write(stderr[-4000:])
                        raise SystemExit(f"{tool} run failed (exit {proc.returncode})")
                    rows.append(json.loads(lines[-1][7:]))
                    _print_row(rows[-1])
        _summary(rows, tools)
        if args.device == "cpu":
            floor = gemm_floor(SHAPES[args.shape], args)
            tuned = {t: statistics.median(r["tuning_s"] for r in rows if r["tool"] == t) for t in tools}
            print(f"GEMM floor (the tuned layers' matrix products alone, timed now): {floor:.1f} s = "
                  + ", ".join(f"{floor / s:.3f} x {t}'s tuning" for t, s in tuned.items()))


def _print_row(r: dict) -> None:
    vram = ", ".join(f"{k} {v:.0f} MiB" for k, v in r["peak_vram_mib"].items()) or "-"
    extra = "" if "compiled" not in r else f"  compiled {r['compiled']}"
    print(f"{r['tool']:<11} tuning {r['tuning_s']:7.1f} s (cpu {r['tuning_cpu_s']:7.1f} s)  wall {r['wall_s']:7.1f} s  cpu {r['cpu_s']:7.1f} s  peak RSS {r['peak_rss_mib']:6.0f} MiB  "
          f"peak VRAM {vram}  KL {r['kl']:.4e}  grid {r['grid_values']}{extra}", flush=True)


def _summary(rows: list[dict], tools: list[str]) -> None:
    med = {t: {k: statistics.median(r[k] for r in rows if r["tool"] == t) for k in ("tuning_s", "tuning_cpu_s", "wall_s", "cpu_s", "kl")}
           for t in tools}
    for t in tools:
        print(f"median {t:<11} tuning {med[t]['tuning_s']:7.1f} s (cpu {med[t]['tuning_cpu_s']:7.1f} s)  wall {med[t]['wall_s']:7.1f} s  cpu {med[t]['cpu_s']:7.1f} s  KL {med[t]['kl']:.4e}")
    if len(tools) == 2:
        a, b = tools
        print(f"ratio {a}/{b}: tuning {med[a]['tuning_s'] / med[b]['tuning_s']:.3f} "
              f"(cpu {med[a]['tuning_cpu_s'] / med[b]['tuning_cpu_s']:.3f})  wall {med[a]['wall_s'] / med[b]['wall_s']:.3f}  cpu {med[a]['cpu_s'] / med[b]['cpu_s']:.3f}"
              f"  KL {med[a]['kl'] / med[b]['kl']:.3f}")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _pass(args) -> list[str]:
    out = ["--shape", args.shape, "--device", args.device, "--iters", str(args.iters), "--nsamples", str(args.nsamples),
           "--seqlen", str(args.seqlen), "--batch_size", str(args.batch_size), "--bits", str(args.bits),
           "--group_size", str(args.group_size), "--compile", args.compile]
    return out + (["--threads", str(args.threads)] if args.threads else [])


if __name__ == "__main__":
    main()
