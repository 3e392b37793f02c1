"""The Python API: ``quantize`` and ``verify`` (what the ``quant`` command calls), ``make_settings``, and
the first steps of a run for tests and tools: ``prepare`` (adapter, model, traits, block groups) and
``capture_inputs`` (calibration and capture), both working on a ``Run``."""
from __future__ import annotations

from .config import QuantScheme, RunSettings
from .run.calibrate import capture_inputs, run_batch
from .run.context import Run
from .run.prepare import prepare
from .run.quantize import run_quantization
from .run.verify import run_verify

__all__ = ["quantize", "verify", "make_settings", "prepare", "capture_inputs", "run_batch", "Run"]


def make_settings(**kwargs) -> RunSettings:
    """RunSettings from keyword arguments: scheme/bits/group_size/sym folded into a QuantScheme,
    ``quant_vision=True`` as ``include_groups=("vision",)``, and every name that is not a setting taken as
    an adapter option (checked against the adapter's options once the adapter is known).  ``explicit``:
    the names the caller chose (default: every keyword given); example runs fill in the others."""
    explicit = kwargs.pop("explicit", None)
    explicit = tuple(sorted(kwargs if explicit is None else explicit))
    scheme = kwargs.pop("scheme", None)
    if not isinstance(scheme, QuantScheme):
        scheme = QuantScheme.from_args(scheme, kwargs.pop("bits", None), kwargs.pop("group_size", None), kwargs.pop("sym", None))
    for k in ("bits", "group_size", "sym"):
        kwargs.pop(k, None)
    if kwargs.pop("quant_vision", False):
        kwargs["include_groups"] = tuple(kwargs.get("include_groups", ())) + ("vision",)
    known = RunSettings.__dataclass_fields__
    options = dict(kwargs.pop("options", None) or {})
    options.update({k: kwargs.pop(k) for k in list(kwargs) if k not in known})
    return RunSettings(scheme=scheme, options=options, explicit=tuple(sorted(set(explicit) | set(options))), **kwargs)


def quantize(model: str | None = None, adapter: str | None = None, **kwargs):
    """Quantize ``model`` (a folder or hub name; None: the adapter's example) and export it."""
    return run_quantization(model, adapter, make_settings(**kwargs))


def verify(model: str | None = None, adapter: str | None = None, **kwargs):
    """Replay the blocks with quantization off and compare with the model's own forward."""
    explicit = kwargs.pop("explicit", tuple(kwargs))    # like `quant verify`: an example run fills in the rest
    kwargs.setdefault("nsamples", 2)
    kwargs.setdefault("seqlen", 64)
    return run_verify(model, adapter, make_settings(explicit=explicit, **kwargs))
