"""One quantization run from start to report: prepare, capture, block loop, export, publish."""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass

import torch

from ..config import RunSettings
from ..errors import Interrupted, ResourceError
from ..export import checkpoint
from ..export.formats import quantization_config
from ..export.shards import ShardWriter
from ..frame.options import options_dict
from ..model.model_io import release
from ..resources.budget import check_disk, check_memory
from ..resources.memory import map_large_allocations, reset_peak_vram
from .calibrate import capture_inputs
from .context import Abandon, Run, signals_caught
from .loop import BlockLoop
from .prepare import prepare
from .report import Progress, RunReport, format_duration
from .resume import Resume

log = logging.getLogger("blockquant")
AUTOROUND_LAYOUT_VERSION = "0.16.1"   # the auto-round release whose layout the auto_round format matches


@dataclass
class QuantizeResult:
    output_dir: str | None
    report: RunReport
    run: Run

    @property
    def model(self):
        """The in-memory quantized model (blocks hold the dequantized weights), when kept."""
        return self.run.model


def default_output_dir(run: Run) -> str:
    s = run.settings.scheme
    base = os.path.basename(os.path.normpath(run.source.path))
    base = re.sub(r"^blockquant-\w+-example-\w+$", run.entry.name, base)
    return os.path.abspath(f"{base}-w{s.bits}g{s.group_size}-{run.settings.format}")


def run_quantization(model: str | None, adapter: str | None, settings: RunSettings) -> QuantizeResult:
    start = time.time()
    reset_peak_vram()
    map_large_allocations()     # freed layer-sized temporaries go back to the OS, not the heap
    run = prepare(model, adapter, settings)
    try:
        return _quantize(run, start)
    finally:
        if run.loaded is not None and run.loaded.weights is not None:
            run.loaded.weights.close()


def _quantize(run: Run, start: float) -> QuantizeResult:
    s = run.settings
    export = s.format != "fake"
    output_dir = os.path.abspath(s.output_dir) if s.output_dir else (default_output_dir(run) if export else None)
    traits = run.traits
    total_blocks = sum(len(chain) for chain in run.groups)
    if export:
        checkpoint.check_output(output_dir, s.overwrite)
        partial = output_dir.rstrip("/") + ".partial"
        identity = dict(s.fingerprint(), model=os.path.abspath(run.source.path), adapter=run.entry.name)
        identity.update({f"option {k}": v for k, v in options_dict(run.ctx.options).items()})
        run.resume = Resume.open(partial, identity, s.fresh)
        weights_dir = os.path.join(partial, traits.weights_subfolder)
        if run.resume.writer_state:
            run.writer = ShardWriter.resume(weights_dir, traits.weights_name, s.max_shard_size, run.resume.writer_state)
        else:
            run.writer = ShardWriter(weights_dir, traits.weights_name, s.max_shard_size)
        check_disk(run, output_dir, partial)
    check_memory(run)
    done = run.resume.blocks_done if run.resume else 0
    run.progress = Progress(total_blocks, log, done=done)
    if s.weights_only:
        run.stores = []     # the block loop quantizes each block's weights as they stream in
        log.info("quantizing %d block(s) in %d group(s): %s, RTN straight from the checkpoint (no calibration data, "
                 "no replay)", total_blocks, len(run.groups), _scheme_label(s))
    else:
        capture_inputs(run)
        log.info("quantizing %d block(s) in %d group(s): %s, iters %d, %d samples", total_blocks, len(run.groups),
                 _scheme_label(s), s.iters, len(run.stores[0]) if run.stores else 0)
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
    if export:
        _finish(run, loop, partial, output_dir, report)
    log.info("\n%s", report.render())
    return QuantizeResult(output_dir, report, run)


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


def _finish(run: Run, loop, partial: str, output_dir: str, report: RunReport) -> None:
    s, traits = run.settings, run.traits
    block_prefixes = [b.ref.name for chain in run.groups for b in chain]
    try:
        run.writer.add(checkpoint.outside_tensors(run.model, block_prefixes, run.loaded.weights))
        run.writer.finish()
        component = os.path.join(run.source.path, traits.weights_subfolder)
        block_names = list(dict.fromkeys(b.ref.path for chain in run.groups for b in chain))   # what was quantized
        if traits.export_block_names and not s.to_quant_block_names:
            block_names = list(traits.export_block_names)
        extra = {name: {"bits": 16, "data_type": "float"} for name in loop.kept}
        qconfig = quantization_config(s.format, s.scheme, iters=s.iters, block_names=block_names,
                                      extra_config=extra, version=AUTOROUND_LAYOUT_VERSION)
        checkpoint.copy_source_files(run.source.path, partial, traits.weights_subfolder, traits.weights_name)
        checkpoint.write_configs(os.path.join(component, "config.json"), os.path.join(partial, traits.weights_subfolder), qconfig)
        run.resume.clear()
        with open(os.path.join(partial, "blockquant_report.json"), "w") as f:
            json.dump(report.to_json(), f, indent=1, default=str)
        checkpoint.publish(partial, output_dir)
    except OSError as e:
        raise ResourceError(f"writing the output failed ({e.strerror or e}); free disk space and re-run to resume") from e


def _report(run: Run, loop, output_dir: str | None, start: float) -> RunReport:
    s = run.settings
    report = RunReport(model=run.source.path, adapter=run.entry.name, scheme=_scheme_label(s), format=s.format,
                       output_dir=output_dir or "",
                       settings={k: getattr(s, k) for k in ("iters", "nsamples", "seqlen", "batch_size", "seed")})
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

