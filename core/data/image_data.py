"""Image + text calibration data for vision-language models, with no model-specific knowledge.

Sources (all return a list of ``ImageText``):

- ``synthetic_images(n, seed)``: shapes drawn with Pillow on a plain background, each with the
  caption that describes it ("a red circle on a blue background").  Offline and deterministic.
- ``load_image_folder(path)``: every image in a folder; its caption is the text of the file with
  the same stem and a ``.txt`` suffix (``cat.png`` + ``cat.txt``); an image without one gets "".
- ``load_jsonl(path)``: one JSON object per line, ``{"image": "relative/or/absolute.png",
  "text": "caption"}`` (``caption`` is accepted for ``text``); image paths are relative to the file.
- ``load_parquet(path)``: a parquet file or folder of them (the layout of hub image datasets): an
  image column (``{"bytes": ...}`` structs, raw bytes or paths) and a text column.
- ``load_hub_dataset(name)``: downloads a hub dataset's parquet files (needs the network).

``image_text_samples(spec, n, seed)`` picks the source from ``spec`` (None = synthetic).
"""
from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .calibration_data import jsonl_records

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (235, 210, 40),
    "white": (245, 245, 245), "black": (15, 15, 15), "orange": (240, 140, 30), "purple": (140, 50, 170),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ((64, 64), (96, 64), (64, 96), (112, 84), (84, 112), (128, 128))
TEXT_COLUMNS = ("text", "caption", "captions", "sentence", "sentences", "description")
IMAGE_COLUMNS = ("image", "img", "picture", "images")


@dataclass
class ImageText:
    """One calibration record: a Pillow RGB image and the text that goes with it."""

    image: Any
    text: str


def _pil():
    try:
        from PIL import Image, ImageDraw
    except ImportError as e:  # pragma: no cover - Pillow is a declared extra
        raise DataError("image calibration needs Pillow; install it with pip install 'blockquant[vision]'") from e
    return Image, ImageDraw


