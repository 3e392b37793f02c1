"""The optional compiled tuning step (``--compile auto|on|off``).

Compiled, a tuned layer's forward is plain autograd: ``F.linear(x, fake(W))`` with the fake-quantized
weight built whole and kept for the backward (the plain path's memory: ~5 bytes per weight more while a
step runs), so that ``torch.compile`` can trace the whole block's forward and backward and fuse the
fake quantization's element-wise work.  The hand-written ``QuantLinearFn`` (chunked, rebuilt in the
backward) is opaque to the compiler and stays the eager path.

Measured (bench/README.md, "Compiled tuning step"): on the CPU the compiled step is no faster than the
eager one at the 22.7M model's block (its matmuls dominate) and the compilation costs ~20 CPU seconds
per block shape, so ``auto`` compiles only CUDA blocks whose tuned layers hold at least
``COMPILE_MIN_WEIGHTS`` weights, where the element-wise work the compiler fuses is a larger share.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("auto", "on", "off")
# ``auto`` compiles CUDA blocks with at least this many tuned weights (a block of a ~1B model or larger)
COMPILE_MIN_WEIGHTS = 2 ** 25


def use_compile(mode: str, device, weights: int) -> bool:
    """Whether a block with ``weights`` tuned weights on ``device`` tunes compiled under ``mode``."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    return torch.device(device).type == "cuda" and weights >= COMPILE_MIN_WEIGHTS


def compile_block(module: torch.nn.Module):
    """``module`` compiled for tuning.  Inductor keeps the casts it would otherwise fuse away
    (``emulate_precision_casts``): the scales' rounding to float16 must happen in the compiled step
    exactly as in the exported codes; with it, the compiled step gives the eager bytes (tested)."""
    return torch.compile(module, options={"emulate_precision_casts": True})


def traced_forward(st):
    """The forward of tuned layer ``st`` (a ``TunedLinear``) in plain autograd ops, for torch.compile."""

    def forward(x, *args, **kwargs):
        device_type = x.device.type
        dt = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        st.rows = max(st.rows, x.numel() // max(x.shape[-1], 1))
        with torch.autocast(device_type, enabled=False):
            w = st.grouped.fake(st.v, st.min_scale, st.max_scale, dtype=torch.float32).to(dt)
            return F.linear(x.to(dt), w, None if st.bias is None else st.bias.to(dt))

    return forward
