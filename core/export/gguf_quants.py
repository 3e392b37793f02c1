"""Encode tuned integer weights as GGUF (llama.cpp / ggml) quantized blocks.

Each GGUF type stores a row of ``in`` weights as consecutive blocks; the layouts (little endian):

- Q4_0 (32 weights, 18 bytes): fp16 ``d``, 16 bytes of nibbles; ``w = d * (q - 8)``.  Byte ``l``
  holds weight ``l`` in its low nibble and weight ``l + 16`` in its high nibble.
- Q4_1 (32 weights, 20 bytes): fp16 ``d``, fp16 ``m``, nibbles as Q4_0; ``w = d * q + m``.
- Q8_0 (32 weights, 34 bytes): fp16 ``d``, 32 int8 ``q``; ``w = d * q``.
- Q4_K (256 weights, 144 bytes): fp16 ``d``, fp16 ``dmin``, 12 bytes of 6-bit sub-block scales
  ``sc[8]`` and mins ``m[8]``, 128 bytes of nibbles; sub-block ``j`` (32 weights) is
  ``w = d * sc[j] * q - dmin * m[j]``.  Scale bytes 0-3: ``sc[0..3]`` in bits 0-5 and bits 4-5 of
  ``sc[4..7]`` in bits 6-7; bytes 4-7 the same for ``m``; bytes 8-11: the low 4 bits of ``sc[4..7]``
  (low nibble) and of ``m[4..7]`` (high nibble).  Nibble byte ``32 c + l`` holds weight ``l`` of
  sub-block ``2c`` (low) and of sub-block ``2c + 1`` (high).

blockquant's codes ``W = s * (q - z)`` map exactly onto Q4_0 (symmetric 4-bit: z = 8, ``d = s``; a
negative ``s`` is legal, as llama.cpp's own Q4_0 writes ``d = max / -8``), Q8_0 (symmetric 8-bit:
``q - 128``) and Q4_1 (asymmetric 4-bit: ``m = -s * z`` rounded to fp16).  Q4_K quantizes the
per-group scales and mins to 6 bits per 256-weight super-block as llama.cpp does (``d`` = largest
scale / 63, ``sc = round(s / d)``, the same for the mins); the codes are then re-rounded to the
nearest point of that grid from the tuned weight ``s * (q - z)``.  Rows whose length is not a
multiple of 256 fall back to Q4_1, which holds the same group-32 codes exactly.
"""
from __future__ import annotations

import torch

from ..config import QuantScheme
from ..errors import UsageError

# type: (bits, group_size, sym, weights per block)
REQUIREMENTS = {"q4_0": (4, 32, True, 32), "q4_1": (4, 32, False, 32), "q8_0": (8, 32, True, 32),
                "q4_k": (4, 32, False, 256)}
GGML_NAMES = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q8_0": "Q8_0", "q4_k": "Q4_K"}
FILE_TYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k": 14}   # llama.cpp's LLAMA_FTYPE_MOSTLY_* (Q4_K: Q4_K_S)


def check_scheme(gtype: str, scheme: QuantScheme) -> None:
    """Refuse a scheme whose codes ``gguf:gtype`` cannot hold (one line naming the options)."""
    bits, group_size, sym, _ = REQUIREMENTS[gtype]
    if scheme.data_type != "int" or (scheme.bits, scheme.group_size, scheme.sym) != (bits, group_size, sym):
        raise UsageError(
            f"--format gguf:{gtype} needs --bits {bits} --group_size {group_size} --sym {str(sym).lower()} "
            f"(got --bits {scheme.bits} --group_size {scheme.group_size} --sym {str(scheme.sym).lower()})")


def block_type(gtype: str, in_features: int) -> str | None:
    """The GGUF type a quantized row of ``in_features`` is written in (None: keep it in F16)."""
    if gtype == "q4_k" and in_features % 256:
        gtype = "q4_1"
    return gtype if in_features % REQUIREMENTS[gtype][3] == 0 else None


def _half_bytes(x: torch.Tensor) -> torch.Tensor:
    """[..., n] float -> [..., 2n] uint8: the fp16 values, little endian."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[..., 2, k] codes 0..15 -> [..., k] bytes: first half in the low nibbles, second in the high."""
    return (q[..., 0, :] | (q[..., 1, :] << 4)).to(torch.uint8)


