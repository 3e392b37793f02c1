"""Exporters for on-disk quantized formats."""
