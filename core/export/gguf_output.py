"""GGUF output (placeholder, filled in below)."""
from __future__ import annotations


class GgufOutput:
    def __init__(self, fmt, folder, run, state):
        raise NotImplementedError
