"""Samples of different lengths share one right-padded forward (core/run/padding.py): the tuning loss and
the gradients of the rounding offsets and clipping scales equal those of the sample-by-sample path on the
real tokens, on real tiny models (a Llama with prompts of three lengths, Qwen2.5-VL with images of three
sizes, and its vision blocks, whose images are packed rather than padded); a block whose padded forward
would differ runs sample by sample.  The view through which samples share per-sample state mappings
(core/run/sample_state.py) is checked here on its own; on Gemma 4's shared KV in test_gemma4_batches.py."""
from __future__ import annotations

import os

import pytest
import torch

from blockquant.adapters import qwen_vl
from blockquant.adapters.generic import build_example
from blockquant.data.image_data import draw_shape
from blockquant.run.sample_state import BatchedState, NotJoined, commit_states
from tuning_step import LENGTHS, Prompts, assert_same, captured, loss_and_grads

IMAGE_SIZES = ((56, 56), (112, 56), (112, 112), (84, 56))


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
    run = captured(llama, "generic", Prompts(512))
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
    run = captured(llama, "generic", Prompts(512))
    block = run.groups[0][0]
    run.loader.load(block)
    block.module.self_attn.is_causal = False
    padded, alone = loss_and_grads(run, True), loss_and_grads(run, False)
    assert padded[3].paddable == {block.ref.number: False}
    assert padded[2] == alone[2] == len(LENGTHS)
    assert padded[0] == alone[0]


def test_a_state_view_refuses_reads_the_samples_cannot_share_and_writes_only_on_commit():
    parts = [{"a": (torch.ones(1, 2),), "b": torch.ones(1, 3)}, {"a": (torch.zeros(1, 2),), "b": torch.ones(1, 4)}]
    view = BatchedState.join(parts)
    assert torch.equal(view["a"][0], torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(NotJoined):
        view["b"]                               # shapes differ: the Replayer runs the samples one by one
    view["c"] = torch.arange(4.0).view(2, 2)
    assert torch.equal(view["c"], torch.arange(4.0).view(2, 2)) and all("c" not in p for p in parts)
    commit_states({"state": view, "other": torch.ones(2)})
    assert [p["c"].tolist() for p in parts] == [[[0.0, 1.0]], [[2.0, 3.0]]]
    assert BatchedState.join([{}, None]) is None


def test_a_padding_state_view_pads_reads_and_cuts_writes_back_to_each_sample():
    parts = [{"kv": (torch.ones(1, 2, 3, 4),)}, {"kv": (torch.full((1, 2, 5, 4), 2.0),)}]
    view = BatchedState.join(parts, lengths=[3, 5])
    read = view["kv"][0]
    assert read.shape == (2, 2, 5, 4) and float(read[0, :, 3:].abs().sum()) == 0 and torch.equal(read[1], parts[1]["kv"][0][0])
    view["new"] = torch.arange(2 * 5 * 4.0).view(2, 5, 4)
    written = commit_states({"state": view})
    assert written == [(parts[0], "new"), (parts[1], "new")]
    assert parts[0]["new"].shape == (1, 3, 4) and torch.equal(parts[1]["new"][0], torch.arange(20.0, 40.0).view(5, 4))
    # each sample's row in storage of its own: no sample keeps the whole batch's tensor alive
    assert all(p["new"].untyped_storage().nbytes() == p["new"].numel() * 4 for p in parts)
    ambiguous = BatchedState.join([{}, {}], lengths=[3, 5])
    ambiguous["x"] = torch.zeros(2, 5, 5)       # which dim holds the tokens? the block runs one by one
    ambiguous["y"] = torch.zeros(2, 5)
    with pytest.raises(NotJoined):
        commit_states({"state": ambiguous})
    assert ambiguous.parts == [{}, {}]          # nothing written
