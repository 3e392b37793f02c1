"""The Gemma 4 processor (image processor + tokenizer), assembled without torchvision.

``Gemma4Processor`` takes an audio feature extractor, an image processor, a tokenizer and a video
processor, and checks each against transformers' auto mappings.  Without torchvision (the CPU build
here has none) the video processor class cannot even be looked up, so ``AutoProcessor`` fails and
so does constructing the processor with ``video_processor=None``.  ``images_and_text_class()`` is a
subclass that lets absent parts (``None``) through that check; everything else - image token
expansion, ``mm_token_type_ids``, the Pillow image processor's patchify - is transformers' own.
On 5.5.x ``AutoImageProcessor`` itself needs torchvision, so the Pillow class is loaded directly.
"""
from __future__ import annotations

import functools
import logging

log = logging.getLogger("blockquant")


@functools.lru_cache(maxsize=None)
def images_and_text_class():
    """``Gemma4Processor`` that accepts ``None`` for the parts it is not given (audio, video)."""
    from transformers import Gemma4Processor

    def check_argument_for_proper_class(self, attribute_name, arg):
        if arg is None:
            return None
        return Gemma4Processor.check_argument_for_proper_class(self, attribute_name, arg)

    return type("Gemma4ImageTextProcessor", (Gemma4Processor,), {
        "check_argument_for_proper_class": check_argument_for_proper_class,
        "__doc__": "Gemma4Processor for images and text only (no audio feature extractor, no video processor).",
    })


def assemble(image_processor, tokenizer, **kwargs):
    """A processor for images + text from its parts."""
    return images_and_text_class()(None, image_processor, tokenizer, None, **kwargs)


def load_image_processor(folder: str):
    """The folder's Gemma 4 image processor (Pillow variant), or None when it has none."""
    import os

    if not os.path.exists(os.path.join(folder, "preprocessor_config.json")):
        return None
    try:
        from transformers import Gemma4ImageProcessorPil

        return Gemma4ImageProcessorPil.from_pretrained(folder)
    except Exception as e:  # an old layout or a missing class: try the auto class
        log.debug("Gemma4ImageProcessorPil could not load %s (%s); trying AutoImageProcessor", folder, e)
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder)


def load_processor(folder: str, multimodal: bool):
    """What calibration needs from ``folder``: the processor of a multimodal model, else the tokenizer."""
    from transformers import AutoProcessor, AutoTokenizer

    if multimodal:
        try:
            return AutoProcessor.from_pretrained(folder)
        except Exception as e:  # typically ImportError: the video processor needs torchvision
            log.debug("AutoProcessor could not load %s (%s); assembling the processor from its parts", folder, e)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not multimodal:
        return tokenizer
    image_processor = load_image_processor(folder)
    if image_processor is None or getattr(tokenizer, "image_token", None) is None:
        log.warning("%s has no Gemma 4 image processor or image tokens; calibrating with text only", folder)
        return tokenizer
    return assemble(image_processor, tokenizer)
