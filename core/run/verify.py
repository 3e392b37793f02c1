"""``quant verify``: does block-by-block replay reproduce the model's own forward?

The model runs once with hooks on every block, recording each block's true keyword arguments and
output streams.  Then the blocks are replayed one by one from the captured first-block inputs,
with quantization off, exactly as the block loop replays them.  Per block: the relative error of
the output streams, and the kwargs whose replayed value differs from the true one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .calibrate import capture_inputs, run_batch
from .prepare import prepare
from ..model.blocks import bind_inputs
from ..config import RunSettings
from ..frame.contract import SampleInputs
from .replay import Replayer

TOLERANCE = 1e-5


@dataclass
class BlockCheck:
    name: str
    rel_error: float
    differing_kwargs: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    adapter: str
    model: str
    samples: int
    blocks: list[BlockCheck] = field(default_factory=list)
    dtype: str = "float32"          # the precision both forwards ran in (the engine's compute dtype)
    tolerance: float = TOLERANCE

    @property
    def max_error(self) -> float:
        return max((b.rel_error for b in self.blocks), default=0.0)

    @property
    def first_divergent(self) -> BlockCheck | None:
        return next((b for b in self.blocks if b.rel_error > self.tolerance), None)

    @property
    def ok(self) -> bool:
        return self.first_divergent is None

    def render(self) -> str:
        lines = [f"verify {self.model} with adapter {self.adapter}: {self.samples} sample(s), replay vs the model's forward, both in {self.dtype}"]
        for b in self.blocks:
            flag = "ok " if b.rel_error <= self.tolerance else "BAD"
            extra = f"  kwargs differ: {', '.join(b.differing_kwargs)}" if b.differing_kwargs else ""
            lines.append(f"  {flag} {b.name:<40} rel error {b.rel_error:.2e}{extra}")
        bad = self.first_divergent
        if bad:
            hint = f"; replayed kwargs that differ: {', '.join(bad.differing_kwargs)}" if bad.differing_kwargs else ""
            lines.append(f"FAIL: first divergent block {bad.name} (rel error {bad.rel_error:.2e} > {self.tolerance:g}){hint}")
        else:
            lines.append(f"OK: every block within {self.tolerance:g} (max {self.max_error:.2e})")
        return "\n".join(lines)


def _rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def _close(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return False
        if not a.is_floating_point():
            return bool(torch.equal(a.cpu(), b.cpu()))
        return _rel(a, b) <= TOLERANCE
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float, str, bool, type(None))) or isinstance(b, (int, float, str, bool, type(None))):
        return a == b
    return True   # opaque objects (caches, shared state holders): compared through the outputs


def reference(run, batches) -> dict[int, list[tuple[dict, dict]]]:
    """Per global block number, per sample: (true kwargs, true output streams)."""
    hook = run.hooks
    refs: dict[int, list] = {}
    handles = []
    for chain in run.groups:
        for block in chain:
            def pre(module, args, kwargs, block=block):
                refs.setdefault(block.ref.number, []).append([bind_inputs(module, args, kwargs), None])

            def post(module, args, kwargs, output, block=block):
                entry = refs[block.ref.number][-1]
                sample = len(refs[block.ref.number]) - 1
                store = run.stores[block.ref.group]
                extras = store.extras[sample] if sample < len(store) else {}
                cached = SampleInputs(index=sample, kwargs=entry[0], extras=extras, state={})
                entry[1] = hook.block_outputs(block=module, index=block.ref, output=output, inputs=entry[0], cached=cached)
            handles.append(block.module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(block.module.register_forward_hook(post, with_kwargs=True))
    all_blocks = [b for chain in run.groups for b in chain]
    try:
        with run.loader.during_forward(all_blocks), torch.no_grad():
            for batch in batches:
                run_batch(run, batch)
    finally:
        for h in handles:
            h.remove()
    return refs


def run_verify(model: str | None, adapter: str | None, settings: RunSettings) -> VerifyReport:
    settings.keep_blocks = True
    return verify_prepared(prepare(model, adapter, settings))


def compute_in_engine_dtype(run) -> None:
    """Run the model's own forward in the precision the block loop computes in (float32 on the CPU, the
    model's dtype on CUDA): a bfloat16 checkpoint is verified on the CPU in float32, as it is tuned."""
    dtype = run.compute_dtype
    if run.model_dtype != dtype:
        run.model.to(dtype)     # parameters still on the meta device stay there, with the new dtype
    run.loader.dtype = dtype


def verify_prepared(run) -> VerifyReport:
    """Verify a run returned by ``api.prepare`` (callers may change the model in between)."""
    compute_in_engine_dtype(run)
    capture_inputs(run)
    refs = reference(run, run.batches)
    report = VerifyReport(adapter=run.entry.name, model=run.source.path, samples=len(run.stores[0]) if run.stores else 0,
                          dtype=str(run.compute_dtype).replace("torch.", ""))
    for g, chain in enumerate(run.groups):
        store = run.stores[g]
        replayer = Replayer(run.hooks, store, run.device, run.compute_dtype)
        streams = [dict(s) for s in store.streams]
        states = [{} for _ in streams]
        for block in chain:
            run.loader.load(block)
            true = refs.get(block.ref.number, [])
            differing: set[str] = set()
            for i in range(min(len(streams), len(true))):
                differing |= _kwargs_differ(replayer, block, i, streams[i], dict(states[i]), true[i][0])
            with torch.no_grad():
                outs = replayer.run(block, streams, states, "fp", batch=1)
            check = BlockCheck(block.ref.name, 0.0, sorted(differing))
            for i, out in enumerate(outs):
                if i >= len(true) or true[i][1] is None:
                    check.rel_error = float("inf")
                    continue
                for key, value in out.items():
                    check.rel_error = max(check.rel_error, _rel(value, true[i][1][key]))
            report.blocks.append(check)
            streams = outs
    return report


def _kwargs_differ(replayer, block, i, streams, state, true_kwargs) -> set[str]:
    """Keys whose replayed value differs from the model's own call (on a copy of the replay state)."""
    kwargs, _ = replayer.sample_kwargs(block, i, streams, state, "fp")
    return {k for k in set(kwargs) | set(true_kwargs)
            if k not in kwargs or k not in true_kwargs or not _close(kwargs[k], true_kwargs[k])}
