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

Reading a key that some samples lack, or whose values differ in shape between samples, raises
``NotJoined``; the forward had written nothing into the samples' mappings yet, and ``Replayer`` runs the
block's samples one by one from then on.
"""
from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Iterator

import torch


class NotJoined(Exception):
    """The samples' state values cannot be read as one batch."""


def _join(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values, dim=0)
    return tuple(_join([v[i] for v in values]) for i in range(len(first)))


def _row(value: Any, i: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[i:i + 1]
    return tuple(_row(v, i) for v in value)


def _shapes(value: Any) -> list[tuple] | None:
    """The shapes of ``value``'s tensors where each has one row, else None."""
    if isinstance(value, torch.Tensor):
        return [tuple(value.shape)] if value.dim() > 0 and value.shape[0] == 1 else None
    if isinstance(value, tuple) and value:
        shapes = [_shapes(v) for v in value]
        return None if any(s is None for s in shapes) else [s for part in shapes for s in part]
    return None


def _moved(value: Any, device, non_blocking: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    return tuple(_moved(v, device, non_blocking) for v in value)


class BatchedState(MutableMapping):
    """The view one collated forward gets in place of its samples' state mappings (module docstring)."""

    def __init__(self, parts: list[MutableMapping]):
        self.parts = parts
        self.written: dict = {}     # batched values the forward wrote, committed per sample afterwards

    @classmethod
    def join(cls, parts: list[Any]) -> "BatchedState | None":
        return cls(parts) if all(isinstance(p, MutableMapping) for p in parts) else None

    def __getitem__(self, key):
        if key in self.written:
            return self.written[key]
        if not all(key in p for p in self.parts):
            raise NotJoined(f"state {key!r} is held by only some of the samples")
        values = [p[key] for p in self.parts]
        shapes = [_shapes(v) for v in values]
        if shapes[0] is None or any(s != shapes[0] for s in shapes):
            raise NotJoined(f"state {key!r} differs in shape between the samples")
        return _join(values)

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

    def commit(self) -> None:
        """Write row ``i`` of every value the forward wrote into sample ``i``'s mapping."""
        for key, value in self.written.items():
            for i, part in enumerate(self.parts):
                part[key] = _row(value, i)
        self.written.clear()


def commit_states(kwargs: dict) -> None:
    """After a collated forward returned: commit the writes of its ``BatchedState`` views."""
    for value in kwargs.values():
        if isinstance(value, BatchedState):
            value.commit()
