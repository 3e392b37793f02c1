"""Samples of different lengths share one right-padded forward (core/run/padding.py): the tuning loss and
the gradients of the rounding offsets and clipping scales equal those of the sample-by-sample path on the
real tokens, on real tiny models (a Llama with prompts of three lengths, Qwen2.5-VL with images of three
sizes, and its vision blocks, whose images are packed rather than padded); a block whose padded forward
would differ runs sample by sample."""
from __future__ import annotations

import os

import pytest
import torch

from blockquant import api, hookimpl
from blockquant.adapters import qwen_vl
from blockquant.adapters.generic import build_example
from blockquant.algorithm.tuned_linear import TunedLinear
from blockquant.data.image_data import draw_shape
from blockquant.model.blocks import choose_layers
from blockquant.run.replay import Replayer, stream_loss

LENGTHS = (19, 32, 45, 27)
IMAGE_SIZES = ((56, 56), (112, 56), (112, 112), (84, 56))


class _Prompts:
    """Calibration batches of the given lengths (a plugin registered on the run's plugin manager)."""

    def __init__(self, vocab: int):
        g = torch.Generator().manual_seed(3)
        self.batches = [{"input_ids": torch.randint(3, vocab, (1, n), generator=g),
                         "attention_mask": torch.ones(1, n, dtype=torch.long)} for n in LENGTHS]

    @hookimpl(tryfirst=True)
    def calibration_batches(self):
        return self.batches


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    build_example("llama").save(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen25")
    qwen_vl.example_qwen25().save(str(folder))
    images = folder / "images"
    images.mkdir()
    for i, size in enumerate(IMAGE_SIZES):
        draw_shape("circle", "red", "blue", size).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("a red circle on a blue background" + " again" * i)
    return str(folder)


def _captured(folder, adapter, plugin=None, **settings):
    run = api.prepare(folder, adapter, api.make_settings(nsamples=4, seqlen=96, group_size=32, **settings))
    if plugin is not None:
        run.hooks.pm.register(plugin)
    api.capture_inputs(run)
    return run


def _loss_and_grads(run, pad: bool, position: int = 0, group: int = 0):
    """Block ``position`` of group ``group``: fp targets, then one tuning loss over all samples and its
    backward, with rounding offsets and clipping scales set away from round-to-nearest."""
    block = run.groups[group][position]
    run.loader.load(block)
    for p in block.module.parameters():
        p.requires_grad_(False)
    store = run.stores[group]
    n = len(store)
    replayer = Replayer(run.hooks, store, run.device, run.compute_dtype, pad=pad, pack=run.traits.pack_boundaries)
    with torch.no_grad():
        targets = replayer.run(block, [dict(s) for s in store.streams], [{} for _ in range(n)], "fp", batch=n)
    layers = choose_layers(block, run.settings.scheme, run.traits.fp_layers, run.settings.ignore_layers).quantize
    assert layers
    tuned = {name: TunedLinear(layer, run.settings.scheme, tune_minmax=True) for name, layer in layers.items()}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for st in tuned.values():
            st.v.copy_(torch.rand(st.v.shape, generator=g) - 0.5)
            st.min_scale.copy_(0.8 + 0.2 * torch.rand(st.min_scale.shape, generator=g))
            st.max_scale.copy_(0.8 + 0.2 * torch.rand(st.max_scale.shape, generator=g))
    calls = []
    handle = block.module.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        for st in tuned.values():
            st.install()
        with torch.enable_grad():
            outs = replayer.run(block, [dict(s) for s in store.streams], [{} for _ in range(n)], "quant",
                                list(range(n)), batch=n)
            loss = stream_loss(outs, targets)
            # scaled by 2^20 (exactly): the clipping scales' gradients pass a float16 rounding of the scale,
            # which flushes gradients this small (the loss of a random tiny block) to float16 subnormals
            (loss * 2.0 ** 20).backward()
        grads = {name: [p.grad.clone() for p in st.params()] for name, st in tuned.items()}
    finally:
        handle.remove()
        for st in tuned.values():
            st.uninstall()
            st.finish(None)
    return float(loss.detach()), grads, len(calls), replayer


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _assert_same(padded, alone, n):
    loss, grads, calls, replayer = padded
    loss_1, grads_1, calls_1, _ = alone
    assert calls == 1 and calls_1 == n, (calls, calls_1)     # one forward for all samples vs one per sample
    assert all(replayer.paddable.values()) and replayer.paddable
    assert loss == pytest.approx(loss_1, rel=1e-5)
    for name in grads_1:
        for got, want in zip(grads[name], grads_1[name]):
            assert float(want.abs().sum()) > 0, name
            # offsets: float32 rounding; clipping scales: one float16 step where rounding flips
            assert _rel(got, want) <= (1e-5 if got.shape == grads[name][0].shape else 2e-3), name


@pytest.mark.parametrize("position", [0, 3])
def test_prompts_of_different_lengths_give_the_sample_by_sample_loss_and_gradients(llama, position):
    run = _captured(llama, "generic", _Prompts(512))
    lengths = [s["hidden_states"].shape[1] for s in run.stores[0].streams]
    assert sorted(lengths) == sorted(LENGTHS)
    _assert_same(_loss_and_grads(run, True, position), _loss_and_grads(run, False, position), len(LENGTHS))


def test_images_of_different_sizes_give_the_sample_by_sample_loss_and_gradients(qwen25):
    run = _captured(qwen25, "qwen_vl", images=os.path.join(qwen25, "images"))
    store = run.stores[0]
    lengths = [s["hidden_states"].shape[1] for s in store.streams]
    assert len(set(lengths)) == len(IMAGE_SIZES), lengths       # every sample has its own length
    _assert_same(_loss_and_grads(run, True), _loss_and_grads(run, False), len(IMAGE_SIZES))


@pytest.mark.parametrize("position", [0, 1])    # the example's vision blocks: windowed, then full attention
def test_vision_blocks_pack_images_of_different_sizes_with_the_sample_by_sample_loss_and_gradients(qwen25, position):
    """Vision blocks take packed patches with cu_seqlens (no batch dimension): the images of a mini-batch
    are concatenated into one forward (core/run/packed_samples.py), attention stays within each image's windows."""
    run = _captured(qwen25, "qwen_vl", images=os.path.join(qwen25, "images"), quant_vision=True)
    vision = next(g for g, chain in enumerate(run.groups) if chain[0].ref.path.endswith("visual.blocks"))
    lengths = [s["hidden_states"].shape[0] for s in run.stores[vision].streams]
    assert len(set(lengths)) == len(IMAGE_SIZES), lengths
    full = run.model.model.visual.fullatt_block_indexes
    assert (position in full) == (position == 1), full
    _assert_same(_loss_and_grads(run, True, position, vision), _loss_and_grads(run, False, position, vision),
                 len(IMAGE_SIZES))


def test_a_block_that_padding_would_change_runs_sample_by_sample(llama):
    """Attention made bidirectional (a None mask then means full attention): padded keys would reach the
    real tokens, so the first padded forward disagrees and the block keeps the sample-by-sample path."""
    run = _captured(llama, "generic", _Prompts(512))
    block = run.groups[0][0]
    run.loader.load(block)
    block.module.self_attn.is_causal = False
    padded, alone = _loss_and_grads(run, True), _loss_and_grads(run, False)
    assert padded[3].paddable == {block.ref.number: False}
    assert padded[2] == alone[2] == len(LENGTHS)
    assert padded[0] == alone[0]
