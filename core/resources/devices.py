"""Device selection, placement and the CUDA out-of-memory fallback."""
from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import UsageError

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
            raise UsageError(f"--device {spec}: CUDA is not available on this machine; use --device cpu")
        index = 0 if spec == "cuda" else _index(spec)
        count = torch.cuda.device_count()
        if index >= count:
            raise UsageError(f"--device {spec}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return torch.device(f"cuda:{index}")
    raise UsageError(f"--device {spec} is not a device; use auto, cpu, cuda or cuda:N")


def _index(spec: str) -> int:
    try:
        return int(spec.split(":", 1)[1])
    except ValueError:
        raise UsageError(f"--device {spec} is not a device; use auto, cpu, cuda or cuda:N") from None


def cpu_has_bf16() -> bool:
    """Native bf16 matrix instructions (AVX512-BF16 or AMX): CPU autocast pays off only there."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def to_device(value: Any, device) -> Any:
    """Detach and move tensors inside tuples, lists and plain dicts; a view into a larger tensor is copied
    so that a store never keeps its base alive."""
    if isinstance(value, torch.Tensor):
        t = value.detach().to(device)
        if t.device.type != "meta" and t.untyped_storage().nbytes() > t.numel() * t.element_size():
            t = t.clone()
        return t
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict) and type(value) is dict:
        return {k: to_device(v, device) for k, v in value.items()}
    return value   # anything else (shared state holders, caches) is passed as it is


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


def place_block(module: torch.nn.Module, device: torch.device, dtype, device_map: str | None) -> bool:
    """Put a block where it runs.  ``device_map="auto"`` with several CUDA devices spreads the block's
    layers over them with accelerate (returns True: hooks must be removed afterwards)."""
    module.to(dtype=dtype)
    if device_map == "auto" and device.type == "cuda" and torch.cuda.device_count() > 1:
        from accelerate import dispatch_model, infer_auto_device_map

        free = {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
        plan = infer_auto_device_map(module, max_memory={i: int(f * 0.8) for i, f in free.items()})
        dispatch_model(module, device_map=plan, main_device=device)
        return True
    if device_map == "auto":
        log.debug("--device_map auto needs several CUDA devices; the block runs on %s", device)
    module.to(device)
    return False


def unplace_block(module: torch.nn.Module, hook_relay, model) -> None:
    """Remove accelerate's dispatch hooks, then let the adapter re-apply what they took away."""
    from accelerate.hooks import remove_hook_from_submodules

    remove_hook_from_submodules(module)
    hook_relay.post_hook_removal(model=model)
