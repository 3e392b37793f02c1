"""Streaming-memory benchmark: peak RSS of a block-by-block run vs the bf16 weight size.

    python bench/stream_memory.py [--shape qwen3-4b|wide|deep] [--dir DIR] [--iters 2] [--skip rtn,autoround,full]
                                  [--format gguf:q4_0 --group_size 32]

1. Generates a random decoder-only (Llama-shaped) model of about 8 GB in bf16, written shard by
   shard with safetensors: the model is built on the meta device for names and shapes, and each
   shard's tensors are cut from one random pool, so the whole model never exists in memory.
2. Quantizes it with RTN (iters 0) and with AutoRound (a few iters, small nsamples/seqlen), each in
   its own subprocess; the peak RSS is the child's own VmHWM (a real high-water mark, independent of
   blockquant's report).
3. Measures the baseline (a subprocess that only imports torch, transformers and blockquant) and a
   full-load reference (transformers ``from_pretrained`` plus a pass that reads every weight).
4. Prints peak RSS / bf16 weight size (goal <= 0.25) with a breakdown.

Nothing here is run by CI; the model lives outside the repository (default /work/bench-data).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

GiB = 1024 ** 3


# Model shapes of about 8 GB in bf16.  qwen3-4b has the proportions of a real 8 GB model (Qwen3-4B:
# 36 blocks, grouped-query attention, a 152k vocabulary with tied embeddings; one block is 1/40 of
# the weights); wide and deep are the two shapes measured first (a block is 1/19 and 1/48).
SHAPES = {
    "qwen3-4b": dict(layers=36, hidden=2560, intermediate=9728, vocab=151936, heads=32, kv_heads=8, tie=True),
    "wide": dict(layers=19, hidden=4096, intermediate=11008, vocab=32000, heads=32, kv_heads=32, tie=False),
    "deep": dict(layers=48, hidden=2560, intermediate=6912, vocab=32000, heads=20, kv_heads=20, tie=False),
}
HEAD_DIM = 128


def build_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads, head_dim=HEAD_DIM,
                       num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
                       tie_word_embeddings=args.tie, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                       dtype="bfloat16", architectures=["LlamaForCausalLM"])


def block_params(args) -> int:
    """q, k, v, o + gate, up, down of one decoder block."""
    attn = 2 * args.hidden * args.heads * HEAD_DIM + 2 * args.hidden * args.kv_heads * HEAD_DIM
    return attn + 3 * args.hidden * args.intermediate


def generate(folder: str, args) -> int:
    """Write config, tokenizer and random bf16 shards; returns the weight bytes."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from blockquant.data.tiny import tiny_tokenizer

    config = build_config(args)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in meta.state_dict().items()}
    if args.tie:     # tied: the checkpoint holds the embedding once
        shapes.pop("lm_head.weight", None)
    del meta
    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    pool = torch.empty(args.pool, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
    shard_limit = int(args.shard_gb * 1e9)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = 2 * torch.Size(shape).numel()
        if shards[-1] and size + n > shard_limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = shapes[name]
            numel = torch.Size(shape).numel()
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:   # a random window of the pool (wrapping), so no tensor equals another
                start = int(torch.randint(0, args.pool, (1,), generator=gen))
                tensors[name] = _window(pool, start, numel).view(shape)
            weight_map[name] = file
            total += 2 * numel
        save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        print(f"  wrote {file}: {len(names)} tensors", flush=True)
        del tensors
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    config.save_pretrained(folder)
    tiny_tokenizer(4096).save_pretrained(folder)
    return total


def _window(pool, start: int, numel: int):
    """``numel`` values of ``pool`` from ``start`` on, wrapping around (a new tensor)."""
    import torch

    parts, left = [], numel
    while left:
        take = min(left, pool.numel() - start)
        parts.append(pool[start:start + take])
        left, start = left - take, 0
    return torch.cat(parts)


HWM = """
for line in open('/proc/self/status'):
    if line.startswith('VmHWM:'):
        print('VMHWM', int(line.split()[1]) * 1024)
"""


def measured(code: str, env=None) -> tuple[int, float, str, int]:
    """Run ``code`` in a fresh interpreter; (peak RSS bytes, seconds, stdout+stderr tail, rc).

    The peak is the child's own VmHWM, printed by the child as it ends: ru_maxrss from wait4 would
    also count the parent's resident pages at fork time (Linux keeps the larger of the two at exec).
    """
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code + HWM], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env or dict(os.environ, HF_HUB_OFFLINE="1"), text=True)
    out = proc.stdout.read()
    rc = proc.wait()
    peaks = [int(line.split()[1]) for line in out.splitlines() if line.startswith("VMHWM ")]
    return (peaks[-1] if peaks else 0), time.time() - t0, out[-3000:], rc


