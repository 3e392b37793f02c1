"""blockquant adapter for LLaVA-style vision-language models (``LlavaForConditionalGeneration``).

What the engine's defaults already do for LLaVA: find the language model's decoder blocks
(``model.language_model.layers``), load the model and its processor from the folder, stream the
weights, replay the blocks (every block gets the same mask and rotary embeddings).  What this
adapter adds: transformers' checkpoint renames when loading (``load_model``), detection (``adapter_info``), image + text calibration (``calibration_batches``) so
the captured hidden states include image tokens, and a tiny offline model (``example_model``).
"""
from __future__ import annotations

from blockquant import AdapterInfo, hookimpl

from .calibration import calibration_batches as _calibration_batches
from .example import build_example
from .loading import load_model as _load_model

__all__ = ["build_example"]


@hookimpl
def adapter_info():
    return AdapterInfo(
        name="llava",
        description="LLaVA-style vision-language models: text blocks, image + text calibration",
        model_types=("llava",),
        architectures=("LlavaForConditionalGeneration",),
        requires={"transformers": ">=5.5.4,<6"},
    )


@hookimpl
def load_model(source, settings):
    return _load_model(source, settings)


@hookimpl
def calibration_batches(model, source, settings):
    return _calibration_batches(model, source, settings)


@hookimpl
def example_model():
    return build_example()
