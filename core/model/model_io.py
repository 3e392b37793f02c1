"""Model folders in, weights streamed block by block.

The model is built with empty (meta) parameters; a ``WeightStore`` reads tensors from the
safetensors shards on demand, so a block's weights exist in memory only while it is processed.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..data.processors import load_processor
from ..errors import ModelFileError
from .hub_names import is_hub_name

log = logging.getLogger("blockquant")


@dataclass
class ModelSource:
    """A resolved model folder: its config.json (transformers) or model_index.json (pipelines)."""

    path: str
    config: dict | None = None
    model_index: dict | None = None

    @classmethod
    def resolve(cls, path: str) -> "ModelSource":
        if is_hub_name(path):
            path = _download(path)
        config = read_json(os.path.join(path, "config.json"))
        model_index = read_json(os.path.join(path, "model_index.json"))
        for name, doc in (("config.json", config), ("model_index.json", model_index)):
            if doc is not None and not isinstance(doc, dict):
                raise ModelFileError(f"{os.path.join(path, name)} holds a JSON {type(doc).__name__}, not an object; "
                                     "restore it from the original model")
        if config is None and model_index is None:
            raise ModelFileError(
                f"{path} holds neither config.json nor model_index.json; pass the folder of a transformers model "
                "or a diffusers pipeline"
            )
        return cls(path=path, config=config, model_index=model_index)

    @property
    def model_type(self) -> str | None:
        return (self.config or {}).get("model_type")

    @property
    def architectures(self) -> list[str]:
        value = (self.config or {}).get("architectures") or []
        values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        return [str(a) for a in values]

    @property
    def pipeline_class(self) -> str | None:
        return (self.model_index or {}).get("_class_name")


def read_json(path: str, fix: str = "restore the file from the original model") -> dict | None:
    """A JSON file's content, None when it does not exist; invalid JSON is a ModelFileError naming ``fix``."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path} is not valid JSON ({e}); {fix}") from e


def _download(name: str) -> str:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelFileError(
            f"'{name}' is not a local folder and the hub is offline (HF_HUB_OFFLINE=1); download it first "
            "(huggingface-cli download NAME --local-dir DIR) and pass the folder"
        )
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"])
    except Exception as e:  # network, auth, missing repo
        raise ModelFileError(f"could not download '{name}' from the hub ({type(e).__name__}: {e}); pass a local folder") from e


@dataclass
class LoadedModel:
    """What a run quantizes: the model (or pipeline component), its processor and weights."""

    model: torch.nn.Module
    processor: Any = None
    source: ModelSource | None = None
    pipeline: Any = None
    weights: "WeightStore | None" = None
    weights_folder: str = ""      # folder of the quantized component's config.json, relative to source


