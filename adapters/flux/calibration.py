"""FLUX calibration: pipeline runs over prompts, with the transformer's first block captured at every step.

The denoising trajectory problem: step k+1's latents are the scheduler's update of step k's latents
with the transformer's *output*.  Stopping the transformer after its first block (as the engine does
for language models) leaves no output, so later steps would see no realistic latents.  Two modes
(the adapter option ``trajectory``):

- ``"denoise"`` (default): the real trajectory.  The transformer runs in full at every step except
  the last, whose output nothing needs: there the forward stops right after the first block's inputs
  are taken, and the VAE never runs (latent output).  Costs one fp generation per prompt, with blocks
  still streamed one at a time, so memory stays at one block.
- ``"capture_only"``: the requirement taken literally - at every step the transformer stops after its
  first block.  The pipeline still advances: the adapter answers the step with the flow-matching
  velocity ``noise - x0``, so the step-k latents are exactly the forward process
  ``(1 - sigma_k) x0 + sigma_k noise`` the model was trained on.  ``x0`` is the VAE latent of a
  calibration image when ``settings.images`` names a folder of images, else 0 (latents are then noise
  scaled to each step's sigma: correct noise levels and timesteps, no image content).
"""
from __future__ import annotations

import logging
import os
import types

import torch

from blockquant.run.capture import StopForward
from blockquant.errors import DataError, UsageError
from blockquant.resources.memory import human_bytes

from .prompts import read_prompts

log = logging.getLogger("blockquant")

PIPELINE_ATTR = "_blockquant_pipeline"
RUN_ATTR = "_blockquant_flux_run"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class _SkipRest(Exception):
    """Ends a transformer forward after its first block (capture_only mode)."""


def attach_pipeline(transformer, pipeline) -> None:
    """Remember which pipeline drives ``transformer`` (a plain attribute: a pipeline is no nn.Module)."""
    object.__setattr__(transformer, PIPELINE_ATTR, pipeline)


def pipeline_of(transformer):
    pipe = getattr(transformer, PIPELINE_ATTR, None)
    if pipe is None:
        raise UsageError(
            "this FLUX transformer has no pipeline attached; load the pipeline folder with the flux adapter "
            "(quant --adapter flux PIPELINE_FOLDER) so that calibration can run its denoising loop"
        )
    return pipe


def calibration_plan(transformer, source, settings, options) -> list[dict]:
    """One batch per pipeline run: a prompt, its noise seed, resolution, steps and trajectory mode
    (``options``: the adapter's ``Options``)."""
    pipe = pipeline_of(transformer)
    mode = options.trajectory
    spec = getattr(source, "spec", None) if source is not None else None
    prompts = read_prompts(spec)
    # default resolution: the one the VAE was configured for (1024 for FLUX.1; 64 for the tiny example)
    sample_size = pipe.vae.config.get("sample_size", 1024) if getattr(pipe, "vae", None) is not None else 1024
    size = int(sample_size if isinstance(sample_size, int) else sample_size[0])
    height = options.height or size
    width = options.width or size
    multiple = pipe.vae_scale_factor * 2
    if height % multiple or width % multiple:
        raise UsageError(f"FLUX calibration needs height and width divisible by {multiple} (got {height}x{width})")
    images = _image_files(settings.images) if mode == "capture_only" and settings.images else []
    batches = []
    for i in range(settings.nsamples):
        batches.append(dict(
            prompt=prompts[i % len(prompts)], seed=settings.seed + i, height=height, width=width,
            num_inference_steps=options.num_inference_steps,
            guidance_scale=options.guidance_scale,
            max_sequence_length=min(settings.seqlen, 512), mode=mode,
            image=images[i % len(images)] if images else None,
        ))
    if len(prompts) < settings.nsamples:
        log.info("flux: %d prompts reused for %d pipeline runs (each run has its own noise seed)",
                 len(prompts), settings.nsamples)
    log_cache_prediction(transformer, pipe, batches)
    return batches


