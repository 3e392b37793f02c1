"""Where things are inside Gemma 4 models: the text model at ``model.language_model`` (multimodal) or
``model`` (text only), vision blocks at ``model.vision_tower.encoder.layers``."""
from __future__ import annotations

import torch

TEXT_PATHS = ("model.language_model", "model")        # text model, multimodal first
VISION_BLOCKS = "model.vision_tower.encoder.layers"


def _get(root: torch.nn.Module, path: str):
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


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
