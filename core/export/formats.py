"""The auto_round and auto_gptq checkpoint layouts (see docs/formats.md).

One quantized linear layer ``NAME`` becomes ``NAME.qweight`` (int32 [in*b/32, out], packed along the
input dim), ``NAME.qzeros`` (int32 [G, out*b/32], packed along the output dim), ``NAME.scales``
(fp16 [G, out]), ``NAME.bias`` (fp16 [out], when present) and, for auto_gptq, ``NAME.g_idx``
(int32 [in]).  Dequantization: ``W[o, i] = scales[g, o] * (q[i, o] - (qzeros[g, o] + offset))``
with ``g = i // group_size`` and ``offset`` 1 (stored zero_point - 1, the GPTQ "v1" convention)
except for the plain asymmetric auto_round packing, whose offset is 0 (real zero points).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..config import QuantScheme
from ..errors import BlockquantError, ModelFileError, UsageError
from .compressed import FORMAT as COMPRESSED
from .compressed import layer_tensors as compressed_layer_tensors
from .compressed import quantization_config as compressed_config
from .gguf_quants import REQUIREMENTS as GGUF_REQUIREMENTS
from .gguf_quants import check_scheme as check_gguf_scheme
from .packing import SUPPORTED_BITS, pack

PACKED_FORMATS = ("auto_round", "auto_gptq")
SAFETENSORS_FORMATS = PACKED_FORMATS + (COMPRESSED,)
GPTQ_DYNAMIC_KEYS = ("bits", "group_size", "sym", "desc_act")


@dataclass(frozen=True)
class LayerLayout:
    """How one layer's tensors are stored: bits, group size, symmetric or not, the value added to
    the stored zero to get the zero point (1 or 0), and whether a ``g_idx`` tensor is written."""

    bits: int
    group_size: int
    sym: bool = True
    zero_offset: int = 1
    g_idx: bool = False
    awq: bool = False     # AutoAWQ packing (read only, see awq.py)

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size in (-1, 0) or self.group_size >= in_features else -(-in_features // self.group_size)

    def group_index(self, in_features: int, device=None) -> torch.Tensor:
        """int32 [in]: the group of each input."""
        idx = torch.arange(in_features, dtype=torch.int32, device=device)
        return torch.zeros_like(idx) if self.groups(in_features) == 1 else idx // self.group_size


def layout(fmt: str, scheme: QuantScheme, packing_sym: bool | None = None) -> LayerLayout:
    """The storage layout of a layer quantized with ``scheme`` in format ``fmt``.

    auto_round picks its packing model-wide from the model's ``sym`` (``packing_sym``, default the
    layer's own): "auto_round:auto_gptq" (zero_point - 1) when symmetric, plain "auto_round" (real
    zero points) otherwise; auto-round's loaders apply that packing to every layer.
    """
    if fmt == "auto_gptq":
        return LayerLayout(scheme.bits, scheme.group_size, scheme.sym, zero_offset=1, g_idx=True)
    if fmt == "auto_round":
        gptq_packing = scheme.sym if packing_sym is None else packing_sym
        return LayerLayout(scheme.bits, scheme.group_size, scheme.sym, zero_offset=1 if gptq_packing else 0)
    raise UsageError(f"format {fmt} has no packed layout; use one of {', '.join(PACKED_FORMATS)}")


def check_format(fmt: str, scheme: QuantScheme) -> None:
    """Refuse, before any work, a scheme that format ``fmt`` cannot hold."""
    if fmt == "fake":
        return
    if fmt.startswith("gguf:") and fmt[5:] in GGUF_REQUIREMENTS:
        check_gguf_scheme(fmt[5:], scheme)
        return
    if fmt not in SAFETENSORS_FORMATS:
        raise UsageError(f"unknown --format {fmt}; choose one of {', '.join(SAFETENSORS_FORMATS)}, gguf:TYPE or fake")
    if scheme.data_type != "int":
        raise UsageError(f"--format {fmt} holds integer weights only (data_type int), not {scheme.data_type}")
    if scheme.bits not in SUPPORTED_BITS:
        raise UsageError(
            f"--format {fmt} cannot hold {scheme.bits}-bit weights; use --bits {', '.join(map(str, SUPPORTED_BITS))}"
        )
    if fmt == "auto_gptq" and not scheme.sym:
        raise UsageError(
            "--format auto_gptq stores zero_point - 1 and cannot hold the zero point 0 that asymmetric "
            "quantization produces; use --format auto_round for asymmetric quantization, or keep --sym"
        )


def packable(in_features: int, out_features: int, bits: int) -> bool:
    """True when runtimes can load the layer packed: both dims multiples of 32 (GPTQ kernels size
    their buffers as ``features // 32 * bits``).  Otherwise keep the layer in full precision."""
    return in_features % 32 == 0 and out_features % 32 == 0


def layer_tensors(name: str, qw, bias: torch.Tensor | None, fmt: str, *,
                  packing_sym: bool | None = None) -> dict[str, torch.Tensor]:
    """The on-disk tensors of one quantized linear layer ``name`` from a ``QuantizedWeight``
    (``packing_sym``: the model-wide ``sym`` when this layer's differs, see :func:`layout`)."""
    if fmt == COMPRESSED:
        return compressed_layer_tensors(name, qw, bias)
    lay = layout(fmt, qw.scheme, packing_sym)
    q = qw.qweight
    out_features, in_features = q.shape
    groups = qw.scale.shape[1]
    if groups != lay.groups(in_features) or tuple(qw.zero.shape) != (out_features, groups):
        raise BlockquantError(
            f"{name}: scale {tuple(qw.scale.shape)} / zero {tuple(qw.zero.shape)} do not match "
            f"{lay.groups(in_features)} groups of group_size {lay.group_size} for weight {tuple(q.shape)}"
        )
    if not packable(in_features, out_features, lay.bits):
        raise BlockquantError(
            f"{name}: a [{out_features}, {in_features}] weight cannot be packed ({fmt} needs both dims to be "
            "multiples of 32); keep this layer in full precision"
        )
    stored_zero = qw.zero.to(torch.int64) - lay.zero_offset
    if int(stored_zero.min()) < 0:
        raise BlockquantError(f"{name}: zero point 0 cannot be stored with zero_point - 1 ({fmt}, sym={lay.sym})")
    tensors = {
        f"{name}.qweight": pack(q.cpu(), lay.bits, dim=1).t().contiguous(),   # packed along the input dim
        f"{name}.qzeros": pack(stored_zero.t().cpu(), lay.bits, dim=1),
        f"{name}.scales": qw.scale.t().to(torch.float16).cpu().contiguous(),
    }
    if bias is not None:
        tensors[f"{name}.bias"] = bias.detach().to(torch.float16).cpu().contiguous()
    if lay.g_idx:
        tensors[f"{name}.g_idx"] = lay.group_index(in_features)
    return tensors


def _escaped(name: str) -> str:
    return "^" + re.escape(name) + "$"


def gptq_dynamic(extra_config: dict[str, dict]) -> dict[str, dict]:
    """GPTQModel-style ``dynamic``: ``-:^NAME$`` skips a full-precision layer, ``+:^NAME$`` overrides."""
    dynamic = {}
    for name in sorted(extra_config):
        values = extra_config[name]
        if values.get("bits", 0) >= 16 or values.get("data_type", "int") != "int":
            dynamic[f"-:{_escaped(name)}"] = {}
        else:
            dynamic[f"+:{_escaped(name)}"] = {k: values[k] for k in GPTQ_DYNAMIC_KEYS if k in values}
    return dynamic


def quantization_config(fmt: str, scheme: QuantScheme, *, iters: int, block_names: list[str],
                        extra_config: dict[str, dict], version: str, ignore: list[str] = ()) -> dict:
    """The ``quantization_config`` object of config.json for ``fmt``.

    ``version`` is written as ``autoround_version`` (auto_round; auto-round reads it as the layout
    version, so pass the auto-round release whose layout is written, "0.16.1"); auto_gptq ignores it.
    ``extra_config`` maps layer names to their differences from ``scheme`` (``{"bits": 16}``: kept in
    full precision inside a quantized block).  ``ignore``: the Linear layers left in full precision
    (compressed-tensors lists them all, the others use ``extra_config``).
    """
    check_format(fmt, scheme)
    if fmt == COMPRESSED:
        return compressed_config(scheme, list(ignore))
    if fmt == "auto_round":
        cfg = {
            "quant_method": "auto-round",
            "packing_format": "auto_round:auto_gptq" if scheme.sym else "auto_round",
            "bits": scheme.bits,
            "group_size": scheme.group_size,
            "sym": scheme.sym,
            "data_type": scheme.data_type,
            "block_name_to_quantize": ",".join(block_names),
            "iters": iters,
            "autoround_version": version,
        }
        if extra_config:
            cfg["extra_config"] = {k: dict(extra_config[k]) for k in sorted(extra_config)}
        return cfg
    if fmt == "auto_gptq":
        cfg = {
            "quant_method": "gptq",
            "bits": scheme.bits,
            "group_size": scheme.group_size,
            "sym": scheme.sym,
            "desc_act": False,
            "true_sequential": False,
            "damp_percent": 0.01,
            "checkpoint_format": "gptq",
        }
        if len(block_names) == 1:
            cfg["block_name_to_quantize"] = block_names[0]
        dynamic = gptq_dynamic(extra_config)
        if dynamic:
            cfg["dynamic"] = dynamic
        return cfg
    raise UsageError(f"format {fmt} writes no quantization_config; use one of {', '.join(PACKED_FORMATS)}")


def layer_layout_from_config(qcfg: dict, name: str) -> LayerLayout | None:
    """The layout of layer ``name`` in a checkpoint with ``quantization_config`` ``qcfg``; None when
    the config says the layer is kept in full precision."""
    method = str(qcfg.get("quant_method", "")).replace("_", "-")
    try:
        bits, group_size, sym = int(qcfg["bits"]), int(qcfg.get("group_size", -1)), bool(qcfg.get("sym", True))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"quantization_config lacks a valid bits/group_size ({exc}); re-export the model") from exc
    if method == "auto-round":
        over = (qcfg.get("extra_config") or {}).get(name, {})
        bits, group_size = int(over.get("bits", bits)), int(over.get("group_size", group_size))
        sym = bool(over.get("sym", sym))
        if bits >= 16 or over.get("data_type", "int") != "int":
            return None
        packing = str(qcfg.get("packing_format") or "auto_round:auto_gptq")
        return LayerLayout(bits, group_size, sym, zero_offset=1 if "gptq" in packing else 0, awq="awq" in packing)
    if method == "gptq":
        for pattern, over in (qcfg.get("dynamic") or {}).items():
            negative = pattern.startswith("-:")
            regex = pattern[2:] if pattern[:2] in ("-:", "+:") else pattern
            if re.match(regex, name):
                if negative:
                    return None
                bits = int(over.get("bits", bits))
                group_size = int(over.get("group_size", group_size))
                sym = bool(over.get("sym", sym))
                break
        return LayerLayout(bits, group_size, sym, zero_offset=1, g_idx=True)
    raise ModelFileError(
        f"quantization_config quant_method {qcfg.get('quant_method')!r} is not auto-round or gptq; "
        "load this checkpoint with the tool that wrote it"
    )
