"""Image + text calibration batches for vision-language models, through the model's own processor.

Each record (an image and its caption) becomes one sample: the caption is shown with the image -
through the processor's chat template when it has one (the user shows the image and asks for a
description, the assistant answers with the caption), else as ``<image token>`` + newline + caption.
The caption is cut so that the sample stays within ``seqlen`` tokens; the image's tokens are never
cut.  ``image_source`` decides where the records come from.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable

from ..errors import DataError
from .image_data import IMAGE_COLUMNS, ImageText, image_text_samples

log = logging.getLogger("blockquant")

PROMPT = "Describe the image."
TEXT_ONLY = "text"
# what a processor returns that a model's forward does not take
DROP_KEYS = ("token_type_ids",)


def takes_images(processor) -> bool:
    """True when ``processor`` can turn images into model inputs (it has an image processor and token)."""
    return processor is not None and hasattr(processor, "image_processor") and \
        getattr(processor, "image_token", None) is not None


def _jsonl_has_images(path: str) -> bool:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, dict) and "image" in record
    return False


def _parquet_has_images(path: str) -> bool:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return False
    return any(name in IMAGE_COLUMNS for name in pq.read_schema(path).names)


def image_source(source) -> str | None:
    """Where image records come from: ``--images``; else ``--dataset`` when it names image data (a folder,
    a .jsonl / .parquet with an image field, a hub name); ``TEXT_ONLY`` when ``--dataset`` names text;
    None for synthetic images (no data given)."""
    if getattr(source, "images", None):
        return source.images
    spec = getattr(source, "spec", None)
    if spec is None:
        return None
    if isinstance(spec, (list, tuple)):
        return TEXT_ONLY
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        return spec
    if os.path.isfile(spec):
        lower = spec.lower()
        if (lower.endswith(".jsonl") and _jsonl_has_images(spec)) or (lower.endswith(".parquet") and _parquet_has_images(spec)):
            return spec
        return TEXT_ONLY
    return spec   # a hub dataset name


def chat_prompt(processor, caption: str) -> str:
    """The default prompt: the chat template applied to (image + question, caption), or the image token
    and the caption when the processor has no chat template."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        if caption:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": caption}]})
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=not caption)
    return f"{processor.image_token}\n{caption}".rstrip()


def _cut(tokenizer, text: str, budget: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= budget else tokenizer.decode(ids[:max(budget, 0)])


def image_text_batches(processor, records: list[ImageText], seqlen: int,
                       prompt: Callable[[object, str], str] = chat_prompt) -> list[dict]:
    """One processor output per record, at most ``seqlen`` tokens unless the image alone needs more."""
    if not takes_images(processor):
        raise DataError("image calibration needs the model's processor (processor_config.json or "
                        "preprocessor_config.json and a tokenizer with an image token in the model folder); add "
                        "them, or pass --dataset with text for text-only calibration")
    batches = []
    for record in records:
        empty = processor(text=[prompt(processor, "")], images=[record.image], return_tensors="pt")
        budget = seqlen - empty["input_ids"].shape[-1]
        while True:   # a cut caption may tokenize differently inside the prompt: shrink until it fits
            text = prompt(processor, _cut(processor.tokenizer, record.text, budget))
            batch = dict(processor(text=[text], images=[record.image], return_tensors="pt"))
            over = batch["input_ids"].shape[-1] - seqlen
            if over <= 0 or budget <= 0:
                break
            budget -= over
        for key in DROP_KEYS:
            batch.pop(key, None)
        batch["use_cache"] = False
        batches.append(batch)
    return batches


def default_image_batches(source, settings, needs_images: bool = False,
                          prompt: Callable[[object, str], str] = chat_prompt) -> list[dict] | None:
    """Image + text batches for a processor that takes images, or None for text-only calibration (the
    data given is text).  ``needs_images``: a block group that only images exercise is quantized, so
    text-only data is an error."""
    spec = image_source(source)
    if spec == TEXT_ONLY:
        if needs_images:
            raise DataError(f"the vision blocks need image calibration, but --dataset {source.spec} holds text only; "
                            "pass --images (a folder of images with .txt captions or a .jsonl of {\"image\", "
                            "\"text\"}), or leave --dataset out for synthetic images")
        return None
    records = image_text_samples(spec, settings.nsamples, settings.seed)
    if len(records) < settings.nsamples:
        log.warning("calibration: %s holds %d image records, fewer than --nsamples %d; using all of them",
                    spec, len(records), settings.nsamples)
    batches = image_text_batches(source.processor, records, settings.seqlen, prompt)
    lengths = [b["input_ids"].shape[-1] for b in batches]
    log.info("calibration: %d image + text samples of %d-%d tokens from %s", len(batches), min(lengths),
             max(lengths), spec or "synthetic images")
    return batches
