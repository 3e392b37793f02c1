"""GGUF in llama.cpp: does llama.cpp run blockquant's GGUF files as blockquant means them, and does
AutoRound beat RTN for the same GGUF type?

    python bench/gguf_llamacpp.py [--kind llama|qwen3] [--layers 4] [--hidden 256] [--iters 100] [--types q4_0,q4_1,q8_0,q2_k,q3_k,q4_k,q6_k]

For each GGUF type, a tiny random model (built offline) is quantized twice, RTN (iters 0) and AutoRound
(--iters), straight to ``gguf:TYPE``.  Then, on held-out token ids:

- reference: the source model with every quantized weight replaced by what the GGUF file holds, read
  back with the gguf package's reader and dequantization (q/k rows put back in Hugging Face order);
- KL(fp || reference), per token, for RTN and AutoRound (the quality of the GGUF weights);
- with llama-cpp-python installed: llama.cpp's logits for the same ids vs the reference (relative
  error), and a short generation from a text prompt (does the file load, tokenize and generate).

Not run by CI (building llama-cpp-python takes a long time on 2 cores).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from blockquant.config import GGUF_TYPES


def gguf_model(source: str, path: str, layout):
    """The source model with the GGUF file's weights (dequantized by the gguf package)."""
    import gguf
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    with torch.no_grad():
        for name, param in model.named_parameters():
            gname = layout.tensor_name(name)
            if gname not in tensors:
                continue
            t = tensors[gname]
            value = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type))).float().reshape(param.shape)
            order = layout.row_order(name)
            if order is not None:
                hf = torch.empty_like(value)
                hf[order] = value
                value = hf
            param.copy_(value)
    return model


def llama_cpp_logits(path: str, ids: list[int]):
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=max(64, len(ids) + 16), logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    text = llm("The quick brown fox", max_tokens=12, temperature=0.0)["choices"][0]["text"]
    return torch.from_numpy(logits), text


def kl(fp_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    return float(F.kl_div(F.log_softmax(q_logits, -1), F.log_softmax(fp_logits, -1), log_target=True,
                          reduction="batchmean"))   # rows are tokens: per-token KL


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", default="llama", choices=("llama", "qwen3"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--types", default=",".join(GGUF_TYPES))
    p.add_argument("--heldout", type=int, default=512, help="held-out tokens")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blockquant import api
    from blockquant.frame import plugins
    from blockquant.data.corpus import stdlib_paragraphs
    from blockquant.adapters.generic import build_example
    from blockquant.export.gguf_quants import REQUIREMENTS

    have_llama = importlib.util.find_spec("llama_cpp") is not None
    if not have_llama:
        print("llama-cpp-python is not installed: llama.cpp columns skipped")
    work = tempfile.mkdtemp(prefix="bq-gguf-")
    source = os.path.join(work, "model")
    build_example(args.kind, args.layers, args.hidden).save(source)
    fp = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    layout = plugins.run_manager(plugins.get_adapter("generic")).hook.gguf_layout(model=fp, ctx=None)
    tok = AutoTokenizer.from_pretrained(source)
    ids = tok("\n\n".join(stdlib_paragraphs("heldout")), return_tensors="pt").input_ids[:, :args.heldout]
    with torch.no_grad():
        fp_logits = fp(input_ids=ids).logits[0]
    print(f"{args.kind}: {args.layers} layers, hidden {args.hidden}; held-out: {ids.shape[1]} tokens of the corpus' "
          "held-out split; "
          f"AutoRound {args.iters} iters, {args.nsamples} x {args.seqlen} calibration")
    print(f"{'type':<6}{'KL RTN':>10}{'KL AutoRound':>14}{'AR/RTN':>8}{'llama.cpp rel err':>19}  generation (AutoRound file)")
    for gtype in args.types.split(","):
        bits, group_size, sym, _ = REQUIREMENTS[gtype]
        row = {}
        for label, iters in (("rtn", 0), ("ar", args.iters)):
            out = os.path.join(work, f"{gtype}-{label}")
            api.quantize(source, adapter="generic", iters=iters, nsamples=args.nsamples, seqlen=args.seqlen,
                         batch_size=8, bits=bits, group_size=group_size, sym=sym, format=f"gguf:{gtype}", output_dir=out)
            path = os.path.join(out, f"model-{gtype.upper()}.gguf")
            ref = gguf_model(source, path, layout)
            with torch.no_grad():
                ref_logits = ref(input_ids=ids).logits[0]
            row[label] = kl(fp_logits, ref_logits)
            if label == "ar" and have_llama:
                cpp, text = llama_cpp_logits(path, ids[0].tolist())
                row["cpp"] = float((cpp - ref_logits).norm() / ref_logits.norm())
                row["text"] = text
        cpp = f"{row['cpp']:.2e}" if "cpp" in row else "-"
        print(f"{gtype:<6}{row['rtn']:>10.3e}{row['ar']:>14.3e}{row['ar'] / row['rtn']:>8.2f}{cpp:>19}  "
              f"{row.get('text', '-')!r}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
