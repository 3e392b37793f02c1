"""blockquant: block-by-block AutoRound quantization of large transformers, with adapter plugins.

The Python API is ``quantize``, ``verify``, ``load_quantized`` and ``load_quantized_pipeline``; adapters use
``hookimpl`` and the typed values of the contract (``AdapterInfo``, ``Traits``, ``BlockRef``, ``SampleInputs``, ``ExampleModel``).

The names are imported on first use, so that ``import blockquant.frame.cli`` (the ``quant`` command) can
answer a usage error without loading torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "quantize": ".api", "verify": ".api",
    "QuantScheme": ".config", "RunSettings": ".config",
    "BlockquantError": ".errors", "UsageError": ".errors",
    "load_quantized": ".export.loading", "load_quantized_pipeline": ".export.loading",
    "AdapterInfo": ".frame.contract", "BlockRef": ".frame.contract", "ExampleModel": ".frame.contract",
    "GgufLayout": ".frame.contract", "RunContext": ".frame.contract", "SampleInputs": ".frame.contract",
    "Stash": ".frame.contract", "StashKey": ".frame.contract", "Traits": ".frame.contract",
    "hookimpl": ".frame.hookspecs",
}

__all__ = [
    "quantize", "verify", "load_quantized", "load_quantized_pipeline", "hookimpl", "AdapterInfo", "BlockRef",
    "ExampleModel", "GgufLayout", "RunContext", "SampleInputs", "Stash", "StashKey", "Traits", "QuantScheme",
    "RunSettings", "BlockquantError", "UsageError", "__version__",
]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'blockquant' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
