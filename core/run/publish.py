"""The export after the block loop, one recorded step at a time, then the completeness check and the
rename that publishes the checkpoint.

Steps (each recorded in the resume state when done, each safe to redo when interrupted before its
record): ``outside`` (the tensors outside the blocks), ``shards`` (each shard written from its parts
and recorded on its own), ``files`` (the source folder's tokenizer, processor and other files),
``configs``, ``report``.  Then ``check_complete`` and ``publish``; the partial folder goes last.
"""
from __future__ import annotations

import json
import os

from ..errors import ResourceError
from ..export import checkpoint
from ..export.completeness import check_complete, expected_tensors
from ..export.formats import quantization_config
from .context import Run
from .report import RunReport

AUTOROUND_LAYOUT_VERSION = "0.16.1"   # the auto-round release whose layout the auto_round format matches


def qconfig_of(run: Run, loop) -> dict:
    s, traits = run.settings, run.traits
    block_names = list(dict.fromkeys(b.ref.path for chain in run.groups for b in chain))   # what was quantized
    if traits.export_block_names and not s.to_quant_block_names:
        block_names = list(traits.export_block_names)
    extra = {name: {"bits": 16, "data_type": "float"} for name in loop.kept}
    return quantization_config(s.format, s.scheme, iters=s.iters, block_names=block_names, extra_config=extra,
                               version=AUTOROUND_LAYOUT_VERSION)


def finish(run: Run, loop, output_dir: str, report: RunReport) -> None:
    """Export steps, completeness check, publish; resumable at every step."""
    traits, resume = run.traits, run.resume
    out = resume.output
    weights_dir = os.path.join(out, traits.weights_subfolder)
    qconfig = qconfig_of(run, loop)
    try:
        if not resume.done("outside"):
            block_prefixes = [b.ref.name for chain in run.groups for b in chain]
            run.writer.add(checkpoint.outside_tensors(run.model, block_prefixes, run.loaded.weights))
            resume.step_done("outside", run.writer)
        if not resume.done("shards"):
            run.writer.finish(resume.save_writer)
            resume.step_done("shards")
        if not resume.done("files"):
            checkpoint.copy_source_files(run.source.path, out, traits.weights_subfolder, traits.weights_name)
            resume.step_done("files")
        if not resume.done("configs"):
            component = os.path.join(run.source.path, traits.weights_subfolder)
            checkpoint.write_configs(os.path.join(component, "config.json"), weights_dir, qconfig)
            resume.step_done("configs")
        if not resume.done("report"):
            path = os.path.join(out, "blockquant_report.json")
            with open(path + ".writing", "w") as f:
                json.dump(report.to_json(), f, indent=1, default=str)
            os.replace(path + ".writing", path)
            resume.step_done("report")
        check_complete(weights_dir, traits.weights_name, expected_tensors(run.model), loop.quantized, qconfig)
        checkpoint.publish(out, output_dir, resume.partial)
        resume.remove()
    except OSError as e:
        raise ResourceError(f"writing the output failed ({e.strerror or e}); free disk space and re-run the same "
                            "command to resume") from e


def published(run: Run, output_dir: str) -> bool:
    """True when an interrupted run had already renamed its checkpoint to ``output_dir``."""
    resume = run.resume
    return bool(resume.saved) and resume.done("report") and not os.path.exists(resume.output) \
        and os.path.isdir(output_dir)


def complete_publish(run: Run, output_dir: str) -> RunReport:
    """Finish a run interrupted after its rename: check the published checkpoint, drop the partial folder."""
    resume = run.resume
    result = resume.record.get("result") or {}
    weights_dir = os.path.join(output_dir, run.traits.weights_subfolder)
    with open(os.path.join(weights_dir, "config.json")) as f:
        qconfig = json.load(f)["quantization_config"]
    check_complete(weights_dir, run.traits.weights_name, expected_tensors(run.model), result.get("quantized", []),
                   qconfig)
    resume.remove()
    with open(os.path.join(output_dir, "blockquant_report.json")) as f:
        return RunReport.from_json(json.load(f))
