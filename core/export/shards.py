"""Write tensors into size-capped safetensors shards, resumably and deterministically.

Tensors arrive in groups (one block's tensors, say) through ``add``.  A shard is closed when the
next group would take it past ``max_shard_size`` (a group larger than the limit gets a shard of its
own).  ``flush`` moves the buffered tensors to a part file on disk, so the caller can free memory
and record ``state()`` after every block.  Part files are never deleted before ``finish``, so every
recorded state stays resumable; ``finish`` streams each shard's parts, one tensor at a time, into
the shard file and then deletes them (extra disk: one shard at a time).  Shard contents depend only
on the order and sizes of the groups, never on where flushes or a resume happened, and the bytes of
every file depend only on its tensors: resumed and uninterrupted runs write identical files.

Files are written by a small safetensors writer (tensors sorted by dtype size, then name; the
header JSON compact, padded to 8 bytes; metadata ``{"format": "pt"}``), which is byte-identical
to ``safetensors.torch.save`` for the same tensors.  ``finish`` renames the shards to
``{prefix}-0000k-of-0000N.safetensors`` plus ``{prefix}.safetensors.index.json``, or to
``{prefix}.safetensors`` when there is one.
"""
from __future__ import annotations

import glob
import json
import os
import struct

import torch
from safetensors import safe_open

from ..errors import BlockquantError, ModelFileError
from ..model.model_io import SAFETENSORS_DTYPES
from .integrity import HashingFile, check_file, file_matches

GiB = 1024 ** 3
_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}   # torch dtype -> safetensors name
# safetensors writes larger dtypes first (every tensor stays aligned), in this order, then by name.
_RANK = ["U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2",
         "I8", "U8", "BOOL"]
STATE_VERSION = 2


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _order(items):
    """safetensors' file order: by dtype (see ``_RANK``), then by name."""
    return sorted(items, key=lambda kv: (_RANK.index(_DTYPES[kv[1].dtype]), kv[0]))


def write_safetensors(path: str, entries: list[tuple[str, object]], metadata: dict | None = None) -> int:
    """Write ``entries`` [(name, tensor or lazy tensor)] in this order as a safetensors file,
    materialising one tensor at a time (``detach()`` loads a lazy one).  Returns the file size."""
    return write_hashed(path, entries, metadata)[0]


