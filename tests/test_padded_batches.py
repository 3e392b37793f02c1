"""Samples of different lengths share one right-padded forward (core/run/padding.py): the tuning loss and
the gradients of the rounding offsets and clipping scales equal those of the sample-by-sample path on the
real tokens, on real tiny models (a Llama with prompts of three lengths, Qwen2.5-VL with images of three
sizes, and its vision blocks, whose images are packed rather than padded); a block whose padded forward
would differ runs sample by sample.  (Gemma 4's per-sample shared-KV state: test_gemma4_batches.py.)"""
from __future__ import annotations

import os

import pytest
import torch

from blockquant import hookimpl
from blockquant.adapters import qwen_vl
from blockquant.adapters.generic import build_example
from blockquant.data.image_data import draw_shape
from tuning_step import assert_same, captured, loss_and_grads

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


@pytest.mark.parametrize("position", [0, 3])
def test_prompts_of_different_lengths_give_the_sample_by_sample_loss_and_gradients(llama, position):
    run = captured(llama, "generic", _Prompts(512))
    lengths = [s["hidden_states"].shape[1] for s in run.stores[0].streams]
    assert sorted(lengths) == sorted(LENGTHS)
    assert_same(loss_and_grads(run, True, position), loss_and_grads(run, False, position), len(LENGTHS))


def test_images_of_different_sizes_give_the_sample_by_sample_loss_and_gradients(qwen25):
    run = captured(qwen25, "qwen_vl", images=os.path.join(qwen25, "images"))
    store = run.stores[0]
    lengths = [s["hidden_states"].shape[1] for s in store.streams]
    assert len(set(lengths)) == len(IMAGE_SIZES), lengths       # every sample has its own length
    assert_same(loss_and_grads(run, True), loss_and_grads(run, False), len(IMAGE_SIZES))


@pytest.mark.parametrize("position", [0, 1])    # the example's vision blocks: windowed, then full attention
def test_vision_blocks_pack_images_of_different_sizes_with_the_sample_by_sample_loss_and_gradients(qwen25, position):
    """Vision blocks take packed patches with cu_seqlens (no batch dimension): the images of a mini-batch
    are concatenated into one forward (core/run/packed_samples.py), attention stays within each image's windows."""
    run = captured(qwen25, "qwen_vl", images=os.path.join(qwen25, "images"), quant_vision=True)
    vision = next(g for g, chain in enumerate(run.groups) if chain[0].ref.path.endswith("visual.blocks"))
    lengths = [s["hidden_states"].shape[0] for s in run.stores[vision].streams]
    assert len(set(lengths)) == len(IMAGE_SIZES), lengths
    full = run.model.model.visual.fullatt_block_indexes
    assert (position in full) == (position == 1), full
    assert_same(loss_and_grads(run, True, position, vision), loss_and_grads(run, False, position, vision),
                 len(IMAGE_SIZES))


def test_a_block_that_padding_would_change_runs_sample_by_sample(llama):
    """Attention made bidirectional (a None mask then means full attention): padded keys would reach the
    real tokens, so the first padded forward disagrees and the block keeps the sample-by-sample path."""
    run = captured(llama, "generic", _Prompts(512))
    block = run.groups[0][0]
    run.loader.load(block)
    block.module.self_attn.is_causal = False
    padded, alone = loss_and_grads(run, True), loss_and_grads(run, False)
    assert padded[3].paddable == {block.ref.number: False}
    assert padded[2] == alone[2] == len(LENGTHS)
    assert padded[0] == alone[0]
