"""One forward for samples that carry a mutable per-sample state through the block's layers.

Some blocks take a mapping that their layers write into and later layers read from within the same
forward, for example keys and values one attention layer stores for the layers that reuse them.  Each
sample has its own mapping (its own stored keys and values), so these kwargs are different objects per
sample and plain collation cannot join them: such samples would run one by one.

For the kwargs an adapter names in ``Traits.sample_state``, a collated forward gets one ``BatchedState``
view over the samples' mappings instead:

- reading a key concatenates the samples' values (a tensor, or a tuple of tensors, with one row each)
  along the first dimension, in sample order - what a batched layer would have stored itself;
- a value written during the forward is kept in the view (and read back from it), and only once the
  forward has returned does ``commit_states`` split it into rows and write row ``i`` into sample ``i``'s
  mapping; every sample's mapping then holds exactly what its own forward would have written, and
  whatever reads it per sample afterwards (the adapter's ``block_outputs``) is unchanged;
- ``.to(device)`` moves the values in place and returns the view (dispatch hooks call it instead of
  rebuilding the mapping).

Samples of different lengths (a right-padded forward, padding.py) get a view that knows each sample's
length: a value read is padded with zeros at the end of every dimension whose size differs between the
samples (which must be their lengths: the keys/values of each sample's tokens), and a value written is cut
back to each sample's length along its one dimension as long as the longest sample.  The padded positions
are hidden by the padded attention mask, and the first padded forward of every block is checked against
the sample-by-sample forward, its outputs and what it stored (``Replayer._padded``).

Reading a key that some samples lack, or whose values the samples cannot share (shapes that differ
otherwise), and a written value whose token dimension cannot be told apart, raise ``NotJoined``; nothing
has been written into the samples' mappings then, and ``Replayer`` runs the block's samples one by one
from then on.
"""
from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Iterator

import torch

from .padding import NoPad, pad_tensors


class NotJoined(Exception):
    """The samples' state values cannot be read as one batch."""


def _joined(values: list[Any], lengths: list[int] | None) -> Any:
    """The samples' values (tensors with one row, or tuples of them) concatenated along the rows; with
    ``lengths``, padded at the end of each dimension whose size differs (it must be the samples' lengths),
    without, no dimension may differ.  Raises NoPad otherwise."""
    first = values[0]
    if isinstance(first, torch.Tensor) and all(isinstance(v, torch.Tensor) for v in values):
        return torch.cat(pad_tensors(values, lengths or [-1] * len(values)), dim=0)   # -1: matches no size
    if isinstance(first, tuple) and all(isinstance(v, tuple) and len(v) == len(first) for v in values):
        return tuple(_joined([v[i] for v in values], lengths) for i in range(len(first)))
    raise NoPad


def _row(value: Any, i: int, length: int | None = None, longest: int | None = None) -> Any:
    """Sample ``i``'s row of a batched value, cut back to ``length`` along its one dim of size ``longest``,
    in storage of its own: a view would keep the whole batch's tensor alive for as long as any one sample
    holds its row (states outlive the forward, and the tuning loop replaces them a mini-batch at a time)."""
    if isinstance(value, tuple):
        return tuple(_row(v, i, length, longest) for v in value)
    row = value[i:i + 1]
    if length is not None and length != longest:
        dims = [d for d in range(1, row.dim()) if row.shape[d] == longest]
        if len(dims) > 1:
            raise NotJoined(f"a written state of shape {tuple(row.shape)} has several dimensions as long as the "
                            f"longest sample ({longest})")
        row = row.narrow(dims[0], 0, length) if dims else row
    return row.clone()


def _moved(value: Any, device, non_blocking: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    return tuple(_moved(v, device, non_blocking) for v in value)


class BatchedState(MutableMapping):
    """The view one collated forward gets in place of its samples' state mappings (module docstring)."""

    def __init__(self, parts: list[MutableMapping], lengths: list[int] | None = None):
        self.parts = parts
        self.lengths = lengths      # each sample's length in a right-padded forward; None: stacked as they are
        self.written: dict = {}     # batched values the forward wrote, committed per sample afterwards

    @classmethod
    def join(cls, parts: list[Any], lengths: list[int] | None = None) -> "BatchedState | None":
        return cls(parts, lengths) if all(isinstance(p, MutableMapping) for p in parts) else None

    def __getitem__(self, key):
        if key in self.written:
            return self.written[key]
        if not all(key in p for p in self.parts):
            raise NotJoined(f"state {key!r} is held by only some of the samples")
        try:
            return _joined([p[key] for p in self.parts], self.lengths)
        except NoPad:
            raise NotJoined(f"state {key!r} differs in shape between the samples"
                            + (" otherwise than by their lengths" if self.lengths else "")) from None

    def __setitem__(self, key, value) -> None:
        self.written[key] = value

    def __delitem__(self, key) -> None:
        raise NotJoined(f"the block deletes state {key!r}")

    def _keys(self) -> list:
        common = [k for k in self.parts[0] if all(k in p for p in self.parts[1:])]
        return list(self.written) + [k for k in common if k not in self.written]

    def __iter__(self) -> Iterator:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def to(self, device, non_blocking: bool = False) -> "BatchedState":
        for part in self.parts:
            for key in list(part):
                part[key] = _moved(part[key], device, non_blocking)
        for key in list(self.written):
            self.written[key] = _moved(self.written[key], device, non_blocking)
        return self

    def rows(self) -> dict:
        """Each written value split into the samples' rows, cut back to each sample's length (may raise
        ``NotJoined``; nothing is written)."""
        longest = max(self.lengths) if self.lengths else None
        return {key: [_row(value, i, self.lengths[i] if self.lengths else None, longest)
                      for i in range(len(self.parts))] for key, value in self.written.items()}

    def write(self, rows: dict) -> list[tuple[MutableMapping, Any]]:
        """Write ``rows`` (from ``rows()``) into the samples' mappings; returns the (mapping, key) pairs."""
        done = []
        for key, values in rows.items():
            for part, value in zip(self.parts, values):
                part[key] = value
                done.append((part, key))
        self.written.clear()
        return done


def commit_states(kwargs: dict) -> list[tuple[MutableMapping, Any]]:
    """After a collated or padded forward returned: write what its ``BatchedState`` views hold into the
    samples' mappings, all or nothing; returns the (mapping, key) pairs written."""
    planned = [(v, v.rows()) for v in kwargs.values() if isinstance(v, BatchedState)]
    return [pair for view, rows in planned for pair in view.write(rows)]
