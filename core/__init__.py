"""blockquant: block-by-block AutoRound quantization of large transformers, with adapter plugins."""
from .hookspecs import hookimpl
from .contract import AdapterInfo, BlockRef, ExampleModel, GgufLayout, SampleInputs, Traits
from .config import QuantScheme, RunSettings
from .errors import BlockquantError, UsageError

__version__ = "0.1.0"


def load_quantized(path, **kwargs):
    """Load a folder written by blockquant (auto_round or auto_gptq format); see loading.py."""
    from .loading import load_quantized as _load

    return _load(path, **kwargs)


__all__ = [
    "hookimpl", "AdapterInfo", "BlockRef", "ExampleModel", "GgufLayout", "SampleInputs", "Traits", "QuantScheme",
    "RunSettings", "BlockquantError", "UsageError", "load_quantized", "__version__",
]
