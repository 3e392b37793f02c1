"""The gemma4 tiny example models, the folders they save, loading them back, and image calibration."""
from __future__ import annotations

import json
import os

import pytest
import torch

from blockquant import api
from blockquant.frame import plugins
from blockquant.adapters import gemma4
from blockquant.data.processors import load_processor
from blockquant.errors import DataError
from blockquant.data.image_data import draw_shape
from blockquant.model.model_io import ModelSource


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma4-examples")
    text, mm = gemma4.example_text(), gemma4.example_multimodal()
    text.save(str(root / "text"))
    mm.save(str(root / "mm"))
    return {"text": (text, str(root / "text")), "mm": (mm, str(root / "mm"))}


def test_text_example_has_both_layer_types_kv_sharing_and_per_layer_inputs(saved):
    example, folder = saved["text"]
    model = example.model
    assert type(model).__name__ == "Gemma4ForCausalLM" and model.config.model_type == "gemma4_text"
    assert 200_000 < sum(p.numel() for p in model.parameters()) < 400_000
    assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    shared = [layer.self_attn.is_kv_shared_layer for layer in model.model.layers]
    assert shared == [False, False, True, True]
    assert not hasattr(model.model.layers[3].self_attn, "k_proj")
    assert model.model.hidden_size_per_layer_input == 32
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(folder))
    again = gemma4.example_text()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.model.state_dict().values()))


def test_multimodal_example_processes_an_image_and_reloads(saved):
    import transformers

    example, folder = saved["mm"]
    assert type(example.model).__name__ == "Gemma4ForConditionalGeneration"
    assert example.model.config.model_type == "gemma4"
    assert "preprocessor_config.json" in os.listdir(folder)
    image = draw_shape("circle", "red", "blue", (64, 48))
    batch = example.processor(text=["<|image|> a red circle"], images=[[image]], return_tensors="pt")
    image_tokens = (batch["input_ids"] == example.model.config.image_token_id).sum().item()
    assert image_tokens == (batch["mm_token_type_ids"] == 1).sum().item() > 0
    with torch.no_grad():
        logits = example.model(**batch, use_cache=False).logits
    loaded = load_processor(folder)     # no torchvision here: assembled from its parts
    assert type(loaded).__name__ == "Gemma4ProcessorPartial" and type(loaded.tokenizer).__name__ == "GemmaTokenizer"
    assert loaded.tokenizer.image_token == "<|image|>" and loaded.tokenizer.bos_token == "<bos>"
    again = loaded(text=["<|image|> a red circle"], images=[[image]], return_tensors="pt")
    assert all(torch.equal(again[k], batch[k]) for k in batch)
    reloaded = transformers.Gemma4ForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**again, use_cache=False).logits, logits)


@pytest.mark.parametrize("kind, model_type", [("text", "gemma4_text"), ("mm", "gemma4")])
def test_folders_select_the_gemma4_adapter(saved, kind, model_type):
    source = ModelSource.resolve(saved[kind][1])
    assert source.model_type == model_type
    assert plugins.detect_adapter(source).name == "gemma4"


def _calibration(folder, **settings):
    run = api.prepare(folder, "gemma4", api.make_settings(**settings))
    from blockquant.data.calibration_data import CalibrationSource

    processor = run.loaded.processor
    source = CalibrationSource(spec=run.settings.dataset, tokenizer=getattr(processor, "tokenizer", processor),
                               processor=processor, images=run.settings.images)
    return run, run.hooks.calibration_batches(model=run.model, source=source, settings=run.settings)


def test_image_calibration_from_a_jsonl_and_a_folder(saved, tmp_path):
    _, folder = saved["mm"]
    lines = []
    for i, (shape, size) in enumerate([("square", (48, 48)), ("triangle", (80, 40)), ("cross", (40, 64))]):
        draw_shape(shape, "yellow", "black", size).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"a yellow {shape} " + "on a black background " * 20)
        lines.append(json.dumps({"image": f"{i}.png", "text": f"a yellow {shape}"}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    for images in (str(tmp_path / "data.jsonl"), str(tmp_path)):
        run, batches = _calibration(folder, images=images, nsamples=3, seqlen=90)
        assert len(batches) == 3
        for batch in batches:
            assert set(batch) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                                  "image_position_ids", "use_cache"}
            assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[-1] <= 90
            assert (batch["mm_token_type_ids"] == 1).any()
    # long captions (folder) were cut to the budget, short ones (jsonl) kept whole
    assert max(b["input_ids"].shape[-1] for b in batches) >= 80


def test_text_calibration_is_the_engines_and_vision_needs_images(saved):
    _, text_folder = saved["text"]
    _, batches = _calibration(text_folder, nsamples=2, seqlen=16)
    assert len(batches) == 2 and set(batches[0]) == {"input_ids", "attention_mask"}
    _, mm_folder = saved["mm"]
    _, batches = _calibration(mm_folder, nsamples=2, seqlen=64)     # no data given: synthetic images
    assert len(batches) == 2 and all((b["mm_token_type_ids"] == 1).any() for b in batches)
    texts = os.path.join(os.path.dirname(mm_folder), "texts.txt")
    with open(texts, "w") as f:
        f.write("plain text only\n" * 20)
    with pytest.raises(DataError, match="--images"):
        _calibration(mm_folder, quant_vision=True, dataset=texts, nsamples=2, seqlen=16)
