"""Resume after a crash: a run records its progress in its partial output folder at every step.

``OUT.partial/progress.json`` holds the run's identity (model, settings, adapter and its options), the
hash of the calibration data, where the block loop stands, the shard writer's state (with the checksum
of every part file written), the export steps done, and a checksum of the whole record.
``OUT.partial/resume/streams-G-P.pt`` holds the inputs of block P of group G (fp and quantized streams,
and the adapters' per-sample replay state), its checksum recorded in progress.json.  What will be
published grows in ``OUT.partial/output``.  Re-running the same command continues from the last
recorded step; a changed input is refused naming what changed, damaged state is refused naming what is
damaged - both offer ``--fresh``, which starts over.

Data-parallel runs (several ranks): rank 0 alone reads and writes ``progress.json`` and tells the other
ranks what it holds; each rank saves the streams of its own samples in ``streams-G-P-rankR.pt``, and
progress.json records every rank's file and checksum.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil

import torch

from .. import faults
from ..errors import BlockquantError, ModelFileError, ResourceError, UsageError
from ..export.integrity import HashingFile, check_file
from .report import BlockRecord
from .store import GroupState

log = logging.getLogger("blockquant")
PROGRESS = "progress.json"
OUTPUT = "output"
STATE_VERSION = 2
FRESH = "pass --fresh to start over (the interrupted run's finished blocks are then redone)"


def _atomic_write(path: str, write) -> None:
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ResourceError(f"cannot write {path} ({e.strerror}); free disk space and re-run to resume") from e


def _checksum(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _load(path: str) -> dict:
    """progress.json, verified against its own checksum."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path} is damaged (unreadable: {e}); {FRESH}") from e
    if not isinstance(saved, dict) or saved.get("checksum") != _checksum(saved):
        raise ModelFileError(f"{path} is damaged (its checksum does not match: edited or partly written); {FRESH}")
    if saved.get("version") != STATE_VERSION:
        raise ModelFileError(f"{path} was written by another blockquant version; {FRESH}")
    return saved