def encode(qw, gtype: str) -> torch.Tensor:
    """uint8 [out, bytes per row]: the rows of ``qw`` (a QuantizedWeight) as GGUF ``gtype`` blocks."""
    if gtype == "q4_k":
        return _encode_q4_k(qw)
    out, n = qw.qweight.shape
    q = qw.qweight.to(torch.int32).cpu()
    s, z = qw.scale.float().cpu(), qw.zero.to(torch.int32).cpu()
    blocks = q.view(out, n // 32, 32)
    d = _half_bytes(s.unsqueeze(-1)).view(out, n // 32, 2)
    if gtype == "q8_0":
        body = (blocks - 128).to(torch.int8).view(torch.uint8)
        return torch.cat([d, body], dim=-1).reshape(out, -1)
    nib = _nibbles(blocks.view(out, n // 32, 2, 16))
    if gtype == "q4_0":
        return torch.cat([d, nib], dim=-1).reshape(out, -1)
    m = _half_bytes((-s * z.float()).unsqueeze(-1)).view(out, n // 32, 2)
    return torch.cat([d, m, nib], dim=-1).reshape(out, -1)


def k_grid(s: torch.Tensor, z: torch.Tensor):
    """Q4_K super-block parameters for group scales ``s`` and zeros ``z`` [out, S, 8]:
    (d, dmin [out, S] as fp16 values, sc, m [out, S, 8] integers 0..63)."""
    mins = s * z.float()
    d = (s.amax(-1) / 63).half().float()
    dmin = (mins.amax(-1) / 63).half().float()
    sc = torch.where(d.unsqueeze(-1) > 0, torch.round(s / d.unsqueeze(-1).clamp(min=1e-30)), 0).clamp(0, 63)
    m = torch.where(dmin.unsqueeze(-1) > 0, torch.round(mins / dmin.unsqueeze(-1).clamp(min=1e-30)), 0).clamp(0, 63)
    return d, dmin, sc.to(torch.int32), m.to(torch.int32)


def _k_parts(qw):
    """Q4_K of a QuantizedWeight: (d, dmin, sc, m, codes [out, S, 8, 32], step, low [out, S, 8, 1])."""
    q, s, z = qw.qweight.to(torch.int32).cpu(), qw.scale.float().cpu(), qw.zero.to(torch.int32).cpu()
    out, n = q.shape
    S = n // 256
    s, z = s.view(out, S, 8), z.view(out, S, 8)
    d, dmin, sc, m = k_grid(s, z)
    tuned = (q.view(out, S, 8, 32).float() - z.unsqueeze(-1)) * s.unsqueeze(-1)
    step = (d.unsqueeze(-1) * sc.float()).unsqueeze(-1)                     # float32, as ggml computes it
    low = (dmin.unsqueeze(-1) * m.float()).unsqueeze(-1)
    codes = torch.where(step > 0, torch.round((tuned + low) / step.clamp(min=1e-30)), 0).clamp(0, 15).to(torch.int32)
    return d, dmin, sc, m, codes, step, low


def dequantize_k(qw) -> torch.Tensor:
    """float32 [out, in]: the weight a Q4_K encoding of ``qw`` holds (the tuned weight moved onto the
    grid of 6-bit sub-block scales and mins)."""
    *_, codes, step, low = _k_parts(qw)
    return (step * codes.float() - low).reshape(qw.qweight.shape)


def _encode_q4_k(qw) -> torch.Tensor:
    d, dmin, sc, m, codes, _, _ = _k_parts(qw)
    out, S = d.shape
    lo, hi = sc[..., :4], sc[..., 4:]
    mlo, mhi = m[..., :4], m[..., 4:]
    scales = torch.cat([lo | ((hi >> 4) << 6), mlo | ((mhi >> 4) << 6), (hi & 0xF) | ((mhi & 0xF) << 4)], dim=-1)
    nib = _nibbles(codes.view(out, S, 4, 2, 32))                            # [out, S, 4, 32]
    parts = [_half_bytes(d.unsqueeze(-1)), _half_bytes(dmin.unsqueeze(-1)), scales.to(torch.uint8),
             nib.reshape(out, S, 128)]
    return torch.cat(parts, dim=-1).reshape(out, -1)
