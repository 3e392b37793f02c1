"""Which shared-KV layout the installed transformers uses, found by running it (docs/models/gemma4.md).

``probe()`` runs a tiny Gemma 4 text model once per process and records the container the layers
receive and the keys the storing layer writes; ``kv_strategy()`` maps that to a known layout.  An unknown
layout (or none: 5.5.0-5.5.3) is refused, naming what was seen; a release newer than ``NEWEST_TESTED``
with a known layout runs with a warning.
"""
from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Callable

from packaging.version import Version

from blockquant.errors import VersionError

log = logging.getLogger("blockquant")

OLDEST = "5.5.4"
NEWEST_TESTED = "5.24.0"      # the newest release CI runs the gemma4 tests on
INSTALL_HINT = f"pip install 'transformers>={OLDEST}'"


def requirement() -> str:
    """The PEP 440 specifier declared in ``AdapterInfo.requires``: the layouts decide the rest."""
    return f">={OLDEST},<6"


def installed() -> Version:
    import transformers

    return Version(transformers.__version__)


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
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    config = Gemma4TextConfig(
        vocab_size=16, vocab_size_per_layer_input=16, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
        layer_types=["full_attention", "full_attention"], num_attention_heads=1, num_key_value_heads=1, head_dim=8,
        global_head_dim=8, hidden_size_per_layer_input=4, num_kv_shared_layers=1, max_position_embeddings=8)
    model = Gemma4ForCausalLM(config).eval()
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


def strategy_for(found: Probe, version: Version) -> KVStrategy:
    """The layout of ``found`` (a probe of transformers ``version``), or VersionError naming what was seen."""
    if found.container is None:
        raise VersionError(
            f"transformers {version} is not supported by the gemma4 adapter: its KV-shared layers receive no "
            "shared_kv_states and read keys/values from the cache only, so the model's output changes with "
            f"use_cache and block-by-block replay cannot reproduce it; {INSTALL_HINT}")
    strategy = LAYOUTS.get((found.container, found.key_kind))
    if strategy is None:
        raise VersionError(
            f"transformers {version} passes Gemma 4's shared KV state as a {found.container} keyed by "
            f"{found.key_kind or 'unknown keys'}, a layout the gemma4 adapter does not know yet (known: "
            f"{', '.join(s.name for s in LAYOUTS.values())}); install a release it knows: "
            f"pip install 'transformers>={OLDEST},<={NEWEST_TESTED}'")
    return strategy


@functools.lru_cache(maxsize=1)
def kv_strategy() -> KVStrategy:
    """The shared-KV layout of the installed transformers (probed once per process)."""
    version = installed()
    strategy = strategy_for(probe(), version)
    if version > Version(NEWEST_TESTED):
        log.warning("transformers %s is newer than %s, the newest release the gemma4 adapter was tested with; "
                    "its shared-KV layout (%s) is known, so the run goes on - check with `quant verify`",
                    version, NEWEST_TESTED, strategy.name)
    return strategy
