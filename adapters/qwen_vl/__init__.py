"""blockquant adapter for Qwen2.5-VL and Qwen3-VL (``...ForConditionalGeneration``).

- Blocks: the language model's decoder layers (``model.language_model.layers``) by default; with
  ``quant_vision`` also the vision tower's blocks (``model.visual.blocks``) as their own group.
- Loading: weights stream from the folder; checkpoints with the older Qwen2.5-VL names
  (``model.layers.*``, ``visual.*``) load too, and the output uses today's names.  The processor is
  assembled from its parts when ``AutoProcessor`` cannot load it (no torchvision).
- Calibration: images with captions through the chat template (see calibration.py).
- Replay: per-block ``cu_seqlens`` of the Qwen2.5-VL vision tower and Qwen3-VL deepstack features
  (see replay.py; ``replay.REINJECT_DEEPSTACK`` switches the latter).
- Example models: ``example_model()`` is a tiny Qwen2.5-VL; ``example_qwen3()`` a tiny Qwen3-VL.
"""
from __future__ import annotations

from blockquant import AdapterInfo, hookimpl

from . import calibration as _calibration
from . import replay as _replay
from .example import example_default, example_qwen3, example_qwen25

NAME = "qwen_vl"
TEXT_BLOCKS = "model.language_model.layers"
VISION_BLOCKS = "model.visual.blocks"
# Older Qwen2.5-VL checkpoints: model.{layers,embed_tokens,norm}.* and visual.* (regex -> today's name).
CHECKPOINT_RENAMES = (
    (r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
    (r"^visual\.", "model.visual."),
)
QUANT_VISION_ATTR = "_blockquant_quant_vision"   # set on the model by load_model from settings.quant_vision

__all__ = ["example_qwen25", "example_qwen3", "CHECKPOINT_RENAMES"]


@hookimpl
def adapter_info():
    return AdapterInfo(
        name=NAME,
        description="Qwen2.5-VL and Qwen3-VL: text blocks (and vision blocks with --quant_vision), image calibration",
        model_types=("qwen2_5_vl", "qwen3_vl"),
        architectures=("Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration"),
        requires={"transformers": ">=5.5.4,<6"},
        needs={"PIL": "blockquant[vision]"},
    )


@hookimpl
def load_model(source, settings):
    from transformers import AutoConfig

    from blockquant.errors import ModelFileError
    from blockquant.model.model_io import LoadedModel, WeightStore, empty_model, model_class_for

    from .processor import load_processor

    try:
        config = AutoConfig.from_pretrained(source.path)
    except Exception as e:
        raise ModelFileError(f"transformers cannot read {source.path}/config.json ({e}); check the folder") from e
    model = empty_model(model_class_for(source), config)
    setattr(model, QUANT_VISION_ATTR, bool(getattr(settings, "quant_vision", False)))
    store = WeightStore(source.path, "model", renames=CHECKPOINT_RENAMES)
    return LoadedModel(model=model, processor=load_processor(source.path, config.model_type), source=source,
                       weights=store)


@hookimpl
def fixed_attrs(model):
    groups = [[TEXT_BLOCKS]]
    if getattr(model, QUANT_VISION_ATTR, False):
        groups.append([VISION_BLOCKS])
    return {
        "block_groups": groups,
        # Qwen2.5-VL window and full-attention vision blocks get different cu_seqlens: rebuilt per block.
        "rebuilt_keys": ("cu_seqlens", "max_seqlen"),
        "checkpoint_renames": CHECKPOINT_RENAMES,
    }


@hookimpl
def calibration_batches(model, source, settings):
    return _calibration.calibration_batches(model, source, settings)


@hookimpl
def pre_cache(model, calibration):
    settings = calibration.settings
    vision = getattr(model, QUANT_VISION_ATTR, False) or "visual" in (getattr(settings, "to_quant_block_names", None) or "")
    _replay.register_capture_hooks(model, calibration, vision=vision)


@hookimpl
def replay_inputs(block, index, cached):
    return _replay.vision_inputs(index, cached)


@hookimpl
def block_outputs(block, index, output, inputs, cached):
    return _replay.add_deepstack(index, output, cached)


@hookimpl
def example_model():
    return example_default()
