"""Device selection, placement and the CUDA out-of-memory fallback."""
from __future__ import annotations

import logging
from typing import Any

import torch

from .errors import ResourceError, UsageError

log = logging.getLogger("blockquant")


def select_device(spec: str | None) -> torch.device:
    """``auto`` -> cuda:0 when CUDA is available, else cpu; ``cpu``; ``cuda``; ``cuda:N``."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ResourceError(f"--device {spec}: CUDA is not available on this machine; use --device cpu")
        index = 0 if spec == "cuda" else _index(spec)
        count = torch.cuda.device_count()
        if index >= count:
            raise ResourceError(f"--device {spec}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return torch.device(f"cuda:{index}")
    raise UsageError(f"--device {spec} is not a device; use auto, cpu, cuda or cuda:N")


def _index(spec: str) -> int:
    try:
        return int(spec.split(":", 1)[1])
    except ValueError:
        raise UsageError(f"--device {spec} is not a device; use auto, cpu, cuda or cuda:N") from None


def move_batch(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if type(batch) is dict:
        return {k: move_batch(v, device) for k, v in batch.items()}
    if hasattr(batch, "to") and hasattr(batch, "keys"):   # transformers BatchEncoding / BatchFeature
        return batch.to(device)
    return batch


def fall_back_to_cpu(run) -> None:
    """After a CUDA OOM: continue this run's remaining work on the CPU."""
    cpu = torch.device("cpu")
    for p in run.model.parameters():
        if p.device.type == "cuda":
            p.data = p.data.to(cpu)
    for b in run.model.buffers():
        if b.device.type == "cuda":
            b.data = b.data.to(cpu)
    run.device = cpu
    run.compute_dtype = torch.float32
    if run.loader is not None:
        run.loader.device = cpu
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def dispatch(model: torch.nn.Module, device_map: dict | str, max_memory: dict | None = None, no_split=None):
    """Spread ``model`` over devices with accelerate (``device_map`` "auto" infers one)."""
    from accelerate import dispatch_model, infer_auto_device_map

    if device_map == "auto":
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split or [])
    return dispatch_model(model, device_map=device_map)
