"""GGUF K-quants (llama.cpp / ggml): 256-weight super-blocks whose sub-block scales are themselves
quantized against one or two fp16 super-block factors.

The block layouts (little endian), as the gguf package dequantizes them:

- Q2_K (84 bytes): ``scales[16]`` (sub-block scale ``sc`` in the low nibble, min ``m`` in the high
  nibble), ``qs[64]`` 2-bit codes, fp16 ``d``, fp16 ``dmin``.  16 sub-blocks of 16 weights:
  ``w = d * sc[j] * q - dmin * m[j]``, q in 0..3.
- Q3_K (110 bytes): ``hmask[32]`` (bit 2 of each code), ``qs[64]`` (bits 0-1), ``scales[12]`` (16
  6-bit scales stored + 32), fp16 ``d``.  16 sub-blocks of 16: ``w = d * (sc[j] - 32) * (q - 4)``,
  q in 0..7.
- Q4_K (144 bytes): fp16 ``d``, fp16 ``dmin``, ``scales[12]`` (8 6-bit scales and 8 6-bit mins),
  ``qs[128]`` nibbles.  8 sub-blocks of 32: ``w = d * sc[j] * q - dmin * m[j]``, q in 0..15.
- Q6_K (210 bytes): ``ql[128]`` (low 4 bits of each code), ``qh[64]`` (high 2 bits), ``scales[16]``
  int8, fp16 ``d``.  16 sub-blocks of 16: ``w = d * sc[j] * (q - 32)``, q in 0..63.

Where codes sit: Q2_K/Q3_K ``qs`` byte ``32 h + l`` holds, in bits ``2 s .. 2 s + 1``, weight
``128 h + 32 s + l``; Q3_K ``hmask`` byte ``l`` holds, in bit ``b``, weight ``32 b + l``; Q4_K nibble byte
``32 c + l`` holds weight ``l`` of sub-block ``2 c`` (low) and ``2 c + 1`` (high); Q6_K ``ql`` byte
``64 h + l`` holds weights ``128 h + l`` (low nibble) and ``128 h + 64 + l`` (high), ``qh`` byte ``32 h
+ l`` holds, in bits ``2 s .. 2 s + 1``, weight ``128 h + 32 s + l``.  Q3_K scale ``i``: low 4 bits in byte
``i % 8`` (low nibble for i < 8, high nibble otherwise), high 2 bits in byte ``8 + i % 4`` at bit
``2 (i // 4)``.  Q4_K: bytes 0-3 ``sc[0..3]`` in bits 0-5 and bits 4-5 of ``sc[4..7]`` in bits 6-7;
bytes 4-7 the same for ``m``; bytes 8-11 the low 4 bits of ``sc[4..7]`` (low nibble) and ``m[4..7]``.

Mapping blockquant's tuned codes ``W = s * (q - z)`` (one scale per sub-block: group size 16 or 32)
onto a type: the sub-block scales are quantized as llama.cpp quantizes them - for the types with mins
(Q2_K, Q4_K, asymmetric codes) ``d`` = largest scale / ``top`` (15 or 63) rounded to fp16, ``sc =
round(s / d)``, the mins ``s * z`` likewise against ``dmin``; for the signed types (Q3_K, Q6_K,
symmetric codes) ``d`` = the scale of largest magnitude / ``-(top + 1)`` (-32 or -128), ``sc = round(s
/ d)`` clamped to ``[-(top + 1), top]``.  The codes are then re-rounded to the nearest point of that grid
from the tuned weight ``s * (q - z)`` (unchanged wherever the scale grid holds ``s`` exactly).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KType:
    bits: int          # code bits
    group: int         # weights per sub-block (one scale)
    top: int           # largest integer sub-block scale (signed types: smallest is -(top + 1))
    mins: bool         # sub-block mins (asymmetric codes) or signed scales (symmetric codes)


K_TYPES = {"q2_k": KType(2, 16, 15, True), "q3_k": KType(3, 16, 31, False),
           "q4_k": KType(4, 32, 63, True), "q6_k": KType(6, 16, 127, False)}
SUPER = 256   # weights per super-block


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def _level(x: torch.Tensor, unit: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """round(x / unit) clamped to [lo, hi] (0 where ``unit`` is 0), int32."""
    unit = unit.unsqueeze(-1)
    safe = torch.where(unit == 0, torch.ones_like(unit), unit)
    return torch.where(unit != 0, torch.round(x / safe), 0).clamp(lo, hi).to(torch.int32)


@dataclass
class KParts:
    """One weight as ``gtype``: super-block factors ``d``/``dmin`` [out, S] (fp16 values), integer
    sub-block scales/mins ``sc``/``m`` [out, S, n], codes [out, S, n, group] in 0..2^bits - 1."""

    kt: KType
    d: torch.Tensor
    dmin: torch.Tensor | None
    sc: torch.Tensor
    m: torch.Tensor | None
    codes: torch.Tensor

    def values(self) -> torch.Tensor:
        """float32 [out, S, n, group]: the weights, computed in the order ggml computes them."""
        step = (self.d.unsqueeze(-1) * self.sc.float()).unsqueeze(-1)
        if self.kt.mins:
            return step * self.codes.float() - (self.dmin.unsqueeze(-1) * self.m.float()).unsqueeze(-1)
        return step * (self.codes - 2 ** (self.kt.bits - 1)).float()


def k_parts(qw, gtype: str) -> KParts:
    """The ``gtype`` encoding of a QuantizedWeight (see the module docstring)."""
    kt = K_TYPES[gtype]
    q, s, z = qw.qweight.to(torch.int32).cpu(), qw.scale.float().cpu(), qw.zero.to(torch.int32).cpu()
    out, n = q.shape
    S, per = n // SUPER, SUPER // kt.group
    s, z = s.view(out, S, per), z.view(out, S, per)
    tuned = (q.view(out, S, per, kt.group).float() - z.unsqueeze(-1)) * s.unsqueeze(-1)
    maxq = 2 ** kt.bits - 1
    if kt.mins:
        mins = s * z.float()
        d, dmin = _fp16(s.amax(-1) / kt.top), _fp16(mins.amax(-1) / kt.top)
        sc, m = _level(s, d, 0, kt.top), _level(mins, dmin, 0, kt.top)
        step = (d.unsqueeze(-1) * sc.float()).unsqueeze(-1)
        low = (dmin.unsqueeze(-1) * m.float()).unsqueeze(-1)
        codes = torch.where(step > 0, torch.round((tuned + low) / step.clamp(min=1e-30)), 0)
        return KParts(kt, d, dmin, sc, m, codes.clamp(0, maxq).to(torch.int32))
    extreme = s.gather(-1, s.abs().argmax(-1, keepdim=True)).squeeze(-1)
    d = _fp16(extreme / -(kt.top + 1))
    sc = _level(s, d, -(kt.top + 1), kt.top)
    step = (d.unsqueeze(-1) * sc.float()).unsqueeze(-1)
    safe = torch.where(step == 0, torch.ones_like(step), step)
    codes = torch.where(step != 0, torch.round(tuned / safe), 0) + 2 ** (kt.bits - 1)
    return KParts(kt, d, None, sc, None, codes.clamp(0, maxq).to(torch.int32))


def dequantize_k(qw, gtype: str = "q4_k") -> torch.Tensor:
    """float32 [out, in]: the weight the ``gtype`` encoding of ``qw`` holds (the tuned weight moved onto
    the grid of quantized sub-block scales)."""
    return k_parts(qw, gtype).values().reshape(qw.qweight.shape)


def half_bytes(x: torch.Tensor) -> torch.Tensor:
    """[..., n] float -> [..., 2n] uint8: the fp16 values, little endian."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def pack_fields(v: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., k, L] small integers -> [..., L] bytes: field ``j`` in bits ``bits * j`` (k * bits <= 8)."""
    out = torch.zeros(v.shape[:-2] + v.shape[-1:], dtype=torch.int32)
    for j in range(v.shape[-2]):
        out |= v[..., j, :].to(torch.int32) << (bits * j)
    return out.to(torch.uint8)


