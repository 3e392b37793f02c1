"""blockquant: block-by-block AutoRound quantization of large transformers, with adapter plugins.

The Python API is ``quantize``, ``verify``, ``load_quantized`` and ``load_quantized_pipeline``; adapters use
``hookimpl`` and the typed values of the contract (``AdapterInfo``, ``Traits``, ``BlockRef``, ``SampleInputs``, ``ExampleModel``).
"""
from .api import quantize, verify
from .config import QuantScheme, RunSettings
from .errors import BlockquantError, UsageError
from .export.loading import load_quantized, load_quantized_pipeline
from .frame.contract import AdapterInfo, BlockRef, ExampleModel, GgufLayout, RunContext, SampleInputs, Stash, StashKey, Traits
from .frame.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "quantize", "verify", "load_quantized", "load_quantized_pipeline", "hookimpl", "AdapterInfo", "BlockRef",
    "ExampleModel", "GgufLayout", "RunContext", "SampleInputs", "Stash", "StashKey", "Traits", "QuantScheme",
    "RunSettings", "BlockquantError", "UsageError", "__version__",
]