class WeightStore:
    """Tensors of a safetensors checkpoint (single file or sharded), read one at a time."""

    def __init__(self, folder: str, prefix: str = "model", renames: tuple[tuple[str, str], ...] = (), key_map=None):
        self.folder = folder
        self.prefix = prefix
        self.key_map = key_map   # callable: checkpoint name -> model name (e.g. transformers' renamings)
        self._files: dict[str, str] = {}   # model name -> file
        self._ckpt: dict[str, str] = {}    # model name -> checkpoint name
        index_path = os.path.join(folder, f"{prefix}.safetensors.index.json")
        single = os.path.join(folder, f"{prefix}.safetensors")
        if os.path.exists(index_path):
            index = read_json(index_path) or {}
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelFileError(f"{index_path} has no weight_map; restore it from the original model")
        elif os.path.exists(single):
            weight_map = {name: f"{prefix}.safetensors" for name in self._header_names(single)}
        else:
            raise ModelFileError(
                f"no weights in {folder}: expected {prefix}.safetensors or {prefix}.safetensors.index.json "
                "(only safetensors checkpoints are supported; convert .bin files with save_pretrained)"
            )
        entries: dict[str, tuple] = {}
        for file in sorted(set(weight_map.values())):
            path = os.path.join(folder, file)
            if not os.path.exists(path):
                raise ModelFileError(f"shard {path} listed in the index is missing; download it again")
            self._header_names(path, entries)  # validates the header now, not hours into the run
        self._entries: dict[str, tuple] = {}   # model name -> (dtype, shape, start, end) in its file
        compiled = [(re.compile(p), r) for p, r in renames]
        for ckpt_name, file in weight_map.items():
            name = ckpt_name
            for pattern, repl in compiled:
                name = pattern.sub(repl, name)
            if key_map is not None:
                name = key_map(name)
            self._files[name] = file
            self._ckpt[name] = ckpt_name
            if ckpt_name in entries:
                self._entries[name] = entries[ckpt_name]

    @staticmethod
    def _header_names(path: str, entries: dict | None = None) -> list[str]:
        """Parse and check a shard's safetensors header once (tensor names, dtypes, shapes, offsets)."""
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as raw:
                header_len = int.from_bytes(raw.read(8), "little")
                if header_len <= 0 or 8 + header_len > size:
                    raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
                header = json.loads(raw.read(header_len))
            header.pop("__metadata__", None)
            names = list(header)
            # a truncated file still has a whole header: check the data section is whole too
            end = max((v["data_offsets"][1] for v in header.values()), default=0)
            if 8 + header_len + end > size:
                raise ModelFileError(
                    f"shard {path} is truncated ({size} bytes, header says {8 + header_len + end}); download it again"
                )
            if entries is not None:
                base = 8 + header_len
                entries.update({k: (v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0],
                                    base + v["data_offsets"][1]) for k, v in header.items()})
            return names
        except ModelFileError:
            raise
        except Exception as e:
            raise ModelFileError(f"shard {path} is corrupt ({e}); download it again") from e

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def names(self) -> list[str]:
        return list(self._files)

    def nbytes(self, name: str) -> int:
        """Bytes of tensor ``name`` in the checkpoint (from the shard header; nothing is read)."""
        entry = self._entries.get(name)
        return entry[3] - entry[2] if entry else 0

    def floating_dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's first floating-point tensor (from the headers; fp32 when none)."""
        for dtype_name, *_ in self._entries.values():
            dtype = SAFETENSORS_DTYPES.get(dtype_name)
            if dtype is not None and dtype.is_floating_point:
                return dtype
        return torch.float32

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory.

        Plain reads at the header's offsets, not a memory map: pages of a mapped shard stay in the
        process's resident set while the mapping lives, so a run would grow to the checkpoint's size.
        """
        dtype, shape, start, end = self._entry(name)
        out = self._read(name, start, end - start)
        return out.view(dtype).reshape(shape) if out.numel() else torch.empty(shape, dtype=dtype)

    def get_rows(self, name: str, first: int, stop: int) -> torch.Tensor:
        """Rows ``first:stop`` (along dim 0) of tensor ``name``, reading only their bytes: a large table
        (an embedding) converts a chunk at a time without ever being whole in memory."""
        dtype, shape, start, end = self._entry(name)
        stop = min(stop, shape[0])
        row = (end - start) // shape[0] if shape[0] else 0
        out = self._read(name, start + first * row, (stop - first) * row)
        return out.view(dtype).reshape(stop - first, *shape[1:])

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` (from the shard header; nothing is read)."""
        return self._entry(name)[1]

    def _entry(self, name: str) -> tuple[torch.dtype, tuple, int, int]:
        if name not in self._files:
            raise ModelFileError(f"tensor {name} is missing from the checkpoint in {self.folder}")
        dtype_name, shape, start, end = self._entries[name]
        dtype = SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise ModelFileError(f"tensor {name} in {self._files[name]} has dtype {dtype_name}, which blockquant "
                                 "cannot read")
        return dtype, shape, start, end

    def _read(self, name: str, start: int, nbytes: int) -> torch.Tensor:
        file = self._files[name]
        out = torch.empty(nbytes, dtype=torch.uint8)
        try:
            with open(os.path.join(self.folder, file), "rb", buffering=0) as f:
                f.seek(start)
                view, got = memoryview(out.numpy()), 0
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        raise EOFError(f"file ends {len(view) - got} bytes early")
                    got += n
        except (OSError, EOFError) as e:
            raise ModelFileError(f"cannot read tensor {name} from {file} ({e}); the shard is corrupt, download it again") from e
        return out

    def close(self):
        """Nothing stays open between reads; kept so callers can release a store uniformly."""


# safetensors dtype names (the one map: export/shards.py writes with its inverse)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}


