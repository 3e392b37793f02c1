"""The adapter test kit catches wrong adapters, and the diagnostics name what is wrong.

Uses the deliberately wrong adapters of tests/packages/wrong_adapter (registered for the test run by tests/conftest.py)
and small adapter modules registered here.
"""
import inspect
import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch

from blockquant.frame.contract import RunContext
from blockquant.frame.hooks import AdapterHooks
from blockquant.run.prepare import pin_traits
from blockquant import AdapterInfo, api, hookimpl
from blockquant.frame import hookspecs
from blockquant.frame import plugins
from blockquant.frame.contract import Traits
from blockquant.errors import AdapterError
from blockquant.model.model_io import LoadedModel
from blockquant.kit.testing import get_kit, model_snapshot, snapshot_diff

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUANT = [sys.executable, "-m", "blockquant.frame.cli"]


def quant(*args, only="generic,wrong_replay"):
    """Run the CLI with only the adapters a test needs loaded (BLOCKQUANT_ADAPTERS keeps it fast)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", BLOCKQUANT_ADAPTERS=only)
    return subprocess.run(QUANT + list(args), capture_output=True, text=True, timeout=300, env=env)


def test_kit_names_block_and_kwarg_of_a_replay_that_diverges():
    kit = get_kit("wrong_replay", {"seqlen": 32})
    with pytest.raises(AssertionError) as info:
        kit.check_replay()
    message = str(info.value)
    assert "first divergent block model.layers.1" in message
    assert "attention_mask" in message and "position_embeddings" in message
    assert re.search(r"ok\s+model\.layers\.0\s", message)   # the block before is fine


def test_quant_verify_exits_1_and_names_the_first_divergent_block():
    result = quant("verify", "--adapter", "wrong_replay", "--seqlen", "32")
    assert result.returncode == 1, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("FAIL: first divergent block model.layers.1")
    assert "replayed kwargs that differ: attention_mask, position_embeddings" in last


def test_kit_catches_a_patch_that_wraps_twice():
    kit = get_kit("wrong_patch")
    with pytest.raises(AssertionError, match=r"not idempotent.*model\.layers\.0: instance forward changed"):
        kit.check_patch_idempotent()


def test_snapshot_sees_class_level_patches_and_hooks(tiny_folder):
    run = api.prepare(tiny_folder("llama", 2), "generic", api.make_settings(nsamples=2, seqlen=16))
    before = model_snapshot(run.model)
    layer = run.model.model.layers[1]
    handle = layer.register_forward_hook(lambda *a: None)
    assert snapshot_diff(before, model_snapshot(run.model)) == ["model.layers.1: forward hooks changed"]
    handle.remove()
    assert snapshot_diff(before, model_snapshot(run.model)) == []


def _module(name, **hooks):
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, hookimpl(fn))
    module.adapter_info = hookimpl(lambda: AdapterInfo(name=name))
    return module


def test_unknown_trait_is_named():
    module = _module("typo_trait", fixed_attrs=lambda model: {"block_group": [["model.layers"]]})
    entry = plugins.AdapterEntry(name="typo_trait", module=module)
    entry.info, entry.hooks = plugins.check_adapter("typo_trait", module)
    ctx = RunContext(settings=api.make_settings(nsamples=2, seqlen=16))
    run = api.Run(ctx=ctx, entry=entry, hooks=AdapterHooks(plugins.run_manager(entry), ctx, "typo_trait"))
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
    ctx.loaded = LoadedModel(model=model)
    with pytest.raises(AdapterError, match=r"adapter 'typo_trait' returned unknown trait\(s\) block_group"):
        pin_traits(run)
    with pytest.raises(AdapterError, match="unknown trait.*max_batch"):
        Traits().updated({"max_batch": 2}, "x")


def test_misspelt_hook_is_named():
    def patch_modle(model):
        pass

    module = _module("typo_hook", patch_modle=patch_modle)
    with pytest.raises(AdapterError, match=r"(?s)adapter 'typo_hook' breaks the hook contract.*patch_modle"):
        plugins.check_adapter("typo_hook", module)


def test_hook_with_a_wrong_argument_is_named():
    def patch_model(model, extra):
        pass

    with pytest.raises(AdapterError, match=r"(?s)typo_args.*patch_model.*extra"):
        plugins.check_adapter("typo_args", _module("typo_args", patch_model=patch_model))


def _specs():
    return {n: getattr(hookspecs, n) for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "blockquant_spec")}


def test_quant_hooks_lists_every_hook_with_signature_and_implementers():
    result = quant("hooks")
    assert result.returncode == 0, result.stderr
    for name, fn in _specs().items():
        assert f"{name}{inspect.signature(fn)}" in result.stdout, name
    rows = {r["hook"]: r for r in json.loads(quant("hooks", "--json").stdout)}
    assert "wrong_replay" in result.stdout and "qwen_vl" not in result.stdout   # BLOCKQUANT_ADAPTERS applies
    assert set(rows) == set(_specs())
    assert "wrong_replay" in rows["replay_inputs"]["implemented_by"]
    assert "generic" in rows["example_model"]["implemented_by"]
    assert rows["replay_inputs"]["firstresult"] and not rows["patch_model"]["firstresult"]


def test_every_hook_is_documented():
    with open(os.path.join(ROOT, "docs", "hooks.md")) as f:
        hooks_md = f.read()
    with open(os.path.join(ROOT, "CONTRIBUTING.md")) as f:
        contributing = f.read()
    for name, fn in _specs().items():
        doc = fn.__doc__ or ""
        assert "Since:" in doc and "firstresult" in doc, f"hookspecs.{name} docstring lacks firstresult/Since"
        assert f"\n## {name}\n" in hooks_md, f"docs/hooks.md has no section for {name}"
        assert f"{name}{inspect.signature(fn)}" in hooks_md, f"docs/hooks.md lacks the signature of {name}"
        assert f"`{name}" in contributing, f"CONTRIBUTING.md does not mention {name}"
