"""Replay equivalence and capture-store size of the gemma4 adapter, through the engine's verify/capture.

Each text block's per-layer input, rope and mask of its layer type, and the shared KV state read by
KV-shared layers are rebuilt from block 0's inputs; replay must reproduce the model's own forward
(fp32, relative error <= 1e-5) on text and on image + text, with and without KV sharing, and the
capture store must not grow with the number of layers.
"""
from __future__ import annotations

import os

import pytest

from blockquant import api
from blockquant.adapters import gemma4
from blockquant.adapters.gemma4 import replay
from blockquant.data.image_data import draw_shape

TEXT = "model.layers"
MM_TEXT, VISION = "model.language_model.layers", "model.vision_tower.encoder.layers"
SETTINGS = dict(nsamples=2, seqlen=40)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Saved example models, built on first use: folders(kind), kind a key of ``builders``."""
    root, made = tmp_path_factory.mktemp("gemma4"), {}
    builders = {
        "text4": lambda: gemma4.example_text(4, kv_shared=0),
        "text4kv": lambda: gemma4.example_text(4, kv_shared=2),
        "text12kv": lambda: gemma4.example_text(12, kv_shared=2),
        # like the larger Gemma 4 models: no per-layer inputs, keys = values on full layers, MoE blocks
        "text4moe": lambda: gemma4.example_text(4, kv_shared=0, hidden_size_per_layer_input=0, attention_k_eq_v=True,
                                                num_global_key_value_heads=1, enable_moe_block=True, num_experts=4,
                                                top_k_experts=2, moe_intermediate_size=32),
        "mm": lambda: gemma4.example_multimodal(),
        # image tokens attend to each other bidirectionally in sliding layers (larger Gemma 4 models)
        "mmbidir": lambda: gemma4.example_multimodal(use_bidirectional_attention="vision"),
    }

    def get(kind):
        if kind not in made:
            made[kind] = str(root / kind)
            builders[kind]().save(made[kind])
        return made[kind]
    return get


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of two drawn images with same-name captions (different sizes: different token counts)."""
    folder = tmp_path_factory.mktemp("images")
    for i, (shape, fg, bg, size) in enumerate([("circle", "red", "blue", (64, 48)), ("cross", "green", "white", (40, 72))]):
        draw_shape(shape, fg, bg, size).save(os.path.join(folder, f"{i}.png"))
        (folder / f"{i}.txt").write_text(f"a {fg} {shape} on a {bg} background")
    return str(folder)


def _assert_equivalent(report, paths, layers):
    assert [b.name for b in report.blocks] == [f"{p}.{i}" for p, n in zip(paths, layers) for i in range(n)]
    assert report.samples == 2
    assert report.ok, report.render()
    assert report.max_error <= 1e-5
    assert all(not b.differing_kwargs for b in report.blocks), report.render()


@pytest.mark.parametrize("kind", ["text4", "text4kv", "text4moe"])
def test_text_replay_matches_the_forward(folders, kind):
    _assert_equivalent(api.verify(folders(kind), adapter="gemma4", **SETTINGS), [TEXT], [4])


def test_multimodal_replay_with_images_matches_the_forward(folders, images):
    report = api.verify(folders("mm"), adapter="gemma4", images=images, seqlen=96, nsamples=2)
    _assert_equivalent(report, [MM_TEXT], [4])


def test_multimodal_bidirectional_replay_of_text_and_vision_groups(folders, images):
    report = api.verify(folders("mmbidir"), adapter="gemma4", images=images, quant_vision=True, seqlen=96, nsamples=2)
    _assert_equivalent(report, [MM_TEXT, VISION], [4, 2])


def test_cache_fallback_replays_too(folders):
    report = api.verify(folders("text4kv"), adapter="gemma4", variable_inputs="cache", **SETTINGS)
    _assert_equivalent(report, [TEXT], [4])


def test_replay_without_rebuild_breaks_on_the_full_attention_layer(folders, monkeypatch):
    """Control: giving every block block 0's (sliding) inputs fails as the reported crash did."""
    def only_shared_kv(block, cached, strategy, inner, only_shared_kv):
        return {"shared_kv_states": replay.shared_kv(block, cached, strategy)}

    monkeypatch.setattr(replay, "rebuild", only_shared_kv)
    with pytest.raises(RuntimeError, match="must match the size of tensor"):
        api.verify(folders("text4kv"), adapter="gemma4", **SETTINGS)


def _store_bytes(folder, **settings):
    run = api.prepare(folder, "gemma4", api.make_settings(**dict(SETTINGS, nsamples=3, **settings)))
    api.capture_inputs(run)
    (store,) = run.stores
    return store.nbytes()


def test_capture_store_does_not_grow_with_layers_under_rebuild(folders):
    small, large = _store_bytes(folders("text4kv")), _store_bytes(folders("text12kv"))
    assert small["per_block"] == large["per_block"] == 0
    assert small["total"] == large["total"], (small, large)


def test_capture_store_grows_with_layers_under_the_cache_fallback(folders):
    small = _store_bytes(folders("text4kv"), variable_inputs="cache")
    large = _store_bytes(folders("text12kv"), variable_inputs="cache")
    rebuilt = _store_bytes(folders("text4kv"))
    assert small["per_block"] > 0 and large["per_block"] >= small["per_block"]
    assert rebuilt["total"] < small["total"] < large["total"]
