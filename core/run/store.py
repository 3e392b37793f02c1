"""The capture store: the first block's inputs of one block group, kept as compactly as the data allows.

- streams (``hidden_states``, and whatever ``block_outputs`` returns) per sample;
- kwargs identical for all samples once (``shared``);
- the other kwargs per sample;
- kwargs that vary per block and are not rebuilt by the adapter, per block and sample (fallback);
- values the adapter recorded at capture (``extras``) per sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..frame.contract import SampleInputs


def same_value(a: Any, b: Any) -> bool:
    """Equality used to detect shared and variable inputs (tensors: shape, dtype and values)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return False
        if a.device.type == "meta":
            return False
        return bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (int, float, str, bool, type(None))) and isinstance(b, (int, float, str, bool, type(None))):
        return a == b
    return False


@dataclass
class GroupState:
    """Where the block loop stands in one group: the next chain position, and per sample the two replay
    streams (fp targets and the quantized chain) with each stream's adapter state (``cached.state``)."""

    position: int
    fp: list[dict]
    quant: list[dict]
    fp_states: list[dict]
    quant_states: list[dict]

    @classmethod
    def start(cls, store: "GroupStore") -> "GroupState":
        streams = [None if s is None else dict(s) for s in store.streams]   # None: another rank's sample
        n = len(streams)
        return cls(0, streams, streams, [{} for _ in range(n)], [{} for _ in range(n)])

    def streams(self) -> dict:
        """What resume saves (everything but the position)."""
        return {"fp": self.fp, "quant": self.quant, "fp_states": self.fp_states, "quant_states": self.quant_states}


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


@dataclass
class GroupStore:
    """Captured inputs of one block group's first block."""

    stream_keys: tuple[str, ...] = ("hidden_states",)
    shared: dict[str, Any] = field(default_factory=dict)
    per_sample: list[dict[str, Any]] = field(default_factory=list)
    streams: list[dict[str, Any]] = field(default_factory=list)
    extras: list[dict[str, Any]] = field(default_factory=list)
    per_block: dict[int, list[dict[str, Any]]] = field(default_factory=dict)   # chain position -> samples
    fixed_shared: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.streams)

    def add(self, kwargs: dict[str, Any], extras: dict[str, Any]) -> int:
        """Store one sample's first-block kwargs; returns its index."""
        index = len(self.streams)
        self.streams.append({k: kwargs[k] for k in self.stream_keys if k in kwargs})
        rest = {k: v for k, v in kwargs.items() if k not in self.stream_keys}
        if index == 0:
            self.shared = dict(rest)
            self.per_sample.append({})
        else:
            own: dict[str, Any] = {}
            for key, value in rest.items():
                if key in self.shared:
                    if key in self.fixed_shared or same_value(self.shared[key], value):
                        continue
                    # first difference: the key becomes per-sample for every earlier sample too
                    old = self.shared.pop(key)
                    for earlier in self.per_sample:
                        earlier[key] = old
                own[key] = value
            for earlier_key in list(self.shared):
                if earlier_key not in rest:   # a key missing from this sample is not shared
                    old = self.shared.pop(earlier_key)
                    for earlier in self.per_sample:
                        earlier[earlier_key] = old
            self.per_sample.append(own)
        self.extras.append(dict(extras))
        return index

    def add_block_value(self, position: int, sample: int, key: str, value: Any) -> None:
        samples = self.per_block.setdefault(position, [])
        while len(samples) <= sample:
            samples.append({})
        samples[sample][key] = value

    def kwargs(self, sample: int) -> dict[str, Any]:
        """The sample's first-block kwargs without the streams."""
        out = dict(self.shared)
        out.update(self.per_sample[sample])
        return out

    def block_kwargs(self, position: int, sample: int) -> dict[str, Any]:
        samples = self.per_block.get(position)
        return dict(samples[sample]) if samples and sample < len(samples) else {}

    def sample_inputs(self, sample: int, state: dict, stream: str) -> SampleInputs:
        kwargs = self.kwargs(sample)
        kwargs.update(self.streams[sample])
        return SampleInputs(index=sample, kwargs=kwargs, extras=self.extras[sample], state=state, stream=stream)

    def place(self, positions: list[int], total: int) -> None:
        """Renumber the samples held here as samples ``positions`` of ``total`` (a data-parallel rank's
        share); the places of the other ranks' samples hold None (streams, per-sample, extras)."""
        def spread(values, empty):
            out = [empty() for _ in range(total)]
            for position, value in zip(positions, values):
                out[position] = value
            return out

        self.streams = spread(self.streams, lambda: None)
        self.per_sample = spread(self.per_sample, lambda: None)
        self.extras = spread(self.extras, lambda: None)
        self.per_block = {k: spread(v, dict) for k, v in self.per_block.items()}

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by part; a tensor referenced several times counts once."""
        seen: set[tuple[int, int]] = set()

        def count(values) -> int:
            total = 0
            for value in values:
                for t in _tensors(value):
                    if t.device.type == "meta":
                        continue
                    key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                    if key in seen:
                        continue
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
            return total

        parts = {
            "streams": count(s for sample in self.streams if sample is not None for s in sample.values()),
            "shared": count(self.shared.values()),
            "per_sample": count(v for sample in self.per_sample if sample is not None for v in sample.values()),
            "per_block": count(v for samples in self.per_block.values() for s in samples for v in s.values()),
            "extras": count(v for sample in self.extras if sample is not None for v in sample.values()),
        }
        parts["total"] = sum(parts.values())
        return parts
