"""The adapter test kit applied to every built-in adapter that `quant adapters` shows as loaded."""
from blockquant.frame import plugins
from blockquant.kit.testing import AdapterKit

BUILTINS = ("generic", "gemma4", "qwen_vl", "flux")


def loaded_builtins() -> list[str]:
    entries = plugins.discover()
    return [n for n in BUILTINS if n in entries and entries[n].status == "loaded" and entries[n].distribution == "blockquant"]


class TestBuiltinKit(AdapterKit):
    adapters = loaded_builtins()
