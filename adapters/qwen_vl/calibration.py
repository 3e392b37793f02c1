"""Image + text calibration batches for Qwen-VL models.

Each record (an image and its caption) becomes a two-turn chat - the user shows the image and asks
for a description, the assistant answers with the caption - rendered with the model's chat template
through its processor.  ``settings.batch_size`` records form one calibration batch, padded to its
longest row; the engine's sample is one such batch (one call of a group's first block).

Where the records come from: ``--images`` (a folder with same-name .txt captions, a .jsonl of
``{"image", "text"}``, a .parquet, or a hub dataset when online); else ``--dataset`` when it names
image data (a folder, a .jsonl / .parquet with an image field, a hub dataset); else synthetic shapes
drawn with Pillow (offline default).  A ``--dataset`` of plain text (.txt, .json, a .jsonl or .parquet
without images, a list of strings) gives the engine's text-only calibration instead.
"""
from __future__ import annotations

import json
import logging
import os

from blockquant.errors import DataError
from blockquant.data.image_data import image_text_samples

log = logging.getLogger("blockquant")

PROMPT = "Describe the image."
TEXT_ONLY = "text"


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
    from blockquant.data.image_data import IMAGE_COLUMNS

    return any(name in IMAGE_COLUMNS for name in pq.read_schema(path).names)


def image_spec(source) -> str | None:
    """Where the image records come from: a path or hub name, None (synthetic) or TEXT_ONLY."""
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
        if lower.endswith(".jsonl") and _jsonl_has_images(spec):
            return spec
        if lower.endswith(".parquet") and _parquet_has_images(spec):
            return spec
        return TEXT_ONLY
    return spec   # a hub dataset name


def _truncate(tokenizer, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def chat_text(processor, caption: str) -> str:
    """The prompt of one record: the chat template applied to (image + question, caption)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    if caption:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": caption}]})
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=not caption)
    start = getattr(processor, "vision_start_token", "<|vision_start|>")
    end = getattr(processor, "vision_end_token", "<|vision_end|>")
    return f"{start}{processor.image_token}{end}{PROMPT}\n{caption}"


def image_text_batches(processor, records, rows: int, max_text_tokens: int) -> list[dict]:
    """Processor outputs of ``rows`` records each (the last batch may be smaller), padded."""
    tokenizer = processor.tokenizer
    batches = []
    for start in range(0, len(records), rows):
        chunk = records[start:start + rows]
        texts = [chat_text(processor, _truncate(tokenizer, r.text, max_text_tokens)) for r in chunk]
        batch = processor(images=[r.image for r in chunk], text=texts, padding=True, return_tensors="pt")
        batch = dict(batch)
        batch["use_cache"] = False
        batches.append(batch)
    return batches


def calibration_batches(model, source, settings) -> list[dict]:
    """The adapter's calibration data (see the module docstring)."""
    from blockquant.data.calibration_data import default_calibration_batches

    spec = image_spec(source)
    processor = getattr(source, "processor", None)
    if spec == TEXT_ONLY:
        if getattr(settings, "quant_vision", False):
            raise DataError(
                f"--quant_vision needs image calibration, but --dataset {source.spec} holds text only; pass --images "
                "(a folder of images with .txt captions or a .jsonl of {\"image\", \"text\"}), or leave --dataset "
                "out for synthetic images"
            )
        log.info("calibration: text only (--dataset names text); vision blocks cannot be calibrated this way")
        return default_calibration_batches(model, source, settings)
    if processor is None or not hasattr(processor, "image_processor"):
        raise DataError(
            "image calibration needs the model's image processor (preprocessor_config.json in the model folder); "
            "add it, or pass --dataset with text for text-only calibration"
        )
    records = image_text_samples(spec, settings.nsamples, settings.seed)
    if len(records) < settings.nsamples:
        log.warning("calibration: %s holds %d image records, fewer than --nsamples %d; using all of them",
                    spec, len(records), settings.nsamples)
    batches = image_text_batches(processor, records, settings.batch_size, settings.seqlen)
    log.info("calibration: %d image + text records from %s in %d batches of up to %d rows",
             len(records), spec or "synthetic images", len(batches), settings.batch_size)
    return batches
