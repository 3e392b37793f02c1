"""FLUX calibration: one pipeline run per prompt, the transformer's first block captured at every step.

Step k+1's latents are the scheduler's update of step k's latents with the transformer's output, so a
forward stopped after block 0 (as for language models) leaves later steps no realistic latents.  The option
``trajectory`` picks one of two answers: ``denoise`` (default) runs the real trajectory, the transformer in
full at every step but the last (stopped after block 0's inputs are taken; the VAE never runs).
``capture_only`` stops every step after block 0 and answers with the flow-matching velocity ``noise - x0``:
step k's latents are then the forward process ``(1 - sigma_k) x0 + sigma_k noise``, ``x0`` being the VAE
latent of an ``--images`` image, else 0 (noise scaled to each step's sigma, no image content).
"""
from __future__ import annotations

import logging
import types

import torch

from blockquant import StashKey
from blockquant.data.calibration_data import load_texts
from blockquant.data.corpus import image_prompts
from blockquant.data.image_data import load_image_folder
from blockquant.errors import UsageError
from blockquant.resources.memory import human_bytes
from blockquant.run.capture import StopForward

log = logging.getLogger("blockquant")
RUN = StashKey[dict]()    # the pipeline run in progress (mode, step, steps): what the stop hook reads


def read_prompts(spec) -> list[str]:
    """``--dataset`` read by the core's text readers; without it, the core's text-to-image prompts."""
    return image_prompts() if spec is None else [t.strip() for t in load_texts(spec)]


def calibration_plan(ctx, spec=None) -> list[dict]:
    """One batch per pipeline run: a prompt, its noise seed, resolution, steps and trajectory mode."""
    settings, options, pipe = ctx.settings, ctx.options, ctx.pipeline
    prompts = read_prompts(spec)
    size = int(pipe.vae.config.get("sample_size", 1024))      # the VAE's resolution (1024 for FLUX.1)
    height, width = options.height or size, options.width or size
    multiple = pipe.vae_scale_factor * 2
    if height % multiple or width % multiple:
        raise UsageError(f"FLUX calibration needs height and width divisible by {multiple} (got {height}x{width})")
    images = []
    if options.trajectory == "capture_only" and settings.images:
        images = [r.image for r in load_image_folder(settings.images, settings.nsamples, settings.seed)]
    batches = [dict(prompt=prompts[i % len(prompts)], seed=settings.seed + i, height=height, width=width,
                    num_inference_steps=options.num_inference_steps, guidance_scale=options.guidance_scale,
                    max_sequence_length=min(settings.seqlen, 512), mode=options.trajectory,
                    image=images[i % len(images)] if images else None) for i in range(settings.nsamples)]
    p = predicted_cache_bytes(ctx.model, pipe, batches)
    log.info("flux calibration: %d prompts (%d given) x %d steps = %d samples of %d tokens (%d image + %d text): "
             "about %s of cached block inputs", len(batches), len(prompts), options.num_inference_steps,
             p["samples"], p["tokens"], p["image_tokens"], p["text_tokens"], human_bytes(p["bytes"]))
    return batches


def predicted_cache_bytes(transformer, pipe, batches: list[dict]) -> dict:
    """Prompts x steps samples of both streams' tokens + temb (width each), and the rotary table once."""
    b, patch = batches[0], pipe.vae_scale_factor * 2
    image_tokens, text_tokens = (b["height"] // patch) * (b["width"] // patch), b["max_sequence_length"]
    samples, tokens = len(batches) * b["num_inference_steps"], image_tokens + text_tokens
    per_sample = (tokens + 1) * transformer.inner_dim * transformer.x_embedder.weight.element_size()
    rotary = 2 * tokens * transformer.config.attention_head_dim * 4           # cos and sin, fp32
    return {"samples": samples, "tokens": tokens, "image_tokens": image_tokens, "text_tokens": text_tokens,
            "bytes": samples * per_sample + rotary}


def install_stop_hook(ctx, register) -> None:
    """Register, through ``register(module, fn)``, the pre-hook of the second block that ends a step's forward
    while ``run_pipeline`` runs: at the last step (denoise) or at every step (capture_only)."""
    chain = list(ctx.model.transformer_blocks) + list(ctx.model.single_transformer_blocks)

    def hook(module, args, kwargs):
        run = ctx.stash.get(RUN)
        if run is not None and (run["mode"] == "capture_only" or run["step"] == run["steps"] - 1):
            raise StopForward      # capture_only: caught by run_pipeline's forward, which answers the step

    for second in chain[1:2]:
        register(second, hook)


def _image_latents(pipe, image, height, width, like: torch.Tensor) -> torch.Tensor:
    pixels = pipe.image_processor.preprocess(image, height=height, width=width)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.mean
    latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    return pipe._pack_latents(latents, 1, *latents.shape[1:]).to(like.device, like.dtype)


def run_pipeline(ctx, batch: dict) -> None:
    """Run one calibration prompt through ``ctx.pipeline``, the transformer's ``forward`` wrapped for the run
    only (accelerate's wrapper, if any, restored after it)."""
    pipe, transformer = ctx.pipeline, ctx.model
    weight = transformer.x_embedder.weight
    with torch.no_grad():     # each text encoder on its own device (the placement plan may split them)
        pooled = pipe._get_clip_prompt_embeds(prompt=batch["prompt"], device=pipe.text_encoder.device)
        embeds = pipe._get_t5_prompt_embeds(prompt=batch["prompt"], device=pipe.text_encoder_2.device,
                                            max_sequence_length=batch["max_sequence_length"])
    run = {"mode": batch["mode"], "step": 0, "steps": batch["num_inference_steps"], "noise": None, "x0": None}
    if batch["mode"] == "capture_only" and batch.get("image") is not None:
        run["x0"] = _image_latents(pipe, batch["image"], batch["height"], batch["width"], weight)
    original, own_forward = transformer.forward, vars(transformer).get("forward")

    def forward(self, *args, **kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if run["noise"] is None:
            run["noise"] = hidden.detach().clone()        # sigma = 1 at the first step: pure noise
        if run["mode"] != "capture_only":
            return original(*args, **kwargs)
        try:
            original(*args, **kwargs)     # stopped after block 0 during capture; in full elsewhere (verify)
        except StopForward:
            pass
        # the answer is the forward-process velocity whether or not the transformer ran in full, so that
        # capture and every other run of the same batch follow the same trajectory
        x0 = run["x0"] if run["x0"] is not None else torch.zeros_like(run["noise"])
        velocity = (run["noise"] - x0).to(hidden.dtype)
        return types.SimpleNamespace(sample=velocity) if kwargs.get("return_dict", True) else (velocity,)

    ctx.stash[RUN] = run
    transformer.forward = types.MethodType(forward, transformer)
    try:
        pipe(prompt_embeds=embeds.to(weight.device, weight.dtype), pooled_prompt_embeds=pooled.to(weight.device, weight.dtype),
             height=batch["height"], width=batch["width"], num_inference_steps=batch["num_inference_steps"],
             guidance_scale=batch["guidance_scale"], max_sequence_length=batch["max_sequence_length"],
             generator=torch.Generator("cpu").manual_seed(batch["seed"]), output_type="latent",
             callback_on_step_end=lambda pipeline, step, timestep, tensors: run.update(step=step + 1) or {})
    finally:
        del transformer.forward
        if own_forward is not None:
            transformer.forward = own_forward
        ctx.stash[RUN] = None
