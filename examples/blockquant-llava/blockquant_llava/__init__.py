"""blockquant adapter for LLaVA-style vision-language models (``LlavaForConditionalGeneration``).

What the engine's defaults already do for LLaVA: find the language model's decoder blocks
(``model.language_model.layers``), load the model and its processor from the folder, stream the
weights, replay the blocks (every block gets the same mask and rotary embeddings).  The engine also
applies transformers' checkpoint renames while streaming (LLaVA is saved under its hub names).  What
this adapter adds: detection (``adapter_info``), image + text calibration (``calibration_batches``) so the
captured hidden states include image tokens, and a tiny offline model (``example_model``).
"""
from __future__ import annotations

from blockquant import AdapterInfo, hookimpl

from .calibration import calibration_batches as _calibration_batches
from .example import build_example

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
def calibration_batches(model, source, settings):
    return _calibration_batches(model, source, settings)


@hookimpl
def example_model():
    return build_example()
