"""The tokenizer or processor of a model folder, for calibration - also without torchvision.

Many multimodal processors bundle a video processor
(and sometimes an audio feature extractor) whose classes need torchvision; where it is missing,
``AutoProcessor`` fails although images and text need neither.  ``load_processor`` then assembles
the folder's own processor class (named by ``processor_class`` in its processor_config.json or
preprocessor_config.json) from the parts that load - the tokenizer and the image processor, the
Pillow variant where the default one needs torchvision - with the other parts left out.  Where
torchvision is installed, ``AutoProcessor`` loads the processor unchanged.  Folders written for
tests record the real ``processor_class`` for that reason (an assembled processor's ``save_pretrained``).
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import os

import transformers

log = logging.getLogger("blockquant")

PART_SUFFIXES = ("_processor", "feature_extractor", "tokenizer")
CONFIG_FILES = ("processor_config.json", "preprocessor_config.json")


def _read(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def processor_class_name(folder: str) -> str | None:
    """The processor class a folder declares (``processor_class``), or None."""
    for name in CONFIG_FILES:
        value = _read(folder, name).get("processor_class")
        if isinstance(value, str):
            return value
    return None


def read_chat_template(folder: str) -> str | None:
    """The chat template of a model folder: chat_template.jinja, chat_template.json or a config's."""
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        template = _read(folder, name).get("chat_template")
        if isinstance(template, str):
            return template
    return None


@functools.lru_cache(maxsize=None)
def partial_class(processor_class: str):
    """A subclass of the transformers processor ``processor_class`` whose parts may be None, and whose
    ``save_pretrained`` writes what ``load_processor`` needs to rebuild it (``save_parts``)."""
    base = getattr(transformers, processor_class)

    def check_argument_for_proper_class(self, attribute_name, arg):
        if arg is None:
            return None
        return base.check_argument_for_proper_class(self, attribute_name, arg)

    def save_pretrained(self, folder, **kwargs):
        save_parts(self, processor_class, folder)

    return type(f"{processor_class}Partial", (base,), {
        "check_argument_for_proper_class": check_argument_for_proper_class, "save_pretrained": save_pretrained,
        "__doc__": f"{processor_class} built from the parts that load without torchvision.",
    })


def assemble(processor_class: str, chat_template: str | None = None, **parts):
    """``processor_class`` from ``parts`` (e.g. ``image_processor=..., tokenizer=...``); parts the
    class takes but not given are None."""
    cls = partial_class(processor_class)
    params = inspect.signature(getattr(transformers, processor_class).__init__).parameters
    kwargs = {name: parts.get(name) for name in params if name.endswith(PART_SUFFIXES)}
    if chat_template is not None and "chat_template" in params:
        kwargs["chat_template"] = chat_template
    return cls(**kwargs)


def load_image_processor(folder: str):
    """The folder's image processor: the auto class, else its Pillow variant; None when it has none."""
    config = _read(folder, "preprocessor_config.json")
    if not config:
        return None
    try:
        return transformers.AutoImageProcessor.from_pretrained(folder)
    except Exception as e:  # the default class may need torchvision
        name = str(config.get("image_processor_type", ""))
        pil = getattr(transformers, name.removesuffix("Fast") + "Pil", None) if name else None
        if pil is None:
            log.warning("no image processor for %s (%s); calibrating with text only", folder, e)
            return None
        return pil.from_pretrained(folder)


def load_processor(folder: str):
    """What calibration needs from ``folder``: its processor when it declares one (assembled without
    torchvision where needed), else its tokenizer; None when it has neither."""
    declared = processor_class_name(folder)
    if declared:
        try:
            processor = transformers.AutoProcessor.from_pretrained(folder)
            if hasattr(processor, "image_processor"):
                return processor
        except Exception as e:  # typically ImportError: a video processor needs torchvision
            log.debug("AutoProcessor could not load %s (%s); assembling %s from its parts", folder, e, declared)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        log.warning("no tokenizer in %s (%s)", folder, e)
        return None
    image_processor = load_image_processor(folder) if declared else None
    if image_processor is None or not hasattr(transformers, declared or ""):
        return tokenizer
    return assemble(declared, read_chat_template(folder), image_processor=image_processor, tokenizer=tokenizer)


def save_parts(processor, processor_class: str, folder: str) -> None:
    """Write an assembled processor where ``save_pretrained`` of the real class cannot run (some parts are
    missing): the tokenizer, the image processor, and a processor_config.json naming the real class
    ``processor_class`` with the processor's own settings."""
    os.makedirs(folder, exist_ok=True)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    config = {"processor_class": processor_class}
    for key in ("image_seq_length", "patch_size", "vision_feature_select_strategy", "num_additional_image_tokens"):
        if isinstance(getattr(processor, key, None), (int, str)):
            config[key] = getattr(processor, key)
    with open(os.path.join(folder, "processor_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    template = getattr(processor, "chat_template", None)
    if isinstance(template, str):
        with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(template)
