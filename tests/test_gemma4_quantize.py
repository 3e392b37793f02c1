"""End to end with the gemma4 adapter: quantize -> export -> blockquant.load_quantized -> logits.

Measured on the tiny random text model (RTN, group size 32, 8 x 64 calibration tokens): W8 gives
logits within about 8% relative error of the fp model (the same next token at 84% of the test text's
positions with the example's GemmaTokenizer), W4 about 68%.  Random Gemma 4 blocks amplify
weight noise (q/k norms with attention scaling 1.0): a 0.5% weight error is a 2% hidden-state error
after one layer.  The bounds below leave room for that, and W4 must stay clearly worse than W8.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from blockquant import api, load_quantized
from blockquant.adapters import gemma4

SETTINGS = dict(nsamples=4, seqlen=48, batch_size=4, group_size=32)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    example = gemma4.example_text()
    folder = str(tmp_path_factory.mktemp("gemma4-text") / "model")
    example.save(folder)
    ids = example.processor(["Quantized models should still predict the next word well. " * 3],
                            return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = example.model(ids, use_cache=False).logits
    return folder, ids, logits


def _quantized_logits(folder, out, ids, expect_layers=32, **settings):
    """Quantize, load the export back, return its logits; 32 layers: 9 per block, 7 in KV-shared blocks."""
    result = api.quantize(folder, adapter="gemma4", output_dir=out, **dict(SETTINGS, **settings))
    model = load_quantized(result.output_dir)
    assert sum(type(m).__name__ == "QuantLinear" for m in model.modules()) == expect_layers
    with torch.no_grad():
        return model(ids, use_cache=False).logits, result


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_w8_and_w4_round_trip_close_to_fp(text, tmp_path):
    folder, ids, fp = text
    w8, result = _quantized_logits(folder, str(tmp_path / "w8"), ids, scheme="W8A16", iters=0)
    w4, _ = _quantized_logits(folder, str(tmp_path / "w4"), ids, scheme="W4A16", iters=0)
    e8, e4 = _rel(w8, fp), _rel(w4, fp)
    print(f"relative logits error: W8 g32 {e8:.4f}, W4 g32 {e4:.4f}")
    assert e8 < 0.15 and e4 < 1.0 and e8 < e4 / 3
    assert (w8.argmax(-1) == fp.argmax(-1)).float().mean() > 0.75
    assert torch.nn.functional.cosine_similarity(w4.flatten(), fp.flatten(), dim=0) > 0.7
    with open(os.path.join(result.output_dir, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "gemma4_text" and config["quantization_config"]["bits"] == 8


def test_tuning_lowers_the_block_loss(text, tmp_path):
    folder, ids, fp = text
    _, result = _quantized_logits(folder, str(tmp_path / "w4t"), ids, scheme="W4A16", iters=4, lr=0.05)
    blocks = result.report.blocks
    assert [b.name for b in blocks] == [f"model.layers.{i}" for i in range(4)]
    assert all(b.best_loss < b.first_loss for b in blocks), [(b.first_loss, b.best_loss) for b in blocks]


def test_cli_quantizes_the_example_model_without_a_model_argument(tmp_path):
    out = tmp_path / "cli-out"
    cmd = [sys.executable, "-m", "blockquant.frame.cli", "--adapter", "gemma4", "--iters", "0", "--nsamples", "2",
           "--seqlen", "32", "--group_size", "32", "--output_dir", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    model = load_quantized(str(out))
    assert type(model).__name__ == "Gemma4ForCausalLM"


def test_a_storing_block_left_in_full_precision_still_feeds_the_kv_shared_blocks(text, tmp_path):
    """Block 1 (the last full-attention layer before the KV-shared ones) has nothing to tune, yet its
    keys/values must reach block 3 in both replay streams (fp targets and quantized)."""
    folder, ids, fp = text
    logits, result = _quantized_logits(folder, str(tmp_path / "keep1"), ids, scheme="W4A16", iters=1,
                                       ignore_layers=("model.layers.1.",), expect_layers=23)
    assert [b.layers for b in result.report.blocks] == [9, 0, 7, 7]


def test_multimodal_with_the_vision_tower_round_trips(tmp_path):
    from blockquant.data.image_data import draw_shape

    images = tmp_path / "images"
    images.mkdir()
    for i, (shape, size) in enumerate([("circle", (64, 48)), ("square", (40, 72))]):
        draw_shape(shape, "red", "blue", size).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a red {shape} on a blue background")
    example = gemma4.example_multimodal()
    folder = str(tmp_path / "mm")
    example.save(folder)
    batch = example.processor(text=["<|image|> a purple triangle"],
                              images=[[draw_shape("triangle", "purple", "white", (60, 60))]], return_tensors="pt")
    with torch.no_grad():
        fp = example.model(**batch, use_cache=False).logits
    result = api.quantize(folder, adapter="gemma4", output_dir=str(tmp_path / "out"), scheme="W8A16", iters=0,
                          images=str(images), quant_vision=True, **dict(SETTINGS, seqlen=96, nsamples=2))
    assert "preprocessor_config.json" in os.listdir(result.output_dir)
    model = load_quantized(result.output_dir)
    names = [n for n, m in model.named_modules() if type(m).__name__ == "QuantLinear"]
    assert len(names) == 46 and sum(".vision_tower." in n for n in names) == 14   # 7 linears x 2 vision blocks
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    assert _rel(logits, fp) < 0.15
