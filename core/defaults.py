"""The engine's default hook implementations (registered trylast, so any adapter overrides them)."""
from __future__ import annotations

import torch

from .hookspecs import hookimpl


@hookimpl(trylast=True)
def load_model(source, settings):
    from .model_io import load_transformers_model

    return load_transformers_model(source, settings)


@hookimpl(trylast=True)
def fixed_attrs(model):
    from .blocks import find_block_paths

    return {"block_groups": [[p] for p in find_block_paths(model)]}


@hookimpl(trylast=True)
def calibration_batches(model, source, settings):
    from .calibration_data import default_calibration_batches

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
