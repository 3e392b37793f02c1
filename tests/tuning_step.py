"""One tuning step of one block, batched and sample by sample, for the tests that compare the two
(test_padded_batches.py, test_gemma4_batches.py): the loss, the gradients of the rounding offsets and
clipping scales, and the samples' replay states afterwards."""
from __future__ import annotations

import pytest
import torch

from blockquant import api, hookimpl
from blockquant.algorithm.tuned_linear import TunedLinear
from blockquant.model.blocks import choose_layers
from blockquant.run.replay import Replayer, stream_loss

LENGTHS = (19, 32, 45, 27)    # prompt lengths of Prompts: every sample its own


class Prompts:
    """Calibration batches of the given lengths (a plugin registered on the run's plugin manager)."""

    def __init__(self, vocab: int, lengths: tuple[int, ...] = LENGTHS):
        g = torch.Generator().manual_seed(3)
        self.batches = [{"input_ids": torch.randint(3, vocab, (1, n), generator=g),
                         "attention_mask": torch.ones(1, n, dtype=torch.long)} for n in lengths]

    @hookimpl(tryfirst=True)
    def calibration_batches(self):
        return self.batches


def captured(folder, adapter, plugin=None, **settings):
    run = api.prepare(folder, adapter, api.make_settings(**{"nsamples": 4, "seqlen": 96, "group_size": 32, **settings}))
    if plugin is not None:
        run.hooks.pm.register(plugin)
    api.capture_inputs(run)
    return run


def loss_and_grads(run, pad: bool, position: int = 0, group: int = 0, state: tuple[str, ...] = (),
                    scale: float = 2.0 ** 20, prepare_states=None, batch: int | None = None):
    """Block ``position`` of group ``group`` (its inputs: the blocks before it, run one by one whatever is
    tested): fp targets, then one tuning loss over all samples and its backward, with rounding offsets and
    clipping scales set away from round-to-nearest.  Returns the loss, the gradients, the number of block
    forwards in the tuning step, the replayer and the samples' states after it."""
    store = run.stores[group]
    n = len(store)
    streams, states = [dict(s) for s in store.streams], [{} for _ in range(n)]
    alone = Replayer(run.hooks, store, run.device, run.compute_dtype)
    for earlier in run.groups[group][:position]:
        run.loader.load(earlier)
        with torch.no_grad():
            streams = alone.run(earlier, streams, states, "fp", batch=1)
    block = run.groups[group][position]
    run.loader.load(block)
    for p in block.module.parameters():
        p.requires_grad_(False)
    replayer = Replayer(run.hooks, store, run.device, run.compute_dtype, pad=pad, pack=run.traits.pack_boundaries,
                        state=state, shared=run.traits.shared_keys)
    with torch.no_grad():
        targets = replayer.run(block, streams, [dict(s) for s in states], "fp", batch=n)
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
    states = [dict(s) for s in states]
    if prepare_states is not None:
        prepare_states(states)
    try:
        for st in tuned.values():
            st.install()
        with torch.enable_grad():
            outs = replayer.run(block, streams, states, "quant", list(range(n)), batch=batch or n)
            loss = stream_loss(outs, targets)
            # scaled by 2^20 (exactly) by default: the clipping scales' gradients pass a float16 rounding of the
            # scale, which flushes gradients this small (the loss of a random tiny block) to float16 subnormals
            (loss * scale).backward()
        grads = {name: [p.grad.clone() for p in st.params()] for name, st in tuned.items()}
    finally:
        handle.remove()
        for st in tuned.values():
            st.uninstall()
            st.finish(None)
    return float(loss.detach()), grads, len(calls), replayer, states


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def assert_same(padded, alone, n, joined_by="padding"):
    loss, grads, calls, replayer, _ = padded
    loss_1, grads_1, calls_1, _, _ = alone
    assert calls == 1 and calls_1 == n, (calls, calls_1)     # one forward for all samples vs one per sample
    if joined_by == "padding":
        assert all(replayer.paddable.values()) and replayer.paddable
    else:
        assert not replayer.paddable and all(replayer.collatable.values())
    assert loss == pytest.approx(loss_1, rel=1e-5)
    for name in grads_1:
        for got, want in zip(grads[name], grads_1[name]):
            assert float(want.abs().sum()) > 0, name
            # offsets: float32 rounding; clipping scales: one float16 step where rounding flips
            assert rel(got, want) <= (1e-5 if got.shape == grads[name][0].shape else 2e-3), name
