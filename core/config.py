"""Quantization schemes and run settings, as dataclasses."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import UsageError

SCHEMES = {
    "W2A16": dict(bits=2, group_size=64, sym=True),
    "W3A16": dict(bits=3, group_size=128, sym=True),
    "W4A16": dict(bits=4, group_size=128, sym=True),
    "W8A16": dict(bits=8, group_size=128, sym=True),
}
FORMATS = ("auto_round", "auto_gptq", "compressed-tensors", "fake")
GGUF_TYPES = ("q4_0", "q4_1", "q8_0", "q2_k", "q3_k", "q4_k", "q6_k")   # --format gguf:TYPE


def parse_formats(text: str) -> list[str]:
    """``--format`` as a list: one format, or several separated by commas (each written to its own
    folder from the same tuning pass); ``gguf:TYPE`` names a GGUF type.  Raises UsageError."""
    items = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    choices = ", ".join([f for f in FORMATS] + [f"gguf:{t}" for t in GGUF_TYPES])
    if not items:
        raise UsageError(f"--format is empty; choose one or more of {choices}")
    for item in items:
        kind, _, gtype = item.partition(":")
        if item not in FORMATS and not (kind == "gguf" and gtype in GGUF_TYPES):
            raise UsageError(f"unknown --format {item}; choose one or more of {choices} (comma-separated)")
    if len(set(items)) != len(items):
        raise UsageError(f"--format {text} names a format twice; list each format once")
    if "fake" in items and len(items) > 1:
        raise UsageError("--format fake writes nothing and cannot be combined with other formats")
    return items


# A run on an adapter's tiny example model (no MODEL given) is a demo: example-sized calibration and
# tuning, for the settings the user does not pass.  ExampleModel.settings can change them per adapter.
EXAMPLE_SETTINGS = dict(nsamples=16, seqlen=128, iters=50)


@dataclass(frozen=True)
class QuantScheme:
    """Integer weight quantization: ``bits`` per weight, one scale (and zero) per ``group_size``
    inputs of an output channel (-1: one group spans the whole input), symmetric or not."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    data_type: str = "int"

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 6, 8):
            raise UsageError(f"--bits {self.bits} is not supported; use 2, 3, 4, 8 or 6 (--format gguf:q6_k only)")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 8):
            raise UsageError(
                f"--group_size {self.group_size} is invalid; use -1 (per channel) or a positive multiple of 8 "
                "(32, 64, 128, ...)"
            )

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else -(-in_features // self.group_size)

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    @classmethod
    def from_args(cls, scheme: str | None, bits=None, group_size=None, sym=None) -> "QuantScheme":
        base = dict(SCHEMES["W4A16"])
        if scheme:
            key = scheme.upper()
            if key not in SCHEMES:
                raise UsageError(f"unknown --scheme {scheme}; choose one of {', '.join(SCHEMES)}")
            base = dict(SCHEMES[key])
        if bits is not None:
            base["bits"] = bits
        if group_size is not None:
            base["group_size"] = group_size
        if sym is not None:
            base["sym"] = sym
        return cls(**base)


@dataclass
class RunSettings:
    """Everything a quantization run is told.  ``fingerprint()`` identifies the settings that
    change the output, so that a resume with different settings is refused."""

    scheme: QuantScheme = field(default_factory=QuantScheme)
    iters: int = 200
    lr: float | None = None           # None: 1 / iters
    minmax_lr: float | None = None    # None: lr
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 8
    gradient_accumulate_steps: int = 1
    dataset: str | None = None        # None: offline default corpus
    seed: int = 42
    device: str = "auto"
    device_map: str | None = None
    cache_device: str | None = None   # None: same as device
    to_quant_block_names: str | None = None
    ignore_layers: tuple[str, ...] = ()
    format: str = "auto_round"
    output_dir: str | None = None
    overwrite: bool = False
    fresh: bool = False               # discard an interrupted run's state instead of resuming
    max_shard_size: int = 2 * 1024 ** 3
    variable_inputs: str | None = None    # override the adapter's policy
    include_groups: tuple[str, ...] = ()  # optional block groups to quantize too (Traits.optional_groups)
    images: str | None = None         # folder / .jsonl of images for image+text calibration
    amp: bool = True                  # mixed precision for tuning (CUDA bf16/fp16 models; CPUs with native bf16)
    compile: str = "auto"             # torch.compile of the tuning step: auto (large CUDA blocks), on, off
    allow_unquantized: bool = False   # a run that keeps every layer in full precision warns instead of failing
    keep_blocks: bool = False         # keep the quantized (dequantized) blocks in memory: result.model
    verbose: bool = False
    options: dict = field(default_factory=dict)   # the adapter's options, raw (validated against AdapterInfo.options)
    explicit: tuple[str, ...] = ()    # the settings (and options) the caller chose; the others are defaults

    def apply_defaults(self, values: dict) -> dict:
        """Set ``values`` (settings, or adapter options) that the caller did not choose; returns those that
        changed."""
        fields = self.__dataclass_fields__
        changed = {}
        for key, value in values.items():
            if key in self.explicit:
                continue
            current = getattr(self, key) if key in fields else self.options.get(key)
            if current != value:
                changed[key] = value
                if key in fields:
                    setattr(self, key, value)
                else:
                    self.options[key] = value
        self.__post_init__()
        return changed

    def __post_init__(self):
        self.include_groups = tuple(self.include_groups)
        for name in ("nsamples", "seqlen", "batch_size", "gradient_accumulate_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UsageError(f"--{name} must be a positive integer (got {value})")
        if self.iters < 0:
            raise UsageError(f"--iters must be 0 (RTN) or positive (got {self.iters})")
        for name in ("lr", "minmax_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UsageError(f"--{name} must be a positive number (got {value}); omit it for the default 1/iters")
        if self.compile not in ("auto", "on", "off"):
            raise UsageError(f"--compile must be auto, on or off (got {self.compile})")
        self.format = ",".join(parse_formats(self.format))

    @property
    def formats(self) -> list[str]:
        """The output formats (``format`` split at commas)."""
        return self.format.split(",")

    @property
    def weights_only(self) -> bool:
        """RTN (--iters 0) with nothing that asks for data: quantize straight from the streamed weights,
        without calibration, capture or replay (round-to-nearest does not look at activations)."""
        return self.iters == 0 and not (self.dataset or self.images)

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else (1.0 / self.iters if self.iters else 0.0)

    @property
    def effective_minmax_lr(self) -> float:
        return self.minmax_lr if self.minmax_lr is not None else self.effective_lr

    def fingerprint(self) -> dict:
        """The settings that determine the output bytes."""
        keys = ("iters", "lr", "minmax_lr", "amp", "nsamples", "seqlen", "batch_size", "gradient_accumulate_steps",
                "dataset", "seed", "to_quant_block_names", "ignore_layers", "format", "variable_inputs",
                "include_groups", "images")
        out = {k: getattr(self, k) for k in keys}
        if self.compile != "auto":     # compiled steps round differently; auto is recorded as before
            out["compile"] = self.compile
        out["ignore_layers"] = list(self.ignore_layers)
        out["include_groups"] = list(self.include_groups)
        out["scheme"] = dataclasses.asdict(self.scheme)
        return out
