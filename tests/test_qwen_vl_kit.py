"""The adapter test kit's invariants on the qwen_vl example model (tiny Qwen2.5-VL, image calibration)."""
from __future__ import annotations

from blockquant.kit.testing import AdapterKit


class TestQwenVLKit(AdapterKit):
    adapter = "qwen_vl"
