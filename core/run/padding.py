"""One forward for samples of different lengths: right-padding to the batch's longest.

Samples whose kwargs cannot be stacked as they are (``replay.collate``) because their sequences differ in
length (image + text samples with images of different sizes, prompts of different lengths) are padded:

- the length of a sample is the one dimension of its first stream (``hidden_states``) whose size
  differs between the samples; every tensor dimension that differs between the samples must be that
  length (per-token inputs: rotary embeddings, position ids, per-layer inputs) and is padded with zeros
  at the end; tensors must have a leading dimension of one row, as in ``collate``;
- an ``attention_mask`` tensor of shape ``[1, heads, L, L]`` is padded so that no real token attends to
  a padded one (boolean: False; additive: the dtype's minimum), and padded queries attend to every key
  (their outputs are dropped; a fully masked row would give NaN gradients);
- ``attention_mask`` None (causal attention by the kernel's ``is_causal``) stays None: with the padding
  at the end, a real token never sees a later (padded) one.

The block's output is split per sample and cut back to each sample's length (``trim``), so the streams,
the adapter's ``block_outputs`` and the loss see only real tokens: the mean squared error over the
samples' real tokens is the loss of the sample-by-sample path.  ``Replayer`` checks the first padded
forward of each block against the sample-by-sample forward and keeps padding only where they agree
(a block whose attention is bidirectional under a None mask, or whose inputs hide per-sample structure
the padding does not know, runs sample by sample).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

MASK_KEY = "attention_mask"


class NoPad(Exception):
    """The samples' kwargs cannot share one padded forward."""


@dataclass
class Padded:
    kwargs: dict            # the joined kwargs of one forward
    lengths: list[int]      # each sample's real length
    dim: int                # the streams' sequence dimension

    def pieces(self, output: Any) -> list[Any]:
        """Each sample's row of the padded forward's output, cut back to its real length."""
        longest = max(self.lengths)
        rows = split_output(output, [1] * len(self.lengths))
        return [trim(p, n, longest, self.dim) for p, n in zip(rows, self.lengths)]


def pad_collate(samples: list[dict], stream_keys: tuple[str, ...]) -> Padded | None:
    """The samples' kwargs joined into one right-padded forward, or None where that is not possible."""
    keys = set(samples[0])
    if len(samples) < 2 or any(set(s) != keys for s in samples):
        return None
    stream = next((k for k in stream_keys if k in keys), None)
    if stream is None:
        return None
    found = _lengths([s[stream] for s in samples])
    if found is None:
        return None
    dim, lengths = found
    try:
        joined = {key: _join([s[key] for s in samples], lengths, key == MASK_KEY) for key in keys}
    except NoPad:
        return None
    return Padded(joined, lengths, dim)


def _lengths(values: list[Any]) -> tuple[int, list[int]] | None:
    """(sequence dim, lengths) of one stream: the one dim whose size differs between the samples
    (dim 1 when none differs: the samples are stacked as they are)."""
    if not all(isinstance(v, torch.Tensor) for v in values) or values[0].dim() < 2:
        return None
    differ = _differing_dims(values)
    if differ is None or len(differ) > 1:
        return None
    dim = differ[0] if differ else 1
    return dim, [v.shape[dim] for v in values]


def _join(values: list[Any], lengths: list[int], is_mask: bool) -> Any:
    first = values[0]
    if all(v is first for v in values):
        return first
    if all(isinstance(v, torch.Tensor) for v in values):
        if is_mask:
            return torch.cat([_pad_mask(v, n, max(lengths)) for v, n in zip(values, lengths)])
        return torch.cat(pad_tensors(values, lengths))
    if all(isinstance(v, tuple) for v in values) and len({len(v) for v in values}) == 1:
        return tuple(_join([v[i] for v in values], lengths, False) for i in range(len(first)))
    raise NoPad


