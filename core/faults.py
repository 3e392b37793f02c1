"""Test-only fault injection: kill the run at a named, recorded step.

``BLOCKQUANT_FAULT=NAME`` (or ``NAME:N``) makes the process SIGKILL itself the first (N-th) time it
passes the point ``NAME``.  The points sit where a run records its progress (calibration forwards,
each block's part file and resume state, each export step, the final rename), so a test can kill a
run at any of them deterministically and check that the re-run resumes to the same bytes
(tests/test_kill_anywhere.py).  Unset, as in every real run, ``point`` does nothing.
"""
from __future__ import annotations

import os
import signal

ENV = "BLOCKQUANT_FAULT"
_hits: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    wanted, _, nth = spec.partition(":")
    if wanted != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
