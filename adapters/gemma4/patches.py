"""The one model patch Gemma 4 needs: shared KV state passed by reference through accelerate hooks.

accelerate's ``send_to_device`` rebuilds a plain ``dict`` per dispatched layer, so with the plain-dict
shared-KV layouts the storing layer's writes were lost (``KeyError`` in the first KV-shared layer).  A
forward pre-hook on each text decoder layer wraps such a dict in ``InPlaceKV``, a view over the same
dict whose ``.to()`` moves tensors in place (as ``KVSharingDict`` does).  Pre-hooks survive hook removal;
applying the patch twice registers nothing new.
"""
from __future__ import annotations

from collections import UserDict

import torch

from .model import text_layers


class InPlaceKV(UserDict):
    """A view of a shared-KV dict (same storage) that device moves update in place."""

    def __init__(self, data: dict):
        super().__init__()
        self.data = data

    def to(self, device, non_blocking: bool = False) -> "InPlaceKV":
        for key in list(self.data):
            self.data[key] = tuple(t.to(device, non_blocking=non_blocking) for t in self.data[key])
        return self


def pass_shared_kv_by_reference(module, args, kwargs):
    """Pre-hook: wrap a plain-dict ``shared_kv_states`` so that accelerate cannot copy it."""
    state = kwargs.get("shared_kv_states")
    if type(state) is dict:
        kwargs["shared_kv_states"] = InPlaceKV(state)
        return args, kwargs
    return None


def is_patched(layer: torch.nn.Module) -> bool:
    return any(fn is pass_shared_kv_by_reference for fn in layer._forward_pre_hooks.values())


def apply(model: torch.nn.Module) -> int:
    """Patch every text decoder layer of ``model`` that is not patched yet; returns how many were."""
    count = 0
    for layer in text_layers(model):
        if not is_patched(layer):
            layer.register_forward_pre_hook(pass_shared_kv_by_reference, with_kwargs=True)
            count += 1
    return count
