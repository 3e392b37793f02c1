"""``--format gguf:TYPE``: one GGUF file (llama.cpp), written without the model whole in memory.

A GGUF file lists every tensor's name, shape and type before the data, so the file cannot be
appended to block by block.  Instead each finished block's tensors are encoded at once (quantized
layers as GGUF blocks, see gguf_quants.py; norms and biases F32; other 2-D tensors F16, as
llama.cpp's converter writes them) and staged in a resumable ShardWriter folder
(``.gguf-staging``).  ``finish`` writes the header, metadata (the adapter's ``gguf_layout``, the
general.* keys, the tokenizer) and tensor table, then streams the tensors one at a time: the staged
blocks, then the tensors outside the blocks (embeddings, final norm, output head), each read from
the checkpoint and converted a row chunk at a time straight into the file (``RowChunks``), so a
152k-token embedding is never whole in memory, let alone twice.  Peak memory: one block's tensors
while staging, one staged block or one chunk of rows while writing.
"""
from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import torch
from safetensors import safe_open

from ..errors import BlockquantError, ModelFileError, UsageError
from ..algorithm.quantizers import QuantizedWeight
from . import checkpoint
from .gguf_quants import FILE_TYPES, GGML_NAMES, block_type, encode
from .gguf_vocab import GgufVocab
from .shards import ShardWriter

log = logging.getLogger("blockquant")
STAGING = ".gguf-staging"
_NO_LIMIT = 1 << 62   # one staging shard: parts are read directly, never merged
CHUNK_BYTES = 64 << 20   # source rows converted and written at a time (outside the blocks)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UsageError("--format gguf needs the gguf package: pip install 'blockquant[gguf]'") from None
    return gguf


def file_name(weights_name: str, gtype: str) -> str:
    return f"{weights_name}-{GGML_NAMES[gtype]}.gguf"


def plain_dtype(shape) -> torch.dtype:
    """How llama.cpp's converter stores a full-precision tensor: 1-D F32, otherwise F16."""
    return torch.float32 if len(shape) <= 1 else torch.float16


