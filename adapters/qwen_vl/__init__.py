"""blockquant adapter for Qwen2.5-VL and Qwen3-VL (``...ForConditionalGeneration``).

- Blocks: the language model's decoder layers (``model.language_model.layers``, found by the engine); the
  vision tower's blocks (``model.visual.blocks``) are the optional group ``vision``.
- Loading: the engine's; checkpoints with the older Qwen2.5-VL names (``model.layers.*``, ``visual.*``)
  load too, and the output uses today's names.
- Calibration: the engine's image + text samples through the model's processor and chat template.
- Replay: per-block ``cu_seqlens`` of the Qwen2.5-VL vision tower and Qwen3-VL deepstack features
  (see replay.py; the option ``reinject_deepstack`` switches the latter).
- Example models: ``example_model()`` is a tiny Qwen2.5-VL; ``example_qwen3()`` a tiny Qwen3-VL.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from blockquant import AdapterInfo, hookimpl

from . import replay as _replay
from .example import example_qwen3, example_qwen25

VISION_BLOCKS = "model.visual.blocks"
# Older Qwen2.5-VL checkpoints: model.{layers,embed_tokens,norm}.* and visual.* (regex -> today's name).
CHECKPOINT_RENAMES = (
    (r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
    (r"^visual\.", "model.visual."),
)

__all__ = ["example_qwen25", "example_qwen3", "CHECKPOINT_RENAMES", "Options"]


@dataclass
class Options:
    reinject_deepstack: bool = field(default=True, metadata={
        "help": "Qwen3-VL: add the deepstack visual features after the early text layers at replay, as the "
                "model does (false reproduces a replay that silently drops them)"})


@hookimpl
def adapter_info():
    return AdapterInfo(
        name="qwen_vl",
        description="Qwen2.5-VL and Qwen3-VL: text blocks (optional group: vision), image calibration",
        model_types=("qwen2_5_vl", "qwen3_vl"),
        architectures=("Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration"),
        requires={"transformers": ">=5.5.4,<6"},
        options=Options,
        needs={"PIL": "blockquant[vision]"},
    )


@hookimpl
def fixed_attrs(model):
    return {   # the text blocks (model.language_model.layers) are the engine's default block group
        "optional_groups": {"vision": [VISION_BLOCKS]},
        # Qwen2.5-VL window and full-attention vision blocks get different cu_seqlens: rebuilt per block.
        "rebuilt_keys": ("cu_seqlens", "max_seqlen"),
        "pack_boundaries": {"cu_seqlens": "max_seqlen"},   # vision samples (images of any size) pack
        "checkpoint_renames": CHECKPOINT_RENAMES,
    }


@hookimpl
def pre_cache(model, calibration, ctx):
    _replay.register_capture_hooks(model, calibration, vision=ctx.group_enabled("vision"))


@hookimpl
def replay_inputs(block, index, cached):
    return _replay.vision_inputs(index, cached)


@hookimpl
def block_outputs(block, index, output, inputs, cached, ctx):
    if not ctx.options.reinject_deepstack:
        return None
    return _replay.add_deepstack(index, output, cached)


@hookimpl
def example_model():
    return example_qwen25(width=128)   # every text layer's input a multiple of the default group size