def pad_tensors(values: list[torch.Tensor], lengths: list[int]) -> list[torch.Tensor]:
    """Zeros at the end of every dim whose size differs between the samples (it must be their length)."""
    differ = _differing_dims(values)
    if differ is None or any(v.shape[d] != n for d in differ for v, n in zip(values, lengths)):
        raise NoPad
    longest = max(lengths)
    out = []
    for v, n in zip(values, lengths):
        pad = []
        for d in range(v.dim() - 1, 0, -1):   # F.pad lists the last dim first
            pad += [0, longest - n] if d in differ else [0, 0]
        out.append(F.pad(v, pad) if n != longest and differ else v)
    return out


def _differing_dims(values: list[torch.Tensor]) -> list[int] | None:
    """The dims (after the leading one) whose size differs between the tensors; None unless they all
    have one leading row and the same number of dims."""
    first = values[0]
    if first.dim() == 0 or any(v.dim() != first.dim() or v.shape[0] != 1 for v in values):
        return None
    return [d for d in range(1, first.dim()) if len({v.shape[d] for v in values}) > 1]


def _pad_mask(mask: torch.Tensor, length: int, longest: int) -> torch.Tensor:
    """A ``[1, heads, L, L]`` mask padded to ``longest``: padded keys hidden, padded queries see all."""
    if mask.dim() != 4 or mask.shape[0] != 1 or mask.shape[-1] != length or mask.shape[-2] != length:
        raise NoPad
    if length == longest:
        return mask
    if mask.dtype == torch.bool:
        hidden, seen = False, True
    elif mask.is_floating_point():
        hidden, seen = torch.finfo(mask.dtype).min, 0.0
    else:
        raise NoPad
    out = torch.full((1, mask.shape[1], longest, longest), hidden, dtype=mask.dtype, device=mask.device)
    out[..., :length, :length] = mask
    out[..., length:, :] = seen
    return out


def split_output(output: Any, rows: list[int]) -> list[Any]:
    """A forward's output over stacked samples split into each sample's ``rows`` (tensors whose first
    dimension is the total; anything else is every sample's)."""
    total = sum(rows)
    if isinstance(output, torch.Tensor):
        if output.dim() > 0 and output.shape[0] == total:
            return list(torch.split(output, rows, dim=0))
        return [output] * len(rows)
    if isinstance(output, (tuple, list)):
        parts = [split_output(o, rows) for o in output]
        return [type(output)(p[i] for p in parts) if isinstance(output, tuple) else [p[i] for p in parts]
                for i in range(len(rows))]
    return [output] * len(rows)


def trim(output: Any, length: int, longest: int, dim: int) -> Any:
    """One sample's piece of a padded output, cut back to its real length along ``dim``."""
    return output if length == longest else narrowed(output, dim, 0, length, longest)


def narrowed(output: Any, dim: int, start: int, length: int, size: int) -> Any:
    """``output`` with every tensor whose ``dim`` is ``size`` long narrowed to ``start:start + length``
    along it (in nested tuples, named tuples and lists; anything else as it is)."""
    if isinstance(output, torch.Tensor):
        return output.narrow(dim, start, length) if output.dim() > dim and output.shape[dim] == size else output
    if isinstance(output, tuple):
        parts = (narrowed(o, dim, start, length, size) for o in output)
        return type(output)(*parts) if hasattr(output, "_fields") else type(output)(parts)
    if isinstance(output, list):
        return [narrowed(o, dim, start, length, size) for o in output]
    return output


def tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a (nested) output, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors(v)]
    return []


def agree(a: Any, b: Any, dtype: torch.dtype) -> bool:
    """Whether two outputs of the same samples are equal up to the rounding of ``dtype``."""
    ta, tb = tensors(a), tensors(b)
    if len(ta) != len(tb):
        return False
    tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            return False
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return False
            continue
        x, y = x.detach().double(), y.detach().double()
        if not torch.isfinite(x).all() or (x - y).norm() > tolerance * y.norm().clamp_min(1e-30):
            return False
    return True
