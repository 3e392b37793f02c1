"""One run per output folder: ``OUT.lock`` holds an exclusive ``flock`` while a run writes OUT.

The file names the holder (pid, host, start time).  A second run on the same output is refused at
once, naming the running one.  The kernel drops a ``flock`` when its process dies (a kill, a crash),
so a lock file left behind by a dead run on this host is taken over with a note.  A lock file written
on another host (a shared file system, where ``flock`` may not reach across machines) is refused: only
the user can tell whether that run is still going.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time

from ..errors import UsageError

log = logging.getLogger("blockquant")


def _describe(info: dict) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {when}"


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        info = json.loads(raw or b"{}")
    except ValueError:
        return {"pid": "?", "host": "?"}
    return info if isinstance(info, dict) else {"pid": "?", "host": "?"}


class OutputLock:
    """An acquired lock on ``OUT.lock``; ``release`` (or leaving the ``with`` block) frees it."""

    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, output_dir: str) -> "OutputLock":
        path = output_dir.rstrip("/") + ".lock"
        host = socket.gethostname()
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UsageError(f"cannot create the lock file {path} ({e.strerror}); choose another --output_dir") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read(fd)
                os.close(fd)
                raise UsageError(f"another run is writing {output_dir} ({_describe(info)}); wait for it to end or "
                                 "choose another --output_dir") from None
            try:   # the holder may have removed the file between our open and our flock: lock the new one
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = _read(fd)
        if old:
            if old.get("host") not in (None, host):
                os.close(fd)
                raise UsageError(f"{path} was left by a run on another host ({_describe(old)}); if that run has "
                                 f"ended, delete {path} and re-run")
            log.warning("taking over the lock %s of an earlier run that is gone (%s)", path, _describe(old))
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": host, "started": time.time()}).encode())
        os.fsync(fd)
        return cls(path, fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)   # while still held: a waiting opener sees another inode and retries
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
