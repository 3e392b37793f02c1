"""The run wiring: select adapter -> gate versions -> load -> patch -> traits -> calibrate -> capture
-> block loop -> export -> report.  ``quantize`` and ``verify`` are the two entry points."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import devices, plugins
from .blocks import resolve_groups
from .calibration_data import CalibrationSource
from .capture import Calibration, capture, detect, stream_keys_from_output
from .config import QuantScheme, RunSettings
from .contract import Traits
from .errors import AdapterError, DataError, Interrupted, UsageError
from .model_io import ModelSource, WeightStore, materialize, still_meta, tie_if_needed
from .store import GroupStore
from .streaming import BlockLoader

log = logging.getLogger("blockquant")


def make_settings(**kwargs) -> RunSettings:
    """RunSettings from keyword arguments (scheme/bits/group_size/sym folded into a QuantScheme)."""
    scheme = kwargs.pop("scheme", None)
    if not isinstance(scheme, QuantScheme):
        scheme = QuantScheme.from_args(scheme, kwargs.pop("bits", None), kwargs.pop("group_size", None), kwargs.pop("sym", None))
    for k in ("bits", "group_size", "sym"):
        kwargs.pop(k, None)
    known = RunSettings.__dataclass_fields__
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in known}
    settings = RunSettings(scheme=scheme, **kwargs)
    settings.extra.update(extra)
    return settings


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

    @property
    def model(self):
        return self.loaded.model

    def check_interrupt(self, abandon: bool = False) -> None:
        if self.interrupted:
            from .pipeline import Abandon

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


def prepare(model: str | None, adapter: str | None, settings: RunSettings) -> Run:
    """Steps 1-5: adapter, versions, load, traits, patches; non-block weights materialised."""
    run = Run(settings=settings)
    entries = plugins.discover()
    if model is None:
        if not adapter:
            raise UsageError("pass a model folder, or --adapter NAME to quantize that adapter's tiny example model")
        run.entry = plugins.get_adapter(adapter, entries)
        model = _example_folder(run)
    run.source = ModelSource.resolve(model)
    if run.entry is None:
        run.entry = plugins.get_adapter(adapter, entries) if adapter else plugins.detect_adapter(run.source, entries)
    plugins.check_versions(run.entry)
    log.info("adapter %s (%s %s) for %s", run.entry.name, run.entry.distribution, run.entry.version, run.source.path)
    run.pm = plugins.run_manager(run.entry)
    run.loaded = run.pm.hook.load_model(source=run.source, settings=settings)
    run.traits = _traits(run)
    if run.traits.checkpoint_renames and run.loaded.weights is not None:
        old = run.loaded.weights
        run.loaded.weights = WeightStore(old.folder, old.prefix, run.traits.checkpoint_renames, old.key_map)
    if settings.format != "fake":
        from .export.formats import check_format

        for fmt in settings.formats:
            check_format(fmt, settings.scheme)
    run.pm.hook.patch_model(model=run.model)
    run.groups = resolve_groups(run.model, run.traits, settings.to_quant_block_names)
    run.device = devices.select_device(settings.device)
    run.cache_device = devices.select_device(settings.cache_device) if settings.cache_device else run.device
    run.model_dtype = _model_dtype(run.model)
    run.compute_dtype = run.model_dtype if run.device.type == "cuda" else torch.float32
    store = run.loaded.weights
    block_prefixes = [b.ref.name for chain in run.groups for b in chain]
    if store is not None:
        _materialize_outside(run.model, store, block_prefixes, run.device)
    tie_if_needed(run.model)
    missing = still_meta(run.model, block_prefixes)
    if missing:
        raise AdapterError(f"weights missing outside the blocks after loading: {', '.join(missing[:5])}")
    run.keep_blocks = store is None or bool(settings.extra.get("keep_blocks"))
    run.loader = BlockLoader(store, run.device, None)
    return run


def _example_folder(run: Run) -> str:
    pm = plugins.run_manager(run.entry)
    example = pm.hook.example_model()
    if example is None or example.save is None:
        raise AdapterError(f"adapter '{run.entry.name}' has no example model; pass a model folder")
    run.tmpdir = tempfile.TemporaryDirectory(prefix=f"blockquant-{run.entry.name}-example-")
    folder = os.path.join(run.tmpdir.name, example.name)
    example.save(folder)
    log.info("no model given: using %s's tiny example model %s", run.entry.name, example.name)
    return folder


def _traits(run: Run) -> Traits:
    traits = Traits()
    results = run.pm.hook.fixed_attrs(model=run.model)
    for values in reversed(results):   # defaults come last from pluggy: apply them first
        if values:
            traits = traits.updated(values, run.entry.name)
    if run.settings.variable_inputs:
        traits = traits.updated({"variable_inputs": run.settings.variable_inputs}, "--variable_inputs")
    return traits


def _model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _materialize_outside(model, store, block_prefixes: list[str], device) -> None:
    inside = tuple(p + "." for p in block_prefixes)
    for name, module in model.named_modules():
        if name and (name + ".").startswith(inside):
            continue
        for pname, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            full = f"{name}.{pname}" if name else pname
            if p.device.type == "meta" and full in store:
                materialize(module, name, store, device)
                break


def capture_inputs(run: Run) -> None:
    """Steps 6-8: calibration batches, pre_cache, variable-input detection, capture."""
    s, t0 = run.settings, time.time()
    processor = run.loaded.processor
    source = CalibrationSource(spec=s.dataset, tokenizer=getattr(processor, "tokenizer", processor),
                               processor=processor, images=s.images)
    batches = run.pm.hook.calibration_batches(model=run.model, source=source, settings=s)
    if not batches:
        raise DataError("the calibration data produced no batches; pass --dataset with text (a .txt/.jsonl/.parquet file)")
    run.batches = batches
    calibration = Calibration(batches=batches, settings=s, loaded=run.loaded)
    run.pm.hook.pre_cache(model=run.model, calibration=calibration)
    all_blocks = [b for chain in run.groups for b in chain]
    forward = lambda batch: run_batch(run, batch)  # noqa: E731
    try:
        with run.loader.during_forward(all_blocks), torch.no_grad():
            detection = detect(run.groups, lambda: forward(batches[0]), stream_keys_from_output(run.pm.hook.block_outputs),
                               run.traits.stop_after_capture, calibration)
            calibration.take_pending()
            cache_keys = _cache_policy(run, detection)
            run.stores = [GroupStore(stream_keys=detection.stream_keys[g], fixed_shared=run.traits.shared_keys)
                          for g in range(len(run.groups))]
            capture(run.groups, batches, forward, calibration, run.stores, cache_keys, run.traits, run.cache_device)
    finally:
        calibration.close()
    run.capture_seconds = time.time() - t0
    for g, store in enumerate(run.stores):
        sizes = store.nbytes()
        log.info("group %d (%s): %d samples captured, store %s (streams %s, shared %s, per-sample %s, per-block %s)",
                 g, "+".join(dict.fromkeys(b.ref.path for b in run.groups[g])), len(store), _h(sizes["total"]),
                 _h(sizes["streams"]), _h(sizes["shared"]), _h(sizes["per_sample"]), _h(sizes["per_block"]))


def run_batch(run: Run, batch) -> None:
    """One calibration forward (``run_calibration``), retried on the CPU after a CUDA OOM."""
    try:
        run.pm.hook.run_calibration(model=run.model, batch=devices.move_batch(batch, run.device))
    except torch.cuda.OutOfMemoryError:
        log.warning("CUDA out of memory during a calibration forward; retrying this batch on the CPU")
        devices.fall_back_to_cpu(run)
        run.pm.hook.run_calibration(model=run.model, batch=devices.move_batch(batch, run.device))


def _cache_policy(run: Run, detection) -> list[set[str]]:
    out = []
    for g, variable in enumerate(detection.variable):
        rebuilt = set(run.traits.rebuilt_keys) if run.traits.variable_inputs == "rebuild" else set()
        cached = variable - rebuilt
        if variable:
            log.info("group %d: inputs that vary between blocks: %s", g, ", ".join(sorted(variable)))
        if cached:
            log.warning("group %d: caching %s per block (RAM grows with blocks x samples); an adapter's "
                        "replay_inputs can rebuild them instead", g, ", ".join(sorted(cached)))
        out.append(cached)
    return out


def _h(n: int) -> str:
    from .memory import human_bytes

    return human_bytes(n)


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


def quantize(model: str | None = None, adapter: str | None = None, **kwargs):
    """Quantize ``model`` (a folder or hub name; None: the adapter's example) and export it."""
    from .runner import run_quantization

    return run_quantization(model, adapter, make_settings(**kwargs))


def verify(model: str | None = None, adapter: str | None = None, **kwargs):
    """Replay the blocks with quantization off and compare with the model's own forward."""
    from .verify import run_verify

    kwargs.setdefault("nsamples", 2)
    kwargs.setdefault("seqlen", 64)
    return run_verify(model, adapter, make_settings(**kwargs))
