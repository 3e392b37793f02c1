"""blockquant adapter for FLUX diffusion transformers (diffusers ``FluxTransformer2DModel`` in a ``FluxPipeline``).

One block group: the double-stream ``transformer_blocks``, then the single-stream ``single_transformer_blocks``
(both streams feed the next block).  The transformer of a pipeline folder streams from ``transformer/`` and is
exported there; calibration runs the pipeline's denoising loop (calibration.py); example.py builds a tiny
offline pipeline.  Model notes: docs/models/flux.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import torch

from blockquant import AdapterInfo, ExampleModel, hookimpl
from blockquant.errors import ModelFileError
from blockquant.model.model_io import LoadedModel, WeightStore
from blockquant.resources.devices import select_device

from . import calibration as _calibration

PIPELINE_CLASS, TRANSFORMER_FOLDER, WEIGHTS_NAME = "FluxPipeline", "transformer", "diffusion_pytorch_model"

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


@hookimpl
def adapter_info():
    return AdapterInfo(
        name="flux",
        description="FLUX diffusion transformers (diffusers FluxPipeline): double- then single-stream blocks",
        architectures=("FluxTransformer2DModel",), pipelines=(PIPELINE_CLASS,),
        requires={"diffusers": ">=0.35,<1"}, options=Options,
        needs={"diffusers": "blockquant[flux]", "PIL": "blockquant[flux]"},
    )


@hookimpl
def load_model(source, settings):
    from accelerate import init_empty_weights
    from diffusers import FluxPipeline, FluxTransformer2DModel

    if source.pipeline_class != PIPELINE_CLASS:
        raise ModelFileError(f"the flux adapter loads diffusers {PIPELINE_CLASS} folders (model_index.json); "
                             f"{source.path} holds {source.pipeline_class or 'no model_index.json'}")
    folder = os.path.join(source.path, TRANSFORMER_FOLDER)
    store = WeightStore(folder, prefix=WEIGHTS_NAME)      # a missing transformer/ fails here, naming the files
    with init_empty_weights(include_buffers=False):
        transformer = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(folder))
    # fp32 on the CPU (what the engine computes in there), the checkpoint's dtype on an accelerator
    cpu = select_device(settings.device).type == "cpu"
    transformer = transformer.to(torch.float32 if cpu else store.floating_dtype()).eval()
    pipe = FluxPipeline.from_pretrained(source.path, transformer=None, dtype=store.floating_dtype())
    pipe.register_modules(transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(model=transformer, processor=pipe.tokenizer_2, source=source, pipeline=pipe, weights=store,
                       weights_folder=TRANSFORMER_FOLDER)


@hookimpl
def fixed_attrs(model):
    return {
        "block_groups": [["transformer_blocks", "single_transformer_blocks"]],
        # the rotary table comes from the text and image ids (equal for all samples of one resolution);
        # the pipeline passes the same (empty) joint_attention_kwargs every call
        "shared_keys": ("image_rotary_emb", "joint_attention_kwargs"),
        "stop_after_capture": False,     # the trajectory needs the transformer's output: calibration.py stops it
        "weights_subfolder": TRANSFORMER_FOLDER,
        "weights_name": WEIGHTS_NAME,
    }


@hookimpl
def calibration_batches(source, ctx):
    return _calibration.calibration_plan(ctx, source.spec)


@hookimpl
def pre_cache(calibration, ctx):
    _calibration.install_stop_hook(ctx, lambda module, fn: calibration.hook(module, fn, pre=True, with_kwargs=True))


@hookimpl
def run_calibration(batch, ctx):
    _calibration.run_pipeline(ctx, batch)
    return True


@hookimpl
def block_outputs(block, output):
    if type(block).__name__ in BLOCK_CLASSES:
        encoder_hidden_states, hidden_states = output
        return {"hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states}


@hookimpl
def example_model():
    from .example import build_pipeline, save_pipeline

    pipe = build_pipeline()
    return ExampleModel(name="flux-tiny", model=pipe.transformer, processor=pipe.tokenizer_2, pipeline=pipe,
                        save=lambda folder: save_pipeline(pipe, os.fspath(folder)),
                        settings={"nsamples": 4, "num_inference_steps": 2})   # 4 prompts x 2 steps = 8 samples
