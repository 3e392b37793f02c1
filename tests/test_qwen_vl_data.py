"""Image + text calibration data (core/data/image_data.py, core/data/image_batches.py) on the qwen_vl example."""
from __future__ import annotations

import json

import pytest
import torch

from blockquant.adapters import qwen_vl
from blockquant.data import image_batches, image_data
from blockquant.frame import defaults
from blockquant.frame.contract import RunContext
from blockquant.data.calibration_data import CalibrationSource
from blockquant.config import RunSettings
from blockquant.errors import DataError


@pytest.fixture(scope="module")
def example():
    return qwen_vl.example_qwen25()


@pytest.fixture
def folder(tmp_path):
    for i, (shape, fg, bg) in enumerate([("circle", "red", "blue"), ("square", "green", "white"), ("cross", "black", "yellow")]):
        image_data.draw_shape(shape, fg, bg, (80 + 8 * i, 64)).save(tmp_path / f"img{i}.png")
        if i < 2:
            (tmp_path / f"img{i}.txt").write_text(f"a {fg} {shape} on a {bg} background\n")
    return tmp_path


# ----------------------------------------------------------------------------- core/image_data.py

def test_synthetic_images_match_their_captions_and_repeat_with_the_seed():
    records = image_data.synthetic_images(6, seed=3)
    again = image_data.synthetic_images(6, seed=3)
    assert [r.text for r in records] == [r.text for r in again]
    assert all(r.image.tobytes() == a.image.tobytes() for r, a in zip(records, again))
    assert [r.text for r in image_data.synthetic_images(6, seed=4)] != [r.text for r in records]
    for record in records:
        _, fg, shape, _, _, bg, _ = record.text.split()
        assert shape in image_data.SHAPES
        width, height = record.image.size
        assert record.image.getpixel((0, 0)) == image_data.COLORS[bg]          # corner: background
        if shape in ("circle", "square", "cross"):
            assert record.image.getpixel((width // 2, height // 2)) == image_data.COLORS[fg]   # centre: the shape


def test_image_folder_pairs_images_with_same_name_captions(folder):
    records = image_data.load_image_folder(str(folder))
    assert [r.text for r in records] == ["a red circle on a blue background", "a green square on a white background", ""]
    assert records[0].image.mode == "RGB" and records[0].image.size == (80, 64)
    two = image_data.image_text_samples(str(folder), 2, seed=0)
    assert len(two) == 2 and {r.text for r in two} <= {r.text for r in records}


def test_jsonl_records_with_relative_image_paths(folder):
    path = folder / "data.jsonl"
    path.write_text(json.dumps({"image": "img0.png", "text": "first"}) + "\n\n"
                    + json.dumps({"image": str(folder / "img1.png"), "caption": "second"}) + "\n")
    records = image_data.image_text_samples(str(path), 8)
    assert [r.text for r in records] == ["first", "second"]
    assert records[1].image.size == (88, 64)


def test_parquet_with_image_bytes(folder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [{"bytes": (folder / f"img{i}.png").read_bytes(), "path": None} for i in range(3)]
    pq.write_table(pa.table({"image": images, "caption": ["one", "two", "three"]}), folder / "d.parquet")
    records = image_data.image_text_samples(str(folder / "d.parquet"), 2, seed=1)
    assert len(records) == 2 and all(r.image.mode == "RGB" for r in records)
    assert {r.text for r in records} <= {"one", "two", "three"}


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "none", "does not exist"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "holds no images"),
    (lambda d: (d / "bad.jsonl").write_text("{not json}\n") and d / "bad.jsonl", "not valid JSON"),
    (lambda d: (d / "noimg.jsonl").write_text('{"text": "x"}\n') and d / "noimg.jsonl", "no \"image\" field"),
    (lambda d: (d / "broken.jsonl").write_text('{"image": "missing.png"}\n') and d / "broken.jsonl", "cannot read image"),
    (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", "not a folder, .jsonl or .parquet"),
    (lambda d: "someorg/some-dataset", "offline"),
])
def test_bad_image_sources_are_data_errors(tmp_path, monkeypatch, make, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = make(tmp_path)
    if str(spec).endswith("none"):
        with pytest.raises(DataError, match=message):
            image_data.load_image_folder(str(spec))
        return
    with pytest.raises(DataError, match=message):
        image_data.image_text_samples(str(spec), 4)


# ----------------------------------------------------------------------------- calibration batches (core)

def _source(example, spec=None, images=None):
    return CalibrationSource(spec=spec, tokenizer=example.processor.tokenizer, processor=example.processor, images=images)


def _batches(example, source, settings):
    """The engine's default calibration_batches hook, as a run calls it."""
    return defaults.calibration_batches(model=example.model, source=source, settings=settings,
                                        ctx=RunContext(settings=settings))


def test_calibration_samples_are_chat_prompts_with_one_image_each(example):
    settings = RunSettings(nsamples=5, batch_size=2, seqlen=128)
    batches = _batches(example, _source(example), settings)
    assert len(batches) == 5 and all(b["input_ids"].shape[0] == 1 for b in batches)   # one sample per record
    tokenizer = example.processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for batch in batches:
        assert batch["use_cache"] is False
        assert batch["image_grid_thw"].shape == (1, 3)
        assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())
        assert int((batch["input_ids"][0] == image_id).sum()) == int(batch["image_grid_thw"][0].prod()) // 4  # merge 2x2
        text = tokenizer.decode(batch["input_ids"][0])
        assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
        assert "Describe the image.<|im_end|>\n<|im_start|>assistant\na " in text and " background<|im_end|>" in text
    with torch.no_grad():
        example.model(**batches[0])


def test_calibration_from_an_image_folder_and_text_only_fallback(example, folder, tmp_path):
    settings = RunSettings(nsamples=3, batch_size=3, seqlen=64)
    batches = _batches(example, _source(example, images=str(folder)), settings)
    assert len(batches) == 3
    assert any("red circle" in example.processor.tokenizer.decode(b["input_ids"][0]) for b in batches)
    # --dataset naming a folder of images works the same way
    assert image_batches.image_source(_source(example, spec=str(folder))) == str(folder)
    # --dataset naming plain text: the engine's text calibration (one row of exactly seqlen tokens each)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"paragraph {i} about a red circle on a blue background" for i in range(50)))
    batches = _batches(example, _source(example, spec=str(text)), RunSettings(nsamples=2, seqlen=16))
    assert len(batches) == 2 and batches[0]["input_ids"].shape == (1, 16) and "pixel_values" not in batches[0]


def test_long_captions_are_cut_to_seqlen_but_image_tokens_never(example):
    record = image_data.ImageText(image_data.draw_shape("circle", "red", "blue"), "a red circle " * 100)
    full = image_batches.image_text_batches(example.processor, [record], seqlen=10_000)[0]["input_ids"]
    short = image_batches.image_text_batches(example.processor, [record], seqlen=40)[0]["input_ids"]
    image_id = example.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert short.shape[1] <= 40 < full.shape[1] - 100
    assert int((short == image_id).sum()) == int((full == image_id).sum()) > 0


def test_image_calibration_without_an_image_processor_is_text_only(example):
    source = CalibrationSource(tokenizer=example.processor.tokenizer, processor=example.processor.tokenizer)
    batches = _batches(example, source, RunSettings(nsamples=1, seqlen=16))
    assert "pixel_values" not in batches[0]
    with pytest.raises(DataError, match="processor"):
        image_batches.image_text_batches(example.processor.tokenizer, [], seqlen=16)


def test_vision_group_with_text_only_data_is_a_data_error(example, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("some text\n\nmore text")
    settings = RunSettings(nsamples=2, include_groups=("vision",))
    with pytest.raises(DataError, match="vision blocks need image calibration"):
        _batches(example, _source(example, spec=str(text)), settings)
