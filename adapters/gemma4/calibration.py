"""Image + text calibration for ``Gemma4ForConditionalGeneration``, through the model's processor.

Used when the user gives images (``--images``: a folder of images with same-name .txt captions, or
a .jsonl of ``{"image", "text"}``) or asks to quantize the vision tower.  Each sample is one image
and its caption: ``"<image token> caption"``, expanded by the processor into boi + soft tokens + eoi,
with ``mm_token_type_ids``, ``pixel_values`` and ``image_position_ids``.  Captions are cut so that
a sample stays within ``--seqlen`` tokens; image tokens are never cut.  Without images, text-only
calibration (the engine's default) is used.
"""
from __future__ import annotations

import logging

from blockquant.errors import DataError

log = logging.getLogger("blockquant")


def wants_images(model, settings, options) -> bool:
    has_vision = getattr(getattr(model, "model", None), "vision_tower", None) is not None
    return has_vision and (settings.images is not None or options.quant_vision)


def _caption(tokenizer, text: str, budget: int) -> str:
    """``text`` cut to at most ``budget`` tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= budget else tokenizer.decode(ids[:max(budget, 0)])


def image_batches(processor, settings) -> list[dict]:
    """``settings.nsamples`` processor outputs of one image + caption each."""
    from blockquant.data.image_data import image_text_samples

    if not hasattr(processor, "image_processor") or getattr(processor, "image_token", None) is None:
        raise DataError("image calibration needs the model's Gemma 4 processor (preprocessor_config.json and a "
                        "tokenizer with image tokens in the model folder); add them or drop --images/--quant_vision")
    if settings.images is None:
        raise DataError("--quant_vision needs image calibration data to exercise the vision tower: pass --images "
                        "with a folder of images (+ same-name .txt captions) or a .jsonl of {\"image\", \"text\"}")
    records = image_text_samples(settings.images, settings.nsamples, settings.seed)
    batches = []
    for record in records:
        probe = processor(text=[processor.image_token], images=[[record.image]], return_tensors="pt")
        budget = settings.seqlen - probe["input_ids"].shape[-1] - 1
        text = f"{processor.image_token} {_caption(processor.tokenizer, record.text, budget)}".rstrip()
        batch = processor(text=[text], images=[[record.image]], return_tensors="pt")
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids",
                                                         "pixel_values", "image_position_ids")}
        batches.append(batch)
    if len(batches) < settings.nsamples:
        log.warning("image calibration: %d image(s) available for --nsamples %d", len(batches), settings.nsamples)
    lengths = [b["input_ids"].shape[-1] for b in batches]
    log.info("calibration: %d image + text samples of %d-%d tokens", len(batches), min(lengths), max(lengths))
    return batches
