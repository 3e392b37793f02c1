"""A linear layer that runs on the "pack-quantized" tensors of a compressed-tensors checkpoint (the read
side of compressed.py; the layout is described there).

The buffers are exactly the on-disk tensors (``weight_packed``, ``weight_scale``, ``weight_zero_point``
when asymmetric, ``weight_shape``, ``bias``), so ``load_state_dict`` reads a checkpoint straight into the
module.  ``forward`` unpacks the codes, dequantizes ``W = scale * (q - z)`` in float32 (``z`` = 2^(b-1)
when symmetric: the signed zero point 0) and calls ``F.linear``.  Which layers are quantized, and how, comes
from the ``quantization_config``: its ``config_groups`` (targets ``Linear``, a layer name, or ``re:PATTERN``)
and ``ignore`` list; integer weights with ``group`` or ``channel`` strategy only.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFileError
from .packing import period, unpack
from .qlinear import dequantize_groups_

PACKED = "pack-quantized"


def _matches(target: str, name: str, module: nn.Module) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target in (name, type(module).__name__) or (target == "Linear" and isinstance(module, nn.Linear))


def weight_args(qcfg: dict, name: str, module: nn.Module) -> dict | None:
    """The ``weights`` arguments of the config group that quantizes layer ``name`` (None: kept in full
    precision); ModelFileError for what this reader cannot run."""
    fmt = qcfg.get("format")
    if fmt != PACKED:
        raise ModelFileError(f"compressed-tensors format {fmt!r} is not read by load_quantized (only {PACKED}); "
                             "load it with transformers' compressed-tensors integration")
    if any(_matches(t, name, module) for t in qcfg.get("ignore") or []):
        return None
    for group_name, group in (qcfg.get("config_groups") or {}).items():
        if any(_matches(t, name, module) for t in group.get("targets") or []):
            args = group.get("weights") or {}
            if args.get("type", "int") != "int" or args.get("strategy") not in ("group", "channel") \
                    or args.get("actorder") or args.get("dynamic"):
                raise ModelFileError(f"config group {group_name} of the quantization_config quantizes {name} with "
                                     f"{args}; load_quantized reads int weights with group or channel strategy only")
            return args
    return None


class CompressedLinear(nn.Module):
    """Pack-quantized int weights with per-group (or per-channel) scales; see the module docstring."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, sym: bool, *,
                 bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        period(bits)   # a ValueError for bits the bit stream cannot hold
        groups = 1 if group_size in (-1, 0, None) else -(-in_features // group_size)
        self.register_buffer("weight_packed", torch.zeros(out_features, -(-in_features * bits // 32),
                                                          dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, groups, dtype=torch.float16, device=device))
        if not sym:
            self.register_buffer("weight_zero_point", torch.zeros(-(-out_features * bits // 32), groups,
                                                                  dtype=torch.int32, device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device))
        else:
            self.bias = None

    @classmethod
    def from_config(cls, qcfg: dict, name: str, module: nn.Module, keys: set[str]) -> "CompressedLinear | None":
        """An empty (meta) layer ``name`` replacing Linear ``module`` as ``qcfg`` describes it."""
        args = weight_args(qcfg, name, module)
        if args is None:
            return None
        if not isinstance(module, nn.Linear):
            raise ModelFileError(f"{name} is a {type(module).__name__}, not a Linear layer; cannot load "
                                 f"{name}.weight_packed")
        group_size = int(args["group_size"]) if args["strategy"] == "group" else -1
        try:
            return cls(module.in_features, module.out_features, int(args["num_bits"]), group_size,
                       bool(args.get("symmetric", True)), bias=f"{name}.bias" in keys, device="meta")
        except ValueError as exc:
            raise ModelFileError(f"{name}: {exc}; the quantization_config does not match the model") from exc

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as [out, in] in ``dtype`` (computed in float32)."""
        q = _unpack(self.weight_packed, self.bits, 1, self.in_features).to(torch.float32)
        scale = self.weight_scale.float()
        if self.sym:
            zero = torch.full_like(scale, float(2 ** (self.bits - 1)))
        else:
            zero = _unpack(self.weight_zero_point, self.bits, 0, self.out_features).float()
        groups = scale.shape[1]
        if groups == 1 or groups * self.group_size == self.in_features:
            index = None
        else:   # a short last group
            index = torch.arange(self.in_features, device=q.device) // self.group_size
        return dequantize_groups_(q, zero, scale, index).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, bias={self.bias is not None}")


def _unpack(packed: torch.Tensor, bits: int, dim: int, n: int) -> torch.Tensor:
    """The first ``n`` values of each bit stream along ``dim`` (padded to whole packing periods)."""
    words = period(bits)[1]
    pad = -packed.shape[dim] % words
    if pad:
        shape = list(packed.shape)
        shape[dim] = pad
        packed = torch.cat([packed, packed.new_zeros(shape)], dim=dim)
    return unpack(packed, bits, dim=dim).narrow(dim, 0, n)
