"""What makes a run's output what it is, as hashes a resumed run must match: the model's files and the
content of the calibration data."""
from __future__ import annotations

import dataclasses
import hashlib
import os

import torch


def model_signature(folder: str) -> str:
    """A hash of the model folder's JSON files and of every safetensors file's size and header: changes
    when the weights or configs are replaced, without reading the weights."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(root, name)
            if name.endswith(".json"):
                h.update(name.encode())
                with open(path, "rb") as f:
                    h.update(f.read())
            elif name.endswith(".safetensors"):
                h.update(f"{name}:{os.path.getsize(path)}".encode())
                with open(path, "rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    h.update(f.read(min(size, 1 << 26)))
    return h.hexdigest()[:32]


def content_hash(value) -> str:
    """A hash of calibration batches: tensors by dtype, shape and bytes; containers recursively."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()[:32]


def _feed(h, value) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(b"{")
        for key in sorted(value, key=str):
            _feed(h, str(key))
            _feed(h, value[key])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for item in value:
            _feed(h, item)
        h.update(b"]")
    elif isinstance(value, (str, int, float, bool, type(None))):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, bytes):
        h.update(value)
    elif hasattr(value, "tobytes"):   # numpy arrays, PIL images
        h.update(f"{type(value).__name__}{getattr(value, 'shape', getattr(value, 'size', ''))}".encode())
        h.update(value.tobytes())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        _feed(h, {f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    elif hasattr(value, "keys") and hasattr(value, "__getitem__"):   # BatchEncoding and other mappings
        _feed(h, {k: value[k] for k in value.keys()})
    else:
        h.update(type(value).__qualname__.encode())
