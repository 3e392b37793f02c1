"""Shared fixtures: tiny models saved as hub-like folders, built offline once per session."""
import os

import pytest

from fixture_adapters import register

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# transformers >= 5.25 kernelizes models in from_pretrained by default (hub kernels: a download); tests never do
os.environ.setdefault("USE_HUB_KERNELS", "0")
register()   # tests/packages/* for this run only: never installed into the environment


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to other processes' load."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """tiny_folder(kind="llama"|"qwen3", layers=4, hidden=64) -> path of a saved tiny model."""
    cache = {}

    def make(kind="llama", layers=4, hidden=64):
        key = (kind, layers, hidden)
        if key not in cache:
            from blockquant.adapters.generic import build_example

            folder = tmp_path_factory.mktemp(f"{kind}{layers}x{hidden}") / "model"
            build_example(kind, layers, hidden).save(str(folder))
            cache[key] = str(folder)
        return cache[key]

    return make
