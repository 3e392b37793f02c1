"""The state of one run: what ``prepare`` built (adapter, model, traits, block groups, devices) and what
the later steps add (capture stores, resume state, the shard writer, progress)."""
from __future__ import annotations

import contextlib
import signal
import tempfile
from dataclasses import dataclass, field

import torch

from ..config import RunSettings
from ..errors import ControlFlow, Interrupted
from ..export.shards import ShardWriter
from ..frame.contract import RunContext, Traits
from ..frame.hooks import AdapterHooks
from ..frame.plugins import AdapterEntry
from ..model.blocks import Block
from ..model.model_io import LoadedModel, ModelSource
from ..model.streaming import BlockLoader
from ..resources import devices
from .report import Progress
from .resume import Resume
from .store import GroupStore


class Abandon(ControlFlow):
    """The current block was abandoned (a signal arrived); state stays at the previous block."""


@dataclass
class Run:
    """One run's state.  What adapters may see lives in ``ctx`` (``RunContext``: settings, options, the
    loaded model, traits, block groups, device, the adapter's stash); the properties below read it.  The
    rest is the engine's: the adapter entry and its hooks, capture stores, streaming, export, resume."""

    ctx: RunContext
    entry: AdapterEntry | None = None
    hooks: AdapterHooks | None = None
    stores: list[GroupStore] = field(default_factory=list)
    cache_device: torch.device | None = None
    compute_dtype: torch.dtype = torch.float32
    model_dtype: torch.dtype = torch.float32
    loader: BlockLoader | None = None
    writer: ShardWriter | None = None
    resume: Resume | None = None
    progress: Progress | None = None
    keep_blocks: bool = False
    interrupted: str | None = None
    capture_seconds: float = 0.0
    batches: list = field(default_factory=list)
    tmpdir: tempfile.TemporaryDirectory | None = None

    @property
    def settings(self) -> RunSettings:
        return self.ctx.settings

    @property
    def source(self) -> ModelSource:
        return self.ctx.source

    @property
    def loaded(self) -> LoadedModel:
        return self.ctx.loaded

    @property
    def model(self):
        return self.ctx.model

    @property
    def traits(self) -> Traits:
        return self.ctx.traits

    @property
    def groups(self) -> list[list[Block]]:
        return self.ctx.groups

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @device.setter
    def device(self, value: torch.device) -> None:
        self.ctx.device = value

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