BASELINE = "import torch, transformers, blockquant, blockquant.api, blockquant.run.quantize; import transformers.models.llama"

QUANTIZE = """
import json, blockquant.api
r = blockquant.api.quantize({model!r}, 'generic', iters={iters}, nsamples={nsamples}, seqlen={seqlen},
                            batch_size={nsamples}, device='cpu', output_dir={out!r}, overwrite=True, fresh=True,
                            format={fmt!r}, group_size={group_size}, sym={sym})
print('REPORT', json.dumps({{'peak_ram': r.report.peak_ram_bytes, 'wall': r.report.wall_seconds}}))
"""

FULL_LOAD = """
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({model!r}, dtype=torch.bfloat16)
s = 0.0
for p in m.parameters():   # read every weight, as a full-load quantizer would
    s += float(p.float().abs().amax())
print('checksum', s)
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-4b", help="model proportions (see SHAPES)")
    p.add_argument("--dir", help="where the model and outputs go, not the repo (default /work/bench-data/stream-SHAPE)")
    for key in ("layers", "hidden", "intermediate", "vocab", "heads", "kv_heads"):
        p.add_argument(f"--{key}", type=int, help="override the shape's value")
    p.add_argument("--shard_gb", type=float, default=2.0)
    p.add_argument("--pool", type=int, default=64_000_000, help="random values the tensors are cut from")
    p.add_argument("--iters", type=int, default=2, help="AutoRound iterations per block")
    p.add_argument("--nsamples", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--format", default="auto_round", help="--format of the runs (e.g. gguf:q4_0)")
    p.add_argument("--group_size", type=int, default=128)
    p.add_argument("--asym", dest="sym", action="store_false", help="asymmetric quantization (gguf:q4_1, q4_k)")
    p.add_argument("--regenerate", action="store_true")
    p.add_argument("--skip", default="", help="comma list of runs to skip: rtn,autoround,full")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    for key, value in SHAPES[args.shape].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.dir = args.dir or f"/work/bench-data/stream-{args.shape}"
    model = os.path.join(args.dir, "model")
    if args.regenerate or not os.path.exists(os.path.join(model, "model.safetensors.index.json")):
        shutil.rmtree(model, ignore_errors=True)
        t0 = time.time()
        print(f"generating the model in {model} ...", flush=True)
        generate(model, args)
        print(f"  generated in {time.time() - t0:.0f}s", flush=True)
    with open(os.path.join(model, "model.safetensors.index.json")) as f:
        weight_bytes = json.load(f)["metadata"]["total_size"]
    h, inter, block = args.hidden, args.intermediate, block_params(args)
    rows = []
    base, _, _, _ = measured(BASELINE)
    rows.append(("baseline (imports only)", base, 0.0, 0))
    runs = [("rtn", "RTN (iters 0)", 0), ("autoround", f"AutoRound (iters {args.iters})", args.iters)]
    for key, label, iters in runs:
        if key in skip:
            continue
        out = os.path.join(args.dir, f"out-{key}")
        code = QUANTIZE.format(model=model, iters=iters, nsamples=args.nsamples, seqlen=args.seqlen, out=out,
                               fmt=args.format, group_size=args.group_size, sym=args.sym)
        print(f"running {label} ...", flush=True)
        peak, secs, tail, rc = measured(code)
        if rc:
            print(tail)
        rows.append((label, peak, secs, rc))
        shutil.rmtree(out, ignore_errors=True)
    if "full" not in skip:
        print("running full load ...", flush=True)
        peak, secs, tail, rc = measured(FULL_LOAD.format(model=model))
        if rc:
            print(tail)
        rows.append(("full load (from_pretrained)", peak, secs, rc))
    cache = args.nsamples * args.seqlen * h * 4
    print(textwrap.dedent(f"""
        format {args.format}, group size {args.group_size}, {"sym" if args.sym else "asym"}
        model ({args.shape}): {args.layers} layers, hidden {h}, intermediate {inter}, heads {args.heads}/{args.kv_heads} kv,
        vocab {args.vocab}{" (tied)" if args.tie else ""}
        bf16 weights {weight_bytes / GiB:.2f} GiB; largest block {2 * block / GiB:.3f} GiB bf16
        ({4 * block / GiB:.3f} GiB as fp32 on the CPU; 1/{weight_bytes / (2 * block):.0f} of the weights); one calibration stream
        {cache / 2 ** 20:.1f} MiB ({args.nsamples} x {args.seqlen} x {h} fp32)
        """))
    print(f"{'run':<30}{'peak RSS':>12}{'/ weights':>11}{'above baseline':>16}{'time':>9}  rc")
    for label, peak, secs, rc in rows:
        print(f"{label:<30}{peak / GiB:>10.2f}Gi{peak / weight_bytes:>11.3f}{(peak - base) / GiB:>14.2f}Gi"
              f"{secs:>8.0f}s  {rc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
