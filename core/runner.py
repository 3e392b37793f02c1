"""One quantization run from start to report: prepare, capture, block loop, export, publish."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass

import torch

from .api import Run, capture_inputs, prepare, signals_caught
from .config import RunSettings
from .errors import Interrupted, ResourceError, UsageError
from .export import checkpoint
from .export.outputs import Outputs
from .memory import map_large_allocations, reset_peak_vram
from .pipeline import Abandon, BlockLoop
from .report import Progress, RunReport
from .resume import Resume

log = logging.getLogger("blockquant")


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
    fmt = run.settings.format.replace(":", "-").replace(",", "+")
    return os.path.abspath(f"{base}-w{s.bits}g{s.group_size}-{fmt}")


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
    total_blocks = sum(len(chain) for chain in run.groups)
    if export:
        checkpoint.check_output(output_dir, s.overwrite)
        partial = output_dir.rstrip("/") + ".partial"
        identity = dict(s.fingerprint(), model=os.path.abspath(run.source.path), adapter=run.entry.name)
        run.resume = Resume.open(partial, identity, s.fresh)
        try:
            run.writer = Outputs(run, partial, run.resume.writer_state)
        except UsageError:   # a format this model cannot be written in: leave nothing behind
            if not run.resume.saved:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        check_disk(run, output_dir, partial)
    check_memory(run)
    done = run.resume.blocks_done if run.resume else 0
    run.progress = Progress(total_blocks, log, done=done)
    capture_inputs(run)
    if run.loaded.weights is not None and not run.keep_blocks:
        release_embeddings(run.model)
    log.info("quantizing %d block(s) in %d group(s): %s, iters %d, %d samples", total_blocks, len(run.groups),
             _scheme_label(s), s.iters, len(run.stores[0]) if run.stores else 0)
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


def predicted_output_bytes(run: Run) -> int:
    """The checkpoint size this run will write: packed quantized layers + everything else as stored."""
    from .blocks import choose_layers

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


def check_disk(run: Run, output_dir: str, partial: str) -> None:
    """Refuse to start when the output's file system cannot hold the predicted checkpoint(s) (one per format)."""
    from .memory import human_bytes

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


def predicted_extra_ram(run: Run) -> tuple[int, int, int]:
    """(bytes above the current RSS at the peak, largest block bytes, calibration cache bytes)."""
    s = run.settings
    width = 4 if run.compute_dtype == torch.float32 else 2
    blocks = [b for chain in run.groups for b in chain]
    largest = max((sum(p.numel() for p in b.module.parameters()) * width for b in blocks), default=0)
    config = getattr(run.model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or 0
    cache = s.nsamples * s.seqlen * hidden * (4 if run.cache_device.type == "cpu" else 0)
    on_cpu = run.device.type == "cpu"
    # CPU: the block in fp32 while its targets run, then (AutoRound) the block back at 2 bytes per
    # weight plus ~5 of tuning state and one layer's temporaries - about twice the fp32 block
    extra = largest * (2 if on_cpu else 1) + cache * (4 if s.iters else 2)
    return extra, largest, cache


def check_memory(run: Run) -> None:
    """Warn when the predicted peak RAM exceeds what the machine has available now."""
    from .memory import human_bytes

    available = _mem_available()
    if not available:
        return
    extra, largest, cache = predicted_extra_ram(run)
    if extra > available:
        log.warning("the predicted peak RAM is about %s above the current use (largest block %s, calibration cache %s) "
                    "but only %s is available; lower --nsamples or --seqlen, or keep the cache on a GPU with "
                    "--cache_device cuda", human_bytes(extra), human_bytes(largest), human_bytes(cache),
                    human_bytes(available))


def release_embeddings(model) -> None:
    """After capture the token embeddings and the output head are not needed until export, which reads
    them from the checkpoint again: free them (for large vocabularies they are gigabytes)."""
    from .model_io import release

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
    try:
        run.writer.finish(run, loop)
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
    report.tuning_seconds = loop.tuning_seconds
    report.wall_seconds = time.time() - start
    if run.resume and run.resume.saved:
        report.notes.append(f"resumed after {run.resume.saved.get('last_block')}")
    report.measure_memory()
    return report


def settings_dict(settings: RunSettings) -> dict:
    return dataclasses.asdict(settings)
