"""Steps 6-8 of a run: calibration batches, ``pre_cache``, variable-input detection, capture."""
from __future__ import annotations

import logging
from collections.abc import Mapping
import time

import torch

from .. import faults
from ..data.calibration_data import CalibrationSource
from ..errors import DataError
from ..resources import devices
from ..resources.memory import human_bytes
from .capture import Calibration, capture, detect, stream_keys_from_output
from .context import Run
from .fingerprint import content_hash
from .report import sample_count_note
from .store import GroupStore

log = logging.getLogger("blockquant")


def capture_inputs(run: Run) -> None:
    """Steps 6-8: calibration batches, pre_cache, variable-input detection, capture."""
    s, t0 = run.settings, time.time()
    processor = run.loaded.processor
    source = CalibrationSource(spec=s.dataset, tokenizer=getattr(processor, "tokenizer", processor),
                               processor=processor, images=s.images)
    batches = run.hooks.calibration_batches(model=run.model, source=source, settings=s)
    if not batches:
        raise DataError("the calibration data produced no batches; pass --dataset with text (a .txt/.jsonl/.parquet file)")
    run.batches = batches
    if run.resume:   # a resumed run must calibrate on the same data as the interrupted one
        run.resume.check_calibration(content_hash(batches))
    calibration = Calibration(batches=batches, settings=s, loaded=run.loaded)
    run.hooks.pre_cache(model=run.model, calibration=calibration)
    all_blocks = [b for chain in run.groups for b in chain]

    def forward(batch) -> None:
        calibration.batch = batch
        run_batch(run, batch)

    try:
        with run.loader.during_forward(all_blocks), torch.no_grad():
            detection = detect(run.groups, lambda: forward(batches[0]), stream_keys_from_output(run.hooks.block_outputs),
                               run.traits.stop_after_capture, calibration)
            calibration.take_pending()
            cache_keys = _cache_policy(run, detection)
            run.stores = [GroupStore(stream_keys=detection.stream_keys[g], fixed_shared=run.traits.shared_keys)
                          for g in range(len(run.groups))]
            if run.dp is not None:      # this rank captures its share of the batches
                capture(run.groups, run.dp.my_batches(batches), run.dp.counting(forward, lambda: [len(s) for s in run.stores]),
                        calibration, run.stores, cache_keys, run.traits, run.cache_device)
            else:
                capture(run.groups, batches, forward, calibration, run.stores, cache_keys, run.traits, run.cache_device)
    finally:
        calibration.close()
    run.capture_seconds = time.time() - t0
    if run.stores:
        rows = sum(_rows(sample) for sample in run.stores[0].streams)
        note = sample_count_note(s.nsamples, len(run.stores[0]), rows, run.entry.name)
        if note:
            log.info(note)
    for g, store in enumerate(run.stores):
        sizes = store.nbytes()
        log.info("group %d (%s): %d samples captured, store %s (streams %s, shared %s, per-sample %s, per-block %s)",
                 g, "+".join(dict.fromkeys(b.ref.path for b in run.groups[g])), len(store), human_bytes(sizes["total"]),
                 human_bytes(sizes["streams"]), human_bytes(sizes["shared"]), human_bytes(sizes["per_sample"]), human_bytes(sizes["per_block"]))
    if run.dp is not None:      # single-process sample numbering, other ranks' samples as None
        for store, (positions, total) in zip(run.stores, run.dp.sample_positions(len(run.stores))):
            store.place(positions, total)


def run_batch(run: Run, batch) -> None:
    """One calibration forward (``run_calibration``), retried on the CPU after a CUDA OOM."""
    faults.point("calibration_forward")
    try:
        run.hooks.run_calibration(model=run.model, batch=_on(batch, run.device))
    except torch.cuda.OutOfMemoryError:
        log.warning("CUDA out of memory during a calibration forward; retrying this batch on the CPU")
        devices.fall_back_to_cpu(run)
        run.hooks.run_calibration(model=run.model, batch=_on(batch, run.device))


def _rows(streams: dict) -> int:
    tensor = next((v for v in streams.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    return int(tensor.shape[0]) if tensor is not None else 1


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


def _on(batch, device):
    """A calibration batch on ``device``; a processor's output (a mapping) becomes a plain dict of its fields."""
    return devices.to_device(dict(batch) if isinstance(batch, Mapping) else batch, device)
