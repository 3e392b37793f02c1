"""blockquant adapter for Gemma 4: ``Gemma4ForCausalLM`` (model_type ``gemma4_text``) and
``Gemma4ForConditionalGeneration`` (model_type ``gemma4``).

- Blocks: the text decoder layers; with ``quant_vision`` also the vision tower's encoder layers, as
  their own group.  The audio tower (when present) always stays in full precision: there is no
  audio calibration data.
- Versions: transformers 5.5.4-5.6.x and 5.23.x (see versions.py); the shared-KV layout of the
  installed release picks the replay strategy, anything else is refused with the supported range.
- Replay: only block 0's inputs are captured; each block's per-layer input, rotary embeddings and
  mask of its layer type, and the shared KV state of KV-shared layers are rebuilt (replay.py).
  ``--variable_inputs cache`` keeps the engine's per-block caching instead (shared KV still rebuilt).
- Patch: shared KV state passed by reference through accelerate dispatch hooks (patches.py).
- Calibration: text by default; image + text through the processor with ``--images`` (calibration.py).
- Examples: ``example_model()`` is the tiny text model; ``example_multimodal()`` the tiny
  multimodal one; ``example_text(layers, kv_shared)`` other text sizes (example.py).
"""
from __future__ import annotations

from blockquant import AdapterInfo, hookimpl

from . import calibration as _calibration
from . import model as _model
from . import patches as _patches
from . import replay as _replay
from . import versions as _versions
from .example import example_default, example_multimodal, example_text

NAME = "gemma4"

__all__ = ["example_text", "example_multimodal"]


@hookimpl
def adapter_info():
    return AdapterInfo(
        name=NAME,
        description="Gemma 4 text and multimodal: text blocks (vision with --quant_vision), rebuilt per-layer "
                    "inputs, rope/masks per layer type and shared KV state",
        model_types=("gemma4_text", "gemma4"),
        architectures=("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration"),
        requires={"transformers": _versions.requirement()},
    )


@hookimpl
def load_model(source, settings):
    from blockquant.model.model_io import load_transformers_model

    from .processor import load_processor

    _versions.check_supported()
    loaded = load_transformers_model(source, settings)
    multimodal = _model.vision_blocks_path(loaded.model) is not None
    loaded.processor = load_processor(source.path, multimodal)
    _model.remember(loaded.model, settings)
    _model.link(loaded.model)
    return loaded


@hookimpl
def fixed_attrs(model):
    _model.link(model)
    groups = [[_model.text_blocks_path(model)]]
    vision = _model.vision_blocks_path(model)
    if vision and _model.options_of(model).quant_vision:
        groups.append([vision])
    return {"block_groups": groups, "rebuilt_keys": _replay.REBUILT_KEYS}


@hookimpl
def patch_model(model):
    _model.link(model)
    _patches.apply(model)


@hookimpl
def post_hook_removal(model):
    _model.link(model)
    _patches.apply(model)


@hookimpl
def calibration_batches(model, source, settings):
    if not _calibration.wants_images(model, settings, _model.options_of(model)):
        return None   # the engine's text calibration
    return _calibration.image_batches(source.processor, settings)


@hookimpl
def pre_cache(model, calibration):
    _model.link(model)
    _replay.register_capture_hooks(model, calibration)


@hookimpl
def replay_inputs(block, index, cached):
    if not _model.is_text_block(block):
        return None   # vision blocks: every input is the same for all blocks
    return _replay.rebuild(block, cached, _versions.kv_strategy())


@hookimpl
def block_outputs(block, index, output, inputs, cached):
    if _model.is_text_block(block):
        _replay.commit_shared_kv(block, inputs, cached, _versions.kv_strategy())
    return None   # the engine's default: output -> hidden_states


@hookimpl
def example_model():
    return example_default()
