"""Calibration prompts for FLUX: the offline default set and readers for user-given prompt sources.

A source is a list of strings, a text file (one prompt per line), a ``.tsv`` file (the column named
``caption``/``prompt``/``text`` if there is a header, otherwise the first column), a ``.jsonl`` file
(the field ``prompt``/``caption``/``text`` of each line), or - only when online - a hub dataset
``owner/name`` read with the ``datasets`` library.
"""
from __future__ import annotations

import csv
import os

from blockquant.errors import DataError

# Varied subjects, styles and compositions, written for this project.
DEFAULT_PROMPTS = (
    "a red fox standing in fresh snow at dawn, soft golden light",
    "a bowl of ramen with a soft boiled egg, top view, studio lighting",
    "an old lighthouse on a rocky coast during a storm, dramatic waves",
    "a watercolor painting of a quiet canal in a european town",
    "a close-up portrait of an elderly fisherman with a knitted hat",
    "a futuristic city skyline at night with neon signs and flying cars",
    "a child flying a yellow kite on a windy green hill",
    "a still life of lemons and a glass jug on a wooden table, oil painting",
    "a snowy mountain range reflected in a calm alpine lake",
    "a cozy reading nook with a armchair, a lamp and stacks of books",
    "an astronaut riding a horse across a desert, cinematic",
    "a macro photo of a dragonfly on a blade of grass with dew drops",
    "a pencil sketch of a cathedral facade with intricate details",
    "a busy street market in the rain, umbrellas and lanterns",
    "a minimalist poster of a sailing boat, flat colors, geometric shapes",
    "a steaming cup of coffee next to an open notebook, morning light",
    "a herd of elephants walking across the savanna at sunset",
    "a medieval knight in shining armor holding a banner",
    "a bright living room with large windows and indoor plants",
    "a pixel art scene of a castle on a floating island",
    "a hummingbird drinking nectar from a purple flower",
    "a vintage red bicycle leaning against a brick wall",
    "an underwater coral reef with colorful fish and sun rays",
    "a bowl of fresh fruit painted in the style of impressionism",
    "a wooden cabin in a pine forest covered with snow, smoke from the chimney",
    "a robot chef cooking pancakes in a small kitchen",
    "a black and white photograph of a jazz musician playing saxophone",
    "a field of sunflowers under a clear blue sky",
    "a dragon made of paper origami on a white background",
    "a night sky full of stars above a desert campsite",
    "a sign that says 'open late' above a small bakery door",
    "a tabby cat sleeping on a windowsill in the afternoon sun",
    "an ancient stone bridge over a misty river in autumn",
    "a plate of sushi arranged on a black slate, food photography",
    "a girl reading a book under a large oak tree, anime style",
    "a vintage car driving along a coastal road, summer",
    "a detailed map of a fantasy kingdom drawn on parchment",
    "a glass terrarium with moss and tiny mushrooms",
    "a marathon runner crossing the finish line, crowd cheering",
    "a colorful hot air balloon festival over green valleys",
    "a library with tall wooden shelves and a spiral staircase",
    "a three dimensional render of a small isometric island with a windmill",
    "a portrait of a woman with freckles, natural light, 85mm lens",
    "a rainy window with city lights blurred in the background",
    "a bowl of soup on a checkered tablecloth, rustic kitchen",
    "a polar bear swimming in icy arctic water",
    "a street artist painting a mural of a giant whale",
    "a lantern-lit japanese garden with a wooden bridge and koi pond",
)

_FIELDS = ("prompt", "caption", "text")


def _from_tsv(path: str) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if r]
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0]]
    column = next((header.index(k) for k in _FIELDS if k in header), None)
    if column is None:
        return [r[0] for r in rows]
    return [r[column] for r in rows[1:] if len(r) > column]


def _from_jsonl(path: str) -> list[str]:
    from blockquant.data.calibration_data import jsonl_records

    out = []
    for number, item in jsonl_records(path):
        if isinstance(item, str):
            out.append(item)
            continue
        value = next((item[k] for k in _FIELDS if isinstance(item, dict) and k in item), None)
        if value is None:
            raise DataError(f"{path}:{number} has no 'prompt', 'caption' or 'text' field; add one")
        out.append(value)
    return out


def _from_hub(name: str) -> list[str]:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise DataError(
            f"calibration prompts '{name}' are neither a local file nor available offline (HF_HUB_OFFLINE is set); "
            "pass a .txt/.tsv/.jsonl file of prompts, or omit --dataset for the built-in prompts"
        )
    try:
        import datasets  # noqa: PLC0415 - optional, online only
    except ImportError:
        raise DataError(f"reading the hub dataset '{name}' needs the 'datasets' package: pip install datasets") from None
    data = datasets.load_dataset(name, split="train", streaming=True)
    out = []
    for item in data:
        value = next((item[k] for k in _FIELDS if k in item), None)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, str):
            out.append(value)
        if len(out) >= 4096:
            break
    return out


def read_prompts(source) -> list[str]:
    """Prompts from ``source``: None (built-in set), a list/tuple of strings, a file path, or a hub name."""
    if source is None:
        return list(DEFAULT_PROMPTS)
    if isinstance(source, (list, tuple)):
        prompts = [str(p) for p in source]
    elif os.path.isfile(str(source)):
        path = str(source)
        if path.endswith(".tsv"):
            prompts = _from_tsv(path)
        elif path.endswith(".jsonl"):
            prompts = _from_jsonl(path)
        else:
            with open(path, encoding="utf-8") as f:
                prompts = f.read().splitlines()
    elif os.path.exists(str(source)):
        raise DataError(f"calibration prompts '{source}' is a folder; pass a .txt, .tsv or .jsonl file of prompts")
    else:
        prompts = _from_hub(str(source))
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise DataError(f"no prompts found in '{source}'; give at least one non-empty prompt")
    return prompts
