"""Loading a LLaVA folder: the engine's default, plus transformers' checkpoint renamings.

transformers saves LLaVA with the original hub names (``language_model.model.layers.0...``,
``vision_tower.embeddings...``) while the module tree says ``model.language_model.layers.0...``.
transformers' own conversion mapping knows the renames; we hand them to the engine's WeightStore as
exact-name rules so that block weights stream under the module names.
"""
from __future__ import annotations

import re


def checkpoint_renamer(model):
    """checkpoint name -> module name, with transformers' renamings for this model class."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    return lambda name: apply_renamings(name, renamings) if renamings else name


def load_model(source, settings):
    from transformers import AutoConfig

    from blockquant.model_io import LoadedModel, WeightStore, empty_model, load_processor, model_class_for

    model = empty_model(model_class_for(source), AutoConfig.from_pretrained(source.path))
    rename = checkpoint_renamer(model)
    names = WeightStore(source.path, "model").names()
    renames = tuple((f"^{re.escape(n)}$", rename(n)) for n in names if rename(n) != n)
    store = WeightStore(source.path, "model", renames=renames)
    return LoadedModel(model=model, processor=load_processor(source.path), source=source, weights=store)
