"""blockquant adapter for FLUX diffusion transformers (diffusers ``FluxTransformer2DModel`` in a ``FluxPipeline``).

What is FLUX-specific, all in this folder:

- one block group chaining the double-stream ``transformer_blocks`` and the single-stream
  ``single_transformer_blocks``; every block returns ``(encoder_hidden_states, hidden_states)`` and both
  streams feed the next block (and the tuning loss);
- loading a pipeline folder: the transformer is built empty and streams its weights from
  ``transformer/diffusion_pytorch_model*.safetensors``; the other components drive calibration;
- calibration runs the pipeline over prompts for ``num_inference_steps`` steps (calibration.py);
- export in the transformer's folder with diffusers' file names;
- a tiny offline pipeline for tests and demos (example.py); multi-device placement (dispatch.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import blockquant
from blockquant import AdapterInfo, ExampleModel

from . import calibration as _calibration
from .loading import PIPELINE_CLASS, TRANSFORMER_FOLDER, WEIGHTS_NAME


BLOCK_CLASSES = ("FluxTransformerBlock", "FluxSingleTransformerBlock")


@dataclass
class Options:
    num_inference_steps: int = field(default=4, metadata={"help": "denoising steps per calibration prompt"})
    trajectory: Literal["denoise", "capture_only"] = field(default="denoise", metadata={
        "help": "denoise: run the real trajectory; capture_only: stop every step after block 0 (calibration.py)"})
    height: int = field(default=0, metadata={"help": "calibration image height (0: the VAE's sample size)"})
    width: int = field(default=0, metadata={"help": "calibration image width (0: the VAE's sample size)"})
    guidance_scale: float = field(default=3.5, metadata={"help": "guidance scale of the calibration runs"})

    def __post_init__(self):
        if self.num_inference_steps <= 0:
            raise ValueError(f"num_inference_steps must be a positive integer (got {self.num_inference_steps})")


def _is_flux_transformer(model) -> bool:
    return type(model).__name__ == "FluxTransformer2DModel" or (
        hasattr(model, "transformer_blocks") and hasattr(model, "single_transformer_blocks"))


@blockquant.hookimpl
def adapter_info():
    return AdapterInfo(
        name="flux",
        description="FLUX diffusion transformers (diffusers FluxPipeline): double- then single-stream blocks",
        architectures=("FluxTransformer2DModel",),
        pipelines=(PIPELINE_CLASS,),
        requires={"diffusers": ">=0.35,<1"},
        options=Options,
        needs={"diffusers": "blockquant[flux]", "PIL": "blockquant[flux]"},
    )


@blockquant.hookimpl
def load_model(source, settings):
    from .loading import load_flux_pipeline

    return load_flux_pipeline(source, settings)


@blockquant.hookimpl
def fixed_attrs(model):
    if not _is_flux_transformer(model):
        return {}
    return {
        "block_groups": [["transformer_blocks", "single_transformer_blocks"]],
        # the rotary table is computed once per forward from the text and image ids: equal for all samples
        # of one resolution; the pipeline passes the same (empty) joint_attention_kwargs every call.
        "shared_keys": ("image_rotary_emb", "joint_attention_kwargs"),
        # the denoising trajectory needs the transformer's output: calibration.py stops the forward itself
        "stop_after_capture": False,
        "weights_subfolder": TRANSFORMER_FOLDER,
        "weights_name": WEIGHTS_NAME,
    }


@blockquant.hookimpl
def calibration_batches(model, source, settings, ctx):
    return _calibration.calibration_plan(model, source, settings, ctx.options)


@blockquant.hookimpl
def pre_cache(model, calibration):
    if _is_flux_transformer(model):
        _calibration.install_stop_hook(model, lambda module, fn: calibration.hook(module, fn, pre=True, with_kwargs=True))


@blockquant.hookimpl
def run_calibration(model, batch):
    if isinstance(batch, dict) and "prompt" in batch and _is_flux_transformer(model):
        _calibration.run_pipeline(model, batch)
        return True
    return None


@blockquant.hookimpl
def block_outputs(block, index, output, inputs, cached):
    if type(block).__name__ in BLOCK_CLASSES:
        encoder_hidden_states, hidden_states = output
        return {"hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states}
    return None


@blockquant.hookimpl
def example_model():
    from .example import build_pipeline, save_pipeline

    pipe = build_pipeline()
    _calibration.attach_pipeline(pipe.transformer, pipe)
    return ExampleModel(
        name="flux-tiny", model=pipe.transformer, processor=pipe.tokenizer_2,
        save=lambda folder: save_pipeline(pipe, os.fspath(folder)), pipeline=pipe,
        settings={"nsamples": 4, "num_inference_steps": 2},   # 4 prompts x 2 steps = 8 samples
    )
