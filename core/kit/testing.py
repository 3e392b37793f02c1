"""The adapter test kit: the invariants of docs/architecture.md as ready pytest tests (pytest11 plugin).

Use it from any adapter package (installed, so that its entry point is visible)::

    from blockquant.kit.testing import AdapterKit

    class TestMyAdapter(AdapterKit):
        adapter = "my_adapter"          # the entry-point name
        settings = {"seqlen": 16}       # optional overrides of KIT_SETTINGS

or, for several adapters in one class, ``adapters = ["a", "b"]`` (one parametrized set each).
Every check runs on the adapter's ``example_model()`` (saved once per session to a temporary
folder) through the engine's real code paths; each ``Kit.check_*`` method can also be called on
its own (the ``blockquant_kit`` fixture returns a ``Kit`` for a name).  A failure raises
``AssertionError`` whose message names the block, the kwarg or the file that broke the invariant.
"""
from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from typing import Any

import pytest
import torch

from .. import api
from ..frame import plugins
from ..run import verify as verify_mod
from ..errors import AdapterError, ControlFlow
from ..export.loading import load_quantized
from ..run.store import same_value

# Tiny settings: a kit run is seconds per check.  group_size 32 so 64-wide example layers quantize.
KIT_SETTINGS = dict(nsamples=2, seqlen=32, iters=2, group_size=32, batch_size=2, seed=0, device="cpu")
ROUND_TRIP_TOLERANCE = 1e-5

_FOLDERS: dict[str, str] = {}
_ROOT: list[tempfile.TemporaryDirectory] = []


def example_folder(adapter: str) -> str:
    """The adapter's ``example_model()`` saved as a hub-like folder (once per process)."""
    if adapter not in _FOLDERS:
        entry = plugins.get_adapter(adapter)
        example = plugins.run_manager(entry).hook.example_model()
        if example is None or example.save is None:
            raise AdapterError(f"adapter '{adapter}' has no example_model() with save(); the kit needs one")
        if not _ROOT:
            _ROOT.append(tempfile.TemporaryDirectory(prefix="blockquant-kit-"))
        folder = os.path.join(_ROOT[0].name, adapter, example.name)
        example.save(folder)
        _FOLDERS[adapter] = folder
    return _FOLDERS[adapter]


def _fn(value: Any) -> Any:
    """Identity of a callable, with bound methods reduced to (function, owner)."""
    func = getattr(value, "__func__", None)
    return (id(func), id(value.__self__)) if func is not None else id(value)


_BOOKKEEPING = {"forward", "hf_device_map"}   # compared separately / set by accelerate on the root


def model_snapshot(model: torch.nn.Module) -> dict[str, tuple]:
    """Per module: class, class forward, instance forward override, hook counts, public attributes."""
    out = {}
    for name, m in model.named_modules():
        own = m.__dict__.get("forward")
        if own is not None and getattr(own, "__func__", None) is type(m).forward and getattr(own, "__self__", None) is m:
            own = None   # accelerate restores a plain bound method: the same as no override
        attrs = tuple(sorted((k, _fn(v) if callable(v) and not isinstance(v, torch.nn.Module) else type(v).__name__)
                             for k, v in vars(m).items() if not k.startswith("_") and k not in _BOOKKEEPING))
        out[name or "<model>"] = (type(m).__qualname__, _fn(type(m).forward), None if own is None else _fn(own),
                                  len(m._forward_hooks), len(m._forward_pre_hooks), attrs)
    return out


def snapshot_diff(before: dict, after: dict) -> list[str]:
    """Module names (with what changed) between two ``model_snapshot`` results."""
    what = ("class", "class forward", "instance forward", "forward hooks", "forward pre-hooks", "attributes")
    diffs = [f"{n}: added" for n in after if n not in before] + [f"{n}: removed" for n in before if n not in after]
    for name in before:
        if name in after and before[name] != after[name]:
            changed = [w for w, a, b in zip(what, before[name], after[name]) if a != b]
            diffs.append(f"{name}: {', '.join(changed)} changed")
    return diffs


def state_diff(a: dict, b: dict) -> list[str]:
    keys = set(a) ^ set(b)
    diffs = [f"{k}: only in one state" for k in sorted(keys)]
    for k in sorted(set(a) & set(b)):
        if a[k].shape != b[k].shape or not torch.equal(a[k], b[k]):
            diffs.append(f"{k}: values differ")
    return diffs


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.device.type != "meta"}


def _materialize_blocks(run) -> None:
    for chain in run.groups:
        for block in chain:
            run.loader.load(block)


def first_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model output: logits / sample / the first field or item."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "sample", "last_hidden_state"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)) and output:
        return first_tensor(output[0])
    raise AssertionError(f"cannot find an output tensor in {type(output).__name__}")


class _Stop(ControlFlow):
    pass


