"""The adapter test kit's invariants on the gemma4 example model (tiny Gemma4ForCausalLM with KV sharing)."""
from __future__ import annotations

from blockquant.kit.testing import AdapterKit


class TestGemma4Kit(AdapterKit):
    adapter = "gemma4"
