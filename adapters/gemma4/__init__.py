"""blockquant adapter for Gemma 4 (``Gemma4ForCausalLM``, ``Gemma4ForConditionalGeneration``); the model
facts it relies on are in docs/models/gemma4.md.

Text blocks are quantized; the vision tower is the optional group ``vision``; an audio tower stays in
full precision.  Replay rebuilds each block's per-layer input, rope and mask of its layer type, and the
shared KV state (replay.py), in the layout the installed transformers uses (versions.py); the one patch
passes that state by reference through accelerate's dispatch hooks.
"""
from __future__ import annotations

from blockquant import AdapterInfo, UsageError, hookimpl
from blockquant.resources.by_reference import pass_by_reference

from . import model as _model
from . import replay as _replay
from . import versions as _versions
from .example import DEFAULT_SIZES, example_multimodal, example_text

__all__ = ["example_text", "example_multimodal"]


@hookimpl
def adapter_info():
    return AdapterInfo(
        name="gemma4",
        description="Gemma 4 text and multimodal: text blocks (optional group: vision), rebuilt per-layer "
                    "inputs, rope/masks per layer type and shared KV state",
        model_types=("gemma4_text", "gemma4"),
        architectures=("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration"),
        requires={"transformers": _versions.GATE.requirement},
    )


@hookimpl
def load_model(source, settings):
    _versions.kv_strategy()       # refuse an unknown shared-KV layout before loading anything
    return None                   # the engine's loader


@hookimpl
def fixed_attrs(model):
    vision = _model.vision_blocks_path(model)   # the text blocks are the engine's default block group
    return {"rebuilt_keys": _replay.REBUILT_KEYS, "optional_groups": {"vision": [vision]} if vision else {},
            "sample_state": ("shared_kv_states",)}   # each sample's stored keys/values: batched through a view


@hookimpl
def patch_model(model):
    # the text model hands one shared_kv_states dict to every layer; accelerate would copy it per layer
    pass_by_reference(list(_model.text_model(model).layers), "shared_kv_states")


@hookimpl
def post_hook_removal(model):
    patch_model(model)


@hookimpl
def pre_cache(model, calibration):
    _replay.register_capture_hooks(model, calibration)


@hookimpl
def replay_inputs(block, index, cached, ctx):
    if not _model.is_text_block(block):
        return None   # vision blocks: every input is the same for all blocks
    return _replay.rebuild(block, cached, _versions.kv_strategy(), _model.text_model(ctx.model),
                           only_shared_kv=ctx.traits.variable_inputs == "cache")


@hookimpl
def block_outputs(block, index, output, inputs, cached):
    if _model.is_text_block(block):
        _replay.commit_shared_kv(block, inputs, cached, _versions.kv_strategy())
    return None   # the engine's default: output -> hidden_states


@hookimpl
def example_model():
    return example_text(**DEFAULT_SIZES)


@hookimpl
def gguf_layout(model):
    # llama.cpp has a Gemma 4 architecture, but its converter's handling (norm offsets, per-layer
    # embeddings, KV-shared layers, the vision/audio towers) has not been reproduced and checked
    # against llama.cpp here: refuse rather than write a file that loads and produces nonsense.
    raise UsageError("GGUF export of Gemma 4 is not supported by the gemma4 adapter yet; use --format auto_round "
                     "or compressed-tensors (vLLM), or convert the auto_round output with llama.cpp's own tools")