def encode_k(qw, gtype: str) -> torch.Tensor:
    """uint8 [out, bytes per row]: the rows of ``qw`` as GGUF ``gtype`` super-blocks."""
    p = k_parts(qw, gtype)
    out, S = p.d.shape
    c = p.codes.reshape(out, S, SUPER)
    d = half_bytes(p.d.unsqueeze(-1))
    if gtype == "q2_k":
        parts = [pack_fields(torch.stack([p.sc, p.m], -2), 4), pack_fields(c.view(out, S, 2, 4, 32), 2).view(out, S, 64),
                 d, half_bytes(p.dmin.unsqueeze(-1))]
    elif gtype == "q3_k":
        u = p.sc + 32
        scales = torch.cat([pack_fields(u.view(out, S, 2, 8) & 0xF, 4), pack_fields((u >> 4).view(out, S, 4, 4), 2)], -1)
        parts = [pack_fields((c >> 2).view(out, S, 8, 32), 1), pack_fields((c & 3).view(out, S, 2, 4, 32), 2).view(out, S, 64),
                 scales, d]
    elif gtype == "q4_k":
        sc, m = p.sc, p.m
        scales = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), m[..., :4] | ((m[..., 4:] >> 4) << 6),
                            (sc[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4)], dim=-1).to(torch.uint8)
        parts = [d, half_bytes(p.dmin.unsqueeze(-1)), scales, pack_fields(c.view(out, S, 4, 2, 32), 4).view(out, S, 128)]
    else:   # q6_k
        ql = pack_fields((c & 0xF).view(out, S, 2, 2, 64), 4).view(out, S, 128)
        qh = pack_fields((c >> 4).view(out, S, 2, 4, 32), 2).view(out, S, 64)
        parts = [ql, qh, p.sc.to(torch.int8).view(torch.uint8), d]
    return torch.cat(parts, dim=-1).reshape(out, -1)
