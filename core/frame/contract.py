"""The typed values that cross the hook contract (see hookspecs.py)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from ..errors import AdapterError


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter handles.  Returned by the ``adapter_info`` hook."""

    name: str
    description: str = ""
    model_types: tuple[str, ...] = ()        # config.json "model_type" values
    architectures: tuple[str, ...] = ()      # config.json "architectures" class names
    pipelines: tuple[str, ...] = ()          # model_index.json "_class_name" values (diffusers)
    requires: dict[str, str] = field(default_factory=dict)  # distribution -> PEP 440 specifier
    generic: bool = False                    # a fallback: chosen only when nothing specific matches
    # Optional modules the adapter imports only when it runs: importable module -> what installs it
    # (e.g. {"diffusers": "blockquant[flux]"}).  Missing ones make the adapter "needs: ..." instead of broken.
    needs: dict[str, str] = field(default_factory=dict)


@dataclass
class Traits:
    """Per-model engine traits an adapter pins through ``fixed_attrs``.

    Every field has a default that suits a standard decoder-only transformers LM.
    """

    # Block groups to quantize.  Each group is a chain of ModuleList paths whose blocks run one after
    # the other (the output streams of one feed the next, e.g. a diffusion transformer's double- then
    # single-stream blocks).  The first block of each group is captured from the model's forward.
    block_groups: list[list[str]] = field(default_factory=list)
    # Keyword arguments known to be identical for all samples: stored once, never compared.
    shared_keys: tuple[str, ...] = ()
    # Keyword arguments that vary from block to block and that ``replay_inputs`` rebuilds.
    rebuilt_keys: tuple[str, ...] = ()
    # What to do with block-varying kwargs: "rebuild" trusts replay_inputs for rebuilt_keys and
    # caches any other varying kwarg per block; "cache" caches every varying kwarg per block.
    variable_inputs: Literal["rebuild", "cache"] = "rebuild"
    # Layers inside quantized blocks kept in full precision (regular expressions on full names).
    fp_layers: tuple[str, ...] = ()
    # Upper bound on samples per forward during tuning (None: batch_size decides).
    max_batch_size: int | None = None
    # Stop the capture forward once every group's first block has been captured.
    stop_after_capture: bool = True
    # Output layout: folder (inside the model folder) and file prefix of the weights.
    weights_subfolder: str = ""
    weights_name: str = "model"
    # Checkpoint tensor renames applied when streaming weights: (regex on checkpoint name, repl).
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    # Block list prefixes to report in quantization_config (defaults to the group paths).
    export_block_names: tuple[str, ...] = ()

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def updated(self, values: dict[str, Any], adapter: str) -> "Traits":
        unknown = sorted(set(values) - self.field_names())
        if unknown:
            raise AdapterError(
                f"adapter '{adapter}' returned unknown trait(s) {', '.join(unknown)} from fixed_attrs; "
                f"known traits: {', '.join(sorted(self.field_names()))}"
            )
        return dataclasses.replace(self, **values)

    def all_block_paths(self) -> list[str]:
        return [p for group in self.block_groups for p in group]


@dataclass(frozen=True)
class BlockRef:
    """Where a block sits: group number, its ModuleList path and index, and position in the chain."""

    group: int
    path: str          # ModuleList path, e.g. "model.layers"
    index: int         # index inside that ModuleList
    position: int      # position inside the group's chain (0 = first block of the group)
    number: int        # global block number over all groups

    @property
    def name(self) -> str:
        return f"{self.path}.{self.index}"


@dataclass
class SampleInputs:
    """One calibration sample as replay sees it (the ``cached`` argument of replay hooks)."""

    index: int                      # sample number within its group
    kwargs: dict[str, Any]          # first block's keyword arguments (shared + per-sample + streams)
    extras: dict[str, Any]          # values the adapter recorded with calibration.record()
    state: dict[str, Any]           # mutable, per replay stream ("fp" or "quant")
    stream: str = "fp"


@dataclass
class ExampleModel:
    """A tiny offline model of an adapter's family.  Returned by ``example_model``."""

    name: str
    model: Any
    processor: Any = None           # tokenizer, processor, or None
    save: Callable[[str], None] | None = None   # writes a hub-like folder
    pipeline: Any = None            # diffusers pipeline, when the family has one
    # Run settings of a run on this example (``quant --adapter NAME`` without a model) that the user did
    # not set, over the engine's EXAMPLE_SETTINGS (e.g. {"nsamples": 4} where one sample makes many).
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, model, processor=None) -> "ExampleModel":
        """An example whose ``save`` writes the model and its processor with ``save_pretrained``."""
        def save(folder: str) -> None:
            import os

            os.makedirs(folder, exist_ok=True)
            model.save_pretrained(folder)
            if processor is not None:
                processor.save_pretrained(folder)

        return cls(name=name, model=model, processor=processor, save=save)
