"""Replay: run one block on captured samples, as the model's own forward would have run it.

Used for fp targets, for tuning's loss, for the quantized stream, and by ``quant verify``.  A
sample's kwargs are its first-block kwargs + per-block cached kwargs + the current streams, then
whatever the adapter's ``replay_inputs`` rebuilds.  Samples are collated into one forward when
their kwargs allow it (tensors with a leading dim of one row and equal shapes; kwargs the adapter declares
shared, when equal; per-sample state mappings the adapter names, through a view (sample_state.py);
everything else the same object); samples of different lengths are right-padded (padding.py), and samples
of blocks that take packed sequences are concatenated (packed_samples.py); otherwise they run one by one.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from ..model.blocks import Block
from .packed_samples import pack_collate
from .padding import agree, pad_collate, split_output
from .sample_state import BatchedState, NotJoined, commit_states
from .store import GroupStore, same_value

log = logging.getLogger("blockquant")


def cast(value: Any, device, dtype) -> Any:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and dtype is not None:
            return value.to(device=device, dtype=dtype)
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(cast(v, device, dtype) for v in value)
    if isinstance(value, list):
        return [cast(v, device, dtype) for v in value]
    if type(value) is dict:
        return {k: cast(v, device, dtype) for k, v in value.items()}
    return value


def _collate(values: list[Any]) -> tuple[bool, Any]:
    first = values[0]
    if all(v is first for v in values):
        return True, first
    if all(isinstance(v, torch.Tensor) for v in values):
        if first.dim() > 0 and first.shape[0] == 1 and all(v.shape == first.shape for v in values):
            return True, torch.cat(values, dim=0)
        return False, None
    if all(isinstance(v, tuple) for v in values) and len({len(v) for v in values}) == 1:
        parts = [_collate([v[i] for v in values]) for i in range(len(first))]
        return all(ok for ok, _ in parts), tuple(p for _, p in parts)
    return False, None


def collate(samples: list[dict], state_keys: tuple[str, ...] = (), shared_keys: tuple[str, ...] = ()) -> dict | None:
    """One forward's kwargs for ``samples``, or None; ``state_keys``: Traits.sample_state (sample_state.py);
    ``shared_keys``: Traits.shared_keys, taken from the first sample where every sample's value is equal
    (``cast`` copies plain dicts per sample: an options dict the samples share is equal, not identical)."""
    keys = set(samples[0])
    if any(set(s) != keys for s in samples):
        return None
    out = {}
    for key in keys:
        values = [s[key] for s in samples]
        if key in shared_keys and all(same_value(v, values[0]) for v in values[1:]):
            out[key] = values[0]
            continue
        ok, value = _collate(values)
        if not ok and key in state_keys:
            value = BatchedState.join(values)
            ok = value is not None
        if not ok:
            return None
        out[key] = value
    return out


class Replayer:
    """Runs blocks of one group on its captured samples."""

    def __init__(self, hook, store: GroupStore, device, dtype, max_batch: int | None = None, pad: bool = False,
                 pack: dict[str, str | None] | None = None, state: tuple[str, ...] = (), shared: tuple[str, ...] = ()):
        self.hook = hook            # the plugin manager's hook relay
        self.store = store
        self.device = device
        self.dtype = dtype
        self.max_batch = max_batch
        self.pad = pad              # samples of different lengths share a padded or packed forward
        self.pack = pack or {}      # Traits.pack_boundaries (packed_samples.py)
        self.state = tuple(state)   # Traits.sample_state (sample_state.py)
        self.shared = tuple(shared)  # Traits.shared_keys: equal for every sample
        self.collatable: dict[int, bool] = {}   # block number -> did collation work
        self.paddable: dict[int, bool] = {}     # block number -> did padding/packing give the sample-by-sample outputs
        self.compiled: dict[int, Any] = {}      # block number -> what runs it instead of the module (torch.compile)

    def sample_kwargs(self, block: Block, i: int, streams: dict, state: dict, stream: str):
        kwargs = self.store.kwargs(i)
        kwargs.update(self.store.block_kwargs(block.ref.position, i))
        kwargs.update(streams)
        cached = self.store.sample_inputs(i, state, stream)
        rebuilt = self.hook.replay_inputs(block=block.module, index=block.ref, cached=cached)
        if rebuilt:
            kwargs.update(rebuilt)
        return cast(kwargs, self.device, self.dtype), cached

    def run(self, block: Block, streams: list[dict], states: list[dict], stream: str,
            indices: list[int] | None = None, batch: int = 1) -> list[dict]:
        """Run ``block`` on samples ``indices``; returns each sample's output streams (block_outputs).

        Data-parallel runs: a sample whose stream is None is another rank's; it is skipped and its
        output is None (see resources/distributed.py)."""
        indices = list(range(len(streams))) if indices is None else indices
        held = [i for i in indices if streams[i] is not None]
        if self.max_batch:
            batch = min(batch, self.max_batch)
        results: list[dict] = []
        for start in range(0, len(held), max(batch, 1)):
            chunk = held[start:start + max(batch, 1)]
            prepared = [self.sample_kwargs(block, i, streams[i], states[i], stream) for i in chunk]
            results.extend(self._forward(block, prepared))
        if len(held) == len(indices):
            return results
        out = dict(zip(held, results))
        return [out.get(i) for i in indices]

    def _module(self, block: Block):
        return self.compiled.get(block.ref.number, block.module)

    def _forward(self, block: Block, prepared: list[tuple[dict, Any]]) -> list[dict]:
        number = block.ref.number
        joined = collate([kw for kw, _ in prepared], self.state, self.shared) \
            if len(prepared) > 1 and self.collatable.get(number, True) else None
        if joined is not None:
            try:
                output = self._module(block)(**joined)
            except NotJoined as reason:    # a state value the samples cannot share (sample_state.py)
                log.info("block %s: %s; its samples run one by one", block.ref.name, reason)
                joined = None
        if joined is None:
            if len(prepared) > 1:
                self.collatable[number] = False
                if self.pad and self.paddable.get(number, True):
                    padded = self._padded(block, prepared)
                    if padded is not None:
                        return padded
            return [self._outputs(block, self._module(block)(**kw), kw, cached) for kw, cached in prepared]
        commit_states(joined)
        rows = [1] * len(prepared)   # collation only joins one-row samples
        pieces = split_output(output, rows)
        return [self._outputs(block, piece, kw, cached) for piece, (kw, cached) in zip(pieces, prepared)]

    def _padded(self, block: Block, prepared: list[tuple[dict, Any]]) -> list[dict] | None:
        """One right-padded (padding.py) or packed (packed_samples.py) forward, each sample's output cut back to
        its own tokens; None where the samples can be neither.  The first such forward of a block is checked
        against the sample-by-sample forward, its outputs and the state it wrote (sample_state.py); where they
        differ, the block runs sample by sample from then on."""
        samples = [kw for kw, _ in prepared]
        joined = self._pad_or_pack(samples)
        if joined is None:
            return None
        number = block.ref.number
        try:
            if number not in self.paddable:
                with torch.no_grad():
                    pieces = joined.pieces(self._module(block)(**joined.kwargs))
                    written = commit_states(joined.kwargs)
                    stored = [part[key] for part, key in written]
                    alone = [self._module(block)(**kw) for kw in samples]
                    own = [part[key] for part, key in written]
                self.paddable[number] = all(agree(p, a, self.dtype) for p, a in zip(pieces + stored, alone + own))
                if not self.paddable[number]:
                    log.info("block %s: one forward for samples of different lengths does not reproduce the "
                             "sample-by-sample outputs; its samples run one by one", block.ref.name)
                    return None
                if not torch.is_grad_enabled():
                    return [self._outputs(block, p, kw, cached) for p, (kw, cached) in zip(pieces, prepared)]
            pieces = joined.pieces(self._module(block)(**joined.kwargs))
            commit_states(joined.kwargs)
        except NotJoined as reason:    # a state the samples cannot share (sample_state.py)
            log.info("block %s: %s; its samples run one by one", block.ref.name, reason)
            self.paddable[number] = False
            return None
        return [self._outputs(block, p, kw, cached) for p, (kw, cached) in zip(pieces, prepared)]

    def _pad_or_pack(self, samples: list[dict]):
        """The samples joined into one padded or packed forward, or None.  A state kwarg (Traits.sample_state)
        that differs between the samples becomes a view that pads what the layers read (sample_state.py);
        packed samples carry no such state."""
        state = [k for k in self.state if k in samples[0] and any(s[k] is not samples[0][k] for s in samples)]
        plain = [{k: v for k, v in s.items() if k not in state} for s in samples] if state else samples
        joined = pad_collate(plain, self.store.stream_keys)
        if joined is None:
            return None if state else pack_collate(samples, self.store.stream_keys, self.pack)
        for key in state:
            view = BatchedState.join([s[key] for s in samples], joined.lengths)
            if view is None:
                return None
            joined.kwargs[key] = view
        return joined

    def _outputs(self, block: Block, output: Any, kwargs: dict, cached) -> dict:
        streams = self.hook.block_outputs(block=block.module, index=block.ref, output=output, inputs=kwargs, cached=cached)
        return streams


def stream_loss(outputs: list[dict], targets: list[dict]) -> torch.Tensor:
    """Mean squared error over every stream of every sample (the tuning loss)."""
    total, count = stream_sse(outputs, targets)
    return total / max(count, 1)


def stream_sse(outputs: list[dict | None], targets: list[dict | None]) -> tuple[torch.Tensor | None, int]:
    """Sum of squared errors over every stream of every sample, and the number of elements
    (samples with output None - another rank's - are skipped)."""
    total, count = None, 0
    for out, target in zip(outputs, targets):
        if out is None:
            continue
        for key, value in out.items():
            ref = target[key].to(value.device, value.dtype)
            loss = torch.nn.functional.mse_loss(value.float(), ref.float(), reduction="sum")
            total = loss if total is None else total + loss
            count += value.numel()
    return total, count
