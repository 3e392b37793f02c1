"""Resume after a crash: progress is recorded in the partial output folder after every block.

``OUT.partial/progress.json`` holds the settings fingerprint, the shard writer's state and where
the loop stands; ``OUT.partial/resume/streams.pt`` holds the inputs of the next block (fp and
quantized streams, and the adapters' per-sample replay state).  Re-running the same command
continues from the last finished block; different settings are refused.

Data-parallel runs (several ranks): rank 0 alone reads and writes ``progress.json`` and tells the other
ranks what it holds; each rank saves the streams of its own samples in
``resume/streams-g{group}-p{position}-rank{rank}.pt`` (a position in the name: a rank that finished a
block before another died never overwrites the state ``progress.json`` points to).
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import torch

from ..errors import ResourceError, UsageError
from .report import BlockRecord

log = logging.getLogger("blockquant")
PROGRESS = "progress.json"


def _atomic_write(path: str, write) -> None:
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ResourceError(f"cannot write {path} ({e.strerror}); free disk space and re-run to resume") from e


class Resume:
    """Progress of one run inside its partial output folder."""

    def __init__(self, partial: str, identity: dict, dp=None):
        self.partial = partial
        self.identity = identity
        self.saved: dict | None = None
        self.blocks_done = 0
        self.dp = dp          # resources.distributed.DataParallel, or None

    @classmethod
    def open(cls, partial: str, identity: dict, fresh: bool, dp=None) -> "Resume":
        """The run's progress in ``partial``; with ``dp``, rank 0 opens it and the others get its answer."""
        if dp is None:
            return cls._open(partial, identity, fresh)
        outcome = None
        if dp.is_main:
            try:
                outcome = cls._open(partial, identity, fresh)
            except UsageError as e:
                outcome = e
        saved = dp.broadcast(outcome.saved if isinstance(outcome, Resume) else outcome)
        if isinstance(saved, UsageError):
            raise saved
        resume = outcome if dp.is_main else cls(partial, identity)
        resume.dp, resume.saved = dp, saved
        resume.blocks_done = saved.get("blocks_done", 0) if saved else 0
        os.makedirs(os.path.join(partial, "resume"), exist_ok=True)
        return resume

    @classmethod
    def _open(cls, partial: str, identity: dict, fresh: bool) -> "Resume":
        path = os.path.join(partial, PROGRESS)
        if os.path.isdir(partial) and (fresh or not os.path.exists(path)):
            shutil.rmtree(partial)
        resume = cls(partial, identity)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    saved = json.load(f)
            except (OSError, json.JSONDecodeError):
                log.warning("%s is unreadable; starting over", path)
                shutil.rmtree(partial)
                saved = None
            if saved is not None:
                differs = sorted(k for k in set(identity) | set(saved["identity"])
                                 if identity.get(k) != saved["identity"].get(k))
                if differs:
                    details = "; ".join(f"{k}: was {saved['identity'].get(k)!r}, now {identity.get(k)!r}" for k in differs)
                    raise UsageError(
                        f"an interrupted run with different settings exists in {partial} ({details}); re-run with the "
                        "original settings to resume it, or pass --fresh to discard it"
                    )
                resume.saved = saved
                resume.blocks_done = saved.get("blocks_done", 0)
                log.info("resuming from %s: %d block(s) already done", partial, resume.blocks_done)
        os.makedirs(partial, exist_ok=True)
        return resume

    @property
    def writer_state(self) -> dict | None:
        return self.saved.get("writer") if self.saved else None

    def restore_group(self, group: int, chain_len: int) -> dict | None:
        """The loop state to continue ``group`` from, or None to start it fresh."""
        if not self.saved:
            return None
        if group < self.saved["group"]:
            return {"position": chain_len}
        if group > self.saved["group"]:
            return None
        state = torch.load(self._streams(group, self.saved["position"]), weights_only=False)
        state["position"] = self.saved["position"]
        return state

    def block_done(self, block, group: int, state: dict, writer, result=None) -> None:
        self.blocks_done += 1
        os.makedirs(os.path.join(self.partial, "resume"), exist_ok=True)
        keep = {k: v for k, v in state.items() if k != "position"}
        streams = self._streams(group, state["position"])
        _atomic_write(streams, lambda p: torch.save(keep, p))
        if self.dp is not None:
            self.dp.barrier()           # every rank's streams are on disk before progress.json names them
            if not self.dp.is_main:
                self.dp.barrier()
                self._drop_other_streams(streams)
                return
        progress = {"identity": self.identity, "group": group, "position": state["position"],
                    "last_block": block.ref.name, "blocks_done": self.blocks_done,
                    "writer": writer.state() if writer is not None else None,
                    "result": _result_json(result)}
        _atomic_write(os.path.join(self.partial, PROGRESS), lambda p: _dump(progress, p))
        if self.dp is not None:
            self.dp.barrier()
            self._drop_other_streams(streams)

    def _streams(self, group: int, position: int) -> str:
        if self.dp is None:
            return os.path.join(self.partial, "resume", "streams.pt")
        return os.path.join(self.partial, "resume", f"streams-g{group}-p{position}-rank{self.dp.rank}.pt")

    def _drop_other_streams(self, keep: str) -> None:
        """This rank's stream files of earlier blocks (progress.json no longer names them)."""
        folder, suffix = os.path.dirname(keep), f"-rank{self.dp.rank}.pt"
        for name in os.listdir(folder):
            if name.startswith("streams-") and name.endswith(suffix) and os.path.join(folder, name) != keep:
                os.remove(os.path.join(folder, name))

    def clear(self) -> None:
        for name in (PROGRESS, "resume"):
            path = os.path.join(self.partial, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)


def _result_json(result) -> dict | None:
    if result is None:
        return None
    import dataclasses

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
