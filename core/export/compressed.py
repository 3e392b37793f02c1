"""The compressed-tensors "pack-quantized" layout (what llm-compressor writes; vLLM and transformers'
compressed-tensors integration read it).

One quantized linear layer ``NAME`` becomes

- ``NAME.weight_packed``: int32 [out, ceil(in * b / 32)], each row one little-endian bit stream of
  its ``in`` codes (code k in stream bits [k*b, (k+1)*b), the same stream as packing.py's);
- ``NAME.weight_scale``: float16 [out, G];
- ``NAME.weight_zero_point`` (asymmetric only): int32 [ceil(out * b / 32), G], the zero points packed
  the same way along the output dimension;
- ``NAME.weight_shape``: int64 [2], ``[out, in]``;
- ``NAME.bias`` (float16) when the layer has one.

compressed-tensors thinks in signed codes: ``W = scale * (q_s - zp_s)`` with ``q_s`` in
[-2^(b-1), 2^(b-1)), stored as ``q_s + 2^(b-1)``.  That stored value is exactly blockquant's unsigned
code ``q`` (``W = s * (q - z)``) and the stored zero point is ``z``; a symmetric layer's zero
2^(b-1) is the signed zero point 0, which is not stored.
"""
from __future__ import annotations

import torch

from ..config import QuantScheme
from ..errors import BlockquantError
from .packing import pack

FORMAT = "compressed-tensors"
LAYOUT_VERSION = "0.20.1"   # the compressed-tensors release whose reader the layout was checked against


def layer_tensors(name: str, qw, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of layer ``name`` from a ``QuantizedWeight``."""
    q, scheme = qw.qweight, qw.scheme
    out_features, in_features = q.shape
    if scheme.sym and not bool((qw.zero == 2 ** (scheme.bits - 1)).all()):
        raise BlockquantError(f"{name}: a symmetric layer must have the zero point 2^(bits-1)")
    if in_features % 32 or out_features % 32:
        raise BlockquantError(f"{name}: a [{out_features}, {in_features}] weight cannot be packed ({FORMAT} "
                              "needs both dims to be multiples of 32); keep this layer in full precision")
    tensors = {
        f"{name}.weight_packed": pack(q.cpu(), scheme.bits, dim=1),
        f"{name}.weight_scale": qw.scale.to(torch.float16).cpu().contiguous(),
        f"{name}.weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if not scheme.sym:
        tensors[f"{name}.weight_zero_point"] = pack(qw.zero.cpu(), scheme.bits, dim=0)
    if bias is not None:
        tensors[f"{name}.bias"] = bias.detach().to(torch.float16).cpu().contiguous()
    return tensors


def weight_args(scheme: QuantScheme) -> dict:
    """The ``weights`` quantization arguments of one config group."""
    grouped = scheme.group_size not in (-1, 0)
    return {
        "num_bits": scheme.bits, "type": "int", "symmetric": scheme.sym,
        "strategy": "group" if grouped else "channel", "group_size": scheme.group_size if grouped else None,
        "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {},
    }


def quantization_config(scheme: QuantScheme, ignore: list[str]) -> dict:
    """``quantization_config`` for config.json: every Linear is quantized except the ``ignore`` names."""
    return {
        "quant_method": FORMAT,
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weight_args(scheme),
                                      "input_activations": None, "output_activations": None,
                                      "format": "pack-quantized"}},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "version": LAYOUT_VERSION,
    }


def unquantized_linears(model: torch.nn.Module, quantized: set[str]) -> list[str]:
    """Names of the model's Linear modules that were not quantized (the config's ``ignore`` list)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized]
