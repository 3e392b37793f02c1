"""Wrong on purpose: patch_model wraps every decoder layer's forward again on each call."""
import functools

from blockquant import AdapterInfo, hookimpl


@hookimpl
def adapter_info():
    return AdapterInfo(name="wrong_patch", description="patch_model is not idempotent (test only)",
                       model_types=("wrong_patch_lm",))


@hookimpl
def patch_model(model):
    for layer in model.model.layers:
        inner = layer.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):   # the bug: no "already patched" marker
            return _inner(*args, **kwargs)

        layer.forward = forward


@hookimpl
def example_model():
    from blockquant.adapters.generic import build_example

    return build_example("llama", layers=2)
