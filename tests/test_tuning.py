"""AutoRound on one small block: loss vs RTN, determinism, NaN fallback, RTN, wrapper removal."""
import copy
import logging
import math

import pytest
import torch
from torch import nn

from blockquant.config import QuantScheme
from blockquant.algorithm.quantizers import quantize
from blockquant.algorithm.tuning import TuneResult, tune_block

SCHEME = QuantScheme(bits=4, group_size=32, sym=True)
NSAMPLES, TOKENS, HIDDEN = 16, 8, 64


def _block(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    block = nn.Sequential(nn.Linear(HIDDEN, 128), nn.GELU(), nn.Linear(128, HIDDEN, bias=False)).to(dtype)
    return block


def _data(block, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(NSAMPLES, TOKENS, HIDDEN, generator=g).to(block[0].weight.device, block[0].weight.dtype)
    with torch.no_grad():
        target = block(x)
    return x, target


def _layers(block):
    return {"fc1": block[0], "fc2": block[2]}


def _loss_fn(block, x, target, calls=None):
    def loss_fn(indices):
        if calls is not None:
            calls.append(list(indices))
        out = block(x[indices])
        return torch.nn.functional.mse_loss(out.float(), target[indices].float())
    return loss_fn


def _tune(block, x, target, **kw):
    args = dict(iters=40, lr=1 / 40, minmax_lr=1 / 40, batch_size=4, gradient_accumulate_steps=1, seed=7)
    args.update(kw)
    return tune_block(_layers(block), SCHEME, _loss_fn(block, x, target), NSAMPLES, **args)


def _full_loss(block, x, target):
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(block(x).float(), target.float()))


def test_tuning_beats_rtn_and_writes_quantized_weights():
    fp = _block()
    x, target = _data(fp)
    tuned, rtn = copy.deepcopy(fp), copy.deepcopy(fp)
    for p in tuned.parameters():        # the caller should do this; tune_block must not rely on it
        p.requires_grad_(True)
    res = _tune(tuned, x, target, iters=60, batch_size=NSAMPLES)
    rtn_res = _tune(rtn, x, target, iters=0)
    assert isinstance(res, TuneResult) and not res.fell_back_to_rtn
    assert res.iters_run == 60
    # iteration 0 runs the RTN weights on all samples (batch == nsamples)
    rtn_loss = _full_loss(rtn, x, target)
    assert math.isclose(res.first_loss, rtn_loss, rel_tol=1e-5)
    assert res.best_loss < 0.9 * res.first_loss and res.best_iter > 0
    assert _full_loss(tuned, x, target) < 0.9 * rtn_loss
    assert math.isclose(_full_loss(tuned, x, target), res.best_loss, rel_tol=1e-5)
    for name, layer in _layers(tuned).items():
        qw = res.weights[name]
        assert torch.equal(layer.weight.detach(), qw.dequantize())
        assert torch.all(qw.zero == 8) and int(qw.qweight.max()) <= 15
        assert "forward" not in layer.__dict__
        assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)
        assert not torch.equal(qw.qweight, rtn_res.weights[name].qweight)


def test_tuning_with_batches_and_accumulation_lowers_full_loss():
    fp = _block(seed=3)
    x, target = _data(fp, seed=4)
    tuned, rtn = copy.deepcopy(fp), copy.deepcopy(fp)
    res = _tune(tuned, x, target, iters=50, batch_size=4, gradient_accumulate_steps=2)
    _tune(rtn, x, target, iters=0)
    assert res.best_loss <= res.first_loss
    assert _full_loss(tuned, x, target) < _full_loss(rtn, x, target)


def test_rounding_only_when_minmax_lr_is_zero():
    fp = _block(seed=2)
    x, target = _data(fp)
    tuned, rtn = copy.deepcopy(fp), copy.deepcopy(fp)
    res = _tune(tuned, x, target, iters=40, minmax_lr=0.0, batch_size=NSAMPLES)
    rtn_res = _tune(rtn, x, target, iters=0)
    assert res.best_loss < res.first_loss
    assert _full_loss(tuned, x, target) < _full_loss(rtn, x, target)
    for name in res.weights:      # the clipping factors stay 1: the scales are RTN's
        assert torch.equal(res.weights[name].scale, rtn_res.weights[name].scale)


