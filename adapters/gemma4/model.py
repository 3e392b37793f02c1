"""Where things are inside Gemma 4 models: the text model's layers where the engine's default block search
finds them (``model.layers`` text only, ``model.language_model.layers`` multimodal), the vision blocks at
``model.vision_tower.encoder.layers``."""
from __future__ import annotations

import torch

from blockquant.model.blocks import find_block_paths, get_module

VISION_BLOCKS = "model.vision_tower.encoder.layers"


def text_model(model: torch.nn.Module) -> torch.nn.Module:
    """The text model: the parent of the decoder layers (the engine's block groups)."""
    return get_module(model, find_block_paths(model)[0].removesuffix(".layers"))


def vision_blocks_path(model: torch.nn.Module) -> str | None:
    return VISION_BLOCKS if isinstance(get_module(model, VISION_BLOCKS), torch.nn.ModuleList) else None


def is_text_block(block: torch.nn.Module) -> bool:
    return hasattr(block, "self_attn") and hasattr(block.self_attn, "is_kv_shared_layer")
