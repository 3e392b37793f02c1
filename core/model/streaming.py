"""Blocks in memory one at a time: load a block's weights when it is needed, free them after."""
from __future__ import annotations

import contextlib

import torch

from .blocks import Block
from ..errors import ModelFileError
from ..resources.memory import trim_heap
from .model_io import WeightStore, is_meta, materialize, release


class BlockLoader:
    """Materialises blocks from a ``WeightStore`` (no-op for models already in memory)."""

    def __init__(self, store: WeightStore | None, device="cpu", dtype=None):
        self.store = store
        self.device = device
        self.dtype = dtype
        self.loaded_bytes = 0

    def load(self, block: Block) -> bool:
        """Make sure the block's weights are real; True when they were read now."""
        if self.store is None or not is_meta(block.module):
            return False
        self.loaded_bytes += materialize(block.module, block.ref.name, self.store, self.device, self.dtype)
        missing = [n for n, p in block.module.named_parameters() if p.device.type == "meta"]
        if missing:
            raise ModelFileError(
                f"tensor {block.ref.name}.{missing[0]} is missing from the checkpoint in {self.store.folder} "
                f"({len(missing)} missing in this block); the weights do not match the config"
            )
        return True

    def release(self, block: Block) -> None:
        if self.store is not None:
            release(block.module)

    @contextlib.contextmanager
    def during_forward(self, blocks: list[Block]):
        """Hooks that load each block right before it runs and free it right after."""
        handles = []
        loaded: set[int] = set()

        def pre(block):
            def hook(module, args, kwargs):
                if self.load(block):
                    loaded.add(id(module))
            return hook

        def post(block):
            def hook(module, args, kwargs, output):
                if id(module) in loaded:
                    loaded.discard(id(module))
                    self.release(block)
            return hook

        for block in blocks:
            handles.append(block.module.register_forward_pre_hook(pre(block), with_kwargs=True))
            handles.append(block.module.register_forward_hook(post(block), with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for block in blocks:   # a forward stopped early leaves its block loaded
                if id(block.module) in loaded:
                    self.release(block)


def free_memory() -> None:
    """Release what the last block or sample left behind (a full collection only where CUDA caches)."""
    import gc

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
    else:
        gc.collect(1)   # young generations: cheap, and enough for the loop's short-lived cycles
    trim_heap()
