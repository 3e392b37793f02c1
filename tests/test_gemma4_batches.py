"""Gemma 4's KV-storing and KV-reading blocks take each sample's own ``shared_kv_states`` mapping; the
samples of a mini-batch share one forward through the engine's view over those mappings
(core/run/sample_state.py, the trait ``sample_state``).  The tuning loss, the gradients and each sample's
stored keys/values afterwards equal those of the sample-by-sample forward, on the tiny example model."""
from __future__ import annotations

import pytest
import torch

from blockquant.adapters import gemma4
from blockquant.adapters.gemma4.replay import STATE_KEY
from blockquant.adapters.gemma4.versions import kv_strategy
from tuning_step import LENGTHS, Prompts, assert_same, captured, loss_and_grads, rel


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma4")
    gemma4.example_text(4, kv_shared=2).save(str(folder))
    return str(folder)


@pytest.mark.parametrize("position", [0, 1, 2, 3])   # storing keys/values (sliding, full), then reading them
def test_kv_sharing_blocks_share_one_forward_with_the_sample_by_sample_loss_gradients_and_stored_state(gemma, position):
    """Gemma 4's KV-storing and KV-reading layers take each sample's own shared_kv_states mapping: the
    samples share one forward through a view over them (core/run/sample_state.py), and afterwards every
    sample's mapping holds what its own forward stored."""
    run = captured(gemma, "gemma4")
    run.loader.load(run.groups[0][position])
    attn = run.groups[0][position].module.self_attn
    assert (attn.store_full_length_kv, attn.is_kv_shared_layer) == (position < 2, position >= 2)
    assert run.traits.sample_state == ("shared_kv_states",)
    n = len(run.stores[0])
    batched = loss_and_grads(run, False, position, state=run.traits.sample_state, scale=1.0)
    alone = loss_and_grads(run, False, position, scale=1.0)
    assert_same(batched, alone, n, joined_by="state")
    for mine, own in zip(batched[4], alone[4]):
        assert mine[STATE_KEY].keys() == own[STATE_KEY].keys() and len(own[STATE_KEY]) == min(position + 1, 2)
        for key in own[STATE_KEY]:
            for got, want in zip(mine[STATE_KEY][key], own[STATE_KEY][key]):
                assert got.shape == want.shape and rel(got, want) <= 1e-5


@pytest.mark.parametrize("position", [0, 1, 2, 3])
def test_kv_sharing_blocks_pad_prompts_of_different_lengths_with_the_sample_by_sample_loss_gradients_and_state(
        gemma, position):
    """Prompts of four lengths (longer than the sliding window): one right-padded forward, whose state view
    pads the stored keys/values the reading layers get and cuts what the storing layers write back to each
    sample's tokens; checked against the sample-by-sample forward like any padded block."""
    run = captured(gemma, "gemma4", Prompts(512))
    assert sorted(s["hidden_states"].shape[1] for s in run.stores[0].streams) == sorted(LENGTHS)
    batched = loss_and_grads(run, True, position, state=run.traits.sample_state, scale=1.0)
    alone = loss_and_grads(run, False, position, scale=1.0)
    assert_same(batched, alone, len(LENGTHS), joined_by="padding")
    for mine, own, n in zip(batched[4], alone[4], [s["hidden_states"].shape[1] for s in run.stores[0].streams]):
        assert mine[STATE_KEY].keys() == own[STATE_KEY].keys() and len(own[STATE_KEY]) == min(position + 1, 2)
        for key in own[STATE_KEY]:
            for got, want in zip(mine[STATE_KEY][key], own[STATE_KEY][key]):
                assert got.shape == want.shape and want.shape[2] == n and rel(got, want) <= 1e-5


def test_a_storing_block_batches_samples_whose_states_differ_in_what_it_overwrites(gemma):
    """In the tuning loop some samples already hold what an earlier iteration stored and others do not:
    a block that only writes that key still shares one forward, and every sample ends with its own rows."""
    run = captured(gemma, "gemma4")
    n = len(run.stores[0])
    run.loader.load(run.groups[0][0])
    key = kv_strategy().store_key(run.groups[0][0].module.self_attn)   # what block 0 stores, in this layout

    def stale(states):      # samples 0 and 2 hold an old entry of another shape, the others none
        for i in (0, 2):
            states[i][STATE_KEY] = {key: (torch.zeros(1, 1, 3, 8), torch.zeros(1, 1, 3, 8))}

    batched = loss_and_grads(run, False, 0, state=run.traits.sample_state, scale=1.0, prepare_states=stale)
    alone = loss_and_grads(run, False, 0, scale=1.0)
    assert_same(batched, alone, n, joined_by="state")
    for mine, own in zip(batched[4], alone[4]):
        for got, want in zip(mine[STATE_KEY][key], own[STATE_KEY][key]):
            assert got.shape == want.shape and rel(got, want) <= 1e-5
