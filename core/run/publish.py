"""The export after the block loop, one recorded step at a time, then the completeness check and the
rename that publishes the checkpoint.

Steps (each recorded in the resume state when done, each safe to redo when interrupted before its
record), per output (``format:step`` when a run writes several formats): ``outside`` (the tensors outside
the blocks), ``shards`` (each shard written from its parts and recorded on its own), ``files`` (the
source folder's tokenizer, processor and other files), ``configs`` - or ``gguf`` for a GGUF file; then
``report``.  Then ``check_complete`` and ``publish``; the partial folder goes last.
"""
from __future__ import annotations

import json
import os

from ..errors import ResourceError
from ..export import checkpoint
from .context import Run
from .report import RunReport



def finish(run: Run, loop, output_dir: str, report: RunReport) -> None:
    """Export steps (each output's, see export/outputs.py), completeness check, publish; resumable at every step."""
    resume, outputs = run.resume, run.writer
    out = resume.output
    try:
        for name, step in outputs.steps(run, loop, lambda _: resume.save_writer(outputs.state())):
            if not resume.done(name):
                step()
                resume.step_done(name, outputs if name.endswith("outside") else None)
        if not resume.done("report"):
            path = os.path.join(out, "blockquant_report.json")
            with open(path + ".writing", "w") as f:
                json.dump(report.to_json(), f, indent=1, default=str)
            os.replace(path + ".writing", path)
            resume.step_done("report")
        outputs.check(out, run, loop.quantized)
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
    run.writer.check(output_dir, run, result.get("quantized", []))
    resume.remove()
    with open(os.path.join(output_dir, "blockquant_report.json")) as f:
        return RunReport.from_json(json.load(f))
