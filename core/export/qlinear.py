"""A linear layer that runs on the packed tensors of an auto_round / auto_gptq checkpoint.

The buffers are exactly the on-disk tensors (names, dtypes, shapes), so ``load_state_dict`` reads a
checkpoint straight into the module.  ``forward`` unpacks and dequantizes the weight
(``W[o, i] = scales[g(i), o] * (q[i, o] - (qzeros[g(i), o] + zero_offset))``) and calls
``F.linear``; with ``cache_weight=True`` the dequantized weight is kept per (device, dtype) until the
buffers move or are reloaded.  Plain torch: runs wherever its buffers are (CPU or CUDA).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .awq import awq_unpack
from .formats import LayerLayout, layer_layout_from_config, layer_tensors, layout
from .packing import unpack


class QuantLinear(nn.Module):
    """Packed int weights (2, 3, 4 or 8 bits) with fp16 group scales; see the module docstring."""

    def __init__(self, in_features: int, out_features: int, lay: LayerLayout, *, bias: bool = False,
                 device=None, cache_weight: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.layout = lay
        self.bits, self.group_size, self.zero_offset = lay.bits, lay.group_size, lay.zero_offset
        self.cache_weight = cache_weight
        groups = lay.groups(in_features)
        words_in, words_out = in_features * lay.bits // 32, out_features * lay.bits // 32
        if words_in * 32 != in_features * lay.bits or words_out * 32 != out_features * lay.bits:
            raise ValueError(f"[{out_features}, {in_features}] does not pack into int32 words at {lay.bits} bits")
        shape = (in_features, words_out) if lay.awq else (words_in, out_features)   # AWQ: packed along outputs
        self.register_buffer("qweight", torch.zeros(*shape, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, words_out, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        if lay.g_idx:
            self.register_buffer("g_idx", lay.group_index(in_features, device=device))
        else:
            self.g_idx = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device))
        else:
            self.bias = None
        self._cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_config(cls, in_features: int, out_features: int, quantization_config: dict, name: str, *,
                    bias: bool = False, g_idx: bool | None = None, device=None) -> "QuantLinear | None":
        """An empty layer ``name`` as a checkpoint's quantization_config describes it (None: the config
        keeps it in full precision); ``g_idx`` overrides whether a g_idx buffer is expected."""
        lay = layer_layout_from_config(quantization_config, name)
        if lay is None:
            return None
        if g_idx is not None:
            lay = dataclasses.replace(lay, g_idx=g_idx)
        return cls(in_features, out_features, lay, bias=bias, device=device)

    @classmethod
    def from_quantized(cls, qw, bias: torch.Tensor | None, fmt: str, *, packing_sym: bool | None = None,
                       cache_weight: bool = False) -> "QuantLinear":
        """Pack a ``QuantizedWeight`` (and optional bias) exactly as format ``fmt`` writes it."""
        out_features, in_features = qw.qweight.shape
        lay = layout(fmt, qw.scheme, packing_sym)
        module = cls(in_features, out_features, lay, bias=bias is not None, device=qw.qweight.device,
                     cache_weight=cache_weight)
        tensors = layer_tensors("", qw, bias, fmt, packing_sym=packing_sym)
        module.load_state_dict({k[1:]: v for k, v in tensors.items()})
        return module.to(qw.qweight.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as [out, in] in ``dtype`` (computed in float32, in place where possible)."""
        if self.layout.awq:
            w = awq_unpack(self.qweight, self.bits).t().to(torch.float32)        # [out, in]
            zeros = (awq_unpack(self.qzeros, self.bits) + self.zero_offset).t().float()   # [out, G]
        else:
            w = unpack(self.qweight.t(), self.bits, dim=1).to(torch.float32)      # [out, in]
            zeros = (unpack(self.qzeros, self.bits, dim=1) + self.zero_offset).t().float()   # [out, G]
        scales = self.scales.t().float()
        plain = self.layout.group_index(self.in_features, device=w.device)
        if (self.g_idx is None or torch.equal(self.g_idx.to(plain.dtype), plain)) and self.in_features % zeros.shape[1] == 0:
            index = None
        else:   # any other group assignment (act-order checkpoints, a short last group)
            index = (plain if self.g_idx is None else self.g_idx).long()
        return dequantize_groups_(w, zeros, scales, index).to(dtype)

    def weight_for(self, dtype: torch.dtype) -> torch.Tensor:
        if not self.cache_weight:
            return self.dequantize(dtype)
        key = (self.qweight.device, dtype)
        if key not in self._cache:
            self._cache[key] = self.dequantize(dtype)
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_for(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def _apply(self, fn, *args, **kwargs):
        self._cache = {}
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def dequantize_groups_(w: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, index=None) -> torch.Tensor:
    """In place: float32 codes ``w`` [out, in] <- (w - zero) * scale of each input's group (``zeros``,
    ``scales``: [out, G]).  ``index`` [in]: the group of every input; None: G equal consecutive groups."""
    if index is None:
        w.view(w.shape[0], zeros.shape[1], -1).sub_(zeros.unsqueeze(-1)).mul_(scales.unsqueeze(-1))
    else:
        w.sub_(zeros[:, index]).mul_(scales[:, index])
    return w
