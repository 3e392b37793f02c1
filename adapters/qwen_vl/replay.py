"""What block-by-block replay of Qwen-VL models needs beyond the captured first-block inputs.

Two things happen inside the models' own loops, outside any block, and are redone here:

- Qwen2.5-VL vision: window-attention blocks get ``cu_seqlens`` of the attention windows, the
  full-attention blocks (``fullatt_block_indexes``) those of whole images.  Capture records both
  (from ``grid_thw``, with transformers' own functions) and ``replay_inputs`` gives each block its own.
- Qwen3-VL deepstack: the text model adds visual features (``deepstack_visual_embeds``) to the hidden
  states at the image positions (``visual_pos_masks``) after each of its first few layers.  Capture
  records them from the text model's inputs and ``block_outputs`` adds them after the same layers.

M-RoPE ``position_embeddings`` need nothing: they are the same object for every text block of a
forward, so the engine stores them once per sample.

The adapter option ``reinject_deepstack`` (default true) switches the deepstack re-injection; turning it
off reproduces the silent error of a replay that drops deepstack (tests flip it to prove the point).
"""
from __future__ import annotations

import torch

DEEPSTACK_KEY = "qwen_vl.deepstack"        # extras: (visual_pos_masks, [features per layer])
VISION_SEQLENS_KEY = "qwen_vl.vision_seqlens"   # extras: {"full": cu, "window": cu, "full_blocks": (...)}
TEXT_SUFFIX = "language_model.layers"
VISION_SUFFIX = "visual.blocks"


def _cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Cumulative patch counts of each frame of each image (full attention within an image)."""
    try:
        from transformers.vision_utils import get_vision_cu_seqlens
    except ImportError:   # transformers releases before vision_utils: the same formula
        sizes = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
        return torch.nn.functional.pad(sizes.cumsum(0, dtype=torch.int32), (1, 0), value=0)
    return get_vision_cu_seqlens(grid_thw)


def _cu_window_seqlens(visual, grid_thw: torch.Tensor) -> torch.Tensor:
    """Cumulative patch counts of the attention windows, as the vision tower computes them."""
    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError:   # older transformers: the vision tower's own method
        _, cu = visual.get_window_index(grid_thw)
        cu = torch.as_tensor(cu, device=grid_thw.device, dtype=torch.int32)
        return torch.unique_consecutive(cu)
    _, cu = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                    window_size=visual.window_size, patch_size=visual.patch_size)
    return cu


def register_capture_hooks(model, calibration, vision: bool = True) -> None:
    """Record, during capture, what replay needs (see the module docstring).

    ``vision``: whether vision blocks are quantized (only then are their cu_seqlens recorded)."""
    inner = getattr(model, "model", model)       # the Qwen*VLModel inside ...ForConditionalGeneration
    visual = getattr(inner, "visual", None)
    if vision and visual is not None and getattr(visual, "fullatt_block_indexes", None):
        full_blocks = tuple(int(i) for i in visual.fullatt_block_indexes)

        def record_seqlens(module, args, kwargs):
            grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            if grid_thw is None:
                return None
            calibration.record(VISION_SEQLENS_KEY, {
                "full": _cu_seqlens(grid_thw), "window": _cu_window_seqlens(visual, grid_thw),
                "full_blocks": full_blocks,
            })
            return None

        calibration.hook(visual, record_seqlens, pre=True, with_kwargs=True)

    text = getattr(inner, "language_model", None)
    if text is not None and getattr(getattr(visual, "config", None), "deepstack_visual_indexes", None):

        def record_deepstack(module, args, kwargs):
            embeds = kwargs.get("deepstack_visual_embeds")
            masks = kwargs.get("visual_pos_masks")
            if embeds is not None and masks is not None:
                calibration.record(DEEPSTACK_KEY, (masks, list(embeds)))
            return None

        calibration.hook(text, record_deepstack, pre=True, with_kwargs=True)


def vision_inputs(index, cached) -> dict | None:
    """``cu_seqlens`` (and ``max_seqlen``) of a Qwen2.5-VL vision block: windowed or full."""
    seqlens = cached.extras.get(VISION_SEQLENS_KEY)
    if seqlens is None or not index.path.endswith(VISION_SUFFIX):
        return None
    cu = seqlens["full"] if index.index in seqlens["full_blocks"] else seqlens["window"]
    out = {"cu_seqlens": cu}
    if cached.kwargs.get("max_seqlen") is not None:   # flash attention: the longest segment
        out["max_seqlen"] = int((cu[1:] - cu[:-1]).max())
    return out


def add_deepstack(index, output, cached) -> dict | None:
    """The text stream after a deepstack layer: visual features added at the image positions."""
    if not index.path.endswith(TEXT_SUFFIX):
        return None
    recorded = cached.extras.get(DEEPSTACK_KEY)
    if recorded is None:
        return None
    masks, features = recorded
    if index.index >= len(features):
        return None
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    masks = masks.to(hidden.device)
    hidden = hidden.clone()
    hidden[masks, :] = hidden[masks, :] + features[index.index].to(hidden.device, hidden.dtype)
    return {"hidden_states": hidden}
