"""Keyword arguments that must reach dispatched layers by reference.

Some models hand one mutable ``dict`` to every layer of a forward and let layers write into it for later
layers to read (for example keys and values shared between layers).  accelerate's dispatch hooks move
every kwarg with ``send_to_device``, which rebuilds a plain ``dict`` (``type(d)({...})``): each dispatched
layer gets a copy, and the writes are lost.  ``pass_by_reference(layers, key)`` registers a forward
pre-hook that wraps such a dict in ``InPlaceDict``, a view over the same storage whose ``.to()`` moves its
tensors in place and returns itself - which accelerate calls instead of copying.  Torch pre-hooks run
before accelerate's wrapped forward and survive ``remove_hook_from_submodules``; applying it twice
registers nothing new.
"""
from __future__ import annotations

import functools
from collections import UserDict


class InPlaceDict(UserDict):
    """A view of a dict (same storage) that device moves update in place."""

    def __init__(self, data: dict):
        super().__init__()
        self.data = data

    def to(self, device, non_blocking: bool = False) -> "InPlaceDict":
        for key in list(self.data):
            value = self.data[key]
            moved = [t.to(device, non_blocking=non_blocking) for t in (value if isinstance(value, tuple) else (value,))]
            self.data[key] = tuple(moved) if isinstance(value, tuple) else moved[0]
        return self


@functools.lru_cache(maxsize=None)
def by_reference_hook(key: str):
    """The pre-hook that wraps a plain-dict kwarg ``key`` (one function object per key: idempotence)."""
    def hook(module, args, kwargs):
        value = kwargs.get(key)
        if type(value) is dict:
            kwargs[key] = InPlaceDict(value)
            return args, kwargs
        return None

    hook.__qualname__ = f"by_reference_hook[{key}]"
    return hook


def pass_by_reference(layers, key: str) -> int:
    """Make ``layers`` receive a plain-dict kwarg ``key`` by reference; returns how many were patched now."""
    hook, count = by_reference_hook(key), 0
    for layer in layers:
        if not any(fn is hook for fn in layer._forward_pre_hooks.values()):
            layer.register_forward_pre_hook(hook, with_kwargs=True)
            count += 1
    return count
