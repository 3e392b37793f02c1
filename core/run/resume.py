"""Resume after a crash: progress is recorded in the partial output folder after every block.

``OUT.partial/progress.json`` holds the settings fingerprint, the shard writer's state and where
the loop stands; ``OUT.partial/resume/streams.pt`` holds the inputs of the next block (fp and
quantized streams, and the adapters' per-sample replay state).  Re-running the same command
continues from the last finished block; different settings are refused.
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

    def __init__(self, partial: str, identity: dict):
        self.partial = partial
        self.identity = identity
        self.saved: dict | None = None
        self.blocks_done = 0

    @classmethod
    def open(cls, partial: str, identity: dict, fresh: bool) -> "Resume":
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
        state = torch.load(os.path.join(self.partial, "resume", "streams.pt"), weights_only=False)
        state["position"] = self.saved["position"]
        return state

    def block_done(self, block, group: int, state: dict, writer, result=None) -> None:
        self.blocks_done += 1
        os.makedirs(os.path.join(self.partial, "resume"), exist_ok=True)
        keep = {k: v for k, v in state.items() if k != "position"}
        _atomic_write(os.path.join(self.partial, "resume", "streams.pt"), lambda p: torch.save(keep, p))
        progress = {"identity": self.identity, "group": group, "position": state["position"],
                    "last_block": block.ref.name, "blocks_done": self.blocks_done,
                    "writer": writer.state() if writer is not None else None,
                    "result": _result_json(result)}
        _atomic_write(os.path.join(self.partial, PROGRESS), lambda p: _dump(progress, p))

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
