"""One forward for samples that a block takes as packed sequences (variable-length attention).

Blocks such as a ViT's with ``cu_seqlens`` take their tokens without a batch dimension: one sample is a
``[tokens, width]`` stream with cumulative sequence boundaries (``[0, n1, n1 + n2, ...]``, one segment per
image, frame or attention window) that keep attention inside each segment.  Samples of such blocks are
packed instead of padded, with no padding at all:

- every tensor whose first dimension is each sample's token count (the stream, per-token rotary
  embeddings) is concatenated along it, also one that is the same object for every sample (images of
  one size share their rotary embeddings);
- every boundaries kwarg the adapter names (``Traits.pack_boundaries``) is joined: each later sample's
  boundaries are shifted by the tokens before it, its leading zero dropped; the kwarg named as its
  maximum (e.g. ``max_seqlen``, flash attention's longest segment) becomes the largest one;
- everything else must be the same for every sample.

Attention never crosses a boundary, so each sample's output equals its own forward's; the block's output
is split back per sample along the first dimension (``Packed.pieces``) and the loss sees each sample's
tokens as before.  ``Replayer`` checks the first packed forward of each block against the
sample-by-sample forward, as for padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch

from .padding import narrowed

_SCALARS = (int, float, bool, str, type(None))


class _NoPack(Exception):
    """The samples' kwargs cannot share one packed forward."""


@dataclass
class Packed:
    kwargs: dict            # the joined kwargs of one forward
    lengths: list[int]      # each sample's token count

    def pieces(self, output: Any) -> list[Any]:
        """Each sample's part of the packed forward's output."""
        total = sum(self.lengths)
        return [narrowed(output, 0, start, n, total) for start, n in zip(_starts(self.lengths), self.lengths)]


def pack_collate(samples: list[dict], stream_keys: tuple[str, ...], boundaries: dict[str, str | None]) -> Packed | None:
    """The samples' kwargs packed into one forward, or None where that is not possible."""
    keys = set(samples[0])
    if len(samples) < 2 or not boundaries or any(set(s) != keys for s in samples):
        return None
    stream = next((k for k in stream_keys if k in keys), None)
    bounds = [k for k in boundaries if k in keys]
    if stream is None or not bounds:
        return None
    streams = [s[stream] for s in samples]
    if not all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in streams):
        return None
    lengths = [t.shape[0] for t in streams]
    maxima = {boundaries[k]: k for k in bounds if boundaries[k] in keys}
    try:
        joined = {}
        for key in keys:
            values = [s[key] for s in samples]
            if key in bounds:
                joined[key] = _join_boundaries(values, lengths)
            elif key in maxima:
                joined[key] = _largest(values)
            else:
                joined[key] = _join(values, lengths)
    except _NoPack:
        return None
    return Packed(joined, lengths)


def _join_boundaries(values: list[Any], lengths: list[int]) -> torch.Tensor:
    if not all(isinstance(v, torch.Tensor) and v.dim() == 1 and not v.is_floating_point() for v in values):
        raise _NoPack
    if any(int(v[0]) != 0 or int(v[-1]) != n for v, n in zip(values, lengths)):
        raise _NoPack
    parts = [values[0]] + [v[1:] + start for v, start in zip(values[1:], _starts(lengths)[1:])]
    return torch.cat(parts)


def _largest(values: list[Any]) -> Any:
    if all(v is None for v in values):     # the attention kernel needs none (e.g. SDPA)
        return None
    if all(isinstance(v, int) for v in values):
        return max(values)
    if all(isinstance(v, torch.Tensor) and v.numel() == 1 for v in values):
        return max(values, key=lambda v: v.item())
    raise _NoPack


def _join(values: list[Any], lengths: list[int]) -> Any:
    first = values[0]
    if all(isinstance(v, torch.Tensor) for v in values):
        # per-token tensors are concatenated, also one the store keeps once because it is every sample's
        if all(v.dim() > 0 and v.shape[0] == n and v.shape[1:] == first.shape[1:] for v, n in zip(values, lengths)):
            return torch.cat(values)
        if all(v is first for v in values):
            return first
        raise _NoPack
    if all(v is first for v in values):
        return first
    if all(isinstance(v, tuple) for v in values) and len({len(v) for v in values}) == 1:
        return tuple(_join([v[i] for v in values], lengths) for i in range(len(first)))
    if all(isinstance(v, _SCALARS) for v in values) and all(v == first for v in values):
        return first
    raise _NoPack


def _starts(lengths: list[int]) -> list[int]:
    """Where each sample's tokens begin in the packed sequence."""
    return list(accumulate(lengths[:-1], initial=0))
