"""AutoAWQ's packing, as auto-round writes it for asymmetric models ("auto_round:auto_awq"): read side.

``qweight`` is int32 [in, out * b / 32] and ``qzeros`` int32 [G, out * b / 32], both packed along the
output dimension (packing.py's little-endian bit stream), with the outputs of every group of 8
interleaved: logical output ``j`` of a group sits in slot ``AWQ_SLOTS[j]`` (4 bits: the classic
AutoAWQ shift table, slot ``s`` holds output ``(0, 2, 4, 6, 1, 3, 5, 7)[s]``).  Zero points are
real (no ``- 1``); ``scales`` is fp16 [G, out] as in the GPTQ layout.
"""
from __future__ import annotations

import torch

from .packing import unpack

AWQ_SLOTS = (0, 4, 1, 5, 2, 6, 3, 7)
INTERLEAVE = 8


def awq_unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [rows, n * b / 32] -> int32 [rows, n] values in logical (output) order."""
    slots = unpack(packed, bits, dim=1)
    rows, n = slots.shape
    if n % INTERLEAVE:
        raise ValueError(f"{n} AWQ-packed values are not whole groups of {INTERLEAVE}")
    order = torch.tensor(AWQ_SLOTS, device=packed.device)
    return slots.view(rows, n // INTERLEAVE, INTERLEAVE).index_select(-1, order).reshape(rows, n)
