"""The engine's default hook implementations (registered trylast, so any adapter overrides them)."""
from __future__ import annotations

import torch

from ..data.calibration_data import default_calibration_batches
from ..data.image_batches import default_image_batches, takes_images
from ..model.blocks import find_block_paths
from ..model.model_io import load_transformers_model
from .hookspecs import hookimpl


@hookimpl(trylast=True)
def load_model(source, settings):
    return load_transformers_model(source, settings)


@hookimpl(trylast=True)
def fixed_attrs(model):
    return {"block_groups": [[p] for p in find_block_paths(model)]}


@hookimpl(trylast=True)
def calibration_batches(model, source, settings, ctx):
    """Image + text samples when the model's processor takes images (unless --dataset names text), else
    token samples cut from the calibration text."""
    if takes_images(source.processor):
        batches = default_image_batches(source, settings, needs_images=ctx.group_enabled("vision"))
        if batches is not None:
            return batches
    return default_calibration_batches(model, source, settings)


@hookimpl(trylast=True)
def run_calibration(model, batch):
    if isinstance(batch, dict):
        kwargs = dict(batch)
        kwargs.setdefault("use_cache", False)
        model(**kwargs)
    else:
        model(batch)
    return True


@hookimpl(trylast=True)
def block_outputs(block, index, output, inputs, cached):
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    if hasattr(hidden, "last_hidden_state"):
        hidden = hidden.last_hidden_state
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"block {index.name} returned {type(output).__name__}; implement block_outputs in the adapter")
    return {"hidden_states": hidden}
