"""Load a quantized checkpoint (auto_round, auto_gptq or compressed-tensors layout) for inference.

The model is built from its config.json with empty (meta) parameters; every linear layer whose
``NAME.qweight`` is in the checkpoint becomes a :class:`QuantLinear` (``NAME.weight_packed`` of a
compressed-tensors checkpoint: a :class:`CompressedLinear`); all tensors are then read
from the (sharded) safetensors files and assigned; tied weights are tied; the model is returned in
eval mode on ``device``.
"""
from __future__ import annotations

import glob
import logging
import os

import torch
from safetensors import safe_open
from torch import nn

from ..errors import ModelFileError, UsageError
from ..model.model_io import read_json, transformers_renamer
from .compressed import FORMAT as COMPRESSED
from .compressed_linear import CompressedLinear
from .qlinear import QuantLinear

log = logging.getLogger("blockquant")


def _read_json(path: str) -> dict | None:
    return read_json(path, fix="re-export the model")


def weight_files(path: str) -> dict[str, str]:
    """tensor name -> safetensors file, from an index or the lone ``*.safetensors`` file(s)."""
    indexes = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors.index.json")))
    if indexes:
        index = _read_json(indexes[0]) or {}
        mapping = {k: os.path.join(path, v) for k, v in index.get("weight_map", {}).items()}
        missing = sorted({f for f in mapping.values() if not os.path.isfile(f)})
        if missing:
            raise ModelFileError(f"shard {missing[0]} named in {indexes[0]} is missing; copy the whole folder")
        return mapping
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
    if not files:
        raise ModelFileError(f"{path} holds no *.safetensors weights; pass the folder a quantization run wrote")
    mapping = {}
    for file in files:
        with safe_open(file, "pt") as f:
            mapping.update({k: file for k in f.keys()})
    return mapping


def read_quantization_config(path: str, config: dict) -> dict:
    qcfg = config.get("quantization_config") or _read_json(os.path.join(path, "quantization_config.json"))
    if not qcfg:
        raise UsageError(
            f"{path}/config.json has no quantization_config: not a quantized checkpoint; load it with "
            "transformers' from_pretrained instead"
        )
    return qcfg


def build_empty(path: str, config: dict, model_class=None, dtype=None) -> nn.Module:
    """The model of ``path`` with parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights

    if "_class_name" in config:
        if model_class is None:
            import diffusers

            model_class = getattr(diffusers, config["_class_name"], None)
            if model_class is None:
                raise UsageError(f"diffusers has no class {config['_class_name']}; upgrade diffusers or pass model_class")
        with init_empty_weights():
            return model_class.from_config({k: v for k, v in config.items() if k != "quantization_config"})
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(path)
    if model_class is None:
        for name in config.get("architectures") or []:
            model_class = getattr(transformers, name, None)
            if model_class is not None:
                break
    kwargs = {} if dtype is None else {"dtype": dtype}
    with init_empty_weights():
        if model_class is None:
            return transformers.AutoModelForCausalLM.from_config(hf_config, **kwargs)
        return model_class._from_config(hf_config, **kwargs)


def _renamer(model: nn.Module):
    """Checkpoint key -> module key with transformers' renamings for this model (identity if none)."""
    return transformers_renamer(model) or (lambda key: key)


def _quant_linear(qcfg: dict, name: str, module: nn.Module, shapes: dict[str, list[int]], keys: set[str]) -> QuantLinear:
    if not isinstance(module, nn.Linear):
        raise ModelFileError(f"{name} is a {type(module).__name__}, not a Linear layer; cannot load {name}.qweight")
    try:
        qlinear = QuantLinear.from_config(module.in_features, module.out_features, qcfg, name,
                                          bias=f"{name}.bias" in keys, g_idx=f"{name}.g_idx" in keys, device="meta")
    except ValueError as exc:
        raise ModelFileError(f"{name}: {exc}; the quantization_config does not match the model") from exc
    if qlinear is None:
        raise ModelFileError(f"{name}.qweight is in the checkpoint but quantization_config keeps {name} in full precision")
    if shapes[f"{name}.qweight"] != list(qlinear.qweight.shape):
        raise ModelFileError(
            f"{name}.qweight has shape {shapes[f'{name}.qweight']}, expected {list(qlinear.qweight.shape)} for "
            f"{qlinear.bits} bits; the quantization_config does not match the weights"
        )
    return qlinear


