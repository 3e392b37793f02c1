"""Engine benchmark: time, peak RSS and quality of RTN and AutoRound on a generated ~20M-parameter LM.

    python bench/engine_speed.py [--iters 200 --nsamples 32 --seqlen 256 --batch_size 8 --device cpu]

Each method runs in its own process (clean peak RSS).  Quality: KL divergence of the final logits to
the fp model and relative logit error, on held-out text (the stdlib corpus' held-out split).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from cli_args import run_parser  # noqa: E402

SHAPE = dict(hidden=256, intermediate=768, layers=8, heads=8, kv_heads=4, vocab=32000)


def build(folder: str) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from blockquant.data.tiny import tiny_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["intermediate"],
                      num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
                      num_key_value_heads=SHAPE["kv_heads"], max_position_embeddings=4096, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    tiny_tokenizer(SHAPE["vocab"]).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def heldout(folder: str, n=8, seqlen=256):
    import torch
    from transformers import AutoTokenizer

    from blockquant.data.corpus import stdlib_paragraphs

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("\n\n".join(stdlib_paragraphs("heldout")), return_tensors="pt").input_ids[0]
    return torch.stack([ids[i * seqlen:(i + 1) * seqlen] for i in range(n)])


def one(folder: str, iters: int, args) -> dict:
    """Runs in a child process: quantize in memory, evaluate against the fp model."""
    import torch
    from transformers import AutoModelForCausalLM

    from blockquant import api
    from blockquant.resources.memory import peak_rss_bytes

    if args.special == "off":   # calibration samples without the tokenizer's bos
        from blockquant.data import calibration_data

        calibration_data.special_frame = lambda tokenizer: ([], [])
    torch.manual_seed(0)
    start = time.time()
    result = api.quantize(folder, adapter="generic", iters=iters, nsamples=args.nsamples, seqlen=args.seqlen,
                          batch_size=args.batch_size, bits=args.bits, group_size=args.group_size, device=args.device,
                          format="fake", keep_blocks=True, seed=0, amp=not args.disable_amp)
    wall = time.time() - start
    peak = peak_rss_bytes()
    ids = heldout(folder)
    fp = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        ref = fp(input_ids=ids).logits.double()
        got = result.model.to("cpu", torch.float32)(input_ids=ids).logits.double()
    p, q = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum").item() / (ids.numel())
    rel = ((got - ref).norm() / ref.norm()).item()
    return {"iters": iters, "wall_s": wall, "tuning_s": result.report.tuning_seconds,
            "capture_s": result.report.capture_seconds, "peak_rss_mib": peak / 2 ** 20, "kl": kl, "rel_logit_err": rel}


def main():
    ap = run_parser(iters=200, nsamples=32, seqlen=256, batch_size=8, bits=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--disable_amp", action="store_true", help="tune in fp32 (no bf16 autocast)")
    ap.add_argument("--special", choices=("on", "off"), default="on",
                    help="calibration samples framed by the tokenizer's special tokens (bos here) or not")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(args.child[0], int(args.child[1]), args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "model")
        params = build(folder)
        print(f"model: Llama-style, {params / 1e6:.1f}M parameters {SHAPE}; W{args.bits} g{args.group_size}, "
              f"nsamples {args.nsamples}, seqlen {args.seqlen}, batch {args.batch_size}, device {args.device}")
        rows = []
        for iters in (0, args.iters):
            cmd = [sys.executable, __file__, "--child", folder, str(iters)] + _pass(args)
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{'method':<16}{'wall s':>8}{'tuning s':>10}{'peak RSS MiB':>14}{'KL':>12}{'rel logit err':>15}")
        for r in rows:
            name = "RTN" if r["iters"] == 0 else f"AutoRound {r['iters']}"
            print(f"{name:<16}{r['wall_s']:>8.1f}{r['tuning_s']:>10.1f}{r['peak_rss_mib']:>14.0f}{r['kl']:>12.3e}"
                  f"{r['rel_logit_err']:>15.4f}")


def _pass(args) -> list[str]:
    return ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch_size", str(args.batch_size),
            "--bits", str(args.bits), "--group_size", str(args.group_size), "--device", args.device, "--special", args.special] + (["--disable_amp"] if args.disable_amp else [])


if __name__ == "__main__":
    main()
