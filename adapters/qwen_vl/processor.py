"""The Qwen-VL processor (image processor + tokenizer + chat template), assembled without torchvision.

``AutoProcessor`` needs torchvision for the video processor of these models; without it (the CPU
build here has none) the processor is put together from ``AutoImageProcessor`` (which resolves to
the Pillow variant) and ``AutoTokenizer``, with video input left out.  Where torchvision exists,
``AutoProcessor`` is used as is.
"""
from __future__ import annotations

import functools
import json
import logging
import os

log = logging.getLogger("blockquant")

# model_type (config.json) -> processor class name in transformers
PROCESSOR_CLASSES = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}


@functools.lru_cache(maxsize=None)
def image_only_class(processor_class: str):
    """A subclass of the transformers processor ``processor_class`` that takes no video processor.

    ``ProcessorMixin`` derives its parts from the ``__init__`` signature, so dropping the
    ``video_processor`` argument there is all it takes; image and text calls behave as the
    original class.
    """
    import transformers

    base = getattr(transformers, processor_class)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(f"{processor_class}ImagesOnly", (base,), {"__init__": __init__, "__doc__": base.__doc__})


def assemble(model_type: str, image_processor, tokenizer, chat_template: str | None):
    """A processor for ``model_type`` from its parts (images and text only)."""
    if model_type not in PROCESSOR_CLASSES:
        raise ValueError(f"no Qwen-VL processor for model_type {model_type!r}; known: {', '.join(PROCESSOR_CLASSES)}")
    return image_only_class(PROCESSOR_CLASSES[model_type])(image_processor, tokenizer, chat_template=chat_template)


def _pil_image_processor():
    """The Pillow image processor class both Qwen-VL families use."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil


def read_chat_template(folder: str) -> str | None:
    """The chat template of a model folder: chat_template.jinja, chat_template.json or the tokenizer's."""
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                template = json.load(f).get("chat_template")
            if isinstance(template, str):
                return template
    return None


def load_processor(folder: str, model_type: str):
    """The processor of a Qwen-VL model folder: ``AutoProcessor`` when it loads, else assembled."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(folder)
        if hasattr(processor, "image_processor"):   # some versions fall back to the bare tokenizer
            return processor
    except Exception as e:  # typically ImportError: the video processor requires torchvision
        log.debug("AutoProcessor could not load %s (%s); assembling the processor from its parts", folder, e)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        log.warning("no tokenizer in %s (%s)", folder, e)
        return None
    try:
        image_processor = AutoImageProcessor.from_pretrained(folder)
    except Exception as e:  # e.g. a transformers release whose auto class insists on torchvision
        try:
            image_processor = _pil_image_processor().from_pretrained(folder)
        except Exception:
            log.warning("no image processor in %s (%s); calibrating with text only", folder, e)
            return tokenizer
    return assemble(model_type, image_processor, tokenizer, read_chat_template(folder))
