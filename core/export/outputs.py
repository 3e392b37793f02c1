"""The run's outputs: one per ``--format`` entry, all fed by the same block loop.

With one format the output folder is the checkpoint (``OUT/config.json``, ...).  With several
(``--format auto_round,gguf:q4_0``) each format gets its own sub-folder, ``OUT/auto_round``,
``OUT/gguf-q4_0`` (``:`` becomes ``-``), written from one tuning pass.  Everything is built inside
``OUT.partial`` and published with one rename, so a reader never sees a half-written format.

Each output takes a finished block's quantized weights (``add_block``), records a resumable
``state()`` after every block, and writes what lies outside the blocks in ``finish``.
"""
from __future__ import annotations

import json
import os

import torch

from ..errors import UsageError
from . import checkpoint
from .completeness import check_complete, expected_tensors
from .formats import layer_tensors, quantization_config
from .gguf_output import GgufOutput
from .shards import ShardWriter

AUTOROUND_LAYOUT_VERSION = "0.16.1"   # the auto-round release whose layout the auto_round format matches


def folder_name(fmt: str) -> str:
    """The sub-folder of format ``fmt`` when a run writes several."""
    return fmt.replace(":", "-")


def block_tensors(block, dtypes: dict[str, torch.dtype], quantized: dict, fmt: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of a finished block: packed layers + everything else in its source dtype."""
    out: dict[str, torch.Tensor] = {}
    skip = set()
    prefix = block.ref.name
    for name, qw in quantized.items():
        local = name[len(prefix) + 1:]
        layer = block.module.get_submodule(local)
        bias = layer.bias.detach().cpu() if layer.bias is not None else None
        out.update(layer_tensors(name, qw, bias, fmt))
        skip.update({f"{local}.weight", f"{local}.bias"})
    for local, tensor in block.module.state_dict().items():
        if local in skip:
            continue
        out[f"{prefix}.{local}"] = tensor.detach().to("cpu", dtypes.get(local, tensor.dtype)).contiguous()
    return out


class SafetensorsOutput:
    """An auto_round, auto_gptq or compressed-tensors checkpoint folder (safetensors shards + configs)."""

    def __init__(self, fmt: str, folder: str, run, state: dict | None, rel: str = ""):
        self.fmt, self.folder, self.rel = fmt, folder, rel
        traits, size = run.traits, run.settings.max_shard_size
        weights_dir = os.path.join(folder, traits.weights_subfolder)
        self.writer = ShardWriter.resume(weights_dir, traits.weights_name, size, state) if state else \
            ShardWriter(weights_dir, traits.weights_name, size)

    def add_block(self, block, dtypes: dict, quantized: dict) -> None:
        self.writer.add(block_tensors(block, dtypes, quantized, self.fmt))
        self.writer.flush()

    def state(self) -> dict:
        return self.writer.state()

    def qconfig(self, run, loop) -> dict:
        s, traits = run.settings, run.traits
        block_names = list(dict.fromkeys(b.ref.path for chain in run.groups for b in chain))   # what was quantized
        if traits.export_block_names and not s.to_quant_block_names:
            block_names = list(traits.export_block_names)
        extra = {name: {"bits": 16, "data_type": "float"} for name in loop.kept}
        quantized = set(loop.quantized)
        ignore = [n for n, m in run.model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized]
        return quantization_config(self.fmt, s.scheme, iters=s.iters, block_names=block_names, extra_config=extra,
                                   version=AUTOROUND_LAYOUT_VERSION, ignore=ignore)

    def steps(self, run, loop, saved):
        """The export steps, in order: (name, function); each is safe to redo when interrupted."""
        traits = run.traits
        block_prefixes = [b.ref.name for chain in run.groups for b in chain]
        component = os.path.join(run.source.path, traits.weights_subfolder, "config.json")
        return [
            ("outside", lambda: self.writer.add(checkpoint.outside_tensors(run.model, block_prefixes,
                                                                           run.loaded.weights))),
            ("shards", lambda: self.writer.finish(saved)),
            ("files", lambda: checkpoint.copy_source_files(run.source.path, self.folder, traits.weights_subfolder,
                                                           traits.weights_name)),
            ("configs", lambda: checkpoint.write_configs(component, os.path.join(self.folder, traits.weights_subfolder),
                                                         self.qconfig(run, loop))),
        ]

    def check(self, root: str, run, quantized: list[str]) -> None:
        """The completeness check of the checkpoint as written under ``root`` (see export/completeness.py)."""
        weights_dir = os.path.join(root, self.rel, run.traits.weights_subfolder)
        with open(os.path.join(weights_dir, "config.json")) as f:
            qconfig = json.load(f)["quantization_config"]
        check_complete(weights_dir, run.traits.weights_name, expected_tensors(run.model), quantized, qconfig)


def _make(fmt: str, folder: str, run, state: dict | None, rel: str):
    if fmt.startswith("gguf:"):
        return GgufOutput(fmt, folder, run, state)
    return SafetensorsOutput(fmt, folder, run, state, rel)


class Outputs:
    """Every output of a run, built inside ``root`` (see the module docstring)."""

    def __init__(self, run, root: str, state: dict | None = None):
        formats = run.settings.formats
        state = state or {}
        if state and set(state) != set(formats):   # recorded by an older blockquant (one writer, no formats)
            raise UsageError(f"the interrupted run in {root} was recorded by another blockquant version; "
                             "run again with --fresh")
        self.items = []
        for fmt in formats:
            rel = "" if len(formats) == 1 else folder_name(fmt)
            self.items.append(_make(fmt, os.path.join(root, rel) if rel else root, run, state.get(fmt), rel))

    def add_block(self, block, dtypes: dict, quantized: dict) -> None:
        for item in self.items:
            item.add_block(block, dtypes, quantized)

    def state(self) -> dict:
        return {item.fmt: item.state() for item in self.items}

    def steps(self, run, loop, saved):
        """Every output's export steps, named ``step`` (one format) or ``format:step`` (several)."""
        several = len(self.items) > 1
        return [(f"{item.fmt}:{name}" if several else name, fn)
                for item in self.items for name, fn in item.steps(run, loop, saved)]

    def check(self, root: str, run, quantized: list[str]) -> None:
        for item in self.items:
            item.check(root, run, quantized)