def write_hashed(path: str, entries: list[tuple[str, object]], metadata: dict | None = None) -> tuple[int, str]:
    """``write_safetensors`` that also returns the sha256 of the bytes written."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, tensor in entries:
        size = _nbytes(tensor)
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".writing"
    try:
        with HashingFile(tmp) as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for _, tensor in entries:
                flat = tensor.detach().reshape(-1).contiguous().cpu()
                if flat.numel():
                    f.write(flat.view(torch.uint8).numpy().data)
                del flat
            digest = f.close()
    except BaseException:   # a full disk, an interrupt: no half-written file stays behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)
    return 8 + len(raw) + offset, digest


class _Lazy:
    """Shape/dtype of a tensor inside a part file, readable on demand."""

    def __init__(self, path: str, name: str, handle):
        self.path, self.name = path, name
        sl = handle.get_slice(name)
        self.shape = torch.Size(sl.get_shape())
        self.dtype = SAFETENSORS_DTYPES[sl.get_dtype()]

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def numel(self) -> int:
        return self.shape.numel()

    def detach(self) -> torch.Tensor:
        with safe_open(self.path, "pt") as f:
            return f.get_tensor(self.name)


class ShardWriter:
    """Buffers tensor groups and writes size-capped safetensors shards into ``folder``."""

    def __init__(self, folder: str, prefix: str = "model", max_shard_size: int = 2 * GiB):
        if max_shard_size <= 0:
            raise BlockquantError(f"max_shard_size must be positive (got {max_shard_size})")
        self.folder, self.prefix, self.max_shard_size = folder, prefix, int(max_shard_size)
        os.makedirs(folder, exist_ok=True)
        # One entry per shard, the last one open: {"tensors": {name: nbytes}, "parts": [file, ...],
        # "sums": [sha256 of each part], "sum": sha256 of the finished shard file (None until written)}.
        self.shards: list[dict] = [_new_shard()]
        self.buffer: dict[str, torch.Tensor] = {}
        self.names: set[str] = set()
        self.finished = False

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _part_file(self, k: int, p: int) -> str:
        return f"{self.prefix}.shard-{k + 1:05d}.part-{p + 1:04d}.tmp"

    def open_size(self) -> int:
        """Tensor bytes in the shard being filled (flushed parts plus the buffer)."""
        return sum(self.shards[-1]["tensors"].values()) + sum(map(_nbytes, self.buffer.values()))

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Queue one group of tensors; a group always lands in one shard."""
        if self.finished:
            raise BlockquantError("ShardWriter.add after finish()")
        clash = sorted(n for n in tensors if n in self.names or n in self.buffer)
        if clash:
            raise BlockquantError(f"tensor name(s) written twice: {', '.join(clash[:5])}")
        unsupported = sorted(n for n, t in tensors.items() if t.dtype not in _DTYPES)
        if unsupported:
            raise BlockquantError(f"cannot write dtype {tensors[unsupported[0]].dtype} ({unsupported[0]})")
        size = sum(map(_nbytes, tensors.values()))
        if self.open_size() and self.open_size() + size > self.max_shard_size:
            self._close_shard()
        seen = {t.untyped_storage().data_ptr() for t in self.buffer.values() if t.numel()}
        for name, t in tensors.items():
            t = t.detach().to("cpu")
            if t.numel() and t.untyped_storage().data_ptr() in seen:
                t = t.clone()   # a safetensors file holds no shared storage
            seen.add(t.untyped_storage().data_ptr())
            self.buffer[name] = t.contiguous()
        if self.open_size() >= self.max_shard_size:
            self._close_shard()

    def flush(self) -> None:
        """Write buffered tensors to a part file of the open shard and drop them from memory."""
        if not self.buffer:
            return
        shard = self.shards[-1]
        name = self._part_file(len(self.shards) - 1, len(shard["parts"]))
        entries = _order(self.buffer.items())
        _, digest = write_hashed(self._path(name), entries)
        shard["parts"].append(name)
        shard["sums"].append(digest)
        for n, t in entries:
            shard["tensors"][n] = _nbytes(t)
        self.names.update(self.buffer)
        self.buffer = {}

    def _close_shard(self) -> None:
        self.flush()
        if self.shards[-1]["tensors"]:
            self.shards.append(_new_shard())

    def state(self) -> dict:
        """JSON-serialisable progress (flushes first): each shard's tensors (name: bytes), part files and checksums."""
        self.flush()
        return {"version": STATE_VERSION, "prefix": self.prefix, "max_shard_size": self.max_shard_size,
                "shards": [_copy_shard(s) for s in self.shards]}

    @classmethod
    def resume(cls, folder: str, prefix: str, max_shard_size: int, state: dict) -> "ShardWriter":
        """Continue from ``state``: every file it records is checked against its checksum; files written
        after that state was taken are deleted."""
        if state.get("version") != STATE_VERSION or state.get("prefix") != prefix \
                or state.get("max_shard_size") != max_shard_size:
            raise ModelFileError("the shard state was recorded by another version or with other settings; "
                                 "pass --fresh to start over")
        writer = cls(folder, prefix, max_shard_size)
        writer.shards = [_copy_shard(s) for s in state["shards"]]
        names = writer._final_names()
        keep = set()
        for k, shard in enumerate(writer.shards):
            writer.names.update(shard["tensors"])
            if k < len(names) and file_matches(writer._path(names[k]), shard["sum"]):
                keep.add(names[k])
                continue
            for part, sha in zip(shard["parts"], shard["sums"]):
                check_file(writer._path(part), sha, DAMAGED)
                keep.add(part)
        for stray in glob.glob(writer._path(f"{glob.escape(prefix)}.shard-*.tmp*")):
            if os.path.basename(stray) not in keep:
                os.remove(stray)
        return writer

    def _final_names(self) -> list[str]:
        n = len([s for s in self.shards if s["tensors"]])
        return [f"{self.prefix}.safetensors"] if n == 1 else \
            [f"{self.prefix}-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]

    def _write_shard(self, shard: dict, name: str, saved) -> None:
        """Shard file ``name`` from its verified parts; its checksum is recorded (``saved``) before the
        parts go, so an interruption anywhere leaves either the parts or the recorded shard."""
        parts, path = shard["parts"], self._path(name)
        for part, sha in zip(parts, shard["sums"]):
            check_file(self._path(part), sha, DAMAGED)
        if len(parts) == 1:   # a lone part is already the shard
            shard["sum"] = shard["sums"][0]
            saved(self.state())
            os.replace(self._path(parts[0]), path)
            return
        pending = {}
        for part in parts:
            part_path = self._path(part)
            with safe_open(part_path, "pt") as handle:
                for tensor in handle.keys():
                    pending[tensor] = _Lazy(part_path, tensor, handle)
        shard["sum"] = write_hashed(path, _order(pending.items()))[1]
        saved(self.state())
        for part in parts:
            os.remove(self._path(part))

    def finish(self, saved=lambda state: None) -> list[str]:
        """Write the shards under their final names and the index; returns the file names.

        ``saved(state)`` is called whenever a shard is finished, to record progress: a finish
        interrupted anywhere continues from the last recorded state.  Final-named files of this
        prefix from an earlier export in the folder are removed."""
        if self.finished:
            raise BlockquantError("ShardWriter.finish() called twice")
        self._close_shard()
        self.finished = True
        shards = [s for s in self.shards if s["tensors"]]
        names = self._final_names() if shards else []
        index = self._path(f"{self.prefix}.safetensors.index.json")
        for old in glob.glob(self._path(f"{glob.escape(self.prefix)}-*-of-*.safetensors")) + [
                self._path(f"{self.prefix}.safetensors"), index]:
            if os.path.exists(old) and os.path.basename(old) not in names:
                os.remove(old)
        for shard, name in zip(shards, names):
            if file_matches(self._path(name), shard["sum"]):
                for part in shard["parts"]:   # left over when a run stopped right after the shard was recorded
                    if os.path.exists(self._path(part)):
                        os.remove(self._path(part))
                continue
            self._write_shard(shard, name, saved)
        if len(shards) > 1:
            weight_map = {t: name for shard, name in zip(shards, names) for t in shard["tensors"]}
            total = sum(size for shard in shards for size in shard["tensors"].values())
            doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            with open(index + ".writing", "w") as f:
                json.dump(doc, f, indent=2, sort_keys=True)
                f.write("\n")
            os.replace(index + ".writing", index)
            names = names + [os.path.basename(index)]
        return names


DAMAGED = "the run's written parts cannot be trusted; pass --fresh to start over"


def _new_shard() -> dict:
    return {"tensors": {}, "parts": [], "sums": [], "sum": None}


def _copy_shard(s: dict) -> dict:
    return {"tensors": dict(s["tensors"]), "parts": list(s["parts"]), "sums": list(s["sums"]), "sum": s["sum"]}
