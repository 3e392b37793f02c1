"""Resume after a crash: a run records its progress in its partial output folder at every step.

``OUT.partial/progress.json`` holds the run's identity (model, settings, adapter and its options), the
hash of the calibration data, where the block loop stands, the shard writer's state (with the checksum
of every part file written), the export steps done, and a checksum of the whole record.
``OUT.partial/resume/streams-G-P.pt`` holds the inputs of block P of group G (fp and quantized streams,
and the adapters' per-sample replay state), its checksum recorded in progress.json.  What will be
published grows in ``OUT.partial/output``.  Re-running the same command continues from the last
recorded step; a changed input is refused naming what changed, damaged state is refused naming what is
damaged - both offer ``--fresh``, which starts over.
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
from ..errors import ModelFileError, ResourceError, UsageError
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
        self.record: dict = {"version": STATE_VERSION, "identity": identity, "calibration": None, "group": 0,
                             "position": 0, "last_block": None, "blocks_done": 0, "streams": None, "writer": None,
                             "result": None, "export": []}

    @property
    def output(self) -> str:
        """The folder that becomes OUT when the run publishes."""
        return os.path.join(self.partial, OUTPUT)

    @classmethod
    def open(cls, partial: str, identity: dict, fresh: bool) -> "Resume":
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
        name = f"streams-{group:03d}-{state.position:05d}.pt"
        keep = state.streams()
        digest = {}

        def write(tmp):
            with HashingFile(tmp) as f:
                torch.save(keep, f)
                digest["sha"] = f.close()

        _atomic_write(os.path.join(folder, name), write)
        faults.point("streams_saved")
        self.record.update(group=group, position=state.position, last_block=block.ref.name,
                           blocks_done=self.blocks_done, streams={"file": f"resume/{name}", "sha256": digest["sha"]},
                           writer=writer.state() if writer is not None else None, result=_result_json(result))
        self.save()
        for old in os.listdir(folder):
            if old != name:
                os.remove(os.path.join(folder, old))
        faults.point("block_saved")

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
