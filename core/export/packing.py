"""Pack b-bit integers into int32 words, GPTQ style, and unpack them again.

Values form one little-endian bit stream per packed line: value k occupies stream bits
[k*b, (k+1)*b), and stream bit n is bit n % 32 of word n // 32.  For b in {2, 4, 8} this is the
plain layout (word r holds values r*(32/b) .. r*(32/b)+32/b-1, value j of the word in bits
[j*b, (j+1)*b)).  For b = 3 it is exactly GPTQ's 3-bit layout: 32 values per 3 words, values 10
and 21 crossing word boundaries.  The same code handles both: one period of ``32 / gcd(32, b)``
values fills ``b / gcd(32, b)`` words.

The work is int32 shifts and ORs done in place on one scratch buffer (int32 shifts wrap, which is
exactly the truncation to 32 bits that packing needs): fresh allocations, not arithmetic, are
what costs on large layers.  Packing along the last (contiguous) dimension needs no copy.
"""
from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
_WORD = 32


def period(bits: int) -> tuple[int, int]:
    """(values, words) of one packing period: that many values fill exactly that many words."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot pack {bits}-bit values; supported: {SUPPORTED_BITS}")
    g = math.gcd(_WORD, bits)
    return _WORD // g, bits // g


def _slots(bits: int):
    """For each value of one period: (word, bit offset, bits spilling into the next word)."""
    return [(j * bits // _WORD, j * bits % _WORD, max(0, j * bits % _WORD + bits - _WORD))
            for j in range(period(bits)[0])]


def _tables(bits: int, device):
    slots = _slots(bits)
    word = torch.tensor([w for w, _, _ in slots], dtype=torch.long, device=device)
    offset = torch.tensor([o for _, o, _ in slots], dtype=torch.int32, device=device)
    return slots, word, offset


def pack(values: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack integers in [0, 2^bits) along ``dim`` into int32 words (see module docstring)."""
    nvals, nwords = period(bits)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= (1 << bits)):
        raise ValueError(f"values out of range for {bits}-bit packing: [{int(values.min())}, {int(values.max())}]")
    moved = values.movedim(dim, -1)
    n, lead = moved.shape[-1], moved.shape[:-1]
    if n % nvals:
        raise ValueError(f"{n} values of {bits} bits do not fill whole int32 words (need a multiple of {nvals})")
    slots, word, offset = _tables(bits, values.device)
    v = moved.reshape(*lead, n // nvals, nvals).to(torch.int32, copy=True)
    carries = [(w + 1, v[..., j] >> (bits - spill)) for j, (w, _, spill) in enumerate(slots) if spill]
    v.bitwise_left_shift_(offset)                 # int32 shifts wrap: bits past 31 fall off
    # Fields are disjoint, so a sum is an OR; only the field holding bit 31 is negative and the others
    # add up to less than 2^31, so no partial int32 sum overflows.
    bounds = [int((word < w).sum()) for w in range(nwords + 1)]
    words = torch.stack([v[..., a:b].sum(-1, dtype=torch.int32) for a, b in zip(bounds, bounds[1:])], dim=-1)
    for w, carry in carries:
        words[..., w].bitwise_or_(carry)
    return words.reshape(*lead, -1).movedim(-1, dim).contiguous()


def unpack(packed: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words -> int32 values in [0, 2^bits), unpacked along ``dim``."""
    nvals, nwords = period(bits)
    mask = (1 << bits) - 1
    moved = packed.to(torch.int32).movedim(dim, -1)
    rows, lead = moved.shape[-1], moved.shape[:-1]
    if rows % nwords:
        raise ValueError(f"{rows} words are not whole {bits}-bit packing periods of {nwords} words")
    slots, word, offset = _tables(bits, packed.device)
    chunks = moved.reshape(*lead, rows // nwords, nwords)
    out = chunks.index_select(-1, word)            # [..., periods, nvals]: each value's word
    out.bitwise_right_shift_(offset)               # arithmetic shift: sign bits cleared below
    low = torch.tensor([(1 << (_WORD - o)) - 1 if spill else mask for _, o, spill in slots],
                       dtype=torch.int32, device=packed.device)
    out.bitwise_and_(low)
    for j, (w, _, spill) in enumerate(slots):
        if spill:
            out[..., j].bitwise_or_((chunks[..., w + 1] << (bits - spill)) & mask)
    return out.reshape(*lead, -1).movedim(-1, dim).contiguous()
