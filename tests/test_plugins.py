"""The plugin frame: discovery through entry points, broken adapters, selection, version gates."""
import json
import subprocess
import sys
import types

import pytest

from blockquant import AdapterInfo, hookimpl
from blockquant.frame import plugins
from blockquant.errors import AdapterError, VersionError
from blockquant.model.model_io import ModelSource

QUANT = [sys.executable, "-m", "blockquant.frame.cli"]


def quant(*args, env=None):
    return subprocess.run(QUANT + list(args), capture_output=True, text=True, timeout=300)


def test_builtins_and_third_party_are_discovered_the_same_way():
    entries = plugins.discover()
    for name in ("generic", "gemma4", "qwen_vl", "flux", "demo"):
        assert name in entries, name
    demo = entries["demo"]
    assert demo.status == "loaded"
    assert demo.distribution == "blockquant-demo-adapter" and demo.version == "0.3.0"
    assert "patch_model" in demo.hooks and "fixed_attrs" in demo.hooks
    assert entries["generic"].distribution == "blockquant"


def test_broken_adapter_is_listed_and_others_keep_working():
    result = quant("adapters", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["broken"]["status"] == "broken"
    assert "broken on purpose" in rows["broken"]["error"]
    assert rows["demo"]["status"] == "loaded" and rows["generic"]["status"] == "loaded"
    assert rows["demo"]["model_types"] == ["demo_lm"]
    assert rows["demo"]["requires"] == {"transformers": ">=5,<6"}
    text = quant("adapters")
    assert text.returncode == 0 and "broken" in text.stdout and "demo" in text.stdout


def test_selecting_a_broken_or_unknown_adapter_is_a_clear_error():
    with pytest.raises(AdapterError, match="broken on purpose"):
        plugins.get_adapter("broken")
    with pytest.raises(AdapterError, match="unknown adapter 'nope'.*generic"):
        plugins.get_adapter("nope")


def test_third_party_adapter_selected_by_name_runs_its_hooks(tiny_folder):
    import demo_adapter

    from blockquant import api

    demo_adapter.CALLS.clear()
    report = api.verify(tiny_folder("qwen3", 2), adapter="demo")
    assert report.ok and demo_adapter.CALLS == ["patch_model"]


def test_run_manager_holds_only_the_selected_adapter():
    entry = plugins.get_adapter("demo")
    pm = plugins.run_manager(entry)
    names = {pm.get_name(p) for p in pm.get_plugins()}
    assert names == {"demo", "blockquant.frame.defaults"}


def test_auto_detection_from_config(tiny_folder):
    source = ModelSource.resolve(tiny_folder("qwen3", 2))
    assert plugins.detect_adapter(source).name == "generic"
    source.config["model_type"] = "demo_lm"
    assert plugins.detect_adapter(source).name == "demo"
    source.config["model_type"] = "mystery"
    source.config["architectures"] = ["MysteryForCausalLM"]
    with pytest.raises(AdapterError, match="no adapter handles model_type 'mystery'.*--adapter generic"):
        plugins.detect_adapter(source)


def test_pipeline_folder_detected_through_model_index():
    source = ModelSource(path="x", config=None, model_index={"_class_name": "FluxPipeline"})
    assert plugins.detect_adapter(source).name == "flux"


def test_ambiguity_lists_the_candidates():
    entries = plugins.discover()
    twin = plugins.AdapterEntry(name="twin", module=None, info=AdapterInfo(name="twin", model_types=("demo_lm",)))
    entries["twin"] = twin
    source = ModelSource(path="x", config={"model_type": "demo_lm"})
    with pytest.raises(AdapterError, match="several adapters handle.*demo, twin"):
        plugins.detect_adapter(source, entries)


def test_misspelt_hook_is_named():
    module = types.ModuleType("typo_adapter")

    @hookimpl
    def adapter_info():
        return AdapterInfo(name="typo")

    @hookimpl
    def pre_cach(model, calibration):  # misspelt
        pass

    module.adapter_info, module.pre_cach = adapter_info, pre_cach
    with pytest.raises(AdapterError, match="pre_cach"):
        plugins.check_adapter("typo", module)


def test_version_gate_names_the_supported_range():
    entry = plugins.AdapterEntry(name="old", info=AdapterInfo(name="old", requires={"transformers": ">=4.0,<4.1"}))
    with pytest.raises(VersionError, match=r"supports transformers>=4.0,<4.1; installed transformers is 5\."):
        plugins.check_versions(entry)


def test_unknown_trait_names_adapter_and_key():
    from blockquant import Traits

    with pytest.raises(AdapterError, match="adapter 'x' returned unknown trait.*block_grups"):
        Traits().updated({"block_grups": []}, "x")


def test_two_distributions_claiming_one_name(monkeypatch):
    import importlib.metadata as md

    real = md.entry_points

    class FakeDist:
        def __init__(self, name, version):
            self.metadata, self.version = {"Name": name}, version

    def entry_points(group=None):
        eps = list(real(group=group))
        if group == plugins.GROUP:
            for dist in (FakeDist("pkg-a", "1.0"), FakeDist("pkg-b", "2.0")):
                ep = md.EntryPoint(name="clash", value="demo_adapter", group=group)
                eps.append(ep._for(dist) if hasattr(ep, "_for") else ep)
        return eps

    monkeypatch.setattr(plugins.md, "entry_points", entry_points)
    entry = plugins.discover()["clash"]
    assert entry.status == "broken" and "pkg-a 1.0 and pkg-b 2.0" in entry.error


def test_env_var_limits_loaded_adapters(monkeypatch):
    monkeypatch.setenv(plugins.ENV_SELECT, "generic")
    assert set(plugins.discover()) == {"generic"}
    monkeypatch.setenv(plugins.ENV_SELECT, "")
    assert plugins.discover() == {}


def test_every_hook_has_a_docstring_with_contract_fields():
    from blockquant.frame import hookspecs

    for row in plugins.hook_table({}):
        doc = getattr(hookspecs, row["hook"]).__doc__
        assert doc and "Returns" in doc and "firstresult" in doc and "Since" in doc, row["hook"]