def predicted_cache_bytes(transformer, pipe, batches: list[dict]) -> dict:
    """Steps x prompts x tokens x width of the two streams (+ temb per sample) that capture will hold."""
    if not batches:
        return {"samples": 0, "tokens": 0, "bytes": 0}
    b = batches[0]
    patch = pipe.vae_scale_factor * 2
    image_tokens = (b["height"] // patch) * (b["width"] // patch)
    text_tokens = b["max_sequence_length"]
    dim = transformer.inner_dim
    size = transformer.x_embedder.weight.element_size()
    samples = len(batches) * b["num_inference_steps"]
    per_sample = (image_tokens + text_tokens) * dim * size + dim * size       # both streams + temb
    head_dim = transformer.config.attention_head_dim
    rotary = 2 * (image_tokens + text_tokens) * head_dim * 4                 # cos, sin (fp32), stored once
    return {"samples": samples, "tokens": image_tokens + text_tokens, "image_tokens": image_tokens,
            "text_tokens": text_tokens, "dim": dim, "bytes": samples * per_sample + rotary}


def log_cache_prediction(transformer, pipe, batches) -> dict:
    p = predicted_cache_bytes(transformer, pipe, batches)
    if p["samples"]:
        log.info(
            "flux calibration: %d prompts x %d steps = %d samples of %d tokens (%d image + %d text) x %d: "
            "about %s of cached block inputs (two streams + temb per sample, rotary table once)",
            len(batches), batches[0]["num_inference_steps"], p["samples"], p["tokens"], p["image_tokens"],
            p["text_tokens"], p["dim"], human_bytes(p["bytes"]),
        )
    return p


def _image_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise DataError(f"--images {folder} is not a folder; pass a folder of .png/.jpg images")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise DataError(f"--images {folder} holds no .png/.jpg/.webp images")
    return files


def _second_block(transformer):
    chain = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    return chain[1] if len(chain) > 1 else None


def install_stop_hook(transformer, register) -> None:
    """Register (through ``register(module, fn)``) the pre-hook that ends a step's forward after block 0.

    It fires only while ``run_pipeline`` runs: at the last step (both modes) and at every step in
    capture_only mode.  ``pre_cache`` installs it for capture only, so other forwards run in full.
    """
    second = _second_block(transformer)
    if second is None:
        return

    def hook(module, args, kwargs):
        run = getattr(transformer, RUN_ATTR, None)
        if run is None:
            return
        if run["mode"] == "capture_only":
            raise _SkipRest
        if run["step"] == run["steps"] - 1:
            raise StopForward

    register(second, hook)


def _image_latents(pipe, path, height, width, device, dtype):
    from PIL import Image

    image = Image.open(path).convert("RGB").resize((width, height), Image.BICUBIC)
    pixels = pipe.image_processor.preprocess(image, height=height, width=width).to(_device_of(pipe.vae), pipe.vae.dtype)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean
    latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    packed = pipe._pack_latents(latents, 1, latents.shape[1], latents.shape[2], latents.shape[3])
    return packed.to(device, dtype)


def _device_of(module) -> torch.device:
    return next(module.parameters()).device


def encode_prompt(pipe, prompt: str, max_sequence_length: int):
    """T5 and pooled CLIP embeddings, each computed on its encoder's own device (they may differ)."""
    with torch.no_grad():
        pooled = pipe._get_clip_prompt_embeds(prompt=prompt, device=_device_of(pipe.text_encoder))
        embeds = pipe._get_t5_prompt_embeds(prompt=prompt, device=_device_of(pipe.text_encoder_2),
                                            max_sequence_length=max_sequence_length)
    return embeds, pooled


def run_pipeline(transformer, batch: dict) -> None:
    """Run one calibration prompt through the pipeline (the transformer's first block gets captured)."""
    pipe = pipeline_of(transformer)
    device = transformer.x_embedder.weight.device
    dtype = transformer.x_embedder.weight.dtype
    prompt_embeds, pooled = encode_prompt(pipe, batch["prompt"], batch["max_sequence_length"])
    run = {"mode": batch["mode"], "step": 0, "steps": batch["num_inference_steps"], "noise": None, "x0": None}
    if batch["mode"] == "capture_only" and batch.get("image"):
        run["x0"] = _image_latents(pipe, batch["image"], batch["height"], batch["width"], device, dtype)
    original = transformer.forward
    own_forward = vars(transformer).get("forward")    # accelerate's hook wrapper lives here when dispatched

    def forward(self, *args, **kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if run["noise"] is None:
            run["noise"] = hidden.detach().clone()    # sigma = 1 at the first step: pure noise
        if run["mode"] != "capture_only":
            return original(*args, **kwargs)
        try:
            original(*args, **kwargs)    # stopped after block 0 during capture; in full elsewhere (verify)
        except _SkipRest:
            pass
        # the step's answer is the forward-process velocity, whether or not the transformer ran in full,
        # so that capture and any other run of the same batch follow the same trajectory
        x0 = run["x0"] if run["x0"] is not None else torch.zeros_like(run["noise"])
        velocity = (run["noise"] - x0).to(hidden.dtype)
        return (velocity,) if not kwargs.get("return_dict", True) else types.SimpleNamespace(sample=velocity)

    def step_done(pipeline, step, timestep, callback_kwargs):
        run["step"] = step + 1
        return {}

    object.__setattr__(transformer, RUN_ATTR, run)
    transformer.forward = types.MethodType(forward, transformer)
    try:
        pipe(
            prompt_embeds=prompt_embeds.to(device, dtype), pooled_prompt_embeds=pooled.to(device, dtype),
            height=batch["height"], width=batch["width"], num_inference_steps=batch["num_inference_steps"],
            guidance_scale=batch["guidance_scale"], max_sequence_length=batch["max_sequence_length"],
            generator=torch.Generator("cpu").manual_seed(batch["seed"]), output_type="latent",
            callback_on_step_end=step_done,
        )
    finally:
        if own_forward is not None:
            transformer.forward = own_forward
        else:
            del transformer.forward
        object.__delattr__(transformer, RUN_ATTR)
