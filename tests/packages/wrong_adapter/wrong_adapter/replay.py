"""Wrong on purpose: claims to rebuild the per-block mask and rotary embeddings, then does not.

The engine trusts ``rebuilt_keys`` and caches neither per block, so every block replays with the
first block's (sliding-window) values; the first full-attention block, model.layers.1, diverges.
"""
from blockquant import AdapterInfo, hookimpl

from . import tiny_sliding_lm


@hookimpl
def adapter_info():
    return AdapterInfo(name="wrong_replay", description="forgets to rebuild variable inputs (test only)",
                       model_types=("wrong_replay_lm",))


@hookimpl
def fixed_attrs(model):
    return {"block_groups": [["model.layers"]], "rebuilt_keys": ("attention_mask", "position_embeddings")}


@hookimpl
def replay_inputs(block, index, cached):
    return None   # the bug: nothing rebuilt


@hookimpl
def example_model():
    return tiny_sliding_lm()
