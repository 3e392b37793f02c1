"""Pack b-bit integers into int32 words, GPTQ style, and unpack them again.

Values form one little-endian bit stream per column (or row): value k occupies stream bits
[k*b, (k+1)*b), and stream bit n is bit n % 32 of word n // 32.  For b in {2, 4, 8} this is the
plain layout (word r holds values r*(32/b) .. r*(32/b)+32/b-1, value j of the word in bits
[j*b, (j+1)*b)).  For b = 3 it is exactly GPTQ's 3-bit layout: 32 values per 3 words, values 10
and 21 crossing word boundaries.  The same code handles both: one period of ``32 / gcd(32, b)``
values fills ``b / gcd(32, b)`` words.

All arithmetic runs in int64 so that shifts into and out of bit 31 need no sign tricks; the
packed result is returned as int32 with the bit pattern of the uint32 word.
"""
from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
_WORD = 32
_MASK32 = (1 << _WORD) - 1


def period(bits: int) -> tuple[int, int]:
    """(values, words) of one packing period: that many values fill exactly that many words."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot pack {bits}-bit values; supported: {SUPPORTED_BITS}")
    g = math.gcd(_WORD, bits)
    return _WORD // g, bits // g


def packed_length(n: int, bits: int) -> int:
    """Words needed for ``n`` values; ``n`` must fill whole periods."""
    values, words = period(bits)
    if n % values:
        raise ValueError(f"{n} values of {bits} bits do not fill whole int32 words (need a multiple of {values})")
    return n // values * words


def can_pack(n: int, bits: int) -> bool:
    """True when ``n`` values of ``bits`` bits fill whole int32 words."""
    return n % period(bits)[0] == 0


def _slots(bits: int):
    """For each value of one period: (word, bit offset, bits spilling into the next word)."""
    values, _ = period(bits)
    out = []
    for j in range(values):
        start = j * bits
        word, offset = divmod(start, _WORD)
        out.append((word, offset, max(0, offset + bits - _WORD)))
    return out


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding uint32 bit patterns -> int32 with the same bits."""
    words = words & _MASK32
    return torch.where(words >= (1 << 31), words - (1 << _WORD), words).to(torch.int32)


def pack(values: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack integers in [0, 2^bits) along ``dim`` into int32 words (see module docstring)."""
    values = values.to(torch.int64)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= (1 << bits)):
        raise ValueError(f"values out of range for {bits}-bit packing: [{int(values.min())}, {int(values.max())}]")
    moved = values.movedim(dim, 0)
    n, rest = moved.shape[0], moved.shape[1:]
    nvals, nwords = period(bits)
    packed_length(n, bits)  # validates the length
    chunks = moved.reshape(n // nvals, nvals, *rest)
    words = torch.zeros((n // nvals, nwords, *rest), dtype=torch.int64, device=values.device)
    for j, (word, offset, spill) in enumerate(_slots(bits)):
        v = chunks[:, j]
        words[:, word] |= (v << offset) & _MASK32
        if spill:
            words[:, word + 1] |= v >> (bits - spill)
    return _to_int32(words.reshape(-1, *rest)).movedim(0, dim).contiguous()


def unpack(packed: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words -> int32 values in [0, 2^bits), unpacked along ``dim``."""
    moved = packed.to(torch.int64).movedim(dim, 0) & _MASK32
    nvals, nwords = period(bits)
    rows, rest = moved.shape[0], moved.shape[1:]
    if rows % nwords:
        raise ValueError(f"{rows} words are not whole {bits}-bit packing periods of {nwords} words")
    chunks = moved.reshape(rows // nwords, nwords, *rest)
    mask = (1 << bits) - 1
    parts = []
    for word, offset, spill in _slots(bits):
        v = chunks[:, word] >> offset
        if spill:
            v = v | (chunks[:, word + 1] << (bits - spill))
        parts.append(v & mask)
    out = torch.stack(parts, dim=1).reshape(rows // nwords * nvals, *rest)
    return out.to(torch.int32).movedim(0, dim).contiguous()
