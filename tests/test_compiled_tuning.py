"""The optional compiled tuning step (``--compile``, core/algorithm/compiled.py): the traced layer forward
tunes to the eager bytes, and so does the block compiled with torch.compile; ``auto`` leaves CPU runs
eager; a bad value is a usage error."""
from __future__ import annotations

import copy

import pytest
import torch

from blockquant import api
from blockquant.algorithm.compiled import COMPILE_MIN_WEIGHTS, compile_block, use_compile
from blockquant.algorithm.tuning import tune_block
from blockquant.errors import UsageError
from blockquant.frame import cli

from test_tuning import SCHEME, _block, _data, _layers

NSAMPLES = 16


def _tune(block, x, target, compiled: bool, forward=None):
    forward = forward or block

    def loss_fn(indices):
        return torch.nn.functional.mse_loss(forward(x[indices]).float(), target[indices].float())

    return tune_block(_layers(block), SCHEME, loss_fn, NSAMPLES, iters=20, lr=1 / 20, minmax_lr=1 / 20, batch_size=4,
                      gradient_accumulate_steps=1, seed=7, compiled=compiled)


def _same(ra, rb):
    assert (ra.first_loss, ra.best_loss, ra.best_iter) == (rb.first_loss, rb.best_loss, rb.best_iter)
    for name in ra.weights:
        for field in ("qweight", "scale", "zero"):
            assert torch.equal(getattr(ra.weights[name], field), getattr(rb.weights[name], field)), (name, field)


def test_traced_layer_forward_tunes_to_the_eager_bytes():
    fp = _block(seed=4)
    x, target = _data(fp)
    eager, traced = copy.deepcopy(fp), copy.deepcopy(fp)
    _same(_tune(eager, x, target, False), _tune(traced, x, target, True))


@pytest.mark.slow
def test_compiled_block_tunes_like_the_eager_step():
    """torch.compile of the block (inductor on the CPU): the float16 rounding of the scales is kept, so
    the losses agree to float32 rounding (fused kernels may round the last bit differently) and the
    codes are the eager ones."""
    fp = _block(seed=0)
    x, target = _data(fp)
    eager, compiled = copy.deepcopy(fp), copy.deepcopy(fp)
    ra, rb = _tune(eager, x, target, False), _tune(compiled, x, target, True, compile_block(compiled))
    assert rb.best_iter == ra.best_iter > 0
    assert rb.first_loss == pytest.approx(ra.first_loss, rel=1e-5)
    assert rb.best_loss == pytest.approx(ra.best_loss, rel=1e-5)
    for name in ra.weights:
        differ = int((ra.weights[name].qweight != rb.weights[name].qweight).sum())
        assert differ <= ra.weights[name].qweight.numel() // 1000, (name, differ)


def test_auto_compiles_only_large_cuda_blocks():
    assert not use_compile("auto", "cpu", 10 ** 12)
    assert not use_compile("auto", "cuda:0", COMPILE_MIN_WEIGHTS - 1)
    assert use_compile("auto", "cuda:0", COMPILE_MIN_WEIGHTS)
    assert use_compile("on", "cpu", 1) and not use_compile("off", "cuda", 10 ** 12)


def test_bad_compile_value_is_a_usage_error(capsys):
    with pytest.raises(UsageError, match="--compile must be auto, on or off"):
        api.make_settings(compile="yes")
    with pytest.raises(SystemExit) as exc:
        cli.main(["quantize", "--compile", "yes"])
    assert exc.value.code == 2
