"""A minimal out-of-tree adapter: a tiny Qwen3 model handled with the engine's defaults."""
from blockquant import AdapterInfo, hookimpl

CALLS = []


@hookimpl
def adapter_info():
    return AdapterInfo(name="demo", description="test adapter", model_types=("demo_lm",),
                       requires={"transformers": ">=5,<6"})


@hookimpl
def example_model():
    from blockquant.adapters.generic import build_example

    return build_example("qwen3", layers=2, hidden=64)


@hookimpl
def patch_model(model):
    CALLS.append("patch_model")
    model._demo_patched = True


@hookimpl
def fixed_attrs(model):
    return {"block_groups": [["model.layers"]]}
