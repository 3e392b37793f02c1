"""The gemma4 adapter's patch (shared KV passed by reference through accelerate hooks, the core's
blockquant.resources.by_reference) and its shared-KV layout probe."""
from __future__ import annotations

import pytest
import torch
from packaging.version import Version

from blockquant.frame import plugins
from blockquant.adapters import gemma4
from blockquant.adapters.gemma4 import versions
from blockquant.resources.by_reference import by_reference_hook, pass_by_reference
from blockquant.errors import VersionError


def _manager():
    return plugins.run_manager(plugins.get_adapter("gemma4"))


def _ids(example, n=40):
    return example.processor(["Gemma shares keys and values between its last layers. " * 3],
                             return_tensors="pt")["input_ids"][:, :n]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _per_layer_cpu_map(model):
    """A device map that puts every block under its own accelerate hook (all on the CPU)."""
    names = [n for n, _ in model.named_children()]
    inner = dict(model.model.named_children())
    device_map = {f"model.{n}": "cpu" for n in inner if n != "layers"}
    device_map.update({f"model.layers.{i}": "cpu" for i in range(len(model.model.layers))})
    device_map.update({n: "cpu" for n in names if n != "model"})
    return device_map


def _hook_counts(model):
    return [sum(fn is by_reference_hook("shared_kv_states") for fn in layer._forward_pre_hooks.values())
            for layer in model.model.layers]


def test_patch_is_idempotent_and_changes_no_value():
    example = gemma4.example_text()
    model, ids = example.model, _ids(example)
    before = _logits(model, ids)
    pm = _manager()
    pm.hook.patch_model(model=model, ctx=None)
    pm.hook.patch_model(model=model, ctx=None)
    assert _hook_counts(model) == [1, 1, 1, 1]
    assert pass_by_reference(model.model.layers, "shared_kv_states") == 0
    assert torch.equal(_logits(model, ids), before)


@pytest.mark.parametrize("patch_after_dispatch", [False, True])
def test_patch_survives_accelerate_dispatch_and_hook_removal(patch_after_dispatch):
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_submodules

    example = gemma4.example_text()
    model, ids = example.model, _ids(example)
    expected = _logits(model, ids)
    pm = _manager()
    if not patch_after_dispatch:
        pm.hook.patch_model(model=model, ctx=None)
    dispatch_model(model, device_map=_per_layer_cpu_map(model), force_hooks=True)
    assert all(hasattr(layer, "_hf_hook") for layer in model.model.layers)
    if patch_after_dispatch:
        pm.hook.patch_model(model=model, ctx=None)
    assert torch.equal(_logits(model, ids), expected)     # KV-shared layers see what the storing layers wrote
    remove_hook_from_submodules(model)
    pm.hook.post_hook_removal(model=model, ctx=None)
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    assert _hook_counts(model) == [1, 1, 1, 1]
    assert torch.equal(_logits(model, ids), expected)


def test_without_the_patch_dispatch_breaks_kv_sharing_on_plain_dict_releases():
    """Control: with a plain-dict layout accelerate copies the state per layer; KVSharingDict needs no patch."""
    from accelerate import dispatch_model

    example = gemma4.example_text()
    model, ids = example.model, _ids(example)
    expected = _logits(model, ids)
    dispatch_model(model, device_map=_per_layer_cpu_map(model), force_hooks=True)
    if type(versions.kv_strategy().new_state()) is dict:
        with pytest.raises(KeyError):
            _logits(model, ids)
    else:
        assert torch.equal(_logits(model, ids), expected)


@pytest.mark.parametrize("container, keys, strategy", [
    ("dict", "index", versions.BY_INDEX), ("dict", "type", versions.BY_TYPE_DICT),
    ("KVSharingDict", "type", versions.BY_TYPE),
])
def test_each_known_layout_has_its_strategy(container, keys, strategy):
    assert versions.strategy_for(versions.Probe(container, keys), Version("5.30.0")) is strategy


def test_unknown_layouts_are_refused_naming_what_was_seen():
    with pytest.raises(VersionError, match="use_cache"):
        versions.strategy_for(versions.Probe(None, None), Version("5.5.2"))
    with pytest.raises(VersionError, match=r"passes Gemma 4's shared KV state as a KVSharingList keyed by index"):
        versions.strategy_for(versions.Probe("KVSharingList", "index"), Version("5.40.0"))


def test_a_newer_release_with_a_known_layout_runs_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="blockquant"):
        strategy = versions.strategy_for(versions.probe(), Version("5.99.0"))
    assert strategy is versions.kv_strategy()
    assert "transformers 5.99.0 is newer than 5.25.0" in caplog.text


def test_requirement_is_declared_in_adapter_info():
    info = _manager().hook.adapter_info()
    assert info.requires == {"transformers": versions.GATE.requirement} == {"transformers": ">=5.5.4,<6"}
    assert info.model_types == ("gemma4_text", "gemma4")


def test_installed_release_stores_shared_kv_as_its_strategy_says():
    """The strategy picked for the installed transformers matches what the model really writes."""
    example = gemma4.example_text()
    model, ids = example.model, _ids(example)
    strategy = versions.kv_strategy()
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("state", kwargs["shared_kv_states"])

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _logits(model, ids)
    finally:
        handle.remove()
    state = seen["state"]
    assert type(state).__name__ == type(strategy.new_state()).__name__
    layers = model.model.layers
    stored = {strategy.store_key(l.self_attn) for l in layers if l.self_attn.store_full_length_kv}
    read = {strategy.read_key(l.self_attn) for l in layers if l.self_attn.is_kv_shared_layer}
    assert set(state.keys()) == stored and read <= stored


def test_the_engine_refuses_a_release_outside_the_range(monkeypatch):
    real = plugins.md.version
    monkeypatch.setattr(plugins.md, "version", lambda dist: "5.5.2" if dist == "transformers" else real(dist))
    from blockquant import api

    with pytest.raises(VersionError, match=r"supports transformers>=5\.5\.4.*installed transformers is 5\.5\.2"):
        api.verify(adapter="gemma4")
