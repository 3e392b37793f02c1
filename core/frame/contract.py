"""The typed values that cross the hook contract (see hookspecs.py)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Literal, TypeVar

from ..errors import AdapterError

T = TypeVar("T")


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
    # The adapter's options: a dataclass whose fields (with defaults, typed bool/int/float/str/Literal and
    # ``metadata={"help": ...}``) are set with ``--set KEY=VALUE`` or ``blockquant.quantize(KEY=VALUE)``;
    # validated at startup, part of the resume identity, reaching hooks as ``ctx.options``.
    options: type | None = None
    # Optional modules the adapter imports only when it runs: importable module -> what installs it
    # (e.g. {"diffusers": "blockquant[EXTRA]"}).  Missing ones make the adapter "needs: ..." instead of broken.
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
    # Keyword arguments known to be identical for all samples: stored once, never compared at capture; a
    # collated forward takes the first sample's value where the samples' values are equal (replay copies
    # plain dicts per sample, so a shared options dict is equal, not identical).
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
    # Samples of different lengths (image + text samples, prompts of different lengths) share one forward,
    # right-padded to the longest, with real tokens never attending to padding and the loss over real
    # tokens only (core/run/padding.py; a block whose padded outputs differ from its sample-by-sample
    # outputs runs sample by sample).  False: such samples always run one by one.
    pad_samples: bool = True
    # Blocks that take packed sequences (no batch dimension; variable-length attention within cumulative
    # boundaries, e.g. a ViT's ``cu_seqlens``): boundary kwarg -> the kwarg holding its longest segment or
    # None, e.g. {"cu_seqlens": "max_seqlen"}.  Samples of such blocks share one forward, concatenated
    # (core/run/packed_samples.py); with pad_samples False they run one by one.
    pack_boundaries: dict[str, str | None] = field(default_factory=dict)
    # Keyword arguments holding each sample's own mutable mapping that the block's layers write and later
    # layers read within one forward (e.g. keys/values one layer stores for the layers that reuse them);
    # values are tensors or tuples of tensors with one row.  Samples of equal shapes then share one forward
    # through a view that joins rows on read and splits them on write (core/run/sample_state.py);
    # otherwise they run one by one.
    sample_state: tuple[str, ...] = ()
    # Stop the capture forward once every group's first block has been captured.
    stop_after_capture: bool = True
    # Output layout: folder (inside the model folder) and file prefix of the weights.
    weights_subfolder: str = ""
    weights_name: str = "model"
    # Checkpoint tensor renames applied when streaming weights: (regex on checkpoint name, repl).
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    # Block list prefixes to report in quantization_config (defaults to the group paths).
    export_block_names: tuple[str, ...] = ()

    # Block groups quantized only when the user names them (``--include_groups NAME``), e.g. a VLM's
    # vision tower: {"vision": ["model.visual.blocks"]}.
    optional_groups: dict[str, list[str]] = field(default_factory=dict)

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


class StashKey(Generic[T]):
    """A typed key of ``RunContext.stash``: create one per value at module level, ``KEY = StashKey[Foo]()``."""

    __slots__ = ()


class Stash:
    """Adapter state for one run, typed by its keys (no module-level registries, no attributes on models)."""

    def __init__(self) -> None:
        self._values: dict[StashKey, Any] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._values[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return self._values[key]

    def get(self, key: StashKey[T], default: T | None = None) -> T | None:
        return self._values.get(key, default)

    def setdefault(self, key: StashKey[T], default: T) -> T:
        return self._values.setdefault(key, default)

    def __contains__(self, key: StashKey) -> bool:
        return key in self._values


@dataclass
class RunContext:
    """What one run knows, handed to every hook that declares a ``ctx`` argument.

    ``load_model`` receives it with ``source``, ``settings`` and ``options`` filled in; the engine fills
    in ``loaded`` after it, ``traits`` and ``groups`` after ``fixed_attrs``, ``device`` once chosen.
    ``stash`` holds the adapter's own state for this run.
    """

    settings: Any                      # blockquant.RunSettings
    options: Any = None                # the adapter's options dataclass instance (AdapterInfo.options), or None
    source: Any = None                 # blockquant.model.model_io.ModelSource
    loaded: Any = None                 # blockquant.model.model_io.LoadedModel
    traits: Traits | None = None
    groups: list = field(default_factory=list)   # per group, the chain of blockquant.model.blocks.Block
    device: Any = None                 # torch.device the blocks run on
    stash: Stash = field(default_factory=Stash)

    @property
    def model(self):
        """The model being quantized (for a pipeline: the component)."""
        return self.loaded.model if self.loaded is not None else None

    @property
    def processor(self):
        """The tokenizer or processor loaded beside the model, or None."""
        return self.loaded.processor if self.loaded is not None else None

    @property
    def pipeline(self):
        """The pipeline that drives calibration (diffusers), or None."""
        return self.loaded.pipeline if self.loaded is not None else None

    def group_enabled(self, name: str) -> bool:
        """Whether the user asked for the optional block group ``name`` (``--include_groups``)."""
        return name in self.settings.include_groups


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
            os.makedirs(folder, exist_ok=True)
            model.save_pretrained(folder)
            if processor is not None:
                processor.save_pretrained(folder)

        return cls(name=name, model=model, processor=processor, save=save)


@dataclass
class GgufLayout:
    """How a model is written as a GGUF file.  Returned by ``gguf_layout``.

    ``arch``: llama.cpp's architecture name (``general.architecture``, the prefix of the ``{arch}.*``
    keys).  ``tensor_name(name)``: the GGUF name of a checkpoint tensor (``None``: not written).
    ``metadata``: GGUF keys and values (int -> uint32, float -> float32, str, bool, list of str);
    the engine adds the general.* keys and the tokenizer.  ``row_order(name)``: for a 2-D weight or
    its bias whose output rows llama.cpp expects in another order, the source row of each GGUF row
    (a LongTensor), else None; quantized rows move with their scales and zeros.
    """

    arch: str
    tensor_name: Callable[[str], str | None]
    metadata: dict[str, Any] = field(default_factory=dict)
    row_order: Callable[[str], Any] = lambda name: None
