"""Image + text calibration for LLaVA: one image with its caption per sample.

Records come from ``--images`` (a folder of images with same-name .txt captions, a .jsonl of
``{"image", "text"}``, a parquet file) or, by default, synthetic shapes drawn with Pillow.  A
``--dataset`` without ``--images`` gives the engine's text-only calibration.
"""
from __future__ import annotations

import logging

from blockquant.errors import DataError
from blockquant.data.image_data import image_text_samples

log = logging.getLogger("blockquant")


def prompt(processor, caption: str) -> str:
    """``<image>`` followed by the caption (LLaVA expands the image token to one per patch)."""
    return f"{processor.image_token}\n{caption}"


def calibration_batches(model, source, settings) -> list[dict]:
    from blockquant.data.calibration_data import default_calibration_batches

    if source.spec is not None and not source.images:
        return default_calibration_batches(model, source, settings)
    processor = source.processor
    if processor is None or not hasattr(processor, "image_processor"):
        raise DataError("LLaVA calibration needs the model's processor (processor_config.json in the model folder)")
    records = image_text_samples(source.images, settings.nsamples, settings.seed)
    batches = []
    for record in records:
        batch = processor(images=[record.image], text=[prompt(processor, record.text)], return_tensors="pt")
        ids = batch["input_ids"][:, : settings.seqlen + _image_tokens(batch, processor)]
        batch = dict(batch, input_ids=ids, attention_mask=batch["attention_mask"][:, : ids.shape[1]], use_cache=False)
        batches.append(batch)
    log.info("calibration: %d image + text samples from %s", len(batches), source.images or "synthetic images")
    return batches


def _image_tokens(batch, processor) -> int:
    return int((batch["input_ids"] == processor.image_token_id).sum())
