"""Exporters for on-disk quantized formats: int32 packing (packing.py), the auto_round / auto_gptq
layouts and quantization_config (formats.py), the resumable shard writer (shards.py)."""
from .formats import check_format, layer_tensors, packable, quantization_config
from .shards import ShardWriter

__all__ = ["check_format", "layer_tensors", "packable", "quantization_config", "ShardWriter"]