def empty_model(model_class, config) -> torch.nn.Module:
    """Build ``model_class`` from ``config`` with parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        if hasattr(model_class, "_from_config"):
            model = model_class._from_config(config)
        elif hasattr(model_class, "from_config"):   # the Auto classes
            model = model_class.from_config(config)
        else:
            model = model_class(config)
    return model.eval()


def is_meta(module: torch.nn.Module) -> bool:
    return any(p.device.type == "meta" for p in module.parameters(recurse=True))


def materialize(module: torch.nn.Module, prefix: str, store: WeightStore | None, device="cpu", dtype=None) -> int:
    """Load every meta parameter/buffer of ``module`` (named ``prefix``) from ``store``.  Returns bytes."""
    from accelerate.utils import set_module_tensor_to_device

    total = 0
    if store is None:
        return 0
    for name, tensor in list(module.named_parameters(recurse=True)) + list(module.named_buffers(recurse=True)):
        if tensor.device.type != "meta":
            continue
        full = f"{prefix}.{name}" if prefix else name
        if full not in store:
            continue
        value = store.get(full)
        if value.is_floating_point() and not all_finite(value):
            raise ModelFileError(f"tensor {full} in {store.folder} contains NaN or Inf values; the checkpoint is "
                                 "damaged - restore it from the original model")
        if tensor.is_floating_point() and not value.is_floating_point():
            raise ModelFileError(
                f"tensor {full} is {value.dtype} in the checkpoint but the model expects a floating-point weight; "
                "the checkpoint is damaged or belongs to another model - restore it from the original model"
            )
        if tuple(value.shape) != tuple(tensor.shape):
            raise ModelFileError(
                f"tensor {full} has shape {tuple(value.shape)} in the checkpoint but the model expects "
                f"{tuple(tensor.shape)}; the config and weights do not match"
            )
        target = dtype if (dtype is not None and value.is_floating_point()) else (tensor.dtype if tensor.is_floating_point() else value.dtype)
        set_module_tensor_to_device(module, name, device, value=value.to(target))
        total += value.numel() * value.element_size()
    return total


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """No NaN/Inf in ``tensor``, checked a chunk at a time: ``isfinite`` on a whole bf16 embedding
    makes a float32 copy and a bool mask of it (measured +1.8 GiB for a 152k x 2560 table)."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def release(module: torch.nn.Module) -> None:
    """Send a block's parameters back to the meta device (frees their memory)."""
    from accelerate.utils import set_module_tensor_to_device

    for name, _ in list(module.named_parameters(recurse=True)):
        set_module_tensor_to_device(module, name, "meta")


def still_meta(model: torch.nn.Module, skip_prefixes: list[str]) -> list[str]:
    names = []
    for name, p in model.named_parameters():
        if p.device.type == "meta" and not any(name == s or name.startswith(s + ".") for s in skip_prefixes):
            names.append(name)
    return names


def tie_if_needed(model: torch.nn.Module) -> None:
    """Re-tie output embeddings to input embeddings when the config asks for it and lm_head is empty."""
    try:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    except Exception:
        return
    if out is None or inp is None or out.weight.device.type != "meta":
        return
    cfg = getattr(model, "config", None)
    tied = getattr(cfg, "tie_word_embeddings", None)
    if tied is None and hasattr(cfg, "get_text_config"):
        tied = getattr(cfg.get_text_config(), "tie_word_embeddings", False)
    if tied and out.weight.shape == inp.weight.shape:
        out.weight = inp.weight


def transformers_renamer(model: torch.nn.Module):
    """Checkpoint key -> module key with transformers' own renamings for this model (identity if none)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except Exception:  # not a transformers model, or internals changed: names are used as they are
        return None
    return (lambda key: apply_renamings(key, renamings)) if renamings else None


def model_class_for(source: ModelSource):
    """The transformers model class config.json's ``architectures`` names (AutoModelForCausalLM when none)."""
    import transformers

    archs = source.architectures
    for arch in archs:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    if archs:
        raise ModelFileError(
            f"{source.path}/config.json names the architecture {', '.join(archs)}, which is not a model class of "
            f"transformers {transformers.__version__}; fix 'architectures' or install a transformers that has it"
        )
    return transformers.AutoModelForCausalLM


def load_transformers_model(source: ModelSource, settings=None) -> LoadedModel:
    """The default ``load_model``: an empty transformers model whose weights stream from the folder."""
    from transformers import AutoConfig

    if source.config is None:
        raise ModelFileError(f"{source.path} has no config.json; this adapter loads transformers model folders")
    try:
        config = AutoConfig.from_pretrained(source.path)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelFileError(
            f"transformers cannot read {source.path}/config.json ({first}); the model type may need a newer transformers"
        ) from e
    cls = model_class_for(source)
    expects = getattr(cls, "config_class", None)
    if isinstance(expects, type) and not isinstance(config, expects):
        raise ModelFileError(f"{source.path}/config.json: architecture {cls.__name__} expects a {expects.__name__}, but "
                             f"model_type '{source.model_type}' gives a {type(config).__name__}; fix 'architectures'")
    model = empty_model(cls, config)
    store = WeightStore(source.path, "model", key_map=transformers_renamer(model))
    return LoadedModel(model=model, processor=load_processor(source.path), source=source, weights=store)