def first_forward(run, model: torch.nn.Module, batch) -> tuple[tuple, dict, torch.Tensor]:
    """Drive ``batch`` through the adapter's ``run_calibration`` and keep the first call of ``model``."""
    seen: list = []

    def hook(module, args, kwargs, output):
        seen.append((args, kwargs, first_tensor(output).detach().clone()))
        raise _Stop

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), contextlib.suppress(_Stop):
            run.hooks.run_calibration(model=model, batch=batch)
    finally:
        handle.remove()
    if not seen:
        raise AssertionError("run_calibration never called the model")
    return seen[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class Kit:
    """The invariant checks for one adapter, on its example model."""

    def __init__(self, adapter: str, settings: dict | None = None, workdir: str | None = None):
        self.adapter = adapter
        self.settings = dict(KIT_SETTINGS, **(settings or {}))
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix=f"blockquant-kit-{adapter}-")
        self.workdir = workdir or self._tmp.name
        self._runs: dict[str, Any] = {}

    @property
    def folder(self) -> str:
        return example_folder(self.adapter)

    def verify(self, step=None):
        settings = {k: v for k, v in self.settings.items() if k not in ("iters", "group_size", "batch_size")}
        if step is None:
            return api.verify(self.folder, self.adapter, **settings)
        settings = dict(settings, keep_blocks=True)
        settings.setdefault("nsamples", 2)
        settings.setdefault("seqlen", 64)
        run = api.prepare(self.folder, self.adapter, api.make_settings(**settings))
        step(run)
        return verify_mod.verify_prepared(run)

    # 1. replay equivalence
    def check_replay(self, step=None):
        """Replay with quantization off reproduces the model's own forward (fp32, rel error <= 1e-5)."""
        report = self.verify(step)
        assert report.blocks, f"adapter '{self.adapter}': verify checked no blocks"
        assert report.ok, report.render()
        return report

    # 2a. patch idempotence
    def check_patch_idempotent(self):
        """patch_model twice leaves the model exactly as once (modules, forwards, hooks, state)."""
        run = api.prepare(self.folder, self.adapter, api.make_settings(**self.settings))
        _materialize_blocks(run)
        once, state = model_snapshot(run.model), _state(run.model)
        run.hooks.patch_model(model=run.model)
        twice = model_snapshot(run.model)
        diffs = snapshot_diff(once, twice) + state_diff(state, _state(run.model))
        assert not diffs, (f"adapter '{self.adapter}': patch_model is not idempotent; a second call changed "
                           f"{len(diffs)} thing(s): " + "; ".join(diffs[:8]))

    # 2b. survival of accelerate dispatch and hook removal
    def check_dispatch_survival(self):
        """dispatch_model (cpu) + remove_hook_from_submodules + post_hook_removal: patches intact, replay equal."""
        from accelerate import dispatch_model
        from accelerate.hooks import remove_hook_from_submodules

        seen: dict = {}

        def dispatch(run):
            _materialize_blocks(run)
            seen["patched"] = model_snapshot(run.model)
            dispatch_model(run.model, device_map={"": "cpu"}, force_hooks=True)
            hooked = sum(hasattr(m, "_hf_hook") for m in run.model.modules())
            assert hooked, "accelerate attached no hooks"
            remove_hook_from_submodules(run.model)
            run.hooks.post_hook_removal(model=run.model)
            seen["after"] = model_snapshot(run.model)

        report = self.check_replay(dispatch)
        diffs = snapshot_diff(seen["patched"], seen["after"])
        assert not diffs, (f"adapter '{self.adapter}': after dispatch + hook removal + post_hook_removal the model "
                           "differs from the patched model: " + "; ".join(diffs[:8]))
        return report

    # 3. capture-store bounds
    def check_capture_bounds(self):
        """Streams once per sample for first blocks only; sample-invariant kwargs once; no forward past the need."""
        settings = dict(self.settings, nsamples=max(3, self.settings["nsamples"]))
        run = api.prepare(self.folder, self.adapter, api.make_settings(**settings))
        names = {id(m): n for n, m in run.model.named_modules()}
        blocks = {id(b.module): b.ref.name for chain in run.groups for b in chain}
        events: list[str] = []

        def pre(module, args):
            if module is run.model:
                events.append("<forward>")
            elif id(module) in names:
                events.append(blocks.get(id(module), names[id(module)]))

        handle = torch.nn.modules.module.register_module_forward_pre_hook(pre)
        try:
            api.capture_inputs(run)
        finally:
            handle.remove()
        problems = []
        for g, store in enumerate(run.stores):
            for key in store.stream_keys:
                if key in store.shared or any(key in s for s in store.per_sample):
                    problems.append(f"group {g}: stream '{key}' also stored as a kwarg")
                for pos, samples in store.per_block.items():
                    if any(key in s for s in samples):
                        problems.append(f"group {g}: stream '{key}' stored for block position {pos}")
            if len(store.streams) != len(store.per_sample):
                problems.append(f"group {g}: {len(store.streams)} stream entries for {len(store.per_sample)} samples")
            for key in {k for s in store.per_sample for k in s}:
                values = [s.get(key, store.shared.get(key)) for s in store.per_sample]
                if len(values) > 1 and all(_same(values[0], v) for v in values[1:]):
                    problems.append(f"group {g}: kwarg '{key}' is identical for all samples but stored per sample")
        if run.traits.stop_after_capture:
            forwards, current = [], None
            for e in events:
                if e == "<forward>":
                    current = []
                    forwards.append(current)
                elif current is not None:
                    current.append(e)
            for i, calls in enumerate(forwards):
                if not calls or calls[-1] not in blocks.values():
                    problems.append(f"capture forward {i} ran past the last needed block "
                                    f"(last module started: {calls[-1] if calls else 'none'})")
        assert not problems, f"adapter '{self.adapter}': capture store bounds broken: " + "; ".join(problems[:8])
        return run

    # 4/5. export round trip and determinism
    def quantize(self, tag: str):
        if tag not in self._runs:
            out = os.path.join(self.workdir, f"out-{tag}")
            self._runs[tag] = api.quantize(self.folder, self.adapter, output_dir=out, overwrite=True,
                                           keep_blocks=True, **self.settings)
        return self._runs[tag]

    def check_round_trip(self):
        """quantize -> blockquant.load_quantized gives the in-memory quantized model's outputs."""
        result = self.quantize("a")
        run = result.run
        args, kwargs, expected = first_forward(run, run.model, run.batches[0])
        loaded = load_quantized(os.path.join(result.output_dir, run.traits.weights_subfolder), dtype=torch.float32)
        qlayers = sum(type(m).__name__ == "QuantLinear" for m in loaded.modules())
        assert qlayers, f"adapter '{self.adapter}': the exported checkpoint loaded with no QuantLinear layer"
        with torch.no_grad():
            got = first_tensor(loaded(*args, **kwargs))
        err = _rel(got, expected)
        assert err <= ROUND_TRIP_TOLERANCE, (f"adapter '{self.adapter}': the exported checkpoint's output differs from "
                                             f"the in-memory quantized model (rel error {err:.2e})")
        return err

    def check_determinism(self):
        """Two runs with the same seed write byte-identical safetensors files."""
        a, b = self.quantize("a").output_dir, self.quantize("b").output_dir
        files_a = sorted(os.path.relpath(p, a) for p in glob.glob(os.path.join(a, "**", "*.safetensors"), recursive=True))
        files_b = sorted(os.path.relpath(p, b) for p in glob.glob(os.path.join(b, "**", "*.safetensors"), recursive=True))
        assert files_a, f"adapter '{self.adapter}': the run wrote no safetensors files"
        assert files_a == files_b, f"adapter '{self.adapter}': runs wrote different files: {files_a} vs {files_b}"
        for rel in files_a:
            with open(os.path.join(a, rel), "rb") as fa, open(os.path.join(b, rel), "rb") as fb:
                assert fa.read() == fb.read(), f"adapter '{self.adapter}': {rel} differs between two runs with the same seed"


