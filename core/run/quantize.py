"""One quantization run from start to report: prepare, capture, block loop, export, publish."""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field

import torch

from ..config import RunSettings
from ..errors import Interrupted, ResourceError, UsageError
from ..export import checkpoint
from ..export.outputs import Outputs
from ..frame.options import options_dict
from ..model.model_io import release
from ..resources import distributed
from ..resources.budget import check_disk, check_memory
from ..resources.memory import map_large_allocations, reset_peak_vram
from .calibrate import capture_inputs
from .context import Abandon, Run, signals_caught
from .loop import BlockLoop
from .prepare import prepare
from .report import Progress, RunReport, format_duration
from .checks import check_something_quantized
from .fingerprint import model_signature
from .lock import OutputLock
from .publish import complete_publish, finish, published
from .resume import Resume

log = logging.getLogger("blockquant")


@dataclass
class QuantizeResult:
    output_dir: str | None
    report: RunReport
    run: Run
    quantized_weights: dict = field(default_factory=dict)   # layer -> QuantizedWeight, with keep_blocks=True

    @property
    def model(self):
        """The in-memory quantized model (blocks hold the dequantized weights), when kept."""
        return self.run.model


def default_output_dir(run: Run) -> str:
    s = run.settings.scheme
    base = os.path.basename(os.path.normpath(run.source.path))
    base = re.sub(r"^blockquant-\w+-example-\w+$", run.entry.name, base)
    fmt = run.settings.format.replace(":", "-").replace(",", "+")
    return os.path.abspath(f"{base}-w{s.bits}g{s.group_size}-{fmt}")


def run_quantization(model: str | None, adapter: str | None, settings: RunSettings) -> QuantizeResult:
    start = time.time()
    reset_peak_vram()
    map_large_allocations()     # freed layer-sized temporaries go back to the OS, not the heap
    distributed.assign_device(settings)
    dp = None
    try:
        run = prepare(model, adapter, settings)
        run.dp = dp = distributed.start(run.device)   # torchrun: this process is one rank of several
        try:
            return _quantize(run, start)
        finally:
            if run.loaded is not None and run.loaded.weights is not None:
                run.loaded.weights.close()
    finally:
        if dp is not None:
            dp.close()


def _quantize(run: Run, start: float) -> QuantizeResult:
    s = run.settings
    export = s.format != "fake"
    output_dir = os.path.abspath(s.output_dir) if s.output_dir else (default_output_dir(run) if export else None)
    check_something_quantized(run)
    if not export:
        return _run(run, start, None)
    checkpoint.check_not_inputs(output_dir, _inputs(run))
    checkpoint.check_output(output_dir, overwrite=True)   # a folder path in a writable place (for the lock)
    if run.dp is not None and not run.dp.is_main:    # rank 0 holds the lock and writes the checkpoint
        run.resume = Resume.open(output_dir.rstrip("/") + ".partial", identity(run), s.fresh, run.dp)
        if run.dp.broadcast(None):
            return QuantizeResult(output_dir, None, run)
        return _run(run, start, output_dir)
    with OutputLock.acquire(output_dir):
        run.resume = Resume.open(output_dir.rstrip("/") + ".partial", identity(run), s.fresh, run.dp)
        already = published(run, output_dir)
        if run.dp is not None:
            run.dp.broadcast(already)
        if already:
            log.info("the interrupted run had already published %s", output_dir)
            return QuantizeResult(output_dir, complete_publish(run, output_dir), run)
        try:
            checkpoint.check_output(output_dir, s.overwrite)
            check_disk(run, output_dir, run.resume.partial)
            run.writer = Outputs(run, run.resume.output, run.resume.writer_state)
            return _run(run, start, output_dir)
        except UsageError:   # an input error (an output in the way, a format this model cannot be written
            if run.resume.empty:    # in, empty calibration data) found before anything was saved: leave nothing
                run.resume.remove()
            raise


