"""The one model patch Gemma 4 needs: shared KV state passed by reference through accelerate hooks.

Why: the text model creates ``shared_kv_states`` once per forward and hands the SAME object to
every decoder layer; a storing layer writes its keys/values into it, the KV-shared layers after
it read them.  accelerate's dispatch hooks run ``send_to_device`` on every layer's kwargs, and
``send_to_device`` rebuilds a plain ``dict`` (``type(d)({...})``) - so with transformers 5.5.4-5.6.x
(a plain dict) each dispatched layer gets its own copy, the writes are lost and the first KV-shared
layer fails with ``KeyError`` (unless the dispatcher passes ``skip_keys``).  transformers 5.23's
``KVSharingDict`` has an in-place ``.to()`` that accelerate calls instead, so there the patch
finds nothing to do.

How: a forward pre-hook on each text decoder layer wraps a plain-dict ``shared_kv_states`` in
``InPlaceKV``, a view over the same dict whose ``.to()`` moves its tensors in place and returns
itself - exactly what ``KVSharingDict`` does.  Torch pre-hooks run before accelerate's wrapped
``forward``, and ``remove_hook_from_submodules`` leaves them alone, so the patch holds whether it
is applied before or after dispatch, and survives hook removal.  Applying it twice registers
nothing new (idempotent); it changes no value, so it is safe unconditionally.
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