def _same(a, b) -> bool:
    return same_value(a, b)


_KITS: dict[tuple, Kit] = {}


def get_kit(adapter: str, settings: dict | None = None) -> Kit:
    """One ``Kit`` per (adapter, settings) per process, so runs are shared between checks."""
    key = (adapter, tuple(sorted((settings or {}).items())))
    if key not in _KITS:
        _KITS[key] = Kit(adapter, settings)
    return _KITS[key]


class AdapterKit:
    """Subclass as ``TestSomething`` and set ``adapter`` (or ``adapters``) to get the six kit tests."""

    adapter: str = ""
    adapters: list[str] = []
    settings: dict = {}

    def test_replay_equivalence(self, adapter_kit):
        adapter_kit.check_replay()

    def test_patch_idempotence(self, adapter_kit):
        adapter_kit.check_patch_idempotent()

    def test_dispatch_and_hook_removal(self, adapter_kit):
        adapter_kit.check_dispatch_survival()

    def test_capture_store_bounds(self, adapter_kit):
        adapter_kit.check_capture_bounds()

    def test_export_round_trip(self, adapter_kit):
        adapter_kit.check_round_trip()

    def test_determinism(self, adapter_kit):
        adapter_kit.check_determinism()


def pytest_generate_tests(metafunc):
    cls = metafunc.cls
    if cls is not None and issubclass(cls, AdapterKit) and "adapter_kit" in metafunc.fixturenames:
        names = list(cls.adapters) or ([cls.adapter] if cls.adapter else [])
        if not names:
            raise pytest.UsageError(f"{cls.__name__}: set adapter = 'name' (or adapters = [...]) on the AdapterKit subclass")
        metafunc.parametrize("adapter_kit", names, indirect=True, ids=names)


@pytest.fixture
def adapter_kit(request):
    """The ``Kit`` of the adapter the test is parametrized with (AdapterKit subclasses)."""
    return get_kit(request.param, getattr(request.cls, "settings", None))


@pytest.fixture
def blockquant_kit():
    """``blockquant_kit(name, **settings)`` -> a ``Kit`` (shared per process)."""
    return lambda adapter, **settings: get_kit(adapter, settings)