class RowChunks:
    """A tensor outside the blocks as ``gguf.GGUFWriter.write_tensor_data`` takes it (``nbytes`` and
    ``tofile``, as a numpy array has them), converted and written ``CHUNK_BYTES`` of source rows at a
    time: ``rows(first, stop)`` returns rows ``first:stop`` (dim 0) in any dtype.  The bytes written
    are those of the whole tensor converted at once."""

    def __init__(self, rows, shape, dtype: torch.dtype):
        self.rows, self.shape, self.dtype = rows, tuple(shape), dtype
        self.nbytes = torch.Size(self.shape).numel() * torch.empty((), dtype=dtype).element_size()

    def tofile(self, f) -> None:
        n = self.shape[0] if self.shape else 1
        if not self.shape or not self.nbytes:
            self._write(self.rows(0, n), f)
            return
        step = max(1, CHUNK_BYTES // (self.nbytes // n))
        for first in range(0, n, step):
            self._write(self.rows(first, min(n, first + step)), f)

    def _write(self, rows: torch.Tensor, f) -> None:
        rows.detach().to("cpu", self.dtype).contiguous().numpy().tofile(f)


class GgufOutput:
    """One GGUF file in ``folder`` (see the module docstring)."""

    def __init__(self, fmt: str, folder: str, run, state: dict | None):
        gguf = _gguf()
        self.fmt, self.gtype, self.folder = fmt, fmt.partition(":")[2], folder
        self.layout = run.hooks.gguf_layout(model=run.model)
        config = getattr(run.model, "config", None)
        if self.layout is None:
            raise UsageError(f"adapter {run.entry.name} cannot write model_type "
                             f"{getattr(config, 'model_type', '?')} as GGUF; choose another --format")
        self.vocab = GgufVocab(run.source.path, getattr(config, "vocab_size", 0) or 0)
        self.gguf = gguf
        staging = os.path.join(folder, STAGING)
        self.staged = ShardWriter.resume(staging, "staged", _NO_LIMIT, state["staging"]) if state else \
            ShardWriter(staging, "staged", _NO_LIMIT)
        self.types: dict[str, str] = dict(state["types"]) if state else {}   # GGUF name -> quantized type

    def _name(self, name: str) -> str:
        gname = self.layout.tensor_name(name)
        if gname is None:
            raise BlockquantError(f"the GGUF layout has no name for tensor {name}; the adapter's gguf_layout must "
                                  "map every tensor of the model")
        return gname

    def _plain(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A full-precision tensor as llama.cpp's converter stores it (``plain_dtype``)."""
        order = self.layout.row_order(name)
        if order is not None:
            tensor = tensor[order]
        return tensor.detach().to("cpu", plain_dtype(tensor.shape)).contiguous()

    def _outside(self, name: str, tensor, store) -> RowChunks:
        """Tensor ``name`` outside the blocks, row chunk by row chunk: from memory, or (still on the meta
        device) read from the checkpoint a chunk of rows at a time."""
        order = self.layout.row_order(name)
        if tensor.device.type == "meta":
            if tuple(store.shape(name)) != tuple(tensor.shape):
                raise ModelFileError(f"tensor {name} has shape {tuple(store.shape(name))} in the checkpoint but the "
                                     f"model expects {tuple(tensor.shape)}; the config and weights do not match")
            if order is not None:   # permuted rows: read whole (no tensor outside the blocks has any today)
                tensor = store.get(name)
        if tensor.device.type == "meta":
            rows = lambda first, stop: store.get_rows(name, first, stop)   # noqa: E731
        elif order is not None:
            rows = lambda first, stop: tensor[order[first:stop]]   # noqa: E731
        else:
            rows = lambda first, stop: tensor[first:stop]   # noqa: E731
        return RowChunks(rows, tensor.shape, plain_dtype(tensor.shape))

    def add_block(self, block, dtypes: dict, quantized: dict) -> None:
        prefix, out, skip = block.ref.name, {}, set()
        for name, qw in quantized.items():
            order = self.layout.row_order(f"{name}.weight")
            if order is not None:
                qw = QuantizedWeight(qw.qweight[order], qw.scale[order], qw.zero[order], qw.scheme)
            gname, btype = self._name(f"{name}.weight"), block_type(self.gtype, qw.qweight.shape[1])
            if btype is None:
                out[gname] = qw.dequantize(torch.float16).cpu()
            else:
                out[gname] = encode(qw, btype)
                self.types[gname] = btype
            skip.add(f"{name[len(prefix) + 1:]}.weight")
        for local, tensor in block.module.state_dict().items():
            if local not in skip:
                out[self._name(f"{prefix}.{local}")] = self._plain(f"{prefix}.{local}", tensor)
        self.staged.add(out)
        self.staged.flush()

    def state(self) -> dict:
        return {"staging": self.staged.state(), "types": dict(self.types)}

    def _metadata(self, writer, run) -> None:
        gguf = self.gguf
        writer.add_name(os.path.basename(os.path.normpath(run.source.path)))
        writer.add_file_type(FILE_TYPES[self.gtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in self.layout.metadata.items():
            if isinstance(value, bool):
                writer.add_bool(key, value)
            elif isinstance(value, int):
                writer.add_uint32(key, value)
            elif isinstance(value, float):
                writer.add_float32(key, value)
            elif isinstance(value, str):
                writer.add_string(key, value)
            else:
                writer.add_array(key, list(value))
        self.vocab.add_to(writer)

    def _info(self, writer, gname: str, shape, dtype: torch.dtype) -> None:
        np_dtype = {torch.uint8: "uint8", torch.float16: "float16", torch.float32: "float32"}[dtype]
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        raw = self.gguf.GGMLQuantizationType[GGML_NAMES[self.types[gname]]] if dtype == torch.uint8 else None
        writer.add_tensor_info(gname, tuple(shape), np.dtype(np_dtype), nbytes, raw_dtype=raw)

    def steps(self, run, loop, saved):
        """One export step: the GGUF file written from the staged blocks and the tensors outside them."""
        return [("gguf", lambda: self.finish(run, loop))]

    def finish(self, run, loop) -> None:
        parts = [os.path.join(self.staged.folder, p) for s in self.staged.state()["shards"] for p in s["parts"]]
        store = run.loaded.weights
        block_prefixes = [b.ref.name for chain in run.groups for b in chain]
        outside = checkpoint.outside_entries(run.model, block_prefixes, store)
        path = os.path.join(self.folder, file_name(run.traits.weights_name, self.gtype))
        writer = self.gguf.GGUFWriter(path, self.layout.arch)
        self._metadata(writer, run)
        for part in parts:
            with safe_open(part, "pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    self._info(writer, key, sl.get_shape(), {"U8": torch.uint8, "F16": torch.float16,
                                                             "F32": torch.float32}[sl.get_dtype()])
        for name, tensor in outside:
            self._info(writer, self._name(name), tensor.shape, plain_dtype(tensor.shape))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for part in parts:
            with safe_open(part, "pt") as f:
                for key in f.keys():
                    writer.write_tensor_data(f.get_tensor(key).numpy())
        for name, tensor in outside:
            writer.write_tensor_data(self._outside(name, tensor, store))
        writer.close()
        shutil.rmtree(self.staged.folder)
        log.info("wrote %s", path)
