"""Where things are inside Gemma 4 models, and what the adapter remembers about a loaded model.

``Gemma4ForCausalLM``: text blocks at ``model.layers``, text model ``model``.
``Gemma4ForConditionalGeneration``: text blocks at ``model.language_model.layers``, vision blocks
at ``model.vision_tower.encoder.layers``, audio blocks (when configured) at ``model.audio_tower.layers``.

Replay hooks only see a block, so ``link(model)`` records, per text decoder layer, the text model
that owns it (its rotary embedding, per-layer-input tables and config are needed to rebuild the
block's inputs).  The records are weak: they never keep a model alive.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

TEXT_PATHS = ("model.language_model", "model")        # text model, multimodal first
VISION_BLOCKS = "model.vision_tower.encoder.layers"


def _get(root: torch.nn.Module, path: str):
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def text_model_path(model: torch.nn.Module) -> str:
    for path in TEXT_PATHS:
        module = _get(model, path)
        if module is not None and isinstance(getattr(module, "layers", None), torch.nn.ModuleList):
            return path
    raise ValueError(f"{type(model).__name__} has no Gemma 4 text model at {' or '.join(TEXT_PATHS)}")


def text_model(model: torch.nn.Module) -> torch.nn.Module:
    return _get(model, text_model_path(model))


def text_blocks_path(model: torch.nn.Module) -> str:
    return text_model_path(model) + ".layers"


def text_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(text_model(model).layers)


def vision_blocks_path(model: torch.nn.Module) -> str | None:
    return VISION_BLOCKS if isinstance(_get(model, VISION_BLOCKS), torch.nn.ModuleList) else None


def is_text_block(block: torch.nn.Module) -> bool:
    return hasattr(block, "self_attn") and hasattr(block.self_attn, "is_kv_shared_layer")


@dataclass
class Options:
    """Run settings the adapter needs later (hooks after load_model do not receive settings)."""

    quant_vision: bool = False
    variable_inputs: str | None = None


_OWNER: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()  # layer -> (text, top)
_OPTIONS: "weakref.WeakKeyDictionary[torch.nn.Module, Options]" = weakref.WeakKeyDictionary()


def link(model: torch.nn.Module) -> None:
    """Remember, for each text decoder layer of ``model``, its text model and the top model."""
    owner = text_model(model)
    for layer in owner.layers:
        _OWNER[layer] = (weakref.ref(owner), weakref.ref(model))


def owner_of(block: torch.nn.Module) -> torch.nn.Module:
    """The text model of a linked text decoder layer."""
    entry = _OWNER.get(block)
    owner = entry[0]() if entry else None
    if owner is None:
        raise RuntimeError(
            f"{type(block).__name__} is not linked to its Gemma 4 text model; the gemma4 adapter's "
            "patch_model/fixed_attrs must run on the model before replay"
        )
    return owner


def remember(model: torch.nn.Module, settings: Any) -> None:
    _OPTIONS[model] = Options(quant_vision=bool(getattr(settings, "quant_vision", False)),
                              variable_inputs=getattr(settings, "variable_inputs", None))


def options_of(model: torch.nn.Module) -> Options:
    return _OPTIONS.get(model, Options())


def options_of_block(block: torch.nn.Module) -> Options:
    entry = _OWNER.get(block)
    top = entry[1]() if entry else None
    return options_of(top) if top is not None else Options()
