"""The last check before a checkpoint is published: every tensor of the model is in it (packed or kept)
with the shape the written config implies, every shard is whole and listed in the index, and nothing
else lies in the folder.  Only safetensors headers are read."""
from __future__ import annotations

import glob
import json
import os

import torch

from ..errors import BlockquantError
from .formats import layer_layout_from_config


def expected_tensors(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every state-dict tensor of ``model`` (tied copies once, as the export writes them)."""
    seen, out = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tuple(tensor.shape)
    return out


def packed_shapes(name: str, weight: tuple[int, ...], qcfg: dict) -> dict[str, tuple[int, ...]] | None:
    """The tensors (name -> shape) a reader of ``qcfg`` expects for quantized layer ``name``; None when
    the config says the layer is kept in full precision."""
    lay = layer_layout_from_config(qcfg, name)
    if lay is None:
        return None
    out_f, in_f = weight
    groups = lay.groups(in_f)
    shapes = {f"{name}.qweight": (in_f * lay.bits // 32, out_f), f"{name}.qzeros": (groups, out_f * lay.bits // 32),
              f"{name}.scales": (groups, out_f)}
    if lay.g_idx:
        shapes[f"{name}.g_idx"] = (in_f,)
    return shapes


def _headers(folder: str, prefix: str) -> tuple[dict[str, tuple], list[str]]:
    """{tensor: shape} over the shards, and the problems found in the files themselves."""
    problems, tensors = [], {}
    single = os.path.join(folder, f"{prefix}.safetensors")
    index_path = os.path.join(folder, f"{prefix}.safetensors.index.json")
    shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(prefix)}*.safetensors")))
    weight_map = None
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map") or {}
        listed = set(weight_map.values())
        problems += [f"shard {s} is not in the index" for s in shards if s not in listed]
        problems += [f"the index lists {s}, which does not exist" for s in sorted(listed) if s not in shards]
    elif shards != [os.path.basename(single)]:
        problems.append(f"expected {prefix}.safetensors or an index, found {', '.join(shards) or 'no shard'}")
    stray = [os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(folder), "*"))
             if p.endswith((".tmp", ".writing")) or ".tmp." in os.path.basename(p)]
    problems += [f"stray file {s}" for s in sorted(stray)]
    for shard in shards:
        path = os.path.join(folder, shard)
        try:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
        except (OSError, ValueError) as e:
            problems.append(f"shard {shard} is unreadable ({e})")
            continue
        header.pop("__metadata__", None)
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if os.path.getsize(path) != 8 + size + end:
            problems.append(f"shard {shard} is {os.path.getsize(path)} bytes, its header says {8 + size + end}")
        for name, entry in header.items():
            if weight_map is not None and weight_map.get(name) != shard:
                problems.append(f"{name} is in {shard} but the index says {weight_map.get(name)}")
            tensors[name] = tuple(entry["shape"])
    if weight_map is not None:
        problems += [f"the index lists {n}, which no shard holds" for n in sorted(set(weight_map) - set(tensors))]
    return tensors, problems


def check_complete(folder: str, prefix: str, expected: dict[str, tuple], quantized: list[str], qcfg: dict) -> None:
    """Raise naming what is wrong when the checkpoint in ``folder`` is not the whole model."""
    found, file_problems = _headers(folder, prefix)
    problems: list[str] = []
    want: dict[str, tuple] = {}
    packed = set()
    for name in quantized:
        weight = expected.get(f"{name}.weight")
        shapes = packed_shapes(name, weight, qcfg) if weight is not None and len(weight) == 2 else None
        if shapes is None:
            problems.append(f"quantized layer {name} is not a packed layer in the config")
            continue
        want.update(shapes)
        packed.add(f"{name}.weight")
    want.update({n: s for n, s in expected.items() if n not in packed})
    missing = sorted(set(want) - set(found))
    wrong = sorted(n for n in want if n in found and tuple(found[n]) != tuple(want[n]))
    unknown = sorted(set(found) - set(want))
    for label, names in (("missing", missing), ("with a wrong shape", wrong), ("not in the model", unknown)):
        if names:
            problems.append(f"{len(names)} tensor(s) {label} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    problems += file_problems
    if problems:
        raise BlockquantError(f"the finished checkpoint in {folder} is incomplete, so it was not published: "
                              f"{'; '.join(problems[:4])}; re-run with --fresh")