class Resume:
    """Progress of one run inside its partial output folder."""

    def __init__(self, partial: str, identity: dict):
        self.partial = partial
        self.identity = identity
        self.saved: dict | None = None
        self.blocks_done = 0
        self.dp = None          # resources.distributed.DataParallel, or None
        self.record: dict = {"version": STATE_VERSION, "identity": identity, "calibration": None, "group": 0,
                             "position": 0, "last_block": None, "blocks_done": 0, "streams": None, "writer": None,
                             "result": None, "export": []}

    @property
    def output(self) -> str:
        """The folder that becomes OUT when the run publishes."""
        return os.path.join(self.partial, OUTPUT)

    @classmethod
    def open(cls, partial: str, identity: dict, fresh: bool, dp=None) -> "Resume":
        """The run's progress in ``partial``; with ``dp``, rank 0 opens it and the others get its answer."""
        if dp is None:
            return cls._open(partial, identity, fresh)
        outcome = None
        if dp.is_main:
            try:
                outcome = cls._open(partial, identity, fresh)
            except BlockquantError as e:
                outcome = e
        saved = dp.broadcast(outcome.saved if isinstance(outcome, Resume) else outcome)
        if isinstance(saved, BlockquantError):
            raise saved
        resume = outcome if dp.is_main else cls(partial, identity)
        resume.dp, resume.saved = dp, saved
        if saved:
            resume.record, resume.blocks_done = dict(saved), saved["blocks_done"]
        os.makedirs(os.path.join(partial, "resume"), exist_ok=True)
        return resume

    @classmethod
    def _open(cls, partial: str, identity: dict, fresh: bool) -> "Resume":
        path = os.path.join(partial, PROGRESS)
        if os.path.isdir(partial) and (fresh or not os.path.exists(path)):
            shutil.rmtree(partial)   # nothing recorded (stopped before the first block) or discarded
        resume = cls(partial, identity)
        if os.path.exists(path):
            saved = _load(path)
            differs = sorted(k for k in set(identity) | set(saved["identity"])
                             if identity.get(k) != saved["identity"].get(k))
            if differs:
                details = "; ".join(f"{k}: was {_short(saved['identity'].get(k))}, now {_short(identity.get(k))}"
                                    for k in differs)
                raise UsageError(
                    f"an interrupted run with different settings exists in {partial} ({details}); re-run with the "
                    "original settings to resume it, or pass --fresh to discard it"
                )
            resume.saved = saved
            resume.record = dict(saved)
            resume.blocks_done = saved["blocks_done"]
            log.info("resuming from %s: %d block(s) already done", partial, resume.blocks_done)
        os.makedirs(partial, exist_ok=True)
        return resume

    def check_calibration(self, digest: str) -> None:
        """Refuse to continue on other calibration data than the interrupted run used."""
        was = self.record.get("calibration")
        if was and was != digest:
            raise UsageError(
                f"the calibration data changed since the interrupted run in {self.partial} started (content hash "
                f"was {was[:12]}, now {digest[:12]}); re-run with the original data to resume it, or pass --fresh "
                "to discard it"
            )
        self.record["calibration"] = digest

    @property
    def writer_state(self) -> dict | None:
        return self.record.get("writer")

    def restore_group(self, group: int, chain_len: int) -> GroupState | None:
        """The loop state to continue ``group`` from, or None to start it fresh."""
        if not self.saved:
            return None
        if group < self.saved["group"] or (group == self.saved["group"] and self.saved["position"] >= chain_len):
            return GroupState(chain_len, [], [], [], [])
        if group > self.saved["group"]:
            return None
        streams = self.saved["streams"] or {}
        if self.dp is not None:
            streams = streams["ranks"][self.dp.rank]
        path = os.path.join(self.partial, streams.get("file", "resume/streams.pt"))
        check_file(path, streams.get("sha256"), FRESH)
        try:
            saved = torch.load(path, weights_only=False)
        except Exception as e:   # a checksum-valid file torch cannot read: written by another version
            raise ModelFileError(f"{path} is damaged (cannot be read: {type(e).__name__}); {FRESH}") from e
        return GroupState(position=self.saved["position"], **saved)

    def block_done(self, block, group: int, state: GroupState, writer, result=None) -> None:
        self.blocks_done += 1
        faults.point("block_written")
        folder = os.path.join(self.partial, "resume")
        os.makedirs(folder, exist_ok=True)
        name = f"streams-{group:03d}-{state.position:05d}{self._rank_suffix()}.pt"
        keep = state.streams()
        digest = {}

        def write(tmp):
            with HashingFile(tmp) as f:
                torch.save(keep, f)
                digest["sha"] = f.close()

        _atomic_write(os.path.join(folder, name), write)
        faults.point("streams_saved")
        streams = {"file": f"resume/{name}", "sha256": digest["sha"]}
        if self.dp is not None:     # every rank's file is on disk before progress.json names them
            streams = dict(streams, ranks=self.dp.gather(streams))
        self.record.update(group=group, position=state.position, last_block=block.ref.name,
                           blocks_done=self.blocks_done, streams=streams,
                           writer=writer.state() if writer is not None else None, result=_result_json(result))
        if self.dp is None or self.dp.is_main:
            self.save()
        if self.dp is not None:
            self.dp.barrier()       # progress.json names the new files: the old ones can go
        for old in os.listdir(folder):
            if old != name and old.endswith(f"{self._rank_suffix()}.pt"):
                os.remove(os.path.join(folder, old))
        faults.point("block_saved")

    def _rank_suffix(self) -> str:
        return f"-rank{self.dp.rank}" if self.dp is not None else ""

    def save(self) -> None:
        self.record["checksum"] = _checksum(self.record)
        _atomic_write(os.path.join(self.partial, PROGRESS), lambda p: _dump(self.record, p))

    def save_writer(self, state: dict) -> None:
        """Record the shard writer's state (called as each shard is finished)."""
        self.record["writer"] = state
        self.save()
        faults.point("shard_written")

    def done(self, step: str) -> bool:
        return step in self.record["export"]

    def step_done(self, step: str, writer=None) -> None:
        """Record export step ``step`` as finished (with the writer's state, when it changed)."""
        self.record["export"] = self.record["export"] + [step]
        if writer is not None:
            self.record["writer"] = writer.state()
        self.save()
        faults.point(f"export_{step}")

    @property
    def empty(self) -> bool:
        """Nothing worth keeping: no progress.json on disk (no interrupted run, no block finished)."""
        return not os.path.exists(os.path.join(self.partial, PROGRESS))

    def remove(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _result_json(result) -> dict | None:
    if result is None:
        return None
    return {"blocks": [dataclasses.asdict(b) for b in result.blocks], "quantized": list(result.quantized),
            "kept": dict(result.kept), "tuning_seconds": result.tuning_seconds}


def restore_result(saved: dict | None, result) -> None:
    """Put the finished blocks of an interrupted run back into a loop result."""
    data = (saved or {}).get("result")
    if not data:
        return
    result.blocks = [BlockRecord(**b) for b in data["blocks"]]
    result.quantized = list(data["quantized"])
    result.kept = dict(data["kept"])
    result.tuning_seconds = data["tuning_seconds"]


def _dump(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
