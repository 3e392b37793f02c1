"""The engine's typed way to call the adapter hooks of one run.

``AdapterHooks`` wraps the run's plugin manager and its ``RunContext``: each method calls the hook of
the same name with the same keyword arguments plus ``ctx``, so adapters that declare ``ctx`` get it and
the others are called exactly as before.  A hook that raises is reported as ``HookError`` naming the
adapter, the hook and the exception (the original stays chained for ``--verbose``).
"""
from __future__ import annotations

import contextlib
from typing import Any

import pluggy

from ..errors import BlockquantError, ControlFlow, HookError
from .contract import RunContext, Traits


@contextlib.contextmanager
def reported(adapter: str, hook: str):
    """An exception a hook raises, other than the engine's own and control flow, as one ``HookError``."""
    try:
        yield
    except (BlockquantError, ControlFlow, KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError":   # torch.cuda.OutOfMemoryError: the engine falls back
            raise
        raise HookError(f"adapter '{adapter}' failed in hook {hook}: {type(e).__name__}: {e}") from e


class AdapterHooks:
    def __init__(self, pm: pluggy.PluginManager, ctx: RunContext, adapter: str):
        self.pm, self.ctx, self.adapter = pm, ctx, adapter

    def _call(self, name: str, **kwargs) -> Any:
        with reported(self.adapter, name):
            return getattr(self.pm.hook, name)(ctx=self.ctx, **kwargs)

    def load_model(self, source, settings):
        return self._call("load_model", source=source, settings=settings)

    def fixed_attrs(self, model) -> list[dict]:
        return self._call("fixed_attrs", model=model)

    def patch_model(self, model) -> None:
        self._call("patch_model", model=model)

    def post_hook_removal(self, model) -> None:
        self._call("post_hook_removal", model=model)

    def calibration_batches(self, model, source, settings):
        return self._call("calibration_batches", model=model, source=source, settings=settings)

    def pre_cache(self, model, calibration) -> None:
        self._call("pre_cache", model=model, calibration=calibration)

    def run_calibration(self, model, batch):
        return self._call("run_calibration", model=model, batch=batch)

    def replay_inputs(self, block, index, cached):
        return self._call("replay_inputs", block=block, index=index, cached=cached)

    def block_outputs(self, block, index, output, inputs, cached):
        return self._call("block_outputs", block=block, index=index, output=output, inputs=inputs, cached=cached)

    def gguf_layout(self, model):
        return self._call("gguf_layout", model=model)

    def traits(self, model) -> Traits:
        """``fixed_attrs`` of every implementation merged over ``Traits()``, the engine's defaults first."""
        traits = Traits()
        for values in reversed(self.fixed_attrs(model)):   # pluggy returns the trylast defaults last
            if values:
                traits = traits.updated(values, self.adapter)
        return traits
