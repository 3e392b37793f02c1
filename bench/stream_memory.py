"""Streaming-memory benchmark: peak RSS of a block-by-block run vs the bf16 weight size.

    python bench/stream_memory.py [--dir /work/bench-data/stream] [--layers 19] [--hidden 4096] ...

1. Generates a random decoder-only (Llama-shaped) model of about 8 GB in bf16, written shard by
   shard with safetensors: the model is built on the meta device for names and shapes, and each
   shard's tensors are cut from one random pool, so the whole model never exists in memory.
2. Quantizes it with RTN (iters 0) and with AutoRound (a few iters, small nsamples/seqlen), each in
   its own subprocess; the peak RSS is the child's ru_maxrss from ``os.wait4`` (a real high-water mark,
   independent of blockquant's own report).
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


def build_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                       num_key_value_heads=args.hidden // 128, max_position_embeddings=4096,
                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                       dtype="bfloat16", architectures=["LlamaForCausalLM"])


def generate(folder: str, args) -> int:
    """Write config, tokenizer and random bf16 shards; returns the weight bytes."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from blockquant.tiny import tiny_tokenizer

    config = build_config(args)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in meta.state_dict().items()}
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


BASELINE = "import torch, transformers, blockquant, blockquant.api, blockquant.runner; import transformers.models.llama"

QUANTIZE = """
import json, blockquant.api
r = blockquant.api.quantize({model!r}, 'generic', iters={iters}, nsamples={nsamples}, seqlen={seqlen},
                            batch_size={nsamples}, device='cpu', output_dir={out!r}, overwrite=True, fresh=True)
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
    p.add_argument("--dir", default="/work/bench-data/stream", help="where the model and outputs go (not the repo)")
    p.add_argument("--layers", type=int, default=19)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard_gb", type=float, default=2.0)
    p.add_argument("--pool", type=int, default=64_000_000, help="random values the tensors are cut from")
    p.add_argument("--iters", type=int, default=2, help="AutoRound iterations per block")
    p.add_argument("--nsamples", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--regenerate", action="store_true")
    p.add_argument("--skip", default="", help="comma list of runs to skip: rtn,autoround,full")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    model = os.path.join(args.dir, "model")
    if args.regenerate or not os.path.exists(os.path.join(model, "model.safetensors.index.json")):
        shutil.rmtree(model, ignore_errors=True)
        t0 = time.time()
        print(f"generating the model in {model} ...", flush=True)
        generate(model, args)
        print(f"  generated in {time.time() - t0:.0f}s", flush=True)
    with open(os.path.join(model, "model.safetensors.index.json")) as f:
        weight_bytes = json.load(f)["metadata"]["total_size"]
    h, inter = args.hidden, args.intermediate
    block_params = 4 * h * h + 3 * h * inter   # q,k,v,o + gate,up,down (kv heads = heads here)
    rows = []
    base, _, _, _ = measured(BASELINE)
    rows.append(("baseline (imports only)", base, 0.0, 0))
    runs = [("rtn", "RTN (iters 0)", 0), ("autoround", f"AutoRound (iters {args.iters})", args.iters)]
    for key, label, iters in runs:
        if key in skip:
            continue
        out = os.path.join(args.dir, f"out-{key}")
        code = QUANTIZE.format(model=model, iters=iters, nsamples=args.nsamples, seqlen=args.seqlen, out=out)
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
        model: {args.layers} layers, hidden {h}, intermediate {inter}, vocab {args.vocab}
        bf16 weights {weight_bytes / GiB:.2f} GiB; largest block {2 * block_params / GiB:.3f} GiB bf16
        ({4 * block_params / GiB:.3f} GiB as fp32 on the CPU); one calibration stream
        {cache / 2 ** 20:.1f} MiB ({args.nsamples} x {args.seqlen} x {h} fp32)
        """))
    print(f"{'run':<30}{'peak RSS':>12}{'/ weights':>11}{'above baseline':>16}{'time':>9}  rc")
    for label, peak, secs, rc in rows:
        print(f"{label:<30}{peak / GiB:>10.2f}Gi{peak / weight_bytes:>11.3f}{(peak - base) / GiB:>14.2f}Gi"
              f"{secs:>8.0f}s  {rc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