def test_same_seed_same_bytes_other_seed_differs():
    fp = _block(seed=5)
    x, target = _data(fp)
    a, b, c = (copy.deepcopy(fp) for _ in range(3))
    ra = _tune(a, x, target, iters=20, gradient_accumulate_steps=2)
    rb = _tune(b, x, target, iters=20, gradient_accumulate_steps=2)
    rc = _tune(c, x, target, iters=20, gradient_accumulate_steps=2, seed=8)
    assert (ra.first_loss, ra.best_loss, ra.best_iter) == (rb.first_loss, rb.best_loss, rb.best_iter)
    for name in ra.weights:
        for field in ("qweight", "scale", "zero"):
            assert torch.equal(getattr(ra.weights[name], field), getattr(rb.weights[name], field))
    assert torch.equal(a[0].weight, b[0].weight) and torch.equal(a[2].weight, b[2].weight)
    assert ra.first_loss != rc.first_loss or ra.best_loss != rc.best_loss


@pytest.mark.parametrize("accumulate", (1, 2))
def test_plain_and_chunked_layers_tune_to_the_same_bytes(monkeypatch, accumulate):
    """Small layers take the plain path (fake weight kept from the forward, best parameters copied);
    forcing the memory-lean chunked path must give the same losses and bytes."""
    import blockquant.algorithm.tuned_linear as tl

    fp = _block(seed=3)
    x, target = _data(fp)
    plain, chunked = copy.deepcopy(fp), copy.deepcopy(fp)
    rp = _tune(plain, x, target, iters=15, gradient_accumulate_steps=accumulate)
    monkeypatch.setattr(tl, "PLAIN_MAX_ELEMENTS", 0)
    rc = _tune(chunked, x, target, iters=15, gradient_accumulate_steps=accumulate)
    assert (rp.first_loss, rp.best_loss, rp.best_iter) == (rc.first_loss, rc.best_loss, rc.best_iter)
    for name in rp.weights:
        for field in ("qweight", "scale", "zero"):
            assert torch.equal(getattr(rp.weights[name], field), getattr(rc.weights[name], field))


def test_sample_indices_are_seeded_minibatches():
    fp = _block()
    x, target = _data(fp)
    runs = []
    for _ in range(2):
        calls = []
        blk = copy.deepcopy(fp)
        tune_block(_layers(blk), SCHEME, _loss_fn(blk, x, target, calls), NSAMPLES, iters=5, lr=0.1,
                   minmax_lr=0.1, batch_size=6, gradient_accumulate_steps=3, seed=11)
        runs.append(calls)
    assert runs[0] == runs[1] and len(runs[0]) == 15
    assert all(len(c) == 6 and len(set(c)) == 6 and all(0 <= i < NSAMPLES for i in c) for c in runs[0])
    calls = []
    blk = copy.deepcopy(fp)
    tune_block(_layers(blk), SCHEME, _loss_fn(blk, x, target, calls), 3, iters=2, lr=0.1, minmax_lr=0.1,
               batch_size=8, gradient_accumulate_steps=1, seed=0)
    assert all(sorted(c) == [0, 1, 2] for c in calls)        # batch capped at nsamples


