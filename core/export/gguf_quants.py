"""Encode tuned integer weights as GGUF (llama.cpp / ggml) quantized blocks.

Each GGUF type stores a row of ``in`` weights as consecutive blocks; the layouts (little endian):

- Q4_0 (32 weights, 18 bytes): fp16 ``d``, 16 bytes of nibbles; ``w = d * (q - 8)``.  Byte ``l``
  holds weight ``l`` in its low nibble and weight ``l + 16`` in its high nibble.
- Q4_1 (32 weights, 20 bytes): fp16 ``d``, fp16 ``m``, nibbles as Q4_0; ``w = d * q + m``.
- Q8_0 (32 weights, 34 bytes): fp16 ``d``, 32 int8 ``q``; ``w = d * q``.
- the K-quants Q2_K, Q3_K, Q4_K, Q6_K (256-weight super-blocks): see gguf_kquants.py.

blockquant's codes ``W = s * (q - z)`` map exactly onto Q4_0 (symmetric 4-bit: z = 8, ``d = s``; a
negative ``s`` is legal, as llama.cpp's own Q4_0 writes ``d = max / -8``), Q8_0 (symmetric 8-bit:
``q - 128``) and Q4_1 (asymmetric 4-bit: ``m = -s * z`` rounded to fp16).  The K-quants take group-16
(Q2_K asymmetric 2-bit, Q3_K symmetric 3-bit, Q6_K symmetric 6-bit) or group-32 (Q4_K asymmetric 4-bit)
codes and quantize the group scales as llama.cpp does (gguf_kquants.py).  Rows whose length is not a
multiple of 256 fall back: Q4_K to Q4_1, which holds the same group-32 codes exactly; Q2_K, Q3_K and
Q6_K to F16 (their group-16 codes fit no smaller GGUF block exactly).
"""
from __future__ import annotations

import torch

from ..config import QuantScheme
from ..errors import UsageError
from .gguf_kquants import K_TYPES, encode_k, half_bytes, pack_fields

# type: (bits, group_size, sym, weights per block)
REQUIREMENTS = {"q4_0": (4, 32, True, 32), "q4_1": (4, 32, False, 32), "q8_0": (8, 32, True, 32),
                "q2_k": (2, 16, False, 256), "q3_k": (3, 16, True, 256), "q4_k": (4, 32, False, 256),
                "q6_k": (6, 16, True, 256)}
GGML_NAMES = {t: t.upper() for t in REQUIREMENTS}
# llama.cpp's LLAMA_FTYPE_MOSTLY_* (Q3_K: Q3_K_S, Q4_K: Q4_K_S: every quantized layer of that type)
FILE_TYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q2_k": 10, "q3_k": 11, "q4_k": 14, "q6_k": 18}


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


ENCODE_WEIGHTS = 1 << 22   # weights encoded at a time: the int32/float32 temporaries stay ~100 MiB


def encode(qw, gtype: str) -> torch.Tensor:
    """uint8 [out, bytes per row]: the rows of ``qw`` (a QuantizedWeight) as GGUF ``gtype`` blocks, encoded
    a chunk of rows at a time (rows are independent: the bytes do not depend on the chunking)."""
    out, n = qw.qweight.shape
    step = max(1, ENCODE_WEIGHTS // max(n, 1))
    if step >= out:
        return _encode_rows(qw, gtype)
    return torch.cat([_encode_rows(qw.rows(first, first + step), gtype) for first in range(0, out, step)])


def _encode_rows(qw, gtype: str) -> torch.Tensor:
    if gtype in K_TYPES:
        return encode_k(qw, gtype)
    out, n = qw.qweight.shape
    q = qw.qweight.to(torch.int32).cpu()
    s, z = qw.scale.float().cpu(), qw.zero.to(torch.int32).cpu()
    blocks = q.view(out, n // 32, 32)
    d = half_bytes(s.unsqueeze(-1)).view(out, n // 32, 2)
    if gtype == "q8_0":
        body = (blocks - 128).to(torch.int8).view(torch.uint8)
        return torch.cat([d, body], dim=-1).reshape(out, -1)
    nib = pack_fields(blocks.view(out, n // 32, 2, 16), 4)
    if gtype == "q4_0":
        return torch.cat([d, nib], dim=-1).reshape(out, -1)
    m = half_bytes((-s * z.float()).unsqueeze(-1)).view(out, n // 32, 2)
    return torch.cat([d, m, nib], dim=-1).reshape(out, -1)
