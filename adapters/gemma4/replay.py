"""Rebuilding the inputs that differ from one Gemma 4 text block to the next (docs/models/gemma4.md).

Only block 0's inputs are captured, plus per sample what the rebuild needs that they lack (the ids fed to
the per-layer embedding, the 2D attention mask, ``mm_token_type_ids``).  ``rebuild`` derives each block's
per-layer input, rotary embeddings and mask of its layer type with the model's own modules; shared KV
state lives in the replay stream's ``state`` (``commit_shared_kv`` after a storing layer ran).
"""
from __future__ import annotations

from types import MappingProxyType

import torch
import torch.nn.functional as F
from transformers import Gemma4ForConditionalGeneration

from blockquant.errors import BlockquantError

from .model import text_model

EXTRAS_KEY = "gemma4.rebuild"      # extras: {"ple_ids", "attention_mask", "mm_token_type_ids"}
STATE_KEY = "gemma4.shared_kv"     # cached.state: {store key: (keys, values)}
CACHE_KEYS = {"past_key_values", "cache"}          # the layer's cache argument (renamed "cache" in 5.24)
REBUILT_KEYS = ("per_layer_input", "position_embeddings", "attention_mask", "shared_kv_states")
# Layers that neither store nor read shared KV get this one read-only empty mapping: the same object
# for every sample keeps their replay collatable into mini-batches.
NO_SHARED_KV = MappingProxyType({})


def register_capture_hooks(model: torch.nn.Module, calibration) -> None:
    """Record, for every captured text sample, the values ``rebuild`` needs (see module docstring).

    The values are collected while the forward runs and recorded when the text model computes its
    rotary embeddings: after the per-layer embedding lookup and after any vision tower, just before
    block 0, so they attach to the text group's sample even when a vision group is captured first.
    """
    inner = text_model(model)
    seen: dict = {}

    def ple_pre(module, args, kwargs):
        seen["ple_ids"] = args[0] if args else kwargs.get("input")

    def rope_pre(module, args, kwargs):
        batch = calibration.batch if isinstance(calibration.batch, dict) else {}
        mask = batch.get("attention_mask")
        calibration.record(EXTRAS_KEY, {
            "ple_ids": seen.get("ple_ids"),
            "attention_mask": mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None,
            "mm_token_type_ids": batch.get("mm_token_type_ids"),
        })

    if getattr(inner, "embed_tokens_per_layer", None) is not None:
        calibration.hook(inner.embed_tokens_per_layer, ple_pre, pre=True, with_kwargs=True)
    calibration.hook(inner.rotary_emb, rope_pre, pre=True, with_kwargs=True)


def per_layer_input(inner: torch.nn.Module, embeds: torch.Tensor, ids: torch.Tensor | None, layer: int):
    """Slice ``layer`` of the text model's ``project_per_layer_inputs``, computed for that slice only."""
    size = inner.hidden_size_per_layer_input
    if not size:
        return None
    rows = slice(layer * size, (layer + 1) * size)
    weight = inner.per_layer_model_projection.weight
    embeds = embeds.to(weight.device, weight.dtype)
    projected = F.linear(embeds, weight[rows]) * inner.per_layer_model_projection_scale
    projected = inner.per_layer_projection_norm(projected)
    if ids is None:
        return projected
    table = inner.embed_tokens_per_layer
    tokens = F.embedding(ids.to(table.weight.device), table.weight[:, rows]) * table.embed_scale.to(table.weight.dtype)
    return (projected + tokens.to(projected.device)) * inner.per_layer_input_scale


def masks(inner: torch.nn.Module, embeds, attention_mask, position_ids, mm_token_type_ids) -> dict:
    """The per-layer-type masks, made by the model's own mask function (bidirectional image blocks included)."""
    return Gemma4ForConditionalGeneration.create_masks_for_generate(
        inner.config, embeds, attention_mask, None, position_ids,
        mm_token_type_ids=mm_token_type_ids, is_first_iteration=True,
    )


@torch.no_grad()   # inputs of the block, never trained: no graph into the (huge) per-layer tables
def rebuild(block: torch.nn.Module, cached, strategy, inner: torch.nn.Module, only_shared_kv: bool) -> dict:
    """The kwargs of text block ``block`` of text model ``inner`` for one sample (see the module docstring).

    ``only_shared_kv`` (the per-block cache fallback, ``--variable_inputs cache``): only the shared KV
    state is rebuilt; the engine supplies the cached per-block values.
    """
    attn = block.self_attn
    out: dict = {"shared_kv_states": shared_kv(block, cached, strategy)}
    for cache in CACHE_KEYS & cached.kwargs.keys():   # never a cache the replay would write into
        out[cache] = None
    if only_shared_kv:
        return out
    extras = cached.extras.get(EXTRAS_KEY) or {}
    device = next(block.parameters()).device       # where the block runs (embeddings may be freed by now)
    embeds = cached.kwargs["hidden_states"].to(device)
    position_ids = cached.kwargs["position_ids"].to(device)
    out["per_layer_input"] = per_layer_input(inner, embeds, extras.get("ple_ids"), attn.layer_idx)
    out["position_embeddings"] = inner.rotary_emb(embeds, position_ids, attn.layer_type)
    mask_2d, mm = extras.get("attention_mask"), extras.get("mm_token_type_ids")
    mask_2d = mask_2d.to(embeds.device) if mask_2d is not None else None
    out["attention_mask"] = masks(inner, embeds, mask_2d, position_ids, mm)[attn.layer_type]
    return out


def shared_kv(block: torch.nn.Module, cached, strategy):
    """The ``shared_kv_states`` container for this block and sample (a fresh one where the block uses it)."""
    attn = block.self_attn
    if not (attn.is_kv_shared_layer or attn.store_full_length_kv):
        return NO_SHARED_KV
    stored = cached.state.get(STATE_KEY, {})
    if attn.is_kv_shared_layer and strategy.read_key(attn) not in stored:
        raise BlockquantError(
            f"Gemma 4 layer {attn.layer_idx} reads the keys/values stored by an earlier layer (KV sharing), "
            "which this replay did not run; quantize the text blocks as one chain from the first block "
            "(do not start --to_quant_block_names after the storing layers)"
        )
    state = strategy.new_state()
    state.update(stored)
    return state


def commit_shared_kv(block: torch.nn.Module, inputs: dict, cached, strategy) -> None:
    """After a storing layer ran: keep what it wrote in the replay stream's state (detached)."""
    attn = getattr(block, "self_attn", None)
    if attn is None or not getattr(attn, "store_full_length_kv", False):
        return
    container = inputs.get("shared_kv_states")
    key = strategy.store_key(attn)
    if container is None or key not in container:
        return
    stored = dict(cached.state.get(STATE_KEY, {}))
    stored[key] = tuple(t.detach() for t in container[key])
    cached.state[STATE_KEY] = stored
