"""Rewrite a saved model folder the way published checkpoints are stored.

Models on the hub are stored in bfloat16 (some in float16), their weights split into several
safetensors shards with a ``*.safetensors.index.json`` naming the shard of each tensor.  Examples and
tests save float32 single-file folders; ``publish_like`` turns such a folder into the published form
in place, so that every command is exercised on what users actually download.
"""
from __future__ import annotations

import glob
import json
import os

import torch
from safetensors.torch import load_file, save_file

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def publish_like(folder: str, dtype: torch.dtype = torch.bfloat16, shards: int = 2) -> list[str]:
    """Cast every single-file ``NAME.safetensors`` under ``folder`` to ``dtype`` and split it into
    ``shards`` files ``NAME-0000i-of-0000n.safetensors`` plus ``NAME.safetensors.index.json``; the
    ``config.json`` beside it records the dtype.  Returns the index files written."""
    written = []
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.safetensors"), recursive=True)):
        base = os.path.basename(path)[: -len(".safetensors")]
        if "-of-" in base:
            continue   # already sharded
        written.append(_shard(path, base, dtype, shards))
        _record_dtype(os.path.join(os.path.dirname(path), "config.json"), dtype)
    return written


def _shard(path: str, base: str, dtype: torch.dtype, shards: int) -> str:
    folder = os.path.dirname(path)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(path).items()}
    names = sorted(tensors)
    per = -(-len(names) // max(1, min(shards, len(names))))
    parts = [names[i:i + per] for i in range(0, len(names), per)]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        file = f"{base}-{i:05d}-of-{len(parts):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    os.remove(path)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = os.path.join(folder, f"{base}.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return index


def _record_dtype(config_path: str, dtype: torch.dtype) -> None:
    if not os.path.exists(config_path):
        return
    with open(config_path) as f:
        config = json.load(f)
    name = DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))
    for part in [config] + [v for v in config.values() if isinstance(v, dict)]:
        for key in ("dtype", "torch_dtype"):   # only where the library records one (diffusers does not)
            if key in part:
                part[key] = name
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
