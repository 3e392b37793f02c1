"""One nn.Linear while AutoRound tunes it: its state (``TunedLinear``) and the forward/backward that
replaces the layer's own (``QuantLinearFn``), both written to keep memory at a few bytes per weight.

Per weight, while a block tunes: the weight in its narrowest exact dtype (2 bytes for a bf16/fp16
checkpoint upcast to fp32), the fp32 rounding offset ``v`` (4) and the best iteration's codes (1).
The fake-quantized weight is built a chunk of rows at a time in the forward, used and dropped, and
rebuilt in the backward; no block-wide set of fake weights or gradients is ever held, only one buffer
the size of the block's largest layer that each layer's forward and backward reuse (``Scratch``).

Layers of at most ``PLAIN_MAX_ELEMENTS`` weights (one chunk) take a plain path instead, where the
memory-lean machinery costs more time than it saves memory: the forward's fake-quantized weight and
its autograd graph stay until the backward (~5 more bytes per weight while a step runs), and the best
iteration is a copy of the parameters (4 bytes per weight for ``v``) instead of codes.  Both paths
compute the same numbers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import QuantScheme
from .quantizers import GroupedWeight, QuantizedWeight

# rows of fake-quantization work at a time: bounds its temporaries (~25 bytes per weight) to ~50 MB
CHUNK_ELEMENTS = 2 * 2 ** 20
# rows dequantized / RTN-quantized at a time (fewer temporaries per weight)
DEQUANT_CHUNK_ELEMENTS = 8 * 2 ** 20
# layers up to this many weights take the plain path: the forward's fake-quantized weight (and its
# autograd graph, ~5 bytes per weight) is kept for the backward instead of rebuilt there, and the best
# iteration is kept as a copy of the parameters.  Such a layer is one chunk anyway, so the plain path
# computes the same numbers; above it, rebuilding in row chunks bounds the memory.
PLAIN_MAX_ELEMENTS = CHUNK_ELEMENTS


class TunedLinear:
    """Tuning state of one layer: its parameters (``v`` and the clipping factors), the best
    iteration's codes (plain path: a copy of its parameters), and the forward that replaces the
    layer's own while tuning.  The weight is stored narrow meanwhile (``narrow``); ``finish`` writes
    the result back in the original dtype."""

    def __init__(self, layer: torch.nn.Linear, scheme: QuantScheme, tune_minmax: bool, scratch: "Scratch | None" = None):
        if not isinstance(layer, torch.nn.Linear):
            raise TypeError(f"tune_block handles torch.nn.Linear layers, got {type(layer).__name__}")
        self.layer = layer
        self.dtype = layer.weight.dtype
        self.bias = None if layer.bias is None else layer.bias.detach()
        narrow(layer)
        self.grouped = GroupedWeight(layer.weight, scheme)
        w = self.grouped.w
        self.v = torch.zeros(layer.weight.shape, dtype=torch.float32, device=w.device, requires_grad=True)
        ones = torch.ones(w.shape[:2], dtype=torch.float32, device=w.device)
        self.min_scale = ones.clone().requires_grad_(tune_minmax)
        self.max_scale = ones.requires_grad_(tune_minmax)
        self.plain = layer.weight.numel() <= PLAIN_MAX_ELEMENTS
        if self.plain:
            self._kept = tuple(torch.empty_like(p) for p in self.params())
        else:
            self._kept = QuantizedWeight(torch.empty(layer.weight.shape, dtype=torch.uint8, device=w.device),
                                         torch.empty_like(ones), torch.empty_like(ones, dtype=torch.int32), scheme)
        self.best: QuantizedWeight | tuple | None = None     # None: the initial (RTN) parameters
        self.rows = 0            # the most input rows (tokens) one forward has seen
        self.scratch = scratch or Scratch()    # the chunked path's fake weight, shared by a block's layers
        self._saved = None

    # --- the replacement forward -------------------------------------------------------------
    def install(self, forward=None) -> None:
        """Replace the layer's forward (``forward``: another one, e.g. compiled.traced_forward's)."""
        layer = self.layer

        def eager(x, *args, **kwargs):
            return QuantLinearFn.apply(x, self.v, self.min_scale, self.max_scale, self)

        forward = forward or eager

        # Under accelerate hooks, ``forward`` is the hook's wrapper that calls ``_old_forward``.
        attr = "_old_forward" if "_old_forward" in layer.__dict__ else "forward"
        self._saved = (attr, layer.__dict__.get(attr, _MISSING))
        setattr(layer, attr, forward)

    def uninstall(self) -> None:
        if self._saved is None:
            return
        attr, old = self._saved
        if old is _MISSING:
            delattr(self.layer, attr)
        else:
            setattr(self.layer, attr, old)
        self._saved = None

    # --- parameters ----------------------------------------------------------------------------
    def params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.v, self.min_scale, self.max_scale

    @torch.no_grad()
    def remember_best(self) -> None:
        """Keep the current parameters: as codes (1 byte per weight, not a copy of ``v``), or on the
        plain path as a copy of the parameters (one copy instead of a quantization pass), in the
        buffers allocated with the state (no long-lived allocation inside the tuning loop)."""
        if self.plain:
            for kept, p in zip(self._kept, self.params()):
                kept.copy_(p)
        else:
            qw = self.grouped.quantize(*self.params())
            for field in ("qweight", "scale", "zero"):
                getattr(self._kept, field).copy_(getattr(qw, field))
        self.best = self._kept

    def quantized(self, rtn: bool) -> QuantizedWeight:
        if rtn:
            return self.grouped.quantize()
        if self.best is None:
            return self.grouped.quantize(*self.params())
        return self.grouped.quantize(*self.best) if self.plain else self.best

    @torch.no_grad()
    def finish(self, qw: QuantizedWeight | None) -> None:
        """Drop the tuning state and write the quantized weight into the layer in its original dtype
        (None: restore the original weight)."""
        self.v = self.min_scale = self.max_scale = self.best = self._kept = self.scratch = None
        w = self.layer.weight
        if qw is None:
            if w.dtype != self.dtype:
                w.data = w.to(self.dtype)
            return
        if w.dtype != self.dtype:
            w.data = torch.empty(w.shape, dtype=self.dtype, device=w.device)
        write_dequantized(w, qw)


def write_dequantized(w: torch.Tensor, qw: QuantizedWeight) -> None:
    """w <- qw's weight in w's dtype, a chunk of rows at a time (bounded temporaries)."""
    for rows in row_chunks(w.shape, DEQUANT_CHUNK_ELEMENTS):
        w[rows].copy_(qw.rows(rows.start, rows.stop).dequantize(w.dtype))


def narrow(layer: torch.nn.Linear) -> None:
    """Store a float32 weight as bfloat16/float16 when that is exact (an upcast 16-bit checkpoint)."""
    w = layer.weight
    if w.dtype != torch.float32:
        return
    with torch.no_grad():
        for dtype in (torch.bfloat16, torch.float16):
            narrow = w.to(dtype)
            if torch.equal(narrow.to(torch.float32), w):
                w.data = narrow
                return


class QuantLinearFn(torch.autograd.Function):
    """``x @ fake(W)^T + b`` that saves only ``x`` (in the compute dtype) for the backward, where the
    fake-quantized weight is rebuilt: no weight-sized tensor outlives its layer's forward/backward,
    and the fake-quantization temporaries (several per weight) exist for a chunk of rows at a time.

    The compute dtype is autocast's where autocast is on (as ``F.linear`` would), else ``x``'s.
    """

    @staticmethod
    def forward(ctx, x, v, min_scale, max_scale, st):
        device_type = x.device.type
        dt = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        ctx.st, ctx.dt, ctx.plain = st, dt, None
        st.rows = max(st.rows, x.numel() // max(x.shape[-1], 1))
        with torch.autocast(device_type, enabled=False):
            xc = x.to(dt)
            if st.plain:
                leaves = [p.detach().requires_grad_(n) for p, n in zip((v, min_scale, max_scale), ctx.needs_input_grad[1:4])]
                with torch.enable_grad():
                    part = st.grouped.fake(*leaves, dtype=torch.float32)
                w = part.detach().to(dt)
                ctx.plain = (part, leaves, w)
            else:
                w = st.scratch.take(v.shape, dt, v.device)
                for rows in row_chunks(v.shape):
                    st.grouped.rows(rows.start, rows.stop).fake_into(w[rows], v[rows], min_scale[rows], max_scale[rows])
            y = F.linear(xc, w, None if st.bias is None else st.bias.to(dt))
        ctx.save_for_backward(xc, v, min_scale, max_scale)
        return y

    @staticmethod
    def backward(ctx, gy):
        xc, v, min_scale, max_scale = ctx.saved_tensors
        st, dt = ctx.st, ctx.dt
        need_x, *need = ctx.needs_input_grad[:4]
        params = (v, min_scale, max_scale)
        grads = [None, None, None]
        with torch.autocast(gy.device.type, enabled=False):
            gy = gy.to(dt)
            gy2, x2 = gy.reshape(-1, gy.shape[-1]), xc.reshape(-1, xc.shape[-1])
            if ctx.plain is not None:
                part, leaves, w = ctx.plain
                ctx.plain = None
                wanted = [i for i, leaf in enumerate(leaves) if leaf.requires_grad]
                if wanted:
                    gw = (gy2.t() @ x2).to(torch.float32)
                    for i, g in zip(wanted, torch.autograd.grad(part, [leaves[i] for i in wanted], gw)):
                        grads[i] = g
                return (gy @ w if need_x else None), *grads, None
            grads = [torch.empty_like(p) if n else None for p, n in zip(params, need)]
            w = st.scratch.take(v.shape, dt, v.device) if need_x else None
            for rows in row_chunks(v.shape):
                leaves = [p[rows].detach().requires_grad_(n) for p, n in zip(params, need)]
                with torch.enable_grad():
                    part = st.grouped.rows(rows.start, rows.stop).fake(*leaves, dtype=torch.float32)
                if need_x:
                    w[rows] = part.detach()
                wanted = [i for i, leaf in enumerate(leaves) if leaf.requires_grad]
                if wanted:
                    gw = (gy2[:, rows].t() @ x2).to(torch.float32)
                    for i, g in zip(wanted, torch.autograd.grad(part, [leaves[i] for i in wanted], gw)):
                        grads[i][rows] = g
                del part, leaves
            gx = gy @ w if need_x else None
        return gx, *grads, None


class Scratch:
    """One weight-sized buffer per dtype, reused by the chunked path for the fake-quantized weight that
    a forward or a backward assembles and drops before it returns (the layers of a block run one at a
    time).  A fresh buffer each time would be a fresh memory map for large layers, and writing it the
    first time costs a page fault per 4 KiB: 6-10% of a step on a 4B-parameter model's block (2560/9728)."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def take(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """A [out, in] tensor of ``dtype`` whose contents are undefined (it is the last one's memory)."""
        n = shape[0] * shape[1]
        key = (dtype, torch.device(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            self._buffers[key] = buf = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


def row_chunks(shape, elements: int | None = None) -> list[slice]:
    """Row slices of a [out, in] weight with about ``elements`` (default CHUNK_ELEMENTS) weights each."""
    out_f, in_f = shape
    step = max(1, (elements or CHUNK_ELEMENTS) // in_f)
    return [slice(r, min(r + step, out_f)) for r in range(0, out_f, step)]


_MISSING = object()