def _compressed_linear(qcfg: dict, name: str, module: nn.Module, shapes: dict[str, list[int]],
                       keys: set[str]) -> CompressedLinear:
    layer = CompressedLinear.from_config(qcfg, name, module, keys)
    if layer is None:
        raise ModelFileError(f"{name}.weight_packed is in the checkpoint but quantization_config keeps {name} in "
                             "full precision")
    if shapes[f"{name}.weight_packed"] != list(layer.weight_packed.shape):
        raise ModelFileError(f"{name}.weight_packed has shape {shapes[f'{name}.weight_packed']}, expected "
                             f"{list(layer.weight_packed.shape)} for {layer.bits} bits; the quantization_config "
                             "does not match the weights")
    return layer


def load_quantized(path: str, device="cpu", dtype: torch.dtype | None = None, model_class=None) -> nn.Module:
    """Load a quantized folder as an eval-mode model on ``device``.

    ``dtype`` casts the non-quantized floating-point tensors (default: as stored); QuantLinear
    keeps its packed buffers as stored and computes in the input's dtype.  ``model_class``
    overrides the class chosen from config.json.
    """
    if not os.path.isdir(path):
        raise UsageError(f"{path} is not a folder; pass the output folder of a quantization run")
    config = _read_json(os.path.join(path, "config.json"))
    if config is None:
        raise ModelFileError(f"{path} has no config.json; pass the folder a quantization run wrote")
    qcfg = read_quantization_config(path, config)
    files = weight_files(path)
    model = build_empty(path, config, model_class, dtype)
    rename = _renamer(model)
    names = {key: rename(key) for key in files}
    keys = set(names.values())

    compressed = qcfg.get("quant_method") == COMPRESSED
    marker, make = (".weight_packed", _compressed_linear) if compressed else (".qweight", _quant_linear)
    shapes = {}
    for key, file in files.items():
        if key.endswith(marker):
            with safe_open(file, "pt") as f:
                shapes[names[key]] = list(f.get_slice(key).get_shape())
    for qname in sorted(k[: -len(marker)] for k in shapes):
        module = model.get_submodule(qname) if _has(model, qname) else None
        if module is None:
            raise ModelFileError(f"the checkpoint quantizes {qname}, which this model does not have")
        qlinear = make(qcfg, qname, module, shapes, keys)
        parent, _, child = qname.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, qlinear)

    quant_prefixes = {k[: -len(marker)] for k in shapes}
    state = {}
    by_file: dict[str, list[str]] = {}
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    for file in sorted(by_file):
        with safe_open(file, "pt") as f:
            for key in by_file[file]:
                tensor = f.get_tensor(key)
                name = names[key]
                quantized = name.rsplit(".", 1)[0] in quant_prefixes   # packed buffers stay as stored
                if dtype is not None and tensor.is_floating_point() and not quantized:
                    tensor = tensor.to(dtype)
                state[name] = tensor
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        log.warning("ignored %d checkpoint tensor(s) the model does not use, e.g. %s",
                    len(result.unexpected_keys), result.unexpected_keys[0])
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if still_meta:
        raise ModelFileError(
            f"{len(still_meta)} tensor(s) are missing from the checkpoint, e.g. {still_meta[0]}; the folder is incomplete"
        )
    return model.to(device).eval()


def load_quantized_pipeline(folder: str, device="cpu", dtype: torch.dtype | None = None):
    """Load a diffusers pipeline folder a quantization run wrote: every component whose config.json has a
    quantization_config through ``load_quantized``, the others through the pipeline's own loader (so no
    quantization integration of diffusers, nor its package, is involved)."""
    index = _read_json(os.path.join(folder, "model_index.json"))
    if index is None:
        raise UsageError(f"{folder} has no model_index.json: not a pipeline folder; load it with load_quantized")
    from diffusers import DiffusionPipeline

    quantized = {name: load_quantized(os.path.join(folder, name), device=device, dtype=dtype) for name in index
                 if "quantization_config" in (_read_json(os.path.join(folder, name, "config.json")) or {})}
    pipe = DiffusionPipeline.from_pretrained(folder, **quantized, **({"dtype": dtype} if dtype is not None else {}))
    return pipe.to(device)


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