@pytest.mark.parametrize("use_logger", (False, True))
def test_nan_loss_falls_back_to_rtn(use_logger, caplog):
    fp = _block()
    x, target = _data(fp)
    blk = copy.deepcopy(fp)
    inner = _loss_fn(blk, x, target)
    calls, messages = [], []

    def loss_fn(indices):
        calls.append(indices)
        loss = inner(indices)
        return loss * float("nan") if len(calls) == 4 else loss

    log = logging.getLogger("blockquant.test") if use_logger else messages.append
    with caplog.at_level(logging.WARNING):
        res = tune_block(_layers(blk), SCHEME, loss_fn, NSAMPLES, iters=30, lr=0.05, minmax_lr=0.05, batch_size=4,
                         gradient_accumulate_steps=1, seed=0, log=log)
    assert res.fell_back_to_rtn and res.iters_run == 3 and len(calls) == 4
    assert res.best_loss is None and res.best_iter is None and res.first_loss is not None
    messages += [r.getMessage() for r in caplog.records]
    assert any("RTN" in m for m in messages)
    for name, layer in _layers(blk).items():
        expected = quantize(_layers(fp)[name].weight, SCHEME)
        assert torch.equal(res.weights[name].qweight, expected.qweight)
        assert torch.equal(layer.weight, expected.dequantize())
        assert "forward" not in layer.__dict__


def test_iters_zero_is_rtn_without_loss_calls():
    fp = _block()
    blk = copy.deepcopy(fp)

    def loss_fn(indices):
        raise AssertionError("RTN must not run the block")

    res = tune_block(_layers(blk), SCHEME, loss_fn, NSAMPLES, iters=0, lr=0.0, minmax_lr=0.0, batch_size=8,
                     gradient_accumulate_steps=1, seed=0)
    assert res.first_loss is None and res.best_loss is None and res.iters_run == 0
    assert not res.fell_back_to_rtn
    for name, layer in _layers(blk).items():
        expected = quantize(_layers(fp)[name].weight, SCHEME)
        assert torch.equal(res.weights[name].qweight, expected.qweight)
        assert torch.equal(layer.weight, expected.dequantize())


def test_wrappers_removed_and_weights_untouched_when_loss_fn_raises():
    fp = _block()
    x, target = _data(fp)
    blk = copy.deepcopy(fp)
    inner = _loss_fn(blk, x, target)
    seen = []

    def loss_fn(indices):
        # while tuning, the layers compute with fake-quantized weights
        seen.append(all("forward" in layer.__dict__ for layer in _layers(blk).values()))
        if len(seen) == 3:
            raise KeyboardInterrupt
        return inner(indices)

    with pytest.raises(KeyboardInterrupt):
        tune_block(_layers(blk), SCHEME, loss_fn, NSAMPLES, iters=10, lr=0.1, minmax_lr=0.1, batch_size=4,
                   gradient_accumulate_steps=1, seed=0)
    assert all(seen)
    for layer, orig in zip(_layers(blk).values(), _layers(fp).values()):
        assert "forward" not in layer.__dict__
        assert torch.equal(layer.weight, orig.weight)
    with torch.no_grad():
        assert torch.equal(blk(x), fp(x))


def test_accelerate_hooked_layers_keep_their_hook():
    accelerate_hooks = pytest.importorskip("accelerate.hooks")
    fp = _block()
    x, target = _data(fp)
    blk = copy.deepcopy(fp)
    for layer in _layers(blk).values():
        accelerate_hooks.add_hook_to_module(layer, accelerate_hooks.ModelHook())
    old = {n: layer.__dict__["_old_forward"] for n, layer in _layers(blk).items()}
    hooked = {n: layer.__dict__["forward"] for n, layer in _layers(blk).items()}
    res = _tune(blk, x, target, iters=10)
    assert res.best_loss <= res.first_loss
    for n, layer in _layers(blk).items():
        assert layer.__dict__["_old_forward"] is old[n] and layer.__dict__["forward"] is hooked[n]
    rtn = copy.deepcopy(fp)
    _tune(rtn, x, target, iters=0)
    assert _full_loss(blk, x, target) <= _full_loss(rtn, x, target)


