"""Finishing a checkpoint: the output folder's checks (never the model's own folder), the tensors outside
the blocks, configs, the source folder's other files, and the atomic rename of the finished folder to ``OUT``."""
from __future__ import annotations

import json
import os
import shutil

import torch

from .. import faults
from ..errors import ResourceError, UsageError


def check_not_inputs(output_dir: str, inputs: list[str]) -> None:
    """Refuse an output folder that is, holds, or sits inside a folder this run reads (the model first):
    writing there, or replacing it with --overwrite, would destroy the input."""
    out = os.path.realpath(output_dir)
    related = (out, out + ".partial", out + ".lock")
    for path in inputs:
        src = os.path.realpath(path)
        for candidate in related:
            if candidate == src or _inside(candidate, src) or _inside(src, candidate):
                how = "is" if candidate == src else ("is inside" if _inside(candidate, src) else "contains")
                raise UsageError(f"--output_dir {output_dir} {how} the input {path}; the output must be a separate "
                                 "folder (the input is never overwritten): choose another --output_dir")


def _inside(path: str, folder: str) -> bool:
    return path != folder and os.path.commonpath([path, folder]) == folder


def check_output(output_dir: str, overwrite: bool) -> None:
    """Refuse an existing non-empty output folder (unless overwrite) and an unwritable parent."""
    if os.path.isfile(output_dir):
        raise UsageError(f"--output_dir {output_dir} is a file; choose a folder path")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise UsageError(f"output folder {output_dir} exists and is not empty; pass --overwrite or choose another --output_dir")
    parent = os.path.dirname(os.path.abspath(output_dir)) or "."
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create {parent} for the output ({e.strerror}); choose another --output_dir") from e
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{parent} is not writable; choose another --output_dir")


def outside_entries(model: torch.nn.Module, block_prefixes: list[str], store=None) -> list[tuple[str, object]]:
    """(name, tensor) of every state-dict tensor outside the quantized blocks (tied copies skipped);
    a tensor may be on the meta device: :func:`materialize` reads it, one at a time."""
    inside = tuple(p + "." for p in block_prefixes)
    out = []
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.startswith(inside) or id(tensor) in seen:   # tied weights are saved once, as transformers does
            continue
        seen.add(id(tensor))
        if tensor.device.type == "meta" and (store is None or name not in store):
            continue   # released after capture, or never loaded, and not in the checkpoint
        out.append((name, tensor))
    return out


def materialize(name: str, tensor, store=None) -> torch.Tensor:
    """An entry of :func:`outside_entries` as a CPU tensor in its own dtype."""
    if tensor.device.type == "meta":
        tensor = store.get(name)
    return tensor.detach().to("cpu").contiguous()


def outside_tensors(model: torch.nn.Module, block_prefixes: list[str], store=None) -> dict[str, torch.Tensor]:
    """Every state-dict tensor outside the quantized blocks, in its own dtype (tied copies skipped)."""
    return {name: materialize(name, t, store) for name, t in outside_entries(model, block_prefixes, store)}


def weight_files(prefix: str) -> tuple[str, ...]:
    return (f"{prefix}.safetensors", f"{prefix}.safetensors.index.json")


def copy_source_files(source: str, partial: str, subfolder: str, prefix: str) -> list[str]:
    """Copy what a user needs to run the model (tokenizer, processor, templates, other pipeline parts)."""
    copied = []
    for root, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(root, source)
        rel = "" if rel == "." else rel
        for file in sorted(files):
            if file.startswith("."):
                continue
            in_component = rel == subfolder
            if in_component and (file == "config.json" or _is_weight(file, prefix)):
                continue
            if file.endswith((".bin", ".pt", ".pth", ".ckpt")) and in_component:
                continue
            dst_dir = os.path.join(partial, rel)
            os.makedirs(dst_dir, exist_ok=True)
            shutil.copy2(os.path.join(root, file), os.path.join(dst_dir, file))
            copied.append(os.path.join(rel, file))
            faults.point("file_copied")
    return copied


def _is_weight(file: str, prefix: str) -> bool:
    return file.startswith(prefix) and (file.endswith(".safetensors") or file.endswith(".safetensors.index.json"))


def write_configs(source_config: str, target_dir: str, qconfig: dict) -> None:
    with open(source_config) as f:
        config = json.load(f)
    config["quantization_config"] = qconfig
    os.makedirs(target_dir, exist_ok=True)
    for name, obj in (("config.json", config), ("quantization_config.json", qconfig)):
        path = os.path.join(target_dir, name)
        with open(path + ".writing", "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(path + ".writing", path)


def publish(finished: str, output_dir: str, scratch: str) -> None:
    """Rename the finished folder to the output folder.  An old output (allowed by --overwrite) is first
    moved into ``scratch`` (the partial folder, deleted afterwards); an interrupted publish is redone by
    calling this again."""
    if os.path.exists(finished):
        if os.path.exists(output_dir):
            replaced = os.path.join(scratch, "replaced")
            if os.path.exists(replaced):
                shutil.rmtree(replaced)
            os.replace(output_dir, replaced)
            faults.point("publish_replaced")
        try:
            os.replace(finished, output_dir)
        except OSError as e:
            raise ResourceError(f"could not move {finished} to {output_dir} ({e.strerror}); re-run the same command "
                                "to finish") from e
        faults.point("published")
