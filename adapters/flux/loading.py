"""Loading a FluxPipeline folder: the transformer built empty (weights streamed block by block from
``transformer/diffusion_pytorch_model*.safetensors``), the other components loaded for calibration."""
from __future__ import annotations

import json
import logging
import os

import torch

from blockquant.errors import ModelFileError
from blockquant.model.model_io import LoadedModel, WeightStore

from .calibration import attach_pipeline

log = logging.getLogger("blockquant")

PIPELINE_CLASS = "FluxPipeline"
TRANSFORMER_FOLDER = "transformer"
WEIGHTS_NAME = "diffusion_pytorch_model"
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def checkpoint_dtype(folder: str) -> torch.dtype:
    """The floating dtype of the transformer's first shard (read from its header, no tensor loaded)."""
    index = os.path.join(folder, f"{WEIGHTS_NAME}.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            first = sorted(set(json.load(f)["weight_map"].values()))[0]
    else:
        first = f"{WEIGHTS_NAME}.safetensors"
    with open(os.path.join(folder, first), "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    for key, value in header.items():
        if key != "__metadata__" and value.get("dtype") in _DTYPES:
            return _DTYPES[value["dtype"]]
    return torch.float32


def empty_transformer(folder: str, dtype: torch.dtype = torch.float32):
    """``FluxTransformer2DModel`` from ``folder``/config.json with its parameters on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    config = FluxTransformer2DModel.load_config(folder)
    with init_empty_weights(include_buffers=False):
        model = FluxTransformer2DModel.from_config(config)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


def load_flux_pipeline(source, settings) -> LoadedModel:
    """The ``load_model`` of the flux adapter (see the module docstring)."""
    from diffusers import FluxPipeline

    from blockquant.resources.devices import select_device

    if source.pipeline_class != PIPELINE_CLASS:
        raise ModelFileError(
            f"the flux adapter loads diffusers FluxPipeline folders (model_index.json with _class_name "
            f"{PIPELINE_CLASS}); {source.path} holds {source.pipeline_class or 'no model_index.json'}"
        )
    folder = os.path.join(source.path, TRANSFORMER_FOLDER)
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise ModelFileError(f"{folder}/config.json is missing; the pipeline folder needs its transformer")
    store = WeightStore(folder, prefix=WEIGHTS_NAME)
    device = select_device(getattr(settings, "device", "auto"))
    # fp32 on the CPU (what the engine computes in there); the checkpoint's dtype on an accelerator
    dtype = checkpoint_dtype(folder) if device.type != "cpu" else torch.float32
    transformer = empty_transformer(folder, dtype)
    pipe = FluxPipeline.from_pretrained(source.path, transformer=None, dtype=checkpoint_dtype(folder))
    pipe.register_modules(transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    _place_components(pipe, device, settings)
    attach_pipeline(transformer, pipe)
    return LoadedModel(model=transformer, processor=pipe.tokenizer_2, source=source, pipeline=pipe, weights=store,
                       weights_folder=TRANSFORMER_FOLDER)


def _place_components(pipe, device: torch.device, settings) -> None:
    """Text encoders and VAE on the run's device, or spread by the dispatch plan over several GPUs."""
    from .dispatch import SIDE_COMPONENTS, cuda_capacities, place_side_components, plan_pipeline

    if device.type == "cuda" and torch.cuda.device_count() > 1 and getattr(settings, "device_map", None):
        plan = plan_pipeline(pipe, pipe.transformer, cuda_capacities())
        place_side_components(pipe, plan)
        object.__setattr__(pipe.transformer, "_blockquant_max_memory", dict(plan.max_memory))
        log.info("flux: %s; transformer budget per device %s", plan.describe(), plan.max_memory)
        return
    for name in SIDE_COMPONENTS:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.to(device)


def load_quantized_pipeline(folder: str, device="cpu", dtype: torch.dtype | None = None):
    """A FluxPipeline from a folder blockquant wrote: the quantized transformer through blockquant's loader.

    (``FluxPipeline.from_pretrained(folder)`` alone hands the transformer to diffusers' auto-round
    integration, which needs the auto-round package; this needs nothing beyond blockquant.)
    """
    from diffusers import FluxPipeline

    import blockquant

    transformer = blockquant.load_quantized(os.path.join(folder, TRANSFORMER_FOLDER), device=device, dtype=dtype)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    pipe = FluxPipeline.from_pretrained(folder, transformer=transformer, **kwargs)
    return pipe.to(device)
