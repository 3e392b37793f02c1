"""Capture: record the inputs of the first block of each block group during calibration forwards.

The forward stops (``StopForward``) as soon as every group's first block has been seen, so no
later block, norm or head runs.  On the first batch, a detection forward records every block's
inputs to find the kwargs that vary between blocks ("variable inputs").
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..model.blocks import Block, bind_inputs
from ..frame.contract import SampleInputs, Traits
from ..errors import ControlFlow, DataError
from ..resources.devices import to_device
from .store import GroupStore, same_value
from ..model.streaming import free_memory

log = logging.getLogger("blockquant")


class StopForward(ControlFlow):
    """Raised from a capture hook to end a forward early."""


@dataclass
class Calibration:
    """What ``pre_cache`` receives: the batches, and ways to record values and register hooks."""

    batches: list
    settings: Any = None
    loaded: Any = None
    batch: Any = None               # the calibration batch whose forward is running now
    _pending: dict = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    def record(self, key: str, value: Any) -> None:
        """Attach ``value`` to the next captured sample (reaches replay as ``cached.extras[key]``)."""
        self._pending[key] = value

    def hook(self, module: torch.nn.Module, fn: Callable, pre: bool = False, with_kwargs: bool = True):
        """Register a forward (pre-)hook that lives until capture ends."""
        if pre:
            handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
        else:
            handle = module.register_forward_hook(fn, with_kwargs=with_kwargs)
        self._handles.append(handle)
        return handle

    def take_pending(self) -> dict:
        pending, self._pending = self._pending, {}
        return pending

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _differs(a: Any, b: Any) -> bool:
    return not same_value(a, b)


@dataclass
class Detection:
    variable: list[set[str]]          # per group: kwargs that differ between blocks
    stream_keys: list[tuple[str, ...]]
    per_block: list[list[dict]]       # per group, per chain position: the first sample's kwargs


def detect(groups: list[list[Block]], run: Callable[[], None], stream_keys_of: Callable, stop: bool,
           calibration: Calibration) -> Detection:
    """Run one forward recording every block's kwargs; compare them with each group's first block."""
    records: list[list[dict | None]] = [[None] * len(g) for g in groups]
    outputs: dict[int, Any] = {}
    total = sum(len(g) for g in groups)
    seen = [0]
    extras: dict[int, dict] = {}
    handles = []

    def pre(g, block):
        def hook(module, args, kwargs):
            if records[g][block.ref.position] is None:
                if block.ref.position == 0:
                    extras[g] = calibration.take_pending()
                records[g][block.ref.position] = bind_inputs(module, args, kwargs)
                seen[0] += 1
            if stop and seen[0] == total:
                raise StopForward
        return hook

    def post(g, block):
        def hook(module, args, kwargs, output):
            outputs.setdefault(g, (output, records[g][0], extras.get(g, {})))
        return hook

    for g, chain in enumerate(groups):
        for block in chain:
            handles.append(block.module.register_forward_pre_hook(pre(g, block), with_kwargs=True, prepend=True))
        handles.append(chain[0].module.register_forward_hook(post(g, chain[0]), with_kwargs=True))
    try:
        with contextlib.suppress(StopForward):
            run()
    finally:
        for h in handles:
            h.remove()
    variable, streams = [], []
    for g, chain in enumerate(groups):
        first = records[g][0]
        if first is None:
            raise DataError(f"the calibration forward never reached block {chain[0].ref.name}; the calibration data "
                            "does not exercise this block group (a vision group needs images: pass --images)")
        keys = stream_keys_of(g, chain[0], outputs.get(g), first)
        streams.append(keys)
        differing: set[str] = set()
        for rec in records[g][1:]:
            if rec is None:
                continue
            for key in set(first) | set(rec):
                if key in keys:
                    continue
                if key not in first or key not in rec or _differs(first[key], rec[key]):
                    differing.add(key)
        variable.append(differing)
    return Detection(variable=variable, stream_keys=streams, per_block=records)


def capture(groups: list[list[Block]], batches: list, run_batch: Callable[[Any], None], calibration: Calibration,
            stores: list[GroupStore], cache_keys: list[set[str]], traits: Traits, cache_device) -> None:
    """Fill ``stores`` with every batch's first-block inputs (and per-block cached kwargs)."""
    state = {"captured": [0] * len(groups), "last_done": [True] * len(groups)}
    handles = []

    def finished() -> bool:
        return all(state["captured"]) and all(state["last_done"])

    def first_hook(g):
        def hook(module, args, kwargs):
            kw = to_device(bind_inputs(module, args, kwargs), cache_device)
            stores[g].add(kw, to_device(calibration.take_pending(), cache_device))
            state["captured"][g] = 1
            if cache_keys[g]:
                state["last_done"][g] = False
                _record_block(g, 0, kw)
            if traits.stop_after_capture and finished():
                raise StopForward
        return hook

    def _record_block(g, position, kw):
        sample = len(stores[g]) - 1
        for key in cache_keys[g]:
            if key in kw:
                stores[g].add_block_value(position, sample, key, kw[key])

    def later_hook(g, block, last):
        def hook(module, args, kwargs):
            kw = to_device(bind_inputs(module, args, kwargs), cache_device)
            _record_block(g, block.ref.position, {k: kw[k] for k in cache_keys[g] if k in kw})
            if last:
                state["last_done"][g] = True
                if traits.stop_after_capture and finished():
                    raise StopForward
        return hook

    for g, chain in enumerate(groups):
        handles.append(chain[0].module.register_forward_pre_hook(first_hook(g), with_kwargs=True, prepend=True))
        if cache_keys[g]:
            for block in chain[1:]:
                handles.append(block.module.register_forward_pre_hook(
                    later_hook(g, block, block is chain[-1]), with_kwargs=True, prepend=True))
    try:
        for batch in batches:
            state["captured"] = [0] * len(groups)
            state["last_done"] = [True] * len(groups)
            with torch.no_grad(), contextlib.suppress(StopForward):
                run_batch(batch)
            if torch.cuda.is_available():
                free_memory()
    finally:
        for h in handles:
            h.remove()
    for g, chain in enumerate(groups):
        if not len(stores[g]):
            raise DataError(
                f"calibration never reached block {chain[0].ref.name}: the inputs did not exercise this block group "
                "(a vision group needs image calibration data: pass --images)"
            )


def stream_keys_from_output(hook_block_outputs) -> Callable:
    """Build the stream-key finder used by ``detect``: the keys ``block_outputs`` returns."""

    def find(g, block, recorded, first_kwargs) -> tuple[str, ...]:
        if recorded is None:
            return ("hidden_states",)
        output, kwargs, extras = recorded
        cached = SampleInputs(index=0, kwargs=dict(kwargs), extras=extras, state={}, stream="fp")
        result = hook_block_outputs(block=block.module, index=block.ref, output=output, inputs=kwargs, cached=cached)
        return tuple(result) if result else ("hidden_states",)

    return find
