"""blockquant adapter for LLaVA-style vision-language models (``LlavaForConditionalGeneration``).

What the engine's defaults already do for LLaVA: find the language model's decoder blocks
(``model.language_model.layers``), load the model and its processor from the folder, stream the
weights (applying transformers' checkpoint renames: LLaVA is saved under its hub names), calibrate
with images through the processor (the captured hidden states include image tokens), and replay the
blocks (every block gets the same mask and rotary embeddings).  What this adapter adds: detection
(``adapter_info``) and a tiny offline model (``example_model``).
"""
from __future__ import annotations

from blockquant import AdapterInfo, hookimpl

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
def example_model():
    return build_example()
