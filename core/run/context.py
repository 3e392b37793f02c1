"""The state of one run: what ``prepare`` built (adapter, model, traits, block groups, devices) and what
the later steps add (capture stores, resume state, the shard writer, progress)."""
from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import RunSettings
from ..errors import Interrupted
from ..frame.contract import Traits
from ..model.model_io import ModelSource
from ..model.streaming import BlockLoader
from ..resources import devices
from .store import GroupStore


class Abandon(Exception):
    """The current block was abandoned (a signal arrived); state stays at the previous block."""


@dataclass
class Run:
    """A prepared run: adapter, model, traits, groups, devices, and the capture stores."""

    settings: RunSettings
    entry: Any = None
    pm: Any = None
    source: ModelSource | None = None
    loaded: Any = None
    traits: Traits | None = None
    groups: list = field(default_factory=list)
    stores: list[GroupStore] = field(default_factory=list)
    device: torch.device | None = None
    cache_device: torch.device | None = None
    compute_dtype: torch.dtype = torch.float32
    model_dtype: torch.dtype = torch.float32
    loader: BlockLoader | None = None
    writer: Any = None
    resume: Any = None
    progress: Any = None
    keep_blocks: bool = False
    quantized_weights: dict = field(default_factory=dict)
    interrupted: str | None = None
    capture_seconds: float = 0.0
    batches: list = field(default_factory=list)
    tmpdir: Any = None
    dp: Any = None          # resources.distributed.DataParallel under torchrun (several ranks), else None

    @property
    def model(self):
        return self.loaded.model

    def check_interrupt(self, abandon: bool = False) -> None:
        if self.interrupted:
            if abandon:
                raise Abandon(self.interrupted)
            raise Interrupted(f"stopped by {self.interrupted}; progress is saved - re-run the same command to resume")

    def autocast(self):
        """Mixed precision for the tuning forward/backward (targets and outputs stay in full precision):
        CUDA with a bf16/fp16 model, and CPUs with native bf16 (AVX512-BF16/AMX, about 2.5x faster there)."""
        if not self.settings.amp:
            return contextlib.nullcontext()
        if self.device.type == "cuda" and self.model_dtype in (torch.float16, torch.bfloat16):
            return torch.autocast("cuda", dtype=self.model_dtype)
        if self.device.type == "cpu" and devices.cpu_has_bf16():
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()


@contextlib.contextmanager
def signals_caught(run: Run):
    """SIGINT/SIGTERM set a flag; the loop finishes or abandons the current block and saves its state."""
    def handler(signum, frame):
        run.interrupted = signal.Signals(signum).name

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):   # not the main thread
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


