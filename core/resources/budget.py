"""Disk and RAM budgets checked before a run starts: the predicted checkpoint size against the free disk,
the predicted peak RAM against what the machine has available.  ``run`` is a prepared run
(``blockquant.run.context.Run``)."""
from __future__ import annotations

import logging
import os
import shutil

import torch

from ..errors import ResourceError
from ..model.blocks import choose_layers
from .memory import human_bytes

log = logging.getLogger("blockquant")


def predicted_output_bytes(run) -> int:
    """The checkpoint size this run will write: packed quantized layers + everything else as stored."""
    q, packed = run.settings.scheme, set()
    total = 0
    for chain in run.groups:
        for block in chain:
            for name, layer in choose_layers(block, q, run.traits.fp_layers, run.settings.ignore_layers).quantize.items():
                groups = layer.out_features * q.groups(layer.in_features)
                total += layer.weight.numel() * q.bits // 8 + groups * (2 + q.bits / 8)   # weights, fp16 scales, zeros
                packed.add(name + ".weight")
    store = run.loaded.weights
    if store is not None:
        return int(total + sum(store.nbytes(n) for n in store.names() if n not in packed))
    return int(total + sum(t.numel() * t.element_size() for n, t in run.model.state_dict().items() if n not in packed))


def check_disk(run, output_dir: str, partial: str) -> None:
    """Refuse to start when the output's file system cannot hold the predicted checkpoint."""
    need = predicted_output_bytes(run) * len(run.settings.formats) + 4 * 2 ** 20   # + configs, tokenizer, progress files
    written = sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(partial) for f in files)
    where = os.path.dirname(output_dir.rstrip("/")) or "."
    while not os.path.isdir(where):
        where = os.path.dirname(where) or "."
    free = shutil.disk_usage(where).free
    if free + written < need:
        raise ResourceError(f"not enough disk space in {where}: {human_bytes(free)} free, the output needs about "
                            f"{human_bytes(need - written)}; free some space or choose another --output_dir")


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def predicted_extra_ram(run) -> tuple[int, int, int]:
    """(bytes above the current RSS at the peak, largest block bytes, calibration cache bytes)."""
    s = run.settings
    width = 4 if run.compute_dtype == torch.float32 else 2
    blocks = [b for chain in run.groups for b in chain]
    largest = max((sum(p.numel() for p in b.module.parameters()) * width for b in blocks), default=0)
    config = getattr(run.model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or 0
    cache = 0 if s.weights_only else s.nsamples * s.seqlen * hidden * (4 if run.cache_device.type == "cpu" else 0)
    on_cpu = run.device.type == "cpu"
    # CPU: the block in fp32 while its targets run, then (AutoRound) the block back at 2 bytes per
    # weight plus ~5 of tuning state and one layer's temporaries - about twice the fp32 block
    extra = largest * (2 if on_cpu else 1) + cache * (4 if s.iters else 2)
    return extra, largest, cache


def check_memory(run) -> None:
    """Warn when the predicted peak RAM exceeds what the machine has available now."""
    available = _mem_available()
    if not available:
        return
    extra, largest, cache = predicted_extra_ram(run)
    if extra > available:
        log.warning("the predicted peak RAM is about %s above the current use (largest block %s, calibration cache %s) "
                    "but only %s is available; lower --nsamples or --seqlen, or keep the cache on a GPU with "
                    "--cache_device cuda", human_bytes(extra), human_bytes(largest), human_bytes(cache),
                    human_bytes(available))