def _run(run: Run, start: float, output_dir: str | None) -> QuantizeResult:
    s = run.settings
    check_memory(run)
    done = run.resume.blocks_done if run.resume else 0
    run.progress = Progress(sum(len(chain) for chain in run.groups), log, done=done)
    blocks = f"{run.progress.total} block(s)" if not done else f"{run.progress.total - done} of {run.progress.total} " \
        f"block(s) ({done} finished before)"
    if s.weights_only:
        run.stores = []     # the block loop quantizes each block's weights as they stream in
        log.info("quantizing %s in %d group(s): %s, RTN straight from the checkpoint (no calibration data, "
                 "no replay)", blocks, len(run.groups), _scheme_label(s))
    else:
        capture_inputs(run)
        log.info("quantizing %s in %d group(s): %s, iters %d, %d samples", blocks,
                 len(run.groups), _scheme_label(s), s.iters, len(run.stores[0]) if run.stores else 0)
    if run.loaded.weights is not None and not run.keep_blocks:
        release_embeddings(run.model)
    try:
        with signals_caught(run):
            loop = BlockLoop(run).run()
    except Abandon as e:
        raise Interrupted(f"stopped by {e}; progress is saved after the last finished block - re-run the same "
                          "command to resume") from None
    except OSError as e:
        raise ResourceError(f"writing the output failed ({e.strerror or e}); free disk space and re-run the same "
                            "command to resume") from e
    report = _report(run, loop, output_dir, start)
    if output_dir and run.writer is not None:
        finish(run, loop, output_dir, report)
    if run.dp is not None:
        run.dp.barrier()            # the other ranks return once rank 0 has published the output
    log.info("\n%s", report.render())
    return QuantizeResult(output_dir, report, run, loop.weights)


def identity(run: Run) -> dict:
    """What a resumed run must share with the interrupted one (the calibration data is checked after it is
    built, see ``Resume.check_calibration``)."""
    s = run.settings
    model = f"{run.entry.name} example model" if run.tmpdir is not None else os.path.abspath(run.source.path)
    ident = dict(s.fingerprint(), model=model, model_files=model_signature(run.source.path), adapter=run.entry.name)
    ident.update({f"option {k}": v for k, v in options_dict(run.ctx.options).items()})
    if run.dp is not None:
        ident["ranks"] = run.dp.size     # the samples are sharded by rank
    return json.loads(json.dumps(ident, sort_keys=True, default=str))   # as it reads back from progress.json


def _inputs(run: Run) -> list[str]:
    """The folders and files this run reads, which the output must never touch."""
    s = run.settings
    return [run.source.path] + [p for p in (s.dataset, s.images) if p and os.path.exists(p)]


def release_embeddings(model) -> None:
    """After capture the token embeddings and the output head are not needed until export, which reads
    them from the checkpoint again: free them (for large vocabularies they are gigabytes)."""
    def get(getter):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            return None
        return module if isinstance(module, torch.nn.Module) else None

    inp, out = get("get_input_embeddings"), get("get_output_embeddings")
    tied = inp is not None and out is not None and getattr(out, "weight", None) is getattr(inp, "weight", 0)
    for module in (inp, out):
        if module is not None:
            release(module)
    if tied:
        out.weight = inp.weight


def _scheme_label(s: RunSettings) -> str:
    q = s.scheme
    return f"W{q.bits}A16 g{q.group_size} {'sym' if q.sym else 'asym'}"


def _report(run: Run, loop, output_dir: str | None, start: float) -> RunReport:
    s = run.settings
    report = RunReport(model=run.source.path, adapter=run.entry.name, scheme=_scheme_label(s), format=s.format,
                       output_dir=output_dir or "",
                       settings={k: getattr(s, k) for k in ("iters",) + (() if s.weights_only else ("nsamples", "seqlen", "batch_size", "seed"))})
    report.blocks = loop.blocks
    report.add_quantized(loop.quantized)
    for name, reason in loop.kept.items():
        report.keep_fp(name, reason)
    report.capture_seconds = run.capture_seconds
    earlier = ((run.resume.saved or {}).get("result") or {}).get("tuning_seconds", 0.0) if run.resume else 0.0
    report.tuning_seconds = loop.tuning_seconds - earlier     # this process's share, like the wall time
    report.wall_seconds = time.time() - start
    if s.weights_only:
        report.notes.append("RTN straight from the checkpoint weights: no calibration data, no capture, no replay")
    if run.resume and run.resume.saved:
        report.notes.append(f"resumed after {run.resume.saved.get('last_block')}: times are this run's; the "
                            f"earlier run(s) tuned for {format_duration(earlier)}")
    report.measure_memory()
    return report

