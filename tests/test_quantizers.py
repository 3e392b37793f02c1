"""Group-wise integer quantization: codes, scales, zero points, straight-through gradients."""
import itertools

import pytest
import torch

from blockquant.config import QuantScheme
from blockquant.algorithm.quantizers import QuantizedWeight, fake_quantize, quant_params, quantize

OUT, IN = 24, 256


def _weight(seed=0, out=OUT, inp=IN, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[3, 17] = 0.9              # outliers on both sides
    w[5, 200] = -1.3
    return w.to(dtype)


def _tuning_params(scheme, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    groups = scheme.groups(w.shape[1])
    v = torch.rand(w.shape, generator=g) - 0.5
    mn = 0.5 + 0.5 * torch.rand(w.shape[0], groups, generator=g)
    mx = 0.5 + 0.5 * torch.rand(w.shape[0], groups, generator=g)
    return v, mn, mx


CASES = list(itertools.product((2, 3, 4, 8), (True, False), (-1, 32, 128)))


@pytest.mark.parametrize("bits,sym,group_size", CASES)
def test_quantize_round_trip_matches_fake_quantize(bits, sym, group_size):
    scheme = QuantScheme(bits=bits, group_size=group_size, sym=sym)
    w = _weight()
    for params in ((None, None, None), _tuning_params(scheme, w)):
        qw = quantize(w, scheme, *params)
        assert isinstance(qw, QuantizedWeight)
        groups = 1 if group_size == -1 else IN // group_size
        assert qw.qweight.shape == (OUT, IN) and qw.qweight.dtype == torch.uint8
        assert qw.scale.shape == (OUT, groups) and qw.scale.dtype == torch.float32
        assert qw.zero.shape == (OUT, groups) and qw.zero.dtype == torch.int32
        assert int(qw.qweight.min()) >= 0 and int(qw.qweight.max()) <= 2 ** bits - 1
        assert int(qw.zero.min()) >= 0 and int(qw.zero.max()) <= 2 ** bits - 1
        fake = fake_quantize(w, scheme, *params)
        assert fake.dtype == torch.float32
        assert torch.equal(qw.dequantize(), fake)
        # scales are float16 values, so a float16 export dequantizes to the same weight
        assert torch.equal(qw.scale, qw.scale.half().float())


@pytest.mark.parametrize("sym", (True, False))
@pytest.mark.parametrize("weight_dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("out_dtype", (torch.float32, torch.bfloat16))
def test_fake_into_writes_the_bits_of_fake(sym, weight_dtype, out_dtype):
    """The tuned layer's forward writes the fake-quantized weight in place (``fake_into``, no autograd,
    no temporaries of the weight's size); it must hold exactly what ``fake`` returns, row slices too."""
    from blockquant.algorithm.quantizers import GroupedWeight

    scheme = QuantScheme(bits=4, group_size=32, sym=sym)
    w = _weight(dtype=weight_dtype)
    grouped = GroupedWeight(w, scheme)
    for v, mn, mx in ((None, None, None), _tuning_params(scheme, w)):
        expected = grouped.fake(v, mn, mx, dtype=out_dtype)
        out = torch.full((OUT, IN), float("nan"), dtype=out_dtype)
        for start, stop in ((0, 7), (7, OUT)):      # rows written a chunk at a time, as the forward does
            part = grouped.rows(start, stop)
            rows = slice(start, stop)
            part.fake_into(out[rows], *(None if p is None else p[rows] for p in (v, mn, mx)))
        assert torch.equal(out, expected)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group_size", (-1, 32))
def test_symmetric_full_range(bits, group_size):
    scheme = QuantScheme(bits=bits, group_size=group_size, sym=True)
    w = _weight(seed=bits)
    qw = quantize(w, scheme)
    half = 2 ** (bits - 1)
    assert torch.all(qw.zero == half)
    glen = IN if group_size == -1 else group_size
    grouped = w.reshape(OUT, -1, glen)
    pos = grouped.abs().argmax(dim=-1, keepdim=True)
    extreme = grouped.gather(-1, pos).squeeze(-1)
    codes = qw.qweight.reshape(OUT, -1, glen).gather(-1, pos).squeeze(-1)
    assert torch.all(codes == 0), "the larger-magnitude extreme maps to code 0 (-2^(b-1))"
    assert torch.all(torch.sign(qw.scale) == -torch.sign(extreme)), "scale has the opposite sign of the extreme"
    deq = qw.dequantize().reshape(OUT, -1, glen)
    assert torch.allclose(deq.gather(-1, pos).squeeze(-1), extreme, rtol=1e-3, atol=0)
    # every weight is within one step of its group range: the extreme side is exact
    err = (deq - grouped).abs()
    assert torch.all(err <= qw.scale.abs().unsqueeze(-1) * (1 + 1e-5))


@pytest.mark.parametrize("bits", (2, 4, 8))
def test_asymmetric_range_and_error(bits):
    scheme = QuantScheme(bits=bits, group_size=32, sym=False)
    w = _weight(seed=10 + bits) + 0.02     # groups not centred on zero
    qw = quantize(w, scheme)
    grouped = w.reshape(OUT, -1, 32)
    deq = qw.dequantize().reshape(OUT, -1, 32)
    step = qw.scale.unsqueeze(-1)
    assert torch.all(qw.scale > 0)
    err = (deq - grouped).abs()
    # rounding the zero point and the float16 scale can push a group extreme one step out
    assert torch.all(err <= step * (1 + 1e-4))
    assert (err > step * 0.5 * (1 + 1e-4)).float().mean() < 0.01
    scale, zero = quant_params(w, scheme)
    assert torch.equal(zero, qw.zero.float()) and torch.equal(scale, qw.scale)


@pytest.mark.parametrize("sym", (True, False))
def test_all_zero_groups_have_no_nan(sym):
    scheme = QuantScheme(bits=4, group_size=32, sym=sym)
    w = _weight()
    w[:, :32] = 0
    w[7] = 0
    v = torch.full(w.shape, 0.5, requires_grad=True)
    mn = torch.zeros(OUT, IN // 32, requires_grad=True)     # fully clipped ranges
    mx = torch.zeros(OUT, IN // 32, requires_grad=True)
    for params in ((None, None, None), (v, mn, mx)):
        out = fake_quantize(w, scheme, *params)
        assert torch.isfinite(out).all()
        assert torch.equal(quantize(w, scheme, *params).dequantize(), out)
    assert torch.all(fake_quantize(w, scheme)[:, :32] == 0) and torch.all(fake_quantize(w, scheme)[7] == 0)
    fake_quantize(w, scheme, v, mn, mx).sum().backward()
    for p in (v, mn, mx):
        assert torch.isfinite(p.grad).all()


def _ste_reference(w, scheme, v, mn, mx):
    """Independent reference for the hand-written backward: the brief's formula composed from plain
    torch ops (autograd differentiates it), with the scale/zero from quant_params."""
    scale, zero = quant_params(w, scheme, mn, mx)
    glen = scheme.group_len(w.shape[1])
    s, z = scale.repeat_interleave(glen, dim=1), zero.repeat_interleave(glen, dim=1)
    t = w / s + v
    q = torch.clamp(t + (torch.round(t) - t).detach() + z, 0, scheme.maxq)
    return s * (q - z)


@pytest.mark.parametrize("sym", (True, False))
@pytest.mark.parametrize("group_size", (-1, 32))
def test_gradients_flow_to_v_and_clipping_factors(sym, group_size):
    scheme = QuantScheme(bits=4, group_size=group_size, sym=sym)
    w = _weight(seed=3)
    v0, mn0, mx0 = _tuning_params(scheme, w, seed=4)
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    grads = []
    for fn in (fake_quantize, _ste_reference):
        v, mn, mx = (p.clone().requires_grad_() for p in (v0, mn0, mx0))
        out = fn(w, scheme, v, mn, mx)
        (out * upstream).sum().backward()
        grads.append((out.detach(), v.grad, mn.grad, mx.grad))
    (out, gv, gmn, gmx), (ref_out, rgv, rgmn, rgmx) = grads
    assert torch.equal(out, ref_out)
    for g in (gv, gmn, gmx):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # straight-through: d out / d v is the scale where the code is not clamped, zero where it is
    qw = quantize(w, scheme, v0, mn0, mx0)
    glen = scheme.group_len(IN)
    s = qw.scale.repeat_interleave(glen, dim=1)
    clamped = (torch.round(w / s + v0) + qw.zero.repeat_interleave(glen, dim=1) != qw.qweight.float())
    assert clamped.any() and (~clamped).any()
    assert torch.allclose(gv[~clamped], (s * upstream)[~clamped], rtol=1e-6, atol=0)
    assert torch.all(gv[clamped] == 0)
    assert torch.allclose(gv, rgv, rtol=1e-5, atol=1e-7)
    assert torch.allclose(gmn, rgmn, rtol=1e-4, atol=1e-6)
    assert torch.allclose(gmx, rgmx, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_low_precision_weights(dtype):
    scheme = QuantScheme(bits=4, group_size=32, sym=True)
    w = _weight(dtype=dtype)
    v, mn, mx = _tuning_params(scheme, w)
    fake = fake_quantize(w, scheme, v, mn, mx)
    assert fake.dtype == dtype
    assert torch.equal(quantize(w, scheme, v, mn, mx).dequantize(dtype), fake)
    # the narrow weight is read without a float32 copy: same codes and gradients as its float32 value
    assert torch.equal(quantize(w, scheme, v, mn, mx).qweight, quantize(w.float(), scheme, v, mn, mx).qweight)
    grads = []
    for weight in (w, w.float()):
        params = [p.clone().requires_grad_() for p in (v, mn, mx)]
        fake_quantize(weight, scheme, *params).float().square().sum().backward()
        grads.append([p.grad for p in params])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-6)


def test_invalid_shapes_raise_value_error():
    scheme = QuantScheme(bits=4, group_size=32, sym=True)
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize(torch.randn(8, 48), scheme)
    with pytest.raises(ValueError, match="2-D"):
        fake_quantize(torch.randn(8), scheme)
    with pytest.raises(ValueError, match="shape"):
        fake_quantize(torch.randn(8, 64), scheme, v=torch.zeros(8, 32))
    # per-channel works for any input size
    qw = quantize(torch.randn(8, 48), QuantScheme(bits=4, group_size=-1, sym=False))
    assert qw.scale.shape == (8, 1)


def test_fake_quantize_does_not_touch_the_weight():
    scheme = QuantScheme(bits=2, group_size=32, sym=False)
    w = _weight().requires_grad_()
    before = w.detach().clone()
    v = torch.zeros(w.shape, requires_grad=True)
    fake_quantize(w, scheme, v).sum().backward()
    assert w.grad is None and torch.equal(w.detach(), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sym", (True, False))
def test_cuda_matches_cpu(sym):
    scheme = QuantScheme(bits=4, group_size=32, sym=sym)
    w = _weight()
    params = _tuning_params(scheme, w)
    cpu = quantize(w, scheme, *params)
    gpu_params = [p.cuda().requires_grad_() for p in params]
    fake = fake_quantize(w.cuda(), scheme, *gpu_params)
    gpu = quantize(w.cuda(), scheme, *gpu_params)
    assert torch.equal(gpu.dequantize(), fake)
    assert (gpu.qweight.cpu() != cpu.qweight).float().mean() < 1e-3     # division may round differently
    fake.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in gpu_params)


@pytest.mark.interop
@pytest.mark.parametrize("sym", (True, False))
def test_matches_auto_round_qdq(sym):
    """auto-round 0.16.1's own quantize-dequantize, where it is installed: bit for bit."""
    int_types = pytest.importorskip("auto_round.data_type.int")
    fn = int_types.quant_tensor_sym if sym else int_types.quant_tensor_asym
    for bits, group_size in itertools.product((2, 3, 4, 8), (-1, 32, 128)):
        scheme = QuantScheme(bits=bits, group_size=group_size, sym=sym)
        w = _weight(seed=bits)
        w[0, :32] = 0
        v, mn, mx = _tuning_params(scheme, w)
        glen = scheme.group_len(IN)
        ref, _, _ = fn(w, bits=bits, group_size=group_size, v=v.reshape(-1, glen), min_scale=mn.reshape(-1),
                       max_scale=mx.reshape(-1))
        assert torch.equal(fake_quantize(w, scheme, v, mn, mx), ref.reshape(w.shape))
        assert torch.equal(fake_quantize(w, scheme), fn(w, bits=bits, group_size=group_size)[0].reshape(w.shape))