def draw_shape(shape: str, fg: str, bg: str, size: tuple[int, int] = (64, 64)):
    """A ``size`` (width, height) RGB image of one ``fg`` shape centred on a ``bg`` background."""
    Image, ImageDraw = _pil()
    width, height = size
    image = Image.new("RGB", size, COLORS[bg])
    draw = ImageDraw.Draw(image)
    side = int(min(width, height) * 0.6)
    x0, y0 = (width - side) // 2, (height - side) // 2
    x1, y1 = x0 + side, y0 + side
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=COLORS[fg])
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=COLORS[fg])
    elif shape == "triangle":
        draw.polygon(((x0 + side // 2, y0), (x1, y1), (x0, y1)), fill=COLORS[fg])
    elif shape == "cross":
        bar = max(2, side // 4)
        cx, cy = width // 2, height // 2
        draw.rectangle((x0, cy - bar // 2, x1, cy + bar // 2), fill=COLORS[fg])
        draw.rectangle((cx - bar // 2, y0, cx + bar // 2, y1), fill=COLORS[fg])
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    return image


def synthetic_images(n: int, seed: int = 0, sizes: tuple[tuple[int, int], ...] = SIZES) -> list[ImageText]:
    """``n`` images of coloured shapes with matching captions; the same seed gives the same images."""
    rng = random.Random(seed)
    names = list(COLORS)
    out = []
    for _ in range(n):
        shape = rng.choice(SHAPES)
        fg = rng.choice(names)
        bg = rng.choice([c for c in names if c != fg])
        size = rng.choice(sizes)
        out.append(ImageText(draw_shape(shape, fg, bg, size), f"a {fg} {shape} on a {bg} background"))
    return out


def open_image(source: Any, where: str = ""):
    """A Pillow RGB image from a path, raw bytes, a ``{"bytes"|"path": ...}`` struct or an image."""
    Image, _ = _pil()
    try:
        if isinstance(source, dict):
            source = source.get("bytes") or source.get("path")
        if isinstance(source, (bytes, bytearray)):
            image = Image.open(io.BytesIO(source))
        elif isinstance(source, str):
            image = Image.open(source)
        elif hasattr(source, "convert"):
            image = source
        else:
            raise ValueError(f"unsupported image value of type {type(source).__name__}")
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {where or source!r} ({e}); remove it or fix the file") from e


def choose(count: int, n: int | None, seed: int = 0) -> list[int]:
    """Indices of the records to use: all of them, or a seeded choice of ``n`` kept in order."""
    if n is None or count <= n:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), n))


def load_image_folder(path: str, n: int | None = None, seed: int = 0) -> list[ImageText]:
    """Images of ``path`` (sorted by name) with the captions of their same-stem ``.txt`` files.

    With ``n``, only a seeded choice of ``n`` images is opened."""
    if not os.path.isdir(path):
        raise DataError(f"image folder {path} does not exist; pass a folder of images with same-name .txt captions")
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise DataError(
            f"no images in {path} (looked for {', '.join(IMAGE_SUFFIXES)}); add images with same-name .txt captions"
        )
    out = []
    for name in (names[i] for i in choose(len(names), n, seed)):
        caption_path = os.path.join(path, os.path.splitext(name)[0] + ".txt")
        text = ""
        if os.path.exists(caption_path):
            with open(caption_path, encoding="utf-8") as f:
                text = f.read().strip()
        out.append(ImageText(open_image(os.path.join(path, name)), text))
    return out


def load_jsonl(path: str, n: int | None = None, seed: int = 0) -> list[ImageText]:
    """Records ``{"image": path, "text": caption}`` of a .jsonl file; image paths relative to it.

    With ``n``, only a seeded choice of ``n`` records is opened."""
    if not os.path.isfile(path):
        raise DataError(f"calibration file {path} does not exist; pass a .jsonl of {{\"image\": ..., \"text\": ...}}")
    base = os.path.dirname(os.path.abspath(path))
    records = []
    for number, record in jsonl_records(path):
        if not isinstance(record, dict) or "image" not in record:
            raise DataError(f"{path} line {number} has no \"image\" field; write {{\"image\": ..., \"text\": ...}}")
        records.append((number, record))
    out = []
    for number, record in (records[i] for i in choose(len(records), n, seed)):
        image = record["image"]
        if isinstance(image, str) and not os.path.isabs(image):
            image = os.path.join(base, image)
        text = record.get("text", record.get("caption", ""))
        out.append(ImageText(open_image(image, f"{path} line {number}"), str(text or "")))
    if not out:
        raise DataError(f"{path} holds no records; write one {{\"image\": ..., \"text\": ...}} object per line")
    return out


def _pick_column(names: list[str], wanted: tuple[str, ...], path: str, what: str) -> str:
    for name in wanted:
        if name in names:
            return name
    raise DataError(f"{path} has no {what} column (looked for {', '.join(wanted)}; found {', '.join(names)})")


def load_parquet(path: str, n: int | None = None, seed: int = 0) -> list[ImageText]:
    """Rows of a parquet file (or every ``.parquet`` under a folder) as image + text records.

    With ``n``, only a seeded choice of ``n`` rows is decoded."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError("reading parquet datasets needs pyarrow; pip install 'blockquant[data]'") from e
    if os.path.isdir(path):
        files = sorted(os.path.join(d, n) for d, _, ns in os.walk(path) for n in ns if n.endswith(".parquet"))
    else:
        files = [path]
    if not files:
        raise DataError(f"no .parquet files under {path}")
    rows = []   # (file, row, image column, text column)
    for file in files:
        names = pq.read_schema(file).names
        image_col = _pick_column(names, IMAGE_COLUMNS, file, "image")
        text_col = _pick_column(names, TEXT_COLUMNS, file, "text")
        rows.extend((file, row, image_col, text_col) for row in range(pq.ParquetFile(file).metadata.num_rows))
    out: list[ImageText] = []
    tables: dict[str, Any] = {}
    for file, row, image_col, text_col in (rows[i] for i in choose(len(rows), n, seed)):
        if file not in tables:
            tables[file] = pq.read_table(file, columns=[image_col, text_col])
        image = tables[file].column(image_col)[row].as_py()
        text = tables[file].column(text_col)[row].as_py()
        if isinstance(image, list):   # a list of images per row: take the first
            image = image[0] if image else None
        if isinstance(text, list):
            text = text[0] if text else ""
        if image is not None:
            out.append(ImageText(open_image(image, f"{file} row {row}"), str(text or "")))
    return out


def load_hub_dataset(name: str, n: int | None = None, seed: int = 0) -> list[ImageText]:
    """Download ``name``'s parquet files from the hub (dataset repo) and read them."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(
            f"'{name}' is not a local folder or .jsonl and the hub is offline (HF_HUB_OFFLINE=1); "
            "pass a folder of images with .txt captions or a .jsonl of {\"image\", \"text\"} records"
        )
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(name, repo_type="dataset", allow_patterns=["*.parquet"])
    except Exception as e:  # network, auth, missing repo
        raise DataError(f"could not download dataset '{name}' ({type(e).__name__}: {e}); pass a local folder") from e
    return load_parquet(folder, n, seed)


def image_text_samples(spec: str | None, n: int, seed: int = 0) -> list[ImageText]:
    """``n`` records from ``spec``: None (synthetic), a folder, a .jsonl, a parquet, or a hub name.

    A source with more than ``n`` records gives a seeded random choice of ``n`` of them (in source
    order); one with fewer gives all it has.
    """
    if spec is None:
        return synthetic_images(n, seed)
    if os.path.isdir(spec):
        names = os.listdir(spec)
        if any(name.lower().endswith(IMAGE_SUFFIXES) for name in names):
            records = load_image_folder(spec, n, seed)
        elif any(name.endswith(".parquet") for _, _, files in os.walk(spec) for name in files):
            records = load_parquet(spec, n, seed)
        else:
            raise DataError(f"{spec} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no .parquet files; "
                            "add images with same-name .txt captions")
    elif spec.endswith(".jsonl"):
        records = load_jsonl(spec, n, seed)
    elif spec.endswith(".parquet"):
        records = load_parquet(spec, n, seed)
    elif os.path.exists(spec):
        raise DataError(f"{spec} is not a folder, .jsonl or .parquet file; pass images with captions in one of those")
    else:
        records = load_hub_dataset(spec, n, seed)
    if not records:
        raise DataError(f"{spec} holds no image + text records")
    return records
