"""Which shared-KV layout the installed transformers uses, found by running it (docs/models/gemma4.md).

``probe()`` runs a tiny Gemma 4 text model once per process and records the container the layers
receive and the keys the storing layer writes; ``kv_strategy()`` maps that to a known layout through the
core's ``LayoutGate`` (unknown layouts and 5.5.0-5.5.3, which has none, are refused; newer releases
with a known layout run with a warning).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

from blockquant.frame.layouts import LayoutGate

from .example import text_config


@dataclass(frozen=True)
class KVStrategy:
    """How one layout names and holds shared KV state: ``new_state`` makes the container the text
    model passes to its layers; ``store_key(attn)`` / ``read_key(attn)`` are the keys a storing /
    KV-shared attention module writes / reads."""

    name: str
    new_state: Callable[[], object]
    store_key: Callable[[object], object]
    read_key: Callable[[object], object]


def _kv_sharing_dict():
    from transformers.cache_utils import KVSharingDict

    return KVSharingDict()


BY_INDEX = KVStrategy("dict keyed by layer index", dict,
                      store_key=lambda attn: attn.layer_idx, read_key=lambda attn: attn.kv_shared_layer_index)
BY_TYPE_DICT = KVStrategy("dict keyed by layer type", dict,
                          store_key=lambda attn: attn.layer_type, read_key=lambda attn: attn.layer_type)
BY_TYPE = KVStrategy("KVSharingDict keyed by layer type", _kv_sharing_dict,
                     store_key=lambda attn: attn.layer_type, read_key=lambda attn: attn.layer_type)


@dataclass(frozen=True)
class Probe:
    container: str | None     # type name of the shared_kv_states the layers receive; None: no such argument
    key_kind: str | None      # "index" or "type": what the storing layers' keys are


@functools.lru_cache(maxsize=1)
def probe() -> Probe:
    """Run a 2-layer Gemma 4 text model with one KV-shared layer and record its shared-KV layout."""
    import torch
    from transformers import Gemma4ForCausalLM

    model = Gemma4ForCausalLM(text_config(2, 1, vocab_size=16, layer_types=["full_attention"] * 2)).eval()
    layer = model.model.layers[0]
    if "shared_kv_states" not in inspect.signature(layer.forward).parameters:
        return Probe(None, None)
    seen: dict = {}

    def grab(module, args, kwargs):
        seen.setdefault("state", kwargs.get("shared_kv_states"))

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 4, dtype=torch.long), use_cache=False)
    finally:
        handle.remove()
    state = seen.get("state")
    if state is None:
        return Probe(None, None)
    keys = list(state.keys())
    kind = "index" if keys and all(isinstance(k, int) for k in keys) else \
        "type" if keys and all(isinstance(k, str) for k in keys) else None
    return Probe(type(state).__name__, kind)


LAYOUTS = {("dict", "index"): BY_INDEX, ("dict", "type"): BY_TYPE_DICT, ("KVSharingDict", "type"): BY_TYPE}
GATE = LayoutGate(
    "gemma4", "transformers", oldest="5.5.4", newest_tested="5.25.0", known=LAYOUTS, what="shared-KV layout",
    refused={(None, None): "its KV-shared layers receive no shared_kv_states and read keys/values from the cache "
                           "only, so the model's output changes with use_cache and block-by-block replay cannot "
                           "reproduce it"})


def strategy_for(found: Probe, version=None) -> KVStrategy:
    """The strategy for the layout ``found`` (on transformers ``version``; default: the installed one)."""
    seen = f"passes Gemma 4's shared KV state as a {found.container} keyed by {found.key_kind or 'unknown keys'}"
    return GATE.choose((found.container, found.key_kind), seen, version)


@functools.lru_cache(maxsize=1)
def kv_strategy() -> KVStrategy:
    """The shared-KV layout of the installed transformers (probed once per process)."""
    return strategy_for(probe())
