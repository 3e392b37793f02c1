"""Group-wise integer weight quantization of a [out, in] weight (groups run along the input).

One group is ``scheme.group_size`` consecutive inputs of one output channel (-1: the whole input).
Each group has a float scale and an integer zero point; a weight is stored as codes
``q in [0, 2^bits - 1]`` and dequantized as ``W[o, i] = scale[o, g(i)] * (q[o, i] - zero[o, g(i)])``
with ``g(i) = i // group_size``.

- asymmetric: the group range [min(w, 0), max(w, 0)] (times the clipping factors) spans all codes.
- symmetric, "full range" (as auto-round does, see docs/formats.md): zero = 2^(bits-1) and the group's
  larger-magnitude signed extreme maps to code 0, so the scale is negative when that extreme is
  positive (loaders only multiply, so this is legal).

Scales are rounded to float16-representable values (the exported formats store them as float16),
so an exported checkpoint dequantizes to exactly what the engine computed.  Everything is computed
in float32 on the weight's device.  ``fake_quantize`` is differentiable with respect to the rounding
offset ``v`` and the clipping factors (straight-through rounding) and is what AutoRound tunes;
``quantize`` produces the integer codes and dequantizes bit for bit to ``fake_quantize``'s output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import QuantScheme

SCALE_DTYPE = torch.float16          # scales are rounded to this dtype's values (the export dtype)
# smallest |scale| (all-zero groups, fully clipped ranges): float16's 1e-5, auto-round's threshold
SCALE_EPS = float(torch.tensor(1e-5, dtype=SCALE_DTYPE))
_SCALE_MAX = float(torch.finfo(SCALE_DTYPE).max)
_NARROW_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class QuantizedWeight:
    """Integer codes of one weight with their per-group scales and zero points.

    qweight: uint8 [out, in], values 0 .. 2^bits-1; scale: float32 [out, G]; zero: int32 [out, G].
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    scheme: QuantScheme

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """Output channels ``start:stop`` (views)."""
        return QuantizedWeight(self.qweight[start:stop], self.scale[start:stop], self.zero[start:stop], self.scheme)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this represents, [out, in], computed in float32 and returned as ``dtype``."""
        out_f, in_f = self.qweight.shape
        groups = self.scale.shape[1]
        q = self.qweight.reshape(out_f, groups, in_f // groups).to(torch.float32)
        w = (q - self.zero.to(torch.float32).unsqueeze(-1)) * self.scale.unsqueeze(-1)
        return w.reshape(out_f, in_f).to(dtype)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


class GroupedWeight:
    """A weight prepared once for repeated quantization: viewed as [out, G, group_len], and the
    group extremes before clipping (min clamped to <= 0, max clamped to >= 0).  The weight is a
    constant here: no gradient flows to it."""

    def __init__(self, weight: torch.Tensor, scheme: QuantScheme):
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
        out_f, in_f = weight.shape
        glen = scheme.group_len(in_f)
        if in_f % glen:
            raise ValueError(
                f"in_features {in_f} is not a multiple of group_size {glen}; keep this layer in full precision"
            )
        self.scheme = scheme
        self.shape = weight.shape
        self.dtype = weight.dtype
        self.groups = in_f // glen
        w = weight.detach()
        if w.dtype not in _NARROW_FLOATS:
            w = w.to(torch.float32)
        # float16/bfloat16 stay as they are (no float32 copy): every op that reads them promotes
        # exactly to float32
        self.w = w.reshape(out_f, self.groups, glen)
        self.wmin = self.w.amin(dim=-1).to(torch.float32).clamp(max=0)
        self.wmax = self.w.amax(dim=-1).to(torch.float32).clamp(min=0)

    def rows(self, start: int, stop: int) -> "GroupedWeight":
        """The output channels ``start:stop`` (views, no copies): every quantity here is per row."""
        part = object.__new__(GroupedWeight)
        part.scheme, part.dtype, part.groups = self.scheme, self.dtype, self.groups
        part.w, part.wmin, part.wmax = self.w[start:stop], self.wmin[start:stop], self.wmax[start:stop]
        part.shape = torch.Size((part.w.shape[0], self.shape[1]))
        return part

    def params(self, min_scale=None, max_scale=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero), both float32 [out, G]; differentiable w.r.t. the clipping factors."""
        wmin = self.wmin if min_scale is None else self.wmin * min_scale
        wmax = self.wmax if max_scale is None else self.wmax * max_scale
        bits = self.scheme.bits
        if self.scheme.sym:
            half = 2 ** (bits - 1)
            extreme = torch.where(wmax >= -wmin, wmax, wmin)     # the larger magnitude (ties: wmax)
            scale = _to_scale_dtype(extreme / -half)
            scale = torch.where(scale < 0, scale.clamp(max=-SCALE_EPS), scale.clamp(min=SCALE_EPS))
            zero = torch.full_like(scale, float(half))
        else:
            maxq = 2 ** bits - 1
            scale = _to_scale_dtype((wmax - wmin) / maxq).clamp(min=SCALE_EPS)
            zero = _round_ste(-wmin / scale).clamp(0, maxq)
        return scale, zero

    def fake(self, v=None, min_scale=None, max_scale=None, dtype=None) -> torch.Tensor:
        """Quantize-dequantize with straight-through rounding: [out, in] as ``dtype`` (None: the
        weight's dtype; float32 is the exact result)."""
        scale, zero = self.params(min_scale, max_scale)
        v3 = None if v is None else self._grouped(v)
        out = _FakeQuant.apply(self.w, v3, scale.unsqueeze(-1), zero.unsqueeze(-1), self.scheme.maxq)
        return out.reshape(self.shape).to(self.dtype if dtype is None else dtype)

    @torch.no_grad()
    def fake_into(self, out: torch.Tensor, v=None, min_scale=None, max_scale=None) -> None:
        """``fake(v, min_scale, max_scale)`` written into ``out`` ([rows, in], a float dtype) without
        autograd: the same operations in the same order (the same bits), computed in place in a
        float32 ``out`` (no temporaries of the weight's size)."""
        scale, zero = self.params(min_scale, max_scale)
        s3, z3 = scale.unsqueeze(-1), zero.unsqueeze(-1)
        t = out.view(self.w.shape) if out.dtype == torch.float32 else torch.empty(self.w.shape, device=out.device)
        _unclamped_codes(self.w, None if v is None else self._grouped(v), s3, z3, out=t)
        _dequantize_(t.clamp_(0, self.scheme.maxq), s3, z3)
        if t.dtype != out.dtype:
            out.copy_(t.view(out.shape))

    @torch.no_grad()
    def quantize(self, v=None, min_scale=None, max_scale=None) -> QuantizedWeight:
        """Integer codes, scales and zeros; ``dequantize()`` equals ``fake()`` bit for bit."""
        scale, zero = self.params(min_scale, max_scale)
        v3 = None if v is None else self._grouped(v)
        _, codes = _codes(self.w, v3, scale.unsqueeze(-1), zero.unsqueeze(-1), self.scheme.maxq)
        return QuantizedWeight(
            qweight=codes.to(torch.uint8).reshape(self.shape),
            scale=scale.detach().clone(),
            zero=zero.detach().to(torch.int32),
            scheme=self.scheme,
        )

    def _grouped(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape != self.shape:
            raise ValueError(f"rounding offset v has shape {tuple(v.shape)}, expected {tuple(self.shape)}")
        return v.reshape(self.w.shape)


def _to_scale_dtype(scale: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16 value (kept as float32; differentiable)."""
    return scale.clamp(-_SCALE_MAX, _SCALE_MAX).to(SCALE_DTYPE).to(torch.float32)


def _codes(w3, v3, s3, z3, maxq):
    """(unclamped codes, codes clamped to [0, maxq]) as float32: round(w / s + v) + z."""
    t = _unclamped_codes(w3, v3, s3, z3)
    return t, t.clamp(0, maxq)


def _unclamped_codes(w3, v3, s3, z3, out=None):
    """round(w / s + v) + z as float32 (in ``out`` when given)."""
    t = torch.div(w3, s3, out=out)
    if v3 is not None:
        t += v3
    t.round_()
    t += z3
    return t


def _dequantize_(codes, s3, z3):
    """(codes - z) * s, in place."""
    codes -= z3
    codes *= s3
    return codes


class _FakeQuant(torch.autograd.Function):
    """s * (clamp(round(w / s + v) + z, 0, maxq) - z) with a hand-written straight-through backward
    (a few fused passes instead of autograd's many temporaries: this runs every tuning step).

    d/dv = s * inside;  d/ds = (q - z) - inside * w / s;  d/dz = s * (inside - 1),
    where ``inside`` marks codes that were not clamped.
    """

    @staticmethod
    def forward(ctx, w3, v3, s3, z3, maxq):
        unclamped, out = _codes(w3, v3, s3, z3, maxq)
        inside = unclamped == out
        del unclamped
        _dequantize_(out, s3, z3)
        ctx.save_for_backward(w3, s3, inside, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        w3, s3, inside, out = ctx.saved_tensors
        _, need_v, need_s, need_z, _ = ctx.needs_input_grad
        g_in = torch.where(inside, grad, 0.0)
        grad_s = grad_z = None
        if need_s:
            t = grad * out
            t.addcmul_(g_in, w3, value=-1.0)
            grad_s = t.sum(dim=-1, keepdim=True) / s3
        if need_z:
            grad_z = s3 * (g_in.sum(dim=-1, keepdim=True) - grad.sum(dim=-1, keepdim=True))
        grad_v = g_in.mul_(s3) if need_v else None
        return None, grad_v, grad_s, grad_z, None


def quant_params(w: torch.Tensor, scheme: QuantScheme, min_scale=None, max_scale=None):
    """(scale, zero) of ``w`` [out, in], float32 [out, G] each (zero holds integers).

    ``min_scale``/``max_scale`` ([out, G], None: 1.0) multiply the group min/max; the result is
    differentiable w.r.t. them (zero is rounded straight-through)."""
    return GroupedWeight(w, scheme).params(min_scale, max_scale)


def fake_quantize(w: torch.Tensor, scheme: QuantScheme, v=None, min_scale=None, max_scale=None) -> torch.Tensor:
    """Quantize-dequantize ``w`` with rounding offset ``v`` (shape of w, in [-0.5, 0.5]) and clipping
    factors; returns w's shape and dtype.  Gradients flow to v, min_scale and max_scale (not w)."""
    return GroupedWeight(w, scheme).fake(v, min_scale, max_scale)


def quantize(w: torch.Tensor, scheme: QuantScheme, v=None, min_scale=None, max_scale=None) -> QuantizedWeight:
    """Integer codes of ``w``; ``quantize(...).dequantize()`` equals ``fake_quantize(...)`` in fp32."""
    return GroupedWeight(w, scheme).quantize(v, min_scale, max_scale)