def test_per_sample_loss_fn_and_bfloat16_layers():
    fp = _block(dtype=torch.bfloat16)
    x, target = _data(fp)
    blk = copy.deepcopy(fp)

    def loss_fn(indices):      # runs each sample separately, as a block with per-sample inputs would
        losses = [torch.nn.functional.mse_loss(blk(x[i:i + 1]).float(), target[i:i + 1].float())
                  for i in indices]
        return torch.stack(losses).mean()

    res = tune_block(_layers(blk), SCHEME, loss_fn, NSAMPLES, iters=20, lr=0.05, minmax_lr=0.05, batch_size=4,
                     gradient_accumulate_steps=1, seed=0)
    assert res.best_loss < res.first_loss
    for name, layer in _layers(blk).items():
        assert layer.weight.dtype == torch.bfloat16
        assert torch.equal(layer.weight, res.weights[name].dequantize(torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tuning_on_cuda():
    fp = _block().cuda()
    x, target = _data(fp)
    tuned, rtn = copy.deepcopy(fp), copy.deepcopy(fp)
    res = _tune(tuned, x, target, iters=40, batch_size=NSAMPLES)
    _tune(rtn, x, target, iters=0)
    assert res.best_loss < res.first_loss
    assert _full_loss(tuned, x, target) < _full_loss(rtn, x, target)
    assert torch.equal(tuned[0].weight, res.weights["fc1"].dequantize())


@pytest.mark.parametrize("path", ("chunked", "plain"))
@pytest.mark.parametrize("sym", (True, False))
def test_tuned_linear_gradients_match_autograd_through_fake_quantize(monkeypatch, sym, path):
    """Both paths of the tuned layer - memory-lean (fake weight rebuilt in the backward, a few rows at
    a time) and plain (the forward's fake weight kept for the backward) - compute the same outputs
    and gradients as plain autograd through ``fake_quantize`` + ``F.linear``."""
    import blockquant.algorithm.tuned_linear as tl
    from blockquant.algorithm.quantizers import fake_quantize

    if path == "chunked":
        monkeypatch.setattr(tl, "CHUNK_ELEMENTS", 64 * 5)      # 48 rows -> 10 chunks, the last one short
        monkeypatch.setattr(tl, "PLAIN_MAX_ELEMENTS", 0)
    scheme = QuantScheme(bits=4, group_size=32, sym=sym)
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    layer.weight.data = layer.weight.data.to(torch.bfloat16).float()    # an upcast bf16 checkpoint
    original = layer.weight.detach().clone()
    st = tl.TunedLinear(layer, scheme, tune_minmax=True)
    assert st.plain == (path == "plain")
    assert layer.weight.dtype == torch.bfloat16          # stored narrow while tuning (exact)
    with torch.no_grad():
        st.v.uniform_(-0.5, 0.5)
        st.min_scale.uniform_(0.8, 1.0)
        st.max_scale.uniform_(0.8, 1.0)
    x = torch.randn(2, 3, 64, requires_grad=True)
    r = torch.randn(2, 3, 48)
    (tl.QuantLinearFn.apply(x, *st.params(), st) * r).sum().backward()

    ref_params = [p.detach().clone().requires_grad_() for p in st.params()]
    x_ref = x.detach().clone().requires_grad_()
    w_ref = fake_quantize(original, scheme, *ref_params)
    y_ref = torch.nn.functional.linear(x_ref, w_ref, layer.bias.detach())
    (y_ref * r).sum().backward()
    assert torch.equal(tl.QuantLinearFn.apply(x, *st.params(), st), y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    for p, ref in zip(st.params(), ref_params):
        torch.testing.assert_close(p.grad, ref.grad)
    st.finish(None)           # abandoned: the layer gets its original weight back, in float32
    assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, original)


def test_small_block_tunes_on_one_thread_and_restores_the_count():
    """A block whose forward is a few million multiply-adds tunes serially after the first iteration
    (intra-op threads cost more than they save there); the caller's thread count comes back."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fp = _block()
        x, target = _data(fp)
        seen = []
        inner = _loss_fn(fp, x, target)

        def loss_fn(indices):
            seen.append(torch.get_num_threads())
            return inner(indices)

        tune_block(_layers(fp), SCHEME, loss_fn, NSAMPLES, iters=4, lr=1 / 4, minmax_lr=1 / 4, batch_size=4,
                   gradient_accumulate_steps=1, seed=0)
        assert seen == [2, 1, 1, 1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
