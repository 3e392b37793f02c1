"""Replay equivalence of the qwen_vl adapter through the engine (``blockquant.api.verify``), with images.

Qwen2.5-VL: window and full-attention vision blocks get their own cu_seqlens; Qwen3-VL: deepstack
features are re-injected after the early text layers.  M-RoPE position embeddings are stored once
per sample.
"""
from __future__ import annotations

import pytest
import torch

from blockquant import api
from blockquant.adapters import qwen_vl
from blockquant.adapters.qwen_vl import replay

SETTINGS = dict(nsamples=4, batch_size=2, seqlen=64, group_size=32)
TEXT, VISION = "model.language_model.layers", "model.visual.blocks"


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen25")
    qwen_vl.example_qwen25().save(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3")
    qwen_vl.example_qwen3().save(str(folder))
    return str(folder)


def _assert_equivalent(report, groups):
    names = [b.name for b in report.blocks]
    assert names == [f"{g}.{i}" for g in groups for i in range(4)]
    assert report.samples == 4      # one sample per calibration record
    assert report.ok, report.render()
    assert report.max_error <= 1e-5
    assert all(not b.differing_kwargs for b in report.blocks), report.render()


def test_qwen25_replay_matches_the_forward_text_and_vision(qwen25):
    report = api.verify(qwen25, adapter="qwen_vl", quant_vision=True, **SETTINGS)
    _assert_equivalent(report, [TEXT, VISION])


def test_qwen25_vision_cu_seqlens_also_replay_when_the_engine_caches_them(qwen25):
    report = api.verify(qwen25, adapter="qwen_vl", quant_vision=True, variable_inputs="cache", **SETTINGS)
    _assert_equivalent(report, [TEXT, VISION])


def test_qwen3_replay_matches_the_forward_with_deepstack(qwen3):
    report = api.verify(qwen3, adapter="qwen_vl", quant_vision=True, **SETTINGS)
    _assert_equivalent(report, [TEXT, VISION])


def test_replay_without_deepstack_reinjection_diverges(qwen3):
    report = api.verify(qwen3, adapter="qwen_vl", reinject_deepstack=False, **SETTINGS)
    assert not report.ok
    bad = report.first_divergent
    assert bad.name == f"{TEXT}.1" and bad.rel_error > 1e-2 and "hidden_states" in bad.differing_kwargs


def _captured(folder, **extra):
    settings = api.make_settings(**dict(SETTINGS, **extra))
    run = api.prepare(folder, "qwen_vl", settings)
    api.capture_inputs(run)
    return run


def test_mrope_position_embeddings_are_stored_once_per_sample(qwen25):
    run = _captured(qwen25, quant_vision=True)
    text, vision = run.stores
    assert len(text) == len(vision) == 4
    assert all(batch["input_ids"].shape[0] == 1 for batch in run.batches)   # one image + caption per sample
    for store in (text, vision):
        assert store.per_block == {} and store.nbytes()["per_block"] == 0
        # different images: per-sample position embeddings, one copy per sample (not per block)
        assert "position_embeddings" not in store.shared
        assert all("position_embeddings" in sample for sample in store.per_sample)
    cos = [sample["position_embeddings"][0] for sample in text.per_sample]
    assert cos[0].shape[-2] != cos[1].shape[-2] or not torch.equal(cos[0], cos[1])
    # M-RoPE: image tokens have 3D (temporal, height, width) positions, unlike plain 1D positions
    hidden = text.streams[0]["hidden_states"]
    rows, length = hidden.shape[:2]
    plain, _ = run.model.model.language_model.rotary_emb(hidden, torch.arange(length).expand(3, rows, length))
    assert cos[0].shape == plain.shape and not torch.allclose(cos[0], plain)
    # vision extras: window and whole-image cu_seqlens differ, and the text sample carries no vision extras
    seqlens = vision.extras[0][replay.VISION_SEQLENS_KEY]
    assert seqlens["full_blocks"] == (1, 3) and len(seqlens["window"]) > len(seqlens["full"])
    assert not any(replay.VISION_SEQLENS_KEY in e for e in text.extras)


def test_deepstack_features_are_recorded_per_text_sample(qwen3):
    run = _captured(qwen3)
    (text,) = run.stores
    for extras, sample_streams in zip(text.extras, text.streams):
        masks, features = extras[replay.DEEPSTACK_KEY]
        hidden = sample_streams["hidden_states"]
        assert masks.shape == hidden.shape[:2] and masks.dtype == torch.bool
        assert len(features) == 2 and all(f.shape == (int(masks.sum()), hidden.shape[-1]) for f in features)
