"""Checksums of the files a run writes: computed while writing, checked before a file is trusted again."""
from __future__ import annotations

import hashlib
import os

from ..errors import ModelFileError

CHUNK = 16 * 2 ** 20


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


def file_matches(path: str, sha: str | None) -> bool:
    return bool(sha) and os.path.isfile(path) and sha256_file(path) == sha


def check_file(path: str, sha: str | None, fix: str) -> None:
    """Refuse a file that is missing or whose bytes changed since its checksum was recorded."""
    if not os.path.isfile(path):
        raise ModelFileError(f"{path} is missing; {fix}")
    if not sha or sha256_file(path) != sha:
        raise ModelFileError(f"{path} is damaged (its checksum does not match the recorded one); {fix}")


class HashingFile:
    """A binary file opened for writing that hashes what is written (sequential writers only)."""

    def __init__(self, path: str):
        self.file = open(path, "wb")
        self.hash = hashlib.sha256()

    def write(self, data) -> int:
        self.hash.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> str:
        """fsync, close, and return the hex digest."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return self.hash.hexdigest()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.file.closed:
            self.file.close()
